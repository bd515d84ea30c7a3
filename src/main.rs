//! The `keel` command line: `keel serve`, `keel validate`, `keel --version`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel::observe::{LogFormat, init_logs};
use keel::policy::Policy;

/// Keel: a gRPC inference gateway for the KServe Open Inference Protocol v2.
///
/// With no command, `keel` serves (the same as `keel serve`).
#[derive(Parser)]
#[command(name = "keel", version, about)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level or filter directive (`info`, `keel=debug`); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC traffic (the default).
    Serve(ServeArgs),
    /// Check a configuration file without opening sockets; exit 0 if valid, 1 if not.
    Validate {
        /// The TOML file to check.
        file: PathBuf,
    },
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// A TOML configuration file; without one, Keel serves its embedded models.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Listen address, overriding `server.listen` (default 127.0.0.1:8001).
    #[arg(long)]
    listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format, &cli.log_level);
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(args),
        Command::Validate { file } => validate(&file),
    }
}

fn validate(file: &std::path::Path) -> ExitCode {
    let checked = Policy::load(file).and_then(|p| {
        keel::route::check(&p, &keel::upstream::embedded::Embedded::new())?;
        Ok(p)
    });
    match checked {
        Ok(p) => {
            let models = p.models.as_ref().map_or_else(
                || "every embedded model".to_string(),
                |m| format!("{} models", m.len()),
            );
            println!(
                "{}: valid ({models}, {} upstreams)",
                file.display(),
                p.upstreams.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors.0 {
                eprintln!("{}: {e}", file.display());
            }
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let mut policy = match &args.config {
        None => Policy::default(),
        Some(path) => match Policy::load(path) {
            Ok(p) => p,
            Err(errors) => {
                for e in errors.0 {
                    eprintln!("{}: {e}", path.display());
                }
                return ExitCode::FAILURE;
            }
        },
    };
    if let Some(listen) = args.listen {
        policy.server.listen = listen;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keel: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listen = policy.server.listen;
        let keel = match keel::Keel::new(policy) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("keel: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("keel: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = shutdown_signal();
        let names: Vec<String> = keel.models().into_iter().map(|(m, _)| m).collect();
        println!(
            "keel {} listening on {} (gRPC, OIP v2) serving models: {}",
            env!("CARGO_PKG_VERSION"),
            listener.local_addr().unwrap_or(listen),
            names.join(", ")
        );
        match keel.serve(listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keel: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Completes on Ctrl-C or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled, so a signal that arrives right after the startup line is
/// never missed.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        async move {
            let term = async {
                match term.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = int => tracing::info!("received Ctrl-C (SIGINT)"),
                _ = term => tracing::info!("received SIGTERM"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("received Ctrl-C");
    }
}
