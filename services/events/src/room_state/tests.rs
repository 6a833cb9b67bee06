use std::collections::HashMap;
use std::sync::Arc;

use ruma::events::StateEventType;
use ruma::{EventId, OwnedEventId, RoomVersionId};
use serde_json::json;

use super::*;
use crate::build::build_create_event;
use crate::room_setup::{self, Preset, RoomSetup};
use crate::test_support::{key, server, template, user};

pub(crate) fn setup(version: RoomVersionId, preset: Preset, invite: &[&str]) -> RoomSetup {
    RoomSetup {
        creator: user("alice"),
        version,
        preset: Some(preset),
        public: false,
        name: Some("Test room".to_owned()),
        topic: Some("A topic".to_owned()),
        alias: None,
        invite: invite.iter().map(|u| user(u)).collect(),
        is_direct: false,
        initial_state: vec![],
        creation_content: Default::default(),
        power_level_override: None,
        creator_displayname: Some("Alice".to_owned()),
        creator_avatar_url: None,
        origin_server_ts: 1_700_000_000_000,
    }
}

/// Create a room the way the room-worker does and return its state and every event.
pub(crate) fn create_room(setup: &RoomSetup) -> (RoomState, Vec<Arc<Pdu>>) {
    let (create_template, rest) = room_setup::templates(setup);
    let rules = room_version::rules(&setup.version).unwrap();
    let v1_room_id;
    let room_id = if rules.authorization.room_create_event_id_as_room_id {
        None
    } else {
        v1_room_id = ruma::RoomId::parse("!abcdef:test.local").unwrap();
        Some(&*v1_room_id)
    };
    let create =
        Arc::new(build_create_event(&create_template, &rules, room_id, key(), server()).unwrap());
    let mut room = RoomState::from_create(create.clone(), setup.version.clone()).unwrap();
    let mut events = vec![create];
    for template in rest {
        let pdu = room
            .create_event(&template, key(), server())
            .unwrap_or_else(|e| panic!("{} {:?} rejected: {e}", template.kind, template.state_key));
        room.apply(pdu.clone());
        events.push(pdu);
    }
    (room, events)
}

fn versions() -> [RoomVersionId; 3] {
    room_version::supported()
}

#[test]
fn create_room_in_every_supported_version() {
    for version in versions() {
        let (room, events) = create_room(&setup(version.clone(), Preset::PrivateChat, &["bob"]));
        assert_eq!(
            room.membership("@alice:test.local").as_deref(),
            Some("join")
        );
        assert_eq!(
            room.membership("@bob:test.local").as_deref(),
            Some("invite")
        );
        let name = room.get(&StateEventType::RoomName, "").expect("name set");
        assert_eq!(name.content_value()["name"], "Test room");
        // Every event is signed by us and its ID is its reference hash.
        for pdu in &events {
            assert_eq!(pdu.event_id().as_str().len(), 44, "{}", pdu.event_id());
            let recomputed = crate::pdu::event_id_of(&pdu.to_object(), room.rules()).unwrap();
            assert_eq!(&recomputed, pdu.event_id());
            let mut keys = std::collections::BTreeMap::new();
            keys.insert(
                key().key_id(),
                ruma::serde::Base64::parse(key().public_key_base64()).unwrap(),
            );
            let mut map = std::collections::BTreeMap::new();
            map.insert("test.local".to_owned(), keys);
            let verified =
                ruma::signatures::verify_event(&map, &pdu.to_object(), room.rules()).unwrap();
            assert_eq!(verified, ruma::signatures::Verified::All);
        }
        if version == RoomVersionId::V12 {
            // Room v12: the room ID is the create event's reference hash, no server part.
            let create_hash = events[0].event_id().as_str().trim_start_matches('$');
            assert_eq!(room.room_id().as_str(), format!("!{create_hash}"));
            assert!(!events[0].to_object().contains_key("room_id"));
            // Creators are privileged by the create event, not listed in power levels.
            let pl = room.get(&StateEventType::RoomPowerLevels, "").unwrap();
            assert!(
                pl.content_value()["users"]
                    .get("@alice:test.local")
                    .is_none()
            );
        } else {
            assert!(room.room_id().as_str().ends_with(":test.local"));
            let pl = room.get(&StateEventType::RoomPowerLevels, "").unwrap();
            assert_eq!(pl.content_value()["users"]["@alice:test.local"], 100);
        }
    }
}

