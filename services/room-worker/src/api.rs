//! The gRPC handlers. Each checks that this worker owns the room's partition
//! (answering with the owner's address if not), turns the request into a job
//! and waits for the engine's answer, which comes only after commit.

use std::sync::Arc;

use tessera_cluster::{NotOwned, Ownership, PartitionGuard};
use tessera_events::build::EventTemplate;
use tessera_events::ruma::{OwnedRoomId, RoomId, RoomVersionId, UserId};
use tessera_proto::OWNER_METADATA;
use tessera_proto::room_worker::room_worker_server::RoomWorker;
use tessera_proto::room_worker::{
    CreateRoomRequest, CreateRoomResponse, EventOutcome, MembershipAccepted,
    Refusal as ProtoRefusal, RemoteMembershipRequest, RemoteMembershipResponse, StagePdusRequest,
    StagePdusResponse, StoreInviteRequest, StoreInviteResponse, SubmitEventsRequest,
    SubmitEventsResponse, create_room_response, event_outcome, remote_membership_response,
};
use tessera_storage::Store;
use tessera_storage::persist::TxnKey;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, Job};
use crate::process::{Answer, CreateRoom, Refusal, Request as EventRequest, Work};

/// A transaction's PDUs for a room with nothing staged are processed at once
/// (not staged) when there are at most this many: a quiet room's traffic.
const DIRECT_MAX_PDUS: usize = 8;

pub struct RoomWorkerApi {
    engine: Arc<Engine>,
    ownership: Arc<Ownership>,
    store: Store,
    partitions: u32,
}

impl RoomWorkerApi {
    /// Whether the room's server ACL admits `origin`: from the state in
    /// memory once the room has been processed here, else from Postgres.
    async fn server_acl_admits(&self, room_id: &RoomId, origin: &str) -> Result<bool, Status> {
        let acl = match self.engine.cached_server_acl(room_id) {
            Some(acl) => acl.map(|pdu| pdu.content_value()),
            None => self
                .store
                .server_acl(room_id.as_str())
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?,
        };
        Ok(tessera_events::server_acl::allows(acl.as_ref(), origin))
    }

    pub fn new(
        engine: Arc<Engine>,
        ownership: Arc<Ownership>,
        store: Store,
        partitions: u32,
    ) -> Self {
        Self {
            engine,
            ownership,
            store,
            partitions,
        }
    }

    /// Enter the room's partition, or explain where to go instead.
    async fn enter(&self, room_id: &RoomId) -> Result<PartitionGuard, Status> {
        let partition = tessera_cluster::partition_of(room_id.as_str(), self.partitions);
        match self.ownership.enter(partition) {
            Ok(guard) => Ok(guard),
            Err(NotOwned::Moving(p)) => Err(Status::unavailable(format!(
                "partition {p} is being handed over; retry"
            ))),
            Err(NotOwned::Elsewhere(p)) => {
                metrics::counter!("tessera_room_worker_redirects_total").increment(1);
                match self.store.partition_owner(p).await {
                    Ok(Some(owner)) if owner.worker_id != self.engine.worker_id => {
                        let mut status = Status::failed_precondition(format!(
                            "partition {p} is owned by {} at {}",
                            owner.worker_id, owner.grpc_addr
                        ));
                        if let Ok(value) = owner.grpc_addr.parse() {
                            status.metadata_mut().insert(OWNER_METADATA, value);
                        }
                        Err(status)
                    }
                    Ok(_) => Err(Status::unavailable(format!(
                        "partition {p} has no owner right now; retry"
                    ))),
                    Err(error) => Err(Status::unavailable(format!(
                        "cannot look up the owner of partition {p}: {error}"
                    ))),
                }
            }
        }
    }

    async fn run(
        &self,
        room_id: OwnedRoomId,
        guard: PartitionGuard,
        work: Work,
    ) -> Result<Answer, Status> {
        let (reply, answer) = oneshot::channel();
        self.engine.submit(
            room_id,
            Job {
                work,
                reply: Some(reply),
                guard,
                span: tracing::Span::current(),
            },
        );
        answer
            .await
            .map_err(|_| Status::unavailable("the room-worker dropped the job; retry"))
    }
}

