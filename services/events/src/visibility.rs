//! History visibility: which of a room's events a user may read.
//!
//! An event at position `p` is visible to a user when they were joined at `p`,
//! or the room's `m.room.history_visibility` at `p` allows it:
//! `world_readable` to anyone, `shared` to current members, `invited` to users
//! invited at `p`. Users always see their own membership events. This is the
//! rule Synapse applies, over the per-position membership and visibility
//! history the caller reads from storage.

pub struct Visibility {
    memberships: Vec<(i64, String)>,
    visibilities: Vec<(i64, String)>,
}

fn latest_at(changes: &[(i64, String)], pos: i64) -> Option<&str> {
    changes
        .iter()
        .take_while(|(p, _)| *p <= pos)
        .last()
        .map(|(_, v)| v.as_str())
}

impl Visibility {
    /// `memberships`: the user's (position, membership) changes in the room;
    /// `visibilities`: the room's (position, history_visibility) changes; both ascending.
    pub fn new(memberships: Vec<(i64, String)>, visibilities: Vec<(i64, String)>) -> Self {
        Self {
            memberships,
            visibilities,
        }
    }

    pub fn current_membership(&self) -> Option<&str> {
        self.memberships.last().map(|(_, m)| m.as_str())
    }

    pub fn is_joined(&self) -> bool {
        self.current_membership() == Some("join")
    }

    /// Whether the user has ever been in the room (joined) or may read it.
    pub fn world_readable_now(&self) -> bool {
        self.visibilities.last().map(|(_, v)| v.as_str()) == Some("world_readable")
    }

    pub fn can_see(&self, pos: i64, own_membership_event: bool) -> bool {
        if own_membership_event {
            return true;
        }
        let membership = latest_at(&self.memberships, pos);
        if membership == Some("join") {
            return true;
        }
        match latest_at(&self.visibilities, pos).unwrap_or("shared") {
            "world_readable" => true,
            "shared" => self.is_joined(),
            "invited" => membership == Some("invite"),
            _ => false,
        }
    }

    /// For members, `None` (no limit). For users who left or were kicked or
    /// banned, the position of that membership change: they may read state and
    /// history up to there.
    pub fn readable_upto(&self) -> Option<i64> {
        match self.memberships.last() {
            Some((_, m)) if m == "join" => None,
            Some((pos, _)) if self.memberships.iter().any(|(_, m)| m == "join") => Some(*pos),
            _ => Some(-1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(memberships: &[(i64, &str)], visibilities: &[(i64, &str)]) -> Visibility {
        Visibility {
            memberships: memberships
                .iter()
                .map(|(p, m)| (*p, m.to_string()))
                .collect(),
            visibilities: visibilities
                .iter()
                .map(|(p, m)| (*p, m.to_string()))
                .collect(),
        }
    }

    #[test]
    fn shared_history_is_visible_to_current_members_only() {
        let joined_late = v(&[(10, "join")], &[(3, "shared")]);
        assert!(
            joined_late.can_see(5, false),
            "shared: earlier history visible once joined"
        );
        let left = v(&[(10, "join"), (20, "leave")], &[(3, "shared")]);
        assert!(left.can_see(15, false), "while joined");
        assert!(!left.can_see(5, false), "before joining, after leaving");
        assert!(!left.can_see(25, false));
        assert!(left.can_see(20, true), "own leave event");
        assert_eq!(left.readable_upto(), Some(20));
    }

    #[test]
    fn joined_and_invited_visibility() {
        let user = v(&[(10, "invite"), (12, "join")], &[(3, "joined")]);
        assert!(
            !user.can_see(11, false),
            "joined-only: invite is not enough"
        );
        assert!(user.can_see(13, false));
        let user = v(&[(10, "invite"), (12, "join")], &[(3, "invited")]);
        assert!(user.can_see(11, false));
        assert!(!user.can_see(5, false));
        let stranger = v(&[], &[(3, "world_readable")]);
        assert!(stranger.can_see(4, false));
        assert_eq!(stranger.readable_upto(), Some(-1));
    }
}
