//! Migrations and the schema compatibility check.
//!
//! Every process may be started with `migrate_on_start`; an advisory lock makes
//! sure exactly one applies migrations at a time while the others wait and then
//! find nothing to do. After migrating (or instead of it) each binary checks the
//! database's compatibility version against the range it was built for, and
//! refuses to start outside it.

use std::ops::RangeInclusive;

use crate::{Result, Store, StoreError};

refinery::embed_migrations!("migrations");

/// Compatibility versions of the schema this build can run against.
pub const SUPPORTED_COMPAT: RangeInclusive<i32> = 1..=1;

/// Arbitrary constant naming our migration advisory lock.
const MIGRATION_LOCK: i64 = 0x0074_6573_7365_7261; // "tessera"

impl Store {
    /// Apply pending migrations under the advisory lock, then check compatibility.
    pub async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        let result: Result<()> = async {
            // A schema newer than we understand must not be touched at all.
            if let Some(version) = compat_version(&client).await? {
                check_compat(version)?;
            }
            let report = migrations::runner()
                .set_abort_missing(false)
                .set_abort_divergent(true)
                .run_async(&mut **client)
                .await
                .map_err(|e| StoreError::Incompatible(format!("migration failed: {e}")))?;
            for migration in report.applied_migrations() {
                tracing::info!(migration = %migration, "applied migration");
            }
            Ok(())
        }
        .await;
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await?;
        result?;
        self.check_compatibility().await
    }

    /// Refuse to run against a schema outside [`SUPPORTED_COMPAT`].
    pub async fn check_compatibility(&self) -> Result<()> {
        let client = self.client().await?;
        match compat_version(&client).await? {
            Some(version) => check_compat(version),
            None => Err(StoreError::Incompatible(
                "the database has no Tessera schema: start a process with \
                 database.migrate_on_start = true, or run the migration job"
                    .to_owned(),
            )),
        }
    }
}

async fn compat_version(client: &tokio_postgres::Client) -> Result<Option<i32>> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_compat') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt("SELECT compat_version FROM schema_compat", &[])
        .await?;
    Ok(row.map(|r| r.get(0)))
}

fn check_compat(version: i32) -> Result<()> {
    if SUPPORTED_COMPAT.contains(&version) {
        Ok(())
    } else {
        Err(StoreError::Incompatible(format!(
            "database schema compatibility version {version} is outside the range this binary \
             supports ({}..={}); {}",
            SUPPORTED_COMPAT.start(),
            SUPPORTED_COMPAT.end(),
            if version > *SUPPORTED_COMPAT.end() {
                "the database was upgraded by a newer release: run that release or newer"
            } else {
                "the database is from an older release that this one cannot migrate"
            }
        )))
    }
}
