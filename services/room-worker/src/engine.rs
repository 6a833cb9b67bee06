//! Per-room queues and the fair scheduler.
//!
//! Each active room has a FIFO queue of jobs. A room with work is in the ready
//! queue at most once; `concurrency` executors take rooms from it, run one
//! *turn* (at most `batch_size` events of that room), and put the room at the
//! back if it still has work. So a room with a deep backlog gets one turn in
//! every round like any other, and a room with one new event waits for at most
//! one turn of each room ahead of it, never for another room's whole backlog.
//! Within a room, turns never overlap: its events are ordered.
//!
//! A room with a backlog of staged federation PDUs (at least
//! [`BULK_BACKLOG`]) takes its turns in the *bulk lane*: a low-priority runtime
//! with its own database connections (see `tessera_runtime::bulk`). Its
//! share of the CPU is then what the other rooms leave over, so a flood
//! cannot slow the quiet rooms' turns in this or any other process.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tessera_cluster::PartitionGuard;
use tessera_events::keys::SigningKey;
use tessera_events::pdu::Pdu;
use tessera_events::room_state::RoomState;
use tessera_events::ruma::events::StateEventType;
use tessera_events::ruma::{OwnedRoomId, OwnedServerName, RoomId};
use tessera_events::state_map::StateIds;
use tessera_replication::Publisher;
use tessera_storage::Store;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::process;
use crate::state_cache::StateCache;

/// Staged PDUs a room must have waiting for its turns to go to the bulk lane:
/// a quiet room's one or two events never do, a flooded room's always.
pub const BULK_BACKLOG: i64 = 16;

pub struct EngineConfig {
    pub worker_id: String,
    pub ownership: Arc<tessera_cluster::Ownership>,
    pub store: Store,
    pub publisher: Publisher,
    pub key: Arc<SigningKey>,
    pub server_name: String,
    pub partitions: u32,
    pub concurrency: usize,
    pub batch_size: usize,
    /// How many state events the rooms' states kept in memory may hold in all.
    pub state_cache_events: usize,
    /// Where backlogged rooms' staged turns run, if anywhere apart.
    pub bulk: Option<BulkLane>,
}

/// The low-priority runtime for backlogged rooms, and the database pool
/// whose connections were made inside it.
pub struct BulkLane {
    pub runtime: tokio::runtime::Handle,
    pub store: Store,
}

/// One piece of work for a room, answered through `reply` once committed.
pub struct Job {
    pub work: process::Work,
    /// Where the answer goes (none for background work such as staged PDUs).
    pub reply: Option<oneshot::Sender<process::Answer>>,
    /// Held until the answer is sent, so a handoff waits for this job.
    pub guard: PartitionGuard,
    /// The span of the request that asked for it: the turn continues its trace.
    pub span: tracing::Span,
}

impl Job {
    fn weight(&self) -> usize {
        match &self.work {
            process::Work::Submit(templates) => templates.len().max(1),
            _ => usize::MAX / 2,
        }
    }

    /// Send the answer, if anyone waits for one.
    pub fn answer(self, answer: process::Answer) {
        if let Some(reply) = self.reply {
            let _ = reply.send(answer);
        }
    }

    /// Work that runs in a turn of its own.
    fn solo(&self) -> bool {
        !matches!(self.work, process::Work::Submit(_))
    }
}

#[derive(Default)]
struct RoomQueue {
    jobs: VecDeque<Job>,
    /// In the ready queue or being run right now.
    scheduled: bool,
}

