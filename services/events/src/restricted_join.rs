//! Joins under the `restricted` and `knock_restricted` join rules (room
//! versions 8 and later): who may join without an invite, and which of our
//! members vouches for the join in `join_authorised_via_users_server`.
//!
//! The authorization rules only check the vouching member (joined, allowed to
//! invite); whether the joining user is in one of the rooms the join rule
//! allows is for the resident server that vouches to judge, from its own view
//! of those rooms. The caller looks those memberships up; this module decides.

use ruma::events::StateEventType;
use ruma::events::room::join_rules::RoomJoinRulesEventContent;
use ruma::room::{AllowRule, JoinRule};
use ruma::room_version_rules::RoomVersionRules;
use ruma::{OwnedRoomId, OwnedUserId, ServerName, UserId};

use crate::pdu::Pdu;
use crate::room_state::RoomState;

/// What this server knows of a user in one room a join rule allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedRoomView {
    pub room_id: OwnedRoomId,
    /// Whether one of our users is joined there: only then is our view of
    /// the room's memberships current enough to vouch on.
    pub resident: bool,
    /// The user's membership there, as we see it.
    pub membership: Option<String>,
}

/// Why we cannot vouch for a restricted join.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestrictedJoinError {
    /// We are in none of the rooms the join rule allows, so cannot tell.
    #[error(
        "this server is in none of the rooms whose members may join ({0}); try another server in the room"
    )]
    CannotJudge(String),
    /// We are in some allowed room and the user is in none of them.
    #[error("{0} is not a member of any room whose members may join")]
    NotAllowed(OwnedUserId),
    /// No user of ours in the room may invite.
    #[error("no user of this server in the room may invite; try another server in the room")]
    NoAuthoriser,
}

/// The rooms whose members may join without an invite, when the room's join
/// rule is `restricted` or `knock_restricted` and its version has that rule;
/// `None` when joins are not restricted.
pub fn allowed_rooms(state: &RoomState) -> Option<Vec<OwnedRoomId>> {
    let join_rules = state.get(&StateEventType::RoomJoinRules, "")?;
    allowed_rooms_in(join_rules, state.rules())
}

/// [`allowed_rooms`] from the room's `m.room.join_rules` event alone.
pub fn allowed_rooms_in(join_rules: &Pdu, rules: &RoomVersionRules) -> Option<Vec<OwnedRoomId>> {
    let content: RoomJoinRulesEventContent =
        serde_json::from_str(join_rules.content().get()).ok()?;
    let restricted = match content.join_rule {
        JoinRule::Restricted(r) if rules.authorization.restricted_join_rule => r,
        JoinRule::KnockRestricted(r) if rules.authorization.knock_restricted_join_rule => r,
        _ => return None,
    };
    Some(
        restricted
            .allow
            .into_iter()
            .filter_map(|allow| match allow {
                AllowRule::RoomMembership(m) => Some(m.room_id),
                _ => None,
            })
            .collect(),
    )
}

/// Whether `user` needs a member to vouch for their join: they are neither
/// joined nor invited, and the join rule is restricted.
pub fn needs_authoriser(state: &RoomState, user: &UserId) -> bool {
    !matches!(
        state.membership(user.as_str()).as_deref(),
        Some("join" | "invite")
    ) && allowed_rooms(state).is_some()
}

/// Decide a restricted join of `user` from our view of the allowed rooms,
/// and pick the member of ours who vouches for it: the one with the highest
/// power level among those joined who may invite (ties: the smallest user ID,
/// so repeated requests agree).
pub fn authorise(
    state: &RoomState,
    user: &UserId,
    server_name: &ServerName,
    views: &[AllowedRoomView],
) -> Result<OwnedUserId, RestrictedJoinError> {
    judge(user, views)?;
    authoriser(state, server_name).ok_or(RestrictedJoinError::NoAuthoriser)
}

/// Whether our view of the allowed rooms lets `user` join: they are joined
/// to one of them that one of our users is joined to.
pub fn judge(user: &UserId, views: &[AllowedRoomView]) -> Result<(), RestrictedJoinError> {
    if views
        .iter()
        .any(|v| v.resident && v.membership.as_deref() == Some("join"))
    {
        return Ok(());
    }
    if views.iter().any(|v| v.resident) {
        return Err(RestrictedJoinError::NotAllowed(user.to_owned()));
    }
    let rooms: Vec<&str> = views.iter().map(|v| v.room_id.as_str()).collect();
    Err(RestrictedJoinError::CannotJudge(rooms.join(", ")))
}

