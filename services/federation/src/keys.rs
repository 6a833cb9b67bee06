//! Signing keys: the document we publish, and [`KeyRing`], the remote keys we
//! trust.
//!
//! A remote key is looked up in memory, then in Postgres, then fetched from the
//! server itself (`GET /_matrix/key/v2/server`, which must be signed by the
//! key it lists), then from the configured notaries (`POST
//! /_matrix/key/v2/query`, whose answers carry both signatures). A key counts
//! only until its `valid_until_ts`, capped at seven days from when it was
//! fetched; an expired or unknown key is fetched again, at most once a minute
//! per server.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::serde::Base64;
use ruma::signatures::PublicKeyMap;
use ruma::{OwnedServerName, ServerName};
use serde_json::{Value, json};
use tessera_events::keys::SigningKey;
use tessera_storage::Store;

use crate::client::FederationClient;
use crate::now_ms;

const MAX_KEY_VALIDITY_MS: u64 = 7 * 24 * 3600 * 1000;
const RETRY_FETCH_AFTER: Duration = Duration::from_secs(60);

/// Our `/_matrix/key/v2/server` response, signed by our key.
pub fn server_keys_document(
    server_name: &ServerName,
    key: &SigningKey,
    valid_until_ts: u64,
) -> Value {
    let mut object: CanonicalJsonObject = serde_json::from_value(json!({
        "server_name": server_name,
        "valid_until_ts": valid_until_ts,
        "verify_keys": { key.key_id(): { "key": key.public_key_base64() } },
        "old_verify_keys": {},
    }))
    .expect("a valid canonical object");
    ruma::signatures::sign_json(server_name.as_str(), key.pair(), &mut object)
        .expect("signing a small object");
    serde_json::to_value(&object).expect("canonical JSON is JSON")
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    #[error("no valid key {key_id} is known for {server}")]
    Unknown { server: String, key_id: String },
}

type Cached = HashMap<(String, String), (String, u64)>;

#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("cannot read or store the signing key: {0}")]
    Store(#[from] tessera_storage::StoreError),
    #[error("the signing key is invalid: {0}")]
    Invalid(String),
}

/// The cluster's signing key: the one in `key_file` (Synapse's format) when
/// configured, stored in Postgres so that every process serves it; else the
/// one in Postgres, or a new one generated and stored there by the first
/// process that asks (under a lock, so every process ends up with the same
/// key).
pub async fn cluster_signing_key(
    store: &Store,
    key_file: Option<&std::path::Path>,
) -> Result<SigningKey, SigningKeyError> {
    if let Some(path) = key_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            SigningKeyError::Invalid(format!("cannot read {}: {e}", path.display()))
        })?;
        let (key, document) = SigningKey::from_synapse_format(&text)
            .map_err(|e| SigningKeyError::Invalid(format!("{}: {e}", path.display())))?;
        store
            .import_signing_key(&key.key_id(), &document, &key.public_key_base64())
            .await?;
        return Ok(key);
    }
    let stored = store
        .signing_key(|| {
            let (document, version) = SigningKey::generate();
            let public = SigningKey::from_document(&document, &version)
                .expect("a freshly generated key parses")
                .public_key_base64();
            (document, version, public)
        })
        .await?;
    SigningKey::from_document(&stored.pkcs8, stored.key_id.trim_start_matches("ed25519:"))
        .map_err(|e| SigningKeyError::Invalid(e.to_string()))
}

pub struct KeyRing {
    store: Store,
    client: Arc<FederationClient>,
    own_server: OwnedServerName,
    own_key_id: String,
    own_public: String,
    notaries: Vec<OwnedServerName>,
    cache: Mutex<Cached>,
    last_fetch: Mutex<HashMap<String, Instant>>,
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Other servers' own key documents as last fetched, for answering as a
    /// notary: (document, when fetched, last failed attempt).
    documents: Mutex<HashMap<OwnedServerName, NotaryEntry>>,
}

#[derive(Default)]
struct NotaryEntry {
    document: Option<(Value, Instant)>,
    failed_at: Option<Instant>,
}

/// A fetched key document is served again for this long before refetching.
const DOCUMENT_FRESH: Duration = Duration::from_secs(300);
/// After a failed fetch, a server is not asked again for this long.
const DOCUMENT_RETRY: Duration = Duration::from_secs(60);

