//! `/sync` across real sync-workers: tokens any worker accepts, through worker
//! restarts and a Redis that loses everything; long-polls that wait.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::{Value, json};
use tessera_tests::client::timeline;
use tessera_tests::{Spec, TestCluster};

fn messages(sync: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(rooms) = sync["rooms"]["join"].as_object() {
        for (room, data) in rooms {
            for event in data["timeline"]["events"].as_array().into_iter().flatten() {
                if event["type"] == "m.room.message" {
                    out.push((
                        room.clone(),
                        event["content"]["body"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    ));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_survive_worker_switches_restarts_and_redis_loss() {
    let mut cluster = TestCluster::start(Spec {
        room_workers: 2,
        sync_workers: 2,
        partitions: 16,
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let bob = cluster.register("bob").await;
    let rooms = api.shared_rooms(&alice, &[&bob], 4).await;
    let mut token = api.sync_at(&cluster.sync_urls[0], &bob, None, 0).await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    let redis = redis::Client::open(cluster.redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();

    for round in 0..12 {
        for (r, room) in rooms.iter().enumerate() {
            if (round + r) % 3 == 0 {
                continue;
            }
            let body = format!("r{round}-{r}");
            api.send_text(&alice, room, &format!("t{round}-{r}"), &body)
                .await;
            sent.entry(room.clone()).or_default().push(body);
        }
        if round == 4 {
            cluster.restart_sync_worker(1).await;
        }
        if round == 7 {
            // Redis restarted empty: every stream of this cluster is gone.
            cluster.wipe_redis().await;
        }
        // Sync on alternating workers until each has delivered what was sent.
        let worker = &cluster.sync_urls[round % 2];
        let sync = api.sync_at(worker, &bob, Some(&token), 2000).await;
        token = sync["next_batch"].as_str().unwrap().to_owned();
        assert!(token.len() < 1024, "token of {} bytes", token.len());
        for (room, body) in messages(&sync) {
            seen.entry(room).or_default().push(body);
        }
    }
    // Drain: keep syncing (alternating) until nothing new arrives.
    for i in 0..6 {
        let sync = api
            .sync_at(&cluster.sync_urls[i % 2], &bob, Some(&token), 500)
            .await;
        token = sync["next_batch"].as_str().unwrap().to_owned();
        for (room, body) in messages(&sync) {
            seen.entry(room).or_default().push(body);
        }
    }
    for room in &rooms {
        assert_eq!(
            seen.get(room),
            sent.get(room),
            "room {room}: every message once, in order"
        );
    }

    // Removing the cluster (as the benchmarks do) leaves nothing behind.
    let pattern = format!("{}:*", cluster.redis_prefix);
    let streams: Vec<String> = conn.keys(&pattern).await.unwrap();
    assert!(!streams.is_empty(), "the cluster wrote no streams");
    cluster.remove().await;
    let left: Vec<String> = conn.keys(&pattern).await.unwrap();
    assert!(left.is_empty(), "Redis keys left: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn long_polls_wait_for_something_relevant() {
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let bob = cluster.register("bob").await;
    let alices_room = api.create_room(&alice, json!({})).await;
    let token = api.initial_token(&bob).await;

    // Activity in a room Bob is not in does not end his long-poll early.
    let waiting = {
        let (api, bob, token) = (api.clone(), bob.clone(), token.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let sync = api.sync(&bob, Some(&token), 1500).await;
            (started.elapsed(), sync)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.send_text(&alice, &alices_room, "x", "not for bob")
        .await;
    let (elapsed, sync) = waiting.await.unwrap();
    assert!(
        elapsed >= Duration::from_millis(1400),
        "returned after {elapsed:?}"
    );
    assert!(
        sync["rooms"]["join"].as_object().unwrap().is_empty(),
        "{sync}"
    );

    // An invite is for Bob: it ends the long-poll.
    let token = sync["next_batch"].as_str().unwrap().to_owned();
    let waiting = {
        let (api, bob) = (api.clone(), bob.clone());
        tokio::spawn(async move { api.sync(&bob, Some(&token), 30_000).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.invite(&alice, &alices_room, &bob.user_id).await;
    let sync = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(
        sync["rooms"]["invite"].get(&alices_room).is_some(),
        "{sync}"
    );
    assert!(timeline(&sync, &alices_room).is_empty());
}
