//! One turn for one room: build each new event on the room's state, check it
//! against the authorization rules, persist the accepted ones in one fenced
//! transaction, publish them to the partition's stream, then answer.
//!
//! Nothing is acknowledged before it is committed. If the commit fails
//! (the lease moved, the database is unreachable) every job of the turn gets
//! an error the caller retries, and the room's in-memory state is dropped so
//! the next turn reloads it from the truth.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use tessera_events::Pdu;
use tessera_events::build::{BuildError, EventTemplate, build_create_event, v12_room_id};
use tessera_events::room_state::{Applied, CreateError, RoomState};
use tessera_events::room_version;
use tessera_events::ruma::{EventId, OwnedEventId, RoomId, RoomVersionId, UserId};
use tessera_replication::EventEntry;
use tessera_storage::StoreError;
use tessera_storage::persist::{
    Batch, EventToPersist, NewRoom, NewStateGroup, Redacts, StateChange, TxnKey,
};

use crate::engine::{Engine, Job};

/// An event to create, with the client transaction that asked for it.
#[derive(Debug, Clone)]
pub struct Request {
    pub template: EventTemplate,
    pub txn: Option<TxnKey>,
}

pub struct CreateRoom {
    pub version: RoomVersionId,
    pub create: EventTemplate,
    pub events: Vec<EventTemplate>,
    pub is_public: bool,
    pub alias: Option<String>,
}

pub enum Work {
    Submit(Vec<Request>),
    Create(Box<CreateRoom>),
    /// Process the room's staged PDUs (one turn's worth).
    Staged,
    /// A membership event a remote server built (send_join and friends).
    RemoteMembership(Box<RemoteMembership>),
    /// An invite to a room this server does not host.
    Invite(Box<crate::out_of_band::Invite>),
    /// PDUs for a room with nothing staged, to process at once if they can be.
    Direct(Box<Direct>),
}

/// PDUs from one transaction for one room: (event ID, canonical JSON).
pub struct Direct {
    pub origin: tessera_events::ruma::OwnedServerName,
    pub pdus: Vec<(String, String)>,
}

pub struct RemoteMembership {
    pub origin: tessera_events::ruma::OwnedServerName,
    pub pdu: Pdu,
    /// send_join's `omit_members`: the members to keep in the answer's
    /// state if the room has neither a name nor a canonical alias.
    pub omit_members: Option<Vec<String>>,
}

/// A Matrix error for the client: errcode and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub errcode: &'static str,
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(errcode: &'static str, message: impl Into<String>) -> Self {
        Self {
            errcode,
            message: message.into(),
        }
    }
}

pub type Outcome = Result<OwnedEventId, Refusal>;

pub enum Answer {
    Events(Vec<Outcome>),
    Created(Result<tessera_events::ruma::OwnedRoomId, Refusal>),
    Membership(Result<crate::inbound::MembershipResult, crate::inbound::MembershipRefusal>),
    /// An invite stored (true) or left to /send (false, the room is hosted here).
    InviteStored(bool),
    /// The PDUs of a direct job that were not processed (indices), to stage.
    Unprocessed(Vec<usize>),
    /// Nothing was written; the caller should retry (possibly elsewhere).
    Retry(String),
}

fn refusal_for(error: &CreateError) -> Refusal {
    match error {
        CreateError::Forbidden(e) => Refusal::new("M_FORBIDDEN", e.to_string()),
        CreateError::Build(BuildError::TooLarge(_)) => {
            Refusal::new("M_TOO_LARGE", error.to_string())
        }
        CreateError::Build(
            BuildError::ContentNotObject
            | BuildError::NonCanonicalContent(_)
            | BuildError::InvalidContent(_),
        ) => Refusal::new("M_BAD_JSON", error.to_string()),
        CreateError::Build(_) => Refusal::new("M_UNKNOWN", error.to_string()),
    }
}