impl KeyRing {
    /// A key ring that fetches keys as `server_name`, signing with `key`:
    /// the outbound client and the notaries from the configuration's values
    /// (notary names that do not parse are skipped).
    pub fn for_server(
        store: Store,
        server_name: OwnedServerName,
        key: Arc<SigningKey>,
        verify_certificates: bool,
        trusted_key_servers: &[String],
    ) -> Self {
        let client = Arc::new(FederationClient::new(server_name, key, verify_certificates));
        let notaries = trusted_key_servers
            .iter()
            .filter_map(|s| OwnedServerName::try_from(s.clone()).ok())
            .collect();
        Self::new(store, client, notaries)
    }

    pub fn new(
        store: Store,
        client: Arc<FederationClient>,
        notaries: Vec<OwnedServerName>,
    ) -> Self {
        let own_server = client.origin().to_owned();
        let own_key_id = client.key().key_id();
        let own_public = client.key().public_key_base64();
        Self {
            store,
            client,
            own_server,
            own_key_id,
            own_public,
            notaries,
            cache: Mutex::new(HashMap::new()),
            last_fetch: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashMap::new()),
            documents: Mutex::new(HashMap::new()),
        }
    }

    pub fn client(&self) -> &Arc<FederationClient> {
        &self.client
    }

    /// The public key (unpadded base64) `server` signs with as `key_id`,
    /// valid at `valid_at` (ms since the epoch).
    pub async fn key(
        &self,
        server: &ServerName,
        key_id: &str,
        valid_at: u64,
    ) -> Result<String, KeyError> {
        if server == self.own_server && key_id == self.own_key_id {
            return Ok(self.own_public.clone());
        }
        let unknown = || KeyError::Unknown {
            server: server.to_string(),
            key_id: key_id.to_owned(),
        };
        if let Some(key) = self.known(server.as_str(), key_id, valid_at).await {
            return Ok(key);
        }
        // One fetch per server at a time; others wait for it and look again.
        let lock = Arc::clone(
            self.fetching
                .lock()
                .expect("fetch locks")
                .entry(server.to_string())
                .or_default(),
        );
        let _guard = lock.lock().await;
        if let Some(key) = self.known(server.as_str(), key_id, valid_at).await {
            return Ok(key);
        }
        {
            let mut last = self.last_fetch.lock().expect("last fetch");
            if last
                .get(server.as_str())
                .is_some_and(|t| t.elapsed() < RETRY_FETCH_AFTER)
            {
                return Err(unknown());
            }
            last.insert(server.to_string(), Instant::now());
        }
        match self.fetch_direct(server).await {
            Ok(()) => {}
            Err(error) => {
                tracing::info!(%server, %error, "cannot fetch keys from the server itself")
            }
        }
        if let Some(key) = self.known(server.as_str(), key_id, valid_at).await {
            return Ok(key);
        }
        for notary in self.notaries.clone() {
            match self.fetch_via_notary(&notary, server).await {
                Ok(()) => {
                    if let Some(key) = self.known(server.as_str(), key_id, valid_at).await {
                        return Ok(key);
                    }
                }
                Err(error) => {
                    tracing::info!(%server, %notary, %error, "notary could not provide keys")
                }
            }
        }
        metrics::counter!("tessera_federation_key_fetch_failures_total").increment(1);
        Err(unknown())
    }

    /// Keys for several (server, key ID) pairs, as ruma's verification wants
    /// them. A server needs only one known key (a signature by an unknown key
    /// beside a valid one is ignored); a server with none is an error.
    pub async fn public_key_map(
        &self,
        wanted: &[(OwnedServerName, String)],
        valid_at: u64,
    ) -> Result<PublicKeyMap, KeyError> {
        let mut map: PublicKeyMap = BTreeMap::new();
        let mut last_error = None;
        for (server, key_id) in wanted {
            match self.key(server, key_id, valid_at).await {
                Ok(key) => {
                    if let Ok(key) = Base64::parse(key) {
                        map.entry(server.to_string())
                            .or_default()
                            .insert(key_id.clone(), key);
                    }
                }
                Err(error) => last_error = Some(error),
            }
        }
        for (server, key_id) in wanted {
            if !map.contains_key(server.as_str()) {
                return Err(last_error.unwrap_or(KeyError::Unknown {
                    server: server.to_string(),
                    key_id: key_id.clone(),
                }));
            }
        }
        Ok(map)
    }

    async fn known(&self, server: &str, key_id: &str, valid_at: u64) -> Option<String> {
        let cache_key = (server.to_owned(), key_id.to_owned());
        if let Some((key, until)) = self.cache.lock().expect("key cache").get(&cache_key)
            && *until >= valid_at
        {
            return Some(key.clone());
        }
        match self.store.remote_key(server, key_id).await {
            Ok(Some((key, until))) if until as u64 >= valid_at => {
                self.cache
                    .lock()
                    .expect("key cache")
                    .insert(cache_key, (key.clone(), until as u64));
                Some(key)
            }
            _ => None,
        }
    }

    async fn fetch_direct(&self, server: &ServerName) -> Result<(), String> {
        self.fetch_document(server).await.map(drop)
    }

    /// A server's current key document, fetched from it and verified (our own
    /// is built here). Notary queries answer with these.
    ///
    /// Documents are kept in memory: one fetched in the last five minutes is
    /// served as it is, and a server whose fetch failed is not asked again
    /// for a minute (its last good document, if any, is served meanwhile), so
    /// that notary requests cannot make us hammer other servers.
    pub async fn fetch_document(&self, server: &ServerName) -> Result<Value, String> {
        if server == self.own_server {
            return Ok(server_keys_document(
                server,
                self.client.key(),
                now_ms() + MAX_KEY_VALIDITY_MS,
            ));
        }
        let (cached, failed_recently) = {
            let documents = self.documents.lock().expect("documents lock");
            let entry = documents.get(server);
            (
                entry.and_then(|e| e.document.clone()),
                entry
                    .and_then(|e| e.failed_at)
                    .is_some_and(|at| at.elapsed() < DOCUMENT_RETRY),
            )
        };
        match cached {
            Some((document, at)) if at.elapsed() < DOCUMENT_FRESH => return Ok(document),
            _ if failed_recently => {
                return cached
                    .map(|(document, _)| document)
                    .ok_or_else(|| format!("{server}'s keys could not be fetched recently"));
            }
            _ => {}
        }
        let fetched = async {
            let document = self
                .client
                .get_unsigned(server, "/_matrix/key/v2/server")
                .await
                .map_err(|e| e.to_string())?;
            let keys = verify_key_document(&document, server, None)?;
            self.remember(server, keys).await?;
            Ok::<Value, String>(document)
        }
        .await;
        let mut documents = self.documents.lock().expect("documents lock");
        if documents.len() > 10_000 {
            documents.clear();
        }
        let entry = documents.entry(server.to_owned()).or_default();
        match fetched {
            Ok(document) => {
                entry.document = Some((document.clone(), Instant::now()));
                entry.failed_at = None;
                Ok(document)
            }
            Err(error) => {
                entry.failed_at = Some(Instant::now());
                entry
                    .document
                    .as_ref()
                    .map(|(document, _)| document.clone())
                    .ok_or(error)
            }
        }
    }

    async fn fetch_via_notary(
        &self,
        notary: &ServerName,
        server: &ServerName,
    ) -> Result<(), String> {
        let body = json!({ "server_keys": { server.as_str(): {} } });
        let response = self
            .client
            .post_unsigned(notary, "/_matrix/key/v2/query", &body)
            .await
            .map_err(|e| e.to_string())?;
        let documents = response
            .get("server_keys")
            .and_then(Value::as_array)
            .ok_or("no server_keys in the answer")?;
        for document in documents {
            if document.get("server_name").and_then(Value::as_str) != Some(server.as_str()) {
                continue;
            }
            // The notary must have signed it too, with a key we trust.
            let notary_keys = signature_key_ids(document, notary.as_str());
            let mut notary_map: PublicKeyMap = BTreeMap::new();
            for key_id in notary_keys {
                if let Ok(key) = Box::pin(self.key(notary, &key_id, now_ms())).await
                    && let Ok(key) = Base64::parse(key)
                {
                    notary_map
                        .entry(notary.to_string())
                        .or_default()
                        .insert(key_id, key);
                }
            }
            let keys = verify_key_document(document, server, Some(&notary_map))?;
            self.remember(server, keys).await?;
        }
        Ok(())
    }

    async fn remember(
        &self,
        server: &ServerName,
        keys: Vec<(String, String, i64)>,
    ) -> Result<(), String> {
        self.store
            .store_remote_keys(server.as_str(), &keys)
            .await
            .map_err(|e| e.to_string())?;
        let mut cache = self.cache.lock().expect("key cache");
        for (key_id, key, until) in keys {
            cache.insert((server.to_string(), key_id), (key, until as u64));
        }
        Ok(())
    }
}

