//! The pool's connections live on the runtime that opened it.

use std::time::Duration;

use crate::Store;
use crate::test_util;

/// A connection the pool makes for a task of another runtime must still be
/// driven by the pool's own runtime: here the other runtime is never run
/// again once it has made one, so a connection driven there would never
/// answer.
#[test]
fn connections_made_for_another_runtime_are_driven_by_the_pools_own() {
    let home = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let store = home.block_on(async {
        let url = test_util::create_database().await;
        Store::connect(&url, 2, Duration::from_secs(5))
            .await
            .unwrap()
    });

    // Another runtime takes both connections at once, so the pool makes its
    // second one there; then that runtime is never polled again.
    let other = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    other.block_on(async {
        let (a, b) = tokio::join!(store.client(), store.client());
        let (a, b) = (a.unwrap(), b.unwrap());
        a.simple_query("SELECT 1").await.unwrap();
        b.simple_query("SELECT 1").await.unwrap();
    });

    // Both connections answer on the home runtime. The bound only turns a
    // hang into a failure; it is not a measure of speed.
    home.block_on(async {
        let (a, b) = tokio::join!(store.client(), store.client());
        let (a, b) = (a.unwrap(), b.unwrap());
        let both = async {
            let (ra, rb) = tokio::join!(
                a.query_one("SELECT 1::int", &[]),
                b.query_one("SELECT 2::int", &[])
            );
            (ra.unwrap().get::<_, i32>(0), rb.unwrap().get::<_, i32>(0))
        };
        let answered = tokio::time::timeout(Duration::from_secs(30), both)
            .await
            .expect("a connection made for the other runtime never answered");
        assert_eq!(answered, (1, 2));
    });
    drop(other);
}

/// `warm` opens connections up to the number asked for, never past the
/// pool's size, and they stay open: Postgres sees that many backends on the
/// database.
#[tokio::test]
async fn warm_opens_connections_ahead_of_need() {
    let url = test_util::create_database().await;
    let store = Store::connect(&url, 4, Duration::from_secs(5))
        .await
        .unwrap();
    let database = url.rsplit_once('/').unwrap().1.to_owned();
    let backends = || async {
        let admin = test_util::admin_client().await.unwrap();
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                &[&database],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(backends().await, 1);
    store.warm(3).await;
    assert_eq!(backends().await, 3);
    store.warm(10).await;
    assert_eq!(backends().await, 4, "never more than the pool's size");
    drop(store);
    test_util::drop_database(&url).await.unwrap();
}

/// A lane's connections carry the lane in their application name, so that
/// `pg_stat_activity` tells them from the process's other pool; the name in
/// a database URL still wins.
#[tokio::test]
async fn a_lanes_connections_are_named_after_it() {
    let url = test_util::create_database().await;
    let name = |store: Store| async move {
        let client = store.client().await.unwrap();
        client
            .query_one("SELECT current_setting('application_name')", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    let plain = Store::connect(&url, 1, Duration::from_secs(5))
        .await
        .unwrap();
    let bulk = Store::connect_lane(&url, Some("bulk"), 1, Duration::from_secs(5))
        .await
        .unwrap();
    let plain = name(plain).await;
    assert!(plain.starts_with("tessera"), "{plain}");
    assert_eq!(name(bulk).await, format!("{plain}-bulk"));

    let separator = if url.contains('?') { '&' } else { '?' };
    let named = format!("{url}{separator}application_name=mine");
    let given = Store::connect_lane(&named, Some("bulk"), 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(name(given).await, "mine");
}
