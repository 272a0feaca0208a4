//! The `--metrics` HTTP endpoint: `GET /metrics` (OpenMetrics text), `GET /healthz`, 404
//! for anything else. Runs as tasks on the tracer's own tokio runtime.
//!
//! Why plain hyper 1 (+ hyper-util's tokio glue, http-body-util's `Full`) rather than axum:
//! two fixed routes need no router, extractors or tower middleware, and hyper is what axum
//! would run on anyway; this keeps the dependency tree and the binary small. HTTP/1.1
//! only: that is what Prometheus scrapes with.
//!
//! Wiring (the CLI's `--metrics ADDR`, default 127.0.0.1:9464):
//! ```ignore
//! let metrics = Arc::new(tcptrace::sink::metrics::Metrics::new());
//! let server = tcptrace::metrics_http::bind(addr, Arc::clone(&metrics))?; // before Tracer::start
//! let addr = server.local_addr(); // the real port when ADDR asked for port 0
//! tokio::spawn(server.run());
//! ```
//! `bind` fails with one sentence, "cannot listen on ADDR for --metrics: …"; after that the
//! server never fails the tracer: a failed accept or a broken client is logged and dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::sink::metrics::Metrics;

/// The content type of the OpenMetrics text exposition that `/metrics` serves.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Clients served at once; more wait in the listen backlog. A scraper needs one.
const MAX_CONNECTIONS: usize = 16;
/// A client must send a request's headers within this, and an idle keep-alive connection
/// is closed after it (hyper restarts the timer whenever it waits for a request), so no
/// client holds a connection slot for long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MetricsServerError {
    #[error("cannot listen on {addr} for --metrics: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// A bound, not yet serving, metrics endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
}

/// Binds `addr` now (no runtime needed), so a taken port or a bad address is reported
/// before tracing starts.
pub fn bind(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<MetricsServer, MetricsServerError> {
    let listen_err = |error| MetricsServerError::Listen { addr, error };
    let listener = std::net::TcpListener::bind(addr).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    let addr = listener.local_addr().map_err(listen_err)?;
    Ok(MetricsServer {
        listener,
        addr,
        metrics,
    })
}

/// Binds and serves until the runtime shuts down. Only the bind can fail.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(), MetricsServerError> {
    bind(addr, metrics)?.run().await;
    Ok(())
}

impl MetricsServer {
    /// The address actually bound (the port the OS picked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves forever; spawn it on the tokio runtime (`tokio::spawn(server.run())`).
    pub async fn run(self) {
        let listener = match tokio::net::TcpListener::from_std(self.listener) {
            Ok(l) => l,
            Err(e) => {
                log::error!("metrics endpoint on {} failed to start: {e}", self.addr);
                return;
            }
        };
        log::info!("serving metrics on http://{}/metrics", self.addr);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return; // never closed
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: tracing matters more than
                    // the endpoint; back off and keep the tracer running.
                    log::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = Arc::clone(&self.metrics);
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let metrics = Arc::clone(&metrics);
                    async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    log::debug!("metrics endpoint: connection ended: {e}");
                }
                drop(slot);
            });
        }
    }
}

fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let known = matches!(req.uri().path(), "/metrics" | "/healthz");
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => with_type(
            StatusCode::OK,
            OPENMETRICS_CONTENT_TYPE,
            Bytes::from(metrics.encode()),
        ),
        (&Method::GET, "/healthz") => with_type(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"ok\n"),
        ),
        _ if known => {
            let mut r = with_type(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                Bytes::from_static(b"only GET\n"),
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET"));
            r
        }
        _ => with_type(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"not found: try /metrics\n"),
        ),
    }
}

fn with_type(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// One request over a plain socket; returns the raw response.
    fn request(addr: SocketAddr, head: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(head.as_bytes()).expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        request(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
    }

    #[test]
    fn routes_answer_and_a_taken_port_is_one_sentence() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let metrics = Arc::new(Metrics::new());
            let server = bind("127.0.0.1:0".parse().unwrap(), metrics).expect("bind");
            let addr = server.local_addr();
            assert_ne!(addr.port(), 0, "the real port is reported");
            let again = bind(addr, Arc::new(Metrics::new())).expect_err("port taken");
            let msg = again.to_string();
            assert!(msg.starts_with(&format!("cannot listen on {addr} for --metrics: ")), "{msg}");
            tokio::spawn(server.run());
            let replies = tokio::task::spawn_blocking(move || {
                let post = "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                [get(addr, "/metrics"), get(addr, "/healthz"), get(addr, "/"), request(addr, post)]
            })
            .await
            .expect("client");
            let [metrics, health, missing, post] = replies;
            assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
            let ct = format!("\r\ncontent-type: {OPENMETRICS_CONTENT_TYPE}\r\n");
            assert!(metrics.contains(&ct), "{metrics}");
            assert!(metrics.ends_with("\n# EOF\n"), "{metrics}");
            assert!(health.starts_with("HTTP/1.1 200 OK\r\n") && health.ends_with("\r\n\r\nok\n"), "{health}");
            assert!(missing.starts_with("HTTP/1.1 404 Not Found\r\n"), "{missing}");
            assert!(post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{post}");
            assert!(post.contains("\r\nallow: GET\r\n"), "{post}");
        });
    }
}
