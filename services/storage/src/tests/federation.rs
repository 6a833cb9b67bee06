//! Inbound transaction records: kept for retries, pruned by age.

use std::time::Duration;

use serde_json::json;

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