pub async fn run_turn(engine: &Engine, room_id: &RoomId, mut jobs: Vec<Job>) {
    let started = Instant::now();
    // A backlogged room's turn runs in the bulk lane, which defers to every
    // other turn (see `tessera_runtime::bulk`).
    let _urgent = (jobs.len() != 1 || !matches!(jobs[0].work, Work::Staged))
        .then(tessera_runtime::bulk::urgent);
    if jobs.len() == 1 && !matches!(jobs[0].work, Work::Submit(_)) {
        let Job {
            work, reply, guard, ..
        } = jobs.remove(0);
        let epoch = guard.epoch();
        let answer = match work {
            Work::Create(create) => Some(create_room(engine, room_id, *create, epoch).await),
            Work::Invite(invite) => Some(
                match crate::out_of_band::store_invite(engine, room_id, *invite, epoch).await {
                    Ok(stored) => Answer::InviteStored(stored),
                    Err(error) => Answer::Retry(error.to_string()),
                },
            ),
            Work::Direct(direct) => Some(match engine.inbound() {
                Some(inbound) => {
                    match crate::inbound::process_direct(
                        engine,
                        inbound,
                        room_id,
                        &direct.origin,
                        &direct.pdus,
                        epoch,
                    )
                    .await
                    {
                        Ok(left) => Answer::Unprocessed(left),
                        Err(error) => {
                            engine.drop_state(room_id);
                            Answer::Retry(error.to_string())
                        }
                    }
                }
                None => Answer::Retry("federation is not configured on this worker".to_owned()),
            }),
            Work::RemoteMembership(membership) => Some(match engine.inbound() {
                Some(inbound) => Answer::Membership(
                    crate::inbound::process_membership(
                        engine,
                        inbound,
                        room_id,
                        &membership.origin,
                        membership.pdu,
                        membership.omit_members.as_deref(),
                        epoch,
                    )
                    .await,
                ),
                None => Answer::Retry("federation is not configured on this worker".to_owned()),
            }),
            Work::Staged => {
                engine.staged_turn_starting(room_id);
                if let Some(inbound) = engine.inbound() {
                    let outcome = match engine.bulk_lane_for(room_id) {
                        Some(lane) => bulk_staged_turn(engine, lane, room_id, epoch).await,
                        None => {
                            let _urgent = tessera_runtime::bulk::urgent();
                            crate::inbound::process_staged(
                                engine,
                                inbound,
                                &engine.store,
                                room_id,
                                epoch,
                            )
                            .await
                        }
                    };
                    drop(guard);
                    engine.after_staged_turn(room_id, outcome);
                }
                None
            }
            Work::Submit(_) => unreachable!("checked above"),
        };
        if let (Some(answer), Some(reply)) = (answer, reply) {
            let _ = reply.send(answer);
        }
    } else {
        submit(engine, room_id, jobs).await;
    }
    metrics::histogram!("tessera_room_worker_turn_seconds").record(started.elapsed().as_secs_f64());
}

/// A backlogged room's staged turn, run in the bulk lane (the partition
/// guard stays with the caller until it ends).
async fn bulk_staged_turn(
    engine: &Engine,
    lane: &crate::engine::BulkLane,
    room_id: &RoomId,
    epoch: i64,
) -> crate::inbound::StagedOutcome {
    let (Some(engine), Some(inbound)) = (engine.arc(), engine.inbound_arc()) else {
        return crate::inbound::StagedOutcome::Failed;
    };
    let store = lane.store.clone();
    let room_id = room_id.to_owned();
    let span = tracing::Span::current();
    lane.runtime
        .spawn(
            async move {
                crate::inbound::process_staged(&engine, &inbound, &store, &room_id, epoch).await
            }
            .instrument(span),
        )
        .await
        .unwrap_or_else(|error| {
            tracing::error!(%error, "a bulk turn panicked");
            crate::inbound::StagedOutcome::Failed
        })
}

/// One accepted event on its way to storage.
struct Accepted {
    pdu: Arc<Pdu>,
    applied: Applied,
    txn: Option<TxnKey>,
    redacts: Option<Redacts>,
}

