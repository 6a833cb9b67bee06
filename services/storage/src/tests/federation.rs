//! Inbound transaction records (kept for retries), kept EDUs (pruned by age),
//! remote read receipts (the newest per reader), device list and signing key
//! updates (the newest per device and user) and to-device messages (per
//! device of ours).

use std::time::Duration;

use serde_json::json;

use crate::Store;
use crate::federation::{DeviceListUpdate, RemoteReceipt, SigningKeyUpdate, ToDeviceMessage};
use crate::test_util;

/// Records older than the retention go, in batches, and younger ones stay
/// answerable.
#[tokio::test]
async fn old_transaction_records_are_pruned_and_young_ones_kept() {
    let store = test_util::store().await;
    for txn in ["old1", "old2", "old3", "young"] {
        store
            .store_federation_txn("remote.example", txn, &json!({ "pdus": { "txn": txn } }))
            .await
            .unwrap();
    }
    store
        .execute(
            "UPDATE federation_transactions SET received_at = now() - interval '2 days'
             WHERE txn_id LIKE 'old%'",
            &[],
        )
        .await
        .unwrap();

    let day = Duration::from_secs(24 * 3600);
    // Batches of two: the loop must go on past a full batch.
    assert_eq!(store.prune_federation_txns(day, 2).await.unwrap(), 3);
    for txn in ["old1", "old2", "old3"] {
        assert_eq!(
            store.federation_txn("remote.example", txn).await.unwrap(),
            None
        );
    }
    assert_eq!(
        store
            .federation_txn("remote.example", "young")
            .await
            .unwrap(),
        Some(json!({ "pdus": { "txn": "young" } }))
    );
    assert_eq!(store.prune_federation_txns(day, 2).await.unwrap(), 0);
}

/// A transaction's EDUs are kept once however often it comes; another
/// transaction's, or another origin's with the same ID, are kept as well.
#[tokio::test]
async fn edus_of_a_repeated_transaction_are_kept_once() {
    let store = test_util::store().await;
    let edus: Vec<(i32, String, serde_json::Value)> = (0..3)
        .map(|i| (i, "m.typing".to_owned(), json!({ "n": i })))
        .collect();
    for (origin, txn) in [
        ("remote.example", "t1"),
        ("remote.example", "t1"),
        ("remote.example", "t2"),
        ("other.example", "t1"),
    ] {
        store.store_edus(origin, txn, &edus).await.unwrap();
    }
    assert_eq!(
        rows(
            &store,
            "SELECT origin, txn_id, count(*)::text FROM received_edus GROUP BY 1, 2 ORDER BY 1, 2"
        )
        .await,
        [
            ["other.example", "t1", "3"],
            ["remote.example", "t1", "3"],
            ["remote.example", "t2", "3"]
        ]
    );
}

/// Old EDUs of the listed types go; other types, and young ones, stay.
#[tokio::test]
async fn old_edus_of_the_given_types_are_pruned() {
    let store = test_util::store().await;
    let edus: Vec<(i32, String, serde_json::Value)> =
        ["m.typing", "m.typing", "m.presence", "m.receipt"]
            .iter()
            .zip(0..)
            .map(|(kind, i)| (i, kind.to_string(), json!({ "age": "old" })))
            .collect();
    store
        .store_edus("remote.example", "t1", &edus)
        .await
        .unwrap();
    store
        .execute(
            "UPDATE received_edus SET received_at = now() - interval '2 hours'",
            &[],
        )
        .await
        .unwrap();
    let young = vec![(0, "m.typing".to_owned(), json!({ "age": "young" }))];
    store
        .store_edus("remote.example", "t2", &young)
        .await
        .unwrap();

    let hour = Duration::from_secs(3600);
    let ephemeral = ["m.typing", "m.presence"];
    assert_eq!(
        store
            .prune_received_edus(&ephemeral, hour, 2)
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        rows(
            &store,
            "SELECT edu_type, content->>'age' FROM received_edus ORDER BY id"
        )
        .await,
        [["m.receipt", "old"], ["m.typing", "young"]]
    );
}

/// A reader's newer receipt replaces the older one (in one batch or
/// across batches); an older one arriving late changes nothing.
#[tokio::test]
async fn a_readers_newest_receipt_is_kept() {
    let store = test_util::store().await;
    let receipt = |user: &str, event: &str, ts: i64| RemoteReceipt {
        room_id: "!r:here".to_owned(),
        receipt_type: "m.read".to_owned(),
        user_id: user.to_owned(),
        thread_id: String::new(),
        event_ids: vec![event.to_owned()],
        data: json!({ "ts": ts }),
        ts,
        origin: "there".to_owned(),
    };
    store
        .store_receipts(&[
            receipt("@a:there", "$1", 1),
            receipt("@a:there", "$2", 2),
            receipt("@b:there", "$1", 1),
        ])
        .await
        .unwrap();
    store
        .store_receipts(&[receipt("@a:there", "$3", 3), receipt("@b:there", "$0", 0)])
        .await
        .unwrap();
    assert_eq!(
        rows(
            &store,
            "SELECT user_id, event_ids->>0, jsonb_array_length(event_ids)::text
             FROM remote_receipts ORDER BY user_id"
        )
        .await,
        [["@a:there", "$3", "1"], ["@b:there", "$1", "1"]]
    );
}

