//! `keel load`: an OIP load generator, for Keel or any OIP server.
//!
//! Drives ModelInfer (or the legacy v1 Predict) at a fixed concurrency (closed loop) or a
//! fixed rate (open loop). In open loop each request has an intended send time and its
//! latency is measured from it, so a server that stalls is charged for the requests that
//! queued behind the stall (no coordinated omission). It always stops by itself (a duration
//! or a request count), and refuses targets that are not loopback unless told otherwise.

mod payload;
mod report;

pub use payload::Payload;
pub use report::{Latency, Report};

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use report::Tally;

/// Which API the requests use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// OIP v2 ModelInfer.
    V2,
    /// Keel's legacy v1 Predict.
    V1,
}

/// When a run stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stop {
    /// After this long.
    Duration(#[serde(with = "report::seconds")] Duration),
    /// After this many requests.
    Requests(u64),
}

/// What to run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    /// `host:port` of the server.
    pub target: String,
    /// The model.
    pub model: String,
    /// Requests in flight at once (closed loop), or at most (open loop).
    pub concurrency: usize,
    /// HTTP/2 connections, used in turn.
    pub connections: usize,
    /// When to stop.
    pub stop: Stop,
    /// Requests per second (open loop); `None`: as fast as `concurrency` allows.
    pub rate: Option<f64>,
    /// What each request carries.
    pub payload: Payload,
    /// The deadline each request sends (`grpc-timeout`).
    #[serde(with = "report::seconds_opt")]
    pub deadline: Option<Duration>,
    /// Which API.
    pub api: Api,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The target is not a loopback address and `--allow-remote` was not given.
    #[error(
        "{0} is not a loopback address; `keel load` only drives 127.0.0.1, [::1] or localhost unless --allow-remote is given"
    )]
    Remote(String),
    /// The target cannot be parsed.
    #[error("{0:?} is not host:port: {1}")]
    BadTarget(String, String),
    /// The plan asks for nothing sensible.
    #[error("{0}")]
    BadPlan(String),
    /// No connection could be opened.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
}

/// Checks that `target` (`host:port`) is loopback, unless `allow_remote`.
pub fn check_target(target: &str, allow_remote: bool) -> Result<(), LoadError> {
    let uri: http::Uri = format!("http://{target}")
        .parse()
        .map_err(|e: http::uri::InvalidUri| LoadError::BadTarget(target.into(), e.to_string()))?;
    let host = uri
        .host()
        .ok_or_else(|| LoadError::BadTarget(target.into(), "no host".into()))?;
    if uri.port_u16().is_none() {
        return Err(LoadError::BadTarget(target.into(), "no port".into()));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare == "localhost" || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback || allow_remote {
        Ok(())
    } else {
        Err(LoadError::Remote(target.into()))
    }
}

/// A progress reading, about once a second.
#[derive(Clone, Copy, Debug)]
pub struct Tick {
    /// Since the start.
    pub elapsed: Duration,
    /// Requests answered so far.
    pub done: u64,
    /// Of which failed.
    pub errors: u64,
}

/// Runs `plan`, calling `progress` about once a second; returns the summary.
pub async fn run(plan: Plan, mut progress: impl FnMut(Tick)) -> Result<Report, LoadError> {
    if plan.concurrency == 0 || plan.connections == 0 {
        return Err(LoadError::BadPlan(
            "--concurrency and --connections must be at least 1".into(),
        ));
    }
    if plan.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(LoadError::BadPlan("--rate must be above 0".into()));
    }
    let request = payload::Request::build(&plan)?;
    let mut channels = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        let endpoint = Endpoint::from_shared(format!("http://{}", plan.target))
            .map_err(|e| LoadError::BadTarget(plan.target.clone(), e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| LoadError::Connect(plan.target.clone(), e.to_string()))?;
        channels.push(channel);
    }
    let tally = Arc::new(Mutex::new(Tally::new()));
    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = match plan.stop {
        Stop::Duration(d) => Some(start + d),
        Stop::Requests(_) => None,
    };
    let limit = match plan.stop {
        Stop::Requests(n) => n,
        Stop::Duration(_) => u64::MAX,
    };
    // Takes the next request number, or None when the run is over.
    let next = {
        let issued = issued.clone();
        move |now: Instant| -> Option<u64> {
            if end.is_some_and(|e| now >= e) {
                return None;
            }
            let n = issued.fetch_add(1, Ordering::Relaxed);
            (n < limit).then_some(n)
        }
    };
    let shared = Arc::new(Shared {
        request,
        channels,
        tally: tally.clone(),
        done: done.clone(),
        errors: errors.clone(),
        deadline: plan.deadline,
    });
    let driver = {
        let shared = shared.clone();
        let concurrency = plan.concurrency;
        let rate = plan.rate;
        let next = next.clone();
        tokio::spawn(async move {
            match rate {
                None => closed_loop(shared, concurrency, next).await,
                Some(r) => open_loop(shared, concurrency, r, start, next).await,
            }
        })
    };
    tokio::pin!(driver);
    let mut ticker =
        tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut driver => break,
            _ = ticker.tick() => progress(Tick {
                elapsed: start.elapsed(),
                done: done.load(Ordering::Relaxed),
                errors: errors.load(Ordering::Relaxed),
            }),
        }
    }
    let elapsed = start.elapsed();
    let tally = tally.lock().unwrap_or_else(|p| p.into_inner());
    Ok(tally.report(plan, elapsed))
}

