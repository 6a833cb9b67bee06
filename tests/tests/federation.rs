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

/// Whether an event is stored as rejected (and so never shown).
async fn stored_flags(cluster: &TestCluster, event_id: &str) -> Option<(bool, bool)> {
    let (client, connection) = tokio_postgres::connect(&cluster.db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_opt(
            "SELECT rejected, soft_failed FROM events WHERE event_id = $1",
            &[&event_id],
        )
        .await
        .unwrap();
    row.map(|r| (r.get(0), r.get(1)))
}

async fn wait_stored(cluster: &TestCluster, event_id: &str) -> (bool, bool) {
    for _ in 0..100 {
        if let Some(flags) = stored_flags(cluster, event_id).await {
            return flags;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{event_id} was never stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_pdus_are_dropped_redacted_or_rejected() {
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

    // A bad signature: dropped, with an error for that PDU.
    let forged = remote.build_unchecked(
        &room,
        &bob,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "forged" }),
    );
    let mut forged_json = json_of(&forged);
    let sig = forged_json["signatures"][remote.server_name.as_str()]
        .as_object_mut()
        .unwrap();
    let key = sig.keys().next().unwrap().clone();
    sig.insert(key, json!("AAAA".repeat(21) + "AA"));
    // A bad content hash: the body changed after signing. Kept, redacted.
    let tampered = remote.build_unchecked(
        &room,
        &bob,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "original" }),
    );
    let mut tampered_json = json_of(&tampered);
    tampered_json["content"]["body"] = json!("tampered");
    // Oversized: over 65,536 bytes. Dropped.
    let mut huge = json_of(&remote.build_unchecked(
        &room,
        &bob,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "big" }),
    ));
    huge["content"]["padding"] = json!("x".repeat(70_000));
    // Fails the auth rules: a server that never joined speaks. Rejected.
    let mallory = remote.user("mallory");
    let intruder = remote.build_unchecked(
        &room,
        &mallory,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "let me in" }),
    );
    // Fails the auth rules: Bob (power 0) renames the room. Rejected.
    let rename = remote.build_unchecked(
        &room,
        &bob,
        "m.room.name",
        Some(""),
        json!({ "name": "mine now" }),
    );
    // For a room this server is not in: dropped.
    let mut elsewhere = json_of(&remote.build_unchecked(
        &room,
        &bob,
        "m.room.message",
        None,
        json!({ "body": "x" }),
    ));
    elsewhere["room_id"] = json!("!unknown:elsewhere.example");

    let (status, answer) = remote
        .send(
            "broken",
            &[
                forged_json,
                tampered_json,
                huge,
                json_of(&intruder),
                json_of(&rename),
                elsewhere,
            ],
            &[],
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let result = |id: &str| answer["pdus"][id].clone();
    assert!(
        result(forged.event_id().as_str())["error"]
            .as_str()
            .is_some_and(|e| e.contains("signature")),
        "{answer}"
    );
    assert!(
        answer["pdus"]
            .as_object()
            .unwrap()
            .values()
            .filter(|v| v.get("error").is_some())
            .count()
            >= 3,
        "forged, huge and elsewhere: {answer}"
    );
    assert!(
        answer["pdus"]
            .as_object()
            .unwrap()
            .values()
            .any(|v| v["error"].as_str().is_some_and(|e| e.contains("not known"))),
        "{answer}"
    );

    // The rejected ones are stored as rejected.
    assert_eq!(
        wait_stored(&cluster, intruder.event_id().as_str()).await,
        (true, false)
    );
    assert_eq!(
        wait_stored(&cluster, rename.event_id().as_str()).await,
        (true, false)
    );
    // The tampered one arrives redacted: its content is gone for clients.
    let seen = sync_until(&cluster, &alice, &room, &mut since, |events| {
        events
            .iter()
            .any(|e| e["type"] == "m.room.message" && e["sender"] == bob.as_str())
    })
    .await;
    let shown: Vec<&Value> = seen
        .iter()
        .filter(|e| e["sender"] == bob.as_str() && e["type"] == "m.room.message")
        .collect();
    assert_eq!(shown.len(), 1, "only the redacted one is shown: {shown:?}");
    assert_eq!(shown[0]["content"], json!({}));
    assert!(
        !seen
            .iter()
            .any(|e| e["content"]["body"] == "let me in" || e["content"]["name"] == "mine now")
    );
    assert!(
        stored_flags(&cluster, forged.event_id().as_str())
            .await
            .is_none(),
        "dropped, never stored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pdus_arriving_before_their_parents_wait_for_them() {
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
    let chain: Vec<_> = (0..6)
        .map(|i| {
            remote.build(
                &room,
                &bob,
                "m.room.message",
                None,
                json!({ "msgtype": "m.text", "body": format!("m{i}") }),
            )
        })
        .collect();
    // The second half first, then the first half in another transaction.
    let late: Vec<Value> = chain[3..].iter().map(|p| json_of(p)).collect();
    let early: Vec<Value> = chain[..3].iter().map(|p| json_of(p)).collect();
    assert_eq!(remote.send("late", &late, &[]).await.0, 200);
    assert_eq!(remote.send("early", &early, &[]).await.0, 200);
    let seen = sync_until(&cluster, &alice, &room, &mut since, |events| {
        bodies(events).len() == 6
    })
    .await;
    assert_eq!(
        bodies(&seen),
        (0..6).map(|i| format!("m{i}")).collect::<Vec<_>>(),
        "in order"
    );
    assert_eq!(
        remote.requests_matching("get_missing_events"),
        0,
        "what was on its way was waited for, not fetched"
    );
    assert_eq!(remote.requests_matching("/event/"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_parents_are_fetched_from_the_origin() {
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
    let chain: Vec<_> = (0..4)
        .map(|i| {
            remote.build(
                &room,
                &bob,
                "m.room.message",
                None,
                json!({ "msgtype": "m.text", "body": format!("g{i}") }),
            )
        })
        .collect();
    // Only the last one is ever sent: the rest must be fetched.
    assert_eq!(
        remote.send("only-last", &[json_of(&chain[3])], &[]).await.0,
        200
    );
    let seen = sync_until(&cluster, &alice, &room, &mut since, |events| {
        bodies(events).len() == 4
    })
    .await;
    assert_eq!(bodies(&seen), vec!["g0", "g1", "g2", "g3"]);
    assert!(remote.requests_matching("get_missing_events") >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_the_current_state_forbids_are_soft_failed() {
    let cluster = TestCluster::start(federated(1)).await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let room = api
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let remote = FakeRemote::start(&cluster.server_name).await;
    let bob = remote.user("bob");
    remote.join(&room, &bob).await.expect("join");
    // Alice bans Bob here; the remote does not hear of it and Bob keeps talking
    // on top of what it knows. The state before his message allows it; the
    // current state does not.
    api.ok(
        reqwest::Method::POST,
        &format!(
            "/_matrix/client/v3/rooms/{}/ban",
            tessera_tests::client::enc(&room)
        ),
        &alice,
        Some(json!({ "user_id": bob.as_str() })),
    )
    .await;
    let mut since = api.initial_token(&alice).await;
    let message = remote.build(
        &room,
        &bob,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "after the ban" }),
    );
    assert_eq!(
        remote.send("after-ban", &[json_of(&message)], &[]).await.0,
        200
    );
    assert_eq!(
        wait_stored(&cluster, message.event_id().as_str()).await,
        (false, true),
        "stored, soft-failed"
    );
    let sync = api.sync(&alice, Some(&since), 500).await;
    since = sync["next_batch"].as_str().unwrap().to_owned();
    assert!(!bodies(&timeline(&sync, &room)).contains(&"after the ban".to_owned()));
    let _ = since;
}