fn template(
    t: tessera_proto::room_worker::EventTemplate,
) -> Result<(EventTemplate, Option<TxnKey>), Status> {
    let content: serde_json::Value = serde_json::from_str(&t.content_json)
        .map_err(|e| Status::invalid_argument(format!("content_json is not JSON: {e}")))?;
    let sender = UserId::parse(t.sender.as_str())
        .map_err(|e| Status::invalid_argument(format!("sender: {e}")))?;
    let redacts = t
        .redacts
        .map(|r| {
            tessera_events::ruma::EventId::parse(r.as_str())
                .map_err(|e| Status::invalid_argument(format!("redacts: {e}")))
        })
        .transpose()?;
    let txn = t.txn.map(|txn| TxnKey {
        user_id: sender.to_string(),
        device_id: txn.device_id,
        txn_id: txn.txn_id,
    });
    Ok((
        EventTemplate {
            kind: t.r#type,
            state_key: t.state_key,
            content,
            sender,
            origin_server_ts: t.origin_server_ts,
            redacts,
        },
        txn,
    ))
}

fn room_id_from_request(room_id: &str) -> Result<OwnedRoomId, Status> {
    RoomId::parse(room_id).map_err(|e| Status::invalid_argument(format!("room_id: {e}")))
}

/// A PDU handed over as canonical JSON (checked by the caller already).
fn pdu_from_request(
    event_json: &str,
    rules: &tessera_events::ruma::room_version_rules::RoomVersionRules,
    room_id: &RoomId,
) -> Result<tessera_events::Pdu, Status> {
    let object: tessera_events::ruma::CanonicalJsonObject = serde_json::from_str(event_json)
        .map_err(|e| Status::invalid_argument(format!("event_json: {e}")))?;
    tessera_events::Pdu::from_json(object, rules, Some(room_id))
        .map_err(|e| Status::invalid_argument(format!("event_json: {e}")))
}

fn refusal(r: Refusal) -> ProtoRefusal {
    ProtoRefusal {
        errcode: r.errcode.to_owned(),
        message: r.message,
    }
}

#[tonic::async_trait]
impl RoomWorker for RoomWorkerApi {
    async fn submit_events(
        &self,
        request: Request<SubmitEventsRequest>,
    ) -> Result<Response<SubmitEventsResponse>, Status> {
        let request = request.into_inner();
        let room_id = room_id_from_request(&request.room_id)?;
        let requests = request
            .events
            .into_iter()
            .map(|t| template(t).map(|(template, txn)| EventRequest { template, txn }))
            .collect::<Result<Vec<_>, _>>()?;
        if requests.is_empty() {
            return Ok(Response::new(SubmitEventsResponse { outcomes: vec![] }));
        }
        let guard = self.enter(&room_id).await?;
        match self.run(room_id, guard, Work::Submit(requests)).await? {
            Answer::Events(outcomes) => Ok(Response::new(SubmitEventsResponse {
                outcomes: outcomes
                    .into_iter()
                    .map(|o| EventOutcome {
                        outcome: Some(match o {
                            Ok(id) => event_outcome::Outcome::EventId(id.to_string()),
                            Err(r) => event_outcome::Outcome::Refusal(refusal(r)),
                        }),
                    })
                    .collect(),
            })),
            Answer::Retry(message) => Err(Status::unavailable(message)),
            _ => Err(Status::internal("unexpected answer")),
        }
    }

