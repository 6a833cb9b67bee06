//! Postgres storage: the only code in Tessera that writes SQL.
//!
//! # Layout
//! - [`schema`]: migrations (applied under an advisory lock by exactly one
//!   process at a time) and the schema compatibility check.
//! - [`cluster`]: cluster settings, room-worker registrations and partition
//!   leases with their epochs (the fencing tokens).
//! - [`keys`]: the cluster's signing key.
//! - [`persist`]: the fenced write of a batch of events for one room.
//! - [`federation`]: remote keys, inbound transactions, staged PDUs, outliers, EDUs.
//! - [`events`]: reading events back, with what clients see around them
//!   (redactions, transaction IDs, replaced state).
//! - [`rooms`]: room metadata, current and historical state, members, aliases.
//! - [`users`]: accounts, devices, access tokens, registration tokens and the
//!   registration helpers (nonces, interactive-auth sessions).
//! - [`account`]: account data and filters.
//! - [`sync`]: sync checkpoints and the queries `/sync` makes.

pub mod account;
pub mod cluster;
pub mod events;
pub mod federation;
pub mod keys;
pub mod out_of_band;
pub mod persist;
pub mod rooms;
pub mod schema;
pub mod sync;
pub mod users;

#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
pub use tokio_postgres;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

/// Errors from storage. `Fenced` and `Conflict` are expected outcomes callers
/// act on; the rest are infrastructure failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot get a database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// The writer no longer holds the partition lease at the epoch it claimed.
    #[error("partition {partition} is no longer owned by this worker at epoch {epoch}")]
    Fenced { partition: u32, epoch: i64 },
    /// A uniqueness constraint refused the write (the constraint's name).
    #[error("conflict on {0}")]
    Conflict(String),
    /// Data in the database does not parse.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The schema is missing or outside this binary's compatibility range.
    #[error("{0}")]
    Incompatible(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How a process opens the database: see [`Store::open`].
pub struct OpenOptions<'a> {
    pub url: &'a str,
    pub pool_size: usize,
    /// Connections opened at once (see [`Store::warm`]).
    pub min_connections: usize,
    pub connect_timeout: Duration,
    /// Apply pending migrations (under the advisory lock) rather than only
    /// checking compatibility.
    pub migrate: bool,
    pub server_name: &'a str,
    pub partitions: u32,
}

/// Makes a pool's connections on the runtime that opened the pool, and
/// drives them there, whichever task asks the pool for one more.
///
/// Why: a connection's socket is registered with the reactor of the runtime
/// it was made on, and its driver task runs there. A pool opened on a
/// process's main runtime but grown from a task of its low-priority bulk
/// runtime (see `tessera_runtime::bulk`) would hand quiet requests a
/// connection whose every reply waits for a busy, low-priority thread: under
/// a flood that turned a one-row lookup into tens of milliseconds.
struct HomeRuntimeConnect(tokio::runtime::Handle);

impl deadpool_postgres::Connect for HomeRuntimeConnect {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> futures::future::BoxFuture<
        '_,
        std::result::Result<
            (tokio_postgres::Client, tokio::task::JoinHandle<()>),
            tokio_postgres::Error,
        >,
    > {
        let (home, pg_config) = (self.0.clone(), pg_config.clone());
        Box::pin(async move {
            let driver_home = home.clone();
            let connecting = home.spawn(async move {
                let (client, connection) = pg_config.connect(tokio_postgres::NoTls).await?;
                let driver = driver_home.spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::warn!(%error, "database connection closed");
                    }
                });
                Ok((client, driver))
            });
            match connecting.await {
                Ok(connected) => connected,
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                // The home runtime is shutting down, and the process with it.
                Err(_) => std::future::pending().await,
            }
        })
    }
}

