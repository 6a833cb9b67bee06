//! Client filters: the `RoomEventFilter` of `/messages` and `/context`, and the
//! `/sync` filter (room list, timeline and state filters, `include_leave`,
//! lazy-loaded members).

use serde_json::Value;
use tessera_storage::events::StoredEvent;

use crate::error::{MatrixError, MatrixResult};

/// A client's RoomEventFilter, the parts we apply: types, senders, limit,
/// and (in a `/sync` filter's state filter) `lazy_load_members`.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    pub limit: Option<u64>,
    /// Send only the member events of the timeline's senders (and, in a
    /// full state, the syncing user's own), not the whole member list.
    pub lazy_load_members: bool,
}

/// `*` wildcards, as filters use them. Patterns with many wildcards are
/// compared literally, so a hostile filter cannot make matching explode.
fn glob(pattern: &str, value: &str) -> bool {
    if pattern.matches('*').count() > 4 {
        return pattern == value;
    }
    match pattern.split_once('*') {
        None => pattern == value,
        Some((prefix, rest)) => {
            let Some(tail) = value.strip_prefix(prefix) else {
                return false;
            };
            rest.is_empty()
                || tail
                    .char_indices()
                    .map(|(i, _)| i)
                    .chain([tail.len()])
                    .any(|i| glob(rest, &tail[i..]))
        }
    }
}

impl EventFilter {
    pub fn parse(value: &Value) -> MatrixResult<Self> {
        let list = |field: &str| -> MatrixResult<Option<Vec<String>>> {
            match value.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_owned).ok_or_else(|| {
                            MatrixError::bad_json(format!("filter.{field} must hold strings"))
                        })
                    })
                    .collect::<MatrixResult<Vec<_>>>()
                    .map(Some),
                Some(_) => Err(MatrixError::bad_json(format!(
                    "filter.{field} must be an array"
                ))),
            }
        };
        let limit = match value.get("limit") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                MatrixError::bad_json("filter.limit must be a non-negative integer")
            })?),
        };
        let lazy_load_members = match value.get("lazy_load_members") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(MatrixError::bad_json(
                    "filter.lazy_load_members must be a boolean",
                ));
            }
        };
        Ok(Self {
            types: list("types")?,
            not_types: list("not_types")?.unwrap_or_default(),
            senders: list("senders")?,
            not_senders: list("not_senders")?.unwrap_or_default(),
            limit,
            lazy_load_members,
        })
    }

    pub fn from_query(filter: Option<&str>) -> MatrixResult<Self> {
        match filter {
            None => Ok(Self::default()),
            Some(text) => {
                let value: Value = serde_json::from_str(text)
                    .map_err(|e| MatrixError::invalid_param(format!("filter is not JSON: {e}")))?;
                if !value.is_object() {
                    return Err(MatrixError::invalid_param("filter must be a JSON object"));
                }
                Self::parse(&value)
            }
        }
    }

    pub fn matches(&self, kind: &str, sender: &str) -> bool {
        if self.not_types.iter().any(|p| glob(p, kind))
            || self.not_senders.iter().any(|s| s == sender)
        {
            return false;
        }
        self.types
            .as_ref()
            .is_none_or(|t| t.iter().any(|p| glob(p, kind)))
            && self
                .senders
                .as_ref()
                .is_none_or(|s| s.iter().any(|x| x == sender))
    }

    pub fn matches_event(&self, event: &StoredEvent) -> bool {
        match event.pdu() {
            Ok(pdu) => self.matches(&pdu.kind().to_string(), pdu.sender().as_str()),
            Err(_) => false,
        }
    }
}

/// The parts of a `/sync` filter we apply.
#[derive(Debug, Clone, Default)]
pub struct SyncFilter {
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub timeline: EventFilter,
    pub state: EventFilter,
    pub include_leave: bool,
    pub account_data: EventFilter,
    pub room_account_data: EventFilter,
}

impl SyncFilter {
    pub fn parse(value: &Value) -> MatrixResult<Self> {
        if !value.is_object() {
            return Err(MatrixError::bad_json("filter must be a JSON object"));
        }
        let room = value.get("room").cloned().unwrap_or(Value::Null);
        if !room.is_null() && !room.is_object() {
            return Err(MatrixError::bad_json("filter.room must be an object"));
        }
        let sub = |v: Option<&Value>| -> MatrixResult<EventFilter> {
            match v {
                None | Some(Value::Null) => Ok(EventFilter::default()),
                Some(v @ Value::Object(_)) => EventFilter::parse(v),
                Some(_) => Err(MatrixError::bad_json("filters must be objects")),
            }
        };
        let rooms_filter = EventFilter::parse(&serde_json::json!({
            "types": room.get("rooms").cloned().unwrap_or(Value::Null),
            "not_types": room.get("not_rooms").cloned().unwrap_or(Value::Null),
        }))?;
        let include_leave = match room.get("include_leave") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(MatrixError::bad_json(
                    "filter.room.include_leave must be a boolean",
                ));
            }
        };
        Ok(Self {
            rooms: rooms_filter.types,
            not_rooms: rooms_filter.not_types,
            timeline: sub(room.get("timeline"))?,
            state: sub(room.get("state"))?,
            include_leave,
            account_data: sub(value.get("account_data"))?,
            room_account_data: sub(room.get("account_data"))?,
        })
    }

    pub fn wants_room(&self, room_id: &str) -> bool {
        !self.not_rooms.iter().any(|r| r == room_id)
            && self
                .rooms
                .as_ref()
                .is_none_or(|rooms| rooms.iter().any(|r| r == room_id))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn filters_match_globs_and_senders() {
        let filter =
            EventFilter::parse(&json!({"types": ["m.room.*"], "not_senders": ["@spam:x"]}))
                .unwrap();
        assert!(filter.matches("m.room.message", "@a:x"));
        assert!(!filter.matches("m.reaction", "@a:x"));
        assert!(!filter.matches("m.room.message", "@spam:x"));
        assert!(glob("*", ""));
        assert!(glob("a*c", "abbc"));
        assert!(!glob("a*c", "abb"));
        assert!(glob("é*ü", "éaü"), "multi-byte characters are not split");
        assert!(EventFilter::parse(&json!({"types": "m.room.message"})).is_err());
    }

    #[test]
    fn lazy_loading_is_read_from_the_state_filter() {
        let filter =
            SyncFilter::parse(&json!({"room": {"state": {"lazy_load_members": true}}})).unwrap();
        assert!(filter.state.lazy_load_members);
        assert!(!filter.timeline.lazy_load_members);
        assert!(
            !SyncFilter::parse(&json!({}))
                .unwrap()
                .state
                .lazy_load_members
        );
        let err = SyncFilter::parse(&json!({"room": {"state": {"lazy_load_members": "yes"}}}))
            .unwrap_err();
        assert!(err.to_string().contains("lazy_load_members"), "{err}");
    }
}