/// Local users with devices, and remote users joined to a room here (so
/// that their device list and signing key updates are kept).
async fn people(store: &Store, local: &[(&str, &[&str])], remote_joined: &[&str]) {
    for (user, devices) in local {
        store
            .execute("INSERT INTO users (user_id) VALUES ($1)", &[user])
            .await
            .unwrap();
        for device in devices.iter() {
            store
                .execute(
                    "INSERT INTO devices (user_id, device_id) VALUES ($1, $2)",
                    &[user, device],
                )
                .await
                .unwrap();
        }
    }
    for (i, user) in remote_joined.iter().enumerate() {
        store
            .execute(
                "INSERT INTO room_state (room_id, type, state_key, event_id, membership, pos)
                 VALUES ('!r:here', 'm.room.member', $1, $2, 'join', 1)",
                &[user, &format!("$join{i}")],
            )
            .await
            .unwrap();
    }
}

/// Rows of a query as strings (NULL as "-").
async fn rows(store: &Store, sql: &str) -> Vec<Vec<String>> {
    store
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| {
                    r.get::<_, Option<String>>(i)
                        .unwrap_or_else(|| "-".to_owned())
                })
                .collect()
        })
        .collect()
}

/// A device's newest update (by stream ID) is kept, in one batch or across
/// batches; an older one arriving late changes nothing; a user joined to no
/// room here is not kept.
#[tokio::test]
async fn a_devices_newest_list_update_is_kept() {
    let store = test_util::store().await;
    people(&store, &[], &["@a:there"]).await;
    let update = |user: &str, device: &str, stream_id: i64| DeviceListUpdate {
        user_id: user.to_owned(),
        device_id: device.to_owned(),
        stream_id,
        content: json!({ "user_id": user, "device_id": device, "stream_id": stream_id }),
    };
    store
        .store_device_list_updates(
            "there",
            &[
                update("@a:there", "D1", 2),
                update("@a:there", "D1", 1),
                update("@a:there", "D2", 5),
                update("@stranger:there", "D1", 9),
            ],
        )
        .await
        .unwrap();
    store
        .store_device_list_updates(
            "there",
            &[update("@a:there", "D1", 3), update("@a:there", "D2", 4)],
        )
        .await
        .unwrap();
    assert_eq!(
        rows(
            &store,
            "SELECT user_id, device_id, stream_id::text, content->>'stream_id', origin
             FROM remote_device_list_updates ORDER BY 1, 2"
        )
        .await,
        [
            ["@a:there", "D1", "3", "3", "there"],
            ["@a:there", "D2", "5", "5", "there"]
        ]
    );
}

/// Each key of a user's latest update replaces that key; the other stays.
#[tokio::test]
async fn signing_key_updates_merge_key_by_key() {
    let store = test_util::store().await;
    people(&store, &[], &["@a:there"]).await;
    let update = |user: &str, keys: serde_json::Value| SigningKeyUpdate {
        user_id: user.to_owned(),
        keys: keys.as_object().unwrap().clone(),
    };
    store
        .store_signing_key_updates(
            "there",
            &[
                update("@a:there", json!({ "master_key": { "v": 1 } })),
                update("@a:there", json!({ "self_signing_key": { "v": 1 } })),
                update("@stranger:there", json!({ "master_key": { "v": 1 } })),
            ],
        )
        .await
        .unwrap();
    store
        .store_signing_key_updates(
            "there",
            &[update("@a:there", json!({ "master_key": { "v": 2 } }))],
        )
        .await
        .unwrap();
    let kept: Vec<(String, serde_json::Value)> = store
        .query("SELECT user_id, keys FROM remote_signing_keys", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        kept,
        [(
            "@a:there".to_owned(),
            json!({ "master_key": { "v": 2 }, "self_signing_key": { "v": 1 } })
        )]
    );
}

