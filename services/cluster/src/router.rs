//! Calling the owner of a room: look the partition's owner up, call it, and
//! follow redirects and handoffs until the call lands or the retry budget runs
//! out. Callers never need to know which worker owns what.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tessera_proto::OWNER_METADATA;
use tessera_proto::room_worker::room_worker_client::RoomWorkerClient;
use tessera_proto::room_worker::{
    CreateRoomRequest, CreateRoomResponse, RemoteMembershipRequest, RemoteMembershipResponse,
    StagePdusRequest, StagePdusResponse, StoreInviteRequest, StoreInviteResponse,
    SubmitEventsRequest, SubmitEventsResponse,
};
use tessera_storage::Store;

/// The interceptor that puts the caller's trace context into each call.
type Injector = fn(tonic::Request<()>) -> Result<tonic::Request<()>, Status>;
/// A room-worker client whose calls carry the caller's trace context.
type TracedClient =
    RoomWorkerClient<tonic::service::interceptor::InterceptedService<Channel, Injector>>;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::directory::OwnerDirectory;
use crate::partition::partition_of;

/// The largest answer taken from a room's owner. A `send_join` into a room
/// answers with the room's whole state and its auth chain: about 0.4 KiB a
/// member, so tonic's default of 4 MiB refused rooms of some 10,000
/// members.
const MAX_ANSWER_BYTES: usize = 512 * 1024 * 1024;

/// Spawns a channel's tasks (its buffer, its HTTP/2 connection) on the
/// runtime the router was made on. By default tonic spawns them wherever the
/// first call happens; a process whose first call to a room-worker came from
/// its low-priority bulk runtime would then have every later call, quiet
/// ones included, wait for that runtime's busy threads.
#[derive(Clone)]
struct HomeRuntime(tokio::runtime::Handle);

impl<F> hyper::rt::Executor<F> for HomeRuntime
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

/// Why a call did not land.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The owner answered with an error that retrying will not fix.
    #[error("{0}")]
    Rejected(Status),
    /// No owner answered within the retry budget.
    #[error("no room-worker could take the request: {0}")]
    Unavailable(String),
}

pub struct RoomRouter {
    directory: OwnerDirectory,
    /// The runtime the router was made on, where every channel's connection
    /// lives (see [`HomeRuntime`]).
    home: HomeRuntime,
    partitions: u32,
    channels: Mutex<HashMap<String, Channel>>,
    budget: Duration,
    attempt_timeout: Duration,
}

impl RoomRouter {
    pub fn new(store: Store, partitions: u32) -> Self {
        Self {
            directory: OwnerDirectory::new(store),
            home: HomeRuntime(tokio::runtime::Handle::current()),
            partitions,
            channels: Mutex::new(HashMap::new()),
            budget: Duration::from_secs(20),
            attempt_timeout: Duration::from_secs(10),
        }
    }

    pub async fn submit(
        &self,
        room_id: &str,
        request: SubmitEventsRequest,
    ) -> Result<SubmitEventsResponse, RouteError> {
        self.call(room_id, "SubmitEvents", |mut client| {
            let request = request.clone();
            async move { client.submit_events(request).await }
        })
        .await
    }

    pub async fn create_room(
        &self,
        room_id: &str,
        request: CreateRoomRequest,
    ) -> Result<CreateRoomResponse, RouteError> {
        self.call(room_id, "CreateRoom", |mut client| {
            let request = request.clone();
            async move { client.create_room(request).await }
        })
        .await
    }

    pub async fn stage_pdus(
        &self,
        room_id: &str,
        request: StagePdusRequest,
    ) -> Result<StagePdusResponse, RouteError> {
        self.call(room_id, "StagePdus", |mut client| {
            let request = request.clone();
            async move { client.stage_pdus(request).await }
        })
        .await
    }

