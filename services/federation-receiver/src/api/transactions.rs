//! `PUT /_matrix/federation/v1/send/{txnId}`: the spec's limits, per-origin
//! rate limit, then each PDU's checks (room known, format, signatures,
//! content hash), grouped by room and staged at each room's owner, which
//! also applies the room's server ACL. Answered when every group is staged;
//! processing goes on per room. The same transaction ID from the same origin
//! gets the same answer. The transaction's EDUs are kept beside all this
//! (`edus.rs`), whatever becomes of its PDUs.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Map, Value, json};
use tessera_cluster::router::RouteError;
use tessera_events::ruma::room_version_rules::RoomVersionRules;
use tessera_events::ruma::signatures::PublicKeyMap;
use tessera_events::ruma::{CanonicalJsonObject, OwnedRoomId};
use tessera_federation::pdu::{self, Checked, Prepared};
use tessera_matrix_http::MatrixError;
use tessera_proto::room_worker::{StagePdusRequest, StagedPdu};

use crate::request::Signed;
use crate::state::AppState;

const MAX_PDUS: usize = 50;
const MAX_EDUS: usize = 100;

/// An origin that used up its PDU budget is answered 429 before its
/// request's signature is checked: a sender that retries a large
/// transaction in a tight loop costs a header parse, not a signature check
/// over its whole body. The origin named in the header is not verified yet,
/// so this only ever refuses when the bucket of that origin is already
/// empty, which only authenticated requests can have done.
pub async fn refuse_throttled_origin(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use tessera_events::ruma::api::federation::authentication::XMatrix;
    if let Ok(xmatrix) = XMatrix::extract_from_http_headers(request.headers())
        && let Some(retry_after_ms) = state.origin_throttled(xmatrix.origin.as_str())
    {
        metrics::counter!("tessera_federation_backpressure_total", "reason" => "origin_rate")
            .increment(1);
        return MatrixError::limit_exceeded(retry_after_ms).into_response();
    }
    next.run(request).await
}

/// Transactions whose body is at least this large (a handful of PDUs or
/// more), or whose size is not declared, are handled on the low-priority
/// runtime.
const LARGE_TRANSACTION_BYTES: u64 = 8 * 1024;

/// A large transaction costs milliseconds of CPU (the request signature over
/// its whole body, parsing, every PDU's reference hash and signatures), and a
/// flood is a stream of them. They run on the low-priority runtime, so that
/// when the cores are short, a quiet room's small transaction is handled
/// first, and when they are not, the flood still gets every cycle left over.
/// A small one is urgent while it is handled: large ones pause between
/// PDUs until it is answered (see `tessera_runtime::bulk`).
pub async fn large_transactions_at_low_priority(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let small = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|length| length < LARGE_TRANSACTION_BYTES);
    if small {
        let _urgent = tessera_runtime::bulk::urgent();
        return next.run(request).await;
    }
    match state.bulk.spawn(next.run(request)).await {
        Ok(response) => response,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => {
            tracing::error!(%error, "a transaction's task was cancelled");
            MatrixError::unavailable("shutting down; retry the transaction").into_response()
        }
    }
}

