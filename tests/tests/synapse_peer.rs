//! Synapse (from PyPI, a real homeserver) as a federation peer of a test
//! cluster: its user joins rooms hosted here (our keys, make_join and
//! send_join as Synapse calls them, its keys fetched by us), talks in them
//! (its transactions through `/send`), and joins a restricted room that we
//! vouch for. Outbound federation does not exist yet, so nothing here checks
//! what Synapse's user sees of our users' later events.

use reqwest::Method;
use serde_json::{Value, json};
use tessera_tests::client::{bodies, enc, restricted_room, timeline};
use tessera_tests::synapse::Synapse;
use tessera_tests::{Spec, TestCluster, TestUser, wait_stored};

/// Synapse's user joins `room` here, naming our server as the one to ask.
async fn synapse_join(synapse: &Synapse, token: &str, room: &str, via: &str) -> (u16, Value) {
    synapse
        .call(
            Method::POST,
            &format!(
                "/_matrix/client/v3/join/{}?server_name={}",
                enc(room),
                enc(via)
            ),
            Some(token),
            Some(json!({})),
        )
        .await
}

/// Synapse's user joins `room` through `via`, which must succeed.
async fn synapse_joins(synapse: &Synapse, token: &str, room: &str, via: &str) {
    let (status, body) = synapse_join(synapse, token, room, via).await;
    assert_eq!(status, 200, "join {room}: {body}\n{}", synapse.log_tail());
}

/// Sync as `user` (bounded) until `room`'s timeline holds a message `body`.
async fn wait_for_message(cluster: &TestCluster, user: &TestUser, room: &str, body: &str) -> Value {
    let api = cluster.api();
    let mut since: Option<String> = None;
    for _ in 0..60 {
        let sync = api.sync(user, since.as_deref(), 1000).await;
        since = sync["next_batch"].as_str().map(str::to_owned);
        if let Some(event) = timeline(&sync, room)
            .into_iter()
            .find(|e| e["content"]["body"] == body)
        {
            return event;
        }
    }
    panic!("{body:?} never reached {room} here");
}

/// A room of `creator`'s that members of `allowed` may join.
async fn restricted_to(cluster: &TestCluster, creator: &TestUser, allowed: &str) -> String {
    cluster
        .api()
        .create_room(creator, restricted_room(allowed))
        .await
}

/// A federated test cluster with alice, and Synapse with sam.
struct Peers {
    cluster: TestCluster,
    synapse: Synapse,
    alice: TestUser,
    sam: String,
    token: String,
    /// Our server name, for Synapse to join through.
    ours: String,
}

