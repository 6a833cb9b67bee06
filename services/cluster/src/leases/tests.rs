//! The lease loop against a real Postgres: workers joining and leaving split
//! the partitions between them without ever sharing one.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tessera_storage::{Store, test_util};

use super::*;

fn manager(store: &Store, id: &str, ttl_ms: u64) -> (LeaseManager, Arc<Ownership>) {
    let ownership = Ownership::new();
    let config = LeaseConfig {
        worker_id: id.to_owned(),
        advertise_addr: format!("{id}:1"),
        ttl: Duration::from_millis(ttl_ms),
        interval: Duration::from_millis(ttl_ms / 4),
    };
    let (manager, _events) = LeaseManager::new(store.clone(), config, Arc::clone(&ownership));
    (manager, ownership)
}

fn owned(o: &Ownership) -> HashSet<u32> {
    o.held().into_iter().map(|(p, _)| p).collect()
}

async fn settle(managers: &[&LeaseManager]) {
    // Two rounds each: the first lets everyone heartbeat and release, the second claim.
    for _ in 0..3 {
        for m in managers {
            m.tick().await.unwrap();
        }
    }
}

#[tokio::test]
async fn workers_split_partitions_and_hand_over_on_leave() {
    let store = test_util::store().await;
    store.init_cluster("example.org", 32).await.unwrap();
    let (a, oa) = manager(&store, "a", 10_000);
    a.tick().await.unwrap();
    assert_eq!(oa.count(), 32, "a lone worker owns everything");

    let (b, ob) = manager(&store, "b", 10_000);
    settle(&[&a, &b]).await;
    let (sa, sb) = (owned(&oa), owned(&ob));
    assert!(sa.is_disjoint(&sb), "no partition has two owners");
    assert_eq!(sa.len() + sb.len(), 32);
    assert!(!sb.is_empty() && !sa.is_empty());

    // The epochs we hold are the ones in the database.
    for lease in store.leases().await.unwrap() {
        let holder = if sa.contains(&lease.partition) {
            &oa
        } else {
            &ob
        };
        assert_eq!(holder.epoch(lease.partition), Some(lease.epoch));
    }

    // a leaves cleanly: b takes everything over without waiting for expiry.
    a.hand_over_all().await;
    assert_eq!(oa.count(), 0);
    b.tick().await.unwrap();
    assert_eq!(ob.count(), 32);
}

#[tokio::test]
async fn a_dead_worker_loses_its_partitions_after_the_ttl() {
    let store = test_util::store().await;
    store.init_cluster("example.org", 8).await.unwrap();
    let (a, oa) = manager(&store, "a", 400);
    a.tick().await.unwrap();
    assert_eq!(oa.count(), 8);
    // a stops ticking (as if SIGKILLed). b cannot take anything until a's leases expire.
    let (b, ob) = manager(&store, "b", 400);
    b.tick().await.unwrap();
    let early = ob.count();
    assert!(early < 8, "b must not take live leases");
    tokio::time::sleep(Duration::from_millis(600)).await;
    b.tick().await.unwrap();
    assert_eq!(ob.count(), 8);
    // a's next round finds its leases gone and drops them.
    a.tick().await.unwrap();
    assert!(owned(&oa).is_disjoint(&owned(&ob)));
    assert_eq!(oa.count(), 0);
}
