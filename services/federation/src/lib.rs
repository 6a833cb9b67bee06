//! The server-server protocol's machinery, shared by the federation-receiver
//! (which checks what arrives) and the room-workers (which fetch what is missing).
//!
//! # Layout
//! - [`discovery`]: where a server name's federation API is (IP literals,
//!   explicit ports, `.well-known`, SRV, port 8448).
//! - [`client`]: outbound requests, signed with `X-Matrix`.
//! - [`keys`]: our key document; [`keys::KeyRing`], remote servers' keys
//!   (memory, then Postgres, then the server itself, then notaries).
//! - [`auth`]: authenticating an inbound request's `X-Matrix` header.
//! - [`pdu`]: the checks on receipt of a PDU that need no room state: format,
//!   signatures (drop) and content hash (redact).
//! - [`tls`]: serving HTTPS from PEM certificates.

pub mod auth;
pub mod client;
pub mod discovery;
pub mod keys;
pub mod pdu;
pub mod tls;

pub use client::{FederationClient, FederationError};
pub use keys::KeyRing;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    tessera_runtime::now_ms()
}

/// Install the TLS crypto provider (ring) once per process; reqwest and the
/// receiver's TLS listener use it.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
