//! Several traffic workers, black box: Keel serves each of its listeners on a worker thread
//! of its own (`Keel::serve_workers`, one `127.0.0.1:0` listener per worker, so the test
//! knows which worker each connection reaches), and state shared between workers is seen
//! by every one: a policy swap (admin API and store), a breaker that opened, a drained retry
//! budget and a health change. Shutdown drains every worker.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use keel::pb::inference as pb;
use keel::pb::keel_admin as admin;
use keel::policy::{Source, Store};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

const WORKERS: usize = 2;

/// A Keel with [`WORKERS`] traffic workers and an admin listener, in this process.
struct Workers {
    /// One traffic address per worker: a connection to `addrs[i]` is served by worker `i`.
    addrs: Vec<SocketAddr>,
    admin: SocketAddr,
    store: Arc<Store>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), keel::ServeError>>>,
}

impl Workers {
    async fn start(toml: &str) -> Workers {
        keel::Policy::parse(toml).unwrap();
        let options = keel::Options {
            drain_grace: Some(Duration::ZERO),
            ..keel::Options::text(toml)
        };
        let listeners: Vec<_> = (0..WORKERS)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let keel = keel::Keel::new(options).unwrap();
        let store = keel.store().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(keel.serve_workers(listeners, Some(admin), async move {
            let _ = rx.await;
        }));
        Workers {
            addrs,
            admin: admin_addr,
            store,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// One client per worker, each on its own connection.
    async fn clients(&self) -> Vec<Client> {
        let mut out = Vec::new();
        for addr in &self.addrs {
            out.push(connect(*addr).await);
        }
        out
    }

    /// One health client per worker.
    async fn health(&self) -> Vec<HealthClient<tonic::transport::Channel>> {
        let mut out = Vec::new();
        for addr in &self.addrs {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            out.push(HealthClient::new(channel));
        }
        out
    }

    async fn admin_client(&self) -> AdminClient {
        let url = format!("http://{}", self.admin);
        for _ in 0..200 {
            if let Ok(c) = AdminClient::connect(url.clone()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("could not connect to {url}");
    }

    fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down and waits (bounded) for `serve_workers` to return.
    async fn stop(mut self) -> Result<(), keel::ServeError> {
        self.begin_shutdown();
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .expect("keel stopped within 20s")
            .expect("serve task did not panic")
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Dropping the serve future ends the worker threads too.
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

fn request(id: &str) -> Request<pb::ModelInferRequest> {
    let mut req = Request::new(simple_request());
    req.metadata_mut()
        .insert("x-request-id", id.parse().unwrap());
    req
}

async fn metadata_of(client: &mut Client, model: &str) -> Result<(), tonic::Status> {
    client
        .model_metadata(pb::ModelMetadataRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .map(drop)
}

fn two_models(version: &str, iris: bool) -> String {
    let iris = if iris {
        "[models.iris]\nbackend = \"embedded\"\n"
    } else {
        ""
    };
    format!("policy_version = \"{version}\"\n[models.simple]\nbackend = \"embedded\"\n{iris}")
}

#[tokio::test]
async fn a_policy_swap_is_seen_by_every_worker() {
    let keel = Workers::start(&two_models("one", true)).await;
    assert!(
        keel::worker::count() >= WORKERS,
        "every worker has an index"
    );
    let mut clients = keel.clients().await;
    for c in &mut clients {
        let resp = c.model_infer(simple_request()).await.unwrap();
        assert_eq!(revision(&resp), 1);
        metadata_of(c, "iris").await.unwrap();
    }

    // Through the admin API: iris is gone on every worker.
    let mut admin = keel.admin_client().await;
    let resp = admin
        .apply_policy(admin::ApplyPolicyRequest {
            toml: two_models("two", false),
            expected_revision: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.policy.unwrap().revision, 2);
    for (i, c) in clients.iter_mut().enumerate() {
        let resp = c.model_infer(simple_request()).await.unwrap();
        assert_eq!(revision(&resp), 2, "worker {i}");
        let s = metadata_of(c, "iris").await.unwrap_err();
        assert_eq!(s.code(), Code::NotFound, "worker {i}: {s:?}");
    }

    // Through the store, with a different `server.workers`: accepted (it applies at the
    // next start), and iris is back on every worker.
    let text = format!("{}[server]\nworkers = 7\n", two_models("three", true));
    keel.store
        .apply(&text, Source::Startup(None), Some(2))
        .unwrap();
    for (i, c) in clients.iter_mut().enumerate() {
        let resp = c.model_infer(simple_request()).await.unwrap();
        assert_eq!(revision(&resp), 3, "worker {i}");
        metadata_of(c, "iris").await.unwrap();
    }
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn a_breaker_opened_by_one_worker_refuses_calls_on_every_worker() {
    let up = ScriptedUpstream::new(Script::failing(Code::Unavailable, "down"));
    let (addr, _stop) = up.serve().await;
    let keel = Workers::start(&simple_via(
        addr,
        "[defaults.retry]\nmax_attempts = 1\n[defaults.breaker]\nconsecutive_failures = 3\nopen_for = \"60s\"\n[upstreams.up.outlier]\nenabled = false",
    ))
    .await;
    let mut clients = keel.clients().await;
    // Three failures, all on worker 0, open the breaker.
    for i in 0..3 {
        let s = clients[0]
            .model_infer(request(&format!("b{i}")))
            .await
            .unwrap_err();
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "UPSTREAM_UNAVAILABLE",
            "{s:?}"
        );
    }
    // Every worker refuses without calling the upstream.
    for (i, c) in clients.iter_mut().enumerate() {
        let id = format!("open{i}");
        let s = c.model_infer(request(&id)).await.unwrap_err();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "BREAKER_OPEN",
            "worker {i}: {s:?}"
        );
        assert!(
            up.seen_for(&id).is_empty(),
            "worker {i} called the upstream"
        );
    }
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn a_retry_budget_drained_through_one_worker_is_drained_for_every_worker() {
    let up = ScriptedUpstream::new(Script::failing(Code::Unavailable, "down"));
    let (addr, _stop) = up.serve().await;
    // No share of calls, one retry per second over a minute: 60 retries, then none.
    let keel = Workers::start(&simple_via(
        addr,
        "[defaults.retry]\nmax_attempts = 2\ninitial_backoff = \"1ms\"\nmax_backoff = \"1ms\"\n[defaults.retry.budget]\nratio = 0\nmin_per_sec = 1\nwindow = \"60s\"\n[defaults.breaker]\nenabled = false\n[upstreams.up.outlier]\nenabled = false",
    ))
    .await;
    let mut clients = keel.clients().await;
    let exhausted = |s: &tonic::Status| {
        s.get_details_error_info()
            .unwrap()
            .metadata
            .get("retry_budget_exhausted")
            .map(String::as_str)
            == Some("true")
    };
    // Worker 0 spends the budget: bounded, its 61st call at the latest is refused a retry.
    let mut drained = false;
    for i in 0..100 {
        let s = clients[0]
            .model_infer(request(&format!("d{i}")))
            .await
            .unwrap_err();
        if exhausted(&s) {
            drained = true;
            break;
        }
    }
    assert!(drained, "the budget ran out within 100 calls");
    // Worker 1's first call finds it spent: a budget of its own would still hold 60.
    for (i, c) in clients.iter_mut().enumerate() {
        let id = format!("after{i}");
        let s = c.model_infer(request(&id)).await.unwrap_err();
        assert!(exhausted(&s), "worker {i}: {s:?}");
        assert_eq!(up.seen_for(&id).len(), 1, "worker {i} retried");
    }
    keel.stop().await.unwrap();
}

/// Polls (bounded: 15 s) until `service` reports `want` on `health`.
async fn until(
    health: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
    want: ServingStatus,
) {
    for _ in 0..300 {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == want as i32 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{service:?} did not become {want:?} within 15s");
}

async fn server_ready(client: &mut Client) -> bool {
    client
        .server_ready(pb::ServerReadyRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready
}

#[tokio::test]
async fn a_health_change_is_seen_by_every_worker() {
    // An address nothing listens on (yet).
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let keel = Workers::start(&format!(
        "[defaults.retry]\nmax_attempts = 1\n\
         [upstreams.up]\nendpoints = [\"{dead}\"]\n\
         [upstreams.up.outlier]\nconsecutive_failures = 2\nbase_ejection = \"2s\"\n\
         [models.simple]\nbackend = \"up\"\nrequired = true\n"
    ))
    .await;
    let mut clients = keel.clients().await;
    let mut health = keel.health().await;
    for (h, c) in health.iter_mut().zip(&mut clients) {
        until(h, "readiness", ServingStatus::Serving).await;
        assert!(server_ready(c).await);
    }
    // Two refused calls on worker 0 eject the only endpoint: every worker is not ready.
    for _ in 0..2 {
        assert!(clients[0].model_infer(simple_request()).await.is_err());
    }
    for (i, (h, c)) in health.iter_mut().zip(&mut clients).enumerate() {
        until(h, "readiness", ServingStatus::NotServing).await;
        until(h, "keel.model.simple", ServingStatus::NotServing).await;
        assert!(!server_ready(c).await, "worker {i}");
    }
    // The upstream comes up; once the ejection ends, every worker is ready again.
    let upstream = Keel::start_on(keel::Options::default(), dead).await;
    for (i, (h, c)) in health.iter_mut().zip(&mut clients).enumerate() {
        until(h, "readiness", ServingStatus::Serving).await;
        assert!(server_ready(c).await, "worker {i}");
    }
    for c in &mut clients {
        c.model_infer(simple_request()).await.unwrap();
    }
    upstream.stop().await.unwrap();
    keel.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_the_calls_of_every_worker() {
    let up = ScriptedUpstream::new(Script::slow(Duration::from_millis(300)));
    let (addr, _stop) = up.serve().await;
    let mut keel = Workers::start(&simple_via(addr, "")).await;
    let clients = keel.clients().await;
    // A call in flight on each worker, held by the upstream.
    let mut calls = Vec::new();
    for c in clients {
        calls.push(up.call_in_flight(c).await);
    }
    let addrs = keel.addrs.clone();
    keel.begin_shutdown();
    for (i, call) in calls.into_iter().enumerate() {
        let resp = call.await.unwrap();
        assert!(resp.is_ok(), "worker {i}'s call finished: {resp:?}");
    }
    keel.stop().await.unwrap();
    // Every worker's listening socket is closed.
    for (i, addr) in addrs.into_iter().enumerate() {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "worker {i} still accepts"
        );
    }
}

#[tokio::test]
async fn the_drain_timeout_cuts_the_calls_of_every_worker() {
    let up = ScriptedUpstream::new(Script::slow(Duration::from_secs(600)));
    let (addr, _stop) = up.serve().await;
    let mut keel = Workers::start(&simple_via(addr, "[server]\ndrain_timeout = \"200ms\"")).await;
    let mut calls = Vec::new();
    for c in keel.clients().await {
        calls.push(up.call_in_flight(c).await);
    }
    keel.begin_shutdown();
    // `stop` bounds the wait at 20s; the drain timeout ends it far sooner.
    keel.stop().await.unwrap();
    for (i, call) in calls.into_iter().enumerate() {
        let cut = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .unwrap()
            .unwrap();
        let s = cut.expect_err("a call still running after the drain timeout is cut");
        assert_eq!(s.code(), Code::Unavailable, "worker {i}");
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "DRAIN_TIMEOUT",
            "worker {i}"
        );
    }
}

/// The threads of process `pid` named `keel-worker-*`.
#[cfg(target_os = "linux")]
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .filter(|name| name.starts_with("keel-worker-"))
                .count()
        })
        .unwrap_or(0)
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn keel_serve_runs_server_workers_threads_on_one_port_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("policy.toml");
    std::fs::write(&config, "[server]\nworkers = 3\ndrain_grace = \"10ms\"\n").unwrap();
    let process = KeelProcess::spawn(&["--config", config.to_str().unwrap()], &[]).await;
    // The startup line is printed as the workers start: poll, bounded.
    let mut threads = 0;
    for _ in 0..200 {
        threads = worker_threads(process.pid());
        if threads == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(threads, 3, "one thread per worker");
    // Connections to the one port are served, whichever worker the kernel gives each.
    for _ in 0..6 {
        let mut client = connect(process.addr).await;
        client.model_infer(simple_request()).await.unwrap();
    }
    assert_eq!(process.stop().await, Some(0));
}