#[test]
fn membership_rules_are_enforced() {
    for version in versions() {
        let (mut room, _) = create_room(&setup(version.clone(), Preset::PrivateChat, &["bob"]));
        let msg = json!({"msgtype": "m.text", "body": "hi"});
        // A stranger can neither join an invite-only room nor talk in it.
        let join = |u: &str| {
            template(
                u,
                "m.room.member",
                Some(&format!("@{u}:test.local")),
                json!({"membership": "join"}),
            )
        };
        assert!(
            matches!(
                room.create_event(&join("carol"), key(), server()),
                Err(CreateError::Forbidden(_))
            ),
            "{version}"
        );
        assert!(
            room.create_event(
                &template("carol", "m.room.message", None, msg.clone()),
                key(),
                server()
            )
            .is_err()
        );
        // The invited user can join, then talk.
        let pdu = room.create_event(&join("bob"), key(), server()).unwrap();
        room.apply(pdu);
        let pdu = room
            .create_event(
                &template("bob", "m.room.message", None, msg.clone()),
                key(),
                server(),
            )
            .unwrap();
        room.apply(pdu);
        // Bob (power 0) cannot rename the room, kick or ban Alice.
        assert!(
            room.create_event(
                &template("bob", "m.room.name", Some(""), json!({"name": "x"})),
                key(),
                server()
            )
            .is_err()
        );
        let ban_alice = template(
            "bob",
            "m.room.member",
            Some("@alice:test.local"),
            json!({"membership": "ban"}),
        );
        assert!(room.create_event(&ban_alice, key(), server()).is_err());
        // Alice bans Bob; Bob can no longer talk or rejoin.
        let ban_bob = template(
            "alice",
            "m.room.member",
            Some("@bob:test.local"),
            json!({"membership": "ban", "reason": "spam"}),
        );
        let pdu = room.create_event(&ban_bob, key(), server()).unwrap();
        room.apply(pdu);
        assert_eq!(room.membership("@bob:test.local").as_deref(), Some("ban"));
        assert!(
            room.create_event(
                &template("bob", "m.room.message", None, msg.clone()),
                key(),
                server()
            )
            .is_err()
        );
        assert!(room.create_event(&join("bob"), key(), server()).is_err());
        // Unban (to leave), then a fresh invite lets him back.
        let unban = template(
            "alice",
            "m.room.member",
            Some("@bob:test.local"),
            json!({"membership": "leave"}),
        );
        let pdu = room.create_event(&unban, key(), server()).unwrap();
        room.apply(pdu);
        assert!(
            room.create_event(&join("bob"), key(), server()).is_err(),
            "still invite-only"
        );
    }
}

#[test]
fn public_rooms_allow_joins_and_knock_rooms_allow_knocks() {
    for version in versions() {
        let mut s = setup(version.clone(), Preset::PublicChat, &[]);
        s.public = true;
        let (mut room, _) = create_room(&s);
        let join = template(
            "dave",
            "m.room.member",
            Some("@dave:test.local"),
            json!({"membership": "join"}),
        );
        room.apply(room.create_event(&join, key(), server()).unwrap());
        assert_eq!(room.membership("@dave:test.local").as_deref(), Some("join"));

        let (mut room, _) = create_room(&setup(version.clone(), Preset::PrivateChat, &[]));
        let knock = template(
            "erin",
            "m.room.member",
            Some("@erin:test.local"),
            json!({"membership": "knock"}),
        );
        assert!(
            room.create_event(&knock, key(), server()).is_err(),
            "invite rooms refuse knocks"
        );
        let rules = template(
            "alice",
            "m.room.join_rules",
            Some(""),
            json!({"join_rule": "knock"}),
        );
        room.apply(room.create_event(&rules, key(), server()).unwrap());
        room.apply(room.create_event(&knock, key(), server()).unwrap());
        assert_eq!(
            room.membership("@erin:test.local").as_deref(),
            Some("knock")
        );
    }
}