    async fn create_room(
        &self,
        request: Request<CreateRoomRequest>,
    ) -> Result<Response<CreateRoomResponse>, Status> {
        let request = request.into_inner();
        let room_id = room_id_from_request(&request.room_id)?;
        let version = RoomVersionId::try_from(request.room_version.as_str())
            .map_err(|e| Status::invalid_argument(format!("room_version: {e}")))?;
        let create = template(
            request
                .create
                .ok_or_else(|| Status::invalid_argument("missing create event"))?,
        )?
        .0;
        let events = request
            .events
            .into_iter()
            .map(|t| template(t).map(|(t, _)| t))
            .collect::<Result<Vec<_>, _>>()?;
        let guard = self.enter(&room_id).await?;
        let work = Work::Create(Box::new(CreateRoom {
            version,
            create,
            events,
            is_public: request.is_public,
            alias: request.alias,
        }));
        match self.run(room_id, guard, work).await? {
            Answer::Created(result) => Ok(Response::new(CreateRoomResponse {
                outcome: Some(match result {
                    Ok(id) => create_room_response::Outcome::RoomId(id.to_string()),
                    Err(r) => create_room_response::Outcome::Refusal(refusal(r)),
                }),
            })),
            Answer::Retry(message) => Err(Status::unavailable(message)),
            _ => Err(Status::internal("unexpected answer")),
        }
    }

    async fn stage_pdus(
        &self,
        request: Request<StagePdusRequest>,
    ) -> Result<Response<StagePdusResponse>, Status> {
        let request = request.into_inner();
        let room_id = room_id_from_request(&request.room_id)?;
        let mut guard = self.enter(&room_id).await?;
        let Some(inbound) = self.engine.inbound() else {
            return Err(Status::unavailable(
                "federation is not configured on this worker",
            ));
        };
        // The ACL is checked here, where the room's current state is in
        // memory, rather than at the federation-receiver, which would read
        // it from Postgres on every transaction's way in.
        if !self.server_acl_admits(&room_id, &request.origin).await? {
            return Err(Status::permission_denied(format!(
                "the room's server ACL denies {}",
                request.origin
            )));
        }
        let mut to_stage = request.pdus;
        // A room with nothing staged (counted empty, or not counted since its
        // last turn drained it) tries the direct path first, with no query.
        if self.engine.known_backlog(&room_id).unwrap_or(0) == 0
            && to_stage.len() <= DIRECT_MAX_PDUS
        {
            let origin = tessera_events::ruma::OwnedServerName::try_from(request.origin.clone())
                .map_err(|e| Status::invalid_argument(format!("origin: {e}")))?;
            let direct = crate::process::Direct {
                origin,
                pdus: to_stage
                    .iter()
                    .map(|p| (p.event_id.clone(), p.json.clone()))
                    .collect(),
            };
            let answer = self
                .run(room_id.clone(), guard, Work::Direct(Box::new(direct)))
                .await;
            if let Ok(Answer::Unprocessed(left)) = answer {
                let total = to_stage.len() as u64;
                to_stage = left
                    .into_iter()
                    .filter_map(|i| to_stage.get(i).cloned())
                    .collect();
                if to_stage.is_empty() {
                    return Ok(Response::new(StagePdusResponse {
                        staged: total,
                        backlog: 0,
                    }));
                }
            }
            // Whatever was not processed (or all of it, if that failed) is staged.
            guard = self.enter(&room_id).await?;
        }
        let backlog = self
            .engine
            .staged_backlog(&room_id)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if backlog >= inbound.max_staged_per_room {
            metrics::counter!("tessera_federation_backpressure_total", "reason" => "room_backlog")
                .increment(1);
            let mut status =
                Status::resource_exhausted(format!("room {room_id} has {backlog} PDUs waiting"));
            status
                .metadata_mut()
                .insert("retry-after-ms", "2000".parse().expect("literal"));
            return Err(status);
        }
        let partition = guard.partition();
        let pdus: Vec<tessera_storage::federation::NewStagedPdu<'_>> = to_stage
            .iter()
            .map(|p| tessera_storage::federation::NewStagedPdu {
                room_id: room_id.as_str(),
                partition,
                origin: &request.origin,
                event_id: &p.event_id,
                json: &p.json,
                depth: p.depth,
            })
            .collect();
        // A flood's staging goes through the bulk lane's connections, so that
        // it never holds the connections quiet rooms' turns need.
        let store = if backlog + pdus.len() as i64 >= crate::engine::BULK_BACKLOG {
            self.engine.bulk_store().unwrap_or(&self.store)
        } else {
            &self.store
        };
        let staged = store
            .stage_pdus(&pdus)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        metrics::counter!("tessera_federation_pdus_staged_total").increment(staged);
        self.engine.adjust_backlog(&room_id, staged as i64);
        self.engine.schedule_staged(&room_id);
        drop(guard);
        Ok(Response::new(StagePdusResponse {
            staged,
            backlog: backlog + staged as i64,
        }))
    }

