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

/// A device whose only news is in a busy room is held back (here for a
/// minute); a message in another room ends the wait at once, and the answer
/// carries both rooms' news.
#[tokio::test(flavor = "multi_thread")]
async fn busy_room_news_waits_and_other_news_ends_the_wait() {
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        // Busy from 8 events a second: a room's creation (six
        // events) does not make it busy.
        sync_busy_room: Some((8, 60_000)),
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let busy = api.create_room(&alice, json!({})).await;
    let quiet = api.create_room(&alice, json!({})).await;
    let initial = api.initial_token(&alice).await;

    // The busy room gets messages as fast as they go for the whole test.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (api, alice, busy, stop) = (api.clone(), alice.clone(), busy.clone(), stop.clone());
        tokio::spawn(async move {
            for n in 0..5_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                api.send_text(&alice, &busy, &format!("b{n}"), &format!("busy {n}"))
                    .await;
            }
        })
    };
    let busy_seen = |sync: &Value| {
        messages(sync)
            .iter()
            .filter(|(room, _)| *room == busy)
            .count()
    };
    for _ in 0..100 {
        if busy_seen(&api.sync(&alice, Some(&initial), 0).await) >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waits = || async {
        cluster
            .metrics("sync-worker-0")
            .await
            .lines()
            .find(|l| l.starts_with("tessera_sync_busy_room_waits_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };

    // A long-poll from a current token: the busy room's next message wakes
    // it, and being the only news, holds it. (A message that woke it before
    // the room counted as busy answers it; then try again.)
    let mut held = None;
    for _ in 0..5 {
        let since = api.sync(&alice, Some(&initial), 0).await["next_batch"]
            .as_str()
            .unwrap()
            .to_owned();
        let before = waits().await;
        let waiting = {
            let (api, alice) = (api.clone(), alice.clone());
            tokio::spawn(async move { api.sync(&alice, Some(&since), 50_000).await })
        };
        for _ in 0..100 {
            if waits().await > before || waiting.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !waiting.is_finished() && waits().await > before {
            held = Some(waiting);
            break;
        }
    }
    let waiting = held.expect("the busy room's news alone never held a long-poll");
    assert!(!waiting.is_finished(), "answered while held");

    api.send_text(&alice, &quiet, "q", "quiet one").await;
    let sync = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the quiet room's message ended the wait")
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.await.unwrap();
    let got = messages(&sync);
    assert!(
        got.contains(&(quiet.clone(), "quiet one".to_owned())),
        "{got:?}"
    );
    assert!(
        busy_seen(&sync) >= 1,
        "the answer has the busy room's news too: {got:?}"
    );
}

/// A filtered `/sync` again until the room's timeline ends with a message
/// whose body is `last` (the sync-workers see a commit a moment after it is
/// acknowledged).
async fn filtered_sync_until(
    cluster: &TestCluster,
    user: &tessera_tests::client::TestUser,
    since: Option<&str>,
    filter: &Value,
    room: &str,
    last: &str,
) -> Value {
    for _ in 0..100 {
        let sync = cluster
            .api()
            .sync_filtered_at(&cluster.sync_urls[0], user, since, 0, Some(filter))
            .await;
        if timeline(&sync, room)
            .last()
            .is_some_and(|e| e["content"]["body"] == last)
        {
            return sync;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{last:?} never reached the end of {room}'s timeline");
}

/// The users whose member events a room's state section carries, sorted.
fn state_members(sync: &Value, room: &str) -> Vec<String> {
    let mut members: Vec<String> = sync["rooms"]["join"][room]["state"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().unwrap().to_owned())
        .collect();
    members.sort();
    members
}

#[tokio::test(flavor = "multi_thread")]
async fn lazy_loaded_members_are_the_timeline_senders() {
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let bob = cluster.register("bob").await;
    let room = api.public_room(&alice).await;
    let mut others = Vec::new();
    for n in 0..8 {
        let user = cluster.register(&format!("user{n}")).await;
        if n < 6 {
            api.join(&user, &room).await;
        }
        others.push(user);
    }
    api.join(&bob, &room).await;
    api.send_text(&others[1], &room, "a", "from user1").await;
    api.send_text(&others[2], &room, "b", "from user2").await;

    let lazy = json!({"room": {"timeline": {"limit": 2}, "state": {"lazy_load_members": true}}});
    let whole = json!({"room": {"timeline": {"limit": 2}}});
    let first = filtered_sync_until(&cluster, &bob, None, &lazy, &room, "from user2").await;
    let mut expected = vec![
        bob.user_id.clone(),
        others[1].user_id.clone(),
        others[2].user_id.clone(),
    ];
    expected.sort();
    assert_eq!(
        state_members(&first, &room),
        expected,
        "the senders and bob"
    );
    let state_types: Vec<&str> = first["rooms"]["join"][&room]["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    for kind in ["m.room.create", "m.room.power_levels", "m.room.join_rules"] {
        assert!(state_types.contains(&kind), "{kind} in {state_types:?}");
    }
    let summary = &first["rooms"]["join"][&room]["summary"];
    assert_eq!(summary["m.joined_member_count"], 8, "{summary}");
    // Without lazy loading, every member.
    let full = filtered_sync_until(&cluster, &bob, None, &whole, &room, "from user2").await;
    assert_eq!(state_members(&full, &room).len(), 8);

    // A gap: two users join and user5, a member from before, speaks three
    // times; the limited timeline's state has user5's member event (not
    // changed in the gap) and not the joins'.
    let token = first["next_batch"].as_str().unwrap().to_owned();
    api.join(&others[6], &room).await;
    api.join(&others[7], &room).await;
    for n in 0..3 {
        api.send_text(
            &others[5],
            &room,
            &format!("c{n}"),
            &format!("from user5 {n}"),
        )
        .await;
    }
    let gap = filtered_sync_until(&cluster, &bob, Some(&token), &lazy, &room, "from user5 2").await;
    assert_eq!(gap["rooms"]["join"][&room]["timeline"]["limited"], true);
    assert_eq!(state_members(&gap, &room), vec![others[5].user_id.clone()]);
    assert_eq!(
        gap["rooms"]["join"][&room]["summary"]["m.joined_member_count"],
        10
    );
    let gap_whole =
        filtered_sync_until(&cluster, &bob, Some(&token), &whole, &room, "from user5 2").await;
    let mut joined = vec![others[6].user_id.clone(), others[7].user_id.clone()];
    joined.sort();
    assert_eq!(state_members(&gap_whole, &room), joined);

    // No gap: the one sender's member event comes along.
    let token = gap["next_batch"].as_str().unwrap().to_owned();
    api.send_text(&others[0], &room, "d", "from user0").await;
    let next = filtered_sync_until(&cluster, &bob, Some(&token), &lazy, &room, "from user0").await;
    assert_eq!(next["rooms"]["join"][&room]["timeline"]["limited"], false);
    assert_eq!(state_members(&next, &room), vec![others[0].user_id.clone()]);
    let next_whole =
        filtered_sync_until(&cluster, &bob, Some(&token), &whole, &room, "from user0").await;
    assert_eq!(state_members(&next_whole, &room), Vec::<String>::new());
}
