//! Inbound transaction records (kept for retries), kept EDUs (pruned by age)
//! and remote read receipts (the newest per reader).

use std::time::Duration;

use serde_json::json;

use crate::federation::RemoteReceipt;
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
    let edus: Vec<(String, serde_json::Value)> = (0..3)
        .map(|i| ("m.receipt".to_owned(), json!({ "n": i })))
        .collect();
    for (origin, txn) in [
        ("remote.example", "t1"),
        ("remote.example", "t1"),
        ("remote.example", "t2"),
        ("other.example", "t1"),
    ] {
        store.store_edus(origin, txn, &edus).await.unwrap();
    }
    let kept: Vec<(String, String, i64)> = store
        .query(
            "SELECT origin, txn_id, count(*) FROM received_edus GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let row = |origin: &str, txn: &str| (origin.to_owned(), txn.to_owned(), 3);
    assert_eq!(
        kept,
        [
            row("other.example", "t1"),
            row("remote.example", "t1"),
            row("remote.example", "t2")
        ]
    );
}

/// Old EDUs of the listed types go; other types, and young ones, stay.
#[tokio::test]
async fn old_edus_of_the_given_types_are_pruned() {
    let store = test_util::store().await;
    let edus: Vec<(String, serde_json::Value)> =
        ["m.typing", "m.typing", "m.presence", "m.receipt"]
            .iter()
            .map(|kind| (kind.to_string(), json!({ "age": "old" })))
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
    let young = vec![("m.typing".to_owned(), json!({ "age": "young" }))];
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
    let left: Vec<(String, String)> = store
        .query(
            "SELECT edu_type, content->>'age' FROM received_edus ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        left,
        [
            ("m.receipt".to_owned(), "old".to_owned()),
            ("m.typing".to_owned(), "young".to_owned())
        ]
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
    let kept: Vec<(String, serde_json::Value)> = store
        .query(
            "SELECT user_id, event_ids FROM remote_receipts ORDER BY user_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        kept,
        [
            ("@a:there".to_owned(), json!(["$3"])),
            ("@b:there".to_owned(), json!(["$1"]))
        ]
    );
}