pub struct Engine {
    /// For tasks that outlive a turn (delayed retries).
    me: std::sync::Weak<Engine>,
    pub(crate) worker_id: String,
    ownership: Arc<tessera_cluster::Ownership>,
    inbound: std::sync::OnceLock<Arc<crate::inbound::Inbound>>,
    /// Rooms with a staged-PDU turn already queued.
    staged_pending: Mutex<std::collections::HashSet<OwnedRoomId>>,
    /// Staged PDUs per room with a backlog, kept by this owner as it stages
    /// and processes them (counted in Postgres once, when first needed), so
    /// the backpressure check costs no query per transaction.
    backlogs: Mutex<HashMap<OwnedRoomId, i64>>,
    bulk: Option<BulkLane>,
    /// Recently used state groups (group ID → state and chain length, and
    /// what each costs in slots), shared by turns, and how many slots they
    /// hold together.
    groups: Mutex<(GroupCache, usize)>,
    /// Committed state resolutions: a sorted set of state groups → the
    /// group of their resolution.
    resolutions: Mutex<HashMap<Vec<String>, String>>,
    pub(crate) store: Store,
    pub(crate) publisher: Publisher,
    pub(crate) key: Arc<SigningKey>,
    pub(crate) server_name: OwnedServerName,
    pub(crate) partitions: u32,
    batch_size: usize,
    queues: Mutex<HashMap<OwnedRoomId, RoomQueue>>,
    ready: mpsc::UnboundedSender<OwnedRoomId>,
    /// Rooms whose state is in memory.
    states: Mutex<StateCache<RoomState>>,
    /// Serializes commit-then-publish per partition, so stream entries are
    /// appended in position order.
    partition_locks: Vec<tokio::sync::Mutex<()>>,
}

/// A state group's state and, when known, its chain length.
type CachedGroup = (Arc<StateIds>, Option<u32>);

/// Cached groups by ID, each with its cost in slots.
type GroupCache = HashMap<String, (CachedGroup, usize)>;

/// How many state groups loaded from storage the engine keeps, and how many
/// slots in all (about 100 bytes each) before it forgets them.
const GROUP_CACHE_GROUPS: usize = 10_000;
const GROUP_CACHE_SLOTS: usize = 2_000_000;

/// How many state resolutions the engine remembers (a few group IDs each).
const RESOLUTION_CACHE: usize = 10_000;

