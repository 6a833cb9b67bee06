//! A transaction's EDUs, each type kept where the feature that will read it
//! wants it, and only what its origin may send: read receipts as each
//! remote reader's newest per room (`remote_receipts`), device list updates
//! as each remote device's newest (`remote_device_list_updates`),
//! cross-signing keys as each remote user's latest (`remote_signing_keys`),
//! to-device messages per device of ours (`to_device_inbox`), typing (in
//! rooms the origin is in) and presence as they came (`received_edus`,
//! pruned after an hour). Other
//! types are dropped, as Synapse drops them.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use tessera_matrix_http::MatrixError;
use tessera_storage::federation::{
    DeviceListUpdate, RemoteReceipt, SigningKeyUpdate, ToDeviceMessage,
};

use crate::state::AppState;

/// What a transaction's EDUs come to, by where each is kept.
#[derive(Default)]
struct Kept {
    receipts: Vec<RemoteReceipt>,
    device_lists: Vec<DeviceListUpdate>,
    signing_keys: Vec<SigningKeyUpdate>,
    to_device: Vec<ToDeviceMessage>,
    /// Typing notices: (room, place in the transaction, content).
    typing: Vec<(String, i32, Value)>,
    /// Presence: (place in the transaction, content).
    presence: Vec<(i32, Value)>,
}

/// Keeps a transaction's EDUs (those with a type and content).
pub async fn keep(
    state: &AppState,
    origin: &str,
    txn: &str,
    edus: Vec<Value>,
) -> Result<(), MatrixError> {
    let mut kept = Kept::default();
    for (mut edu, position) in edus.into_iter().zip(0..) {
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
        let handled = match kind.as_str() {
            "m.receipt" => {
                kept.receipts.extend(receipts_of(origin, &content));
                true
            }
            "m.device_list_update" => {
                kept.device_lists
                    .extend(device_list_update_of(origin, content));
                true
            }
            "m.signing_key_update" => {
                kept.signing_keys
                    .extend(signing_key_update_of(origin, &content));
                true
            }
            "m.direct_to_device" => {
                kept.to_device.extend(to_device_of(origin, &content));
                true
            }
            "m.typing" => {
                kept.typing
                    .extend(typing_of(origin, &content).map(|room| (room, position, content)));
                true
            }
            "m.presence" => {
                kept.presence
                    .extend(presence_of(origin, content).map(|content| (position, content)));
                true
            }
            _ => {
                tracing::debug!(%origin, edu_type = %kind, "dropped an EDU of a type we do not handle");
                false
            }
        };
        // Label values from the fixed list above: a remote names the type.
        let label = if handled { kind } else { "other".to_owned() };
        metrics::counter!("tessera_federation_server_received_edus_total", "type" => label)
            .increment(1);
    }
    let receipts = in_rooms_with(state, origin, kept.receipts, |r| &r.room_id).await?;
    let typing = in_rooms_with(state, origin, kept.typing, |t| &t.0).await?;
    let ephemeral: Vec<(i32, String, Value)> = typing
        .into_iter()
        .map(|(_, position, content)| (position, "m.typing".to_owned(), content))
        .chain(
            kept.presence
                .into_iter()
                .map(|(position, content)| (position, "m.presence".to_owned(), content)),
        )
        .collect();
    let store = &state.store;
    let (receipts, device_lists, signing_keys, to_device, ephemeral) = tokio::join!(
        store.store_receipts(&receipts),
        store.store_device_list_updates(origin, &kept.device_lists),
        store.store_signing_key_updates(origin, &kept.signing_keys),
        store.store_to_device(origin, &kept.to_device),
        store.store_edus(origin, txn, &ephemeral),
    );
    receipts?;
    device_lists?;
    signing_keys?;
    to_device?;
    ephemeral?;
    Ok(())
}

/// Whether `user_id` is a user of `server`.
fn of_server(user_id: &str, server: &str) -> bool {
    user_id
        .split_once(':')
        .is_some_and(|(_, server_of_user)| server_of_user == server)
}

/// The room of an `m.typing` of one of `origin`'s users.
fn typing_of(origin: &str, content: &Value) -> Option<String> {
    let room_id = content.get("room_id")?.as_str()?;
    let user_id = content.get("user_id")?.as_str()?;
    content.get("typing")?.as_bool()?;
    if !of_server(user_id, origin) {
        tracing::debug!(%origin, %user_id, "dropped a typing notice of another server's user");
        return None;
    }
    Some(room_id.to_owned())
}

