//! The authenticated-request extractor: reads the body (bounded), checks the
//! `X-Matrix` signature over method, URI and body, and yields the origin.

use axum::extract::{FromRequest, Request};
use bytes::Bytes;
use tessera_events::ruma::OwnedServerName;
use tessera_federation::auth::{RequestAuthError, authenticate};
use tessera_matrix_http::MatrixError;

use crate::state::AppState;

/// Largest federation request body: a transaction of 50 PDUs of 64 KiB and
/// 100 EDUs fits.
pub const MAX_BODY: usize = 8 * 1024 * 1024;

pub struct Signed {
    pub origin: OwnedServerName,
    pub body: Bytes,
}

impl Signed {
    /// The body as JSON (an empty body is `{}`).
    pub fn json(&self) -> Result<serde_json::Value, MatrixError> {
        if self.body.is_empty() {
            return Ok(serde_json::json!({}));
        }
        serde_json::from_slice(&self.body).map_err(|e| tessera_matrix_http::extract::json_error(&e))
    }
}

impl FromRequest<AppState> for Signed {
    type Rejection = MatrixError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
            MatrixError::too_large(format!("request body is larger than {MAX_BODY} bytes"))
        })?;
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let origin = authenticate(
            &state.keyring,
            &state.server_name,
            &parts.method,
            path,
            &parts.headers,
            &body,
        )
        .await
        .map_err(|error| {
            metrics::counter!("tessera_federation_server_auth_failures_total").increment(1);
            match error {
                RequestAuthError::NotJson(e) => MatrixError::not_json(e),
                other => MatrixError::unauthorized(other.to_string()),
            }
        })?;
        Ok(Signed { origin, body })
    }
}
