//! `tessera-gateway`: one base URL for clients of a local cluster.
//!
//! `/_matrix/client/{v3,r0}/sync` goes to a sync-worker chosen by a hash of
//! the access token (so a client keeps hitting the same worker while it is
//! up); everything else goes round-robin to client-api processes. An upstream
//! that refuses the connection is skipped for the next one; the request never
//! reached it, so retrying is safe. In Kubernetes an Ingress or Gateway API
//! route does this job instead (see `docs/operations.md`).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Request, Response, StatusCode, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::{Digest, Sha256};
use tessera_runtime::start::Started;

const MAX_BODY: usize = 2 * 1024 * 1024;
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
];

fn main() -> ExitCode {
    tessera_runtime::start::run("gateway", run)
}

struct Gateway {
    client: Client<HttpConnector, Full<Bytes>>,
    client_api: Vec<String>,
    sync_workers: Vec<String>,
    next: AtomicUsize,
}

/// Upstream base URLs, checked, without a trailing slash.
fn parse_upstreams(urls: &[String], what: &str) -> anyhow::Result<Vec<String>> {
    if urls.is_empty() {
        anyhow::bail!("gateway.{what} lists no upstreams");
    }
    urls.iter()
        .map(|u| {
            let base = u.trim_end_matches('/');
            base.parse::<Uri>()
                .with_context(|| format!("gateway.{what}: invalid URL {u:?}"))?;
            Ok(base.to_owned())
        })
        .collect()
}

async fn run(started: Started) -> anyhow::Result<()> {
    let config = &started.config.gateway;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let gateway = Arc::new(Gateway {
        // Idle upstream connections are dropped before the upstream's own
        // keep-alive limit closes them, so no request goes out on a
        // connection the other end is just closing.
        client: Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(tessera_runtime::http::Timeouts::STANDARD.headers / 2)
            .build(connector),
        client_api: parse_upstreams(&config.client_api, "client_api")?,
        sync_workers: parse_upstreams(&config.sync_workers, "sync_workers")?,
        next: AtomicUsize::new(0),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot bind the gateway listener on {}", config.listen))?;
    tracing::info!(listen = %listener.local_addr()?, client_api = ?config.client_api, sync_workers = ?config.sync_workers, "gateway listening");
    started.health.set_ready(true);
    let app = axum::Router::new().fallback(proxy).with_state(gateway);
    let shutdown = started.shutdown.clone();
    tessera_runtime::http::serve(listener, app, async move { shutdown.cancelled().await }).await;
    Ok(())
}

fn is_sync(path: &str) -> bool {
    matches!(path, "/_matrix/client/v3/sync" | "/_matrix/client/r0/sync")
}

fn token_hash(request: &Request<Body>) -> usize {
    let token = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().query().map(str::to_owned))
        .unwrap_or_default();
    let digest = Sha256::digest(token.as_bytes());
    usize::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let errcode = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "M_TOO_LARGE"
    } else {
        "M_UNKNOWN"
    };
    let body = format!(r#"{{"errcode":"{errcode}","error":"{message}"}}"#);
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn proxy(State(gateway): State<Arc<Gateway>>, request: Request<Body>) -> Response<Body> {
    let sync = is_sync(request.uri().path());
    let (upstreams, start) = if sync {
        (&gateway.sync_workers, token_hash(&request))
    } else {
        (
            &gateway.client_api,
            gateway.next.fetch_add(1, Ordering::Relaxed),
        )
    };
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(bytes) => bytes,
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large"),
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    for attempt in 0..upstreams.len() {
        let upstream = &upstreams[(start + attempt) % upstreams.len()];
        let uri: Uri = match format!("{upstream}{path_and_query}").parse() {
            Ok(uri) => uri,
            Err(_) => return error(StatusCode::BAD_REQUEST, "Invalid request URI"),
        };
        let mut forwarded = Request::builder().method(parts.method.clone()).uri(uri);
        for (name, value) in &parts.headers {
            if !HOP_BY_HOP.contains(&name.as_str()) && name != http::header::HOST {
                forwarded = forwarded.header(name, value);
            }
        }
        let Ok(forwarded) = forwarded.body(Full::new(body.clone())) else {
            return error(StatusCode::BAD_REQUEST, "Invalid request");
        };
        match gateway.client.request(forwarded).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                for name in HOP_BY_HOP {
                    parts.headers.remove(name);
                }
                metrics::counter!("tessera_gateway_requests_total", "upstream" => if sync { "sync" } else { "client_api" }).increment(1);
                return Response::from_parts(parts, Body::new(body.map_err(axum::Error::new)));
            }
            Err(e) if e.is_connect() => {
                tracing::warn!(%upstream, error = %e, "upstream refused the connection; trying the next");
                continue;
            }
            Err(e) => {
                tracing::warn!(%upstream, error = %e, "upstream failed");
                return error(StatusCode::BAD_GATEWAY, "Upstream failed");
            }
        }
    }
    error(StatusCode::BAD_GATEWAY, "No upstream is available")
}