/// Who could vouch for a join, for loading only their memberships rather
/// than the room's whole state: our users among the room's creators and the
/// users its power levels name, and whether the default level is enough to
/// invite (then any joined member of ours may vouch, and the one with the
/// smallest user ID is the one [`authorise`] picks among them). Reads only
/// the create and power levels events.
pub fn vouching_candidates(
    state: &RoomState,
    server_name: &ServerName,
) -> (Vec<OwnedUserId>, bool) {
    let invite_level = state.invite_level();
    let power_levels = state.get(&StateEventType::RoomPowerLevels, "");
    let listed = power_levels
        .and_then(|pl| pl.content_field("users"))
        .and_then(|users| {
            users
                .as_object()
                .map(|u| u.keys().cloned().collect::<Vec<_>>())
        })
        .unwrap_or_default();
    let create = state.get(&StateEventType::RoomCreate, "");
    let creators = create.map(|c| c.sender().to_string()).into_iter().chain(
        create
            .and_then(|c| c.content_field("additional_creators"))
            .and_then(|a| a.as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned)),
    );
    let mut candidates: Vec<OwnedUserId> = listed
        .into_iter()
        .chain(creators)
        .filter_map(|id| UserId::parse(id).ok())
        .filter(|user| user.server_name() == server_name)
        .collect();
    candidates.sort();
    candidates.dedup();
    // Without power levels everyone but the creator has 0, as does the
    // default invite level.
    let users_default = power_levels
        .and_then(|pl| pl.content_field("users_default"))
        .and_then(|d| d.as_i64())
        .unwrap_or(0);
    (candidates, users_default >= invite_level)
}

/// Our joined member with the highest power level who may invite.
fn authoriser(state: &RoomState, server_name: &ServerName) -> Option<OwnedUserId> {
    let invite_level = state.invite_level();
    state
        .state_events()
        .filter(|pdu| pdu.kind().to_string() == "m.room.member")
        .filter(|pdu| pdu.membership().as_deref() == Some("join"))
        .filter_map(|pdu| UserId::parse(pdu.state_key()?).ok())
        .filter(|member| member.server_name() == server_name)
        .filter_map(|member| {
            // None is unlimited (a room v12 creator).
            let level = state.power_level(&member).unwrap_or(i64::MAX);
            (level >= invite_level).then_some((level, member))
        })
        .max_by(|(a, a_id), (b, b_id)| a.cmp(b).then_with(|| b_id.cmp(a_id)))
        .map(|(_, member)| member)
}

#[cfg(test)]
mod tests {
    use ruma::RoomVersionId;
    use serde_json::{Value, json};

    use super::*;
    use crate::room_setup::Preset;
    use crate::room_state::tests::{create_room, setup};
    use crate::test_support::{key, server, template, user};

    fn send(room: &mut RoomState, sender: &str, kind: &str, state_key: &str, content: Value) {
        let pdu = room
            .create_event(
                &template(sender, kind, Some(state_key), content),
                key(),
                server(),
            )
            .unwrap_or_else(|e| panic!("{kind} refused: {e}"));
        room.apply(pdu);
    }

    /// A public room of alice's (version `version`) that `joined` also
    /// joined, then given `join_rules`.
    fn room(version: RoomVersionId, joined: &[&str], join_rules: Value) -> RoomState {
        let (mut room, _) = create_room(&setup(version, Preset::PublicChat, &[]));
        for name in joined {
            let id = user(name);
            send(
                &mut room,
                name,
                "m.room.member",
                id.as_str(),
                json!({"membership": "join"}),
            );
        }
        send(&mut room, "alice", "m.room.join_rules", "", join_rules);
        room
    }

    fn view(room: &str, resident: bool, membership: Option<&str>) -> AllowedRoomView {
        AllowedRoomView {
            room_id: OwnedRoomId::try_from(room).unwrap(),
            resident,
            membership: membership.map(str::to_owned),
        }
    }

    #[test]
    fn restricted_rooms_name_their_allowed_rooms() {
        for version in crate::room_version::supported() {
            let room = room(
                version,
                &[],
                json!({"join_rule": "knock_restricted", "allow": [
                    {"type": "m.room_membership", "room_id": "!space:a.test"},
                    {"type": "org.example.other"}
                ]}),
            );
            assert_eq!(
                allowed_rooms(&room),
                Some(vec![OwnedRoomId::try_from("!space:a.test").unwrap()])
            );
            assert!(needs_authoriser(
                &room,
                &UserId::parse("@x:b.test").unwrap()
            ));
            assert!(!needs_authoriser(&room, &user("alice")));
        }
    }