fn signature_key_ids(document: &Value, server: &str) -> Vec<String> {
    document
        .get("signatures")
        .and_then(|s| s.get(server))
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Check a key document: it names `server`, is signed by the keys it lists
/// (and by a notary, when `notary_keys` is given); return (key ID, key, valid
/// until) for each of its keys, validity capped at seven days from now.
pub fn verify_key_document(
    document: &Value,
    server: &ServerName,
    notary_keys: Option<&PublicKeyMap>,
) -> Result<Vec<(String, String, i64)>, String> {
    if document.get("server_name").and_then(Value::as_str) != Some(server.as_str()) {
        return Err("the key document names another server".to_owned());
    }
    let object: CanonicalJsonObject =
        serde_json::from_value(document.clone()).map_err(|e| format!("not canonical JSON: {e}"))?;
    let valid_until = document
        .get("valid_until_ts")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let cap = now_ms() + MAX_KEY_VALIDITY_MS;
    let mut keys = Vec::new();
    let mut own_map: BTreeMap<String, Base64> = BTreeMap::new();
    if let Some(CanonicalJsonValue::Object(verify)) = object.get("verify_keys") {
        for (key_id, entry) in verify {
            let Some(key) = entry_key(entry) else {
                continue;
            };
            own_map.insert(
                key_id.clone(),
                Base64::parse(&key).map_err(|_| format!("key {key_id} is not base64"))?,
            );
            keys.push((key_id.clone(), key, valid_until.min(cap) as i64));
        }
    }
    if let Some(CanonicalJsonValue::Object(old)) = object.get("old_verify_keys") {
        for (key_id, entry) in old {
            let Some(key) = entry_key(entry) else {
                continue;
            };
            let expired = match entry {
                CanonicalJsonValue::Object(o) => match o.get("expired_ts") {
                    Some(CanonicalJsonValue::Integer(i)) => i64::from(*i),
                    _ => 0,
                },
                _ => 0,
            };
            keys.push((key_id.clone(), key, expired.min(cap as i64)));
        }
    }
    if own_map.is_empty() {
        return Err("the key document lists no keys".to_owned());
    }
    // Self-signed: every signature from the server must verify with its keys;
    // ruma checks at least one per entity in the map.
    let mut map: PublicKeyMap = BTreeMap::from([(server.to_string(), own_map)]);
    ruma::signatures::verify_json(&map, &object).map_err(|e| format!("bad self-signature: {e}"))?;
    if let Some(notary) = notary_keys {
        map = notary.clone();
        if map.is_empty() {
            return Err("no trusted key for the notary's signature".to_owned());
        }
        ruma::signatures::verify_json(&map, &object)
            .map_err(|e| format!("bad notary signature: {e}"))?;
    }
    Ok(keys)
}

fn entry_key(entry: &CanonicalJsonValue) -> Option<String> {
    match entry {
        CanonicalJsonValue::Object(o) => match o.get("key") {
            Some(CanonicalJsonValue::String(s)) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        let (document, version) = SigningKey::generate();
        SigningKey::from_document(&document, &version).unwrap()
    }

    #[test]
    fn our_document_verifies_and_tampering_does_not() {
        let server = <&ServerName>::try_from("example.org").unwrap();
        let key = key();
        let document = server_keys_document(server, &key, now_ms() + 1000);
        let keys = verify_key_document(&document, server, None).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].0, key.key_id());
        let other = <&ServerName>::try_from("other.org").unwrap();
        assert!(verify_key_document(&document, other, None).is_err());
        let mut tampered = document.clone();
        tampered["valid_until_ts"] = json!(now_ms() + 10_000_000);
        assert!(
            verify_key_document(&tampered, server, None).is_err(),
            "signature covers the validity"
        );
        // Validity is capped at seven days.
        let far = server_keys_document(server, &key, now_ms() + 30 * MAX_KEY_VALIDITY_MS);
        let keys = verify_key_document(&far, server, None).unwrap();
        assert!(keys[0].2 as u64 <= now_ms() + MAX_KEY_VALIDITY_MS);
    }
}
