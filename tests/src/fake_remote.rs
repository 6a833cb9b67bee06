//! A fake remote homeserver for federation tests and benchmarks: its own
//! signing key and server name (`127.0.0.1:<port>`), an HTTPS server that
//! answers what our servers ask of it (keys, events, auth chains, missing
//! events, state), and a client that signs requests to our federation API.
//! It builds its events with the same event logic Tessera uses, so they are
//! correctly hashed and signed, or deliberately broken when a test asks.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post, put};
use serde_json::{Value, json};
use tessera_events::Pdu;
use tessera_events::build::{EventTemplate, Placement, build_event};
use tessera_events::keys::SigningKey;
use tessera_events::room_state::RoomState;
use tessera_events::ruma::{
    CanonicalJsonObject, EventId, OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId,
    RoomVersionId, UserId,
};
use tessera_events::state_map::StateIds;
use tessera_federation::{FederationClient, FederationError};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Shared {
    events: HashMap<OwnedEventId, Arc<Pdu>>,
    /// (Persistent maps: events built on the same state share it, so a
    /// flood into a room with a large state does not copy it per event.)
    state_before: HashMap<OwnedEventId, StateIds>,
    /// Requests it received: "METHOD path".
    requests: Vec<String>,
}

pub struct FakeRemote {
    pub server_name: OwnedServerName,
    pub key: Arc<SigningKey>,
    client: FederationClient,
    target: OwnedServerName,
    shared: Arc<Mutex<Shared>>,
    rooms: Mutex<HashMap<OwnedRoomId, RoomState>>,
    stop: CancellationToken,
}