    async fn submit_remote_membership(
        &self,
        request: Request<RemoteMembershipRequest>,
    ) -> Result<Response<RemoteMembershipResponse>, Status> {
        let request = request.into_inner();
        let room_id = room_id_from_request(&request.room_id)?;
        let origin = tessera_events::ruma::OwnedServerName::try_from(request.origin.clone())
            .map_err(|e| Status::invalid_argument(format!("origin: {e}")))?;
        let room = self
            .store
            .room(room_id.as_str())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("unknown room {room_id}")))?;
        let rules = RoomVersionId::try_from(room.room_version.as_str())
            .ok()
            .and_then(|v| v.rules())
            .ok_or_else(|| Status::internal("unsupported room version"))?;
        let pdu = pdu_from_request(&request.event_json, &rules, &room_id)?;
        let guard = self.enter(&room_id).await?;
        let omit_members = request.omit_members.then_some(request.keep_members);
        let work = Work::RemoteMembership(Box::new(crate::process::RemoteMembership {
            origin,
            pdu,
            omit_members,
        }));
        let outcome = match self.run(room_id, guard, work).await? {
            Answer::Membership(Ok(result)) => {
                remote_membership_response::Outcome::Accepted(MembershipAccepted {
                    event_json: result.event_json,
                    state: result.state,
                    auth_chain: result.auth_chain,
                    members_omitted: result.members_omitted,
                })
            }
            Answer::Membership(Err(refusal)) => {
                remote_membership_response::Outcome::Refusal(ProtoRefusal {
                    errcode: refusal.errcode.to_owned(),
                    message: refusal.message,
                })
            }
            Answer::Retry(message) => return Err(Status::unavailable(message)),
            _ => return Err(Status::internal("unexpected answer")),
        };
        Ok(Response::new(RemoteMembershipResponse {
            outcome: Some(outcome),
        }))
    }

    async fn store_invite(
        &self,
        request: Request<StoreInviteRequest>,
    ) -> Result<Response<StoreInviteResponse>, Status> {
        let request = request.into_inner();
        let room_id = room_id_from_request(&request.room_id)?;
        let room_version = RoomVersionId::try_from(request.room_version.as_str())
            .map_err(|e| Status::invalid_argument(format!("room_version: {e}")))?;
        let rules = room_version
            .rules()
            .ok_or_else(|| Status::invalid_argument("unsupported room version"))?;
        let pdu = pdu_from_request(&request.event_json, &rules, &room_id)?;
        if !serde_json::from_str::<serde_json::Value>(&request.stripped_state_json)
            .is_ok_and(|v| v.is_array())
        {
            return Err(Status::invalid_argument(
                "stripped_state_json is not a JSON array",
            ));
        }
        let guard = self.enter(&room_id).await?;
        let work = Work::Invite(Box::new(crate::out_of_band::Invite {
            pdu,
            room_version,
            stripped_state: request.stripped_state_json,
        }));
        match self.run(room_id, guard, work).await? {
            Answer::InviteStored(stored) => Ok(Response::new(StoreInviteResponse { stored })),
            Answer::Retry(message) => Err(Status::unavailable(message)),
            _ => Err(Status::internal("unexpected answer")),
        }
    }
}
