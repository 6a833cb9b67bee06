//! The authorization rules, through ruma.
//!
//! An event passes when it passes the state-independent rules (its auth events
//! are the right ones and none is rejected) and the state-dependent rules against
//! the state we give it. For local events that state is the room's current state;
//! inbound federation checks three states (auth events, state before, current).

use std::sync::Arc;

use ruma::EventId;
use ruma::events::StateEventType;
use ruma::room_version_rules::AuthorizationRules;

use crate::pdu::Pdu;

/// Why an event failed the authorization rules: the rule's own explanation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

/// Check the state-independent rules (auth events list) and the state-dependent
/// rules against `state`.
pub fn check(
    pdu: &Pdu,
    rules: &AuthorizationRules,
    fetch_event: impl Fn(&EventId) -> Option<Arc<Pdu>>,
    state: impl Fn(&StateEventType, &str) -> Option<Arc<Pdu>>,
) -> Result<(), AuthError> {
    ruma::state_res::check_state_independent_auth_rules(rules, pdu, &fetch_event)
        .map_err(AuthError)?;
    check_against_state(pdu, rules, state)
}

/// Only the state-dependent rules, against a given state.
pub fn check_against_state(
    pdu: &Pdu,
    rules: &AuthorizationRules,
    state: impl Fn(&StateEventType, &str) -> Option<Arc<Pdu>>,
) -> Result<(), AuthError> {
    ruma::state_res::check_state_dependent_auth_rules(rules, pdu, state).map_err(AuthError)
}
