//! `GET /_matrix/client/v3/sync`: parse the request, then loop: register for
//! wake-ups, snapshot the positions, compute; answer if there is something
//! new (or this is an initial sync, or the timeout passed), else wait.
//!
//! A device whose only news is in busy rooms (`view.rs`) is answered no
//! sooner than `sync_worker.busy_room_response_interval_ms` after its request
//! began: a client that syncs again as soon as it has an answer would
//! otherwise, in a flooded room, ask for one more answer per few events,
//! each costing the sync-worker and Postgres a whole sync, and every local
//! member of the room does so at once. Any other news (a quiet room's event,
//! the user's own membership or account data) ends the wait at once.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::routing::get;
use serde::Deserialize;
use serde_json::Value;
use tessera_matrix_http::auth::{Authed, HasStore};
use tessera_matrix_http::filter::SyncFilter;
use tessera_matrix_http::{MatrixError, MatrixResult, layers};
use tessera_replication::token::TokenError;
use tessera_runtime::Config;
use tessera_storage::Store;
use tokio::time::Instant;

use crate::compute::{self, compute};
use crate::tokens::{SinceError, Tokens};
use crate::view::{View, user_key};

#[derive(Clone)]
pub struct SyncApi(Arc<Inner>);

pub struct Inner {
    store: Store,
    view: Arc<View>,
    tokens: Arc<Tokens>,
    config: Config,
}

impl SyncApi {
    pub fn new(store: Store, view: Arc<View>, tokens: Arc<Tokens>, config: Config) -> Self {
        Self(Arc::new(Inner {
            store,
            view,
            tokens,
            config,
        }))
    }
}

impl HasStore for SyncApi {
    fn store(&self) -> &Store {
        &self.0.store
    }
}

pub fn router(state: SyncApi, admin: Option<Router>) -> Router {
    Router::new()
        .route("/_matrix/client/v3/sync", get(sync))
        .route("/_matrix/client/r0/sync", get(sync))
        .fallback(layers::unrecognized)
        .method_not_allowed_fallback(layers::method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn(layers::metrics))
        .layer(axum::middleware::from_fn(layers::cors))
        .merge(admin.unwrap_or_default())
}

#[derive(Deserialize)]
pub struct SyncQuery {
    since: Option<String>,
    timeout: Option<String>,
    filter: Option<String>,
    full_state: Option<String>,
    #[allow(dead_code)]
    set_presence: Option<String>,
}

fn since_error(error: SinceError) -> MatrixError {
    match error {
        SinceError::Token(TokenError::Expired) => MatrixError::invalid_param(
            "The since token has expired; start again with an initial sync",
        ),
        SinceError::Token(error) => {
            MatrixError::invalid_param(format!("Invalid since token: {error}"))
        }
        SinceError::Store(error) => error.into(),
    }
}

struct InFlight;

impl InFlight {
    fn new() -> Self {
        metrics::gauge!("tessera_sync_long_polls_in_flight").increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("tessera_sync_long_polls_in_flight").decrement(1.0);
    }
}

async fn sync(
    State(api): State<SyncApi>,
    auth: Authed,
    Query(query): Query<SyncQuery>,
) -> MatrixResult<Json<Value>> {
    let _in_flight = InFlight::new();
    let started = Instant::now();
    let api = &api.0;
    let limits = &api.config.limits;
    let filter = match query.filter.as_deref() {
        None | Some("") => SyncFilter::default(),
        Some(text) if text.trim_start().starts_with('{') => {
            let value: Value = serde_json::from_str(text).map_err(|e| {
                MatrixError::invalid_param(format!("filter is not valid JSON: {e}"))
            })?;
            SyncFilter::parse(&value)?
        }
        Some(id) => {
            let id: i64 = id
                .parse()
                .map_err(|_| MatrixError::invalid_param(format!("Unknown filter {id:?}")))?;
            let value = api
                .store
                .filter(auth.user_id.as_str(), id)
                .await?
                .ok_or_else(|| MatrixError::invalid_param(format!("Unknown filter {id}")))?;
            SyncFilter::parse(&value)?
        }
    };
    let full_state = match query.full_state.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(MatrixError::invalid_param(format!(
                "full_state must be true or false, not {other:?}"
            )));
        }
    };
    let timeout_ms: u64 = match query.timeout.as_deref() {
        None => 0,
        Some(text) => text
            .parse()
            .map_err(|_| MatrixError::invalid_param("timeout must be a non-negative integer"))?,
    };
    let timeout = Duration::from_millis(timeout_ms.min(limits.sync_timeout_max_ms));
    let since = match query.since.as_deref() {
        Some(text) => Some(api.tokens.decode(text).await.map_err(since_error)?),
        None => None,
    };
    let timeline_limit = filter
        .timeline
        .limit
        .map(|l| l as i64)
        .unwrap_or(i64::from(limits.sync_timeline_limit))
        .clamp(0, i64::from(limits.sync_timeline_limit_max));
    let partitions = api.config.cluster.partitions;
    if let Some(since) = &since
        && since.positions.len() != partitions as usize
    {
        return Err(MatrixError::invalid_param(
            "Invalid since token: wrong number of partitions",
        ));
    }
    let request = compute::Request {
        user_id: auth.user_id.as_str(),
        device_id: &auth.device_id,
        since: since.as_ref().map(|s| (s.positions.as_slice(), s.user_pos)),
        filter: &filter,
        full_state,
        timeline_limit,
        partitions,
    };

    let deadline = Instant::now() + timeout;
    let mut keys: Vec<String> = api
        .store
        .rooms_with_membership(auth.user_id.as_str(), "join")
        .await?
        .into_iter()
        .chain([user_key(auth.user_id.as_str())])
        .collect();
    let calm_until = (started
        + Duration::from_millis(api.config.sync_worker.busy_room_response_interval_ms))
    .min(deadline);
    loop {
        let waiter = api.view.register(&keys);
        if let Some(since) = &since
            && !full_state
            && Instant::now() < calm_until
            && api
                .view
                .only_busy_rooms_moved(&keys, &since.positions, partitions)
        {
            metrics::counter!("tessera_sync_busy_room_waits_total").increment(1);
            while !waiter.is_urgent() {
                tokio::select! {
                    _ = waiter.notified() => {}
                    _ = tokio::time::sleep_until(calm_until) => break,
                }
            }
        }
        let snapshot = api.view.positions();
        let response = compute(&api.store, &api.view, &request, &snapshot, &keys).await?;
        let done =
            since.is_none() || full_state || response.has_content || Instant::now() >= deadline;
        if done {
            let next_batch = api
                .tokens
                .encode(&response.positions, response.user_pos)
                .await?;
            let mut body = response.body;
            body.insert("next_batch".into(), Value::String(next_batch));
            metrics::counter!("tessera_sync_responses_total", "kind" => if since.is_none() { "initial" } else if response.has_content { "incremental" } else { "timeout" }).increment(1);
            return Ok(Json(Value::Object(body)));
        }
        keys = response.wait_keys;
        tokio::select! {
            _ = waiter.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}