#[test]
fn events_chain_linearly() {
    let (mut room, events) = create_room(&setup(RoomVersionId::V12, Preset::PrivateChat, &[]));
    let last = events.last().unwrap();
    assert_eq!(room.extremities(), &[last.event_id().to_owned()]);
    let pdu = alice_says(&room, "x");
    assert_eq!(pdu.prev_events(), &[last.event_id().to_owned()]);
    assert_eq!(pdu.depth(), last.depth() + 1);
    // auth events: create is implied by the room ID in v12; power levels and sender's member.
    assert_eq!(pdu.auth_events().len(), 2);
    room.apply(pdu.clone());
    assert_eq!(room.extremities(), &[pdu.event_id().to_owned()]);
}

/// A text message from alice on the room's head, not applied.
pub(crate) fn alice_says(room: &RoomState, body: &str) -> Arc<Pdu> {
    room.create_event(
        &template(
            "alice",
            "m.room.message",
            None,
            json!({"body": body, "msgtype": "m.text"}),
        ),
        key(),
        server(),
    )
    .unwrap()
}

/// Lets other test modules look events up by ID.
pub(crate) fn index(events: &[Arc<Pdu>]) -> HashMap<OwnedEventId, Arc<Pdu>> {
    events
        .iter()
        .map(|p| (p.event_id().to_owned(), p.clone()))
        .collect()
}

pub(crate) fn fetch(
    map: &HashMap<OwnedEventId, Arc<Pdu>>,
) -> impl Fn(&EventId) -> Option<Arc<Pdu>> + '_ {
    move |id| map.get(id).cloned()
}

#[test]
fn power_levels_and_redaction_rights() {
    for version in versions() {
        let (mut room, _) = create_room(&setup(version.clone(), Preset::PublicChat, &[]));
        let join = template(
            "bob",
            "m.room.member",
            Some("@bob:test.local"),
            json!({"membership": "join"}),
        );
        room.apply(room.create_event(&join, key(), server()).unwrap());
        let alice = user("alice");
        let bob = user("bob");
        if version == RoomVersionId::V12 {
            assert_eq!(
                room.power_level(&alice),
                None,
                "creators are unlimited in v12"
            );
        } else {
            assert_eq!(room.power_level(&alice), Some(100));
        }
        assert_eq!(room.power_level(&bob), Some(0));
        assert!(room.redaction_reach(&bob).covers(&bob), "own events");
        assert!(
            !room.redaction_reach(&bob).covers(&alice),
            "not others' without power"
        );
        assert!(
            room.redaction_reach(&alice).covers(&bob),
            "moderators redact anyone"
        );
        let remote_bob = ruma::UserId::parse("@bob:remote.example").unwrap();
        let remote_carol = ruma::UserId::parse("@carol:remote.example").unwrap();
        let remote_reach = room.federated_redaction_reach(&remote_bob);
        assert!(
            remote_reach.covers(&remote_carol),
            "a server vouches for its users"
        );
        assert!(
            !remote_reach.covers(&bob),
            "not another server's users without power"
        );
        assert_eq!(
            room.federated_redaction_reach(&alice),
            RedactionReach::Anyone
        );
    }
}

#[test]
fn v12_room_ids_can_be_computed_before_signing() {
    let s = setup(RoomVersionId::V12, Preset::PrivateChat, &[]);
    let (create_template, _) = room_setup::templates(&s);
    let rules = room_version::rules(&RoomVersionId::V12).unwrap();
    let predicted = crate::build::v12_room_id(&create_template, &rules).unwrap();
    let (room, _) = create_room(&s);
    assert_eq!(predicted, room.room_id());
}

