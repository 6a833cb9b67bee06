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

    /// Read a key in Synapse's `signing.key` format: `ed25519 <version>
    /// <base64 seed>` (the first such line). Returns the key and its PKCS#8
    /// document, to store.
    pub fn from_synapse_format(text: &str) -> Result<(Self, Vec<u8>), KeyError> {
        use base64::Engine;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .ok_or_else(|| KeyError("the key file is empty".to_owned()))?;
        let [algorithm, version, seed] = line.split_whitespace().collect::<Vec<_>>()[..] else {
            return Err(KeyError(
                "expected \"ed25519 <version> <base64 seed>\"".to_owned(),
            ));
        };
        if algorithm != "ed25519" {
            return Err(KeyError(format!("unsupported algorithm {algorithm}")));
        }
        let seed = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(seed.trim_end_matches('='))
            .map_err(|e| KeyError(format!("the seed is not base64: {e}")))?;
        if seed.len() != 32 {
            return Err(KeyError(format!(
                "the seed is {} bytes, not 32",
                seed.len()
            )));
        }
        // PKCS#8 v1 (RFC 8410): the fixed header of an Ed25519 private key, then the seed.
        let mut document = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        document.extend_from_slice(&seed);
        let key = Self::from_document(&document, version)?;
        Ok((key, document))
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

#[cfg(test)]
mod tests {
    use super::SigningKey;

    /// RFC 8032's first Ed25519 test vector, in Synapse's file format.
    #[test]
    fn a_synapse_key_file_gives_the_same_key() {
        let (key, document) = SigningKey::from_synapse_format(
            "ed25519 a_Xyz0 nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A\n",
        )
        .unwrap();
        assert_eq!(key.key_id(), "ed25519:a_Xyz0");
        assert_eq!(
            key.public_key_base64(),
            "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo"
        );
        // The stored document loads back to the same key.
        let again = SigningKey::from_document(&document, "a_Xyz0").unwrap();
        assert_eq!(again.public_key_base64(), key.public_key_base64());
    }

    #[test]
    fn malformed_key_files_are_refused() {
        for text in [
            "",
            "ed25519 a_1",
            "rsa a_1 nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",
            "ed25519 a_1 not*base64",
            "ed25519 a_1 AAAA",
        ] {
            assert!(SigningKey::from_synapse_format(text).is_err(), "{text:?}");
        }
    }
}
