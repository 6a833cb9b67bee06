//! Matrix event logic on ruma, with no I/O.
//!
//! Everything a room-worker decides about an event lives here, so it can be tested
//! without a database or a network: the room-worker supplies events and state,
//! this crate answers.
//!
//! # Layout
//! - [`room_version`]: which room versions we support and their ruma rules.
//! - [`pdu`]: [`Pdu`], a parsed persistent data unit that ruma's auth and
//!   state-resolution code can read.
//! - [`keys`]: the server's ed25519 signing key.
//! - [`build`]: turning an [`build::EventTemplate`] (what a client asked for) into
//!   a hashed, signed PDU with its auth events chosen from the room state.
//! - [`auth`]: the authorization rules, through ruma.
//! - [`resolve`]: state resolution, through ruma, plus the conflicted state
//!   subgraph room version 12 needs.
//! - [`room_state`]: the in-memory state a room's owner builds new events on.
//! - [`server_acl`]: which servers a room's `m.room.server_acl` admits.
//! - [`state_map`]: room states as slot → event ID maps, and their differences.
//! - [`restricted_join`]: who vouches for joins under restricted join rules.
//! - [`room_setup`]: the events `createRoom` produces for each preset.
//! - [`content`]: checks of well-known state event contents from clients.
//! - [`client`]: rendering PDUs in the client-server event format, with redaction.
//! - [`visibility`]: history visibility: which events a user may read.
//! - [`limits`]: size limits from the specification.

pub mod auth;
pub mod build;
pub mod client;
pub mod content;
pub mod keys;
pub mod limits;
pub mod pdu;
pub mod resolve;
pub mod restricted_join;
pub mod room_setup;
pub mod room_state;
pub mod room_version;
pub mod server_acl;
pub mod state_map;
pub mod visibility;

#[cfg(test)]
mod test_support;

pub use pdu::Pdu;
pub use ruma;
