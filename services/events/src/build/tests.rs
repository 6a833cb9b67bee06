use ruma::RoomVersionId;
use serde_json::json;

use super::*;
use crate::room_setup::Preset;
use crate::room_state::CreateError;
use crate::room_state::tests::{create_room, setup};
use crate::test_support::{key, server, template};

#[test]
fn content_must_be_a_canonical_object() {
    let (room, _) = create_room(&setup(RoomVersionId::V12, Preset::PrivateChat, &[]));
    let bad = [
        json!("text"),
        json!([1]),
        json!({"n": 1.5}),
        json!({"n": 9007199254740993u64}),
    ];
    for content in bad {
        let err = room.create_event(
            &template("alice", "m.room.message", None, content.clone()),
            key(),
            server(),
        );
        assert!(
            matches!(
                err,
                Err(CreateError::Build(
                    BuildError::ContentNotObject | BuildError::NonCanonicalContent(_)
                ))
            ),
            "{content}: {err:?}"
        );
    }
}

#[test]
fn oversized_events_are_refused() {
    let (room, _) = create_room(&setup(RoomVersionId::V12, Preset::PrivateChat, &[]));
    let body = "x".repeat(70_000);
    let err = room.create_event(
        &template("alice", "m.room.message", None, json!({"body": body})),
        key(),
        server(),
    );
    assert!(
        matches!(err, Err(CreateError::Build(BuildError::TooLarge(n))) if n > 65_536),
        "{err:?}"
    );
    let body = "x".repeat(60_000);
    assert!(
        room.create_event(
            &template("alice", "m.room.message", None, json!({"body": body})),
            key(),
            server()
        )
        .is_ok()
    );
}

#[test]
fn member_content_must_have_a_membership() {
    let (room, _) = create_room(&setup(RoomVersionId::V11, Preset::PrivateChat, &[]));
    let err = room.create_event(
        &template(
            "alice",
            "m.room.member",
            Some("@bob:test.local"),
            json!({"foo": 1}),
        ),
        key(),
        server(),
    );
    assert!(
        matches!(err, Err(CreateError::Build(BuildError::InvalidContent(_)))),
        "{err:?}"
    );
}

#[test]
fn redacts_moves_into_content_from_v11() {
    for (version, top_level) in [
        (RoomVersionId::V10, true),
        (RoomVersionId::V11, false),
        (RoomVersionId::V12, false),
    ] {
        let (room, events) = create_room(&setup(version.clone(), Preset::PrivateChat, &[]));
        let target = events.last().unwrap().event_id().to_owned();
        let mut content = json!({"reason": "oops"});
        if !top_level {
            content["redacts"] = json!(target);
        }
        let mut t = template("alice", "m.room.redaction", None, content);
        t.redacts = Some(target.clone());
        let pdu = room.create_event(&t, key(), server()).unwrap();
        assert_eq!(
            pdu.to_object().contains_key("redacts"),
            top_level,
            "{version}"
        );
        assert_eq!(pdu.redacts(), Some(&*target), "{version}");
    }
}