impl Drop for FakeRemote {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn pdu_value(pdu: &Pdu) -> Value {
    serde_json::from_str(pdu.canonical_json()).expect("canonical JSON is JSON")
}

impl FakeRemote {
    /// Start serving on a free loopback port; `target` is our server's name.
    pub async fn start(target: &str) -> Arc<FakeRemote> {
        tessera_federation::install_tls_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server_name =
            OwnedServerName::try_from(format!("127.0.0.1:{port}")).expect("server name");
        let (document, version) = SigningKey::generate();
        let key = Arc::new(SigningKey::from_document(&document, &version).expect("key"));
        let client = FederationClient::new(server_name.clone(), Arc::clone(&key), false);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = CancellationToken::new();
        let remote = Arc::new(FakeRemote {
            server_name: server_name.clone(),
            key: Arc::clone(&key),
            client,
            target: OwnedServerName::try_from(target.to_owned()).expect("target"),
            shared: Arc::clone(&shared),
            rooms: Mutex::new(HashMap::new()),
            stop: stop.clone(),
        });
        let routes = Router::new()
            .route("/_matrix/key/v2/server", get(keys))
            .route("/_matrix/federation/v1/event/{event}", get(event))
            .route(
                "/_matrix/federation/v1/event_auth/{room}/{event}",
                get(event_auth),
            )
            .route(
                "/_matrix/federation/v1/get_missing_events/{room}",
                post(missing),
            )
            .route("/_matrix/federation/v1/state_ids/{room}", get(state_ids))
            .route("/_matrix/federation/v1/state/{room}", get(state))
            .route("/_matrix/federation/v1/backfill/{room}", get(backfill))
            .route(
                "/_matrix/federation/v1/send/{txn}",
                put(|| async { Json(json!({ "pdus": {} })) }),
            )
            .fallback(|| async {
                (
                    axum::http::StatusCode::NOT_FOUND,
                    Json(json!({ "errcode": "M_UNRECOGNIZED" })),
                )
            })
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&shared),
                record,
            ))
            .with_state(Arc::clone(&remote) as Arc<FakeRemote>);
        let (cert, key_pem) = crate::self_signed();
        let acceptor =
            tessera_federation::tls::acceptor_from_pem(cert.as_bytes(), key_pem.as_bytes())
                .expect("acceptor");
        tokio::spawn(async move {
            tessera_federation::tls::serve(listener, acceptor, routes, stop.cancelled_owned()).await
        });
        remote
    }

    pub fn user(&self, localpart: &str) -> OwnedUserId {
        UserId::parse(format!("@{localpart}:{}", self.server_name)).expect("user ID")
    }

    /// Requests this server received whose "METHOD path" contains `fragment`.
    pub fn requests_matching(&self, fragment: &str) -> usize {
        self.shared
            .lock()
            .expect("shared")
            .requests
            .iter()
            .filter(|r| r.contains(fragment))
            .count()
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, FederationError> {
        match (method, body) {
            ("GET", _) => self.client.get(&self.target, path).await,
            ("PUT", Some(body)) => self.client.put(&self.target, path, &body).await,
            (_, body) => {
                self.client
                    .post(&self.target, path, &body.unwrap_or(json!({})))
                    .await
            }
        }
    }

    fn remember(&self, pdu: &Arc<Pdu>, state_before: StateIds) {
        let mut shared = self.shared.lock().expect("shared");
        shared
            .state_before
            .insert(pdu.event_id().to_owned(), state_before);
        shared
            .events
            .insert(pdu.event_id().to_owned(), Arc::clone(pdu));
    }

    /// Join a room on our server as `user` (make_join, sign, send_join v2),
    /// then follow the room's state from the answer.
    pub async fn join(&self, room_id: &str, user: &UserId) -> Result<(), FederationError> {
        self.join_with_query(room_id, user, "").await.map(|_| ())
    }

    /// [`FakeRemote::join`] with a query string for send_join (such as
    /// `?omit_members=true`); returns the send_join answer.
    pub async fn join_with_query(
        &self,
        room_id: &str,
        user: &UserId,
        send_join_query: &str,
    ) -> Result<Value, FederationError> {
        let (version, template) = self.make_join(room_id, user).await?;
        self.send_join(room_id, version, template, send_join_query)
            .await
    }

    /// The make_join half of a join: the room's version and the template.
    pub async fn make_join(
        &self,
        room_id: &str,
        user: &UserId,
    ) -> Result<(RoomVersionId, CanonicalJsonObject), FederationError> {
        let path = format!(
            "/_matrix/federation/v1/make_join/{}/{}?ver=10&ver=11&ver=12",
            enc(room_id),
            enc(user.as_str())
        );
        let made = self.call("GET", &path, None).await?;
        let version = RoomVersionId::try_from(made["room_version"].as_str().unwrap_or("12"))
            .expect("version");
        let template = serde_json::from_value(made["event"].clone()).expect("template");
        Ok((version, template))
    }

    /// The send_join half of a join: sign `template` (as made, or altered by
    /// a test) and send it; on success, follow the room from the answer.
    pub async fn send_join(
        &self,
        room_id: &str,
        version: RoomVersionId,
        mut template: CanonicalJsonObject,
        send_join_query: &str,
    ) -> Result<Value, FederationError> {
        let rules = version.rules().expect("rules");
        template.insert(
            "origin_server_ts".into(),
            tessera_events::ruma::CanonicalJsonValue::Integer(
                tessera_federation::now_ms().try_into().unwrap(),
            ),
        );
        template.remove("origin");
        tessera_events::ruma::signatures::hash_and_sign_event(
            self.server_name.as_str(),
            self.key.pair(),
            &mut template,
            &rules.redaction,
        )
        .expect("sign");
        let room = RoomId::parse(room_id).expect("room ID");
        let join = Arc::new(Pdu::from_json(template, &rules, Some(&room)).expect("join PDU"));
        let path = format!(
            "/_matrix/federation/v2/send_join/{}/{}{send_join_query}",
            enc(room_id),
            enc(join.event_id().as_str())
        );
        let answer = self.call("PUT", &path, Some(pdu_value(&join))).await?;
        let parse = |v: &Value| -> Option<Arc<Pdu>> {
            let object: CanonicalJsonObject = serde_json::from_value(v.clone()).ok()?;
            Pdu::from_json(object, &rules, Some(&room))
                .ok()
                .map(Arc::new)
        };
        let state: Vec<Arc<Pdu>> = answer["state"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(parse)
            .collect();
        for pdu in answer["auth_chain"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(parse)
            .chain(state.iter().cloned())
        {
            self.shared
                .lock()
                .expect("shared")
                .events
                .insert(pdu.event_id().to_owned(), pdu);
        }
        let before: StateIds = state
            .iter()
            .filter_map(|p| {
                Some((
                    tessera_events::state_map::key_of(p)?,
                    p.event_id().to_owned(),
                ))
            })
            .collect();
        self.remember(&join, before);
        let mut room_state = RoomState::from_parts(
            room.clone(),
            version,
            state,
            vec![join.event_id().to_owned()],
            join.depth(),
            None,
        )
        .expect("room state");
        room_state.apply(Arc::clone(&join));
        self.rooms.lock().expect("rooms").insert(room, room_state);
        Ok(answer)
    }

    /// Create a room hosted on this server (room version 12), with `creator`
    /// joined and invite-only join rules; returns its ID.
    pub fn create_room(&self, creator: &UserId) -> OwnedRoomId {
        let version = RoomVersionId::V12;
        let rules = version.rules().expect("rules");
        let create = tessera_events::build::build_create_event(
            &template(
                creator,
                "m.room.create",
                Some(""),
                json!({ "room_version": "12" }),
            ),
            &rules,
            None,
            &self.key,
            &self.server_name,
        )
        .expect("create event");
        let create = Arc::new(create);
        let room_id = create.room_id().to_owned();
        let state = RoomState::from_create(Arc::clone(&create), version).expect("room state");
        self.remember(&create, StateIds::default());
        self.rooms
            .lock()
            .expect("rooms")
            .insert(room_id.clone(), state);
        let room = room_id.as_str();
        self.build(
            room,
            creator,
            "m.room.member",
            Some(creator.as_str()),
            json!({ "membership": "join" }),
        );
        self.build(
            room,
            creator,
            "m.room.join_rules",
            Some(""),
            json!({ "join_rule": "invite" }),
        );
        self.build(
            room,
            creator,
            "m.room.name",
            Some(""),
            json!({ "name": "Far away" }),
        );
        room_id
    }

    /// Send `invitee` (a user of the target server) an invite to a room of
    /// this server through the invite v2 API; returns the invite built and
    /// the answer. The invite is applied to this server's view of the room.
    pub async fn invite(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        invitee: &UserId,
    ) -> (Arc<Pdu>, Result<Value, FederationError>) {
        let invite = self.build(
            room_id.as_str(),
            sender,
            "m.room.member",
            Some(invitee.as_str()),
            json!({ "membership": "invite" }),
        );
        let stripped: Vec<Value> = {
            let rooms = self.rooms.lock().expect("rooms");
            let state = rooms.get(room_id).expect("a room of ours");
            ["m.room.create", "m.room.join_rules", "m.room.name"]
                .iter()
                .filter_map(|kind| state.get(&(*kind).into(), ""))
                .map(|pdu| tessera_events::client::stripped_state(pdu))
                .collect()
        };
        let body = json!({
            "room_version": "12",
            "event": pdu_value(&invite),
            "invite_room_state": stripped,
        });
        let answer = self
            .call(
                "PUT",
                &format!(
                    "/_matrix/federation/v2/invite/{}/{}",
                    enc(room_id.as_str()),
                    enc(invite.event_id().as_str())
                ),
                Some(body),
            )
            .await;
        (invite, answer)
    }

    /// A new event in a joined room, checked against the room's auth rules,
    /// signed by this server, applied to its view of the room.
    pub fn build(
        &self,
        room_id: &str,
        sender: &UserId,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
    ) -> Arc<Pdu> {
        let room = RoomId::parse(room_id).expect("room ID");
        let mut rooms = self.rooms.lock().expect("rooms");
        let state = rooms.get_mut(&room).expect("a joined room");
        let template = template(sender, kind, state_key, content);
        let before = state.state_map();
        let pdu = state
            .create_event(&template, &self.key, &self.server_name)
            .expect("event allowed by the auth rules");
        state.apply(Arc::clone(&pdu));
        drop(rooms);
        self.remember(&pdu, before);
        pdu
    }

    /// `count` users of this server (`@member-<i>`) joining a public room,
    /// one after the other, as [`Self::build`] makes them.
    pub fn member_joins(&self, room_id: &str, count: usize) -> Vec<Arc<Pdu>> {
        (0..count)
            .map(|i| {
                let member = self.user(&format!("member-{i}"));
                self.build(
                    room_id,
                    &member,
                    "m.room.member",
                    Some(member.as_str()),
                    json!({ "membership": "join" }),
                )
            })
            .collect()
    }

    /// A text message in a joined room, as [`Self::build`] makes it.
    pub fn text(&self, room_id: &str, sender: &UserId, body: &str) -> Arc<Pdu> {
        self.build(
            room_id,
            sender,
            "m.room.message",
            None,
            json!({ "msgtype": "m.text", "body": body }),
        )
    }

    /// A new event that skips the auth rules (for events that must fail them),
    /// built on the room's current extremities without applying it.
    pub fn build_unchecked(
        &self,
        room_id: &str,
        sender: &UserId,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
    ) -> Arc<Pdu> {
        self.build_after(room_id, sender, kind, state_key, content, None)
    }

    /// A text message that skips the auth rules, as [`Self::build_unchecked`]
    /// makes it.
    pub fn text_unchecked(&self, room_id: &str, sender: &UserId, body: &str) -> Arc<Pdu> {
        self.build_unchecked(
            room_id,
            sender,
            "m.room.message",
            None,
            json!({ "msgtype": "m.text", "body": body }),
        )
    }

    /// As [`Self::build_unchecked`], but on the given prev_events (and their
    /// depth) when given: auth events still come from this server's view of
    /// the room, which may be older than those prev_events.
    pub fn build_after(
        &self,
        room_id: &str,
        sender: &UserId,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
        after: Option<(Vec<OwnedEventId>, u64)>,
    ) -> Arc<Pdu> {
        let room = RoomId::parse(room_id).expect("room ID");
        let rooms = self.rooms.lock().expect("rooms");
        let state = rooms.get(&room).expect("a joined room");
        let (prev_events, prev_depth) = match &after {
            Some((prevs, depth)) => (prevs.as_slice(), *depth),
            None => (state.extremities(), state.depth()),
        };
        let placement = Placement {
            room_id: &room,
            rules: state.rules(),
            prev_events,
            prev_depth,
        };
        let pdu = build_event(
            &template(sender, kind, state_key, content),
            &placement,
            |k, s| state.get(k, s).map(|p| p.event_id().to_owned()),
            &self.key,
            &self.server_name,
        )
        .expect("built");
        let before = state.state_map();
        drop(rooms);
        let pdu = Arc::new(pdu);
        self.remember(&pdu, before);
        pdu
    }

    /// The room's current head, for building forks.
    pub fn extremities(&self, room_id: &str) -> Vec<OwnedEventId> {
        let room = RoomId::parse(room_id).expect("room ID");
        self.rooms
            .lock()
            .expect("rooms")
            .get(&room)
            .expect("joined")
            .extremities()
            .to_vec()
    }

    /// Send a transaction; returns the HTTP status and body.
    pub async fn send(&self, txn_id: &str, pdus: &[Value], edus: &[Value]) -> (u16, Value) {
        let body = json!({
            "origin": self.server_name,
            "origin_server_ts": tessera_federation::now_ms(),
            "pdus": pdus,
            "edus": edus,
        });
        match self
            .call(
                "PUT",
                &format!("/_matrix/federation/v1/send/{}", enc(txn_id)),
                Some(body),
            )
            .await
        {
            Ok(value) => (200, value),
            Err(FederationError::Status { status, body, .. }) => (
                status,
                serde_json::from_str(&body).unwrap_or(Value::String(body)),
            ),
            // No answer at all (connection refused, timeout): status 0, so
            // that callers can retry as a real sender would.
            Err(other) => (0, json!({ "error": other.to_string() })),
        }
    }

    /// A signed request of any shape to our federation API.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, FederationError> {
        self.call(method, path, body).await
    }
}

/// The PDU as sent over federation.
pub fn json_of(pdu: &Pdu) -> Value {
    pdu_value(pdu)
}

fn template(sender: &UserId, kind: &str, state_key: Option<&str>, content: Value) -> EventTemplate {
    EventTemplate {
        kind: kind.to_owned(),
        state_key: state_key.map(str::to_owned),
        content,
        sender: sender.to_owned(),
        origin_server_ts: tessera_federation::now_ms(),
        redacts: None,
    }
}

fn enc(segment: &str) -> String {
    crate::client::enc(segment)
}

async fn record(
    State(shared): State<Arc<Mutex<Shared>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let line = format!("{} {}", request.method(), request.uri().path());
    shared.lock().expect("shared").requests.push(line);
    next.run(request).await
}

async fn keys(State(remote): State<Arc<FakeRemote>>) -> Json<Value> {
    Json(tessera_federation::keys::server_keys_document(
        &remote.server_name,
        &remote.key,
        tessera_federation::now_ms() + 3_600_000,
    ))
}

fn find(remote: &FakeRemote, id: &str) -> Option<Arc<Pdu>> {
    let id = EventId::parse(id).ok()?;
    remote
        .shared
        .lock()
        .expect("shared")
        .events
        .get(&id)
        .cloned()
}

async fn event(
    State(remote): State<Arc<FakeRemote>>,
    Path(event): Path<String>,
) -> Result<Json<Value>, axum::http::StatusCode> {
    let pdu = find(&remote, &event).ok_or(axum::http::StatusCode::NOT_FOUND)?;
    Ok(Json(
        json!({ "origin": remote.server_name, "origin_server_ts": tessera_federation::now_ms(), "pdus": [pdu_value(&pdu)] }),
    ))
}

fn auth_chain_of(remote: &FakeRemote, roots: &[Arc<Pdu>]) -> Vec<Arc<Pdu>> {
    let shared = remote.shared.lock().expect("shared");
    let mut seen = HashSet::new();
    let mut todo: Vec<OwnedEventId> = roots
        .iter()
        .flat_map(|p| p.auth_events().to_vec())
        .collect();
    let mut out = Vec::new();
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        if let Some(pdu) = shared.events.get(&id) {
            todo.extend(pdu.auth_events().iter().cloned());
            out.push(Arc::clone(pdu));
        }
    }
    out
}

