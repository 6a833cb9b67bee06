//! Appending committed events to their partition's stream.
//!
//! Called by the owner after the Postgres commit. A failure here loses nothing:
//! readers find the gap and read Postgres. So errors are logged and counted,
//! never returned to the client whose event was already committed.

use redis::aio::ConnectionManager;

use crate::keys::StreamKeys;
use crate::reader::EventEntry;

#[derive(Clone)]
pub struct Publisher {
    redis: ConnectionManager,
    keys: StreamKeys,
    max_len: u64,
}

impl Publisher {
    pub async fn new(
        client: &redis::Client,
        keys: StreamKeys,
        max_len: u64,
    ) -> Result<Self, redis::RedisError> {
        let redis = ConnectionManager::new(client.clone()).await?;
        Ok(Self {
            redis,
            keys,
            max_len,
        })
    }

    /// Connect, giving up after `timeout` with the URL in the error.
    pub async fn connect(
        url: &str,
        keys: StreamKeys,
        max_len: u64,
        timeout: std::time::Duration,
    ) -> Result<Self, String> {
        let client =
            redis::Client::open(url).map_err(|e| format!("invalid Redis URL {url}: {e}"))?;
        match tokio::time::timeout(timeout, Self::new(&client, keys, max_len)).await {
            Ok(Ok(publisher)) => Ok(publisher),
            Ok(Err(e)) => Err(format!("cannot connect to Redis at {url}: {e}")),
            Err(_) => Err(format!("cannot connect to Redis at {url}: timed out")),
        }
    }

    /// XADD the entries of one partition, in position order, in one round trip.
    pub async fn publish(&self, partition: u32, entries: &[EventEntry]) {
        if entries.is_empty() {
            return;
        }
        let key = self.keys.partition(partition);
        // Readers measure their lag from the publish time, and continue the
        // committing turn's trace from its traceparent.
        let published_ms = tessera_runtime::now_ms();
        let traceparent = tessera_runtime::traces::current_traceparent();
        let mut pipe = redis::pipe();
        for entry in entries {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.max_len)
                .arg(format!("{}-0", entry.pos));
            crate::reader::write_entry_fields(entry, &mut cmd);
            cmd.arg("ts").arg(published_ms);
            if let Some(traceparent) = &traceparent {
                cmd.arg("tp").arg(traceparent);
            }
            pipe.add_command(cmd).ignore();
        }
        let mut conn = self.redis.clone();
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => metrics::counter!("tessera_replication_published_total")
                .increment(entries.len() as u64),
            Err(error) => {
                // An ID at or below the stream's top means a newer owner already
                // published past us; readers have it from Postgres either way.
                metrics::counter!("tessera_replication_publish_failures_total").increment(1);
                tracing::warn!(partition, %error, "XADD failed; readers will catch up from Postgres");
            }
        }
    }

    /// Note a change to a user's own data (account data).
    pub async fn publish_user(&self, user_id: &str) {
        let mut conn = self.redis.clone();
        let result: Result<(), _> = redis::cmd("XADD")
            .arg(self.keys.users())
            .arg("MAXLEN")
            .arg("~")
            .arg(self.max_len)
            .arg("*")
            .arg("u")
            .arg(user_id)
            .query_async(&mut conn)
            .await;
        if let Err(error) = result {
            tracing::warn!(%error, "XADD to the user stream failed; syncs see the change at their next wake-up");
        }
    }
}
