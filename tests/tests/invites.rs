//! Invites from other servers (the federation invite v2 API) against real
//! processes: a fake remote server invites a local user to a room it hosts;
//! the answer carries our signature, the invitee's /sync shows the invite
//! with the stripped state sent, and the invitee can reject it. Bad invites
//! get the spec's errors.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tessera_events::ruma::api::federation::discovery::ServerSigningKeys;
use tessera_events::ruma::serde::Base64;
use tessera_events::ruma::{CanonicalJsonObject, RoomVersionId, UserId};
use tessera_federation::FederationError;
use tessera_tests::client::enc;
use tessera_tests::fake_remote::{FakeRemote, json_of};
use tessera_tests::{Spec, TestCluster, TestUser};

/// Sync (bounded) until `done` holds for a sync response.
async fn sync_until(
    cluster: &TestCluster,
    user: &TestUser,
    since: &mut String,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let api = cluster.api();
    for _ in 0..40 {
        let sync = api.sync(user, Some(since), 1000).await;
        *since = sync["next_batch"].as_str().unwrap().to_owned();
        if done(&sync) {
            return sync;
        }
    }
    panic!("timed out waiting for a sync");
}

/// Our server's public signing keys, as a ruma public key map entry.
async fn our_keys(
    remote: &FakeRemote,
    server_name: &str,
) -> tessera_events::ruma::signatures::PublicKeyMap {
    let document = remote
        .request("GET", "/_matrix/key/v2/server", None)
        .await
        .expect("our keys");
    let keys: ServerSigningKeys = serde_json::from_value(document).expect("key document");
    let set: BTreeMap<String, Base64> = keys
        .verify_keys
        .into_iter()
        .map(|(id, key)| (id.to_string(), key.key))
        .collect();
    BTreeMap::from([(server_name.to_owned(), set)])
}