async fn submit(engine: &Engine, room_id: &RoomId, jobs: Vec<Job>) {
    let state = match engine.cached_state(room_id) {
        Some(state) => Some(state),
        None => match engine.store.room_state(room_id).await {
            Ok(state) => state,
            Err(error) => {
                return answer_all(jobs, Answer::Retry(format!("cannot load room: {error}")));
            }
        },
    };
    let Some(state) = state else {
        for job in jobs {
            // A leave may reject an invite to a room hosted elsewhere.
            if let Work::Submit(requests) = &job.work
                && let [request] = requests.as_slice()
                && let Some(answer) = crate::out_of_band::reject_invite(
                    engine,
                    room_id,
                    &request.template,
                    job.guard.epoch(),
                )
                .await
            {
                job.answer(answer);
                continue;
            }
            let n = match &job.work {
                Work::Submit(requests) => requests.len(),
                _ => 1,
            };
            job.answer(Answer::Events(vec![
                Err(Refusal::new(
                    "M_NOT_FOUND",
                    format!("unknown room {room_id}")
                ));
                n
            ]));
        }
        return;
    };

    // Client transactions are assumed new: the unique key on them makes a
    // repeat fail the commit, and only then are they looked up (one query)
    // and the turn built again, answering repeats with their first event.
    let mut known_txns: HashMap<TxnKey, String> = HashMap::new();
    for attempt in 0..2 {
        let (working, accepted, outcomes) =
            build_turn(engine, &state, &jobs, &mut known_txns).await;
        if !accepted.is_empty() {
            let epoch = jobs[0].guard.epoch();
            match commit(engine, &working, accepted, None, vec![], epoch).await {
                Ok(()) => {}
                Err(StoreError::Conflict(constraint))
                    if constraint.starts_with("event_txns") && attempt == 0 =>
                {
                    let keys: Vec<TxnKey> = jobs
                        .iter()
                        .flat_map(|job| match &job.work {
                            Work::Submit(requests) => {
                                requests.iter().filter_map(|r| r.txn.clone()).collect()
                            }
                            _ => vec![],
                        })
                        .collect();
                    match engine.store.txn_events(&keys).await {
                        Ok(known) => known_txns = known,
                        Err(error) => return answer_all(jobs, Answer::Retry(error.to_string())),
                    }
                    continue;
                }
                Err(error) => {
                    engine.drop_state(room_id);
                    return answer_all(jobs, Answer::Retry(error.to_string()));
                }
            }
        }
        engine.cache_state(working);
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            job.answer(Answer::Events(outcome));
        }
        return;
    }
    answer_all(
        jobs,
        Answer::Retry("client transaction conflict persisted".to_owned()),
    );
}

/// Build every event of a turn on a copy of the room state. Transactions in
/// `known_txns` (and repeats within the turn) are answered with their event.
async fn build_turn(
    engine: &Engine,
    state: &RoomState,
    jobs: &[Job],
    known_txns: &mut HashMap<TxnKey, String>,
) -> (RoomState, Vec<Accepted>, Vec<Vec<Outcome>>) {
    let mut working = state.clone();
    let mut accepted: Vec<Accepted> = Vec::new();
    let mut outcomes: Vec<Vec<Outcome>> = Vec::with_capacity(jobs.len());
    for job in jobs {
        let Work::Submit(requests) = &job.work else {
            continue;
        };
        let mut job_outcomes = Vec::with_capacity(requests.len());
        for request in requests {
            if let Some(txn) = &request.txn
                && let Some(id) = known_txns.get(txn)
            {
                job_outcomes.push(
                    EventId::parse(id.as_str())
                        .map_err(|e| Refusal::new("M_UNKNOWN", e.to_string())),
                );
                continue;
            }
            match working.create_event(&request.template, &engine.key, &engine.server_name) {
                Ok(pdu) => {
                    let redacts = match pdu.redacts() {
                        Some(target) => {
                            redaction_target(engine, &working, &accepted, &pdu, target).await
                        }
                        None => None,
                    };
                    let applied = working.apply(Arc::clone(&pdu));
                    if let Some(txn) = &request.txn {
                        known_txns.insert(txn.clone(), pdu.event_id().to_string());
                    }
                    job_outcomes.push(Ok(pdu.event_id().to_owned()));
                    accepted.push(Accepted {
                        pdu,
                        applied,
                        txn: request.txn.clone(),
                        redacts,
                    });
                }
                Err(error) => {
                    metrics::counter!("tessera_room_worker_refused_events_total", "errcode" => refusal_for(&error).errcode)
                        .increment(1);
                    job_outcomes.push(Err(refusal_for(&error)));
                }
            }
        }
        outcomes.push(job_outcomes);
    }
    (working, accepted, outcomes)
}