    #[test]
    fn other_join_rules_are_not_restricted() {
        for rule in ["public", "invite", "knock"] {
            let room = room(RoomVersionId::V10, &[], json!({"join_rule": rule}));
            assert_eq!(allowed_rooms(&room), None, "{rule}");
            assert!(!needs_authoriser(
                &room,
                &UserId::parse("@x:b.test").unwrap()
            ));
        }
    }

    #[test]
    fn the_decision_follows_what_we_see_of_the_allowed_rooms() {
        let room = room(
            RoomVersionId::V10,
            &[],
            json!({"join_rule": "restricted", "allow": []}),
        );
        let joiner = UserId::parse("@x:b.test").unwrap();
        assert_eq!(
            authorise(&room, &joiner, server(), &[view("!a:c.test", false, None)]),
            Err(RestrictedJoinError::CannotJudge("!a:c.test".into()))
        );
        assert_eq!(
            authorise(
                &room,
                &joiner,
                server(),
                &[
                    view("!a:c.test", false, Some("join")),
                    view("!b:c.test", true, Some("leave"))
                ]
            ),
            Err(RestrictedJoinError::NotAllowed(joiner.clone())),
            "a membership seen in a room we are not in is no proof"
        );
        assert_eq!(
            authorise(
                &room,
                &joiner,
                server(),
                &[view("!b:c.test", true, Some("join"))]
            ),
            Ok(user("alice"))
        );
        let elsewhere = ServerName::parse("elsewhere.test").unwrap();
        assert_eq!(
            authorise(
                &room,
                &joiner,
                &elsewhere,
                &[view("!b:c.test", true, Some("join"))]
            ),
            Err(RestrictedJoinError::NoAuthoriser)
        );
    }

    #[test]
    fn the_candidates_hold_whoever_the_whole_state_would_pick() {
        for version in crate::room_version::supported() {
            let mut room = room(
                version.clone(),
                &["bob", "carol", "dave"],
                json!({"join_rule": "restricted", "allow": []}),
            );
            let (alice, bob) = (user("alice"), user("bob"));
            let mut users = json!({ bob.as_str(): 80, "@far:elsewhere.test": 90 });
            if !room
                .rules()
                .authorization
                .explicitly_privilege_room_creators
            {
                users[alice.as_str()] = json!(100);
            }
            for (invite, default_enough) in [(50, false), (0, true)] {
                send(
                    &mut room,
                    "alice",
                    "m.room.power_levels",
                    "",
                    json!({"users": users, "invite": invite}),
                );
                let (candidates, default) = vouching_candidates(&room, server());
                assert_eq!(default, default_enough, "{version} invite {invite}");
                assert!(candidates.contains(&alice) && candidates.contains(&bob));
                assert!(
                    candidates.iter().all(|c| c.server_name() == server()),
                    "{candidates:?}"
                );
                let picked = authoriser(&room, server()).unwrap();
                assert!(candidates.contains(&picked), "{version}: {picked}");
            }
        }
    }

    #[test]
    fn the_authoriser_is_our_most_powerful_member_who_may_invite() {
        for version in crate::room_version::supported() {
            let mut room = room(
                version.clone(),
                &["bob", "carol"],
                json!({"join_rule": "restricted", "allow": []}),
            );
            let (alice, bob) = (user("alice"), user("bob"));
            // alice is the creator: 100, or unlimited (and unlisted) in version 12.
            let mut users = json!({ bob.as_str(): 80 });
            if !room
                .rules()
                .authorization
                .explicitly_privilege_room_creators
            {
                users[alice.as_str()] = json!(100);
            }
            send(
                &mut room,
                "alice",
                "m.room.power_levels",
                "",
                json!({"users": users, "invite": 50}),
            );
            assert_eq!(
                authoriser(&room, server()),
                Some(alice.clone()),
                "{version}"
            );
            send(
                &mut room,
                "alice",
                "m.room.member",
                alice.as_str(),
                json!({"membership": "leave"}),
            );
            assert_eq!(authoriser(&room, server()), Some(bob.clone()), "{version}");
            send(
                &mut room,
                "bob",
                "m.room.member",
                bob.as_str(),
                json!({"membership": "leave"}),
            );
            assert_eq!(
                authoriser(&room, server()),
                None,
                "carol, below the invite level, may not vouch ({version})"
            );
        }
    }
}