/// An `m.presence` cut down to the updates of `origin`'s own users (with
/// a presence), if any.
fn presence_of(origin: &str, mut content: Value) -> Option<Value> {
    let push = content.get_mut("push")?.as_array_mut()?;
    push.retain(|update| {
        let user = update.get("user_id").and_then(Value::as_str);
        user.is_some_and(|user| of_server(user, origin))
            && update.get("presence").is_some_and(Value::is_string)
    });
    (!push.is_empty()).then_some(content)
}

/// An `m.device_list_update` of one of `origin`'s users, with a device ID
/// and a stream ID.
fn device_list_update_of(origin: &str, content: Value) -> Option<DeviceListUpdate> {
    let user_id = content.get("user_id")?.as_str()?.to_owned();
    let device_id = content.get("device_id")?.as_str()?.to_owned();
    let stream_id = content.get("stream_id")?.as_i64()?;
    if !of_server(&user_id, origin) {
        tracing::debug!(%origin, %user_id, "dropped a device list update for another server's user");
        return None;
    }
    Some(DeviceListUpdate {
        user_id,
        device_id,
        stream_id,
        content,
    })
}

/// An `m.signing_key_update` of one of `origin`'s users: the master and
/// self-signing keys it carries (objects).
fn signing_key_update_of(origin: &str, content: &Value) -> Option<SigningKeyUpdate> {
    let user_id = content.get("user_id")?.as_str()?;
    if !of_server(user_id, origin) {
        tracing::debug!(%origin, %user_id, "dropped a signing key update for another server's user");
        return None;
    }
    let keys: serde_json::Map<String, Value> = ["master_key", "self_signing_key"]
        .into_iter()
        .filter_map(|name| {
            let key = content.get(name).filter(|k| k.is_object())?;
            Some((name.to_owned(), key.clone()))
        })
        .collect();
    (!keys.is_empty()).then(|| SigningKeyUpdate {
        user_id: user_id.to_owned(),
        keys,
    })
}

