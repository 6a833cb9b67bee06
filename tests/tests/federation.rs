//! Inbound federation with a fake remote server (test code) against real
//! processes: joining, valid and broken PDUs, out-of-order arrival, soft
//! failure, and what every federation endpoint says to bad requests.

use std::time::Duration;

use serde_json::{Value, json};
use tessera_tests::client::timeline;
use tessera_tests::fake_remote::{FakeRemote, json_of};
use tessera_tests::{FederationSpec, Spec, TestCluster, TestUser};

fn federated(room_workers: usize) -> Spec {
    Spec {
        room_workers,
        federation: Some(FederationSpec::default()),
        ..Spec::default()
    }
}

/// Sync (bounded) until `done` holds for the accumulated timeline of `room`.
async fn sync_until(
    cluster: &TestCluster,
    user: &TestUser,
    room: &str,
    since: &mut String,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let api = cluster.api();
    let mut seen = Vec::new();
    for _ in 0..40 {
        let sync = api.sync(user, Some(since), 1000).await;
        *since = sync["next_batch"].as_str().unwrap().to_owned();
        seen.extend(timeline(&sync, room));
        if done(&seen) {
            return seen;
        }
    }
    panic!("timed out; saw {}", Value::Array(seen));
}

fn bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_server_joins_and_talks() {
    let cluster = TestCluster::start(federated(1)).await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let room = api
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let mut since = api.initial_token(&alice).await;

    let remote = FakeRemote::start(&cluster.server_name).await;
    let bob = remote.user("bob");
    remote.join(&room, &bob).await.expect("join");
    let message = remote.build(
        &room,
        &bob,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "hello from afar" }),
    );
    let (status, answer) = remote.send("txn1", &[json_of(&message)], &[]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["pdus"][message.event_id().as_str()],
        json!({}),
        "{answer}"
    );

    let seen = sync_until(&cluster, &alice, &room, &mut since, |events| {
        bodies(events).contains(&"hello from afar".to_owned())
    })
    .await;
    assert!(
        seen.iter()
            .any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str()),
        "the remote join is in the timeline"
    );
    // The same transaction again changes nothing.
    let (status, again) = remote.send("txn1", &[json_of(&message)], &[]).await;
    assert_eq!((status, &again), (200, &answer));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sync = api.sync(&alice, Some(&since), 0).await;
    assert!(bodies(&timeline(&sync, &room)).is_empty(), "nothing twice");
}
