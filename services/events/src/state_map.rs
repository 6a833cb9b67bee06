//! Room states as maps from (type, state_key) to event ID, and the small
//! operations the owner of a room needs on them when events arrive out of
//! order from other servers.

use std::collections::HashMap;

use ruma::OwnedEventId;
use ruma::events::StateEventType;

use crate::pdu::Pdu;

pub type StateKey = (StateEventType, String);
pub type StateIds = HashMap<StateKey, OwnedEventId>;

/// The slot a state event fills.
pub fn key_of(pdu: &Pdu) -> Option<StateKey> {
    Some((
        StateEventType::from(pdu.kind().to_string()),
        pdu.state_key()?.to_owned(),
    ))
}

/// The state after an accepted event, given the state before it.
pub fn with_event(before: &StateIds, pdu: &Pdu) -> StateIds {
    let mut after = before.clone();
    if let Some(key) = key_of(pdu) {
        after.insert(key, pdu.event_id().to_owned());
    }
    after
}

/// The slots that differ going from `from` to `to` (`None`: removed).
pub fn diff(from: &StateIds, to: &StateIds) -> Vec<(StateKey, Option<OwnedEventId>)> {
    let mut changes: Vec<(StateKey, Option<OwnedEventId>)> = to
        .iter()
        .filter(|(k, v)| from.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    changes.extend(
        from.keys()
            .filter(|k| !to.contains_key(*k))
            .map(|k| (k.clone(), None)),
    );
    changes.sort_by(|a, b| (a.0.0.to_string(), &a.0.1).cmp(&(b.0.0.to_string(), &b.0.1)));
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> OwnedEventId {
        OwnedEventId::try_from(format!("${s}")).unwrap()
    }

    fn key(t: &str, k: &str) -> StateKey {
        (StateEventType::from(t), k.to_owned())
    }

    #[test]
    fn diffs_name_changes_and_removals() {
        let from: StateIds = [
            (key("m.room.name", ""), id("a")),
            (key("m.room.topic", ""), id("b")),
        ]
        .into();
        let to: StateIds = [
            (key("m.room.name", ""), id("c")),
            (key("m.room.avatar", ""), id("d")),
        ]
        .into();
        let changes = diff(&from, &to);
        assert_eq!(
            changes,
            vec![
                (key("m.room.avatar", ""), Some(id("d"))),
                (key("m.room.name", ""), Some(id("c"))),
                (key("m.room.topic", ""), None),
            ]
        );
        assert!(diff(&to, &to).is_empty());
    }
}
