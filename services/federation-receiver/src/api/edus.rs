//! A transaction's EDUs: read receipts kept as each remote reader's newest
//! receipt per room (`remote_receipts`), every other type kept as it came
//! (`received_edus`) until the features that consume them exist.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use tessera_matrix_http::MatrixError;
use tessera_storage::federation::RemoteReceipt;

use crate::state::AppState;

/// Keeps a transaction's EDUs (those with a type and content).
pub async fn keep(
    state: &AppState,
    origin: &str,
    txn: &str,
    edus: Vec<Value>,
) -> Result<(), MatrixError> {
    let mut receipts = Vec::new();
    let mut others = Vec::new();
    for mut edu in edus {
        let Some(kind) = edu
            .get("edu_type")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            continue;
        };
        let Some(content) = edu.get_mut("content").map(Value::take) else {
            continue;
        };
        // Label values from a fixed list: a remote names the type.
        let label = match kind.as_str() {
            "m.typing"
            | "m.receipt"
            | "m.presence"
            | "m.device_list_update"
            | "m.direct_to_device"
            | "m.signing_key_update" => kind.clone(),
            _ => "other".to_owned(),
        };
        metrics::counter!("tessera_federation_server_received_edus_total", "type" => label)
            .increment(1);
        if kind == "m.receipt" {
            receipts.extend(receipts_of(origin, &content));
        } else {
            others.push((kind, content));
        }
    }
    let receipts = in_rooms_with(state, origin, receipts).await?;
    let (kept_receipts, kept_others) = tokio::join!(state.store.store_receipts(&receipts), async {
        if others.is_empty() {
            Ok(())
        } else {
            state.store.store_edus(origin, txn, &others).await
        }
    });
    kept_receipts?;
    kept_others?;
    Ok(())
}

/// The receipts of an `m.receipt` EDU's content that `origin` may send:
/// those of its own users, with event IDs. The rest is dropped, as Synapse
/// drops it.
fn receipts_of(origin: &str, content: &Value) -> Vec<RemoteReceipt> {
    let mut receipts = Vec::new();
    let Some(rooms) = content.as_object() else {
        return receipts;
    };
    for (room_id, by_type) in rooms {
        for (receipt_type, by_user) in by_type.as_object().into_iter().flatten() {
            for (user_id, receipt) in by_user.as_object().into_iter().flatten() {
                let from_origin = user_id
                    .split_once(':')
                    .is_some_and(|(_, server)| server == origin);
                let event_ids: Option<Vec<String>> = receipt
                    .get("event_ids")
                    .and_then(Value::as_array)
                    .and_then(|ids| {
                        ids.iter()
                            .map(|id| id.as_str().map(str::to_owned))
                            .collect()
                    })
                    .filter(|ids: &Vec<String>| !ids.is_empty());
                let (true, Some(event_ids)) = (from_origin, event_ids) else {
                    tracing::debug!(%origin, %room_id, %user_id, "dropped a receipt");
                    continue;
                };
                let data = receipt
                    .get("data")
                    .filter(|d| d.is_object())
                    .cloned()
                    .unwrap_or_else(|| Value::Object(Default::default()));
                receipts.push(RemoteReceipt {
                    room_id: room_id.clone(),
                    receipt_type: receipt_type.clone(),
                    user_id: user_id.clone(),
                    thread_id: data
                        .get("thread_id")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    ts: data.get("ts").and_then(Value::as_i64).unwrap_or(0),
                    event_ids,
                    data,
                    origin: origin.to_owned(),
                });
            }
        }
    }
    receipts
}

/// The receipts for rooms `origin` has a joined member in (one lookup per
/// room): a server not in a room has no reader there.
async fn in_rooms_with(
    state: &AppState,
    origin: &str,
    receipts: Vec<RemoteReceipt>,
) -> Result<Vec<RemoteReceipt>, MatrixError> {
    let rooms: HashSet<&str> = receipts.iter().map(|r| r.room_id.as_str()).collect();
    let mut member_of = HashMap::new();
    for room in rooms {
        member_of.insert(
            room.to_owned(),
            state.store.server_in_room(room, origin).await?,
        );
    }
    Ok(receipts
        .into_iter()
        .filter(|r| member_of.get(&r.room_id).copied().unwrap_or(false))
        .collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::receipts_of;

    #[test]
    fn only_the_origins_own_users_receipts_with_event_ids_are_kept() {
        let content = json!({
            "!room:here": {
                "m.read": {
                    "@ann:there": { "event_ids": ["$a"], "data": { "ts": 5 } },
                    "@bob:there": { "event_ids": ["$b"], "data": { "ts": 6, "thread_id": "$root" } },
                    "@eve:elsewhere": { "event_ids": ["$c"], "data": { "ts": 7 } },
                    "@cat:there": { "event_ids": [], "data": { "ts": 8 } },
                    "@dan:there": { "data": { "ts": 9 } },
                    "@fay:there": { "event_ids": ["$f"] }
                },
                "m.fancy": "not an object"
            },
            "!other:here": ["not", "an", "object"]
        });
        let kept: Vec<(String, String, i64)> = receipts_of("there", &content)
            .into_iter()
            .map(|r| (r.user_id, r.thread_id, r.ts))
            .collect();
        assert_eq!(
            kept,
            [
                ("@ann:there".to_owned(), String::new(), 5),
                ("@bob:there".to_owned(), "$root".to_owned(), 6),
                ("@fay:there".to_owned(), String::new(), 0),
            ]
        );
        assert!(receipts_of("there", &json!("nonsense")).is_empty());
    }
}
