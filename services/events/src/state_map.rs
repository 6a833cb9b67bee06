//! Room states as maps from (type, state_key) to event ID, and the small
//! operations the owner of a room needs on them when events arrive out of
//! order from other servers.
//!
//! The maps are persistent, ordered B-trees (`imbl::OrdMap`): the state after
//! a state event shares all but one slot's path with the state before it, so
//! a room with 50,000 members does not cost 50,000 entries per state event,
//! in time or memory; and two states that share most of their structure are
//! compared, or diffed, by visiting only the nodes they do not share.

use imbl::ordmap::DiffItem;
use ruma::OwnedEventId;
use ruma::events::StateEventType;

use crate::pdu::Pdu;

pub type StateKey = (StateEventType, String);
pub type StateIds = imbl::OrdMap<StateKey, OwnedEventId>;

/// The slot a state event fills.
pub fn key_of(pdu: &Pdu) -> Option<StateKey> {
    Some((
        StateEventType::from(pdu.kind().to_string()),
        pdu.state_key()?.to_owned(),
    ))
}

/// The state after an accepted event, given the state before it.
pub fn with_event(before: &StateIds, pdu: &Pdu) -> StateIds {
    match key_of(pdu) {
        Some(key) => before.update(key, pdu.event_id().to_owned()),
        None => before.clone(),
    }
}

/// The slots that differ going from `from` to `to` (`None`: removed), in
/// slot order. Skips the subtrees the two states share.
pub fn diff(from: &StateIds, to: &StateIds) -> Vec<(StateKey, Option<OwnedEventId>)> {
    from.diff(to)
        .map(|item| match item {
            DiffItem::Add(key, id) | DiffItem::Update { new: (key, id), .. } => {
                (key.clone(), Some(id.clone()))
            }
            DiffItem::Remove(key, _) => (key.clone(), None),
        })
        .collect()
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
        .into_iter()
        .collect();
        let to: StateIds = [
            (key("m.room.name", ""), id("c")),
            (key("m.room.avatar", ""), id("d")),
        ]
        .into_iter()
        .collect();
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

    #[test]
    fn the_state_after_an_event_leaves_the_state_before_alone() {
        let before: StateIds = [(key("m.room.name", ""), id("a"))].into_iter().collect();
        let pdu_key = key("m.room.topic", "");
        let mut after = before.update(pdu_key.clone(), id("b"));
        assert_eq!(before.len(), 1);
        assert_eq!(after.get(&pdu_key), Some(&id("b")));
        after.insert(key("m.room.name", ""), id("c"));
        assert_eq!(before.get(&key("m.room.name", "")), Some(&id("a")));
        assert_eq!(
            diff(&before, &after),
            vec![
                (key("m.room.name", ""), Some(id("c"))),
                (pdu_key, Some(id("b"))),
            ]
        );
    }
}
