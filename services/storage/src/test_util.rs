//! A fresh database per test: `tessera_t_<created, Unix seconds>_<random>`
//! on the server named by `TESSERA_TEST_DATABASE_URL` (default: local
//! Postgres as `root`), migrated and ready. Tests never share data. Test
//! databases older than [`LEFT_OVER_AFTER`] are dropped by the next test
//! process, so plain `cargo test` runs do not pile them up (`scripts/test`
//! drops its own at the end).

use std::time::Duration;

use rand::Rng;

use crate::Store;

/// Where test databases are created.
pub fn admin_url() -> String {
    std::env::var("TESSERA_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".to_owned())
}

/// A test database this old is left over from a run that did not clean up
/// (no test runs for so long).
pub const LEFT_OVER_AFTER: Duration = Duration::from_secs(6 * 3600);

/// A new empty database; returns its URL.
pub async fn create_database() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = format!("tessera_t_{now}_{:08x}", rand::thread_rng().r#gen::<u32>());
    let admin = admin_url();
    let client = admin_client()
        .await
        .unwrap_or_else(|e| panic!("tests need Postgres at {admin}: {e}"));
    static SWEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SWEPT.swap(true, std::sync::atomic::Ordering::Relaxed) {
        drop_left_over(&client, now).await;
    }
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("database URL {admin} has no database name"),
    }
}

/// Drop test databases created more than [`LEFT_OVER_AFTER`] before `now`
/// (those named by an older scheme, without a time, are left alone).
async fn drop_left_over(client: &tokio_postgres::Client, now: u64) {
    let Ok(rows) = client
        .query(
            "SELECT datname FROM pg_database WHERE datname ~ '^tessera_t_[0-9]+_[0-9a-f]+$'",
            &[],
        )
        .await
    else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let created = name
            .strip_prefix("tessera_t_")
            .and_then(|rest| rest.split('_').next()?.parse::<u64>().ok());
        if created.is_some_and(|created| created + LEFT_OVER_AFTER.as_secs() < now) {
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
}

/// Drop a database made by [`create_database`], closing its connections
/// (benchmarks clean up after themselves; `scripts/test` does it for tests).
pub async fn drop_database(url: &str) -> Result<(), tokio_postgres::Error> {
    let Some((_, name)) = url.rsplit_once('/') else {
        return Ok(());
    };
    let name = name.split('?').next().unwrap_or(name);
    if !name.starts_with("tessera_t_")
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Ok(());
    }
    admin_client()
        .await?
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
}

/// A connection to [`admin_url`], driven in the background.
pub async fn admin_client() -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A migrated store on a new database.
pub async fn store() -> Store {
    let url = create_database().await;
    let store = Store::connect(&url, 8, Duration::from_secs(5))
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    store
}
