//! Joins into rooms whose join rule is `restricted`: members of an allowed
//! room join without an invite, vouched for by a member of ours
//! (`join_authorised_via_users_server`), over federation (a fake remote
//! server, test code) and over the client API; everyone else is refused with
//! the spec's errors.

use reqwest::Method;
use serde_json::{Value, json};
use tessera_events::ruma::CanonicalJsonValue;
use tessera_federation::FederationError;
use tessera_tests::client::{enc, restricted_room};
use tessera_tests::fake_remote::FakeRemote;
use tessera_tests::{Spec, TestCluster, TestUser};

/// A room of `creator`'s, in room version `version`, whose join rule admits
/// the members of `allowed`.
async fn create_restricted_room(
    cluster: &TestCluster,
    creator: &TestUser,
    version: &str,
    allowed: &str,
    extra: Value,
) -> String {
    let mut body = restricted_room(allowed);
    body["room_version"] = json!(version);
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    cluster.api().create_room(creator, body).await
}

/// The errcode and status of a refused federation request.
fn refusal(result: Result<impl std::fmt::Debug, FederationError>) -> (u16, String) {
    match result {
        Err(FederationError::Status { status, body, .. }) => {
            let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            (
                status,
                body["errcode"].as_str().unwrap_or_default().to_owned(),
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A federated cluster where alice has a public room (the space).
async fn federated_with_a_space() -> (TestCluster, TestUser, String) {
    let cluster = TestCluster::start(Spec::federated(1)).await;
    let alice = cluster.register("alice").await;
    let space = cluster.api().public_room(&alice).await;
    (cluster, alice, space)
}

#[tokio::test(flavor = "multi_thread")]
async fn members_of_an_allowed_room_join_over_federation_vouched_for_by_us() {
    let (cluster, alice, space) = federated_with_a_space().await;
    let room = create_restricted_room(&cluster, &alice, "12", &space, json!({})).await;
    let remote = FakeRemote::start(&cluster.server_name).await;
    let (bob, carol) = (remote.user("bob"), remote.user("carol"));
    let ours = cluster.server_name.clone();

    // bob is in no allowed room yet: we are in the space, so we can tell.
    assert_eq!(
        refusal(remote.make_join(&room, &bob).await),
        (403, "M_FORBIDDEN".to_owned())
    );
    remote
        .join(&space, &bob)
        .await
        .expect("bob joins the space");

    let (version, template) = remote.make_join(&room, &bob).await.expect("make_join");
    let Some(CanonicalJsonValue::Object(content)) = template.get("content") else {
        panic!("no content in {template:?}");
    };
    assert_eq!(
        content.get("join_authorised_via_users_server"),
        Some(&CanonicalJsonValue::String(alice.user_id.clone())),
        "alice, the only member here, vouches"
    );

    // carol, in no allowed room, reuses bob's template with alice's vouch:
    // the authorization rules alone would accept it (alice may invite), so
    // our own judgement at send_join is what refuses it.
    let mut forged = template.clone();
    for field in ["sender", "state_key"] {
        forged.insert(field.into(), CanonicalJsonValue::String(carol.to_string()));
    }
    assert_eq!(
        refusal(remote.send_join(&room, version.clone(), forged, "").await),
        (403, "M_FORBIDDEN".to_owned())
    );

    let answer = remote
        .send_join(&room, version, template, "")
        .await
        .expect("send_join");
    let signatures = &answer["event"]["signatures"];
    assert!(
        signatures[&ours].is_object() && signatures[remote.server_name.as_str()].is_object(),
        "the join comes back signed by both servers: {signatures}"
    );
    let store = cluster.store().await;
    assert_eq!(
        store
            .membership(&room, bob.as_str())
            .await
            .unwrap()
            .as_deref(),
        Some("join")
    );
    assert_eq!(
        store.membership(&room, carol.as_str()).await.unwrap(),
        None,
        "the forged join left no trace"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn restricted_joins_we_cannot_vouch_for_get_the_specs_errors() {
    let (cluster, alice, space) = federated_with_a_space().await;
    let remote = FakeRemote::start(&cluster.server_name).await;
    let bob = remote.user("bob");
    remote
        .join(&space, &bob)
        .await
        .expect("bob joins the space");

    // A room only members of a room we are not in may join.
    let elsewhere =
        create_restricted_room(&cluster, &alice, "12", "!far:elsewhere.test", json!({})).await;
    assert_eq!(
        refusal(remote.make_join(&elsewhere, &bob).await),
        (400, "M_UNABLE_TO_AUTHORISE_JOIN".to_owned())
    );

    // A room where no member of ours may invite (version 10: the creator's
    // power is what the power levels say).
    let no_inviter = create_restricted_room(
        &cluster,
        &alice,
        "10",
        &space,
        json!({ "power_level_content_override": {
            "users": { alice.user_id.as_str(): 50 },
            "events": {},
            "invite": 100,
        }}),
    )
    .await;
    assert_eq!(
        refusal(remote.make_join(&no_inviter, &bob).await),
        (400, "M_UNABLE_TO_GRANT_JOIN".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn local_members_of_an_allowed_room_join_without_an_invite() {
    let cluster = TestCluster::start(Spec::default()).await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let dan = cluster.register("dan").await;
    let space = api.public_room(&alice).await;
    let room = create_restricted_room(&cluster, &alice, "10", &space, json!({})).await;
    let join = format!("/_matrix/client/v3/join/{}", enc(&room));

    let (status, body) = api
        .call(Method::POST, &join, Some(&dan.token), Some(json!({})))
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{body}"
    );

    api.join(&dan, &space).await;
    api.join(&dan, &room).await;
    let member = api.member(&dan, &room, &dan.user_id).await;
    assert_eq!(member["membership"], "join");
    assert_eq!(
        member["join_authorised_via_users_server"],
        alice.user_id.as_str()
    );
}
