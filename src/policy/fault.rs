//! Fault injection settings (`[defaults.fault]`, `[methods."...".fault]`,
//! `[models.<name>.fault]`): Envoy-style aborts and delays that make a backend look sick,
//! for testing what Keel (or a Keel in front of this one) does about it.

use std::time::Duration;

use super::reader::{Problems, Section};

/// An injected error answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Abort {
    /// Share of attempts aborted, 0..=100.
    pub percent: f64,
    /// The status code they answer.
    pub code: tonic::Code,
}

/// An injected wait before the backend call.
#[derive(Clone, Debug, PartialEq)]
pub struct Delay {
    /// Share of attempts delayed, 0..=100.
    pub percent: f64,
    /// How long.
    pub duration: Duration,
}

/// What faults a layer injects. Off unless set; the layer set closest to the call (model >
/// method > defaults) wins as a whole.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fault {
    /// Aborts.
    pub abort: Option<Abort>,
    /// Delays.
    pub delay: Option<Delay>,
    /// Aborted answers say `grpc-retry-pushback-ms` with this wait (the server is
    /// overloaded: come back later).
    pub pushback: Option<Duration>,
    /// Whether a request may ask for a fault with `keel-fault` metadata.
    pub allow_request: bool,
}

fn percent(s: &mut Section<'_>, p: &mut Problems) -> f64 {
    let v = s.number(p, "percent", 0.0..=100.0);
    if v.is_none() {
        p.add(s.at("percent"), "is required: 0 to 100");
    }
    v.unwrap_or(0.0)
}

/// Reads a `fault` table.
pub(super) fn read(s: &mut Section<'_>, p: &mut Problems) -> Option<Fault> {
    let mut t = s.table(p, "fault")?;
    let abort = t.table(p, "abort").map(|mut a| {
        let percent = percent(&mut a, p);
        let code = match a.string(p, "code") {
            Some(c) => match parse_code(&c) {
                Some(code) if code != tonic::Code::Ok => code,
                _ => {
                    p.add(
                        a.at("code"),
                        format!("{c:?} is not a gRPC status code name such as \"UNAVAILABLE\""),
                    );
                    tonic::Code::Unavailable
                }
            },
            None => tonic::Code::Unavailable,
        };
        a.finish(p);
        Abort { percent, code }
    });
    let delay = t.table(p, "delay").map(|mut d| {
        let percent = percent(&mut d, p);
        let duration = d.duration(p, "duration", Duration::from_secs(3600));
        if duration.is_none() {
            p.add(d.at("duration"), "is required");
        }
        d.finish(p);
        Delay {
            percent,
            duration: duration.unwrap_or_default(),
        }
    });
    let pushback = t
        .integer(p, "pushback_ms", 0..=3_600_000)
        .map(|ms| Duration::from_millis(ms.unsigned_abs()));
    let allow_request = t.boolean(p, "allow_request").unwrap_or(false);
    t.finish(p);
    Some(Fault {
        abort,
        delay,
        pushback,
        allow_request,
    })
}

/// A status code from its name, in any case (`unavailable`, `UNAVAILABLE`).
pub fn parse_code(s: &str) -> Option<tonic::Code> {
    crate::grpc_code::parse(&s.to_ascii_uppercase())
}
