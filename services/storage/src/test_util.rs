//! A fresh database per test: `tessera_t_<random>` on the server named by
//! `TESSERA_TEST_DATABASE_URL` (default: local Postgres as `root`), migrated and
//! ready. Tests never share data.

use std::time::Duration;

use rand::Rng;

use crate::Store;

/// Where test databases are created.
pub fn admin_url() -> String {
    std::env::var("TESSERA_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".to_owned())
}

/// A new empty database; returns its URL.
pub async fn create_database() -> String {
    let name = format!("tessera_t_{:016x}", rand::thread_rng().r#gen::<u64>());
    let admin = admin_url();
    let client = admin_client()
        .await
        .unwrap_or_else(|e| panic!("tests need Postgres at {admin}: {e}"));
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("database URL {admin} has no database name"),
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
