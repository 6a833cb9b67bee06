use std::time::Duration;

use crate::persist::{Batch, EventToPersist, NewRoom, Redacts, StateChange, TxnKey};
use crate::{StoreError, test_util};
use tessera_events::room_state::RedactionReach;

const TTL: Duration = Duration::from_secs(10);

fn event(id: &str, kind: &str, state_key: Option<&str>) -> EventToPersist {
    EventToPersist {
        event_id: id.to_owned(),
        kind: kind.to_owned(),
        state_key: state_key.map(str::to_owned),
        sender: "@a:example.org".to_owned(),
        origin_server_ts: 1,
        depth: 1,
        membership: None,
        rejected: false,
        prev_state_event_id: None,
        json: format!(r#"{{"type":"{kind}","content":{{}},"sender":"@a:example.org"}}"#),
        state_changes: state_key
            .map(|k| {
                vec![StateChange {
                    kind: kind.to_owned(),
                    state_key: k.to_owned(),
                    event_id: Some(id.to_owned()),
                    membership: None,
                }]
            })
            .unwrap_or_default(),
        redacts: None,
        txn: None,
        ..Default::default()
    }
}

fn batch(epoch: i64, worker: &str, new_room: bool, events: Vec<EventToPersist>) -> Batch {
    Batch {
        partition: 2,
        worker_id: worker.to_owned(),
        epoch,
        room_id: "!r:example.org".to_owned(),
        new_room: new_room.then(|| NewRoom {
            version: "12".to_owned(),
            creator: "@a:example.org".to_owned(),
            is_public: false,
        }),
        depth: 1,
        extremities: events
            .last()
            .map(|e| vec![e.event_id.clone()])
            .unwrap_or_default(),
        events,
        aliases: vec![],
        new_groups: vec![],
        state_group: None,
        staged_ids: vec![],
        outliers: vec![],
        out_of_band: None,
    }
}

#[tokio::test]
async fn positions_are_gap_free_and_writes_are_fenced() {
    let store = test_util::store().await;
    store.init_cluster("example.org", 4).await.unwrap();
    let epoch = store.claim_partition(2, "a", TTL).await.unwrap().unwrap();
    let positions = store
        .persist(&batch(
            epoch,
            "a",
            true,
            vec![
                event("$1", "m.room.create", Some("")),
                event("$2", "m.room.topic", Some("")),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(positions, vec![1, 2]);
    let positions = store
        .persist(&batch(
            epoch,
            "a",
            false,
            vec![event("$3", "m.room.message", None)],
        ))
        .await
        .unwrap();
    assert_eq!(positions, vec![3]);
    assert_eq!(store.partition_heads().await.unwrap()[2], 3);

    // b takes the partition over; a's next write is refused and changes nothing.
    assert!(store.release_partition(2, "a", epoch).await.unwrap());
    let epoch_b = store.claim_partition(2, "b", TTL).await.unwrap().unwrap();
    let err = store
        .persist(&batch(
            epoch,
            "a",
            false,
            vec![event("$4", "m.room.message", None)],
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Fenced { partition: 2, .. }),
        "{err}"
    );
    assert!(store.event("$4").await.unwrap().is_none());
    let positions = store
        .persist(&batch(
            epoch_b,
            "b",
            false,
            vec![event("$5", "m.room.message", None)],
        ))
        .await
        .unwrap();
    assert_eq!(positions, vec![4], "no gap left by the fenced write");
}

#[tokio::test]
async fn state_history_answers_state_at_any_position() {
    let store = test_util::store().await;
    store.init_cluster("example.org", 4).await.unwrap();
    let epoch = store.claim_partition(2, "a", TTL).await.unwrap().unwrap();
    store
        .persist(&batch(
            epoch,
            "a",
            true,
            vec![
                event("$c", "m.room.create", Some("")),
                event("$t1", "m.room.topic", Some("")),
            ],
        ))
        .await
        .unwrap();
    store
        .persist(&batch(
            epoch,
            "a",
            false,
            vec![
                event("$m", "m.room.message", None),
                event("$t2", "m.room.topic", Some("")),
            ],
        ))
        .await
        .unwrap();
    let ids = |events: Vec<crate::events::StoredEvent>| {
        events.into_iter().map(|e| e.event_id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(store.state_at("!r:example.org", 2).await.unwrap()),
        vec!["$c", "$t1"]
    );
    assert_eq!(
        ids(store.state_at("!r:example.org", 4).await.unwrap()),
        vec!["$c", "$t2"]
    );
    assert_eq!(
        ids(store.current_state("!r:example.org").await.unwrap()),
        vec!["$c", "$t2"]
    );
    assert_eq!(
        ids(store.state_changes("!r:example.org", 2, 4).await.unwrap()),
        vec!["$t2"]
    );
    let events = store
        .room_events(
            "!r:example.org",
            0,
            4,
            crate::events::Direction::Backward,
            2,
        )
        .await
        .unwrap();
    assert_eq!(ids(events), vec!["$t2", "$m"]);
}

#[tokio::test]
async fn a_reused_transaction_id_is_a_conflict() {
    let store = test_util::store().await;
    store.init_cluster("example.org", 4).await.unwrap();
    let epoch = store.claim_partition(2, "a", TTL).await.unwrap().unwrap();
    let txn = TxnKey {
        user_id: "@a:example.org".into(),
        device_id: "D".into(),
        txn_id: "t1".into(),
    };
    let mut first = event("$1", "m.room.message", None);
    first.txn = Some(txn.clone());
    store
        .persist(&batch(epoch, "a", true, vec![first]))
        .await
        .unwrap();
    assert_eq!(
        store
            .txn_event("@a:example.org", "D", "t1")
            .await
            .unwrap()
            .as_deref(),
        Some("$1")
    );
    let mut again = event("$2", "m.room.message", None);
    again.txn = Some(txn);
    let err = store
        .persist(&batch(epoch, "a", false, vec![again]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert!(store.event("$2").await.unwrap().is_none());
}

#[tokio::test]
async fn state_groups_are_walked_back_to_their_snapshot() {
    use crate::persist::NewStateGroup;
    let store = test_util::store().await;
    store.init_cluster("example.org", 4).await.unwrap();
    let epoch = store.claim_partition(2, "a", TTL).await.unwrap().unwrap();
    let mut b = batch(
        epoch,
        "a",
        true,
        vec![
            event("$c", "m.room.create", Some("")),
            event("$t1", "m.room.topic", Some("")),
        ],
    );
    b.new_groups = vec![
        NewStateGroup {
            id: "$c".into(),
            parent: None,
            chain_length: 0,
            entries: vec![("m.room.create".into(), "".into(), Some("$c".into()))],
        },
        NewStateGroup {
            id: "$t1".into(),
            parent: Some("$c".into()),
            chain_length: 1,
            entries: vec![("m.room.topic".into(), "".into(), Some("$t1".into()))],
        },
    ];
    b.state_group = Some("$t1".into());
    store.persist(&b).await.unwrap();
    let mut b = batch(
        epoch,
        "a",
        false,
        vec![event("$t2", "m.room.topic", Some(""))],
    );
    b.new_groups = vec![NewStateGroup {
        id: "$t2".into(),
        parent: Some("$t1".into()),
        chain_length: 2,
        entries: vec![
            ("m.room.topic".into(), "".into(), None),
            ("m.room.name".into(), "".into(), Some("$t2".into())),
        ],
    }];
    b.state_group = Some("$t2".into());
    store.persist(&b).await.unwrap();
    let mut at_t1 = store.state_group_map("$t1").await.unwrap();
    at_t1.sort();
    assert_eq!(
        at_t1,
        vec![
            ("m.room.create".into(), "".into(), "$c".into()),
            ("m.room.topic".into(), "".into(), "$t1".into())
        ]
    );
    let mut at_t2 = store.state_group_map("$t2").await.unwrap();
    at_t2.sort();
    assert_eq!(
        at_t2,
        vec![
            ("m.room.create".into(), "".into(), "$c".into()),
            ("m.room.name".into(), "".into(), "$t2".into())
        ],
        "a removal hides the parent's slot"
    );
    let room = store.room("!r:example.org").await.unwrap().unwrap();
    assert_eq!(room.state_group, Some(("$t2".to_owned(), 2)));
    // The chain's length is counted from the deltas walked.
    for (group, length) in [("$c", 0), ("$t1", 1), ("$t2", 2)] {
        let (_, chain) = store.state_group_with_chain(group).await.unwrap();
        assert_eq!(chain, Some(length), "{group}");
    }
    assert_eq!(
        store.state_group_with_chain("$none").await.unwrap(),
        (Vec::new(), None)
    );
}

fn sent_by(mut event: EventToPersist, sender: &str) -> EventToPersist {
    event.sender = sender.to_owned();
    event
}

fn redaction_of_unseen(id: &str, target: &str, reach: RedactionReach) -> EventToPersist {
    let mut redaction = event(id, "m.room.redaction", None);
    redaction.redacts = Some(Redacts::Unseen {
        target: target.to_owned(),
        reach,
    });
    redaction
}

#[tokio::test]
async fn redactions_of_unseen_events_apply_when_their_target_arrives_within_reach() {
    let store = test_util::store().await;
    store.init_cluster("example.org", 4).await.unwrap();
    let epoch = store.claim_partition(2, "a", TTL).await.unwrap().unwrap();
    let remote = || RedactionReach::Server("remote.example".try_into().unwrap());
    let only_b = RedactionReach::Sender("@b:example.org".try_into().unwrap());
    store
        .persist(&batch(
            epoch,
            "a",
            true,
            vec![
                event("$create", "m.room.create", Some("")),
                redaction_of_unseen("$r1", "$t1", remote()),
                redaction_of_unseen("$r2", "$t2", only_b),
                redaction_of_unseen("$r5", "$t5", remote()),
            ],
        ))
        .await
        .unwrap();
    // A moderator of another room names an event of this one.
    let mut other = batch(
        epoch,
        "a",
        true,
        vec![
            event("$other-create", "m.room.create", Some("")),
            redaction_of_unseen("$o1", "$t3", RedactionReach::Anyone),
        ],
    );
    other.room_id = "!other:example.org".to_owned();
    store.persist(&other).await.unwrap();

    store
        .persist(&batch(
            epoch,
            "a",
            false,
            vec![
                sent_by(event("$t1", "m.room.message", None), "@x:remote.example"),
                event("$t2", "m.room.message", None),
                event("$t3", "m.room.message", None),
                // Redaction first, target later in the same batch.
                redaction_of_unseen("$r4", "$t4", RedactionReach::Anyone),
                event("$t4", "m.room.message", None),
            ],
        ))
        .await
        .unwrap();
    let redacted_by = async |id: &str| {
        store
            .event(id)
            .await
            .unwrap()
            .unwrap()
            .redaction_json
            .is_some()
    };
    assert!(redacted_by("$t1").await, "a server's user, by that server");
    assert!(!redacted_by("$t2").await, "another user's, without power");
    assert!(!redacted_by("$t3").await, "a redaction from another room");
    assert!(redacted_by("$t4").await, "a redaction earlier in the batch");

    // The one still waiting applies in a later batch, and only in its room.
    store
        .persist(&batch(
            epoch,
            "a",
            false,
            vec![sent_by(
                event("$t5", "m.room.message", None),
                "@y:remote.example",
            )],
        ))
        .await
        .unwrap();
    assert!(
        redacted_by("$t5").await,
        "a target that arrives later still"
    );
}

/// A membership event of `user`, changing their slot.
fn member(id: &str, user: &str, membership: &str) -> EventToPersist {
    let mut e = event(id, "m.room.member", Some(user));
    e.membership = Some(membership.to_owned());
    e.state_changes[0].membership = Some(membership.to_owned());
    e
}

/// The room's member counts, servers and heroes as kept up to date by
/// room_state's triggers follow every kind of change a persist makes (a new
/// member, a changed membership, two changes of one slot in a batch, a slot
/// removed), and equal a count of room_state itself.
#[tokio::test]
async fn member_counts_and_servers_follow_the_room_state() {
    let store = test_util::store().await;
    store.init_cluster("example.org", 4).await.unwrap();
    let epoch = store.claim_partition(2, "a", TTL).await.unwrap().unwrap();
    let room = "!r:example.org";
    let mut removed = event("$gone", "m.room.topic", None);
    removed.state_changes = vec![StateChange {
        kind: "m.room.member".to_owned(),
        state_key: "@a:example.org".to_owned(),
        event_id: None,
        membership: None,
    }];
    let batches = [
        (
            true,
            vec![
                event("$c", "m.room.create", Some("")),
                member("$a", "@a:example.org", "join"),
                member("$b", "@b:other.org", "join"),
                member("$c2", "@c:other.org", "invite"),
            ],
            (2, 1),
            vec!["example.org", "other.org"],
        ),
        (
            false,
            vec![
                member("$b2", "@b:other.org", "leave"),
                member("$c3", "@c:other.org", "join"),
                member("$d", "@d:third.org", "invite"),
                member("$d2", "@d:third.org", "join"),
            ],
            (3, 0),
            vec!["example.org", "other.org", "third.org"],
        ),
        (
            false,
            vec![member("$c4", "@c:other.org", "ban"), removed],
            (1, 0),
            vec!["third.org"],
        ),
    ];
    for (new_room, events, counts, servers) in batches {
        store
            .persist(&batch(epoch, "a", new_room, events))
            .await
            .unwrap();
        assert_eq!(store.member_counts(room).await.unwrap(), counts);
        let recount = store
            .query_one(
                "SELECT count(*) FILTER (WHERE membership = 'join'), count(*) FILTER (WHERE membership = 'invite')
                 FROM room_state WHERE room_id = $1 AND type = 'm.room.member'",
                &[&room],
            )
            .await
            .unwrap();
        assert_eq!(counts, (recount.get(0), recount.get(1)));
        let mut kept = store.servers_in_room(room).await.unwrap();
        kept.sort();
        assert_eq!(kept, servers);
        for server in ["example.org", "other.org", "third.org"] {
            assert_eq!(
                store.server_in_room(room, server).await.unwrap(),
                servers.contains(&server),
                "{server}"
            );
        }
    }
    assert_eq!(
        store.heroes(room, "@x:example.org", 5).await.unwrap(),
        ["@d:third.org"]
    );
    assert_eq!(
        store.member_counts("!unknown:example.org").await.unwrap(),
        (0, 0)
    );
}

/// The upgrade to V10 counts the members and servers of the rooms already
/// there (its triggers count what comes after).
#[tokio::test]
async fn the_v10_migration_counts_the_members_already_there() {
    let store = test_util::store().await;
    let member = |room: &str, user: &str, membership: &str, pos: i64| {
        let store = &store;
        let (room, user, membership) = (room.to_owned(), user.to_owned(), membership.to_owned());
        async move {
            store
                .execute(
                    "INSERT INTO room_state (room_id, type, state_key, event_id, membership, pos)
                     VALUES ($1, 'm.room.member', $2, $3, $4, $5)",
                    &[&room, &user, &format!("${room}{user}"), &membership, &pos],
                )
                .await
                .unwrap();
        }
    };
    member("!a:x", "@1:one", "join", 1).await;
    member("!a:x", "@2:one", "join", 2).await;
    member("!a:x", "@3:two", "invite", 3).await;
    member("!a:x", "@4:two", "leave", 4).await;
    member("!b:x", "@1:one", "ban", 5).await;
    // As a database from before V10 would be: rows, no counts.
    store
        .client()
        .await
        .unwrap()
        .batch_execute("DELETE FROM room_member_counts; DELETE FROM room_joined_servers")
        .await
        .unwrap();
    super::run_migration_from(
        &store,
        include_str!("../../migrations/V10__room_member_counts.sql"),
        "INSERT INTO room_member_counts (room_id, joined, invited)",
    )
    .await;

    assert_eq!(store.member_counts("!a:x").await.unwrap(), (2, 1));
    assert_eq!(store.member_counts("!b:x").await.unwrap(), (0, 0));
    assert_eq!(store.servers_in_room("!a:x").await.unwrap(), ["one"]);
    assert!(store.servers_in_room("!b:x").await.unwrap().is_empty());
}
