//! A minimal Matrix client for tests: raw HTTP with JSON, returning status and
//! body so tests can assert on errors as well as successes.

use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{Value, json};

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    pub base: String,
    pub sync_base: String,
}

#[derive(Clone, Debug)]
pub struct TestUser {
    pub user_id: String,
    pub token: String,
    pub device_id: String,
}

impl Api {
    pub fn new(http: reqwest::Client, base: String, sync_base: String) -> Self {
        Self {
            http,
            base,
            sync_base,
        }
    }

    /// Send a request; `body` `None` sends no body. Returns (status, JSON body).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let base = if path.contains("/sync") {
            &self.sync_base
        } else {
            &self.base
        };
        self.call_raw(
            method,
            &format!("{base}{path}"),
            token,
            body.map(|b| b.to_string().into_bytes()),
        )
        .await
    }

    pub async fn call_raw(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// Like [`Api::call`] but panics unless the status is 200.
    pub async fn ok(
        &self,
        method: Method,
        path: &str,
        user: &TestUser,
        body: Option<Value>,
    ) -> Value {
        let (status, value) = self
            .call(method.clone(), path, Some(&user.token), body)
            .await;
        assert_eq!(status, 200, "{method} {path} as {}: {value}", user.user_id);
        value
    }

    pub async fn create_room(&self, user: &TestUser, body: Value) -> String {
        let value = self
            .ok(
                Method::POST,
                "/_matrix/client/v3/createRoom",
                user,
                Some(body),
            )
            .await;
        value["room_id"].as_str().expect("room_id").to_owned()
    }

    /// A public room (`preset: public_chat`) created by `user`.
    pub async fn public_room(&self, user: &TestUser) -> String {
        self.create_room(user, json!({ "preset": "public_chat" }))
            .await
    }

    pub async fn send_text(&self, user: &TestUser, room: &str, txn: &str, body: &str) -> String {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(room)
        );
        let value = self
            .ok(
                Method::PUT,
                &path,
                user,
                Some(json!({ "msgtype": "m.text", "body": body })),
            )
            .await;
        value["event_id"].as_str().expect("event_id").to_owned()
    }

    pub async fn join(&self, user: &TestUser, room: &str) {
        self.ok(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(room)),
            user,
            Some(json!({})),
        )
        .await;
    }

    /// `member`'s current `m.room.member` content in `room`, read by `user`.
    pub async fn member(&self, user: &TestUser, room: &str, member: &str) -> Value {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
            enc(room),
            enc(member)
        );
        self.ok(Method::GET, &path, user, None).await
    }

    pub async fn invite(&self, user: &TestUser, room: &str, target: &str) {
        self.ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(room)),
            user,
            Some(json!({ "user_id": target })),
        )
        .await;
    }

    /// `count` public rooms created by `creator`, each joined by `members`.
    pub async fn shared_rooms(
        &self,
        creator: &TestUser,
        members: &[&TestUser],
        count: usize,
    ) -> Vec<String> {
        let mut rooms = Vec::with_capacity(count);
        for _ in 0..count {
            let room = self
                .create_room(creator, json!({ "preset": "public_chat" }))
                .await;
            for member in members {
                self.join(member, &room).await;
            }
            rooms.push(room);
        }
        rooms
    }

    /// The `next_batch` of an initial sync: where an incremental sync starts.
    pub async fn initial_token(&self, user: &TestUser) -> String {
        self.sync(user, None, 0).await["next_batch"]
            .as_str()
            .expect("next_batch")
            .to_owned()
    }

    /// One `/sync` call against `base` (a sync-worker URL).
    pub async fn sync_at(
        &self,
        base: &str,
        user: &TestUser,
        since: Option<&str>,
        timeout_ms: u64,
    ) -> Value {
        self.sync_filtered_at(base, user, since, timeout_ms, None)
            .await
    }

    /// [`Api::sync_at`] with an inline filter.
    pub async fn sync_filtered_at(
        &self,
        base: &str,
        user: &TestUser,
        since: Option<&str>,
        timeout_ms: u64,
        filter: Option<&Value>,
    ) -> Value {
        let mut url = format!("{base}/_matrix/client/v3/sync?timeout={timeout_ms}");
        if let Some(filter) = filter {
            url.push_str(&format!("&filter={}", enc(&filter.to_string())));
        }
        if let Some(since) = since {
            url.push_str(&format!("&since={since}"));
        }
        let (status, value) = self
            .call_raw(Method::GET, &url, Some(&user.token), None)
            .await;
        assert_eq!(status, 200, "sync as {}: {value}", user.user_id);
        value
    }

    /// The bodies of a room's messages, oldest first (forward `/messages`
    /// from the start, up to 1,000 events).
    pub async fn message_bodies(&self, user: &TestUser, room: &str) -> Vec<String> {
        let history = self
            .ok(
                Method::GET,
                &format!(
                    "/_matrix/client/v3/rooms/{}/messages?dir=f&limit=1000",
                    enc(room)
                ),
                user,
                None,
            )
            .await;
        bodies(history["chunk"].as_array().expect("chunk"))
    }

    pub async fn sync(&self, user: &TestUser, since: Option<&str>, timeout_ms: u64) -> Value {
        self.sync_at(&self.sync_base.clone(), user, since, timeout_ms)
            .await
    }
}

/// The bodies of the `m.room.message` events among `events`, in order.
pub fn bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A `createRoom` body for a private room whose join rule admits the members
/// of `allowed` (`restricted`).
pub fn restricted_room(allowed: &str) -> Value {
    json!({
        "preset": "private_chat",
        "initial_state": [{
            "type": "m.room.join_rules",
            "state_key": "",
            "content": {
                "join_rule": "restricted",
                "allow": [{ "type": "m.room_membership", "room_id": allowed }],
            },
        }],
    })
}

/// Percent-encode a path segment (room IDs and aliases carry `!`, `#`, `:`).
pub fn enc(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Timeline events of a room in a sync response, as (type, body) pairs.
pub fn timeline(sync: &Value, room: &str) -> Vec<Value> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

pub async fn register(
    http: &reqwest::Client,
    base: &str,
    secret: &str,
    name: &str,
    admin: bool,
) -> TestUser {
    let url = format!("{base}/_synapse/admin/v1/register");
    let nonce: Value = http
        .get(&url)
        .send()
        .await
        .expect("nonce")
        .json()
        .await
        .expect("nonce json");
    let nonce = nonce["nonce"].as_str().expect("nonce").to_owned();
    let password = format!("{name}-password");
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("hmac");
    mac.update(nonce.as_bytes());
    mac.update(b"\0");
    mac.update(name.as_bytes());
    mac.update(b"\0");
    mac.update(password.as_bytes());
    mac.update(b"\0");
    mac.update(if admin {
        b"admin" as &[u8]
    } else {
        b"notadmin"
    });
    let body = json!({ "nonce": nonce, "username": name, "password": password, "admin": admin, "mac": hex::encode(mac.finalize().into_bytes()) });
    let response = http.post(&url).json(&body).send().await.expect("register");
    let status = response.status();
    let value: Value = response.json().await.expect("register json");
    assert!(status.is_success(), "register {name}: {value}");
    TestUser {
        user_id: value["user_id"].as_str().expect("user_id").to_owned(),
        token: value["access_token"].as_str().expect("token").to_owned(),
        device_id: value["device_id"].as_str().expect("device").to_owned(),
    }
}