async fn event_auth(
    State(remote): State<Arc<FakeRemote>>,
    Path((_, event)): Path<(String, String)>,
) -> Result<Json<Value>, axum::http::StatusCode> {
    let pdu = find(&remote, &event).ok_or(axum::http::StatusCode::NOT_FOUND)?;
    let chain: Vec<Value> = auth_chain_of(&remote, &[pdu])
        .iter()
        .map(|p| pdu_value(p))
        .collect();
    Ok(Json(json!({ "auth_chain": chain })))
}

/// Up to `limit` events reached from `todo` by following prev_events,
/// skipping `seen`.
fn walk_back(
    shared: &Shared,
    mut todo: Vec<OwnedEventId>,
    seen: &mut HashSet<OwnedEventId>,
    limit: usize,
) -> Vec<Arc<Pdu>> {
    let mut out: Vec<Arc<Pdu>> = Vec::new();
    while let Some(id) = todo.pop() {
        if out.len() >= limit || !seen.insert(id.clone()) {
            continue;
        }
        if let Some(pdu) = shared.events.get(&id) {
            todo.extend(pdu.prev_events().iter().cloned());
            out.push(Arc::clone(pdu));
        }
    }
    out
}

async fn missing(State(remote): State<Arc<FakeRemote>>, Json(body): Json<Value>) -> Json<Value> {
    let ids = |field: &str| -> Vec<OwnedEventId> {
        body[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| EventId::parse(v.as_str()?).ok())
            .collect()
    };
    let earliest: HashSet<OwnedEventId> = ids("earliest_events").into_iter().collect();
    let limit = body["limit"].as_u64().unwrap_or(10) as usize;
    let shared = remote.shared.lock().expect("shared");
    let mut seen = earliest.clone();
    let todo: Vec<OwnedEventId> = ids("latest_events")
        .iter()
        .filter_map(|l| shared.events.get(l))
        .flat_map(|p| p.prev_events().to_vec())
        .collect();
    let mut out = walk_back(&shared, todo, &mut seen, limit);
    out.sort_by_key(|p| p.depth());
    Json(json!({ "events": out.iter().map(|p| pdu_value(p)).collect::<Vec<_>>() }))
}

