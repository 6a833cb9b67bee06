//! Inbound federation with a fake remote server (test code) against real
//! processes: joining, valid and broken PDUs, out-of-order arrival, soft
//! failure, and what every federation endpoint says to bad requests.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tessera_events::Pdu;
use tessera_events::ruma::{OwnedUserId, UserId};
use tessera_tests::client::{enc, timeline};
use tessera_tests::fake_remote::{FakeRemote, json_of};
use tessera_tests::{Api, FederationSpec, Spec, TestCluster, TestUser, stored_flags, wait_stored};

fn federated(room_workers: usize) -> Spec {
    Spec::federated(room_workers)
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

/// A cluster with one room-worker; alice's public room on it; bob, of a
/// fake remote server, joined to it.
struct Joined {
    cluster: TestCluster,
    api: Api,
    alice: TestUser,
    room: String,
    remote: Arc<FakeRemote>,
    bob: OwnedUserId,
}

async fn joined() -> Joined {
    let cluster = TestCluster::start(federated(1)).await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let room = api.public_room(&alice).await;
    let remote = FakeRemote::start(&cluster.server_name).await;
    let bob = remote.user("bob");
    remote.join(&room, &bob).await.expect("join");
    Joined {
        cluster,
        api,
        alice,
        room,
        remote,
        bob,
    }
}

/// Send one PDU in a transaction of its own and check that it was accepted;
/// the transaction's answer.
async fn send_accepted(remote: &FakeRemote, txn: &str, pdu: &tessera_events::Pdu) -> Value {
    let (status, answer) = remote.send(txn, &[json_of(pdu)], &[]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["pdus"][pdu.event_id().as_str()],
        json!({}),
        "{answer}"
    );
    answer
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_server_joins_and_talks() {
    let cluster = TestCluster::start(federated(1)).await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let room = api.public_room(&alice).await;
    let mut since = api.initial_token(&alice).await;

    let remote = FakeRemote::start(&cluster.server_name).await;
    let bob = remote.user("bob");
    remote.join(&room, &bob).await.expect("join");
    let loaded_after_join = metric(&cluster, "tessera_room_worker_events_loaded_total").await;
    let message = remote.text(&room, &bob, "hello from afar");
    // A receipt in a room the remote has no member in is not kept.
    let elsewhere = api.public_room(&alice).await;
    let read = json!({ "event_ids": [message.event_id().as_str()], "data": { "ts": 1 } });
    let receipt = json!({
        "edu_type": "m.receipt",
        "content": {
            room.as_str(): { "m.read": { bob.as_str(): read } },
            elsewhere.as_str(): { "m.read": { bob.as_str(): read } }
        }
    });
    let (status, answer) = remote
        .send("txn1", &[json_of(&message)], std::slice::from_ref(&receipt))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["pdus"][message.event_id().as_str()], json!({}));

    let seen = sync_until(&cluster, &alice, &room, &mut since, |events| {
        bodies(events).contains(&"hello from afar".to_owned())
    })
    .await;
    assert!(
        seen.iter()
            .any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str()),
        "the remote join is in the timeline"
    );
    // A quiet room's event, all of whose parents are here, is processed at
    // once rather than staged, from the room's state in memory.
    assert_eq!(
        metric(&cluster, "tessera_federation_pdus_direct_total").await,
        1.0
    );
    assert_eq!(
        metric(&cluster, "tessera_federation_pdus_staged_total").await,
        0.0
    );
    assert_eq!(
        metric(&cluster, "tessera_room_worker_events_loaded_total").await,
        loaded_after_join,
        "the event was checked and its room moved on without reading stored events back"
    );

    // The same transaction again, once its answer is recorded, changes
    // nothing: the same answer, no second event, the receipt kept once.
    let store = cluster.store().await;
    for _ in 0..100 {
        if store
            .federation_txn(remote.server_name.as_str(), "txn1")
            .await
            .unwrap()
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, again) = remote.send("txn1", &[json_of(&message)], &[receipt]).await;
    assert_eq!((status, &again), (200, &answer));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sync = api.sync(&alice, Some(&since), 0).await;
    assert!(bodies(&timeline(&sync, &room)).is_empty(), "nothing twice");
    assert_eq!(
        remote_receipts(&cluster, &room).await,
        [(bob.to_string(), json!([message.event_id().as_str()]))],
        "the receipt is kept as bob's one receipt in the room"
    );
    assert!(remote_receipts(&cluster, &elsewhere).await.is_empty());
}

/// The remote read receipts kept for a room: (user, event IDs).
async fn remote_receipts(cluster: &TestCluster, room: &str) -> Vec<(String, Value)> {
    cluster
        .db()
        .await
        .query(
            "SELECT user_id, event_ids FROM remote_receipts WHERE room_id = $1 ORDER BY user_id",
            &[&room],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Each EDU type is kept where its feature will read it, and only what the
/// origin may send: its own users' device list and signing key updates, its
/// own users' to-device messages for our devices, its own users' typing in
/// rooms it is in and presence; not another server's user's, nor an EDU
/// type no one handles.
#[tokio::test(flavor = "multi_thread")]
async fn edus_are_kept_where_they_belong() {
    let Joined {
        cluster,
        api,
        alice,
        room,
        remote,
        bob,
    } = joined().await;
    let elsewhere = api.public_room(&alice).await;
    let edu = |kind: &str, content: Value| json!({ "edu_type": kind, "content": content });
    let device = |user: &str, device: &str, stream_id: i64| {
        edu(
            "m.device_list_update",
            json!({ "user_id": user, "device_id": device, "stream_id": stream_id, "keys": {} }),
        )
    };
    let to_alice = |sender: &str, message_id: &str| {
        edu(
            "m.direct_to_device",
            json!({
                "sender": sender, "type": "m.room_key_request", "message_id": message_id,
                "messages": {
                    alice.user_id.as_str(): { "*": { "from": sender } },
                    "@nobody:elsewhere": { "*": { "from": sender } }
                }
            }),
        )
    };
    let typing = |room: &str, user: &str| {
        edu(
            "m.typing",
            json!({ "room_id": room, "user_id": user, "typing": true }),
        )
    };
    let edus = [
        device(bob.as_str(), "BOBPHONE", 2),
        device(bob.as_str(), "BOBPHONE", 1),
        device("@mallory:elsewhere", "M", 1),
        edu(
            "m.signing_key_update",
            json!({ "user_id": bob.as_str(), "master_key": { "user_id": bob.as_str() } }),
        ),
        to_alice(bob.as_str(), "m1"),
        to_alice("@mallory:elsewhere", "m2"),
        typing(&room, bob.as_str()),
        typing(&elsewhere, bob.as_str()),
        typing(&room, "@mallory:elsewhere"),
        edu(
            "m.presence",
            json!({ "push": [
                { "user_id": bob.as_str(), "presence": "online" },
                { "user_id": "@mallory:elsewhere", "presence": "online" }
            ]}),
        ),
        edu("com.example.nonsense", json!({ "big": "x".repeat(1000) })),
    ];
    for txn in ["e1", "e1-again"] {
        let (status, answer) = remote.send(txn, &[], &edus).await;
        assert_eq!(status, 200, "{answer}");
    }

    let db = cluster.db().await;
    let rows = |sql: &'static str| {
        let db = &db;
        async move {
            db.query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (0..r.len()).map(|i| r.get::<_, String>(i)).collect())
                .collect::<Vec<Vec<String>>>()
        }
    };
    assert_eq!(
        rows("SELECT user_id, device_id, stream_id::text FROM remote_device_list_updates").await,
        [[bob.as_str(), "BOBPHONE", "2"]]
    );
    assert_eq!(
        rows("SELECT user_id, keys->'master_key'->>'user_id' FROM remote_signing_keys").await,
        [[bob.as_str(), bob.as_str()]]
    );
    assert_eq!(
        rows("SELECT user_id, device_id, sender, message_id FROM to_device_inbox").await,
        [[
            alice.user_id.as_str(),
            alice.device_id.as_str(),
            bob.as_str(),
            "m1"
        ]],
        "once per device, however often sent; not from another server's user"
    );
    assert_eq!(
        rows(
            "SELECT txn_id, edu_type, coalesce(content->>'room_id', content->'push'->0->>'user_id')
             FROM received_edus ORDER BY id"
        )
        .await,
        [
            ["e1", "m.typing", room.as_str()],
            ["e1", "m.presence", bob.as_str()],
            ["e1-again", "m.typing", room.as_str()],
            ["e1-again", "m.presence", bob.as_str()]
        ],
        "typing and presence as they came, once per transaction; nothing of \
         mallory's, nor in a room the remote is not in; the unknown type dropped"
    );
    let push: Value = db
        .query_one(
            "SELECT content->'push' FROM received_edus WHERE edu_type = 'm.presence' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        push,
        json!([{ "user_id": bob.as_str(), "presence": "online" }]),
        "mallory's part of the presence EDU dropped"
    );
}

