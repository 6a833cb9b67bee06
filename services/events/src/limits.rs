//! Size limits from the specification ("Size limits" in the client-server API).

/// The largest PDU, in bytes of canonical JSON, including signatures.
pub const MAX_PDU_BYTES: usize = 65_536;

/// Longest user, room, event and alias IDs, and types and state keys.
pub const MAX_ID_BYTES: usize = 255;