/// A to-device message is kept for each device of ours it names (`*`: each
/// of the user's devices, but one named itself gets its own), once however
/// often it comes; messages for devices or users we do not have are dropped.
#[tokio::test]
async fn to_device_messages_are_kept_once_per_existing_device() {
    let store = test_util::store().await;
    people(
        &store,
        &[("@alice:here", &["A1", "A2"]), ("@bob:here", &["B1"])],
        &[],
    )
    .await;
    let message = |id: &str, user: &str, device: &str| ToDeviceMessage {
        sender: "@s:there".to_owned(),
        event_type: "m.room_key_request".to_owned(),
        message_id: id.to_owned(),
        user_id: user.to_owned(),
        device_id: device.to_owned(),
        content: json!({ "to": format!("{user} {device}") }),
    };
    let first = [
        message("m1", "@alice:here", "*"),
        message("m1", "@alice:here", "A1"),
        message("m1", "@bob:here", "B1"),
        message("m1", "@bob:here", "gone"),
        message("m1", "@nobody:here", "*"),
        message("m1", "@carol:elsewhere", "C1"),
    ];
    for _ in 0..2 {
        store.store_to_device("there", &first).await.unwrap();
    }
    store
        .store_to_device("there", &[message("m2", "@bob:here", "B1")])
        .await
        .unwrap();
    assert_eq!(
        rows(
            &store,
            "SELECT message_id, user_id, device_id, content->>'to' FROM to_device_inbox ORDER BY 1, 2, 3"
        )
        .await,
        [
            ["m1", "@alice:here", "A1", "@alice:here A1"],
            ["m1", "@alice:here", "A2", "@alice:here *"],
            ["m1", "@bob:here", "B1", "@bob:here B1"],
            ["m2", "@bob:here", "B1", "@bob:here B1"]
        ]
    );
}

/// A device's waiting to-device messages go when the device does (a
/// logout); other devices' stay.
#[tokio::test]
async fn a_deleted_devices_to_device_messages_go_with_it() {
    let store = test_util::store().await;
    people(&store, &[("@alice:here", &["A1", "A2"])], &[]).await;
    let message = ToDeviceMessage {
        sender: "@s:there".to_owned(),
        event_type: "m.room_key_request".to_owned(),
        message_id: "m1".to_owned(),
        user_id: "@alice:here".to_owned(),
        device_id: "*".to_owned(),
        content: json!({}),
    };
    store.store_to_device("there", &[message]).await.unwrap();
    store.delete_device("@alice:here", "A1").await.unwrap();
    assert_eq!(
        rows(&store, "SELECT device_id FROM to_device_inbox").await,
        [["A2"]]
    );
}

/// The upgrade to V9 moves what received_edus held of device list updates,
/// signing key updates and to-device messages to their tables, by the same
/// rules as new EDUs, and leaves it only typing and presence.
#[tokio::test]
async fn the_v9_migration_moves_kept_edus_where_they_belong() {
    let store = test_util::store().await;
    people(&store, &[("@alice:here", &["A1"])], &["@a:there"]).await;
    let legacy = [
        (
            "m.device_list_update",
            json!({ "user_id": "@a:there", "device_id": "D1", "stream_id": 1 }),
        ),
        (
            "m.device_list_update",
            json!({ "user_id": "@a:there", "device_id": "D1", "stream_id": 2 }),
        ),
        (
            "m.device_list_update",
            json!({ "user_id": "@a:there", "device_id": "D2", "stream_id": 1.5 }),
        ),
        (
            "m.device_list_update",
            json!({ "user_id": "@stranger:there", "device_id": "D1", "stream_id": 1 }),
        ),
        (
            "m.signing_key_update",
            json!({ "user_id": "@a:there", "master_key": { "v": 1 } }),
        ),
        (
            "m.direct_to_device",
            json!({ "sender": "@a:there", "type": "t", "message_id": "m1",
                    "messages": { "@alice:here": { "*": { "n": 1 }, "A9": { "n": 2 } },
                                  "@bob:here": "nonsense" } }),
        ),
        (
            "m.direct_to_device",
            json!({ "sender": "@a:elsewhere", "type": "t", "message_id": "m2",
                    "messages": { "@alice:here": { "A1": { "n": 3 } } } }),
        ),
        ("m.direct_to_device", json!({ "messages": 7 })),
        ("m.typing", json!({ "room_id": "!r:here" })),
        ("m.presence", json!({ "push": [] })),
        ("com.example.custom", json!({})),
    ];
    let edus: Vec<(i32, String, serde_json::Value)> = legacy
        .iter()
        .zip(0..)
        .map(|((kind, content), i)| (i, kind.to_string(), content.clone()))
        .collect();
    store.store_edus("there", "t1", &edus).await.unwrap();

    super::run_migration_from(
        &store,
        include_str!("../../migrations/V9__edus_where_they_belong.sql"),
        "-- What received_edus already holds",
    )
    .await;

    assert_eq!(
        rows(
            &store,
            "SELECT user_id, device_id, stream_id::text FROM remote_device_list_updates"
        )
        .await,
        [["@a:there", "D1", "2"]]
    );
    assert_eq!(
        rows(
            &store,
            "SELECT user_id, keys->'master_key'->>'v' FROM remote_signing_keys"
        )
        .await,
        [["@a:there", "1"]]
    );
    assert_eq!(
        rows(
            &store,
            "SELECT user_id, device_id, sender, content->>'n' FROM to_device_inbox"
        )
        .await,
        [["@alice:here", "A1", "@a:there", "1"]]
    );
    assert_eq!(
        rows(&store, "SELECT edu_type FROM received_edus ORDER BY id").await,
        [["m.typing"], ["m.presence"]]
    );
}