    pub async fn submit_remote_membership(
        &self,
        room_id: &str,
        request: RemoteMembershipRequest,
    ) -> Result<RemoteMembershipResponse, RouteError> {
        self.call(room_id, "SubmitRemoteMembership", |mut client| {
            let request = request.clone();
            async move { client.submit_remote_membership(request).await }
        })
        .await
    }

    pub async fn store_invite(
        &self,
        room_id: &str,
        request: StoreInviteRequest,
    ) -> Result<StoreInviteResponse, RouteError> {
        self.call(room_id, "StoreInvite", |mut client| {
            let request = request.clone();
            async move { client.store_invite(request).await }
        })
        .await
    }

    fn channel(&self, addr: &str) -> Result<Channel, RouteError> {
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let uri = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| RouteError::Unavailable(format!("bad room-worker address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .executor(self.home.clone())
            .connect_lazy();
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Call the partition's owner (`method` names the call in metrics),
    /// following redirects and retrying unavailable owners within the budget.
    async fn call<T, F, Fut>(
        &self,
        room_id: &str,
        method: &'static str,
        f: F,
    ) -> Result<T, RouteError>
    where
        F: Fn(TracedClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let partition = partition_of(room_id, self.partitions);
        let deadline = Instant::now() + self.budget;
        let mut backoff = Duration::from_millis(50);
        let mut hinted: Option<String> = None;
        let mut last_error = String::from("no owner known");
        loop {
            let addr = match hinted.take() {
                Some(addr) => Some(addr),
                None => match self.directory.owner(partition).await {
                    Ok(owner) => owner.map(|o| o.grpc_addr),
                    Err(error) => {
                        last_error = error.to_string();
                        None
                    }
                },
            };
            if let Some(addr) = addr {
                let client = RoomWorkerClient::with_interceptor(
                    self.channel(&addr)?,
                    tessera_runtime::traces::inject_grpc as Injector,
                )
                .max_decoding_message_size(MAX_ANSWER_BYTES);
                let started = Instant::now();
                let result = tokio::time::timeout(self.attempt_timeout, f(client)).await;
                let code = match &result {
                    Ok(Ok(_)) => "0".to_owned(),
                    Ok(Err(status)) => (status.code() as i32).to_string(),
                    Err(_) => "timeout".to_owned(),
                };
                metrics::counter!("tessera_grpc_client_requests_total", "method" => method, "code" => code)
                    .increment(1);
                metrics::histogram!("tessera_grpc_client_request_seconds", "method" => method)
                    .record(started.elapsed().as_secs_f64());
                match result {
                    Ok(Ok(response)) => return Ok(response.into_inner()),
                    Ok(Err(status)) => match status.code() {
                        Code::FailedPrecondition => {
                            self.directory.invalidate(partition);
                            hinted = status
                                .metadata()
                                .get(OWNER_METADATA)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            last_error = status.message().to_owned();
                            metrics::counter!("tessera_room_router_redirects_total").increment(1);
                            if hinted.is_some() {
                                continue;
                            }
                        }
                        _ if not_answered(&status) => {
                            self.directory.invalidate(partition);
                            last_error = format!("{addr}: {}", status.message());
                        }
                        _ => return Err(RouteError::Rejected(status)),
                    },
                    Err(_) => {
                        self.directory.invalidate(partition);
                        last_error = format!("{addr}: timed out");
                    }
                }
            }
            if Instant::now() + backoff > deadline {
                metrics::counter!("tessera_room_router_failures_total").increment(1);
                return Err(RouteError::Unavailable(last_error));
            }
            metrics::counter!("tessera_room_router_retries_total").increment(1);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

/// Whether a call failed without the worker's answer (so another attempt,
/// perhaps at another owner, may succeed). tonic reports a connection the
/// worker closed under the call (its GOAWAY when it stops) as Internal, with
/// the transport error as its source.
fn not_answered(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted => true,
        Code::Internal => std::error::Error::source(status)
            .is_some_and(|source| source.downcast_ref::<tonic::transport::Error>().is_some()),
        _ => false,
    }
}
