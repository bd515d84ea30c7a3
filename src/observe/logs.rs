//! Structured logs through `tracing`: human-readable text by default, JSON for collectors.
//!
//! # Colour
//!
//! Text lines are coloured only when stderr is a terminal and `NO_COLOR` is unset or
//! empty (<https://no-color.org>), so `keel serve 2> keel.log` or a pipe into a collector
//! never carries ANSI escape codes.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// Installs the global subscriber, writing to stderr. `level` is an `EnvFilter` directive
/// (`info`, `keel=debug`); `RUST_LOG` wins when set. Calling it twice is harmless.
pub fn init_logs(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Whether log lines get ANSI colours: only on a terminal, and not when `NO_COLOR` is set
/// to anything but the empty string.
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(
            colour(true, Some("".as_ref())),
            "an empty NO_COLOR is unset"
        );
        assert!(!colour(true, Some("1".as_ref())));
        assert!(!colour(false, None), "a file or a pipe");
        assert!(!colour(false, Some("1".as_ref())));
    }
}
