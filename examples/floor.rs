//! The forwarding floor: the least a gRPC proxy on Keel's own crates (hyper's HTTP/2 server,
//! h2's client, tokio) does per unary call, measured beside Keel by `benches/e2e.sh` (with
//! `FLOOR=1`) so that what Keel's design costs above its crates is a figure of every run.
//!
//! It reads the request's body, sends it upstream as received on one h2 connection (END_STREAM
//! on its DATA frame, as Keel's forwarder does), and answers with the upstream's headers,
//! bytes and trailers. No routing, no policy, no resilience, no metrics: one current_thread
//! runtime, one upstream connection. Not a product, and never used by Keel.
//!
//! ```text
//! cargo run --release --example floor -- LISTEN_ADDR UPSTREAM_ADDR
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

type Answer = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        return Err(
            "usage: floor LISTEN_ADDR UPSTREAM_ADDR (for example 127.0.0.1:0 127.0.0.1:8001)"
                .into(),
        );
    };
    let listen: SocketAddr = listen.parse()?;
    let upstream: SocketAddr = upstream.parse()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(listen, upstream))
}

async fn serve(listen: SocketAddr, upstream: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let tcp = tokio::net::TcpStream::connect(upstream).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("floor: the upstream connection ended: {e}");
            std::process::exit(1);
        }
    });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("floor: {} -> {upstream}", listener.local_addr()?);
    loop {
        let (client, _) = listener.accept().await?;
        client.set_nodelay(true)?;
        let send = send.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| forward(send.clone(), upstream, req));
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(client), svc)
                .await;
        });
    }
}

/// One call: the request as received upstream, the answer as received back. A failure is a
/// trailers-only UNAVAILABLE.
async fn forward(
    send: h2::client::SendRequest<Bytes>,
    upstream: SocketAddr,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Answer>, Infallible> {
    Ok(match relay(send, upstream, req).await {
        Ok(answer) => answer,
        Err(e) => {
            let mut out = hyper::Response::new(Full::new(Bytes::new()).boxed());
            let headers = out.headers_mut();
            headers.insert(
                "content-type",
                http::HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", http::HeaderValue::from_static("14"));
            if let Ok(v) = http::HeaderValue::from_str(&e.to_string()) {
                headers.insert("grpc-message", v);
            }
            out
        }
    })
}

async fn relay(
    send: h2::client::SendRequest<Bytes>,
    upstream: SocketAddr,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Answer>, Box<dyn std::error::Error + Send + Sync>> {
    let (parts, body) = req.into_parts();
    let message = body.collect().await?.to_bytes();
    let mut out = http::Request::post(format!("http://{upstream}{}", parts.uri.path()));
    for (name, value) in &parts.headers {
        out = out.header(name, value);
    }
    let mut send = send.ready().await?;
    let (answer, mut stream) = send.send_request(out.body(())?, false)?;
    stream.send_data(message, true)?;
    let (head, mut body) = answer.await?.into_parts();
    let mut message = BytesMut::new();
    while let Some(data) = body.data().await {
        let data = data?;
        let _ = body.flow_control().release_capacity(data.len());
        message.extend_from_slice(&data);
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    let answer = Full::new(message.freeze())
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed();
    let mut reply = hyper::Response::new(answer);
    *reply.headers_mut() = head.headers;
    reply.headers_mut().remove(http::header::CONTENT_LENGTH);
    Ok(reply)
}
