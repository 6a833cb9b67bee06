//! Matrix errors. Every failure a client sees goes through [`MatrixError`]:
//! the spec's errcode, the matching HTTP status, and a message that says what
//! was wrong. Storage and internal failures become `M_UNKNOWN` with status 500
//! and are logged with their detail; the client sees no internals.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

#[derive(Debug, Clone)]
pub struct MatrixError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub message: String,
    /// Extra top-level fields (`retry_after_ms`, `soft_logout`, UIA flows...).
    pub extra: Map<String, Value>,
}

pub type MatrixResult<T> = Result<T, MatrixError>;

impl MatrixError {
    pub fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            message: message.into(),
            extra: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", message)
    }
    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", message)
    }
    /// The server-server API's answer for a room version a server lacks,
    /// naming the version in `room_version`.
    pub fn incompatible_room_version(version: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "M_INCOMPATIBLE_ROOM_VERSION",
            message,
        )
        .with("room_version", Value::String(version.to_owned()))
    }
    pub fn not_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", message)
    }
    pub fn missing_param(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", message)
    }
    pub fn invalid_param(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", message)
    }
    /// Federation requests whose `X-Matrix` authentication fails.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", message)
    }
    pub fn missing_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "Missing access token",
        )
    }
    pub fn unknown_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            "Unknown or expired access token",
        )
        .with("soft_logout", json!(false))
    }
    pub fn unrecognized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", message)
    }
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "M_UNRECOGNIZED",
            "Method not allowed for this endpoint",
        )
    }
    pub fn limit_exceeded(retry_after_ms: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "M_LIMIT_EXCEEDED",
            "Too many requests",
        )
        .with("retry_after_ms", json!(retry_after_ms))
    }
    pub fn user_in_use() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "M_USER_IN_USE",
            "User ID already taken",
        )
    }
    pub fn invalid_username(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_USERNAME", message)
    }
    pub fn room_in_use(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_ROOM_IN_USE", message)
    }
    pub fn unsupported_room_version(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "M_UNSUPPORTED_ROOM_VERSION",
            message,
        )
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", message)
    }

    /// A Matrix errcode from elsewhere (a room-worker refusal), with its status.
    pub fn from_errcode(errcode: &str, message: impl Into<String>) -> Self {
        let (status, code): (StatusCode, &'static str) = match errcode {
            "M_FORBIDDEN" => (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
            "M_NOT_FOUND" => (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
            "M_BAD_JSON" => (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
            "M_INVALID_PARAM" => (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
            "M_TOO_LARGE" => (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
            "M_ROOM_IN_USE" => (StatusCode::BAD_REQUEST, "M_ROOM_IN_USE"),
            "M_UNSUPPORTED_ROOM_VERSION" => (StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION"),
            "M_LIMIT_EXCEEDED" => (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN"),
        };
        Self::new(status, code, message)
    }
}

impl std::fmt::Display for MatrixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.errcode,
            self.message
        )
    }
}

impl std::error::Error for MatrixError {}

impl IntoResponse for MatrixError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("errcode".into(), json!(self.errcode));
        body.insert("error".into(), json!(self.message));
        body.extend(self.extra);
        (self.status, axum::Json(Value::Object(body))).into_response()
    }
}

impl From<tessera_storage::StoreError> for MatrixError {
    fn from(error: tessera_storage::StoreError) -> Self {
        tracing::error!(%error, "storage error while serving a request");
        match error {
            tessera_storage::StoreError::Pool(_) | tessera_storage::StoreError::Db(_) => {
                Self::unavailable("The database is unavailable; try again")
            }
            _ => Self::internal("Internal server error"),
        }
    }
}

impl From<tessera_events::restricted_join::RestrictedJoinError> for MatrixError {
    fn from(error: tessera_events::restricted_join::RestrictedJoinError) -> Self {
        use tessera_events::restricted_join::RestrictedJoinError as E;
        let errcode = match error {
            E::CannotJudge(_) => "M_UNABLE_TO_AUTHORISE_JOIN",
            E::NotAllowed(_) => return Self::forbidden(error.to_string()),
            E::NoAuthoriser => "M_UNABLE_TO_GRANT_JOIN",
        };
        Self::new(StatusCode::BAD_REQUEST, errcode, error.to_string())
    }
}

impl From<tessera_replication::token::TokenError> for MatrixError {
    fn from(error: tessera_replication::token::TokenError) -> Self {
        Self::invalid_param(format!("Invalid sync token: {error}"))
    }
}
