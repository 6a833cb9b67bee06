//! Online scaling of room-workers under load, with real processes: while
//! clients keep sending, room-workers go 1 → 3 → 1 (two started, then those
//! two stopped with SIGTERM, as a Deployment scaled up and down would). No
//! acknowledged event may be lost, duplicated or reordered, and nothing else
//! is restarted. The figures are printed for the issue's note.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tessera_tests::client::{Api, enc};
use tessera_tests::{Spec, TestCluster, TestUser};

/// Concurrent senders; each sends one message at a time, round-robin over its
/// own two rooms, until the scaling is over (at most MAX_PER_SENDER).
const SENDERS: usize = 4;
const MAX_PER_SENDER: usize = 1500;

/// Send one message, retrying (same transaction ID, so at most one event)
/// while the cluster answers 5xx, as a real client would. Returns the event ID.
async fn send(api: &Api, user: &TestUser, room: &str, txn: &str, body: &str) -> (String, usize) {
    let path = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
        enc(room)
    );
    let mut retries = 0;
    loop {
        let (status, value) = api
            .call(
                Method::PUT,
                &path,
                Some(&user.token),
                Some(json!({ "msgtype": "m.text", "body": body })),
            )
            .await;
        if status == 200 {
            return (value["event_id"].as_str().unwrap().to_owned(), retries);
        }
        assert!(status >= 500, "{body}: {status} {value}");
        retries += 1;
        assert!(retries < 20, "{body}: still {status} after 20 tries");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Acknowledged (event ID, body) per room, in acknowledgement order.
type Acked = HashMap<String, Vec<(String, String)>>;

/// Partitions whose owner differs between two snapshots of the lease table.
fn moved(before: &HashMap<u32, Option<String>>, after: &HashMap<u32, Option<String>>) -> usize {
    after
        .iter()
        .filter(|(p, owner)| before.get(p) != Some(owner))
        .count()
}

async fn lease_owners(cluster: &TestCluster) -> HashMap<u32, Option<String>> {
    let store = cluster.store().await;
    store
        .leases()
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.partition, l.owner))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn room_workers_scale_1_3_1_under_load_without_losing_duplicating_or_reordering() {
    let mut cluster = TestCluster::start(Spec {
        room_workers: 1,
        partitions: 64,
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let mut rooms = Vec::new();
    for _ in 0..SENDERS * 2 {
        rooms.push(api.create_room(&alice, json!({})).await);
    }
    let since = api.initial_token(&alice).await;
    let others_before: Vec<u32> = ["client-api", "sync-worker-0"]
        .iter()
        .map(|n| cluster.pid(n))
        .collect();

    // The load.
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let retries: Arc<Mutex<usize>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (api, alice, acked, retries, stop) = (
            api.clone(),
            alice.clone(),
            acked.clone(),
            retries.clone(),
            stop.clone(),
        );
        let my_rooms = [rooms[2 * s].clone(), rooms[2 * s + 1].clone()];
        senders.push(tokio::spawn(async move {
            for i in 0..MAX_PER_SENDER {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return i;
                }
                let room = &my_rooms[i % 2];
                let body = format!("s{s}-{i}");
                let (event_id, tries) = send(&api, &alice, room, &format!("t{s}-{i}"), &body).await;
                *retries.lock().unwrap() += tries;
                acked
                    .lock()
                    .unwrap()
                    .entry(room.clone())
                    .or_default()
                    .push((event_id, body));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            MAX_PER_SENDER
        }));
    }

    // 1 → 3 → 1 while the load runs.
    let start = lease_owners(&cluster).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = cluster.add_room_worker().await;
    let third = cluster.add_room_worker().await;
    cluster.wait_balanced().await;
    let three = lease_owners(&cluster).await;
    let owners = cluster.owners().await;
    assert_eq!(owners.len(), 3, "three workers own partitions: {owners:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for worker in [&second, &third] {
        let status = cluster.stop(worker).await;
        assert!(
            status.success(),
            "{worker} exits cleanly on SIGTERM: {status}"
        );
    }
    cluster.wait_balanced().await;
    let one = lease_owners(&cluster).await;
    let moved_up = moved(&start, &three);
    let moved_down = moved(&three, &one);
    assert!(
        moved_up > 0 && moved_down == moved_up,
        "{moved_up} up, {moved_down} down"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for sender in senders {
        sent += sender.await.unwrap();
    }

    // Everything acknowledged arrives through /sync exactly once, in order.
    let acked = acked.lock().unwrap().clone();
    let wanted: usize = acked.values().map(Vec::len).sum();
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut since = since;
    for _ in 0..60 {
        let filter = enc(r#"{"room":{"timeline":{"limit":500}}}"#);
        let (status, sync) = api
            .call(
                Method::GET,
                &format!("/_matrix/client/v3/sync?timeout=1000&since={since}&filter={filter}"),
                Some(&alice.token),
                None,
            )
            .await;
        assert_eq!(status, 200, "{sync}");
        since = sync["next_batch"].as_str().unwrap().to_owned();
        for (room, joined) in sync["rooms"]["join"].as_object().into_iter().flatten() {
            let events = joined["timeline"]["events"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert_ne!(joined["timeline"]["limited"], json!(true), "gap in {room}");
            seen.entry(room.clone()).or_default().extend(
                events
                    .iter()
                    .filter(|e| e["type"] == "m.room.message")
                    .map(|e: &Value| e["event_id"].as_str().unwrap().to_owned()),
            );
        }
        if seen.values().map(Vec::len).sum::<usize>() >= wanted {
            break;
        }
    }
    let mut duplicates = 0;
    let mut reorders = 0;
    let mut lost = 0;
    for (room, sent) in &acked {
        let got = seen.get(room).cloned().unwrap_or_default();
        let unique: HashSet<&String> = got.iter().collect();
        duplicates += got.len() - unique.len();
        let sent_ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
        lost += sent_ids.iter().filter(|id| !unique.contains(id)).count();
        let got_sent_order: Vec<&String> = got.iter().filter(|id| sent_ids.contains(id)).collect();
        reorders += got_sent_order
            .iter()
            .zip(sent_ids.iter())
            .filter(|(a, b)| **a != *b)
            .count();
        // The room's stored history agrees with what /sync delivered.
        let bodies = api.message_bodies(&alice, room).await;
        let sent_bodies: Vec<String> = sent.iter().map(|(_, b)| b.clone()).collect();
        assert_eq!(bodies, sent_bodies, "history of {room}");
    }
    let others_after: Vec<u32> = ["client-api", "sync-worker-0"]
        .iter()
        .map(|n| cluster.pid(n))
        .collect();
    eprintln!(
        "scaling 1 -> 3 -> 1 under load: {} messages sent, {wanted} acknowledged ({} retried \
         sends), {} received through /sync, {duplicates} duplicates, {reorders} out of order, \
         {lost} lost; partitions moved: {moved_up} on scale-up, {moved_down} on scale-down \
         (of {})",
        sent,
        *retries.lock().unwrap(),
        seen.values().map(Vec::len).sum::<usize>(),
        start.len(),
    );
    assert_eq!(wanted, sent, "every send was acknowledged");
    assert_eq!((lost, duplicates, reorders), (0, 0, 0));
    assert_eq!(others_before, others_after, "no other role restarted");
}
