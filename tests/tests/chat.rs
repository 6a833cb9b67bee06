//! Chat through real processes: rooms, membership, messages, history,
//! idempotent sends, profile, aliases, account data and `/sync` sections.

use reqwest::Method;
use serde_json::{Value, json};
use tessera_tests::client::{bodies, enc, timeline};
use tessera_tests::{Spec, TestCluster};

#[tokio::test(flavor = "multi_thread")]
async fn two_users_chat_and_page_back() {
    let cluster = TestCluster::start(Spec::default()).await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let bob = cluster.register("bob").await;

    // whoami and versions
    let me = api
        .ok(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            &alice,
            None,
        )
        .await;
    assert_eq!(me["user_id"], alice.user_id);
    let (status, versions) = api
        .call(Method::GET, "/_matrix/client/versions", None, None)
        .await;
    assert_eq!(status, 200);
    assert!(
        versions["versions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "v1.12")
    );

    let room = api
        .create_room(
            &alice,
            json!({ "name": "Chat", "topic": "t", "invite": [bob.user_id] }),
        )
        .await;
    assert!(
        room.starts_with('!') && !room.contains(':'),
        "room v12 IDs have no server part: {room}"
    );
    let bob_initial = api.sync(&bob, None, 0).await;
    let invite = &bob_initial["rooms"]["invite"][&room]["invite_state"]["events"];
    assert!(
        invite
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Chat"),
        "{invite}"
    );
    assert!(
        invite
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id)
    );
    api.join(&bob, &room).await;
    let since = bob_initial["next_batch"].as_str().unwrap().to_owned();

    let mut sent = Vec::new();
    for i in 0..30 {
        let sender = if i % 2 == 0 { &alice } else { &bob };
        api.send_text(sender, &room, &format!("txn{i}"), &format!("message {i}"))
            .await;
        sent.push(format!("message {i}"));
    }
    // Bob's incremental sync: newly joined, so the newest 20 with limited=true and full state.
    let sync = api.sync(&bob, Some(&since), 0).await;
    let joined = &sync["rooms"]["join"][&room];
    assert_eq!(joined["timeline"]["limited"], true);
    assert_eq!(bodies(&timeline(&sync, &room)), sent[10..].to_vec());
    assert!(
        joined["state"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.create")
    );
    assert_eq!(joined["summary"]["m.joined_member_count"], 2);

    // Page back from prev_batch: the 10 older messages, newest first, then the room's beginning.
    let prev = joined["timeline"]["prev_batch"].as_str().unwrap();
    let page = api
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=10&from={prev}",
                enc(&room)
            ),
            &bob,
            None,
        )
        .await;
    let mut older = bodies(page["chunk"].as_array().unwrap());
    older.reverse();
    assert_eq!(older, sent[..10].to_vec());
    let end = page["end"].as_str().unwrap();
    let rest = api
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100&from={end}",
                enc(&room)
            ),
            &bob,
            None,
        )
        .await;
    let rest = rest["chunk"].as_array().unwrap();
    assert!(
        rest.iter().any(|e| e["type"] == "m.room.create"),
        "paging reaches the create event"
    );
    // Forward pagination from the start sees everything in order.
    assert_eq!(api.message_bodies(&bob, &room).await, sent);

    // The next incremental sync is empty and waits; a new message wakes it.
    let next = sync["next_batch"].as_str().unwrap().to_owned();
    let waiting = {
        let api = api.clone();
        let bob = bob.clone();
        let next = next.clone();
        tokio::spawn(async move { api.sync(&bob, Some(&next), 20_000).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a long-poll must not return before something happens"
    );
    let event_id = api.send_text(&alice, &room, "late", "late message").await;
    let woke = waiting.await.unwrap();
    let events = timeline(&woke, &room);
    assert_eq!(bodies(&events), vec!["late message"]);
    assert_eq!(events[0]["event_id"], event_id);
    assert_eq!(woke["rooms"]["join"][&room]["timeline"]["limited"], false);

    // /event, /context, /members, /joined_members, /joined_rooms, /state.
    let event = api
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(&event_id)
            ),
            &bob,
            None,
        )
        .await;
    assert_eq!(event["content"]["body"], "late message");
    let context = api
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/context/{}?limit=4",
                enc(&room),
                enc(&event_id)
            ),
            &bob,
            None,
        )
        .await;
    assert_eq!(
        bodies(context["events_before"].as_array().unwrap()),
        vec!["message 29", "message 28"]
    );
    let members = api
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/members", enc(&room)),
            &bob,
            None,
        )
        .await;
    assert_eq!(members["chunk"].as_array().unwrap().len(), 2);
    let joined_members = api
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)),
            &bob,
            None,
        )
        .await;
    assert!(joined_members["joined"].get(&alice.user_id).is_some());
    let rooms = api
        .ok(Method::GET, "/_matrix/client/v3/joined_rooms", &bob, None)
        .await;
    assert_eq!(rooms["joined_rooms"], json!([room]));
    let name = api
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.name", enc(&room)),
            &bob,
            None,
        )
        .await;
    assert_eq!(name, json!({ "name": "Chat" }));
}