impl Engine {
    pub fn start(config: EngineConfig) -> Arc<Self> {
        let (ready, rx) = mpsc::unbounded_channel();
        let engine = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            worker_id: config.worker_id,
            ownership: config.ownership,
            inbound: std::sync::OnceLock::new(),
            staged_pending: Mutex::new(std::collections::HashSet::new()),
            backlogs: Mutex::new(HashMap::new()),
            bulk: config.bulk,
            groups: Mutex::new((HashMap::new(), 0)),
            resolutions: Mutex::new(HashMap::new()),
            store: config.store,
            publisher: config.publisher,
            key: config.key,
            server_name: OwnedServerName::try_from(config.server_name)
                .expect("validated server_name"),
            partitions: config.partitions,
            batch_size: config.batch_size.max(1),
            queues: Mutex::new(HashMap::new()),
            ready,
            states: Mutex::new(StateCache::new(config.state_cache_events)),
            partition_locks: (0..config.partitions)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        });
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..config.concurrency.max(1) {
            tokio::spawn(Arc::clone(&engine).executor(Arc::clone(&rx)));
        }
        engine
    }

    /// Queue a job behind the room's earlier ones.
    pub fn submit(&self, room_id: OwnedRoomId, job: Job) {
        let mut queues = self.queues.lock().expect("queues lock");
        let queue = queues.entry(room_id.clone()).or_default();
        queue.jobs.push_back(job);
        metrics::gauge!("tessera_room_worker_queued_jobs").increment(1.0);
        if !queue.scheduled {
            queue.scheduled = true;
            let _ = self.ready.send(room_id);
        }
    }

    /// Turn on inbound federation processing.
    pub fn set_inbound(&self, inbound: Arc<crate::inbound::Inbound>) {
        let _ = self.inbound.set(inbound);
    }

    pub(crate) fn inbound(&self) -> Option<&crate::inbound::Inbound> {
        self.inbound.get().map(|i| i.as_ref())
    }

    /// The bulk lane, for a room whose staged PDUs are backlogged.
    pub(crate) fn bulk_lane_for(&self, room_id: &RoomId) -> Option<&BulkLane> {
        let bulk = self.bulk.as_ref()?;
        self.backlogs
            .lock()
            .expect("backlogs lock")
            .get(room_id)
            .is_some_and(|backlog| *backlog >= BULK_BACKLOG)
            .then_some(bulk)
    }

    /// The bulk lane's database pool, if there is a bulk lane.
    pub(crate) fn bulk_store(&self) -> Option<&Store> {
        self.bulk.as_ref().map(|bulk| &bulk.store)
    }

    /// This engine, owned (for work handed to the bulk lane).
    pub(crate) fn arc(&self) -> Option<Arc<Engine>> {
        self.me.upgrade()
    }

    pub(crate) fn inbound_arc(&self) -> Option<Arc<crate::inbound::Inbound>> {
        self.inbound.get().cloned()
    }

    /// Queue a turn over the room's staged PDUs, unless one is queued already
    /// or the partition is not ours (its owner will do it).
    pub fn schedule_staged(&self, room_id: &RoomId) {
        let partition = tessera_cluster::partition_of(room_id.as_str(), self.partitions);
        let Ok(guard) = self.ownership.enter(partition) else {
            return;
        };
        if !self
            .staged_pending
            .lock()
            .expect("staged lock")
            .insert(room_id.to_owned())
        {
            return;
        }
        self.submit(
            room_id.to_owned(),
            Job {
                work: process::Work::Staged,
                reply: None,
                guard,
                span: tracing::Span::current(),
            },
        );
    }

    /// A turn over the room's staged PDUs begins: from now on, PDUs staged
    /// for the room may not be in the rows the turn reads, so staging them
    /// must queue another turn (behind this one) rather than count on it.
    pub(crate) fn staged_turn_starting(&self, room_id: &RoomId) {
        self.staged_pending
            .lock()
            .expect("staged lock")
            .remove(room_id);
    }

    /// Decide the next turn after one over staged PDUs.
    pub(crate) fn after_staged_turn(
        &self,
        room_id: &RoomId,
        outcome: crate::inbound::StagedOutcome,
    ) {
        use crate::inbound::StagedOutcome;
        let delay = match outcome {
            StagedOutcome::Done => {
                // Nothing left: count afresh next time, which also undoes
                // any drift from counting while a turn was committing.
                self.backlogs.lock().expect("backlogs lock").remove(room_id);
                return;
            }
            StagedOutcome::More => None,
            StagedOutcome::RetryAt(at) => {
                Some(at.saturating_duration_since(std::time::Instant::now()))
            }
            StagedOutcome::Failed => Some(std::time::Duration::from_secs(1)),
        };
        match delay {
            None => self.schedule_staged(room_id),
            Some(delay) => {
                let me = self.me.clone();
                let room_id = room_id.to_owned();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Some(engine) = me.upgrade() {
                        engine.schedule_staged(&room_id);
                    }
                });
            }
        }
    }

    /// Every room of a partition with staged PDUs gets a turn (after the
    /// partition was acquired, possibly from a worker that died).
    pub async fn resume_staged(&self, partition: u32) {
        match self.store.rooms_with_staged(partition).await {
            Ok(rooms) => {
                for room in rooms {
                    if let Ok(room_id) = OwnedRoomId::try_from(room) {
                        // Counted now, so that a big backlog goes to the bulk lane.
                        if let Err(error) = self.staged_backlog(&room_id).await {
                            tracing::warn!(room = %room_id, %error, "cannot count staged PDUs");
                        }
                        self.schedule_staged(&room_id);
                    }
                }
            }
            Err(error) => tracing::warn!(partition, %error, "cannot list rooms with staged PDUs"),
        }
    }

    /// A state group's state and chain length (when known), if cached.
    pub(crate) fn cached_group(&self, id: &str) -> Option<CachedGroup> {
        let cache = self.groups.lock().expect("groups lock");
        cache.0.get(id).map(|(group, _)| group.clone())
    }

    /// Remember a state group; `cost` is what it holds in slots of its own
    /// (all of them for one read from storage, a few for one derived from
    /// another in memory).
    pub(crate) fn cache_group(
        &self,
        id: &str,
        state: Arc<StateIds>,
        chain: Option<u32>,
        cost: usize,
    ) {
        let mut cache = self.groups.lock().expect("groups lock");
        let (groups, slots) = &mut *cache;
        // Bounded by slots, not groups: a large room's group read from
        // storage is as large as its state.
        let evicted = if groups.len() >= GROUP_CACHE_GROUPS || *slots + cost > GROUP_CACHE_SLOTS {
            *slots = 0;
            std::mem::take(groups)
        } else {
            HashMap::new()
        };
        *slots += cost;
        if let Some((_, old_cost)) = groups.insert(id.to_owned(), ((state, chain), cost)) {
            *slots -= old_cost;
        }
        metrics::gauge!("tessera_room_worker_state_groups").set(groups.len() as f64);
        metrics::gauge!("tessera_room_worker_state_group_slots").set(*slots as f64);
        drop(cache);
        // Freeing up to the whole bound's trees takes long (a flooded room's
        // low-priority turn once held every other room's commit this way):
        // done with the lock released.
        drop(evicted);
    }

    /// The group a set of state groups (sorted) resolved to, if remembered.
    pub(crate) fn cached_resolution(&self, groups: &[String]) -> Option<String> {
        self.resolutions
            .lock()
            .expect("resolutions lock")
            .get(groups)
            .cloned()
    }

    /// Remember a committed resolution (the set of groups sorted).
    pub(crate) fn cache_resolution(&self, groups: Vec<String>, group: String) {
        let mut cache = self.resolutions.lock().expect("resolutions lock");
        let evicted = if cache.len() >= RESOLUTION_CACHE {
            std::mem::take(&mut *cache)
        } else {
            HashMap::new()
        };
        cache.insert(groups, group);
        drop(cache);
        drop(evicted);
    }

    /// The room's backlog if this worker has counted it (none once a turn
    /// drained it, until it is counted again).
    pub fn known_backlog(&self, room_id: &RoomId) -> Option<i64> {
        self.backlogs
            .lock()
            .expect("backlogs lock")
            .get(room_id)
            .copied()
    }

    /// PDUs staged for the room and not processed yet.
    pub async fn staged_backlog(
        &self,
        room_id: &RoomId,
    ) -> Result<i64, tessera_storage::StoreError> {
        if let Some(count) = self.backlogs.lock().expect("backlogs lock").get(room_id) {
            return Ok(*count);
        }
        let count = self.store.staged_count(room_id.as_str()).await?;
        Ok(*self
            .backlogs
            .lock()
            .expect("backlogs lock")
            .entry(room_id.to_owned())
            .or_insert(count))
    }

    /// `delta` PDUs were staged (positive) or processed (negative).
    pub fn adjust_backlog(&self, room_id: &RoomId, delta: i64) {
        if let Some(count) = self
            .backlogs
            .lock()
            .expect("backlogs lock")
            .get_mut(room_id)
        {
            *count = (*count + delta).max(0);
        }
    }

    /// Drop in-memory state of a partition's rooms (the lease is gone).
    pub fn forget_partition(&self, partition: u32) {
        let partitions = self.partitions;
        self.backlogs
            .lock()
            .expect("backlogs lock")
            .retain(|room, _| {
                tessera_cluster::partition_of(room.as_str(), partitions) != partition
            });
        let forgotten = self.update_states(|states| {
            states.retain(|room| {
                tessera_cluster::partition_of(room.as_str(), partitions) != partition
            })
        });
        drop(forgotten);
    }

    pub(crate) fn cached_state(&self, room_id: &RoomId) -> Option<RoomState> {
        self.states.lock().expect("states lock").get(room_id)
    }

    /// The room's `m.room.server_acl` event if its state is in memory
    /// (`Some(None)`: the room has none); `None` when it is not cached.
    pub(crate) fn cached_server_acl(&self, room_id: &RoomId) -> Option<Option<Arc<Pdu>>> {
        let states = self.states.lock().expect("states lock");
        let state = states.peek(room_id)?;
        Some(state.get(&StateEventType::RoomServerAcl, "").cloned())
    }

    /// Keep a room's state for its next turn (forgetting the rooms used
    /// least recently if the states kept pass their bound).
    pub(crate) fn cache_state(&self, state: RoomState) {
        let room_id = state.room_id().to_owned();
        let events = state.state_len();
        let forgotten = self.update_states(|states| states.insert(room_id, state, events));
        if !forgotten.is_empty() {
            metrics::counter!("tessera_room_worker_room_states_forgotten_total")
                .increment(forgotten.len() as u64);
        }
    }

    pub(crate) fn drop_state(&self, room_id: &RoomId) {
        let forgotten = self.update_states(|states| states.remove(room_id));
        drop(forgotten);
    }

    /// Change the kept states and publish their size. What `change` returns
    /// (states it forgot) is dropped by the caller after the lock is
    /// released: freeing a large room's state takes a while, and a flooded
    /// room's low-priority turn must not hold every other room's turn
    /// meanwhile.
    fn update_states<T>(&self, change: impl FnOnce(&mut StateCache<RoomState>) -> T) -> T {
        let mut states = self.states.lock().expect("states lock");
        let result = change(&mut states);
        metrics::gauge!("tessera_room_worker_room_state_events").set(states.events() as f64);
        metrics::gauge!("tessera_room_worker_room_states").set(states.rooms() as f64);
        result
    }

    pub(crate) fn partition_lock(&self, partition: u32) -> &tokio::sync::Mutex<()> {
        &self.partition_locks[partition as usize]
    }

    async fn executor(
        self: Arc<Self>,
        rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<OwnedRoomId>>>,
    ) {
        loop {
            let room_id = match rx.lock().await.recv().await {
                Some(room_id) => room_id,
                None => return,
            };
            let jobs = self.take_turn(&room_id);
            if !jobs.is_empty() {
                let count = jobs.len();
                let span = tracing::info_span!(
                    parent: &jobs[0].span,
                    "room_turn",
                    room = %room_id,
                    jobs = count,
                );
                process::run_turn(&self, &room_id, jobs)
                    .instrument(span)
                    .await;
                metrics::gauge!("tessera_room_worker_queued_jobs").decrement(count as f64);
            }
            self.end_turn(room_id);
        }
    }

    /// The jobs of one turn: at least one, then more while they fit the batch size.
    fn take_turn(&self, room_id: &RoomId) -> Vec<Job> {
        let mut queues = self.queues.lock().expect("queues lock");
        let Some(queue) = queues.get_mut(room_id) else {
            return vec![];
        };
        let mut jobs = Vec::new();
        let mut weight = 0;
        while let Some(job) = queue.jobs.front() {
            let w = job.weight();
            if !jobs.is_empty() && (weight + w > self.batch_size || job.solo()) {
                break;
            }
            weight += w;
            jobs.push(queue.jobs.pop_front().expect("front exists"));
            if jobs.last().is_some_and(Job::solo) {
                break;
            }
        }
        jobs
    }

    fn end_turn(&self, room_id: OwnedRoomId) {
        let mut queues = self.queues.lock().expect("queues lock");
        match queues.get_mut(&room_id) {
            Some(queue) if !queue.jobs.is_empty() => {
                let _ = self.ready.send(room_id);
            }
            Some(_) => {
                queues.remove(&room_id);
            }
            None => {}
        }
    }
}