#[derive(serde::Deserialize)]
struct AtEvent {
    event_id: String,
}

/// The state before an event and that state's auth chain.
struct StateAt {
    state: Vec<Arc<Pdu>>,
    auth_chain: Vec<Arc<Pdu>>,
}

fn state_at(remote: &FakeRemote, event_id: &str) -> Option<StateAt> {
    let id = EventId::parse(event_id).ok()?;
    let events: Vec<Arc<Pdu>> = {
        let shared = remote.shared.lock().expect("shared");
        let state = shared.state_before.get(&id)?;
        state
            .values()
            .filter_map(|e| shared.events.get(e).cloned())
            .collect()
    };
    let auth_chain = auth_chain_of(remote, &events);
    Some(StateAt {
        state: events,
        auth_chain,
    })
}

async fn state_ids(
    State(remote): State<Arc<FakeRemote>>,
    Query(at): Query<AtEvent>,
) -> Result<Json<Value>, axum::http::StatusCode> {
    let at = state_at(&remote, &at.event_id).ok_or(axum::http::StatusCode::NOT_FOUND)?;
    let ids = |events: &[Arc<Pdu>]| -> Vec<String> {
        events.iter().map(|p| p.event_id().to_string()).collect()
    };
    Ok(Json(
        json!({ "pdu_ids": ids(&at.state), "auth_chain_ids": ids(&at.auth_chain) }),
    ))
}