async fn peers() -> Peers {
    let cluster = TestCluster::start(Spec::federated(1)).await;
    let synapse = Synapse::start().await;
    let alice = cluster.register("alice").await;
    let (sam, token) = synapse.register("sam").await;
    let ours = cluster.server_name.clone();
    Peers {
        cluster,
        synapse,
        alice,
        sam,
        token,
        ours,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_synapse_user_joins_talks_and_joins_a_restricted_room() {
    let Peers {
        cluster,
        synapse,
        alice,
        sam,
        token,
        ours,
    } = peers().await;
    let api = cluster.api();

    // A public room: Synapse joins it through us and sends a message.
    let lobby = api
        .create_room(&alice, json!({ "preset": "public_chat", "name": "Lobby" }))
        .await;
    api.send_text(&alice, &lobby, "t1", "hello from tessera")
        .await;
    synapse_joins(&synapse, &token, &lobby, &ours).await;
    let store = cluster.store().await;
    assert_eq!(
        store.membership(&lobby, &sam).await.unwrap().as_deref(),
        Some("join")
    );
    let (status, body) = synapse
        .send_text(&token, &lobby, "s1", "hello from synapse")
        .await;
    assert_eq!(status, 200, "{body}");
    let event = wait_for_message(&cluster, &alice, &lobby, "hello from synapse").await;
    assert_eq!(event["sender"], sam.as_str());
    assert_eq!(
        event["event_id"], body["event_id"],
        "the event Synapse made"
    );

    // sam takes it back: Synapse's redaction hides it here too.
    let said = body["event_id"].as_str().expect("event_id").to_owned();
    let (status, body) = synapse
        .redact(&token, &lobby, &said, "r1", Some("typo"))
        .await;
    assert_eq!(status, 200, "{body}");
    let path = format!(
        "/_matrix/client/v3/rooms/{}/event/{}",
        enc(&lobby),
        enc(&said)
    );
    let mut seen = Value::Null;
    for _ in 0..100 {
        seen = api.ok(Method::GET, &path, &alice, None).await;
        if seen["content"] == json!({}) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen["content"], json!({}), "{seen}");
    assert_eq!(
        seen["unsigned"]["redacted_because"]["content"]["reason"], "typo",
        "{seen}"
    );

    // A room restricted to the lobby's members: we vouch for sam.
    let restricted = restricted_to(&cluster, &alice, &lobby).await;
    synapse_joins(&synapse, &token, &restricted, &ours).await;
    let member = api.member(&alice, &restricted, &sam).await;
    assert_eq!(member["membership"], "join");
    assert_eq!(
        member["join_authorised_via_users_server"],
        alice.user_id.as_str()
    );

    // A room restricted to a room of ours sam is not in: refused, no trace.
    let staff = api
        .create_room(&alice, json!({ "preset": "private_chat" }))
        .await;
    let closed = restricted_to(&cluster, &alice, &staff).await;
    let (status, body) = synapse_join(&synapse, &token, &closed, &ours).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(store.membership(&closed, &sam).await.unwrap(), None);
}

/// Poll (bounded) until `check` holds; what Synapse sends in the background
/// (its transactions) arrives when it arrives.
async fn eventually<F, Fut>(what: &str, synapse: &Synapse, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..150 {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("{what} never happened\n{}", synapse.log_tail());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_synapse_user_knocks_invites_types_and_leaves() {
    let Peers {
        cluster,
        synapse,
        alice,
        sam,
        token,
        ours,
    } = peers().await;
    let api = cluster.api();
    let store = cluster.store().await;

    // Knocking: make_knock and send_knock as Synapse calls them.
    let door = api
        .create_room(
            &alice,
            json!({
                "preset": "private_chat",
                "initial_state": [{
                    "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" },
                }],
            }),
        )
        .await;
    let (status, body) = synapse
        .call(
            Method::POST,
            &format!(
                "/_matrix/client/v3/knock/{}?server_name={}",
                enc(&door),
                enc(&ours)
            ),
            Some(&token),
            Some(json!({ "reason": "let me in" })),
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", synapse.log_tail());
    assert_eq!(
        store.membership(&door, &sam).await.unwrap().as_deref(),
        Some("knock")
    );

    // Typing in a room both are in: Synapse's EDU is accepted and kept.
    let lobby = api.public_room(&alice).await;
    synapse_joins(&synapse, &token, &lobby, &ours).await;
    let (status, body) = synapse
        .call(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/typing/{}",
                enc(&lobby),
                enc(&sam)
            ),
            Some(&token),
            Some(json!({ "typing": true, "timeout": 30000 })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let db = cluster.db().await;
    let kept = |kind: &'static str| {
        let (db, origin) = (&db, &synapse.server_name);
        async move {
            let row = db
                .query_one(
                    "SELECT count(*) FROM received_edus WHERE edu_type = $1 AND origin = $2",
                    &[&kind, origin],
                )
                .await
                .unwrap();
            row.get::<_, i64>(0) > 0
        }
    };
    eventually("Synapse's typing EDU", &synapse, || kept("m.typing")).await;

    // A read receipt, and a new device (a second login): Synapse's receipt
    // and device list update EDUs are kept too.
    let (status, body) = synapse.send_text(&token, &lobby, "r1", "read me").await;
    assert_eq!(status, 200, "{body}");
    let read = body["event_id"].as_str().expect("event_id").to_owned();
    let (status, body) = synapse
        .call(
            Method::POST,
            &format!(
                "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
                enc(&lobby),
                enc(&read)
            ),
            Some(&token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually("Synapse's read receipt", &synapse, || async {
        db.query_opt(
            "SELECT 1 FROM remote_receipts WHERE room_id = $1 AND user_id = $2 AND receipt_type = 'm.read'
             AND event_ids ? $3",
            &[&lobby, &sam, &read],
        )
        .await
        .unwrap()
        .is_some()
    })
    .await;
    let (status, body) = synapse
        .call(
            Method::POST,
            "/_matrix/client/v3/login",
            None,
            Some(json!({
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": sam.as_str() },
                "password": tessera_tests::synapse::PASSWORD,
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually("Synapse's device list update", &synapse, || async {
        db.query_opt(
            "SELECT 1 FROM remote_device_list_updates WHERE user_id = $1",
            &[&sam],
        )
        .await
        .unwrap()
        .is_some()
    })
    .await;

    // Leaving: Synapse sends its own leave event in a transaction.
    let (status, body) = synapse.leave(&token, &lobby).await;
    assert_eq!(status, 200, "{body}");
    eventually("sam's leave", &synapse, || async {
        store.membership(&lobby, &sam).await.unwrap().as_deref() == Some("leave")
    })
    .await;

    // An invite from a room on Synapse: the invite API (v2), counter-signed
    // here and shown in alice's /sync.
    let (status, body) = synapse
        .call(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&token),
            Some(json!({ "preset": "private_chat", "invite": [alice.user_id] })),
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", synapse.log_tail());
    let far = body["room_id"].as_str().expect("room_id").to_owned();
    let mut invited = Value::Null;
    for _ in 0..60 {
        let sync = api.sync(&alice, None, 1000).await;
        invited = sync["rooms"]["invite"][&far].clone();
        if !invited.is_null() {
            break;
        }
    }
    let invite_state = invited["invite_state"]["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no invite to {far} in alice's sync"));
    assert!(
        invite_state
            .iter()
            .any(|e| e["type"] == "m.room.member" && e["state_key"] == alice.user_id.as_str()),
        "{invited}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn synapse_reads_aliases_profiles_and_history_from_us() {
    let Peers {
        cluster,
        synapse,
        alice,
        token,
        ours,
        ..
    } = peers().await;
    let api = cluster.api();
    let (status, body) = api
        .call(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/profile/{}/displayname",
                enc(&alice.user_id)
            ),
            Some(&alice.token),
            Some(json!({ "displayname": "Alice Here" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let lobby = api
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "room_alias_name": "lobby" }),
        )
        .await;
    for i in 0..5 {
        api.send_text(
            &alice,
            &lobby,
            &format!("t{i}"),
            &format!("before you came {i}"),
        )
        .await;
    }

    // A profile on our server: Synapse asks /query/profile.
    let (status, body) = synapse
        .call(
            Method::GET,
            &format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", synapse.log_tail());
    assert_eq!(body["displayname"], "Alice Here");

    // An alias of ours: Synapse asks /query/directory, then joins through
    // the servers it was given.
    let alias = format!("#lobby:{ours}");
    let (status, body) = synapse
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(&alias)),
            Some(&token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", synapse.log_tail());
    assert_eq!(body["room_id"], lobby.as_str());

    // History from before the join: Synapse backfills it from us (/backfill,
    // then /event for what it lacks).
    let mut seen = Vec::new();
    for _ in 0..50 {
        let (status, body) = synapse
            .call(
                Method::GET,
                &format!(
                    "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
                    enc(&lobby)
                ),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        seen = bodies(body["chunk"].as_array().expect("chunk"));
        if seen.len() == 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let expected: Vec<String> = (0..5)
        .rev()
        .map(|i| format!("before you came {i}"))
        .collect();
    assert_eq!(seen, expected, "{}", synapse.log_tail());
}

#[tokio::test(flavor = "multi_thread")]
async fn synapse_users_rename_rejoin_and_are_banned() {
    let Peers {
        cluster,
        synapse,
        alice,
        sam,
        token,
        ours,
    } = peers().await;
    let api = cluster.api();
    let lobby = api.public_room(&alice).await;
    synapse_joins(&synapse, &token, &lobby, &ours).await;

    // A new display name: Synapse sends sam's membership again, with it.
    let (status, body) = synapse
        .call(
            Method::PUT,
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&sam)),
            Some(&token),
            Some(json!({ "displayname": "Sam of Synapse" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually("sam's new display name", &synapse, || async {
        api.member(&alice, &lobby, &sam).await["displayname"] == "Sam of Synapse"
    })
    .await;

    // Leaving and joining again.
    let (status, body) = synapse.leave(&token, &lobby).await;
    assert_eq!(status, 200, "{body}");
    eventually("sam's leave", &synapse, || async {
        api.member(&alice, &lobby, &sam).await["membership"] == "leave"
    })
    .await;
    synapse_joins(&synapse, &token, &lobby, &ours).await;
    assert_eq!(api.member(&alice, &lobby, &sam).await["membership"], "join");

    // Banned here (Synapse does not hear of it: we send nothing yet), sam
    // writes on: the message passes against the state Synapse built it on,
    // not against the room's current state, so it is soft-failed, never shown.
    api.ok(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/ban", enc(&lobby)),
        &alice,
        Some(json!({ "user_id": sam, "reason": "spam" })),
    )
    .await;
    let (status, body) = synapse
        .send_text(&token, &lobby, "b1", "after the ban")
        .await;
    assert_eq!(status, 200, "{body}");
    let event_id = body["event_id"].as_str().expect("event_id");
    assert_eq!(
        wait_stored(&cluster, event_id).await,
        (false, true),
        "soft-failed"
    );
    let path = format!(
        "/_matrix/client/v3/rooms/{}/event/{}",
        enc(&lobby),
        enc(event_id)
    );
    let (status, body) = api.call(Method::GET, &path, Some(&alice.token), None).await;
    assert_eq!(status, 404, "{body}");
}

/// Every room version we support, as Synapse builds its events: a state
/// event (the topic, which the room lets anyone set), a message, and a
/// redaction (`redacts` at the top level before version 11, in the content
/// from 11 on).
#[tokio::test(flavor = "multi_thread")]
async fn synapse_writes_state_and_redacts_in_every_room_version() {
    let Peers {
        cluster,
        synapse,
        alice,
        token,
        ours,
        ..
    } = peers().await;
    let api = cluster.api();
    for version in ["10", "11", "12"] {
        let room = api
            .create_room(
                &alice,
                json!({
                    "preset": "public_chat",
                    "room_version": version,
                    "power_level_content_override": { "events": { "m.room.topic": 0 } },
                }),
            )
            .await;
        let (status, body) = synapse_join(&synapse, &token, &room, &ours).await;
        assert_eq!(status, 200, "v{version}: {body}\n{}", synapse.log_tail());
        let (status, body) = synapse
            .call(
                Method::PUT,
                &format!(
                    "/_matrix/client/v3/rooms/{}/state/m.room.topic/",
                    enc(&room)
                ),
                Some(&token),
                Some(json!({ "topic": format!("set from Synapse in v{version}") })),
            )
            .await;
        assert_eq!(status, 200, "v{version}: {body}");
        let topic_path = format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.topic/",
            enc(&room)
        );
        eventually(&format!("the v{version} topic"), &synapse, || async {
            let (status, topic) = api
                .call(Method::GET, &topic_path, Some(&alice.token), None)
                .await;
            status == 200 && topic["topic"] == format!("set from Synapse in v{version}")
        })
        .await;

        let (status, body) = synapse
            .send_text(
                &token,
                &room,
                &format!("m{version}"),
                &format!("v{version}"),
            )
            .await;
        assert_eq!(status, 200, "v{version}: {body}");
        let said = body["event_id"].as_str().expect("event_id").to_owned();
        wait_for_message(&cluster, &alice, &room, &format!("v{version}")).await;
        let (status, body) = synapse
            .redact(&token, &room, &said, &format!("r{version}"), None)
            .await;
        assert_eq!(status, 200, "v{version}: {body}");
        let path = format!(
            "/_matrix/client/v3/rooms/{}/event/{}",
            enc(&room),
            enc(&said)
        );
        eventually(&format!("the v{version} redaction"), &synapse, || async {
            api.ok(Method::GET, &path, &alice, None).await["content"] == json!({})
        })
        .await;
    }
}

/// A burst from Synapse's user (its transactions as Synapse batches them)
/// reaches our user whole and in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_from_synapse_arrives_whole_and_in_order() {
    const BURST: usize = 200;
    let Peers {
        cluster,
        synapse,
        alice,
        token,
        ours,
        ..
    } = peers().await;
    let api = cluster.api();
    let room = api.public_room(&alice).await;
    synapse_joins(&synapse, &token, &room, &ours).await;
    // One after another: Synapse batches what queues up while a
    // transaction to us is in flight.
    for i in 0..BURST {
        let (status, body) = synapse
            .send_text(&token, &room, &format!("b{i}"), &format!("burst {i}"))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // The last one here means all are (they arrive in order); then the
    // room's history as our user reads it.
    wait_for_message(&cluster, &alice, &room, &format!("burst {}", BURST - 1)).await;
    let history = api
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit={BURST}",
                enc(&room)
            ),
            &alice,
            None,
        )
        .await;
    let mut seen = bodies(history["chunk"].as_array().expect("chunk"));
    seen.reverse();
    // Synapse orders them by when it persisted them; each must be here
    // exactly once, and the room's order must be Synapse's.
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        BURST,
        "{} of {BURST} arrived once: {seen:?}",
        sorted.len()
    );
    assert_eq!(seen.len(), BURST, "no duplicates: {seen:?}");
    let (status, body) = synapse
        .call(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit={BURST}",
                enc(&room)
            ),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut synapse_order = bodies(body["chunk"].as_array().expect("chunk"));
    synapse_order.reverse();
    assert_eq!(seen, synapse_order, "the same order as Synapse's");
}