/// A message from the remote whose signature is replaced by a wrong one:
/// the event (its ID is unchanged) and the JSON to send.
fn forged_message(
    remote: &FakeRemote,
    room: &str,
    sender: &UserId,
    body: &str,
) -> (Arc<Pdu>, Value) {
    let forged = remote.text_unchecked(room, sender, body);
    let mut forged_json = json_of(&forged);
    let signatures = forged_json["signatures"][remote.server_name.as_str()]
        .as_object_mut()
        .unwrap();
    let key = signatures.keys().next().unwrap().clone();
    signatures.insert(key, json!("AAAA".repeat(21) + "AA"));
    (forged, forged_json)
}

/// A counter of the cluster's only room-worker (0 before its first increment).
async fn metric(cluster: &TestCluster, name: &str) -> f64 {
    let metrics = cluster.metrics("room-worker-0").await;
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// How many EDUs of `edu_type` the receivers have kept.
async fn received_edus(cluster: &TestCluster, edu_type: &str) -> i64 {
    cluster
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM received_edus WHERE edu_type = $1",
            &[&edu_type],
        )
        .await
        .unwrap()
        .get(0)
}

/// How many to-device messages wait for our devices.
async fn to_device_messages(cluster: &TestCluster) -> i64 {
    cluster
        .db()
        .await
        .query_one("SELECT count(*) FROM to_device_inbox", &[])
        .await
        .unwrap()
        .get(0)
}

/// A server the room's `m.room.server_acl` denies is refused, per PDU, in
/// the transaction's answer; nothing it sent reaches the room; once refused,
/// its PDUs for the room are refused before their signatures are checked.
/// Lifting the ACL admits it again at once.
#[tokio::test(flavor = "multi_thread")]
async fn pdus_from_a_server_the_acl_denies_are_dropped() {
    let Joined {
        cluster,
        api,
        alice,
        room,
        remote,
        bob,
    } = joined().await;
    let mut since = api.initial_token(&alice).await;

    // Both servers are on 127.0.0.1; the ACL is only checked for what
    // arrives over federation, so alice's own server is unaffected.
    let acl_path = format!(
        "/_matrix/client/v3/rooms/{}/state/m.room.server_acl/",
        enc(&room)
    );
    let acl = |deny: Vec<&str>| json!({ "allow": ["*"], "deny": deny, "allow_ip_literals": true });
    api.ok(
        reqwest::Method::PUT,
        &acl_path,
        &alice,
        Some(acl(vec!["127.0.0.1"])),
    )
    .await;
    // Not applied to the remote's own view of the room, so the next message
    // does not build on it.
    let denied = remote.text_unchecked(&room, &bob, "denied");
    let (status, answer) = remote.send("acl1", &[json_of(&denied)], &[]).await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["pdus"][denied.event_id().as_str()]["error"]
            .as_str()
            .is_some_and(|e| e.contains("server ACL")),
        "{answer}"
    );
    // Once its owner has refused the server, the receiver refuses its next
    // PDUs for that room before checking their signatures: a forged one is
    // answered with the ACL, not with a bad signature.
    let (forged, forged_json) = forged_message(&remote, &room, &bob, "forged while denied");
    let (status, answer) = remote.send("acl1b", &[forged_json], &[]).await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["pdus"][forged.event_id().as_str()]["error"]
            .as_str()
            .is_some_and(|e| e.contains("server ACL")),
        "{answer}"
    );

    api.ok(reqwest::Method::PUT, &acl_path, &alice, Some(acl(vec![])))
        .await;
    let admitted = remote.text(&room, &bob, "admitted");
    send_accepted(&remote, "acl2", &admitted).await;
    let seen = sync_until(&cluster, &alice, &room, &mut since, |events| {
        bodies(events).contains(&"admitted".to_owned())
    })
    .await;
    assert!(
        !bodies(&seen).contains(&"denied".to_owned()),
        "the denied message never reaches the room"
    );
    assert!(
        stored_flags(&cluster, denied.event_id().as_str())
            .await
            .is_none()
    );
}

