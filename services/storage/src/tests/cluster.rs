use std::time::Duration;

use crate::test_util;

const TTL: Duration = Duration::from_secs(10);

#[tokio::test]
async fn cluster_settings_are_fixed_at_creation() {
    let store = test_util::store().await;
    store.init_cluster("example.org", 16).await.unwrap();
    store.init_cluster("example.org", 16).await.unwrap();
    let err = store.init_cluster("example.org", 32).await.unwrap_err();
    assert!(
        err.to_string().contains("created with 16 partitions"),
        "{err}"
    );
    let err = store.init_cluster("other.org", 16).await.unwrap_err();
    assert!(err.to_string().contains("server_name"), "{err}");
    assert_eq!(store.leases().await.unwrap().len(), 16);
}

#[tokio::test]
async fn leases_are_exclusive_and_epochs_grow() {
    let store = test_util::store().await;
    store.init_cluster("example.org", 4).await.unwrap();
    store
        .heartbeat_worker("a", "127.0.0.1:1", false)
        .await
        .unwrap();
    store
        .heartbeat_worker("b", "127.0.0.1:2", false)
        .await
        .unwrap();
    let epoch = store
        .claim_partition(0, "a", TTL)
        .await
        .unwrap()
        .expect("free partition");
    assert_eq!(
        store.claim_partition(0, "b", TTL).await.unwrap(),
        None,
        "held by a"
    );
    assert_eq!(
        store.renew_leases("a", &[(0, epoch)], TTL).await.unwrap(),
        vec![0]
    );
    assert_eq!(
        store.renew_leases("b", &[(0, epoch)], TTL).await.unwrap(),
        Vec::<u32>::new()
    );
    let owner = store.partition_owner(0).await.unwrap().unwrap();
    assert_eq!(
        (
            owner.worker_id.as_str(),
            owner.grpc_addr.as_str(),
            owner.epoch
        ),
        ("a", "127.0.0.1:1", epoch)
    );

    assert!(store.release_partition(0, "a", epoch).await.unwrap());
    let epoch_b = store.claim_partition(0, "b", TTL).await.unwrap().unwrap();
    assert!(epoch_b > epoch);
    assert!(
        !store.release_partition(0, "a", epoch).await.unwrap(),
        "a no longer owns it"
    );

    // An expired lease can be taken over.
    let e1 = store
        .claim_partition(1, "a", Duration::from_millis(1))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let e2 = store.claim_partition(1, "b", TTL).await.unwrap().unwrap();
    assert!(e2 > e1);
    assert!(
        store
            .renew_leases("a", &[(1, e1)], TTL)
            .await
            .unwrap()
            .is_empty()
    );

    let active = store.active_workers(TTL).await.unwrap();
    assert_eq!(active.len(), 2);
    store
        .heartbeat_worker("a", "127.0.0.1:1", true)
        .await
        .unwrap();
    let active = store.active_workers(TTL).await.unwrap();
    assert_eq!(
        active
            .iter()
            .map(|w| w.worker_id.as_str())
            .collect::<Vec<_>>(),
        vec!["b"],
        "draining workers take no partitions"
    );
}

/// While a persist holds one partition's lease row (it takes its positions
/// there until it commits), renewing the worker's leases neither waits for
/// it to renew the others nor holds their rows meanwhile: another
/// partition's persist goes on. The held one is renewed once the persist
/// commits.
#[tokio::test]
async fn renewing_leases_does_not_hold_other_partitions_behind_a_busy_one() {
    let store = test_util::store().await;
    store.init_cluster("example.org", 4).await.unwrap();
    let mut held = Vec::new();
    for partition in 0..3 {
        let epoch = store
            .claim_partition(partition, "a", TTL)
            .await
            .unwrap()
            .unwrap();
        held.push((partition, epoch));
    }
    // A persist of partition 1 under way.
    let mut busy = store.client().await.unwrap();
    let persist = busy.transaction().await.unwrap();
    persist
        .execute(
            "UPDATE partition_leases SET next_pos = next_pos + 1 WHERE partition = 1",
            &[],
        )
        .await
        .unwrap();

    let other = store.client().await.unwrap();
    other
        .batch_execute("SET lock_timeout = '5s'")
        .await
        .unwrap();
    let before: std::time::SystemTime = other
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0);
    let renewal = tokio::spawn({
        let (store, held) = (store.clone(), held.clone());
        async move { store.renew_leases("a", &held, TTL).await.unwrap() }
    });
    // Partitions 0 and 2 are renewed, and free for their own persists, while
    // partition 1's persist is still open (the old single statement held
    // them: this update then waited for the lock until lock_timeout).
    let mut renewed_others = false;
    for _ in 0..100 {
        // Renewed: expiring a whole TTL after `before` (claimed: earlier).
        let row = other
            .query_one(
                "SELECT count(*) FROM partition_leases
                 WHERE partition IN (0, 2) AND expires_at >= $1::timestamptz + interval '10 seconds'",
                &[&before],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) == 2 {
            renewed_others = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(renewed_others, "partitions 0 and 2 renewed while 1 is busy");
    for partition in [0, 2] {
        other
            .execute(
                "UPDATE partition_leases SET next_pos = next_pos + 1 WHERE partition = $1",
                &[&partition],
            )
            .await
            .expect("another partition's persist does not wait for the renewal");
    }
    assert!(!renewal.is_finished(), "partition 1 waits for its persist");
    persist.commit().await.unwrap();
    let mut renewed = renewal.await.unwrap();
    renewed.sort();
    assert_eq!(renewed, [0, 1, 2]);
}
