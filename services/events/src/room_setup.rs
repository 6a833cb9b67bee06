//! The events `createRoom` sends, in the order the client-server API lists
//! them: create, the creator's join, power levels, canonical alias, the
//! preset's join rules / history visibility / guest access, `initial_state`,
//! name, topic, then invites. Defaults follow Synapse's, which clients expect.

use ruma::{OwnedRoomAliasId, OwnedUserId, RoomVersionId};
use serde_json::{Map, Value, json};

use crate::build::EventTemplate;
use crate::room_version;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    PrivateChat,
    TrustedPrivateChat,
    PublicChat,
}

/// Everything `createRoom` needs, already validated by the HTTP layer.
#[derive(Debug, Clone)]
pub struct RoomSetup {
    pub creator: OwnedUserId,
    pub version: RoomVersionId,
    pub preset: Option<Preset>,
    /// `visibility: public` (published in the directory); picks the default preset.
    pub public: bool,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub alias: Option<OwnedRoomAliasId>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
    /// `(type, state_key, content)` from `initial_state`.
    pub initial_state: Vec<(String, String, Value)>,
    pub creation_content: Map<String, Value>,
    pub power_level_override: Option<Map<String, Value>>,
    /// The creator's profile, copied into their membership event.
    pub creator_displayname: Option<String>,
    pub creator_avatar_url: Option<String>,
    pub origin_server_ts: u64,
}

/// The create event's template and the templates that follow it, in order.
pub fn templates(setup: &RoomSetup) -> (EventTemplate, Vec<EventTemplate>) {
    let preset = setup.preset.unwrap_or(if setup.public {
        Preset::PublicChat
    } else {
        Preset::PrivateChat
    });
    let rules = room_version::rules(&setup.version);
    let creators_privileged = rules
        .as_ref()
        .is_some_and(|r| r.authorization.explicitly_privilege_room_creators);
    let ts = setup.origin_server_ts;
    let template = |kind: &str, state_key: &str, content: Value| EventTemplate {
        kind: kind.to_owned(),
        state_key: Some(state_key.to_owned()),
        content,
        sender: setup.creator.clone(),
        origin_server_ts: ts,
        redacts: None,
    };

    // Trusted private chats make invitees as powerful as the creator; from room
    // v12 that means listing them as additional creators.
    let trusted_invitees: Vec<OwnedUserId> = if preset == Preset::TrustedPrivateChat {
        setup.invite.clone()
    } else {
        vec![]
    };

    let mut create_content = setup.creation_content.clone();
    create_content.insert("room_version".into(), json!(setup.version.as_str()));
    let uses_creator_field = rules
        .as_ref()
        .is_some_and(|r| !r.authorization.use_room_create_sender);
    if uses_creator_field {
        create_content.insert("creator".into(), json!(setup.creator));
    }
    if creators_privileged && !trusted_invitees.is_empty() {
        let mut additional: Vec<Value> = create_content
            .get("additional_creators")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        additional.extend(trusted_invitees.iter().map(|u| json!(u)));
        create_content.insert("additional_creators".into(), Value::Array(additional));
    }
    let create = template("m.room.create", "", Value::Object(create_content));

    let mut events = Vec::new();
    let mut member = Map::new();
    member.insert("membership".into(), json!("join"));
    if let Some(name) = &setup.creator_displayname {
        member.insert("displayname".into(), json!(name));
    }
    if let Some(avatar) = &setup.creator_avatar_url {
        member.insert("avatar_url".into(), json!(avatar));
    }
    events.push(template(
        "m.room.member",
        setup.creator.as_str(),
        Value::Object(member),
    ));

    let mut users = Map::new();
    if !creators_privileged {
        users.insert(setup.creator.to_string(), json!(100));
        for invitee in &trusted_invitees {
            users.insert(invitee.to_string(), json!(100));
        }
    }
    let mut power_levels = json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100,
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": if preset == Preset::PublicChat { 50 } else { 0 },
    });
    if let (Some(overrides), Some(pl)) = (&setup.power_level_override, power_levels.as_object_mut())
    {
        for (key, value) in overrides {
            pl.insert(key.clone(), value.clone());
        }
    }
    events.push(template("m.room.power_levels", "", power_levels));

    if let Some(alias) = &setup.alias {
        events.push(template(
            "m.room.canonical_alias",
            "",
            json!({ "alias": alias }),
        ));
    }

    let (join_rule, guest_access) = match preset {
        Preset::PublicChat => ("public", "forbidden"),
        Preset::PrivateChat | Preset::TrustedPrivateChat => ("invite", "can_join"),
    };
    let overridden = |kind: &str| {
        setup
            .initial_state
            .iter()
            .any(|(t, k, _)| t == kind && k.is_empty())
    };
    if !overridden("m.room.join_rules") {
        events.push(template(
            "m.room.join_rules",
            "",
            json!({ "join_rule": join_rule }),
        ));
    }
    if !overridden("m.room.history_visibility") {
        events.push(template(
            "m.room.history_visibility",
            "",
            json!({ "history_visibility": "shared" }),
        ));
    }
    if !overridden("m.room.guest_access") {
        events.push(template(
            "m.room.guest_access",
            "",
            json!({ "guest_access": guest_access }),
        ));
    }
    for (kind, state_key, content) in &setup.initial_state {
        events.push(template(kind, state_key, content.clone()));
    }
    if let Some(name) = &setup.name {
        events.push(template("m.room.name", "", json!({ "name": name })));
    }
    if let Some(topic) = &setup.topic {
        events.push(template(
            "m.room.topic",
            "",
            json!({ "topic": topic, "m.topic": { "m.text": [{ "body": topic, "mimetype": "text/plain" }] } }),
        ));
    }
    for invitee in &setup.invite {
        let mut content = json!({ "membership": "invite" });
        if setup.is_direct {
            content["is_direct"] = json!(true);
        }
        events.push(template("m.room.member", invitee.as_str(), content));
    }
    (create, events)
}