#[test]
fn state_groups_follow_state_changes() {
    let (mut room, _) = create_room(&setup(RoomVersionId::V12, Preset::PrivateChat, &[]));
    // The room's first applied event (the creator's join) made a snapshot; the
    // others since were deltas on it.
    let group = room.state_group().unwrap().to_owned();
    let message = alice_says(&room, "x");
    let applied = room.apply(message);
    assert_eq!(applied.new_group, None, "messages do not change the state");
    assert_eq!(
        (
            applied.group_before.as_deref(),
            applied.group_after.as_str()
        ),
        (Some(group.as_str()), group.as_str())
    );

    let topic = room
        .create_event(
            &template("alice", "m.room.topic", Some(""), json!({"topic": "t"})),
            key(),
            server(),
        )
        .unwrap();
    let applied = room.apply(topic.clone());
    let delta = applied.new_group.unwrap();
    assert_eq!(delta.id, topic.event_id().as_str());
    assert_eq!(delta.parent.as_deref(), Some(group.as_str()));
    assert_eq!(
        delta.entries,
        vec![(
            "m.room.topic".to_owned(),
            String::new(),
            Some(topic.event_id().to_string())
        )]
    );
    assert_eq!(room.state_group(), Some(topic.event_id().as_str()));

    // A long chain of deltas ends in a snapshot holding the whole state.
    let mut seen_snapshot = false;
    for _ in 0..crate::room_state::SNAPSHOT_EVERY + 1 {
        let pdu = room
            .create_event(
                &template("alice", "m.room.name", Some(""), json!({"name": "n"})),
                key(),
                server(),
            )
            .unwrap();
        let group = room.apply(pdu).new_group.unwrap();
        if group.parent.is_none() {
            assert_eq!(
                group.entries.len(),
                room.state_events().count(),
                "a snapshot lists every slot"
            );
            seen_snapshot = true;
        }
    }
    assert!(seen_snapshot);
}

/// A copy of a room's state (what a turn takes, what the cache keeps) is
/// unchanged by what happens to the room after: the maps are shared, not
/// aliased. And `move_state` moves all three views of the state together.
#[test]
fn copies_of_the_state_do_not_see_later_changes() {
    let (mut room, _) = create_room(&setup(RoomVersionId::V12, Preset::PrivateChat, &[]));
    let copy = room.clone();
    let ids_before = room.state_map();
    let old_topic = room.get(&StateEventType::RoomTopic, "").cloned();
    let topic = room
        .create_event(
            &template("alice", "m.room.topic", Some(""), json!({"topic": "t"})),
            key(),
            server(),
        )
        .unwrap();
    let group = (topic.event_id().to_string(), 1);
    let slot = (StateEventType::RoomTopic, String::new());
    room.move_state(
        [(slot.clone(), Some(Arc::clone(&topic)))],
        vec![topic.event_id().to_owned()],
        topic.depth(),
        group.clone(),
    );
    assert_eq!(
        room.state_map().get(&slot),
        Some(&topic.event_id().to_owned())
    );
    assert!(room.state_by_id().contains_key(topic.event_id()));
    if let Some(old) = &old_topic {
        assert!(
            !room.state_by_id().contains_key(old.event_id()),
            "the replaced event leaves the by-ID view"
        );
    }
    assert_eq!(room.group(), Some((group.0.as_str(), group.1)));
    assert_eq!(room.extremities(), &[topic.event_id().to_owned()]);

    assert_eq!(copy.state_map(), ids_before);
    assert_eq!(
        copy.get(&StateEventType::RoomTopic, "")
            .map(|p| p.event_id().to_owned()),
        old_topic.map(|p| p.event_id().to_owned())
    );
    assert!(!copy.state_by_id().contains_key(topic.event_id()));

    // A message moves the head and leaves the state alone.
    let message = alice_says(&room, "x");
    let state = room.state_map();
    room.move_state(
        [],
        vec![message.event_id().to_owned()],
        message.depth(),
        group,
    );
    assert_eq!(room.state_map(), state);
    assert_eq!(room.depth(), message.depth());
}

/// Chains of deltas grow with the state: every 100 links in a small state,
/// every 1,250 in one of 20,000 slots; a chain of unknown length is never
/// extended.
#[test]
fn snapshots_come_later_in_larger_states() {
    use crate::room_state::extends_chain;
    assert!(extends_chain(Some(99), 10));
    assert!(!extends_chain(Some(100), 10));
    assert!(!extends_chain(Some(100), 1_600));
    assert!(extends_chain(Some(100), 1_700));
    assert!(extends_chain(Some(1_249), 20_000));
    assert!(!extends_chain(Some(1_250), 20_000));
    assert!(!extends_chain(None, 10));
    assert!(!extends_chain(None, 20_000));
    assert!(!extends_chain(Some(u32::MAX), usize::MAX));
}
