//! Shared helpers for the black-box tests: start Keel on `127.0.0.1:0` through the library
//! entry point (with or without an admin listener), clients, request builders, and a
//! scriptable upstream that records what it receives.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use keel::pb::inference as pb;
use keel::pb::keel_admin::policy_admin_client::PolicyAdminClient;
use keel::policy::Policy;
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

pub type Client = GrpcInferenceServiceClient<Channel>;
pub type AdminClient = PolicyAdminClient<Channel>;

/// A Keel serving in this process; stopped (and awaited) by `stop`, or aborted on drop.
pub struct Keel {
    pub addr: SocketAddr,
    /// The admin listener's address, when started with one.
    pub admin: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), keel::ServeError>>>,
}

impl Keel {
    pub async fn start(options: keel::Options) -> Keel {
        Keel::start_on(options, "127.0.0.1:0".parse().unwrap()).await
    }

    /// A Keel on `addr` (an address a stopped Keel used, to restart it in place). Without a
    /// `drain_grace` of its own, it stops without one, so tests do not wait 5 s each.
    pub async fn start_on(mut options: keel::Options, addr: SocketAddr) -> Keel {
        options.drain_grace.get_or_insert(Duration::ZERO);
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(keel::serve(options, listener, async move {
            let _ = rx.await;
        }));
        Keel {
            addr,
            admin: None,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// A Keel with an admin listener on `127.0.0.1:0` too. Startup errors (say, a missing
    /// admin token) come back from `stop`.
    pub async fn start_with_admin(mut options: keel::Options) -> Keel {
        options.drain_grace.get_or_insert(Duration::ZERO);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            keel::Keel::new(options)?
                .serve(listener, Some(admin), async move {
                    let _ = rx.await;
                })
                .await
        });
        Keel {
            addr,
            admin: Some(admin_addr),
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// A Keel serving the policy `toml` (panics if invalid), with an admin listener.
    pub async fn with_admin(toml: &str) -> Keel {
        Policy::parse(toml).unwrap();
        Keel::start_with_admin(keel::Options::text(toml)).await
    }

    /// A client of the admin listener.
    pub async fn admin_client(&self) -> AdminClient {
        let url = format!(
            "http://{}",
            self.admin.expect("started with an admin listener")
        );
        for _ in 0..200 {
            if let Ok(c) = PolicyAdminClient::connect(url.clone()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("could not connect to {url}");
    }

    /// A plain channel to the admin listener.
    pub async fn admin_channel(&self) -> Channel {
        let url = format!(
            "http://{}",
            self.admin.expect("started with an admin listener")
        );
        tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn embedded() -> Keel {
        Keel::start(keel::Options::default()).await
    }

    /// A Keel whose policy is `toml` (panics if invalid).
    pub async fn with_config(toml: &str) -> Keel {
        Policy::parse(toml).unwrap();
        Keel::start(keel::Options::text(toml)).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        connect(self.addr).await
    }

    /// A plain channel, for the health and reflection clients.
    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Begins shutdown without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down and waits (bounded) for `serve` to return.
    pub async fn stop(mut self) -> Result<(), keel::ServeError> {
        self.begin_shutdown();
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .expect("keel stopped within 20s")
            .expect("serve task did not panic")
    }
}

impl Drop for Keel {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// A `keel serve` process on ephemeral loopback ports, for what only a process can show
/// (its environment, signals). Killed on drop if `stop` was not called.
pub struct KeelProcess {
    child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl KeelProcess {
    /// Starts `keel serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 <args>` with `env`
    /// added to its environment, and reads both addresses from its startup line (bounded:
    /// 30s).
    pub async fn spawn(args: &[&str], env: &[(&str, &str)]) -> KeelProcess {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            line
        });
        let line = match tokio::time::timeout(Duration::from_secs(30), line).await {
            Ok(line) => line.unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!("keel printed no startup line within 30s");
            }
        };
        let after = |marker: &str| -> SocketAddr {
            line.split(marker)
                .nth(1)
                .and_then(|rest| rest.split([' ', ',']).next())
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no address after {marker:?} in {line:?}"))
        };
        let (addr, admin) = (after("listening on "), after("admin on "));
        KeelProcess { child, addr, admin }
    }

    /// The process id, to send it signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit (bounded: 15s, then killed); the exit code.
    pub async fn stop(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        panic!("keel did not exit within 15s of SIGTERM");
    }
}

impl Drop for KeelProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Connects, retrying briefly while the server task starts (bounded, no fixed sleep).
pub async fn connect(addr: SocketAddr) -> Client {
    let url = format!("http://{addr}");
    for _ in 0..200 {
        if let Ok(c) = GrpcInferenceServiceClient::connect(url.clone()).await {
            return c.max_decoding_message_size(256 << 20);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("could not connect to {url}");
}

/// A numeric answer metadata value (`keel-attempts`).
pub fn number<T>(resp: &Response<T>, key: &str) -> u64 {
    resp.metadata()
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {:?}", resp.metadata()))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The policy revision an answer reports in `keel-policy-revision`.
pub fn revision<T>(resp: &Response<T>) -> u64 {
    resp.metadata()
        .get("keel-policy-revision")
        .expect("every answer reports its policy revision")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

pub fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        parameters: Default::default(),
        contents: None,
    }
}

pub fn i32_bytes(v: &[i32]) -> Bytes {
    v.iter()
        .flat_map(|x| x.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

pub fn f32_bytes(v: &[f32]) -> Bytes {
    v.iter()
        .flat_map(|x| x.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

pub fn i32s(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn i64s(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Raw BYTES encoding: each element prefixed by its u32 little-endian length.
pub fn bytes_elements<S: AsRef<[u8]>>(items: &[S]) -> Bytes {
    let mut out = Vec::new();
    for i in items {
        let i = i.as_ref();
        out.extend_from_slice(&(i.len() as u32).to_le_bytes());
        out.extend_from_slice(i);
    }
    out.into()
}

pub fn split_bytes_elements(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let n = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
        out.push(b[4..4 + n].to_vec());
        b = &b[4 + n..];
    }
    out
}

/// `simple` with INPUT0 = 0..16 and INPUT1 = 1s, raw, batch 1.
pub fn simple_request() -> pb::ModelInferRequest {
    let a: Vec<i32> = (0..16).collect();
    pb::ModelInferRequest {
        model_name: "simple".into(),
        id: "req-1".into(),
        inputs: vec![
            input("INPUT0", "INT32", &[1, 16]),
            input("INPUT1", "INT32", &[1, 16]),
        ],
        outputs: vec![
            InferRequestedOutputTensor {
                name: "OUTPUT0".into(),
                parameters: Default::default(),
            },
            InferRequestedOutputTensor {
                name: "OUTPUT1".into(),
                parameters: Default::default(),
            },
        ],
        raw_input_contents: vec![i32_bytes(&a), i32_bytes(&[1; 16])],
        ..Default::default()
    }
}

/// What the scripted upstream saw of one call.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: &'static str,
    pub metadata: tonic::metadata::MetadataMap,
    pub model: String,
    /// The model version asked for (ModelInfer only; empty elsewhere).
    pub version: String,
}

/// How the scripted upstream behaves.
#[derive(Clone, Default)]
pub struct Script {
    /// Delay before answering ModelInfer.
    pub delay: Duration,
    /// Answer ModelInfer with this status instead.
    pub fail: Option<(tonic::Code, String)>,
    /// Pad each answer with a string parameter this long (an answer larger than its
    /// request).
    pub padding: usize,
    /// Answer INT32 tensors in typed `int_contents` (as some model servers do) instead of
    /// `raw_output_contents`.
    pub typed: bool,
}

impl Script {
    /// Every ModelInfer fails with `code`.
    pub fn failing(code: tonic::Code, message: &str) -> Script {
        Script {
            delay: Duration::ZERO,
            fail: Some((code, message.to_string())),
            ..Script::default()
        }
    }

    /// Every ModelInfer answers after `delay`.
    pub fn slow(delay: Duration) -> Script {
        Script {
            delay,
            ..Script::default()
        }
    }
}

/// One scripted answer to one attempt of a request id.
#[derive(Clone, Debug)]
pub enum Step {
    /// Fail with this code, and `grpc-retry-pushback-ms` when given.
    Fail(tonic::Code, Option<&'static str>),
    /// Wait this long, then answer normally.
    Delay(Duration),
}

/// An OIP upstream double: records every call, echoes ModelInfer inputs as outputs, and can
/// be slowed or made to fail.
#[derive(Clone)]
pub struct ScriptedUpstream {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub script: Arc<Mutex<Script>>,
    /// Per request id, the answers of its next attempts (then the script applies).
    pub plans: Arc<Mutex<std::collections::HashMap<String, std::collections::VecDeque<Step>>>>,
    /// Notified when a ModelInfer call arrives.
    pub arrived: Arc<Notify>,
}

impl ScriptedUpstream {
    pub fn new(script: Script) -> Self {
        ScriptedUpstream {
            seen: Arc::default(),
            script: Arc::new(Mutex::new(script)),
            plans: Arc::default(),
            arrived: Arc::new(Notify::new()),
        }
    }

    /// Serves on 127.0.0.1:0; the server task ends when the returned sender is dropped.
    pub async fn serve(&self) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let svc = GrpcInferenceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async move {
                        let _ = rx.await;
                    },
                ),
        );
        (addr, tx)
    }

    /// Scripts the next attempts of `request_id`.
    pub fn plan(&self, request_id: &str, steps: Vec<Step>) {
        self.plans
            .lock()
            .unwrap()
            .insert(request_id.to_string(), steps.into());
    }

    /// The ModelInfer calls seen for `request_id`.
    pub fn seen_for(&self, request_id: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| {
                s.metadata
                    .get("x-request-id")
                    .is_some_and(|v| v == request_id)
            })
            .collect()
    }

    /// The ModelInfer calls seen (Keel also asks for metadata, to validate requests).
    pub fn seen(&self) -> Vec<Seen> {
        self.seen_all()
            .into_iter()
            .filter(|s| s.method == "ModelInfer")
            .collect()
    }

    /// Every call seen, whatever the method.
    pub fn seen_all(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Sends `simple` through `client` in a task and returns once this upstream holds it.
    pub async fn call_in_flight(
        &self,
        client: Client,
    ) -> JoinHandle<Result<Response<pb::ModelInferResponse>, Status>> {
        self.hold(client, Request::new(simple_request())).await
    }

    /// Sends `request` through `client` in a task and returns once this upstream holds it.
    pub async fn hold(
        &self,
        mut client: Client,
        request: Request<pb::ModelInferRequest>,
    ) -> JoinHandle<Result<Response<pb::ModelInferResponse>, Status>> {
        let arrived = self.arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        let call = tokio::spawn(async move { client.model_infer(request).await });
        tokio::time::timeout(Duration::from_secs(10), arrived)
            .await
            .expect("the call reached the upstream within 10s");
        call
    }
}

/// A config routing `simple` to one upstream named `up` at `addr`, after `extra` TOML.
pub fn simple_via(addr: SocketAddr, extra: &str) -> String {
    format!(
        "{extra}\n[upstreams.up]\nendpoints = [\"{addr}\"]\n[models.simple]\nbackend = \"up\"\n"
    )
}

#[tonic::async_trait]
impl GrpcInferenceService for ScriptedUpstream {
    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let script = self.script.lock().unwrap().clone();
        let (metadata, _, req) = request.into_parts();
        let id = metadata
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        self.seen.lock().unwrap().push(Seen {
            method: "ModelInfer",
            metadata,
            model: req.model_name.clone(),
            version: req.model_version.clone(),
        });
        self.arrived.notify_waiters();
        let step = self
            .plans
            .lock()
            .unwrap()
            .get_mut(&id)
            .and_then(|p| p.pop_front());
        match step {
            Some(Step::Fail(code, pushback)) => {
                let mut status = Status::new(code, format!("scripted {code:?}"));
                if let Some(ms) = pushback {
                    status
                        .metadata_mut()
                        .insert("grpc-retry-pushback-ms", ms.parse().unwrap());
                }
                return Err(status);
            }
            Some(Step::Delay(d)) => tokio::time::sleep(d).await,
            None => {
                tokio::time::sleep(script.delay).await;
                if let Some((code, msg)) = script.fail {
                    return Err(Status::new(code, msg));
                }
            }
        }
        let typed = script.typed && req.inputs.iter().all(|i| i.datatype == "INT32");
        // A client's typed request reaches the upstream as the client sent it, as any
        // model server takes it: echo its elements in raw form.
        let raw_inputs: Vec<Bytes> = if req.raw_input_contents.is_empty() {
            keel::pb::infer_request_from_pb(req.clone())
                .map(|r| r.inputs.iter().map(|t| t.data().clone()).collect())
                .unwrap_or_default()
        } else {
            req.raw_input_contents.clone()
        };
        let outputs = req
            .inputs
            .iter()
            .zip(&raw_inputs)
            .map(|(i, raw)| pb::model_infer_response::InferOutputTensor {
                name: i.name.clone(),
                datatype: i.datatype.clone(),
                shape: i.shape.clone(),
                parameters: Default::default(),
                contents: typed.then(|| pb::InferTensorContents {
                    int_contents: i32s(raw),
                    ..Default::default()
                }),
            })
            .collect();
        let raw_output_contents = if typed { Vec::new() } else { raw_inputs };
        Ok(Response::new(pb::ModelInferResponse {
            model_name: req.model_name,
            // The version asked for, else the upstream's own.
            model_version: if req.model_version.is_empty() {
                "7".into()
            } else {
                req.model_version
            },
            id: req.id,
            parameters: if script.padding > 0 {
                [(
                    "padding".to_string(),
                    pb::InferParameter {
                        parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(
                            "x".repeat(script.padding),
                        )),
                    },
                )]
                .into()
            } else {
                Default::default()
            },
            outputs,
            raw_output_contents,
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        self.seen.lock().unwrap().push(Seen {
            method: "ModelMetadata",
            metadata,
            model: req.name.clone(),
            version: String::new(),
        });
        Ok(Response::new(pb::ModelMetadataResponse {
            name: req.name,
            versions: vec!["7".into()],
            platform: "scripted".into(),
            inputs: vec![],
            outputs: vec![],
        }))
    }
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The field paths of an INVALID_ARGUMENT's `BadRequest` details, checking the code first.
pub fn violation_fields(s: &Status) -> Vec<String> {
    use tonic_types::StatusExt as _;
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    s.get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// Log lines written in this test binary, as JSON objects, from [`capture_logs`].
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The lines naming `request_id`.
    pub fn lines_of(&self, request_id: &str) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["request_id"] == request_id)
            .collect()
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Sends this test binary's log lines, as JSON, to the returned [`Captured`]. The global
/// subscriber: call it from one test per binary.
pub fn capture_logs() -> Captured {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .expect("the only subscriber of this test binary");
    logs
}