fn errcode(result: &Result<Value, FederationError>) -> (u16, String) {
    match result {
        Ok(value) => (200, value.to_string()),
        Err(FederationError::Status { status, body, .. }) => {
            let body: Value = serde_json::from_str(body).unwrap_or_default();
            (*status, body["errcode"].as_str().unwrap_or("").to_owned())
        }
        Err(other) => (0, other.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_invite_reaches_sync_and_can_be_rejected() {
    let cluster = TestCluster::start(Spec::federated(1)).await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let alice_id = UserId::parse(alice.user_id.as_str()).unwrap();
    let mut since = api.initial_token(&alice).await;

    let remote = FakeRemote::start(&cluster.server_name).await;
    let carol = remote.user("carol");
    let room = remote.create_room(&carol);
    let (invite, answer) = remote.invite(&room, &carol, &alice_id).await;
    let answer = answer.expect("the invite is accepted");

    // The answer is the same event, now also signed by us.
    let rules = RoomVersionId::V12.rules().unwrap();
    let signed: CanonicalJsonObject = serde_json::from_value(answer["event"].clone()).unwrap();
    assert_eq!(
        tessera_events::pdu::event_id_of(&signed, &rules).unwrap(),
        invite.event_id(),
        "signing does not change the event"
    );
    assert!(
        answer["event"]["signatures"][remote.server_name.as_str()].is_object(),
        "the inviting server's signature is kept: {answer}"
    );
    let redacted =
        tessera_events::ruma::canonical_json::redact(signed, &rules.redaction, None).unwrap();
    let mut keys = our_keys(&remote, &cluster.server_name).await;
    keys.insert(
        remote.server_name.to_string(),
        BTreeMap::from([(
            remote.key.key_id(),
            Base64::parse(remote.key.public_key_base64()).unwrap(),
        )]),
    );
    tessera_events::ruma::signatures::verify_json(&keys, &redacted)
        .expect("both signatures verify, ours with our published key");

    // The invitee sees the invite with the room's stripped state.
    let sync = sync_until(&cluster, &alice, &mut since, |s| {
        s["rooms"]["invite"][room.as_str()].is_object()
    })
    .await;
    let stripped = sync["rooms"]["invite"][room.as_str()]["invite_state"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        stripped
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Far away"),
        "{stripped:?}"
    );
    assert!(
        stripped.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == alice.user_id
            && e["sender"] == carol.as_str()
            && e["content"]["membership"] == "invite"),
        "the invite itself is in the stripped state: {stripped:?}"
    );

    // The same invite again is answered the same way and stored once.
    let path = format!(
        "/_matrix/federation/v2/invite/{}/{}",
        enc(room.as_str()),
        enc(invite.event_id().as_str())
    );
    let again = remote
        .request(
            "PUT",
            &path,
            Some(
                json!({ "room_version": "12", "event": json_of(&invite), "invite_room_state": [] }),
            ),
        )
        .await
        .expect("a repeated invite is accepted");
    assert_eq!(again["event"]["signatures"], answer["event"]["signatures"]);
    let db = cluster.db().await;
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM out_of_band_memberships WHERE room_id = $1",
            &[&room.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 1, "the invite is stored once");
    let initial = api.sync(&alice, None, 0).await;
    assert!(initial["rooms"]["invite"][room.as_str()].is_object());
    assert!(
        initial["rooms"]["join"][room.as_str()].is_null(),
        "an invite is not a join"
    );

    // Rejecting it (a leave) takes it out of the invite section.
    api.ok(
        reqwest::Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(room.as_str())),
        &alice,
        Some(json!({})),
    )
    .await;
    sync_until(&cluster, &alice, &mut since, |s| {
        s["rooms"]["leave"][room.as_str()].is_object()
    })
    .await;
    let initial = api.sync(&alice, None, 0).await;
    assert!(
        initial["rooms"]["invite"][room.as_str()].is_null(),
        "a rejected invite is gone: {initial}"
    );
    let leave: Value = db
        .query_one(
            "SELECT e.json::jsonb FROM out_of_band_memberships o JOIN events e USING (event_id)
             WHERE o.room_id = $1 AND e.membership = 'leave'",
            &[&room.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leave["prev_events"], json!([invite.event_id()]));
    assert_eq!(leave["auth_events"], json!([invite.event_id()]));
    assert_eq!(leave["sender"], alice.user_id);
    // Leaving again is a no-op, not an error.
    api.ok(
        reqwest::Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(room.as_str())),
        &alice,
        Some(json!({})),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_invites_get_the_spec_errors() {
    let cluster = TestCluster::start(Spec::federated(1)).await;
    let alice = cluster.register("alice").await;
    let alice_id = UserId::parse(alice.user_id.as_str()).unwrap();
    let remote = FakeRemote::start(&cluster.server_name).await;
    let carol = remote.user("carol");
    let room = remote.create_room(&carol);

    let put = |event: &tessera_events::Pdu, body: Value| {
        let path = format!(
            "/_matrix/federation/v2/invite/{}/{}",
            enc(room.as_str()),
            enc(event.event_id().as_str())
        );
        let remote = &remote;
        async move { errcode(&remote.request("PUT", &path, Some(body)).await) }
    };
    let invite_of = |user: &str| {
        remote.build(
            room.as_str(),
            &carol,
            "m.room.member",
            Some(user),
            json!({ "membership": "invite" }),
        )
    };

    let mut failures = Vec::new();
    let mut expect = |what: &str, got: (u16, String), want: (u16, &str)| {
        if got != (want.0, want.1.to_owned()) {
            failures.push(format!("{what}: got {got:?}, want {want:?}"));
        }
    };

    let nobody = invite_of(&format!("@nobody:{}", cluster.server_name));
    expect(
        "an invite for a user we do not have",
        put(
            &nobody,
            json!({ "room_version": "12", "event": json_of(&nobody) }),
        )
        .await,
        (403, "M_FORBIDDEN"),
    );
    let foreign = invite_of("@dave:elsewhere.example");
    expect(
        "an invite for another server's user",
        put(
            &foreign,
            json!({ "room_version": "12", "event": json_of(&foreign) }),
        )
        .await,
        (400, "M_BAD_JSON"),
    );
    let invite = invite_of(alice_id.as_str());
    let body = |event: Value| json!({ "room_version": "12", "event": event });
    expect(
        "an unsupported room version",
        put(
            &invite,
            json!({ "room_version": "99", "event": json_of(&invite) }),
        )
        .await,
        (400, "M_INCOMPATIBLE_ROOM_VERSION"),
    );
    expect(
        "no room version",
        put(&invite, json!({ "event": json_of(&invite) })).await,
        (400, "M_BAD_JSON"),
    );
    expect(
        "no event",
        put(&invite, json!({ "room_version": "12" })).await,
        (400, "M_BAD_JSON"),
    );
    let mut forged = json_of(&invite);
    let key_id = remote.key.key_id();
    forged["signatures"][remote.server_name.as_str()][key_id.as_str()] = json!("AAAA");
    expect(
        "a bad signature",
        put(&invite, body(forged)).await,
        (403, "M_FORBIDDEN"),
    );
    let mut tampered = json_of(&invite);
    tampered["content"]["reason"] = json!("added after signing");
    expect(
        "a content hash that does not match",
        put(&invite, body(tampered)).await,
        (400, "M_BAD_JSON"),
    );
    let other = invite_of(alice_id.as_str());
    expect(
        "an event ID that is not the path's",
        put(&other, body(json_of(&invite))).await,
        (400, "M_BAD_JSON"),
    );
    let join = remote.build(
        room.as_str(),
        &carol,
        "m.room.topic",
        Some(""),
        json!({ "topic": "not an invite" }),
    );
    expect(
        "an event that is not an invite",
        put(&join, body(json_of(&join))).await,
        (400, "M_BAD_JSON"),
    );
    assert!(failures.is_empty(), "{failures:#?}");

    // None of them reached the invitee.
    let sync = cluster.api().sync(&alice, None, 0).await;
    assert_eq!(sync["rooms"]["invite"], json!({}), "{sync}");
}