/// What a local user's redaction hides ([`RoomState::redaction_reach`],
/// [`tessera_storage::Store::redacts`]; a target created earlier in this
/// batch counts as stored).
async fn redaction_target(
    engine: &Engine,
    room: &RoomState,
    accepted: &[Accepted],
    redaction: &Pdu,
    target: &EventId,
) -> Option<Redacts> {
    let reach = room.redaction_reach(redaction.sender());
    let sender = accepted
        .iter()
        .find(|a| a.pdu.event_id() == target)
        .map(|a| a.pdu.sender());
    engine
        .store
        .redacts(room.room_id().as_str(), target.as_str(), reach, sender)
        .await
        .inspect_err(
            |error| tracing::warn!(%error, %target, "cannot read a redaction's target: not applied"),
        )
        .ok()
        .flatten()
}

fn answer_all(jobs: Vec<Job>, answer: Answer) {
    for job in jobs {
        let copy = match &answer {
            Answer::Events(o) => Answer::Events(o.clone()),
            Answer::Created(c) => Answer::Created(c.clone()),
            Answer::Retry(m)
            | Answer::Membership(Err(crate::inbound::MembershipRefusal { message: m, .. })) => {
                Answer::Retry(m.clone())
            }
            Answer::Membership(Ok(_)) | Answer::InviteStored(_) | Answer::Unprocessed(_) => {
                Answer::Retry("unexpected answer".to_owned())
            }
        };
        job.answer(copy);
    }
}

/// Persist accepted events (fenced by `epoch`), then publish them.
async fn commit(
    engine: &Engine,
    room: &RoomState,
    accepted: Vec<Accepted>,
    new_room: Option<NewRoom>,
    aliases: Vec<(String, String)>,
    epoch: i64,
) -> Result<(), StoreError> {
    let partition = tessera_cluster::partition_of(room.room_id().as_str(), engine.partitions);
    let events: Vec<EventToPersist> = accepted
        .iter()
        .map(|a| {
            let pdu = &a.pdu;
            let membership = pdu.membership();
            EventToPersist {
                event_id: pdu.event_id().to_string(),
                kind: pdu.kind().to_string(),
                state_key: pdu.state_key().map(str::to_owned),
                sender: pdu.sender().to_string(),
                origin_server_ts: pdu.origin_server_ts() as i64,
                depth: pdu.depth() as i64,
                membership: membership.clone(),
                rejected: false,
                prev_state_event_id: a
                    .applied
                    .replaced
                    .as_ref()
                    .map(|p| p.event_id().to_string()),
                json: pdu.canonical_json().to_owned(),
                state_changes: pdu
                    .state_key()
                    .map(|k| {
                        vec![StateChange {
                            kind: pdu.kind().to_string(),
                            state_key: k.to_owned(),
                            event_id: Some(pdu.event_id().to_string()),
                            membership,
                        }]
                    })
                    .unwrap_or_default(),
                redacts: a.redacts.clone(),
                txn: a.txn.clone(),
                state_group: Some(a.applied.group_after.clone()),
                state_group_before: a.applied.group_before.clone(),
                soft_failed: false,
                origin: None,
            }
        })
        .collect();
    let new_groups = accepted
        .iter()
        .filter_map(|a| a.applied.new_group.as_ref())
        .map(|g| NewStateGroup {
            id: g.id.clone(),
            parent: g.parent.clone(),
            chain_length: g.chain_length as i32,
            entries: g.entries.clone(),
        })
        .collect();
    let batch = Batch {
        partition,
        worker_id: engine.worker_id.clone(),
        epoch,
        room_id: room.room_id().to_string(),
        new_room,
        events,
        depth: room.depth() as i64,
        extremities: room.extremities().iter().map(|e| e.to_string()).collect(),
        aliases,
        new_groups,
        state_group: room.state_group().map(str::to_owned),
        staged_ids: vec![],
        outliers: vec![],
        out_of_band: None,
    };
    let _order = engine.partition_lock(partition).lock().await;
    let positions = engine.store.persist(&batch).await?;
    let entries: Vec<EventEntry> = batch
        .events
        .iter()
        .zip(&positions)
        .map(|(e, pos)| e.entry(&batch.room_id, *pos, false))
        .collect();
    metrics::counter!("tessera_room_worker_persisted_events_total").increment(entries.len() as u64);
    engine.publisher.publish(partition, &entries).await;
    Ok(())
}

