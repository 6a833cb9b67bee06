//! Loading a room's in-memory state (current state events, forward
//! extremities, depth) from storage, the first time the owner needs it.

use tessera_events::room_state::RoomState;
use tessera_events::ruma::{EventId, RoomId, RoomVersionId};
use tessera_storage::{Store, StoreError};

pub async fn load_room(store: &Store, room_id: &RoomId) -> Result<Option<RoomState>, StoreError> {
    let Some(room) = store.room(room_id.as_str()).await? else {
        return Ok(None);
    };
    let version = RoomVersionId::try_from(room.room_version.as_str())
        .map_err(|e| StoreError::Corrupt(format!("room {room_id}: {e}")))?;
    let mut state = Vec::new();
    for stored in store.current_state(room_id.as_str()).await? {
        state.push(stored.pdu()?);
    }
    let extremities = room
        .forward_extremities
        .iter()
        .map(|id| EventId::parse(id.as_str()).map_err(|e| StoreError::Corrupt(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    RoomState::from_parts(
        room_id.to_owned(),
        version.clone(),
        state,
        extremities,
        room.depth as u64,
        room.state_group
            .map(|(id, chain)| (id, chain.max(0) as u32)),
    )
    .map(Some)
    .ok_or_else(|| StoreError::Corrupt(format!("room {room_id} has unsupported version {version}")))
}