pub async fn send(
    State(state): State<AppState>,
    Path(txn): Path<String>,
    signed: Signed,
) -> Result<Json<Value>, MatrixError> {
    let origin = signed.origin.clone();
    let mut body = signed.json()?;
    if txn.is_empty() || txn.len() > 255 {
        return Err(MatrixError::invalid_param("invalid transaction ID"));
    }
    if let Some(body_origin) = body.get("origin").and_then(Value::as_str)
        && body_origin != origin.as_str()
    {
        return Err(MatrixError::forbidden(
            "the transaction's origin is not the authenticated server",
        ));
    }
    let pdus = match body.get_mut("pdus").map(Value::take) {
        Some(Value::Array(pdus)) => pdus,
        None => vec![],
        Some(_) => return Err(MatrixError::bad_json("pdus must be an array")),
    };
    let edus = match body.get_mut("edus").map(Value::take) {
        Some(Value::Array(edus)) => edus,
        None | Some(Value::Null) => vec![],
        Some(_) => return Err(MatrixError::bad_json("edus must be an array")),
    };
    if pdus.len() > MAX_PDUS || edus.len() > MAX_EDUS {
        return Err(MatrixError::bad_json(format!(
            "a transaction holds at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs (got {} and {})",
            pdus.len(),
            edus.len()
        )));
    }
    // Every PDU and every EDU takes a token: a transaction of EDUs alone is
    // no cheaper to keep.
    let cost = (pdus.len() + edus.len()).max(1) as u64;
    if let Err(retry_after_ms) = state.take_tokens(origin.as_str(), cost) {
        metrics::counter!("tessera_federation_backpressure_total", "reason" => "origin_rate")
            .increment(1);
        return Err(MatrixError::limit_exceeded(retry_after_ms));
    }
    // A repeated transaction is rare, and staging its PDUs again changes
    // nothing (their owner skips known events), so the lookup runs beside
    // the PDUs' checks and staging rather than ahead of them: a quiet room's
    // one-PDU transaction waits for its owner, not also for a read before
    // that. EDUs take their own path beside both: they are kept whatever
    // becomes of the PDUs (a room's backlog, an unavailable owner), so a
    // flooded room never holds back another server's to-device messages or
    // device list updates; the origin's retry of the transaction brings them
    // again, and they are kept once.
    let (repeat, staged, edus_kept) = tokio::join!(
        state.store.federation_txn(origin.as_str(), &txn),
        check_and_stage(&state, origin.as_str(), pdus),
        super::edus::keep(&state, origin.as_str(), &txn, edus),
    );
    edus_kept?;
    if let Some(response) = repeat? {
        metrics::counter!("tessera_federation_server_transactions_total", "result" => "repeat")
            .increment(1);
        return Ok(Json(response));
    }
    let results = staged?;

    let response = json!({ "pdus": results });
    // The record only lets a repeated transaction be answered without being
    // processed again; processing it again would change nothing (its PDUs
    // are known by then), so the answer does not wait for the record's
    // commit, which under load is a WAL flush behind everyone else's.
    let (store, origin_name, record) = (state.store.clone(), origin.to_string(), response.clone());
    tokio::spawn(async move {
        if let Err(error) = store
            .store_federation_txn(&origin_name, &txn, &record)
            .await
        {
            tracing::warn!(origin = %origin_name, %error, "cannot record a transaction's answer");
        }
    });
    metrics::counter!("tessera_federation_server_transactions_total", "result" => "ok")
        .increment(1);
    Ok(Json(response))
}

