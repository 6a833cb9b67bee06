//! The room-worker's scheduler is fair across rooms: a room with a deep
//! backlog gets one turn per round like any other, so a quiet room's event is
//! committed long before the busy room's backlog drains. Measured by order of
//! completion, not by the clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use tessera_proto::room_worker::room_worker_client::RoomWorkerClient;
use tessera_proto::room_worker::{EventTemplate, SubmitEventsRequest, event_outcome};
use tessera_tests::{Spec, TestCluster};

fn message(sender: &str, body: &str) -> EventTemplate {
    EventTemplate {
        r#type: "m.room.message".into(),
        state_key: None,
        content_json: json!({ "msgtype": "m.text", "body": body }).to_string(),
        sender: sender.into(),
        origin_server_ts: 1,
        redacts: None,
        txn: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_room_is_not_stuck_behind_a_flooded_one() {
    const FLOOD: usize = 600;
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let busy = api.create_room(&alice, json!({})).await;
    let quiet = api.create_room(&alice, json!({})).await;
    let store = cluster.store().await;
    let partition = tessera_cluster::partition_of(&busy, cluster.spec().partitions);
    let owner = store.partition_owner(partition).await.unwrap().unwrap();
    let client = RoomWorkerClient::connect(format!("http://{}", owner.grpc_addr))
        .await
        .unwrap();

    let done = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for i in 0..FLOOD {
        let (mut client, busy, sender, done) = (
            client.clone(),
            busy.clone(),
            alice.user_id.clone(),
            done.clone(),
        );
        flood.push(tokio::spawn(async move {
            let request = SubmitEventsRequest {
                room_id: busy,
                events: vec![message(&sender, &format!("flood {i}"))],
            };
            let response = client.submit_events(request).await.unwrap().into_inner();
            assert!(matches!(
                response.outcomes[0].outcome,
                Some(event_outcome::Outcome::EventId(_))
            ));
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    // Once the flood is being worked through, one event for the quiet room.
    while done.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let mut quiet_client = client.clone();
    let response = quiet_client
        .submit_events(SubmitEventsRequest {
            room_id: quiet.clone(),
            events: vec![message(&alice.user_id, "hello")],
        })
        .await
        .unwrap()
        .into_inner();
    let flood_done_when_quiet_committed = done.load(Ordering::SeqCst);
    assert!(matches!(
        response.outcomes[0].outcome,
        Some(event_outcome::Outcome::EventId(_))
    ));
    for task in flood {
        task.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), FLOOD);
    println!(
        "flood events committed before the quiet one: {flood_done_when_quiet_committed} of {FLOOD}"
    );
    assert!(
        flood_done_when_quiet_committed < FLOOD / 2,
        "the quiet room waited for {flood_done_when_quiet_committed} of {FLOOD} flood events"
    );
}
