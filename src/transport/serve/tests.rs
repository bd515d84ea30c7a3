//! The connection loop over real loopback connections and a raw HTTP/2 client. Real time,
//! so they assert outcomes only, each wait bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

use super::*;
use crate::observe::Metrics;
use crate::transport::{Accept, incoming};

const BOUND: Duration = Duration::from_secs(10);

/// `/peer` answers the caller's address from its [`Peer`], `/fail` fails with a status,
/// `/hold` answers once `release` is notified.
fn service(
    release: Arc<Notify>,
) -> impl Service<
    http::Request<Incoming>,
    Response = http::Response<String>,
    Error = tonic::Status,
    Future: Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: http::Request<Incoming>| {
        let release = release.clone();
        async move {
            match req.uri().path() {
                "/fail" => Err(tonic::Status::resource_exhausted("too much")),
                "/hold" => {
                    release.notified().await;
                    Ok(http::Response::new("released".to_string()))
                }
                _ => {
                    let peer = req.extensions().get::<Peer>().and_then(|p| p.remote);
                    Ok(http::Response::new(format!("{peer:?}")))
                }
            }
        }
    })
}

struct Served {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

async fn start(http2: Http2, release: Arc<Notify>) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = Accept {
        name: "traffic",
        max_connections: 16,
        reports_use: true,
        tls: None,
        tls_handshake_timeout: Duration::from_secs(1),
        handshake_timeout: Duration::from_secs(1),
        metrics: Metrics::new(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        incoming(listener, accept),
        service(release),
        http2,
        crate::transport::Buffers::new(1 << 20),
        async move {
            let _ = stopped.await;
        },
    ));
    Served {
        addr,
        stop: Some(stop),
        task,
    }
}

fn http2() -> Http2 {
    Http2::from_settings(&ServerSettings::default())
}

/// An HTTP/2 connection to `addr`, and the task driving it (it ends with the connection).
async fn connect(addr: SocketAddr) -> (h2::client::SendRequest<Bytes>, JoinHandle<()>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send.ready().await.unwrap(), driver)
}

fn get(path: &str) -> http::Request<()> {
    http::Request::post(format!("http://keel{path}"))
        .body(())
        .unwrap()
}

/// The body of an answer, as text.
async fn text(res: http::Response<h2::RecvStream>) -> String {
    let mut body = res.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn every_request_carries_its_peer_and_an_error_is_answered_as_its_status() {
    let served = start(http2(), Arc::default()).await;
    let tcp = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    let me = tcp.local_addr().unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();

    let (res, _) = send.send_request(get("/peer"), true).unwrap();
    let res = tokio::time::timeout(BOUND, res).await.unwrap().unwrap();
    assert_eq!(text(res).await, format!("{:?}", Some(me)));

    let (res, _) = send.send_request(get("/fail"), true).unwrap();
    let res = tokio::time::timeout(BOUND, res).await.unwrap().unwrap();
    let s = tonic::Status::from_header_map(res.headers()).expect("a trailers-only status");
    assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    assert_eq!(s.message(), "too much");
    served.task.abort();
}

#[tokio::test]
async fn shutdown_sends_goaway_and_waits_for_calls_in_flight() {
    let release = Arc::new(Notify::new());
    let mut served = start(http2(), release.clone()).await;
    let (mut send, _driver) = connect(served.addr).await;
    let (held, _) = send.send_request(get("/hold"), true).unwrap();
    // The call is in: the connection answers another one.
    let (res, _) = send.send_request(get("/peer"), true).unwrap();
    tokio::time::timeout(BOUND, res).await.unwrap().unwrap();

    let _ = served.stop.take().unwrap().send(());
    // GOAWAY: the client may open no more streams (polled, bounded).
    let refused = tokio::time::timeout(BOUND, async {
        loop {
            match send.clone().ready().await {
                Err(e) => break e,
                Ok(mut s) => match s.send_request(get("/peer"), true) {
                    Err(e) => break e,
                    Ok((res, _)) => match res.await {
                        Err(e) => break e,
                        Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                },
            }
        }
    })
    .await
    .expect("GOAWAY within the bound");
    assert!(refused.is_go_away() || refused.is_remote(), "{refused:?}");
    assert!(
        !served.task.is_finished(),
        "serve waits for the call in flight"
    );

    release.notify_one();
    let res = tokio::time::timeout(BOUND, held).await.unwrap().unwrap();
    assert_eq!(text(res).await, "released");
    tokio::time::timeout(BOUND, served.task)
        .await
        .expect("serve returned once the connection closed")
        .unwrap();
}

#[tokio::test]
async fn an_aged_connection_is_sent_goaway_and_closed_after_its_grace() {
    let http2 = Http2 {
        max_connection_age: Some(Duration::from_millis(100)),
        max_connection_age_grace: Duration::from_millis(100),
        ..http2()
    };
    let served = start(http2, Arc::default()).await;
    let (mut send, driver) = connect(served.addr).await;
    // Never released: only the grace ends it.
    let (held, _) = send.send_request(get("/hold"), true).unwrap();
    let outcome = tokio::time::timeout(BOUND, held)
        .await
        .expect("the connection was closed within the bound");
    assert!(outcome.is_err(), "{outcome:?}");
    tokio::time::timeout(BOUND, driver)
        .await
        .expect("the connection closed")
        .unwrap();
    // The listener still takes new connections.
    let (mut send, _driver) = connect(served.addr).await;
    let (res, _) = send.send_request(get("/peer"), true).unwrap();
    assert!(tokio::time::timeout(BOUND, res).await.unwrap().is_ok());
    served.task.abort();
}
