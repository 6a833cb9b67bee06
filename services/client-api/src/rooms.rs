//! Sending work to room-workers: one place that turns a template into a gRPC
//! call to the room's owner and the answer into an event ID or a Matrix error.

use ruma::{OwnedEventId, RoomId, UserId};
use serde_json::Value;
use tessera_cluster::router::RouteError;
use tessera_matrix_http::{MatrixError, MatrixResult};
use tessera_proto::room_worker::{ClientTxn, EventTemplate, SubmitEventsRequest, event_outcome};

use crate::state::AppState;

pub fn now_ms() -> u64 {
    tessera_matrix_http::render::now_ms()
}

/// A template for an event `sender` sends now.
pub fn template(
    sender: &UserId,
    kind: &str,
    state_key: Option<&str>,
    content: &Value,
) -> EventTemplate {
    EventTemplate {
        r#type: kind.to_owned(),
        state_key: state_key.map(str::to_owned),
        content_json: content.to_string(),
        sender: sender.to_string(),
        origin_server_ts: now_ms(),
        redacts: None,
        txn: None,
    }
}

pub fn with_txn(mut template: EventTemplate, device_id: &str, txn_id: &str) -> EventTemplate {
    template.txn = Some(ClientTxn {
        device_id: device_id.to_owned(),
        txn_id: txn_id.to_owned(),
    });
    template
}

pub fn route_error(error: RouteError) -> MatrixError {
    match error {
        RouteError::Rejected(status) if status.code() == tonic::Code::InvalidArgument => {
            MatrixError::invalid_param(status.message().to_owned())
        }
        RouteError::Rejected(status) => {
            tracing::error!(%status, "room-worker rejected a request");
            MatrixError::internal("The room-worker failed to process the request")
        }
        RouteError::Unavailable(reason) => {
            tracing::warn!(%reason, "no room-worker took the request");
            MatrixError::unavailable("The room is temporarily unavailable; try again")
        }
    }
}

/// Create one event in a room; the answer comes after it is committed.
pub async fn send(
    state: &AppState,
    room_id: &RoomId,
    template: EventTemplate,
) -> MatrixResult<OwnedEventId> {
    let response = state
        .router
        .submit(
            room_id.as_str(),
            SubmitEventsRequest {
                room_id: room_id.to_string(),
                events: vec![template],
            },
        )
        .await
        .map_err(route_error)?;
    match response.outcomes.into_iter().next().and_then(|o| o.outcome) {
        Some(event_outcome::Outcome::EventId(id)) => OwnedEventId::try_from(id).map_err(|e| {
            MatrixError::internal(format!("room-worker returned a bad event ID: {e}"))
        }),
        Some(event_outcome::Outcome::Refusal(refusal)) => {
            Err(MatrixError::from_errcode(&refusal.errcode, refusal.message))
        }
        None => Err(MatrixError::internal("room-worker returned no outcome")),
    }
}