/// The connection pool and every query, grouped by module as `impl Store` blocks.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// Connect, retrying for `connect_timeout` so that a cluster whose database
    /// starts a little later still comes up; then fail with a clear message.
    pub async fn connect(url: &str, pool_size: usize, connect_timeout: Duration) -> Result<Self> {
        Self::connect_lane(url, None, pool_size, connect_timeout).await
    }

    /// [`Store::connect`] for one of a process's pools: `lane` is added to
    /// the connections' application name (`tessera-room-worker-bulk`), so
    /// that `pg_stat_activity` tells a flood's connections from the rest.
    pub async fn connect_lane(
        url: &str,
        lane: Option<&str>,
        pool_size: usize,
        connect_timeout: Duration,
    ) -> Result<Self> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Incompatible(format!("invalid database URL: {e}")))?;
        // Our statements are small and many: a parallel plan costs more in
        // starting workers (milliseconds, and CPU every other request needs)
        // than it saves. Options given in the URL come after, so they win.
        let options = format!(
            "-c max_parallel_workers_per_gather=0 {}",
            config.get_options().unwrap_or_default()
        );
        config.options(options.trim_end());
        // The role's binary name, so that `pg_stat_activity` tells which
        // processes hold the connections.
        if config.get_application_name().is_none() {
            let binary = std::env::current_exe()
                .ok()
                .and_then(|path| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .filter(|name| name.starts_with("tessera"))
                .unwrap_or_else(|| "tessera".to_owned());
            match lane {
                Some(lane) => config.application_name(format!("{binary}-{lane}")),
                None => config.application_name(&binary),
            };
        }
        let manager = Manager::from_connect(
            config,
            HomeRuntimeConnect(tokio::runtime::Handle::current()),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .build()
            .map_err(|e| {
                StoreError::Incompatible(format!("cannot build the connection pool: {e}"))
            })?;
        let deadline = tokio::time::Instant::now() + connect_timeout;
        loop {
            match pool.get().await {
                Ok(client) => {
                    client.simple_query("SELECT 1").await?;
                    return Ok(Self { pool });
                }
                Err(error) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(database = %redact_url(url), %error, "database not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => {
                    return Err(StoreError::Incompatible(format!(
                        "cannot connect to the database at {}: {error}",
                        redact_url(url)
                    )));
                }
            }
        }
    }

    /// What every process does first: connect, migrate (or check the schema
    /// is one this build runs against), and check the cluster's fixed settings.
    pub async fn open(options: OpenOptions<'_>) -> Result<Self> {
        let store = Self::connect(options.url, options.pool_size, options.connect_timeout).await?;
        store.warm(options.min_connections).await;
        if options.migrate {
            store.migrate().await?;
        } else {
            store.check_compatibility().await?;
        }
        store
            .init_cluster(options.server_name, options.partitions)
            .await?;
        Ok(store)
    }

    /// Open connections until the pool holds `connections` (at most its
    /// size); they stay open. A connection that cannot be made is only
    /// logged: the pool makes it again when it is needed.
    pub async fn warm(&self, connections: usize) {
        let wanted = connections.min(self.pool.status().max_size);
        // Held together, so that each is a connection of its own: the idle
        // ones the pool has are handed out first, then new ones are made.
        let held = futures::future::join_all((0..wanted).map(|_| self.pool.get())).await;
        for result in &held {
            if let Err(error) = result {
                tracing::warn!(%error, "cannot open a database connection ahead of need");
            }
        }
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }

    // One-statement helpers. Statements are prepared once per connection and
    // cached: an unprepared statement costs tokio-postgres an extra round trip.

    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query(&statement, params).await?)
    }

    /// A query planned afresh on every call, in one round trip (an unnamed
    /// statement with its parameter types given). For lookups by key in
    /// tables that can grow or shrink by thousands of rows in seconds
    /// (`events` and `staged_pdus` in a flood): Postgres keeps a prepared
    /// statement's generic plan until autovacuum next analyzes the table,
    /// and a plan made while the table was small scans all of it, costing
    /// milliseconds per lookup once it is large. Planning these is cheap.
    pub(crate) async fn query_planned_now(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>> {
        let client = self.client().await?;
        Ok(client.query_typed(sql, params).await?)
    }

    pub(crate) async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query_opt(&statement, params).await?)
    }

    pub(crate) async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query_one(&statement, params).await?)
    }

    pub(crate) async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.execute(&statement, params).await?)
    }
}

/// The URL with any password replaced, for log lines.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Map a unique-violation into [`StoreError::Conflict`], other errors unchanged.
pub(crate) fn conflict(error: impl Into<StoreError>) -> StoreError {
    let error = error.into();
    if let StoreError::Db(db_error) = &error
        && let Some(db) = db_error.as_db_error()
        && *db.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
    {
        return StoreError::Conflict(db.constraint().unwrap_or("unique").to_owned());
    }
    error
}

#[cfg(test)]
mod tests;

#[cfg(test)]
#[test]
fn passwords_do_not_reach_logs() {
    assert_eq!(
        redact_url("postgres://u:secret@h:5432/db"),
        "postgres://u:***@h:5432/db"
    );
    assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
}
