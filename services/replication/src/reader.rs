//! Following the partition streams, with Postgres as the fallback.
//!
//! The reader keeps, per partition, the position up to which it has handed
//! every event to its sink, with no gap. Entries from Redis that skip ahead
//! trigger a Postgres read of the missing range first; a periodic poll of the
//! partition heads catches a tail that never reached Redis (an owner killed
//! between commit and XADD, or Redis down). Redis being down only slows
//! readers to the poll interval; it never loses or reorders anything.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::streams::StreamReadReply;
use tessera_storage::Store;
use tessera_storage::events::PartitionEntry;
use tracing::Instrument;

use crate::keys::StreamKeys;

/// What replication carries about one committed event.
pub type EventEntry = PartitionEntry;

/// The fields of a stream entry (short names: entries are many and small).
pub(crate) fn write_entry_fields(entry: &EventEntry, cmd: &mut redis::Cmd) {
    cmd.arg("r")
        .arg(&entry.room_id)
        .arg("e")
        .arg(&entry.event_id)
        .arg("t")
        .arg(&entry.kind);
    if let Some(k) = &entry.state_key {
        cmd.arg("k").arg(k);
    }
    if let Some(m) = &entry.membership {
        cmd.arg("m").arg(m);
    }
    if entry.rejected {
        cmd.arg("x").arg("1");
    }
}

fn parse_entry(pos: i64, map: &HashMap<String, redis::Value>) -> Option<EventEntry> {
    let get = |k: &str| {
        map.get(k)
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
    };
    Some(EventEntry {
        pos,
        room_id: get("r")?,
        event_id: get("e")?,
        kind: get("t")?,
        state_key: get("k"),
        membership: get("m"),
        rejected: get("x").is_some(),
    })
}

/// The entries of one stream read, the first trace context among them, and
/// the replication lag (publish to read) of each recorded in
/// `tessera_replication_lag_seconds`.
fn parse_stream(ids: &[redis::streams::StreamId]) -> (Vec<EventEntry>, Option<String>) {
    let now_ms = tessera_runtime::now_ms();
    let mut traceparent = None;
    let mut entries = Vec::with_capacity(ids.len());
    for id in ids {
        let field = |k: &str| {
            id.map
                .get(k)
                .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
        };
        if traceparent.is_none() {
            traceparent = field("tp");
        }
        if let Some(published) = field("ts").and_then(|t| t.parse::<u64>().ok()) {
            metrics::histogram!("tessera_replication_lag_seconds")
                .record(now_ms.saturating_sub(published) as f64 / 1000.0);
        }
        if let Some(entry) = id
            .id
            .split('-')
            .next()
            .and_then(|pos| pos.parse().ok())
            .and_then(|pos| parse_entry(pos, &id.map))
        {
            entries.push(entry);
        }
    }
    (entries, traceparent)
}

/// Where a reader delivers events.
pub trait ReplicationSink: Send + Sync + 'static {
    /// Events of one partition, contiguous and in order, each starting right
    /// after the previous call's last position.
    fn apply(&self, partition: u32, entries: &[EventEntry]);
    /// A user's own data changed.
    fn user_changed(&self, user_id: &str);
}

pub struct StreamReader {
    store: Store,
    client: redis::Client,
    keys: StreamKeys,
    positions: Vec<i64>,
    head_poll: Duration,
}

const PAGE: i64 = 1000;

impl StreamReader {
    /// A reader that has already delivered everything up to `positions`.
    pub fn new(store: Store, client: redis::Client, keys: StreamKeys, positions: Vec<i64>) -> Self {
        Self {
            store,
            client,
            keys,
            positions,
            head_poll: Duration::from_millis(1000),
        }
    }

    pub fn with_head_poll(mut self, every: Duration) -> Self {
        self.head_poll = every;
        self
    }