/// Checks each PDU, hands each room's good ones to the room's owner (all
/// rooms at once) and gives the transaction's answer for every PDU. A room
/// whose server ACL denies the origin is refused by its owner, which holds
/// the room's current state.
async fn check_and_stage(
    state: &AppState,
    origin: &str,
    pdus: Vec<Value>,
) -> Result<Map<String, Value>, MatrixError> {
    // Check each PDU; group the good ones by room.
    let mut results: Map<String, Value> = Map::new();
    let mut groups: BTreeMap<String, Vec<StagedPdu>> = BTreeMap::new();
    let drop_pdu = |key: String, reason: &'static str, error: String| {
        metrics::counter!("tessera_federation_server_pdus_dropped_total", "reason" => reason)
            .increment(1);
        tracing::info!(%origin, pdu = %key, %error, "dropped a PDU");
        (key, json!({ "error": error }))
    };
    let dropped = |index: usize, (event_id, reason, error): Dropped| {
        drop_pdu(
            event_id.unwrap_or_else(|| format!("(pdu {index})")),
            reason,
            error,
        )
    };
    let mut admitted = Vec::new();
    let mut acl_checked = HashMap::new();
    for (index, pdu) in pdus.into_iter().enumerate() {
        tessera_runtime::bulk::yield_to_urgent().await;
        match admit_pdu(state, origin, &mut acl_checked, index, pdu).await {
            Ok(pdu) => admitted.push(pdu),
            Err(reason) => {
                let (key, value) = dropped(index, reason);
                results.insert(key, value);
            }
        }
    }
    for admitted in admitted {
        tessera_runtime::bulk::yield_to_urgent().await;
        let (index, room, result) = verify(admitted);
        let outcome = match result {
            Ok(checked) => sender_may_send(state, origin, &room, checked).await,
            Err(error) => Err(error),
        };
        match outcome {
            Ok(staged) => {
                results.insert(staged.event_id.clone(), json!({}));
                groups.entry(room).or_default().push(staged);
            }
            Err(reason) => {
                let (key, value) = dropped(index, reason);
                results.insert(key, value);
            }
        }
    }
    metrics::counter!("tessera_federation_server_received_pdus_total")
        .increment(results.len() as u64);

    // Stage every room's group at its owner, concurrently.
    tessera_runtime::bulk::yield_to_urgent().await;
    let staging = groups.into_iter().map(|(room_id, pdus)| {
        let event_ids: Vec<String> = pdus.iter().map(|p| p.event_id.clone()).collect();
        let request = StagePdusRequest {
            room_id: room_id.clone(),
            origin: origin.to_owned(),
            pdus,
        };
        async move {
            let result = state.router.stage_pdus(&room_id, request).await;
            (room_id, event_ids, result)
        }
    });
    for (room_id, event_ids, result) in futures::future::join_all(staging).await {
        match result {
            Ok(_) => {}
            Err(RouteError::Rejected(status)) if status.code() == tonic::Code::PermissionDenied => {
                state.remember_acl_refusal(&room_id, origin, status.message());
                for event_id in event_ids {
                    let (key, value) =
                        drop_pdu(event_id, "server_acl", status.message().to_owned());
                    results.insert(key, value);
                }
            }
            Err(RouteError::Rejected(status))
                if status.code() == tonic::Code::ResourceExhausted =>
            {
                metrics::counter!("tessera_federation_server_transactions_total", "result" => "backpressure").increment(1);
                let retry = status
                    .metadata()
                    .get("retry-after-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(2000);
                tracing::info!(%origin, room = %room_id, "room backlog over the limit: 429");
                return Err(MatrixError::limit_exceeded(retry));
            }
            Err(error) => {
                tracing::warn!(%origin, room = %room_id, %error, "cannot stage PDUs; the origin will retry");
                return Err(MatrixError::unavailable(
                    "the room's owner is unavailable; retry the transaction",
                ));
            }
        }
    }
    Ok(results)
}

