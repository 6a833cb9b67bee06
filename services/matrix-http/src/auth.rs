//! Access tokens. Tokens are random and stored only as SHA-256 hashes; a
//! request's token is hashed and looked up on every request, so a logout on
//! one process takes effect on every other at once.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use ruma::OwnedUserId;
use sha2::{Digest, Sha256};
use tessera_storage::Store;

use crate::error::MatrixError;

/// Anything that can hand the auth extractor a store.
pub trait HasStore {
    fn store(&self) -> &Store;
}

pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The token of a request: `Authorization: Bearer`, or the deprecated
/// `access_token` query parameter.
pub fn token_of(parts: &Parts) -> Option<String> {
    if let Some(value) = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return value.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    parts.uri.query().and_then(|q| {
        q.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == "access_token").then(|| percent_decode(v))
        })
    })
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(high << 4 | low);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
#[test]
fn query_tokens_are_decoded_without_panicking() {
    assert_eq!(percent_decode("a%2Fb+c"), "a/b c");
    assert_eq!(percent_decode("%é%"), "%é%");
    assert_eq!(percent_decode("%"), "%");
}

/// An authenticated request.
#[derive(Debug, Clone)]
pub struct Authed {
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub admin: bool,
    pub token_hash: Vec<u8>,
}

impl<S> FromRequestParts<S> for Authed
where
    S: HasStore + Send + Sync,
{
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let token = token_of(parts).ok_or_else(MatrixError::missing_token)?;
        let token_hash = hash_token(&token);
        let owner = state
            .store()
            .token_owner(&token_hash)
            .await?
            .ok_or_else(MatrixError::unknown_token)?;
        let user_id =
            OwnedUserId::try_from(owner.user_id).map_err(|_| MatrixError::unknown_token())?;
        Ok(Authed {
            user_id,
            device_id: owner.device_id,
            admin: owner.admin,
            token_hash,
        })
    }
}
