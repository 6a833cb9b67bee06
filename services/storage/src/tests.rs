//! Storage tests against a real Postgres (one fresh database each).

mod cluster;
mod federation;
mod persist;
mod pool;
mod schema;

/// Run the part of a migration's SQL from `marker` on (what it does to the
/// rows already there), on a store whose schema is already migrated.
async fn run_migration_from(store: &crate::Store, migration: &str, marker: &str) {
    let start = migration
        .find(marker)
        .unwrap_or_else(|| panic!("the migration has no {marker:?}"));
    store
        .client()
        .await
        .unwrap()
        .batch_execute(&migration[start..])
        .await
        .unwrap();
}