/// Remote state events, each built on the room's head and each in a turn of
/// its own, move the room's state one slot at a time: every one is in the
/// room's current state, and their state groups form one chain of deltas
/// across turns (a turn once restarted the chain at the room's group, so no
/// snapshot was ever written and reading a group walked every delta).
#[tokio::test(flavor = "multi_thread")]
async fn state_events_one_turn_each_extend_one_chain_of_state_groups() {
    let Joined {
        cluster,
        room,
        remote,
        bob,
        ..
    } = joined().await;
    let joins = remote.member_joins(&room, 3);
    for (i, join) in joins.iter().enumerate() {
        send_accepted(&remote, &format!("join-{i}"), join).await;
        assert_eq!(
            wait_stored(&cluster, join.event_id().as_str()).await,
            (false, false)
        );
    }
    let message = remote.text(&room, &bob, "after the joins");
    send_accepted(&remote, "after", &message).await;
    wait_stored(&cluster, message.event_id().as_str()).await;

    let db = cluster.db().await;
    let mut chain = Vec::new();
    for join in &joins {
        let row = db
            .query_one(
                "SELECT g.parent, g.chain_length FROM events e \
                 JOIN state_groups g ON g.id = e.state_group WHERE e.event_id = $1",
                &[&join.event_id().as_str()],
            )
            .await
            .unwrap();
        chain.push((row.get::<_, Option<String>>(0), row.get::<_, i32>(1)));
    }
    for i in 1..chain.len() {
        assert_eq!(
            chain[i].0.as_deref(),
            Some(joins[i - 1].event_id().as_str()),
            "each join's group is a delta on the one before: {chain:?}"
        );
        assert_eq!(chain[i].1, chain[i - 1].1 + 1, "{chain:?}");
    }
    let message_group: Option<String> = db
        .query_one(
            "SELECT state_group FROM events WHERE event_id = $1",
            &[&message.event_id().as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        message_group.as_deref(),
        Some(joins[2].event_id().as_str()),
        "a message leaves the state where the last join put it"
    );
    for join in &joins {
        let current: Option<String> = db
            .query_opt(
                "SELECT event_id FROM room_state WHERE room_id = $1 AND type = 'm.room.member' \
                 AND state_key = $2",
                &[&room.as_str(), &join.state_key().unwrap()],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        assert_eq!(current.as_deref(), Some(join.event_id().as_str()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_pdus_are_dropped_redacted_or_rejected() {
    let Joined {
        cluster,
        api,
        alice,
        room,
        remote,
        bob,
    } = joined().await;
    let mut since = api.initial_token(&alice).await;

    // A bad signature: dropped, with an error for that PDU.
    let (forged, forged_json) = forged_message(&remote, &room, &bob, "forged");
    // A bad content hash: the body changed after signing. Kept, redacted.
    let tampered = remote.text_unchecked(&room, &bob, "original");
    let mut tampered_json = json_of(&tampered);
    tampered_json["content"]["body"] = json!("tampered");
    // Oversized: over 65,536 bytes. Dropped.
    let mut huge = json_of(&remote.text_unchecked(&room, &bob, "big"));
    huge["content"]["padding"] = json!("x".repeat(70_000));
    // Fails the auth rules: a server that never joined speaks. Rejected.
    let mallory = remote.user("mallory");
    let intruder = remote.text_unchecked(&room, &mallory, "let me in");
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
    // Rejected events are never served to other servers: not by /event,
    // not in /backfill, not in /get_missing_events.
    let rejected_ids = [intruder.event_id().as_str(), rename.event_id().as_str()];
    for id in rejected_ids {
        let answer = remote
            .request(
                "GET",
                &format!("/_matrix/federation/v1/event/{}", enc(id)),
                None,
            )
            .await;
        assert!(answer.is_err(), "/event served rejected {id}: {answer:?}");
    }
    // Backfill from the rejected events themselves and from the head.
    let latest = remote.extremities(&room);
    let backfill = remote
        .request(
            "GET",
            &format!(
                "/_matrix/federation/v1/backfill/{}?limit=100&v={}&v={}&v={}",
                enc(&room),
                enc(rejected_ids[0]),
                enc(rejected_ids[1]),
                enc(latest[0].as_str())
            ),
            None,
        )
        .await
        .expect("backfill");
    let missing = remote
        .request(
            "POST",
            &format!("/_matrix/federation/v1/get_missing_events/{}", enc(&room)),
            Some(json!({ "earliest_events": [], "latest_events": latest, "limit": 100 })),
        )
        .await
        .expect("get_missing_events");
    let served: Vec<String> = backfill["pdus"]
        .as_array()
        .into_iter()
        .chain(missing["events"].as_array())
        .flatten()
        .map(|pdu| pdu["content"].to_string())
        .collect();
    assert!(
        backfill["pdus"].as_array().is_some_and(|p| !p.is_empty()),
        "{backfill}"
    );
    assert!(
        !served
            .iter()
            .any(|c| c.contains("let me in") || c.contains("mine now")),
        "rejected events served: {served:?}"
    );
    // Operators see why, by reason.
    let receiver = cluster.metrics("federation-receiver").await;
    let worker = cluster.metrics("room-worker-0").await;
    for (text, line) in [
        (
            &receiver,
            r#"tessera_federation_server_pdus_dropped_total{reason="signature"}"#,
        ),
        (
            &receiver,
            r#"tessera_federation_server_pdus_dropped_total{reason="unknown_room"}"#,
        ),
        (&worker, r#"tessera_federation_pdus_rejected_total{reason="#),
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pdus_arriving_before_their_parents_wait_for_them() {
    let Joined {
        cluster,
        api,
        alice,
        room,
        remote,
        bob,
    } = joined().await;
    let mut since = api.initial_token(&alice).await;
    let chain = messages(&remote, &room, &bob, 6, "m");
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
    let metrics = cluster.metrics("room-worker-0").await;
    assert!(
        metrics.contains("tessera_federation_pdus_staged_total 6"),
        "events whose parents are missing are staged, not processed at once: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_parents_are_fetched_from_the_origin() {
    let Joined {
        cluster,
        api,
        alice,
        room,
        remote,
        bob,
    } = joined().await;
    let mut since = api.initial_token(&alice).await;
    let chain = messages(&remote, &room, &bob, 4, "g");
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
    let Joined {
        cluster,
        api,
        alice,
        room,
        remote,
        bob,
    } = joined().await;
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
    let message = remote.text(&room, &bob, "after the ban");
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
    // Nor through the event and context endpoints.
    for endpoint in ["event", "context"] {
        let (status, body) = api
            .call(
                reqwest::Method::GET,
                &format!(
                    "/_matrix/client/v3/rooms/{}/{endpoint}/{}",
                    tessera_tests::client::enc(&room),
                    tessera_tests::client::enc(message.event_id().as_str())
                ),
                Some(&alice.token),
                None,
            )
            .await;
        assert_eq!(status, 404, "/{endpoint}: {body}");
        assert_eq!(body["errcode"], "M_NOT_FOUND");
    }
    // Sent again in another transaction (its parents are still the room's
    // head, as nothing was built on it), it is accepted and stored once.
    assert_eq!(
        remote
            .send("after-ban-again", &[json_of(&message)], &[])
            .await,
        (200, json!({ "pdus": { message.event_id().as_str(): {} } }))
    );
    let copies: i64 = cluster
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE event_id = $1",
            &[&message.event_id().as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(copies, 1);
}

/// Dave, of a second remote server, joins after Bob: Bob's server never
/// hears of it (fake remotes keep their own view of the room).
async fn dave_joins(cluster: &TestCluster, room: &str) -> (Arc<FakeRemote>, OwnedUserId) {
    let other = FakeRemote::start(&cluster.server_name).await;
    let dave = other.user("dave");
    other.join(room, &dave).await.expect("join");
    (other, dave)
}

/// The state before an event is the state after its prev events, also when
/// the room has several forward extremities with different states: an event
/// on one fork is checked against that fork, not against the current state
/// (their resolution). Here Dave's server cites Bob's fork, on which Dave
/// never joined: rejected, though Dave is in the current state. (A turn once
/// took every extremity to have the current state, and accepted it.)
#[tokio::test(flavor = "multi_thread")]
async fn an_event_on_one_fork_is_checked_against_that_forks_state() {
    let Joined {
        cluster,
        room,
        remote,
        bob,
        ..
    } = joined().await;
    let (other, dave) = dave_joins(&cluster, &room).await;
    // Bob's server has not heard of Dave: its message forks the room.
    let on_bobs_fork = remote.text(&room, &bob, "on Bob's fork");
    send_accepted(&remote, "bob", &on_bobs_fork).await;
    assert_eq!(
        wait_stored(&cluster, on_bobs_fork.event_id().as_str()).await,
        (false, false)
    );
    let cites_bobs_fork = other.build_after(
        &room,
        &dave,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "after Bob's message" }),
        Some((
            vec![on_bobs_fork.event_id().to_owned()],
            on_bobs_fork.depth(),
        )),
    );
    assert_eq!(
        other
            .send("dave-on-bobs-fork", &[json_of(&cites_bobs_fork)], &[])
            .await
            .0,
        200
    );
    assert_eq!(
        wait_stored(&cluster, cites_bobs_fork.event_id().as_str()).await,
        (true, false),
        "Dave is not in the room on the fork his event cites"
    );
    // On his own fork, Dave talks as usual.
    let on_daves_fork = other.text(&room, &dave, "on Dave's fork");
    send_accepted(&other, "dave", &on_daves_fork).await;
    assert_eq!(
        wait_stored(&cluster, on_daves_fork.event_id().as_str()).await,
        (false, false)
    );
}

/// Two servers that never hear each other's events keep two forward
/// extremities whose states differ (each builds on its own view). Their
/// messages do not change those states, so the pair is resolved once, not
/// for every message; every message is in the room, and the current state
/// has both servers' users.
#[tokio::test(flavor = "multi_thread")]
async fn forks_that_keep_their_states_are_resolved_once() {
    let Joined {
        cluster,
        api,
        alice,
        room,
        remote,
        bob,
    } = joined().await;
    let (other, dave) = dave_joins(&cluster, &room).await;
    let mut since = api.initial_token(&alice).await;
    let resolutions_before = metric(&cluster, "tessera_room_worker_state_resolutions_total").await;
    let mut sent = Vec::new();
    for i in 0..5 {
        // Bob's server still thinks the room is as it was before Dave came.
        for (txn, pdu) in [
            (
                format!("bob-{i}"),
                remote.text(&room, &bob, &format!("bob {i}")),
            ),
            (
                format!("dave-{i}"),
                other.text(&room, &dave, &format!("dave {i}")),
            ),
        ] {
            let from = if txn.starts_with("bob") {
                &remote
            } else {
                &other
            };
            send_accepted(from, &txn, &pdu).await;
            assert_eq!(
                wait_stored(&cluster, pdu.event_id().as_str()).await,
                (false, false),
                "{txn}"
            );
            sent.push(
                pdu.content_field("body")
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
    }
    let seen = sync_until(&cluster, &alice, &room, &mut since, |events| {
        bodies(events).len() >= sent.len()
    })
    .await;
    let mut seen = bodies(&seen);
    seen.sort();
    sent.sort();
    assert_eq!(seen, sent);
    let resolutions =
        metric(&cluster, "tessera_room_worker_state_resolutions_total").await - resolutions_before;
    assert_eq!(resolutions, 1.0, "the same two states, resolved once");
    let members: Vec<String> = cluster
        .db()
        .await
        .query(
            "SELECT state_key FROM room_state WHERE room_id = $1 AND type = 'm.room.member'",
            &[&room.as_str()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for user in [bob.as_str(), dave.as_str(), alice.user_id.as_str()] {
        assert!(members.iter().any(|m| m == user), "{user} in {members:?}");
    }
}

/// A request to our federation API with a hand-made Authorization header.
async fn raw(
    cluster: &TestCluster,
    method: reqwest::Method,
    path: &str,
    auth: Option<String>,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    let http = tessera_tests::http_client_builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let mut request = http.request(method, format!("https://{}{path}", cluster.server_name));
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// An X-Matrix header signed by `key` as `origin`, for `destination`.
fn x_matrix(
    origin: &str,
    destination: &str,
    key: &tessera_events::keys::SigningKey,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> String {
    use tessera_events::ruma::api::federation::authentication::{XMatrix, XMatrixSigningInput};
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .body(body.unwrap_or_default())
        .unwrap();
    let header = XMatrix::sign_http_request(
        &request,
        XMatrixSigningInput::new(
            origin.try_into().unwrap(),
            destination.try_into().unwrap(),
            key.pair(),
        ),
    )
    .unwrap();
    http::HeaderValue::from(&header)
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_federation_requests_get_matrix_errors() {
    use reqwest::Method;
    let cluster = TestCluster::start(federated(1)).await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let room = api
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "room_alias_name": "fed" }),
        )
        .await;
    let remote = FakeRemote::start(&cluster.server_name).await;
    let bob = remote.user("bob");
    remote.join(&room, &bob).await.expect("join");
    let stranger = FakeRemote::start(&cluster.server_name).await;
    let r = tessera_tests::client::enc(&room);
    let ours = cluster.server_name.clone();

    let mut failures = Vec::new();
    let mut expect = |what: &str, (status, body): (u16, Value), want: Option<&str>| {
        let errcode = body
            .get("errcode")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let ok = (400..500).contains(&status)
            && errcode.as_deref().is_some_and(|c| c.starts_with("M_"))
            && want.is_none_or(|w| errcode.as_deref() == Some(w));
        if !ok {
            failures.push(format!("{what} -> {status} {body}"));
        }
    };

    // Authentication comes first, everywhere.
    for (method, path) in [
        (Method::PUT, "/_matrix/federation/v1/send/t".to_owned()),
        (
            Method::GET,
            format!(
                "/_matrix/federation/v1/make_join/{r}/{}",
                tessera_tests::client::enc(bob.as_str())
            ),
        ),
        (Method::GET, "/_matrix/federation/v1/event/%24x".to_owned()),
        (
            Method::PUT,
            format!("/_matrix/federation/v2/invite/{r}/%24x"),
        ),
        (
            Method::GET,
            format!("/_matrix/federation/v1/state_ids/{r}?event_id=%24x"),
        ),
        (
            Method::POST,
            format!("/_matrix/federation/v1/get_missing_events/{r}"),
        ),
        (
            Method::GET,
            "/_matrix/federation/v1/query/profile?user_id=%40alice%3Ax".to_owned(),
        ),
    ] {
        let body = (method != Method::GET).then(|| b"{}".to_vec());
        expect(
            &format!("unsigned {method} {path}"),
            raw(&cluster, method.clone(), &path, None, body.clone()).await,
            Some("M_UNAUTHORIZED"),
        );
        expect(
            &format!("garbage auth {method} {path}"),
            raw(
                &cluster,
                method.clone(),
                &path,
                Some("X-Matrix nonsense".into()),
                body,
            )
            .await,
            Some("M_UNAUTHORIZED"),
        );
    }
    let path = "/_matrix/federation/v1/send/wrong-destination";
    let body = br#"{"pdus":[]}"#.to_vec();
    let header = x_matrix(
        remote.server_name.as_str(),
        "elsewhere.example",
        &remote.key,
        "PUT",
        path,
        Some(&body),
    );
    expect(
        "wrong destination",
        raw(
            &cluster,
            Method::PUT,
            path,
            Some(header),
            Some(body.clone()),
        )
        .await,
        Some("M_UNAUTHORIZED"),
    );
    let (document, version) = tessera_events::keys::SigningKey::generate();
    let unknown_key = tessera_events::keys::SigningKey::from_document(&document, &version).unwrap();
    let header = x_matrix(
        remote.server_name.as_str(),
        &ours,
        &unknown_key,
        "PUT",
        path,
        Some(&body),
    );
    expect(
        "unknown key",
        raw(
            &cluster,
            Method::PUT,
            path,
            Some(header),
            Some(body.clone()),
        )
        .await,
        Some("M_UNAUTHORIZED"),
    );
    let header = x_matrix(
        remote.server_name.as_str(),
        &ours,
        &remote.key,
        "PUT",
        path,
        Some(b"{\"pdus\":[1]}"),
    );
    expect(
        "signature over another body",
        raw(&cluster, Method::PUT, path, Some(header), Some(body)).await,
        Some("M_UNAUTHORIZED"),
    );
    let header = x_matrix(
        remote.server_name.as_str(),
        &ours,
        &remote.key,
        "PUT",
        path,
        None,
    );
    expect(
        "not JSON",
        raw(
            &cluster,
            Method::PUT,
            path,
            Some(header),
            Some(b"{not json".to_vec()),
        )
        .await,
        None,
    );
    expect(
        "huge body",
        raw(
            &cluster,
            Method::PUT,
            path,
            Some("X-Matrix origin=a,key=\"ed25519:x\",sig=\"x\"".into()),
            Some(vec![b' '; 9 * 1024 * 1024]),
        )
        .await,
        Some("M_TOO_LARGE"),
    );

    // Signed requests with bad contents.
    let signed = |method: &str, path: &str, body: Option<Value>| {
        let remote = &remote;
        let method = method.to_owned();
        let path = path.to_owned();
        async move {
            match remote.request(&method, &path, body).await {
                Ok(value) => (200, value),
                Err(tessera_federation::FederationError::Status { status, body, .. }) => (
                    status,
                    serde_json::from_str(&body).unwrap_or(Value::String(body)),
                ),
                Err(other) => panic!("{other}"),
            }
        }
    };
    let too_many: Vec<Value> = (0..51).map(|_| json!({})).collect();
    expect(
        "51 PDUs",
        signed(
            "PUT",
            "/_matrix/federation/v1/send/many",
            Some(json!({ "pdus": too_many })),
        )
        .await,
        Some("M_BAD_JSON"),
    );
    let too_many_edus: Vec<Value> = (0..101).map(|_| json!({})).collect();
    expect(
        "101 EDUs",
        signed(
            "PUT",
            "/_matrix/federation/v1/send/edus",
            Some(json!({ "pdus": [], "edus": too_many_edus })),
        )
        .await,
        Some("M_BAD_JSON"),
    );
    expect(
        "pdus not a list",
        signed(
            "PUT",
            "/_matrix/federation/v1/send/shape",
            Some(json!({ "pdus": "x" })),
        )
        .await,
        Some("M_BAD_JSON"),
    );
    expect(
        "origin mismatch",
        signed(
            "PUT",
            "/_matrix/federation/v1/send/origin",
            Some(json!({ "origin": "someone.else", "pdus": [] })),
        )
        .await,
        Some("M_FORBIDDEN"),
    );
    expect(
        "make_join unknown room",
        signed(
            "GET",
            &format!(
                "/_matrix/federation/v1/make_join/%21nope%3A{ours}/{}",
                tessera_tests::client::enc(bob.as_str())
            ),
            None,
        )
        .await,
        Some("M_NOT_FOUND"),
    );
    expect(
        "make_join bad room ID",
        signed(
            "GET",
            &format!(
                "/_matrix/federation/v1/make_join/not-a-room/{}",
                tessera_tests::client::enc(bob.as_str())
            ),
            None,
        )
        .await,
        Some("M_INVALID_PARAM"),
    );
    expect(
        "make_join for another server's user",
        signed(
            "GET",
            &format!("/_matrix/federation/v1/make_join/{r}/%40eve%3Aother.example"),
            None,
        )
        .await,
        Some("M_FORBIDDEN"),
    );
    expect(
        "make_join with unsupported versions",
        signed(
            "GET",
            &format!(
                "/_matrix/federation/v1/make_join/{r}/{}?ver=1",
                tessera_tests::client::enc(bob.as_str())
            ),
            None,
        )
        .await,
        Some("M_INCOMPATIBLE_ROOM_VERSION"),
    );
    expect(
        "send_join garbage",
        signed(
            "PUT",
            &format!("/_matrix/federation/v2/send_join/{r}/%24x"),
            Some(json!({})),
        )
        .await,
        None,
    );
    expect(
        "unknown event",
        signed("GET", "/_matrix/federation/v1/event/%24nothing", None).await,
        Some("M_NOT_FOUND"),
    );
    expect(
        "state_ids without event",
        signed(
            "GET",
            &format!("/_matrix/federation/v1/state_ids/{r}"),
            None,
        )
        .await,
        Some("M_MISSING_PARAM"),
    );
    expect(
        "backfill without v",
        signed(
            "GET",
            &format!("/_matrix/federation/v1/backfill/{r}?limit=5"),
            None,
        )
        .await,
        Some("M_MISSING_PARAM"),
    );
    expect(
        "get_missing_events bad body",
        signed(
            "POST",
            &format!("/_matrix/federation/v1/get_missing_events/{r}"),
            Some(json!({ "latest_events": 5 })),
        )
        .await,
        Some("M_BAD_JSON"),
    );
    expect(
        "profile without user",
        signed("GET", "/_matrix/federation/v1/query/profile", None).await,
        Some("M_MISSING_PARAM"),
    );
    expect(
        "profile of nobody",
        signed(
            "GET",
            &format!("/_matrix/federation/v1/query/profile?user_id=%40nobody%3A{ours}"),
            None,
        )
        .await,
        Some("M_NOT_FOUND"),
    );
    expect(
        "directory unknown alias",
        signed(
            "GET",
            &format!("/_matrix/federation/v1/query/directory?room_alias=%23none%3A{ours}"),
            None,
        )
        .await,
        Some("M_NOT_FOUND"),
    );
    expect(
        "unknown endpoint",
        signed("GET", "/_matrix/federation/v1/nonsense", None).await,
        Some("M_UNRECOGNIZED"),
    );
    expect(
        "key query malformed",
        raw(
            &cluster,
            Method::POST,
            "/_matrix/key/v2/query",
            None,
            Some(br#"{"server_keys": 5}"#.to_vec()),
        )
        .await,
        Some("M_BAD_JSON"),
    );
    // A server that is not in the room may not read it.
    let stranger_read = match stranger
        .request(
            "GET",
            &format!("/_matrix/federation/v1/state_ids/{r}?event_id=%24x"),
            None,
        )
        .await
    {
        Err(tessera_federation::FederationError::Status { status, body, .. }) => {
            (status, serde_json::from_str(&body).unwrap_or(Value::Null))
        }
        other => panic!("{other:?}"),
    };
    expect("outsider reads state", stranger_read, Some("M_FORBIDDEN"));
    assert!(
        failures.is_empty(),
        "{} bad federation requests were mishandled:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Still serving: keys, version and a good transaction.
    let (status, keys) = raw(&cluster, Method::GET, "/_matrix/key/v2/server", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(keys["server_name"], ours);
    let message = remote.text(&room, &bob, "still fine");
    let (status, answer) = remote.send("after-bad", &[json_of(&message)], &[]).await;
    assert_eq!(
        (status, &answer["pdus"][message.event_id().as_str()]),
        (200, &json!({}))
    );
}

/// `count` messages from `user` in `room`, built (and signed) by `remote`,
/// each on the previous one; bodies are `prefix` and the index.
fn messages(
    remote: &FakeRemote,
    room: &str,
    user: &tessera_events::ruma::UserId,
    count: usize,
    prefix: &str,
) -> Vec<std::sync::Arc<tessera_events::Pdu>> {
    (0..count)
        .map(|i| remote.text(room, user, &format!("{prefix}{i}")))
        .collect()
}

/// Put PDUs straight into the staging table, as the receiver would have.
async fn stage_directly(
    cluster: &TestCluster,
    room: &str,
    origin: &str,
    pdus: &[std::sync::Arc<tessera_events::Pdu>],
) {
    let client = cluster.db().await;
    let partition = tessera_cluster::partition_of(room, cluster.spec().partitions) as i32;
    let ids: Vec<String> = pdus.iter().map(|p| p.event_id().to_string()).collect();
    let jsons: Vec<String> = pdus.iter().map(|p| p.canonical_json().to_owned()).collect();
    let depths: Vec<i64> = pdus.iter().map(|p| p.depth() as i64).collect();
    client
        .execute(
            "INSERT INTO staged_pdus (room_id, partition, origin, event_id, json, depth)
             SELECT $1, $2, $3, e.id, e.json, e.depth
             FROM unnest($4::text[], $5::text[], $6::bigint[]) WITH ORDINALITY AS e(id, json, depth, ord) ORDER BY e.ord",
            &[&room, &partition, &origin, &ids, &jsons, &depths],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooded_room_does_not_hold_back_a_quiet_one() {
    const FLOOD: usize = 3000;
    let cluster = TestCluster::start(federated(1)).await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let busy = api.public_room(&alice).await;
    let quiet = api.public_room(&alice).await;
    let flooder = FakeRemote::start(&cluster.server_name).await;
    let talker = FakeRemote::start(&cluster.server_name).await;
    let spammer = flooder.user("spam");
    let friend = talker.user("friend");
    flooder.join(&busy, &spammer).await.unwrap();
    talker.join(&quiet, &friend).await.unwrap();

    let pdus = messages(&flooder, &busy, &spammer, FLOOD, "spam ");
    // A backlog: all but the last staged at once, as if many transactions had
    // just landed; the last one through the federation API sets it moving.
    stage_directly(
        &cluster,
        &busy,
        flooder.server_name.as_str(),
        &pdus[..FLOOD - 1],
    )
    .await;
    assert_eq!(
        flooder
            .send("last", &[json_of(&pdus[FLOOD - 1])], &[])
            .await
            .0,
        200
    );
    // Now one message in the quiet room.
    let hello = talker.text(&quiet, &friend, "hi");
    assert_eq!(talker.send("hello", &[json_of(&hello)], &[]).await.0, 200);
    let client = cluster.db().await;
    let mut busy_done_when_quiet_done = None;
    for _ in 0..3000 {
        let quiet_done = client
            .query_opt(
                "SELECT 1 FROM events WHERE event_id = $1",
                &[&hello.event_id().as_str()],
            )
            .await
            .unwrap()
            .is_some();
        if quiet_done {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM events WHERE room_id = $1 AND type = 'm.room.message'",
                    &[&busy],
                )
                .await
                .unwrap()
                .get(0);
            busy_done_when_quiet_done = Some(n);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let busy_done = busy_done_when_quiet_done.expect("the quiet room's message was processed");
    println!("flood events processed when the quiet message was: {busy_done} of {FLOOD}");
    assert!(
        busy_done < FLOOD as i64 - 500,
        "the quiet room waited for the flood: {busy_done} of {FLOOD} first"
    );
    // And the whole flood gets in, none lost.
    for _ in 0..600 {
        let n: i64 = client
            .query_one("SELECT count(*) FROM events WHERE room_id = $1 AND type = 'm.room.message' AND NOT rejected", &[&busy])
            .await
            .unwrap()
            .get(0);
        if n == FLOOD as i64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the flood never finished");
}

/// Transactions in flight land out of order: here each later transaction is
/// staged before the one holding its parents, so the oldest staged rows
/// always wait on younger ones. Everything must still be processed, parents
/// first, without asking the origin for events it already sent.
#[tokio::test(flavor = "multi_thread")]
async fn transactions_staged_out_of_order_are_processed_parents_first() {
    const EVENTS: usize = 1000;
    let Joined {
        cluster,
        room,
        remote,
        bob,
        ..
    } = joined().await;
    let pdus = messages(&remote, &room, &bob, EVENTS, "m ");
    // Newest transaction first, each of 50 PDUs (more than one turn's batch
    // of rows is waiting on rows staged after it).
    for chunk in pdus[..EVENTS - 1].chunks(50).rev() {
        stage_directly(&cluster, &room, remote.server_name.as_str(), chunk).await;
    }
    assert_eq!(
        remote
            .send("last", &[json_of(&pdus[EVENTS - 1])], &[])
            .await
            .0,
        200
    );
    let client = cluster.db().await;
    let mut order = Vec::new();
    for _ in 0..600 {
        order = client
            .query(
                "SELECT event_id FROM events WHERE room_id = $1 AND type = 'm.room.message' AND NOT rejected ORDER BY pos",
                &[&room],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>();
        if order.len() == EVENTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected: Vec<String> = pdus.iter().map(|p| p.event_id().to_string()).collect();
    assert_eq!(order.len(), EVENTS, "every staged event was processed");
    assert_eq!(order, expected, "the timeline follows the DAG");
    assert_eq!(
        remote.requests_matching("get_missing_events"),
        0,
        "nothing already staged was fetched back from the origin"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn staged_pdus_survive_a_killed_room_worker_exactly_once() {
    const FLOOD: usize = 2000;
    let mut cluster = TestCluster::start(Spec {
        room_workers: 2,
        partitions: 4,
        lease_ttl_ms: 2000,
        heartbeat_ms: 200,
        federation: Some(FederationSpec::default()),
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let room = api.public_room(&alice).await;
    let remote = FakeRemote::start(&cluster.server_name).await;
    let bob = remote.user("bob");
    remote.join(&room, &bob).await.unwrap();
    let pdus = messages(&remote, &room, &bob, FLOOD, "n");
    let ids: Vec<String> = pdus.iter().map(|p| p.event_id().to_string()).collect();
    stage_directly(
        &cluster,
        &room,
        remote.server_name.as_str(),
        &pdus[..FLOOD - 1],
    )
    .await;
    assert_eq!(
        remote
            .send("last", &[json_of(&pdus[FLOOD - 1])], &[])
            .await
            .0,
        200
    );
    // All staged and being processed: kill the room's owner outright.
    let store = cluster.store().await;
    let owner = store
        .partition_owner(tessera_cluster::partition_of(&room, 4))
        .await
        .unwrap()
        .unwrap()
        .worker_id;
    cluster.kill(&owner).await;
    let client = cluster.db().await;
    for _ in 0..600 {
        let staged: i64 = client
            .query_one(
                "SELECT count(*) FROM staged_pdus WHERE room_id = $1",
                &[&room],
            )
            .await
            .unwrap()
            .get(0);
        if staged == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored: i64 = client
        .query_one(
            "SELECT count(*) FROM events WHERE event_id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0);
    let accepted: i64 = client
        .query_one("SELECT count(*) FROM events WHERE event_id = ANY($1) AND NOT rejected AND NOT soft_failed", &[&ids])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (stored, accepted),
        (FLOOD as i64, FLOOD as i64),
        "every staged PDU processed once, by the new owner"
    );
    let owners = cluster.owners().await;
    assert!(!owners.contains_key(&owner), "{owners:?}");
}

/// Backpressure is per origin and per room: an origin over its PDU rate, or
/// a transaction for a room whose backlog is over the limit, gets 429 with
/// `retry_after_ms`; other origins and other rooms go on as before, and the
/// EDUs of a transaction refused for a room's backlog are kept.
#[tokio::test(flavor = "multi_thread")]
async fn backpressure_slows_only_the_busy_origin_and_room() {
    let cluster = TestCluster::start(Spec {
        federation: Some(FederationSpec {
            max_staged_per_room: 50,
            // One PDU a second: the 20-PDU transaction below stays refused
            // for 20 s after the burst, however slow this machine is.
            origin_pdus_per_second: 1,
            origin_pdu_burst: 30,
            // Staged events missing a parent wait this long: the backlog
            // below stays put while the test looks at it.
            missing_prev_wait_ms: 60_000,
            ..FederationSpec::default()
        }),
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let busy = api.public_room(&alice).await;
    let quiet = api.public_room(&alice).await;
    let hasty = FakeRemote::start(&cluster.server_name).await;
    let backlogged = FakeRemote::start(&cluster.server_name).await;
    let calm = FakeRemote::start(&cluster.server_name).await;
    let (h, b, c) = (hasty.user("h"), backlogged.user("b"), calm.user("c"));
    hasty.join(&quiet, &h).await.unwrap();
    backlogged.join(&busy, &b).await.unwrap();
    backlogged.join(&quiet, &b).await.unwrap();
    calm.join(&quiet, &c).await.unwrap();
    let message =
        |remote: &FakeRemote, room: &str, user: &tessera_events::ruma::UserId, i: usize| {
            json_of(&remote.text(room, user, &format!("{user} {i}")))
        };
    let assert_429 = |(status, body): (u16, Value), what: &str| {
        assert_eq!(status, 429, "{what}: {body}");
        assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED", "{what}: {body}");
        assert!(
            body["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0),
            "{what}: {body}"
        );
    };

    // Per origin: the burst is spent (the join took one), the next
    // transaction waits.
    let burst: Vec<Value> = (0..29).map(|i| message(&hasty, &quiet, &h, i)).collect();
    assert_eq!(hasty.send("h1", &burst, &[]).await.0, 200);
    let next: Vec<Value> = (30..50).map(|i| message(&hasty, &quiet, &h, i)).collect();
    assert_429(
        hasty.send("h2", &next, &[]).await,
        "an origin over its rate",
    );
    let calm_hello = message(&calm, &quiet, &c, 0);
    assert_eq!(calm.send("c1", &[calm_hello], &[]).await.0, 200);
    // EDUs take tokens too: 40 of them are more than the 28 calm has left
    // (after its join and its message), and none is kept.
    let typing = json!({
        "edu_type": "m.typing",
        "content": { "room_id": quiet.as_str(), "user_id": c.as_str(), "typing": true }
    });
    assert_429(
        calm.send("c-edus", &[], &vec![typing; 40]).await,
        "a transaction of more EDUs than the origin's tokens",
    );
    assert_eq!(received_edus(&cluster, "m.typing").await, 0);

    // Per room: 60 staged events that wait for a parent that never comes.
    let _gap = backlogged.text(&busy, &b, "never sent");
    let waiting = messages(&backlogged, &busy, &b, 60, "w ");
    stage_directly(&cluster, &busy, backlogged.server_name.as_str(), &waiting).await;
    // Its EDUs are kept all the same (a flooded room holds back no one's
    // to-device messages), once however often the origin retries.
    let to_device = json!({
        "edu_type": "m.direct_to_device",
        "content": {
            "sender": b.as_str(),
            "type": "m.room_key_request",
            "message_id": "m1",
            "messages": { alice.user_id.as_str(): { "*": { "action": "request_cancellation" } } }
        }
    });
    let refused = message(&backlogged, &busy, &b, 61);
    for attempt in ["first", "retried"] {
        assert_429(
            backlogged
                .send(
                    "b1",
                    std::slice::from_ref(&refused),
                    std::slice::from_ref(&to_device),
                )
                .await,
            &format!("a transaction for a room over its backlog, {attempt}"),
        );
        assert_eq!(to_device_messages(&cluster).await, 1);
    }
    // The same origin's transaction for another room, and another origin's, go through.
    let mut since = api.initial_token(&alice).await;
    let elsewhere = message(&backlogged, &quiet, &b, 0);
    assert_eq!(
        backlogged
            .send("b2", std::slice::from_ref(&elsewhere), &[])
            .await
            .0,
        200
    );
    let calm_again = message(&calm, &quiet, &c, 1);
    assert_eq!(
        calm.send("c2", std::slice::from_ref(&calm_again), &[])
            .await
            .0,
        200
    );
    let wanted: Vec<String> = [&elsewhere, &calm_again]
        .iter()
        .map(|v| v["content"]["body"].as_str().unwrap().to_owned())
        .collect();
    sync_until(&cluster, &alice, &quiet, &mut since, |events| {
        let seen = bodies(events);
        wanted.iter().all(|body| seen.contains(body))
    })
    .await;
}

/// A membership event sent through send_join (or leave, or knock) is a PDU
/// of its origin's: it takes a token from the origin's rate like any other.
/// And however many come at once, a receiver hands only
/// `federation_receiver.concurrent_memberships` of them to owners at a time
/// (a join's answer can hold a large room's whole state); the others wait,
/// and none is lost.
#[tokio::test(flavor = "multi_thread")]
async fn membership_events_take_tokens_and_wait_for_permits() {
    let cluster = TestCluster::start(Spec {
        federation: Some(FederationSpec {
            origin_pdus_per_second: 1,
            origin_pdu_burst: 2,
            concurrent_memberships: 1,
            ..FederationSpec::default()
        }),
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let room = api.public_room(&alice).await;

    // Joins one after another from one server: the burst admits two, then
    // the rate (one a second) refuses most of the rest.
    let eager = FakeRemote::start(&cluster.server_name).await;
    let mut refusals = Vec::new();
    let mut joined = 0;
    for i in 0..10 {
        match eager.join(&room, &eager.user(&format!("u{i}"))).await {
            Ok(()) => joined += 1,
            Err(tessera_federation::FederationError::Status { status, body, .. }) => {
                refusals.push((status, serde_json::from_str::<Value>(&body).unwrap()))
            }
            Err(other) => panic!("join {i}: {other}"),
        }
    }
    assert!(joined >= 2, "the burst admits two joins ({joined})");
    let (status, body) = refusals.first().expect("some joins are over the rate");
    assert_eq!(*status, 429, "{body}");
    assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED", "{body}");
    assert!(
        body["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{body}"
    );

    // Eight servers join at once through one permit: all get in.
    let mut remotes = Vec::new();
    for _ in 0..8 {
        remotes.push(FakeRemote::start(&cluster.server_name).await);
    }
    let joins: Vec<_> = remotes
        .iter()
        .map(|remote| {
            let (remote, room) = (Arc::clone(remote), room.clone());
            tokio::spawn(async move { remote.join(&room, &remote.user("w")).await })
        })
        .collect();
    for (i, join) in joins.into_iter().enumerate() {
        join.await
            .unwrap()
            .unwrap_or_else(|e| panic!("join {i}: {e}"));
    }
    let store = cluster.store().await;
    for remote in &remotes {
        let user = remote.user("w");
        assert_eq!(
            store
                .membership(&room, user.as_str())
                .await
                .unwrap()
                .as_deref(),
            Some("join")
        );
    }
    let waited = cluster
        .metrics("federation-receiver")
        .await
        .lines()
        .find_map(|l| l.strip_prefix("tessera_federation_memberships_waited_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        waited >= 1.0,
        "with one permit, some of eight joins at once waited"
    );
}

/// A redaction from another server hides its target when the redaction's
/// sender is on the same server as the target's sender (that server vouches
/// for its users), or may redact others' events; bob, of the remote server
/// and without that power, cannot hide alice's message, though his
/// redaction is accepted into the room.
#[tokio::test(flavor = "multi_thread")]
async fn remote_redactions_hide_what_the_spec_lets_them() {
    let Joined {
        cluster,
        api,
        alice,
        room,
        remote,
        bob,
    } = joined().await;
    let own = remote.text(&room, &bob, "mine");
    send_accepted(&remote, "t1", &own).await;
    let hers = api.send_text(&alice, &room, "a1", "hers").await;
    let redact = |target: &str| {
        remote.build(
            &room,
            &bob,
            "m.room.redaction",
            None,
            json!({ "redacts": target, "reason": "spam" }),
        )
    };
    let of_own = redact(own.event_id().as_str());
    send_accepted(&remote, "t2", &of_own).await;
    let of_hers = redact(&hers);
    send_accepted(&remote, "t3", &of_hers).await;
    for redaction in [&of_own, &of_hers] {
        assert_eq!(
            wait_stored(&cluster, redaction.event_id().as_str()).await,
            (false, false),
            "the redaction is accepted"
        );
    }
    let event = |id: String| {
        let api = &api;
        let alice = &alice;
        let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&id));
        async move { api.ok(reqwest::Method::GET, &path, alice, None).await }
    };
    let mine = event(own.event_id().to_string()).await;
    assert_eq!(mine["content"], json!({}), "{mine}");
    assert_eq!(
        mine["unsigned"]["redacted_because"]["content"]["reason"],
        "spam"
    );
    let theirs = event(hers.clone()).await;
    assert_eq!(theirs["content"]["body"], "hers", "{theirs}");
}

/// A redaction may arrive before its target (here on a sibling branch, so
/// the target is never fetched as a prev_event): it is kept, and hides the
/// target when the target arrives, as the target's sender (carol) is on the
/// redactor's (bob's) server.
#[tokio::test(flavor = "multi_thread")]
async fn a_redaction_hides_a_target_that_arrives_after_it() {
    let Joined {
        cluster,
        api,
        alice,
        room,
        remote,
        bob,
    } = joined().await;
    let joins = remote.member_joins(&room, 1);
    send_accepted(&remote, "t0", &joins[0]).await;
    let carol = remote.user("member-0");
    let late = remote.text_unchecked(&room, &carol, "spam from carol");
    let redaction = remote.build_unchecked(
        &room,
        &bob,
        "m.room.redaction",
        None,
        json!({ "redacts": late.event_id(), "reason": "spam" }),
    );
    send_accepted(&remote, "t1", &redaction).await;
    assert_eq!(
        wait_stored(&cluster, redaction.event_id().as_str()).await,
        (false, false),
        "the redaction is accepted before its target exists here"
    );
    send_accepted(&remote, "t2", &late).await;
    assert_eq!(
        wait_stored(&cluster, late.event_id().as_str()).await,
        (false, false)
    );
    let path = format!(
        "/_matrix/client/v3/rooms/{}/event/{}",
        enc(&room),
        enc(late.event_id().as_str())
    );
    let shown = api.ok(reqwest::Method::GET, &path, &alice, None).await;
    assert_eq!(shown["content"], json!({}), "{shown}");
    assert_eq!(
        shown["unsigned"]["redacted_because"]["event_id"],
        redaction.event_id().as_str(),
        "{shown}"
    );
}

/// An event must pass the auth rules against its own auth events as well as
/// against the state before it: here Bob cites the power levels from before
/// Alice promoted him, while building on the promotion. The state before
/// allows his room name; his auth events do not, so it is rejected.
#[tokio::test(flavor = "multi_thread")]
async fn events_their_own_auth_events_forbid_are_rejected() {
    let Joined {
        cluster,
        api,
        alice,
        room,
        remote,
        bob,
    } = joined().await;
    let path = |kind: &str| {
        format!(
            "/_matrix/client/v3/rooms/{}/state/{kind}",
            tessera_tests::client::enc(&room)
        )
    };
    let mut levels = api
        .ok(
            reqwest::Method::GET,
            &path("m.room.power_levels"),
            &alice,
            None,
        )
        .await;
    levels["users"][bob.as_str()] = json!(100);
    let promotion = api
        .ok(
            reqwest::Method::PUT,
            &path("m.room.power_levels"),
            &alice,
            Some(levels),
        )
        .await["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let promoted = remote
        .request(
            "GET",
            &format!(
                "/_matrix/federation/v1/event/{}",
                tessera_tests::client::enc(&promotion)
            ),
            None,
        )
        .await
        .expect("the promotion over federation");
    let depth = promoted["pdus"][0]["depth"].as_u64().expect("depth");
    // The remote never heard of the promotion: its auth events for Bob's
    // event are the power levels from before it.
    let name = remote.build_after(
        &room,
        &bob,
        "m.room.name",
        Some(""),
        json!({ "name": "Bob's room now" }),
        Some((
            vec![tessera_events::ruma::OwnedEventId::try_from(promotion.as_str()).unwrap()],
            depth,
        )),
    );
    assert_eq!(remote.send("name", &[json_of(&name)], &[]).await.0, 200);
    assert_eq!(
        wait_stored(&cluster, name.event_id().as_str()).await,
        (true, false),
        "stored as rejected"
    );
    // And a message Bob sends on the same footing is fine: his membership
    // allows it under both.
    let hello = remote.build_after(
        &room,
        &bob,
        "m.room.message",
        None,
        json!({ "msgtype": "m.text", "body": "hello" }),
        Some((
            vec![tessera_events::ruma::OwnedEventId::try_from(promotion.as_str()).unwrap()],
            depth,
        )),
    );
    assert_eq!(remote.send("hello", &[json_of(&hello)], &[]).await.0, 200);
    assert_eq!(
        wait_stored(&cluster, hello.event_id().as_str()).await,
        (false, false),
        "accepted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_join_with_omit_members_gets_the_heroes_and_the_auth_chain_only() {
    let cluster = TestCluster::start(federated(1)).await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let unnamed = api.public_room(&alice).await;
    let named = api
        .create_room(&alice, json!({ "preset": "public_chat", "name": "Lobby" }))
        .await;
    for i in 0..6 {
        let user = cluster.register(&format!("member{i}")).await;
        api.join(&user, &unnamed).await;
        api.join(&user, &named).await;
    }
    let remote = FakeRemote::start(&cluster.server_name).await;
    let bob = remote.user("bob");
    let members = |events: &Value| -> Vec<String> {
        events
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["type"] == "m.room.member")
            .filter_map(|e| e["state_key"].as_str().map(str::to_owned))
            .collect()
    };
    let has = |events: &Value, kind: &str| {
        events
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["type"] == kind))
    };

    // Unnamed: the five heroes' memberships stay, the other two go.
    let answer = remote
        .join_with_query(&unnamed, &bob, "?omit_members=true")
        .await
        .expect("join");
    assert_eq!(answer["members_omitted"], true, "{answer}");
    assert_eq!(members(&answer["state"]).len(), 5, "{answer}");
    assert!(
        !members(&answer["state"]).contains(&bob.to_string()),
        "the joiner is not a hero"
    );
    for kind in ["m.room.create", "m.room.power_levels", "m.room.join_rules"] {
        assert!(has(&answer["state"], kind), "{kind} missing from state");
    }
    assert!(
        answer["servers_in_room"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s == cluster.server_name.as_str())),
        "{answer}"
    );

    // Named: no memberships in the state at all, but the auth chain still
    // holds what the kept events and the join were authorised by.
    let answer = remote
        .join_with_query(&named, &bob, "?omit_members=true")
        .await
        .expect("join");
    assert_eq!(answer["members_omitted"], true);
    assert!(members(&answer["state"]).is_empty(), "{answer}");
    assert!(has(&answer["state"], "m.room.name"));
    assert!(
        members(&answer["auth_chain"]).contains(&alice.user_id.to_string()),
        "the creator's join authorises the power levels: {answer}"
    );
    // (In room version 12 the create event is implied, not an auth event.)
    assert!(has(&answer["auth_chain"], "m.room.power_levels"));
    let chain_members = members(&answer["auth_chain"]);
    assert!(
        !chain_members.iter().any(|m| m.starts_with("@member")),
        "the other members are left out of the auth chain too: {chain_members:?}"
    );

    // Without the flag, every member is there.
    let carol = remote.user("carol");
    let answer = remote
        .join_with_query(&named, &carol, "")
        .await
        .expect("join");
    assert_eq!(answer["members_omitted"], false);
    assert!(members(&answer["state"]).len() >= 8, "{answer}");
}