#[tokio::test(flavor = "multi_thread")]
async fn sends_are_idempotent_per_device_and_txn() {
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let room = api.create_room(&alice, json!({})).await;
    let first = api.send_text(&alice, &room, "same", "once").await;
    let again = api.send_text(&alice, &room, "same", "once").await;
    assert_eq!(first, again);
    let history = api
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
                enc(&room)
            ),
            &alice,
            None,
        )
        .await;
    assert_eq!(bodies(history["chunk"].as_array().unwrap()), vec!["once"]);
    // The sending device sees its transaction ID; the event is shown once.
    let sync = api.sync(&alice, None, 0).await;
    let mine: Vec<&Value> = sync["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .collect();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["unsigned"]["transaction_id"], "same");
}

#[tokio::test(flavor = "multi_thread")]
async fn membership_moderation_and_sections() {
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let bob = cluster.register("bob").await;
    let carol = cluster.register("carol").await;
    let room = api
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "room_alias_name": "lobby" }),
        )
        .await;

    // Join by alias; the alias resolves.
    let alias = api
        .ok(
            Method::GET,
            "/_matrix/client/v3/directory/room/%23lobby:test.local",
            &bob,
            None,
        )
        .await;
    assert_eq!(alias["room_id"], room);
    api.join(&bob, "#lobby:test.local").await;
    let bob_token = api.initial_token(&bob).await;

    // Bob cannot kick Alice; Alice kicks Bob; Bob's sync shows the room under leave.
    let (status, body) = api
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)),
            Some(&bob.token),
            Some(json!({ "user_id": alice.user_id })),
        )
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{body}"
    );
    api.ok(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)),
        &alice,
        Some(json!({ "user_id": bob.user_id, "reason": "bye" })),
    )
    .await;
    let sync = api.sync(&bob, Some(&bob_token), 0).await;
    let left = &sync["rooms"]["leave"][&room]["timeline"]["events"];
    assert!(
        left.as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "leave"),
        "{sync}"
    );
    // Bob, no longer a member, cannot send.
    let (status, body) = api
        .call(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/x",
                enc(&room)
            ),
            Some(&bob.token),
            Some(json!({"body": "hi"})),
        )
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{body}"
    );

    // Ban and unban Carol.
    api.join(&carol, &room).await;
    api.ok(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/ban", enc(&room)),
        &alice,
        Some(json!({ "user_id": carol.user_id })),
    )
    .await;
    let (status, _) = api
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            Some(&carol.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 403, "banned users cannot rejoin");
    api.ok(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/unban", enc(&room)),
        &alice,
        Some(json!({ "user_id": carol.user_id })),
    )
    .await;
    api.join(&carol, &room).await;

    // Knock on a room that allows it.
    let knock_room = api.create_room(&alice, json!({ "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }] })).await;
    let carol_token = api.initial_token(&carol).await;
    api.ok(
        Method::POST,
        &format!("/_matrix/client/v3/knock/{}", enc(&knock_room)),
        &carol,
        Some(json!({ "reason": "let me in" })),
    )
    .await;
    let sync = api.sync(&carol, Some(&carol_token), 0).await;
    assert!(
        sync["rooms"]["knock"][&knock_room]["knock_state"]["events"]
            .as_array()
            .is_some_and(|e| !e.is_empty()),
        "{sync}"
    );
    // Knocking on an invite-only room is refused.
    let private = api.create_room(&alice, json!({})).await;
    let (status, _) = api
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/knock/{}", enc(&private)),
            Some(&carol.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn profile_account_data_filters_and_redactions() {
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let room = api.create_room(&alice, json!({})).await;
    let token = api.initial_token(&alice).await;

    api.ok(
        Method::PUT,
        &format!(
            "/_matrix/client/v3/profile/{}/displayname",
            enc(&alice.user_id)
        ),
        &alice,
        Some(json!({ "displayname": "Alice A." })),
    )
    .await;
    let profile = api
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)),
            &alice,
            None,
        )
        .await;
    assert_eq!(profile["displayname"], "Alice A.");
    api.ok(
        Method::PUT,
        &format!(
            "/_matrix/client/v3/user/{}/account_data/org.example.settings",
            enc(&alice.user_id)
        ),
        &alice,
        Some(json!({ "theme": "dark" })),
    )
    .await;
    let sync = api.sync(&alice, Some(&token), 0).await;
    let account = sync["account_data"]["events"].as_array().unwrap();
    assert!(
        account
            .iter()
            .any(|e| e["type"] == "org.example.settings" && e["content"]["theme"] == "dark"),
        "{sync}"
    );
    // The profile change went into the room as a new membership event.
    let events = timeline(&sync, &room);
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "m.room.member" && e["content"]["displayname"] == "Alice A."),
        "{sync}"
    );

    // A filter limiting the timeline to one event.
    let filter = api
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/user/{}/filter", enc(&alice.user_id)),
            &alice,
            Some(json!({ "room": { "timeline": { "limit": 1 } } })),
        )
        .await;
    let filter_id = filter["filter_id"].as_str().unwrap();
    let stored = api
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/user/{}/filter/{filter_id}",
                enc(&alice.user_id)
            ),
            &alice,
            None,
        )
        .await;
    assert_eq!(stored["room"]["timeline"]["limit"], 1);
    let url = format!(
        "{}/_matrix/client/v3/sync?filter={filter_id}",
        cluster.sync_urls[0]
    );
    let (_, sync) = api
        .call_raw(Method::GET, &url, Some(&alice.token), None)
        .await;
    assert_eq!(timeline(&sync, &room).len(), 1);
    assert_eq!(sync["rooms"]["join"][&room]["timeline"]["limited"], true);

    // Redaction hides the content from everyone.
    let event_id = api.send_text(&alice, &room, "r1", "secret").await;
    api.ok(
        Method::PUT,
        &format!(
            "/_matrix/client/v3/rooms/{}/redact/{}/r2",
            enc(&room),
            enc(&event_id)
        ),
        &alice,
        Some(json!({ "reason": "oops" })),
    )
    .await;
    let event = api
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(&event_id)
            ),
            &alice,
            None,
        )
        .await;
    assert_eq!(event["content"], json!({}));
    assert_eq!(
        event["unsigned"]["redacted_because"]["content"]["reason"],
        "oops"
    );

    // Logout invalidates the token at once.
    api.ok(
        Method::POST,
        "/_matrix/client/v3/logout",
        &alice,
        Some(json!({})),
    )
    .await;
    let (status, body) = api
        .call(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (401, Some("M_UNKNOWN_TOKEN"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn registration_is_closed_until_an_admin_makes_a_token() {
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    // No token: the only flow is a registration token, and a made-up one fails.
    let (status, challenge) = api
        .call(
            Method::POST,
            "/_matrix/client/v3/register",
            None,
            Some(json!({ "username": "mallory", "password": "pw-pw-pw-pw" })),
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(
        challenge["flows"],
        json!([{ "stages": ["m.login.registration_token"] }])
    );
    let session = challenge["session"].as_str().unwrap();
    let (status, body) = api.call(Method::POST, "/_matrix/client/v3/register", None, Some(json!({
        "username": "mallory", "password": "pw-pw-pw-pw",
        "auth": { "type": "m.login.registration_token", "token": "guess", "session": session }
    }))).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (401, Some("M_FORBIDDEN")),
        "{body}"
    );
    // A non-admin cannot make tokens; an admin can.
    let user = cluster.register("plain").await;
    let (status, _) = api
        .call(
            Method::POST,
            "/_synapse/admin/v1/registration_tokens/new",
            Some(&user.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 403);
    let admin = cluster.register_admin("admin").await;
    let token = api
        .ok(
            Method::POST,
            "/_synapse/admin/v1/registration_tokens/new",
            &admin,
            Some(json!({ "uses_allowed": 1 })),
        )
        .await;
    let token = token["token"].as_str().unwrap();
    let (_, validity) = api
        .call(
            Method::GET,
            &format!(
                "/_matrix/client/v1/register/m.login.registration_token/validity?token={token}"
            ),
            None,
            None,
        )
        .await;
    assert_eq!(validity["valid"], true);
    let (status, body) = api
        .call(
            Method::POST,
            "/_matrix/client/v3/register",
            None,
            Some(json!({
                "username": "newbie", "password": "pw-pw-pw-pw",
                "auth": { "type": "m.login.registration_token", "token": token, "session": session }
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], "@newbie:test.local");
    // Used up: a second registration with it fails; the new account can log in.
    let (_, validity) = api
        .call(
            Method::GET,
            &format!(
                "/_matrix/client/v1/register/m.login.registration_token/validity?token={token}"
            ),
            None,
            None,
        )
        .await;
    assert_eq!(validity["valid"], false);
    let (status, login) = api.call(Method::POST, "/_matrix/client/v3/login", None, Some(json!({
        "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "newbie" }, "password": "pw-pw-pw-pw"
    }))).await;
    assert_eq!(status, 200, "{login}");
    let (status, _) = api.call(Method::POST, "/_matrix/client/v3/login", None, Some(json!({
        "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "newbie" }, "password": "wrong"
    }))).await;
    assert_eq!(status, 403);
}

/// A room-worker whose room-state cache holds less than one room forgets
/// each room when it serves another: every turn reads the room's state
/// from Postgres again, and nothing is lost or misjudged (a topic changed
/// after a reload, a member who joins a forgotten room and speaks).
#[tokio::test(flavor = "multi_thread")]
async fn rooms_forgotten_by_a_full_state_cache_are_read_again() {
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        state_cache_events: Some(1),
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let bob = cluster.register("bob").await;
    let first = api
        .create_room(&alice, json!({ "name": "First", "invite": [bob.user_id] }))
        .await;
    let second = api.create_room(&alice, json!({ "name": "Second" })).await;
    let since = api.sync(&alice, None, 0).await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..5 {
        api.send_text(&alice, &first, &format!("f{i}"), &format!("first {i}"))
            .await;
        api.send_text(&alice, &second, &format!("s{i}"), &format!("second {i}"))
            .await;
    }
    let path = format!(
        "/_matrix/client/v3/rooms/{}/state/m.room.topic",
        enc(&first)
    );
    api.ok(
        Method::PUT,
        &path,
        &alice,
        Some(json!({ "topic": "after" })),
    )
    .await;
    api.send_text(&alice, &second, "s5", "second 5").await;
    api.join(&bob, &first).await;
    api.send_text(&alice, &second, "s6", "second 6").await;
    api.send_text(&bob, &first, "b0", "bob in first").await;

    let sync = api.sync(&alice, Some(&since), 0).await;
    let mut expected_first: Vec<String> = (0..5).map(|i| format!("first {i}")).collect();
    expected_first.push("bob in first".to_owned());
    assert_eq!(bodies(&timeline(&sync, &first)), expected_first);
    let expected_second: Vec<String> = (0..7).map(|i| format!("second {i}")).collect();
    assert_eq!(bodies(&timeline(&sync, &second)), expected_second);
    let topic = api.ok(Method::GET, &path, &alice, None).await;
    assert_eq!(topic["topic"], "after");

    let metrics = cluster.metrics("room-worker-0").await;
    let forgotten: f64 = metrics
        .lines()
        .find(|l| l.starts_with("tessera_room_worker_room_states_forgotten_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(forgotten >= 10.0, "rooms forgotten: {forgotten}");
}
