use std::time::Duration;

use crate::test_util;
use crate::{Store, StoreError};

#[tokio::test]
async fn concurrent_migrations_apply_once() {
    let url = test_util::create_database().await;
    let a = Store::connect(&url, 2, Duration::from_secs(5))
        .await
        .unwrap();
    let b = Store::connect(&url, 2, Duration::from_secs(5))
        .await
        .unwrap();
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    ra.unwrap();
    rb.unwrap();
    a.check_compatibility().await.unwrap();
}

#[tokio::test]
async fn refuses_an_unmigrated_database() {
    let url = test_util::create_database().await;
    let store = Store::connect(&url, 2, Duration::from_secs(5))
        .await
        .unwrap();
    let err = store.check_compatibility().await.unwrap_err();
    assert!(err.to_string().contains("no Tessera schema"), "{err}");
}

#[tokio::test]
async fn refuses_a_schema_from_a_newer_incompatible_release() {
    let store = test_util::store().await;
    store
        .client()
        .await
        .unwrap()
        .execute("UPDATE schema_compat SET compat_version = 99", &[])
        .await
        .unwrap();
    let err = store.check_compatibility().await.unwrap_err();
    assert!(matches!(err, StoreError::Incompatible(_)));
    assert!(
        err.to_string().contains("compatibility version 99"),
        "{err}"
    );
    // Migrating must not touch it either.
    assert!(store.migrate().await.is_err());
}

#[tokio::test]
async fn unreachable_database_is_a_clear_error() {
    let err = Store::connect(
        "postgres://root:pw@127.0.0.1:1/none",
        1,
        Duration::from_millis(200),
    )
    .await
    .err()
    .unwrap();
    let text = err.to_string();
    assert!(
        text.contains("cannot connect to the database at postgres://root:***@127.0.0.1:1/none"),
        "{text}"
    );
}
