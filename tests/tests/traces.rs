//! OpenTelemetry traces across real processes, exported to a collector in
//! the test: a client's message carries its `traceparent` from the HTTP
//! request through client-api, the gRPC call to the room-worker and the
//! Redis stream entry to the sync-worker; a remote server's PDU makes one
//! trace from the federation-receiver through the room-worker to the
//! sync-worker.

use std::time::Duration;

use serde_json::json;
use tessera_tests::client::enc;
use tessera_tests::collector::{CollectedSpan, Collector};
use tessera_tests::fake_remote::{FakeRemote, json_of};
use tessera_tests::{Spec, TestCluster};

/// Wait (bounded) until `done` holds for the spans collected so far.
async fn spans_until(
    collector: &Collector,
    what: &str,
    done: impl Fn(&[CollectedSpan]) -> bool,
) -> Vec<CollectedSpan> {
    for _ in 0..100 {
        let spans = collector.spans();
        if done(&spans) {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}: {:#?}", collector.spans());
}

/// The span of `trace` exported by `service` whose name starts with `name`.
fn find<'a>(
    spans: &'a [CollectedSpan],
    trace: &str,
    service: &str,
    name: &str,
) -> Option<&'a CollectedSpan> {
    spans
        .iter()
        .find(|s| s.trace_id == trace && s.service == service && s.name.starts_with(name))
}

/// Whether `child`'s parent is a span of `trace` exported by `service`.
fn parent_in(spans: &[CollectedSpan], child: &CollectedSpan, service: &str) -> bool {
    spans.iter().any(|s| {
        s.span_id == child.parent_span_id && s.trace_id == child.trace_id && s.service == service
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn trace_context_crosses_http_grpc_and_redis() {
    let (collector, endpoint) = Collector::start().await;
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        otlp_endpoint: Some(endpoint),
        ..Spec::federated(1)
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let room = api.public_room(&alice).await;

    // A client message with the caller's own trace context.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = cluster
        .http
        .put(format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/traced",
            cluster.client_api_url,
            enc(&room)
        ))
        .bearer_auth(&alice.token)
        .header("traceparent", format!("00-{trace}-{caller_span}-01"))
        .json(&json!({ "msgtype": "m.text", "body": "traced" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let spans = spans_until(&collector, "the message's spans in every role", |spans| {
        find(spans, trace, "tessera-client-api", "PUT").is_some()
            && find(spans, trace, "tessera-room-worker", "SubmitEvents").is_some()
            && find(spans, trace, "tessera-sync-worker", "replication.deliver").is_some()
    })
    .await;
    // HTTP: the client-api's request span is the caller's child.
    let http = find(&spans, trace, "tessera-client-api", "PUT").unwrap();
    assert_eq!(http.parent_span_id, caller_span, "{http:?}");
    // gRPC: the room-worker's call span is a child of a client-api span.
    let grpc = find(&spans, trace, "tessera-room-worker", "SubmitEvents").unwrap();
    assert!(parent_in(&spans, grpc, "tessera-client-api"), "{grpc:?}");
    let turn = find(&spans, trace, "tessera-room-worker", "room_turn").unwrap();
    assert_eq!(
        turn.parent_span_id, grpc.span_id,
        "the turn continues the call"
    );
    // Redis: the sync-worker's delivery is a child of the room-worker's turn.
    let delivery = find(&spans, trace, "tessera-sync-worker", "replication.deliver").unwrap();
    assert!(
        parent_in(&spans, delivery, "tessera-room-worker"),
        "{delivery:?}"
    );

    // A PDU from another server: one trace from the receiver to the sync-worker.
    let remote = FakeRemote::start(&cluster.server_name).await;
    let bob = remote.user("bob");
    remote.join(&room, &bob).await.expect("join");
    let message = remote.text(&room, &bob, "from afar, traced");
    let (status, _) = remote.send("traced-txn", &[json_of(&message)], &[]).await;
    assert_eq!(status, 200);
    let spans = spans_until(&collector, "the PDU's spans in every role", |spans| {
        spans.iter().any(|s| {
            s.service == "tessera-federation-receiver"
                && s.name.starts_with("PUT /_matrix/federation/v1/send")
                && find(spans, &s.trace_id, "tessera-room-worker", "StagePdus").is_some()
                && find(
                    spans,
                    &s.trace_id,
                    "tessera-sync-worker",
                    "replication.deliver",
                )
                .is_some()
        })
    })
    .await;
    let receiver = spans
        .iter()
        .find(|s| {
            s.service == "tessera-federation-receiver"
                && s.name.starts_with("PUT /_matrix/federation/v1/send")
                && find(
                    &spans,
                    &s.trace_id,
                    "tessera-sync-worker",
                    "replication.deliver",
                )
                .is_some()
        })
        .unwrap();
    let stage = find(
        &spans,
        &receiver.trace_id,
        "tessera-room-worker",
        "StagePdus",
    )
    .unwrap();
    assert!(
        parent_in(&spans, stage, "tessera-federation-receiver"),
        "{stage:?}"
    );
    let delivery = find(
        &spans,
        &receiver.trace_id,
        "tessera-sync-worker",
        "replication.deliver",
    )
    .unwrap();
    assert!(
        parent_in(&spans, delivery, "tessera-room-worker"),
        "{delivery:?}"
    );
}