async fn create_room(engine: &Engine, room_id: &RoomId, request: CreateRoom, epoch: i64) -> Answer {
    let refuse = |errcode, message: String| Answer::Created(Err(Refusal::new(errcode, message)));
    let Some(rules) = room_version::rules(&request.version) else {
        return refuse(
            "M_UNSUPPORTED_ROOM_VERSION",
            format!("room version {} is not supported", request.version),
        );
    };
    let derived = rules.authorization.room_create_event_id_as_room_id;
    if derived {
        match v12_room_id(&request.create, &rules) {
            Ok(id) if id == room_id => {}
            Ok(id) => {
                return refuse(
                    "M_INVALID_PARAM",
                    format!("room ID {room_id} does not match its create event ({id})"),
                );
            }
            Err(e) => return refuse("M_BAD_JSON", e.to_string()),
        }
    }
    let create = match build_create_event(
        &request.create,
        &rules,
        (!derived).then_some(room_id),
        &engine.key,
        &engine.server_name,
    ) {
        Ok(pdu) => Arc::new(pdu),
        Err(e) => return Answer::Created(Err(refusal_for(&CreateError::Build(e)))),
    };
    // A retried request builds the identical create event (ed25519 signatures
    // are deterministic), so an existing room with that create event means the
    // first attempt committed.
    match engine.store.room(room_id.as_str()).await {
        Ok(Some(_)) => {
            return match engine
                .store
                .state_event(room_id.as_str(), "m.room.create", "")
                .await
            {
                Ok(Some(stored)) if stored.event_id == create.event_id().as_str() => {
                    Answer::Created(Ok(room_id.to_owned()))
                }
                Ok(_) => refuse("M_ROOM_IN_USE", format!("room {room_id} already exists")),
                Err(e) => Answer::Retry(e.to_string()),
            };
        }
        Ok(None) => {}
        Err(e) => return Answer::Retry(e.to_string()),
    }
    let Some(mut state) = RoomState::from_create(Arc::clone(&create), request.version.clone())
    else {
        return refuse(
            "M_UNSUPPORTED_ROOM_VERSION",
            format!("room version {} is not supported", request.version),
        );
    };
    let mut accepted = vec![Accepted {
        pdu: Arc::clone(&create),
        applied: RoomState::create_group(&create),
        txn: None,
        redacts: None,
    }];
    for template in &request.events {
        match state.create_event(template, &engine.key, &engine.server_name) {
            Ok(pdu) => {
                let applied = state.apply(Arc::clone(&pdu));
                accepted.push(Accepted {
                    pdu,
                    applied,
                    txn: None,
                    redacts: None,
                });
            }
            Err(error) => {
                let mut refusal = refusal_for(&error);
                refusal.message = format!(
                    "{} event {:?} refused: {}",
                    template.kind, template.state_key, refusal.message
                );
                if refusal.errcode == "M_FORBIDDEN" {
                    // An initial event the room's own rules refuse is a bad request, not a permission problem.
                    refusal.errcode = "M_INVALID_PARAM";
                }
                return Answer::Created(Err(refusal));
            }
        }
    }
    let creator: &UserId = create.sender();
    let new_room = NewRoom {
        version: request.version.to_string(),
        creator: creator.to_string(),
        is_public: request.is_public,
    };
    let aliases = request
        .alias
        .iter()
        .map(|a| (a.clone(), creator.to_string()))
        .collect();
    match commit(engine, &state, accepted, Some(new_room), aliases, epoch).await {
        Ok(()) => {
            engine.cache_state(state);
            metrics::counter!("tessera_room_worker_rooms_created_total").increment(1);
            Answer::Created(Ok(room_id.to_owned()))
        }
        Err(StoreError::Conflict(constraint)) if constraint.contains("alias") => refuse(
            "M_ROOM_IN_USE",
            "the room alias is already taken".to_owned(),
        ),
        Err(StoreError::Conflict(_)) => {
            refuse("M_ROOM_IN_USE", format!("room {room_id} already exists"))
        }
        Err(error) => Answer::Retry(error.to_string()),
    }
}
