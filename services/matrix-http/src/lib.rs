//! HTTP glue for the Matrix APIs on axum, shared by client-api and sync-worker.
//!
//! # Layout
//! - [`error`]: [`MatrixError`], and the one place where failures become Matrix
//!   errcodes and HTTP statuses.
//! - [`extract`]: request extractors: ruma's typed requests ([`Ruma`]), plain
//!   JSON bodies ([`MatrixJson`]), with bad input mapped to `M_NOT_JSON`,
//!   `M_BAD_JSON`, `M_INVALID_PARAM` or `M_TOO_LARGE`.
//! - [`filter`]: the client filters of `/messages` and `/sync`.
//! - [`auth`]: access tokens (hashed before lookup) and the [`auth::Authed`] extractor.
//! - [`render`]: stored events in the client event format.
//! - [`layers`]: CORS, request metrics, and the fallback for unknown endpoints.

pub mod auth;
pub mod error;
pub mod extract;
pub mod filter;
pub mod layers;
pub mod render;

pub use error::{MatrixError, MatrixResult};
pub use extract::{MatrixJson, Ruma};

/// A JSON response with status 200.
pub fn ok_json(value: serde_json::Value) -> axum::response::Response {
    axum::response::IntoResponse::into_response(axum::Json(value))
}
