//! Replication: getting committed events from a partition's owner to every
//! reader, fast, without Redis ever holding the only copy of anything.
//!
//! The owner commits to Postgres first, then appends a small entry per event to
//! its partition's Redis stream, with the event's partition position as the
//! stream ID. Readers follow the streams with `XREAD BLOCK`; whenever an entry's
//! position is not the next one they expect (they started late, fell behind the
//! stream's trimmed length, Redis restarted empty, an owner died between commit
//! and XADD) they read the missing positions from Postgres. A slow poll of the
//! partition heads in Postgres catches a lost tail.
//!
//! # Layout
//! - [`keys`]: stream key names.
//! - [`publisher`]: XADD after commit.
//! - [`reader`]: the follower loop and its Postgres catch-up.
//! - [`token`]: sync positions and the compact token that encodes them.

pub mod keys;
pub mod publisher;
pub mod reader;
pub mod token;

pub use keys::StreamKeys;
pub use publisher::Publisher;
pub use reader::{EventEntry, ReplicationSink, StreamReader};

/// Connect to Redis, with the URL (minus any password) in the error.
pub async fn connect(url: &str) -> Result<redis::Client, redis::RedisError> {
    redis::Client::open(url)
}
