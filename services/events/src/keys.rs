//! The server's ed25519 signing key.
//!
//! The key is generated once per cluster and stored (as its PKCS#8 document) in
//! Postgres by the storage layer; this module only generates, parses and uses it.

use ruma::signatures::Ed25519KeyPair;

/// The cluster's signing key and its ID (`ed25519:<version>`).
pub struct SigningKey {
    pair: Ed25519KeyPair,
    version: String,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid signing key: {0}")]
pub struct KeyError(String);

impl SigningKey {
    /// A fresh key: returns the PKCS#8 document to store and the key version.
    pub fn generate() -> (Vec<u8>, String) {
        let document = Ed25519KeyPair::generate().to_vec();
        let version: String = {
            use rand::Rng;
            let mut rng = rand::thread_rng();
            (0..6)
                .map(|_| {
                    let n = rng.gen_range(0..36u8);
                    (if n < 10 { b'0' + n } else { b'a' + n - 10 }) as char
                })
                .collect()
        };
        (document, version)
    }

    /// Load a key from its stored PKCS#8 document.
    pub fn from_document(document: &[u8], version: &str) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_der(document, version.to_owned())
            .map_err(|e| KeyError(e.to_string()))?;
        Ok(Self {
            pair,
            version: version.to_owned(),
        })
    }

    /// `ed25519:<version>`.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.version)
    }

    pub fn pair(&self) -> &Ed25519KeyPair {
        &self.pair
    }

    /// The public key, unpadded standard base64, as `/_matrix/key/v2/server` serves it.
    pub fn public_key_base64(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(self.pair.public_key())
    }
}
