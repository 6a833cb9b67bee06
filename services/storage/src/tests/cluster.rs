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
