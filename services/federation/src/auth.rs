//! Authenticating inbound federation requests: the `X-Matrix` Authorization
//! header names the origin, the destination (which must be us) and the key;
//! the signature must verify over the method, URI, origin, destination and
//! body. Nothing else about a request is looked at before this passes.

use ruma::api::federation::authentication::XMatrix;
use ruma::{OwnedServerName, ServerName};

use crate::keys::KeyRing;
use crate::now_ms;

#[derive(Debug, thiserror::Error)]
pub enum RequestAuthError {
    #[error("missing or malformed X-Matrix Authorization header: {0}")]
    Missing(String),
    #[error("the request is addressed to {0}, not this server")]
    WrongDestination(String),
    #[error("{0}")]
    UnknownKey(String),
    #[error("the request's signature does not verify: {0}")]
    BadSignature(String),
    #[error("the request body is not JSON: {0}")]
    NotJson(String),
}

/// The origin of an authenticated request.
pub async fn authenticate(
    keyring: &KeyRing,
    our_server: &ServerName,
    method: &http::Method,
    path_and_query: &str,
    headers: &http::HeaderMap,
    body: &[u8],
) -> Result<OwnedServerName, RequestAuthError> {
    let xmatrix = XMatrix::extract_from_http_headers(headers)
        .map_err(|e| RequestAuthError::Missing(e.to_string()))?;
    if let Some(destination) = &xmatrix.destination
        && destination != our_server
    {
        return Err(RequestAuthError::WrongDestination(destination.to_string()));
    }
    if !body.is_empty() && serde_json::from_slice::<serde_json::Value>(body).is_err() {
        let error = serde_json::from_slice::<serde_json::Value>(body)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        return Err(RequestAuthError::NotJson(error));
    }
    let wanted = [(xmatrix.origin.clone(), xmatrix.key.to_string())];
    let keys = keyring
        .public_key_map(&wanted, now_ms())
        .await
        .map_err(|e| RequestAuthError::UnknownKey(e.to_string()))?;
    let request = http::Request::builder()
        .method(method.clone())
        .uri(path_and_query)
        .body(body)
        .map_err(|e| RequestAuthError::Missing(e.to_string()))?;
    xmatrix
        .verify_http_request(&request, our_server, &keys)
        .map_err(|e| RequestAuthError::BadSignature(e.to_string()))?;
    Ok(xmatrix.origin)
}
