//! Request extractors with Matrix errors for bad input.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request};
use bytes::Bytes;
use ruma::api::IncomingRequest;
use ruma::api::IncomingRequestExt;
use ruma::api::error::{DeserializationError, FromHttpRequestError};
use serde::de::DeserializeOwned;

use crate::error::MatrixError;

/// Largest body any Matrix endpoint here accepts (events are at most 64 KiB;
/// this leaves room for big `initial_state` lists).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

async fn body_bytes(body: Body) -> Result<Bytes, MatrixError> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            MatrixError::too_large(format!(
                "Request body is larger than {MAX_BODY_BYTES} bytes"
            ))
        })
}

/// Map a JSON parse failure: not JSON at all is `M_NOT_JSON`, JSON of the
/// wrong shape is `M_BAD_JSON`.
pub fn json_error(error: &serde_json::Error) -> MatrixError {
    use serde_json::error::Category;
    match error.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            MatrixError::not_json(format!("Content not JSON: {error}"))
        }
        Category::Data => MatrixError::bad_json(format!("Invalid JSON: {error}")),
    }
}

/// A ruma request type, parsed from the HTTP request and its path parameters.
pub struct Ruma<T>(pub T);

impl<T, S> FromRequest<S> for Ruma<T>
where
    T: IncomingRequest,
    S: Send + Sync,
{
    type Rejection = MatrixError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = request.into_parts();
        let params: Vec<String> = match RawPathParams::from_request_parts(&mut parts, state).await {
            Ok(params) => params.iter().map(|(_, v)| v.to_owned()).collect(),
            Err(_) => Vec::new(),
        };
        let bytes = body_bytes(body).await?;
        // ruma reads the body as JSON for endpoints that have one; an empty body
        // stands for an empty object, as clients often send nothing for `{}`.
        let body: &[u8] = if bytes.is_empty() && parts.method != http::Method::GET {
            b"{}"
        } else {
            &bytes
        };
        let http_request = http::Request::from_parts(parts, body);
        let args: Vec<&str> = params.iter().map(String::as_str).collect();
        T::try_from_http_request(http_request, &args)
            .map(Ruma)
            .map_err(|error| match error {
                FromHttpRequestError::MethodMismatch { .. } => MatrixError::method_not_allowed(),
                FromHttpRequestError::Deserialization(error) => deserialization_error(&error),
                _ => MatrixError::bad_json(error.to_string()),
            })
    }
}

fn deserialization_error(error: &DeserializationError) -> MatrixError {
    match error {
        DeserializationError::Json(e) => json_error(e),
        DeserializationError::Utf8(e) => MatrixError::not_json(format!("Body is not UTF-8: {e}")),
        DeserializationError::Query(e) => {
            MatrixError::invalid_param(format!("Invalid query parameters: {e}"))
        }
        DeserializationError::Ident(e) => {
            MatrixError::invalid_param(format!("Invalid identifier: {e}"))
        }
        other => MatrixError::bad_json(other.to_string()),
    }
}

/// A JSON body deserialized into `T`, for endpoints ruma has no type for.
pub struct MatrixJson<T>(pub T);

impl<T, S> FromRequest<S> for MatrixJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = MatrixError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(request.into_body()).await?;
        let body: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
        serde_json::from_slice(body)
            .map(MatrixJson)
            .map_err(|e| json_error(&e))
    }
}

/// A JSON body that must be an object, kept as a map (event contents).
pub fn json_object(
    bytes: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, MatrixError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| json_error(&e))?;
    match value {
        serde_json::Value::Object(map) => Ok(map),
        _ => Err(MatrixError::bad_json("Content must be a JSON object")),
    }
}

/// A raw body, at most [`MAX_BODY_BYTES`], refused with `M_TOO_LARGE` beyond.
pub struct MatrixBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for MatrixBody {
    type Rejection = MatrixError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        body_bytes(request.into_body()).await.map(MatrixBody)
    }
}
