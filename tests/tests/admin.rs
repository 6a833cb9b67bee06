//! The user admin API an operator uses in a spam wave, against real
//! processes: recent signups newest first, and deactivation (no more
//! access, out of every room).

use reqwest::Method;
use serde_json::{Value, json};
use tessera_tests::client::enc;
use tessera_tests::{Spec, TestCluster};

fn names(list: &Value) -> Vec<String> {
    list["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn admins_review_recent_signups_and_deactivate_spammers() {
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let admin = cluster.register_admin("moderator").await;
    let alice = cluster.register("alice").await;
    let spammer = cluster.register("spammer").await;
    let room = api.public_room(&alice).await;
    api.join(&spammer, &room).await;

    // Newest first: the spammer signed up last.
    let list = api
        .ok(
            Method::GET,
            "/_synapse/admin/v2/users?order_by=creation_ts&dir=b&limit=2",
            &admin,
            None,
        )
        .await;
    assert_eq!(
        names(&list),
        vec![spammer.user_id.clone(), alice.user_id.clone()]
    );
    assert_eq!(list["total"], 3);
    assert_eq!(list["next_token"], "2");
    assert!(list["users"][0]["creation_ts"].as_i64().unwrap() > 1_600_000_000_000);
    let rest = api
        .ok(
            Method::GET,
            "/_synapse/admin/v2/users?order_by=creation_ts&dir=b&from=2",
            &admin,
            None,
        )
        .await;
    assert_eq!(names(&rest), vec![admin.user_id.clone()]);
    assert!(rest.get("next_token").is_none());

    // Only admins, and only with valid parameters.
    let (status, body) = api
        .call(
            Method::GET,
            "/_synapse/admin/v2/users",
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN"))
    );
    let (status, body) = api
        .call(
            Method::GET,
            "/_synapse/admin/v2/users?limit=0",
            Some(&admin.token),
            None,
        )
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (400, Some("M_INVALID_PARAM"))
    );

    // Deactivation: the token stops working and the spammer leaves the room.
    let path = format!("/_synapse/admin/v1/deactivate/{}", enc(&spammer.user_id));
    api.ok(Method::POST, &path, &admin, Some(json!({ "erase": false })))
        .await;
    let (status, body) = api
        .call(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(&spammer.token),
            None,
        )
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (401, Some("M_UNKNOWN_TOKEN"))
    );
    let members = api
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)),
            &alice,
            None,
        )
        .await;
    assert!(
        members["joined"].get(&spammer.user_id).is_none(),
        "the deactivated user left: {members}"
    );
    let (status, body) = api
        .call(
            Method::POST,
            "/_matrix/client/v3/login",
            None,
            Some(json!({
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": "spammer" },
                "password": "spammer-password",
            })),
        )
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_USER_DEACTIVATED")),
        "no new logins: {body}"
    );
    // Listed only when asked for.
    let active = api
        .ok(Method::GET, "/_synapse/admin/v2/users", &admin, None)
        .await;
    assert!(!names(&active).contains(&spammer.user_id));
    let all = api
        .ok(
            Method::GET,
            "/_synapse/admin/v2/users?deactivated=true",
            &admin,
            None,
        )
        .await;
    assert!(names(&all).contains(&spammer.user_id));
    // Unknown users are 404.
    let (status, body) = api
        .call(
            Method::POST,
            &format!(
                "/_synapse/admin/v1/deactivate/{}",
                enc(&alice.user_id.replace("@alice", "@nobody"))
            ),
            Some(&admin.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (404, Some("M_NOT_FOUND")),
        "{body}"
    );
}
