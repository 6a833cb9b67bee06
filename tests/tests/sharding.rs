//! Partition ownership with real room-workers: workers joining and leaving
//! move partitions without restarting anything else, SIGTERM hands over,
//! SIGKILL expires, and a non-owner points callers at the owner.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use tessera_proto::room_worker::room_worker_client::RoomWorkerClient;
use tessera_proto::room_worker::{EventTemplate, SubmitEventsRequest};
use tessera_tests::client::enc;
use tessera_tests::{Spec, TestCluster};

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

fn count(owners: &HashMap<String, usize>, name: &str) -> usize {
    owners.get(name).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_join_and_leave_at_runtime_without_losing_messages() {
    let mut cluster = TestCluster::start(Spec {
        room_workers: 2,
        partitions: 32,
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let rooms: Vec<String> = {
        let mut rooms = Vec::new();
        for _ in 0..6 {
            rooms.push(api.create_room(&alice, json!({})).await);
        }
        rooms
    };
    let owners = cluster.owners().await;
    assert!(
        count(&owners, "room-worker-0") > 0 && count(&owners, "room-worker-1") > 0,
        "{owners:?}"
    );

    // Messages keep flowing while a third worker joins and the first leaves.
    let sender = {
        let (api, alice, rooms) = (api.clone(), alice.clone(), rooms.clone());
        tokio::spawn(async move {
            for i in 0..90 {
                let room = &rooms[i % rooms.len()];
                api.send_text(&alice, room, &format!("t{i}"), &format!("m{i}"))
                    .await;
            }
        })
    };
    let third = cluster.add_room_worker().await;
    let probe = cluster.store().await;
    wait_until("the new worker owns partitions", || {
        let probe = probe.clone();
        let third = third.clone();
        async move {
            probe
                .leases()
                .await
                .unwrap()
                .iter()
                .any(|l| l.owner.as_deref() == Some(third.as_str()))
        }
    })
    .await;
    let status = cluster.stop("room-worker-0").await;
    assert!(status.success(), "SIGTERM exits cleanly: {status}");
    // It handed everything over before exiting: nothing is still leased to it.
    let owners = cluster.owners().await;
    assert_eq!(count(&owners, "room-worker-0"), 0, "{owners:?}");
    cluster.wait_all_partitions_owned().await;
    sender.await.unwrap();

    // Every message is there exactly once, in order, in its room.
    for (r, room) in rooms.iter().enumerate() {
        let got = api.message_bodies(&alice, room).await;
        let want: Vec<String> = (0..90)
            .filter(|i| i % rooms.len() == r)
            .map(|i| format!("m{i}"))
            .collect();
        assert_eq!(got, want, "room {r}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_loses_its_partitions_and_no_acknowledged_event() {
    let mut cluster = TestCluster::start(Spec {
        room_workers: 2,
        partitions: 8,
        lease_ttl_ms: 2000,
        heartbeat_ms: 200,
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let bob = cluster.register("bob").await;
    let rooms = api.shared_rooms(&alice, &[&bob], 6).await;
    let since = api.initial_token(&bob).await;
    // Acknowledged events, then SIGKILL straight after the last acknowledgement.
    let mut acked = Vec::new();
    for i in 0..30 {
        let room = &rooms[i % rooms.len()];
        acked.push((
            room.clone(),
            api.send_text(&alice, room, &format!("before-kill-{i}"), &format!("b{i}"))
                .await,
        ));
    }
    cluster.kill("room-worker-0").await;
    // Sends to every room succeed: rooms of the dead worker wait for its
    // leases to expire, then the survivor takes them over.
    for (i, room) in rooms.iter().enumerate() {
        api.send_text(&alice, room, &format!("after-kill-{i}"), "still here")
            .await;
    }
    // Leases of partitions nobody wrote to expire on their own clock; all do.
    let probe = cluster.store().await;
    wait_until("the survivor owns every partition", || {
        let probe = probe.clone();
        async move {
            probe
                .leases()
                .await
                .unwrap()
                .iter()
                .all(|l| l.owner.as_deref() == Some("room-worker-1"))
        }
    })
    .await;
    // Every acknowledged event is there, in history and through /sync.
    let sync = api.sync(&bob, Some(&since), 0).await;
    for (room, event_id) in &acked {
        let (status, _) = api
            .call(
                Method::GET,
                &format!(
                    "/_matrix/client/v3/rooms/{}/event/{}",
                    enc(room),
                    enc(event_id)
                ),
                Some(&alice.token),
                None,
            )
            .await;
        assert_eq!(status, 200, "acknowledged event {event_id} is readable");
        let delivered = sync["rooms"]["join"][room.as_str()]["timeline"]["events"]
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["event_id"] == event_id.as_str()));
        assert!(delivered, "acknowledged event {event_id} reaches /sync");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_owner_names_the_owner() {
    let cluster = TestCluster::start(Spec {
        room_workers: 2,
        partitions: 8,
        ..Spec::default()
    })
    .await;
    let store = cluster.store().await;
    let leases = store.leases().await.unwrap();
    let workers: HashMap<String, String> = {
        let mut map = HashMap::new();
        for lease in &leases {
            if let Some(owner) = &lease.owner {
                let row = store
                    .partition_owner(lease.partition)
                    .await
                    .unwrap()
                    .unwrap();
                map.insert(owner.clone(), row.grpc_addr);
            }
        }
        map
    };
    assert_eq!(workers.len(), 2, "both workers own partitions");
    // A room ID in a partition worker 0 owns, sent to worker 1.
    let owned_by_0: Vec<u32> = leases
        .iter()
        .filter(|l| l.owner.as_deref() == Some("room-worker-0"))
        .map(|l| l.partition)
        .collect();
    let room = (0..)
        .map(|i| format!("!probe{i}:test.local"))
        .find(|r| owned_by_0.contains(&tessera_cluster::partition_of(r, 8)))
        .unwrap();
    let mut client = RoomWorkerClient::connect(format!("http://{}", workers["room-worker-1"]))
        .await
        .unwrap();
    let status = client
        .submit_events(SubmitEventsRequest {
            room_id: room,
            events: vec![EventTemplate {
                r#type: "m.room.message".into(),
                state_key: None,
                content_json: "{}".into(),
                sender: "@a:test.local".into(),
                origin_server_ts: 0,
                redacts: None,
                txn: None,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let owner = status
        .metadata()
        .get(tessera_proto::OWNER_METADATA)
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(owner, workers["room-worker-0"]);
    assert!(
        status.message().contains("room-worker-0"),
        "{}",
        status.message()
    );
}
