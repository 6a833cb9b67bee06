//! Checking the content of well-known state events a client sends, with
//! ruma's typed contents, so that a malformed `m.room.join_rules` or a power
//! level that is not a number is refused with `M_BAD_JSON` up front instead
//! of entering the room and breaking its auth rules later. Federation PDUs are
//! not checked this way: remote events are judged by the auth rules alone.

use ruma::events::room::{
    avatar::RoomAvatarEventContent, canonical_alias::RoomCanonicalAliasEventContent,
    encryption::RoomEncryptionEventContent, guest_access::RoomGuestAccessEventContent,
    history_visibility::RoomHistoryVisibilityEventContent, join_rules::RoomJoinRulesEventContent,
    member::RoomMemberEventContent, name::RoomNameEventContent,
    power_levels::RoomPowerLevelsEventContent, server_acl::RoomServerAclEventContent,
    tombstone::RoomTombstoneEventContent, topic::RoomTopicEventContent,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn check<T: DeserializeOwned>(content: &Value) -> Result<(), String> {
    serde_json::from_value::<T>(content.clone())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `Err` with the reason when `content` is not valid for `kind`.
pub fn validate(kind: &str, content: &Value) -> Result<(), String> {
    let result = match kind {
        "m.room.avatar" => check::<RoomAvatarEventContent>(content),
        "m.room.canonical_alias" => check::<RoomCanonicalAliasEventContent>(content),
        "m.room.encryption" => check::<RoomEncryptionEventContent>(content),
        "m.room.guest_access" => check::<RoomGuestAccessEventContent>(content),
        "m.room.history_visibility" => check::<RoomHistoryVisibilityEventContent>(content),
        "m.room.join_rules" => check::<RoomJoinRulesEventContent>(content),
        "m.room.member" => check::<RoomMemberEventContent>(content),
        "m.room.name" => check::<RoomNameEventContent>(content),
        "m.room.power_levels" => check::<RoomPowerLevelsEventContent>(content),
        "m.room.server_acl" => check::<RoomServerAclEventContent>(content),
        "m.room.tombstone" => check::<RoomTombstoneEventContent>(content),
        "m.room.topic" => check::<RoomTopicEventContent>(content),
        _ => Ok(()),
    };
    result.map_err(|e| format!("invalid {kind} content: {e}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::validate;

    #[test]
    fn known_state_contents_are_checked() {
        assert!(validate("m.room.join_rules", &json!({"join_rule": "public"})).is_ok());
        assert!(validate("m.room.join_rules", &json!({"join_rule": 5})).is_err());
        assert!(validate("m.room.power_levels", &json!({"users": {"@a:x": 100}})).is_ok());
        assert!(validate("m.room.power_levels", &json!({"users": {"@a:x": "lots"}})).is_err());
        assert!(validate("m.room.member", &json!({})).is_err());
        assert!(validate("org.example.anything", &json!({"whatever": [1]})).is_ok());
    }
}