/// What every request task shares.
struct Shared {
    request: payload::Request,
    channels: Vec<Channel>,
    tally: Arc<Mutex<Tally>>,
    done: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    deadline: Option<Duration>,
}

impl Shared {
    /// Sends request `n`, timing it from `intended`.
    async fn one(&self, n: u64, intended: Instant) {
        let channel = self.channels[(n as usize) % self.channels.len()].clone();
        let outcome = self.request.send(channel, n, self.deadline).await;
        let took = intended.elapsed();
        self.done.fetch_add(1, Ordering::Relaxed);
        if outcome.code.is_some() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.tally
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(took, &outcome);
    }
}

/// `concurrency` workers, each sending its next request when its last is answered.
async fn closed_loop(
    shared: Arc<Shared>,
    concurrency: usize,
    next: impl Fn(Instant) -> Option<u64> + Clone + Send + 'static,
) {
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let shared = shared.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let now = Instant::now();
                let Some(n) = next(now) else { break };
                shared.one(n, now).await;
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

/// Requests at `rate` per second, each timed from its intended send time; at most
/// `concurrency` in flight (a request waiting for a slot is late, and its latency says so).
async fn open_loop(
    shared: Arc<Shared>,
    concurrency: usize,
    rate: f64,
    start: Instant,
    next: impl Fn(Instant) -> Option<u64> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = tokio::task::JoinSet::new();
    let mut i: u32 = 0;
    loop {
        let intended = start + interval * i;
        i = i.saturating_add(1);
        tokio::time::sleep_until(intended).await;
        let Some(n) = next(intended) else { break };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let shared = shared.clone();
        tasks.spawn(async move {
            shared.one(n, intended).await;
            drop(permit);
        });
        // Reap finished tasks as we go, so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_unless_allowed() {
        for ok in [
            "127.0.0.1:8001",
            "localhost:8001",
            "[::1]:8001",
            "127.1.2.3:1",
        ] {
            assert!(check_target(ok, false).is_ok(), "{ok}");
        }
        for remote in [
            "10.0.0.7:8001",
            "triton.example.com:8001",
            "[2001:db8::1]:80",
        ] {
            assert!(
                matches!(check_target(remote, false), Err(LoadError::Remote(_))),
                "{remote}"
            );
            assert!(check_target(remote, true).is_ok(), "{remote}");
        }
        assert!(matches!(
            check_target("127.0.0.1", false),
            Err(LoadError::BadTarget(..))
        ));
    }
}
