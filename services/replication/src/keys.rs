//! Redis key names. Every key starts with the configured prefix, so clusters
//! and tests can share one Redis.

#[derive(Debug, Clone)]
pub struct StreamKeys {
    prefix: String,
}

impl StreamKeys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The stream of partition `p`'s committed events.
    pub fn partition(&self, partition: u32) -> String {
        format!("{}:events:{partition}", self.prefix)
    }

    /// The stream of changes to users' own data (account data), for waking syncs.
    pub fn users(&self) -> String {
        format!("{}:users", self.prefix)
    }
}
