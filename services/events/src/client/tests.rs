use ruma::RoomVersionId;
use serde_json::json;

use super::*;
use crate::room_setup::Preset;
use crate::room_state::tests::{alice_says, create_room, setup};
use crate::test_support::{key, server, template};

#[test]
fn client_format_drops_federation_fields() {
    let (room, events) = create_room(&setup(RoomVersionId::V12, Preset::PrivateChat, &[]));
    let name = events
        .iter()
        .find(|p| p.kind().to_string() == "m.room.name")
        .unwrap();
    let event = client_event(
        name,
        room.rules(),
        &Unsigned::default(),
        name.origin_server_ts() + 5,
        false,
    );
    for absent in [
        "auth_events",
        "prev_events",
        "hashes",
        "signatures",
        "depth",
        "room_id",
    ] {
        assert!(event.get(absent).is_none(), "{absent} leaked: {event}");
    }
    assert_eq!(event["event_id"], json!(name.event_id()));
    assert_eq!(event["state_key"], "");
    assert_eq!(event["content"]["name"], "Test room");
    assert_eq!(event["unsigned"]["age"], 5);
    let with_room = client_event(name, room.rules(), &Unsigned::default(), 0, true);
    assert_eq!(with_room["room_id"], json!(room.room_id()));
}

#[test]
fn redacted_events_lose_their_content() {
    let (room, events) = create_room(&setup(RoomVersionId::V11, Preset::PrivateChat, &[]));
    let message = alice_says(&room, "secret");
    let mut r = template(
        "alice",
        "m.room.redaction",
        None,
        json!({"redacts": message.event_id()}),
    );
    r.redacts = Some(message.event_id().to_owned());
    let redaction = room.create_event(&r, key(), server()).unwrap();
    let unsigned = Unsigned {
        redacted_because: Some(&redaction),
        ..Default::default()
    };
    let event = client_event(&message, room.rules(), &unsigned, 0, false);
    assert_eq!(event["content"], json!({}));
    assert_eq!(
        event["unsigned"]["redacted_because"]["event_id"],
        json!(redaction.event_id())
    );
    // A redacted membership keeps its membership.
    let join = &events[1];
    let event = client_event(join, room.rules(), &unsigned, 0, false);
    assert_eq!(event["content"], json!({"membership": "join"}));
}
