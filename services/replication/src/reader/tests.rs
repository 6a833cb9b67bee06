//! The reader against real Postgres and Redis: whatever reaches Redis, and
//! whatever does not, the sink gets every committed event once, in order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_storage::persist::{Batch, EventToPersist, NewRoom};
use tessera_storage::test_util;

use super::*;
use crate::publisher::Publisher;

#[derive(Default)]
struct Collect {
    events: Mutex<Vec<(u32, i64, String)>>,
}

impl ReplicationSink for Collect {
    fn apply(&self, partition: u32, entries: &[EventEntry]) {
        let mut events = self.events.lock().unwrap();
        events.extend(
            entries
                .iter()
                .map(|e| (partition, e.pos, e.event_id.clone())),
        );
    }
    fn user_changed(&self, _user_id: &str) {}
}

fn event(id: String) -> EventToPersist {
    EventToPersist {
        event_id: id,
        kind: "m.room.message".into(),
        state_key: None,
        sender: "@a:example.org".into(),
        origin_server_ts: 0,
        depth: 1,
        membership: None,
        rejected: false,
        prev_state_event_id: None,
        json: "{}".into(),
        state_changes: vec![],
        redacts: None,
        txn: None,
        ..Default::default()
    }
}

fn redis_url() -> String {
    std::env::var("TESSERA_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

#[tokio::test]
async fn gaps_in_redis_are_filled_from_postgres() {
    let store = test_util::store().await;
    store.init_cluster("example.org", 2).await.unwrap();
    let epoch = store
        .claim_partition(1, "w", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let prefix = format!("test-{}", std::process::id() as u64 * 1000 + rand_suffix());
    let keys = StreamKeys::new(&prefix);
    let client = redis::Client::open(redis_url()).unwrap();
    let publisher = Publisher::new(&client, keys.clone(), 1000).await.unwrap();

    let sink = Arc::new(Collect::default());
    let reader = StreamReader::new(store.clone(), client.clone(), keys.clone(), vec![0, 0])
        .with_head_poll(Duration::from_millis(200));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(reader.run(sink.clone() as Arc<dyn ReplicationSink>, async {
        let _ = stop_rx.await;
    }));

    // Ten batches of three; only every other batch reaches Redis.
    let mut expected = Vec::new();
    for batch_no in 0..10 {
        let events: Vec<_> = (0..3).map(|i| event(format!("$e{batch_no}_{i}"))).collect();
        let batch = Batch {
            partition: 1,
            worker_id: "w".into(),
            epoch,
            room_id: "!r:example.org".into(),
            new_room: (batch_no == 0).then(|| NewRoom {
                version: "12".into(),
                creator: "@a:example.org".into(),
                is_public: false,
            }),
            events,
            depth: 1,
            extremities: vec![],
            aliases: vec![],
            new_groups: vec![],
            state_group: None,
            staged_ids: vec![],
            outliers: vec![],
            out_of_band: None,
        };
        let positions = store.persist(&batch).await.unwrap();
        let entries: Vec<EventEntry> = positions
            .iter()
            .zip(&batch.events)
            .map(|(pos, e)| EventEntry {
                pos: *pos,
                room_id: batch.room_id.clone(),
                event_id: e.event_id.clone(),
                kind: e.kind.clone(),
                state_key: None,
                membership: None,
                rejected: false,
            })
            .collect();
        expected.extend(
            positions
                .iter()
                .zip(&batch.events)
                .map(|(p, e)| (1u32, *p, e.event_id.clone())),
        );
        if batch_no % 2 == 1 {
            publisher.publish(1, &entries).await;
        }
    }

    // Wait (bounded) until the sink has everything.
    for _ in 0..100 {
        if sink.events.lock().unwrap().len() >= expected.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(());
    task.await.unwrap();
    assert_eq!(
        *sink.events.lock().unwrap(),
        expected,
        "every event once, in order"
    );
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}
