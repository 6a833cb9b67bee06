//! Memberships in rooms this server does not host: storing an invite another
//! server sent for one of our users, and the user's rejection of it.
//!
//! We know nothing of such a room but the invite, so there is no state to
//! build on or check against: the invite was checked by the federation-receiver
//! (format, hashes, the inviting server's signature) and the rejection is
//! built on the invite alone (prev and auth events: the invite), as Synapse
//! does when it cannot reach the inviting server. Both take a position in the
//! room's partition and are published like any event, so the invitee's /sync
//! wakes and shows them.

use tessera_events::Pdu;
use tessera_events::build::{EventTemplate, Placement, build_event};
use tessera_events::ruma::events::StateEventType;
use tessera_events::ruma::{RoomId, RoomVersionId};
use tessera_storage::StoreError;
use tessera_storage::persist::{Batch, EventToPersist, OutOfBand, StateChange};

use crate::engine::Engine;
use crate::process::{Answer, Refusal};

/// An invite to store, checked and counter-signed by the receiver.
pub struct Invite {
    pub pdu: Pdu,
    pub room_version: RoomVersionId,
    /// The stripped state sent with it, as a JSON array.
    pub stripped_state: String,
}

/// Store an invite unless the room is hosted here (then it arrives through
/// /send like any event). Answers whether it was stored.
pub async fn store_invite(
    engine: &Engine,
    room_id: &RoomId,
    invite: Invite,
    epoch: i64,
) -> Result<bool, StoreError> {
    if engine.store.room(room_id.as_str()).await?.is_some() {
        return Ok(false);
    }
    if engine
        .store
        .out_of_band_membership(invite.pdu.event_id().as_str())
        .await?
        .is_some()
    {
        return Ok(true);
    }
    let out_of_band = OutOfBand {
        room_version: invite.room_version.to_string(),
        stripped_state: invite.stripped_state,
    };
    match persist(engine, room_id, &invite.pdu, out_of_band, epoch).await {
        Ok(()) => {
            metrics::counter!("tessera_room_worker_out_of_band_invites_total").increment(1);
            Ok(true)
        }
        // The same invite stored by a concurrent retry.
        Err(StoreError::Conflict(_)) => Ok(true),
        Err(error) => Err(error),
    }
}

/// A client's leave in a room we do not host: when the user's latest
/// membership there is an invite we received, reject it locally (the answer
/// for the one-event job). `None` when there is no such invite (the room is
/// simply unknown).
pub async fn reject_invite(
    engine: &Engine,
    room_id: &RoomId,
    template: &EventTemplate,
    epoch: i64,
) -> Option<Answer> {
    let is_own_leave = template.kind == "m.room.member"
        && template.state_key.as_deref() == Some(template.sender.as_str())
        && template.content.get("membership").and_then(|m| m.as_str()) == Some("leave");
    if !is_own_leave {
        return None;
    }
    let latest = match engine
        .store
        .latest_out_of_band(room_id.as_str(), template.sender.as_str())
        .await
    {
        Ok(latest) => latest?,
        Err(error) => return Some(Answer::Retry(error.to_string())),
    };
    if latest.membership.as_deref() != Some("invite") {
        return None;
    }
    let version = RoomVersionId::try_from(latest.room_version.as_str()).ok()?;
    let rules = version.rules()?;
    let invite = latest.pdu().ok()?;
    let invite_id = invite.event_id().to_owned();
    let placement = Placement {
        room_id,
        rules: &rules,
        prev_events: std::slice::from_ref(&invite_id),
        prev_depth: invite.depth(),
    };
    let own_membership = |kind: &StateEventType, key: &str| {
        (*kind == StateEventType::RoomMember && key == template.sender.as_str())
            .then(|| invite_id.clone())
    };
    let leave = match build_event(
        template,
        &placement,
        own_membership,
        &engine.key,
        &engine.server_name,
    ) {
        Ok(pdu) => pdu,
        Err(error) => {
            return Some(Answer::Events(vec![Err(Refusal::new(
                "M_BAD_JSON",
                error.to_string(),
            ))]));
        }
    };
    let out_of_band = OutOfBand {
        room_version: latest.room_version,
        stripped_state: "[]".to_owned(),
    };
    Some(
        match persist(engine, room_id, &leave, out_of_band, epoch).await {
            Ok(()) => Answer::Events(vec![Ok(leave.event_id().to_owned())]),
            Err(error) => Answer::Retry(error.to_string()),
        },
    )
}

/// Persist one out-of-band membership event (fenced) and publish it.
async fn persist(
    engine: &Engine,
    room_id: &RoomId,
    pdu: &Pdu,
    out_of_band: OutOfBand,
    epoch: i64,
) -> Result<(), StoreError> {
    let partition = tessera_cluster::partition_of(room_id.as_str(), engine.partitions);
    let membership = pdu.membership();
    let state_key = pdu.state_key().unwrap_or_default().to_owned();
    let mut batch = Batch::new(partition, &engine.worker_id, epoch, room_id.as_str());
    batch.events.push(EventToPersist {
        event_id: pdu.event_id().to_string(),
        kind: pdu.kind().to_string(),
        state_key: Some(state_key.clone()),
        sender: pdu.sender().to_string(),
        origin_server_ts: pdu.origin_server_ts() as i64,
        depth: pdu.depth() as i64,
        membership: membership.clone(),
        json: pdu.canonical_json().to_owned(),
        state_changes: vec![StateChange {
            kind: pdu.kind().to_string(),
            state_key,
            event_id: Some(pdu.event_id().to_string()),
            membership,
        }],
        origin: Some(pdu.sender().server_name().to_string()),
        ..EventToPersist::default()
    });
    batch.out_of_band = Some(out_of_band);
    let _order = engine.partition_lock(partition).lock().await;
    let positions = engine.store.persist(&batch).await?;
    let entries = [batch.events[0].entry(room_id.as_str(), positions[0], false)];
    engine.publisher.publish(partition, &entries).await;
    Ok(())
}