    /// Follow until `shutdown` resolves.
    pub async fn run(
        mut self,
        sink: Arc<dyn ReplicationSink>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        let mut user_stream_id = "$".to_owned();
        let mut last_poll = Instant::now() - self.head_poll;
        loop {
            if last_poll.elapsed() >= self.head_poll {
                last_poll = Instant::now();
                if let Err(error) = self.catch_up_to_heads(&*sink).await {
                    tracing::warn!(%error, "cannot poll partition heads");
                }
            }
            if conn.is_none() {
                // A blocking XREAD is answered after up to `head_poll`: the
                // client's default response timeout (500 ms) would cut it off.
                let config = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(self.head_poll + Duration::from_secs(5)));
                match self
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                {
                    Ok(c) => conn = Some(c),
                    Err(error) => {
                        tracing::warn!(%error, "Redis unreachable; following Postgres only");
                        tokio::select! {
                            _ = &mut shutdown => return,
                            _ = tokio::time::sleep(self.head_poll) => continue,
                        }
                    }
                }
            }
            let c = conn.as_mut().expect("connected above");
            let block_ms = self.head_poll.as_millis().max(1) as u64;
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(PAGE)
                .arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS");
            for p in 0..self.positions.len() {
                cmd.arg(self.keys.partition(p as u32));
            }
            cmd.arg(self.keys.users());
            for pos in &self.positions {
                cmd.arg(format!("{pos}-0"));
            }
            cmd.arg(&user_stream_id);
            let reply: Result<Option<StreamReadReply>, _> = tokio::select! {
                _ = &mut shutdown => return,
                r = cmd.query_async(c) => r,
            };
            match reply {
                Ok(Some(reply)) => {
                    for stream in reply.keys {
                        if stream.key == self.keys.users() {
                            for id in &stream.ids {
                                user_stream_id = id.id.clone();
                                if let Some(user) = id
                                    .map
                                    .get("u")
                                    .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
                                {
                                    sink.user_changed(&user);
                                }
                            }
                            continue;
                        }
                        let Some(partition) = self.partition_of_key(&stream.key) else {
                            continue;
                        };
                        let (entries, traceparent) = parse_stream(&stream.ids);
                        let span = tracing::info_span!(
                            "replication.deliver",
                            partition,
                            entries = entries.len(),
                        );
                        if let Some(traceparent) = &traceparent {
                            tessera_runtime::traces::set_parent_from_traceparent(
                                &span,
                                traceparent,
                            );
                        }
                        if let Err(error) = self
                            .deliver(partition, entries, &*sink)
                            .instrument(span)
                            .await
                        {
                            tracing::warn!(partition, %error, "cannot fill a gap from Postgres; retrying");
                        }
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, "XREAD failed; reconnecting");
                    metrics::counter!("tessera_replication_read_errors_total").increment(1);
                    conn = None;
                }
            }
        }
    }

    fn partition_of_key(&self, key: &str) -> Option<u32> {
        let p: u32 = key.rsplit(':').next()?.parse().ok()?;
        ((p as usize) < self.positions.len()).then_some(p)
    }

    /// Hand over entries read from Redis, filling any gap before them from Postgres.
    async fn deliver(
        &mut self,
        partition: u32,
        entries: Vec<EventEntry>,
        sink: &dyn ReplicationSink,
    ) -> Result<(), tessera_storage::StoreError> {
        let mut run: Vec<EventEntry> = Vec::new();
        for entry in entries {
            let expected = self.positions[partition as usize] + run.len() as i64 + 1;
            if entry.pos < expected {
                continue; // already delivered (from Postgres)
            }
            if entry.pos > expected {
                self.flush(partition, &mut run, sink);
                metrics::counter!("tessera_replication_gaps_total").increment(1);
                self.fill_from_postgres(partition, entry.pos - 1, sink)
                    .await?;
            }
            run.push(entry);
        }
        self.flush(partition, &mut run, sink);
        Ok(())
    }

    fn flush(&mut self, partition: u32, run: &mut Vec<EventEntry>, sink: &dyn ReplicationSink) {
        if let Some(last) = run.last() {
            let last = last.pos;
            sink.apply(partition, run);
            self.positions[partition as usize] = last;
            metrics::counter!("tessera_replication_events_read_total", "source" => "redis")
                .increment(run.len() as u64);
            run.clear();
        }
    }

    /// Deliver every event of `partition` up to `upto` from Postgres.
    async fn fill_from_postgres(
        &mut self,
        partition: u32,
        upto: i64,
        sink: &dyn ReplicationSink,
    ) -> Result<(), tessera_storage::StoreError> {
        while self.positions[partition as usize] < upto {
            let after = self.positions[partition as usize];
            let page = self
                .store
                .partition_entries(partition, after, upto, PAGE)
                .await?;
            let Some(last) = page.last().map(|e| e.pos) else {
                // Positions are gap-free and committed in order, so a missing
                // one means we were told about a head that is not visible yet.
                return Ok(());
            };
            if page.first().map(|e| e.pos) != Some(after + 1) {
                return Err(tessera_storage::StoreError::Corrupt(format!(
                    "partition {partition}: expected position {} in Postgres, found {:?}",
                    after + 1,
                    page.first().map(|e| e.pos)
                )));
            }
            sink.apply(partition, &page);
            self.positions[partition as usize] = last;
            metrics::counter!("tessera_replication_events_read_total", "source" => "postgres")
                .increment(page.len() as u64);
        }
        Ok(())
    }

    async fn catch_up_to_heads(
        &mut self,
        sink: &dyn ReplicationSink,
    ) -> Result<(), tessera_storage::StoreError> {
        let heads = self.store.partition_heads().await?;
        for (p, head) in heads.into_iter().enumerate().take(self.positions.len()) {
            if head > self.positions[p] {
                self.fill_from_postgres(p as u32, head, sink).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