/// The messages of an `m.direct_to_device` EDU whose sender is one of
/// `origin`'s users (which of them are for our devices the store decides).
fn to_device_of(origin: &str, content: &Value) -> Vec<ToDeviceMessage> {
    let field = |name: &str| content.get(name).and_then(Value::as_str);
    let (Some(sender), Some(event_type), Some(message_id), Some(by_user)) = (
        field("sender"),
        field("type"),
        field("message_id"),
        content.get("messages").and_then(Value::as_object),
    ) else {
        return Vec::new();
    };
    if !of_server(sender, origin) {
        tracing::debug!(%origin, %sender, "dropped to-device messages from another server's user");
        return Vec::new();
    }
    let mut messages = Vec::new();
    for (user_id, by_device) in by_user {
        for (device_id, message) in by_device.as_object().into_iter().flatten() {
            if message.is_object() {
                messages.push(ToDeviceMessage {
                    sender: sender.to_owned(),
                    event_type: event_type.to_owned(),
                    message_id: message_id.to_owned(),
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                    content: message.clone(),
                });
            }
        }
    }
    messages
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
                let from_origin = of_server(user_id, origin);
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

/// The `items` (receipts, typing notices) for rooms `origin` has a joined
/// member in (one lookup per room): a server not in a room has no reader or
/// typist there.
async fn in_rooms_with<T>(
    state: &AppState,
    origin: &str,
    items: Vec<T>,
    room_of: impl Fn(&T) -> &String,
) -> Result<Vec<T>, MatrixError> {
    let rooms: HashSet<&String> = items.iter().map(&room_of).collect();
    let mut member_of = HashMap::new();
    for room in rooms {
        member_of.insert(
            room.clone(),
            state.store.server_in_room(room, origin).await?,
        );
    }
    Ok(items
        .into_iter()
        .filter(|item| member_of.get(room_of(item)).copied().unwrap_or(false))
        .collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{
        device_list_update_of, presence_of, receipts_of, signing_key_update_of, to_device_of,
        typing_of,
    };

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

    #[test]
    fn device_list_updates_need_the_origins_user_a_device_and_a_stream_id() {
        let update =
            json!({ "user_id": "@ann:there", "device_id": "D", "stream_id": 7, "deleted": true });
        let kept = device_list_update_of("there", update.clone()).expect("kept");
        assert_eq!(
            (
                kept.user_id.as_str(),
                kept.device_id.as_str(),
                kept.stream_id
            ),
            ("@ann:there", "D", 7)
        );
        assert_eq!(kept.content, update, "the content as sent");
        for bad in [
            json!({ "user_id": "@ann:elsewhere", "device_id": "D", "stream_id": 7 }),
            json!({ "user_id": "@ann:there", "stream_id": 7 }),
            json!({ "user_id": "@ann:there", "device_id": "D", "stream_id": "7" }),
            json!({ "user_id": "@ann:there", "device_id": "D", "stream_id": 1.5 }),
            json!("nonsense"),
        ] {
            assert_eq!(device_list_update_of("there", bad.clone()), None, "{bad}");
        }
    }

    #[test]
    fn signing_key_updates_keep_the_origins_users_key_objects() {
        let kept = signing_key_update_of(
            "there",
            &json!({ "user_id": "@ann:there", "master_key": { "k": 1 }, "self_signing_key": 5, "other": {} }),
        )
        .expect("kept");
        assert_eq!(kept.user_id, "@ann:there");
        assert_eq!(
            serde_json::Value::Object(kept.keys),
            json!({ "master_key": { "k": 1 } })
        );
        assert_eq!(
            signing_key_update_of("there", &json!({ "user_id": "@ann:there" })),
            None,
            "no key"
        );
        assert_eq!(
            signing_key_update_of(
                "there",
                &json!({ "user_id": "@ann:elsewhere", "master_key": {} })
            ),
            None,
            "another server's user"
        );
    }

    #[test]
    fn to_device_messages_need_the_origins_sender_and_object_contents() {
        let content = json!({
            "sender": "@ann:there", "type": "m.room_key_request", "message_id": "m1",
            "messages": {
                "@bob:here": { "*": { "n": 1 }, "PHONE": { "n": 2 }, "TV": "not an object" },
                "@cat:here": "not an object"
            }
        });
        let kept: Vec<(String, String, serde_json::Value)> = to_device_of("there", &content)
            .into_iter()
            .map(|m| {
                assert_eq!(
                    (
                        m.sender.as_str(),
                        m.event_type.as_str(),
                        m.message_id.as_str()
                    ),
                    ("@ann:there", "m.room_key_request", "m1")
                );
                (m.user_id, m.device_id, m.content)
            })
            .collect();
        assert_eq!(
            kept,
            [
                ("@bob:here".to_owned(), "*".to_owned(), json!({ "n": 1 })),
                (
                    "@bob:here".to_owned(),
                    "PHONE".to_owned(),
                    json!({ "n": 2 })
                )
            ]
        );
        assert!(
            to_device_of("elsewhere", &content).is_empty(),
            "another server's sender"
        );
        let mut no_id = content.clone();
        no_id.as_object_mut().unwrap().remove("message_id");
        assert!(to_device_of("there", &no_id).is_empty(), "no message_id");
    }

    #[test]
    fn typing_and_presence_are_the_origins_users_own() {
        let typing = |user: &str| json!({ "room_id": "!r:here", "user_id": user, "typing": true });
        assert_eq!(
            typing_of("there", &typing("@ann:there")).as_deref(),
            Some("!r:here")
        );
        assert_eq!(typing_of("there", &typing("@ann:elsewhere")), None);
        assert_eq!(
            typing_of(
                "there",
                &json!({ "room_id": "!r:here", "user_id": "@ann:there" })
            ),
            None,
            "no typing flag"
        );

        let presence = json!({ "push": [
            { "user_id": "@ann:there", "presence": "online", "last_active_ago": 5 },
            { "user_id": "@eve:elsewhere", "presence": "online" },
            { "user_id": "@bob:there" },
            "nonsense"
        ]});
        assert_eq!(
            presence_of("there", presence),
            Some(json!({ "push": [
                { "user_id": "@ann:there", "presence": "online", "last_active_ago": 5 }
            ]}))
        );
        assert_eq!(
            presence_of(
                "there",
                json!({ "push": [{ "user_id": "@eve:elsewhere", "presence": "online" }] })
            ),
            None
        );
        assert_eq!(presence_of("there", json!({ "push": 3 })), None);
    }
}