/// Why a PDU was dropped: its event ID when known, a reason for the metrics
/// (one of a few fixed words) and a message for the transaction's answer.
type Dropped = (Option<String>, &'static str, String);

/// A PDU that passed the cheap checks, with the keys its signatures need.
struct Admitted {
    index: usize,
    room: String,
    room_id: OwnedRoomId,
    rules: RoomVersionRules,
    prepared: Prepared,
    keys: PublicKeyMap,
}

/// The checks that need lookups: room known here, format, keys.
/// `acl_checked`: the rooms whose current ACL this transaction has read for
/// `origin` (after a recent refusal), and whether it denies the origin.
async fn admit_pdu(
    state: &AppState,
    origin: &str,
    acl_checked: &mut HashMap<String, bool>,
    index: usize,
    pdu: Value,
) -> Result<Admitted, Dropped> {
    let object: CanonicalJsonObject = serde_json::from_value(pdu)
        .map_err(|e| (None, "format", format!("not a canonical JSON object: {e}")))?;
    let room = match object.get("room_id") {
        Some(tessera_events::ruma::CanonicalJsonValue::String(room)) => room.clone(),
        _ => return Err((None, "format", "room_id is missing".to_owned())),
    };
    let version = match state.room_version(&room).await {
        Ok(Some(version)) => version,
        Ok(None) => {
            return Err((
                None,
                "unknown_room",
                format!("room {room} is not known here"),
            ));
        }
        Err(error) => {
            return Err((
                None,
                "unavailable",
                format!("cannot look the room up: {error}"),
            ));
        }
    };
    let rules = version.rules().ok_or((
        None,
        "room_version",
        format!("unsupported room version {version}"),
    ))?;
    let event_id = || {
        tessera_events::pdu::event_id_of(&object, &rules)
            .map(|e| e.to_string())
            .ok()
    };
    let room_id =
        OwnedRoomId::try_from(room.as_str()).map_err(|e| (event_id(), "format", e.to_string()))?;
    let failed = |error: tessera_federation::pdu::PduDrop, id: Option<String>| {
        (id, drop_reason(&error), error.to_string())
    };
    let id = event_id();
    // A server the room's ACL denies costs no signature checks or key
    // fetches once its owner has said so; whether the ACL still denies it
    // is one read of the room's current ACL per transaction (it may have
    // been lifted since), which only such a server's traffic pays.
    if let Some(message) = state.acl_refusal(&room, origin) {
        let denied = match acl_checked.get(&room) {
            Some(denied) => *denied,
            None => {
                let denied = match state.store.server_acl(&room).await {
                    Ok(acl) => !tessera_events::server_acl::allows(acl.as_ref(), origin),
                    // Unknown: the owner decides, as for anyone.
                    Err(_) => false,
                };
                if !denied {
                    state.forget_acl_refusal(&room, origin);
                }
                acl_checked.insert(room.clone(), denied);
                denied
            }
        };
        if denied {
            return Err((id, "server_acl", message));
        }
    }
    let prepared = pdu::prepare(object, &rules).map_err(|e| failed(e, id.clone()))?;
    let keys = pdu::keys_for(&state.keyring, &prepared)
        .await
        .map_err(|e| failed(e, id))?;
    Ok(Admitted {
        index,
        room,
        room_id,
        rules,
        prepared,
        keys,
    })
}

fn drop_reason(drop: &tessera_federation::pdu::PduDrop) -> &'static str {
    match drop {
        tessera_federation::pdu::PduDrop::Format(_) => "format",
        tessera_federation::pdu::PduDrop::Signature(_) => "signature",
    }
}

/// Signatures, content hash and event ID: the CPU-heavy part.
fn verify(a: Admitted) -> (usize, String, Result<Checked, Dropped>) {
    let result = pdu::verify_reporting(a.prepared.object, &a.keys, &a.rules, Some(&a.room_id))
        .map_err(|(event_id, drop)| {
            (
                event_id.map(|e| e.to_string()),
                drop_reason(&drop),
                drop.to_string(),
            )
        });
    (a.index, a.room, result)
}

/// A verified PDU may come from `origin` if its sender is from there, or if
/// `origin` is in the room (relaying another server's event).
async fn sender_may_send(
    state: &AppState,
    origin: &str,
    room: &str,
    checked: Checked,
) -> Result<StagedPdu, Dropped> {
    let event_id = checked.pdu.event_id().to_string();
    if checked.pdu.sender().server_name() != origin
        && !state
            .store
            .server_in_room(room, origin)
            .await
            .unwrap_or(false)
    {
        return Err((
            Some(event_id),
            "not_in_room",
            format!("{origin} is not in the room and did not send this event"),
        ));
    }
    Ok(StagedPdu {
        event_id,
        json: checked.pdu.canonical_json().to_owned(),
        depth: i64::try_from(checked.pdu.depth()).unwrap_or(i64::MAX),
    })
}