async fn state(
    State(remote): State<Arc<FakeRemote>>,
    Query(at): Query<AtEvent>,
) -> Result<Json<Value>, axum::http::StatusCode> {
    let at = state_at(&remote, &at.event_id).ok_or(axum::http::StatusCode::NOT_FOUND)?;
    let values =
        |events: &[Arc<Pdu>]| -> Vec<Value> { events.iter().map(|p| pdu_value(p)).collect() };
    Ok(Json(
        json!({ "pdus": values(&at.state), "auth_chain": values(&at.auth_chain) }),
    ))
}

/// Events before the given ones, newest first, following prev_events.
async fn backfill(
    State(remote): State<Arc<FakeRemote>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Json<Value> {
    let mut from = Vec::new();
    let mut limit = 10usize;
    let url = reqwest::Url::parse(&format!("http://x/?{}", query.unwrap_or_default()))
        .expect("a query string");
    for (key, value) in url.query_pairs() {
        match key.as_ref() {
            "v" => from.extend(EventId::parse(value.as_ref()).ok()),
            "limit" => limit = value.parse().unwrap_or(10).min(100),
            _ => {}
        }
    }
    let shared = remote.shared.lock().expect("shared");
    let mut seen = HashSet::new();
    let todo = from;
    let mut out = walk_back(&shared, todo, &mut seen, limit);
    out.sort_by_key(|p| std::cmp::Reverse(p.depth()));
    Json(json!({
        "origin": remote.server_name,
        "origin_server_ts": tessera_federation::now_ms(),
        "pdus": out.iter().map(|p| pdu_value(p)).collect::<Vec<_>>(),
    }))
}
