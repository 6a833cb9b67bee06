//! What every handler can reach, and the per-origin rate limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tessera_cluster::router::RoomRouter;
use tessera_events::keys::SigningKey;
use tessera_events::ruma::{OwnedServerName, RoomVersionId};
use tessera_federation::KeyRing;
use tessera_runtime::Config;
use tessera_storage::Store;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub store: Store,
    pub keyring: Arc<KeyRing>,
    pub router: RoomRouter,
    pub key: Arc<SigningKey>,
    pub server_name: OwnedServerName,
    pub config: Config,
    /// The low-priority runtime that large transactions are handled on.
    pub bulk: tokio::runtime::Handle,
    buckets: Mutex<HashMap<String, Bucket>>,
    versions: Mutex<HashMap<String, RoomVersionId>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl AppState {
    pub fn new(
        store: Store,
        keyring: Arc<KeyRing>,
        router: RoomRouter,
        key: Arc<SigningKey>,
        server_name: OwnedServerName,
        config: Config,
        bulk: tokio::runtime::Handle,
    ) -> Self {
        Self(Arc::new(Inner {
            store,
            keyring,
            router,
            key,
            server_name,
            config,
            bulk,
            buckets: Mutex::new(HashMap::new()),
            versions: Mutex::new(HashMap::new()),
        }))
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl tessera_matrix_http::auth::HasStore for AppState {
    fn store(&self) -> &Store {
        &self.0.store
    }
}

impl Inner {
    /// Take `cost` PDUs from the origin's token bucket; on refusal, the
    /// milliseconds until enough have refilled.
    pub fn take_tokens(&self, origin: &str, cost: u64) -> Result<(), u64> {
        let rate = self.config.federation.origin_pdus_per_second.max(1) as f64;
        let burst = self.config.federation.origin_pdu_burst.max(1) as f64;
        let mut buckets = self.buckets.lock().expect("buckets lock");
        if buckets.len() > 100_000 {
            buckets.clear();
        }
        let bucket = buckets.entry(origin.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: Instant::now(),
        });
        let now = Instant::now();
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(burst);
        bucket.at = now;
        let cost = cost as f64;
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            Ok(())
        } else {
            Err((((cost - bucket.tokens) / rate) * 1000.0).ceil() as u64)
        }
    }

    /// If the origin's bucket has less than one PDU left, the milliseconds
    /// until it has (nothing is taken).
    pub fn origin_throttled(&self, origin: &str) -> Option<u64> {
        let rate = self.config.federation.origin_pdus_per_second.max(1) as f64;
        let burst = self.config.federation.origin_pdu_burst.max(1) as f64;
        let buckets = self.buckets.lock().expect("buckets lock");
        let bucket = buckets.get(origin)?;
        let tokens = (bucket.tokens + bucket.at.elapsed().as_secs_f64() * rate).min(burst);
        (tokens < 1.0).then(|| (((1.0 - tokens) / rate) * 1000.0).ceil() as u64)
    }

    /// A room's version, if the room is one we know (cached: it never changes).
    pub async fn room_version(
        &self,
        room_id: &str,
    ) -> Result<Option<RoomVersionId>, tessera_storage::StoreError> {
        if let Some(version) = self.versions.lock().expect("versions lock").get(room_id) {
            return Ok(Some(version.clone()));
        }
        let Some(room) = self.store.room(room_id).await? else {
            return Ok(None);
        };
        let Ok(version) = RoomVersionId::try_from(room.room_version.as_str()) else {
            return Ok(None);
        };
        let mut versions = self.versions.lock().expect("versions lock");
        if versions.len() > 100_000 {
            versions.clear();
        }
        versions.insert(room_id.to_owned(), version.clone());
        Ok(Some(version))
    }

    /// Whether the room's server ACL admits `server`.
    pub async fn acl_allows(
        &self,
        room_id: &str,
        server: &str,
    ) -> Result<bool, tessera_storage::StoreError> {
        let acl = self
            .store
            .state_event(room_id, "m.room.server_acl", "")
            .await?;
        let content = acl.and_then(|e| e.pdu().ok()).map(|p| p.content_value());
        Ok(tessera_events::server_acl::allows(content.as_ref(), server))
    }
}
