//! What every handler can reach, and the per-origin rate limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// (room, origin) pairs a room's owner refused by the room's server ACL,
    /// with when that was and the owner's message.
    acl_refusals: Mutex<HashMap<(String, String), (Instant, String)>>,
    /// Permits for membership events handed to owners at once
    /// (`federation_receiver.concurrent_memberships`).
    pub memberships: tokio::sync::Semaphore,
}

/// How long an owner's refusal of an origin by a room's server ACL is
/// applied here without asking the owner again (and before checking the
/// origin's signatures): a room's ACL changes rarely, and a server being
/// banned in a spam wave keeps sending.
const ACL_REFUSAL_TTL: Duration = Duration::from_secs(30);

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The per-origin PDU rate limit: `rate` a second, up to `burst` at once.
struct OriginLimit {
    rate: f64,
    burst: f64,
}

impl OriginLimit {
    /// The bucket's tokens at `now`, refilled since it was last touched.
    fn tokens_at(&self, bucket: &Bucket, now: Instant) -> f64 {
        (bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate)
            .min(self.burst)
    }

    /// Milliseconds until `missing` more tokens have refilled.
    fn wait_ms(&self, missing: f64) -> u64 {
        ((missing / self.rate) * 1000.0).ceil() as u64
    }
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
        let memberships =
            tokio::sync::Semaphore::new(config.federation_receiver.concurrent_memberships);
        Self(Arc::new(Inner {
            memberships,
            store,
            keyring,
            router,
            key,
            server_name,
            config,
            bulk,
            buckets: Mutex::new(HashMap::new()),
            versions: Mutex::new(HashMap::new()),
            acl_refusals: Mutex::new(HashMap::new()),
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
        let limit = self.origin_limit();
        let mut buckets = self.buckets.lock().expect("buckets lock");
        if buckets.len() > 100_000 {
            buckets.clear();
        }
        let bucket = buckets.entry(origin.to_owned()).or_insert(Bucket {
            tokens: limit.burst,
            at: Instant::now(),
        });
        let now = Instant::now();
        bucket.tokens = limit.tokens_at(bucket, now);
        bucket.at = now;
        let cost = cost as f64;
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            Ok(())
        } else {
            Err(limit.wait_ms(cost - bucket.tokens))
        }
    }

    /// If the origin's bucket has less than one PDU left, the milliseconds
    /// until it has (nothing is taken).
    pub fn origin_throttled(&self, origin: &str) -> Option<u64> {
        let limit = self.origin_limit();
        let buckets = self.buckets.lock().expect("buckets lock");
        let tokens = limit.tokens_at(buckets.get(origin)?, Instant::now());
        (tokens < 1.0).then(|| limit.wait_ms(1.0 - tokens))
    }

    fn origin_limit(&self) -> OriginLimit {
        OriginLimit {
            rate: self.config.federation.origin_pdus_per_second.max(1) as f64,
            burst: self.config.federation.origin_pdu_burst.max(1) as f64,
        }
    }

    /// Remember that the room's owner refused `origin` by the room's server ACL.
    pub fn remember_acl_refusal(&self, room: &str, origin: &str, message: &str) {
        let mut refusals = self.acl_refusals.lock().expect("acl refusals lock");
        if refusals.len() > 100_000 {
            refusals.clear();
        }
        refusals.insert(
            (room.to_owned(), origin.to_owned()),
            (Instant::now(), message.to_owned()),
        );
    }

    /// Forget a refusal (the room's ACL no longer denies the origin).
    pub fn forget_acl_refusal(&self, room: &str, origin: &str) {
        self.acl_refusals
            .lock()
            .expect("acl refusals lock")
            .remove(&(room.to_owned(), origin.to_owned()));
    }

    /// The owner's message if it refused `origin` in the room by its server
    /// ACL within the last [`ACL_REFUSAL_TTL`].
    pub fn acl_refusal(&self, room: &str, origin: &str) -> Option<String> {
        let mut refusals = self.acl_refusals.lock().expect("acl refusals lock");
        let key = (room.to_owned(), origin.to_owned());
        let (at, message) = refusals.get(&key)?;
        if at.elapsed() < ACL_REFUSAL_TTL {
            return Some(message.clone());
        }
        refusals.remove(&key);
        None
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
        let acl = self.store.server_acl(room_id).await?;
        Ok(tessera_events::server_acl::allows(acl.as_ref(), server))
    }
}
