//! Middleware shared by the Matrix listeners: CORS (web clients call us from
//! other origins), per-endpoint request metrics named the way Synapse
//! operators know them, and the Matrix answer for unknown endpoints.

use std::time::Instant;

use tracing::Instrument;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::MatrixError;

/// CORS as the client-server API asks: any origin, the usual methods and
/// headers; preflight requests are answered here.
pub async fn cors(request: Request, next: Next) -> Response {
    let mut response = if request.method() == Method::OPTIONS {
        StatusCode::OK.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    headers.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"),
    );
    headers.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("X-Requested-With, Content-Type, Authorization"),
    );
    response
}

/// Count and time every request by endpoint (the route pattern), method and
/// status: `tessera_http_server_requests_total` and
/// `tessera_http_server_response_time_seconds`; and run it in a span that
/// continues the caller's trace (`traceparent`), when traces are exported.
pub async fn metrics(request: Request, next: Next) -> Response {
    let servlet = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().to_string();
    let span = tracing::info_span!(
        "http",
        otel.name = %format!("{method} {servlet}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %servlet,
    );
    tessera_runtime::traces::set_parent_from_headers(&span, request.headers());
    let started = Instant::now();
    metrics::gauge!("tessera_http_server_in_flight_requests", "servlet" => servlet.clone())
        .increment(1.0);
    let response = next.run(request).instrument(span).await;
    metrics::gauge!("tessera_http_server_in_flight_requests", "servlet" => servlet.clone())
        .decrement(1.0);
    let code = response.status().as_u16().to_string();
    metrics::counter!("tessera_http_server_requests_total", "servlet" => servlet.clone(), "method" => method.clone(), "code" => code.clone())
        .increment(1);
    metrics::histogram!("tessera_http_server_response_time_seconds", "servlet" => servlet, "method" => method, "code" => code)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Unknown endpoints get `M_UNRECOGNIZED`, as the spec asks.
pub async fn unrecognized() -> MatrixError {
    MatrixError::unrecognized("Unrecognized request")
}

/// A known endpoint called with the wrong method.
pub async fn method_not_allowed() -> MatrixError {
    MatrixError::method_not_allowed()
}
