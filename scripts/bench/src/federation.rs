//! `tessera-federation-bench`: inbound federation under a flood, against
//! Tessera or Synapse, with fake remote homeservers on loopback.
//!
//! Fake remote servers (built on `tessera_tests::fake_remote`: their own
//! keys, TLS, answering what the target asks) join rooms a local user
//! created: one (or `--flood-origins` of them) floods a busy room with N
//! PDUs (50 a transaction, four in flight, retrying on 429); ten others, one per quiet room, write one
//! message every `--quiet-interval-ms` round-robin into the 10 quiet rooms,
//! first alone (idle), then during the flood (`--floods N`: N times over,
//! figures pooled). Two local users follow `/sync`: alice, in every
//! room, and bob, in the quiet rooms only. Measured:
//!
//! - quiet-room latency (the remote's `PUT /send` start to the `/sync`
//!   response containing it), idle and during the flood: for bob, what a
//!   busy room does to the users of other rooms; for alice, who also
//!   receives the flood, what it does to a user in both;
//! - the busy room's end-to-end ingest rate (flood events visible per second
//!   in `/sync`, overall and per quarter of the flood);
//! - how many flood events became visible (counted with `/messages` at the end);
//! - quiet messages lost: those sent in a phase that either alice or bob had
//!   not seen in `/sync` when the tool stopped (each counted once);
//! - the target's resident memory before and during the flood;
//! - storage flush stalls (`tessera_bench::flush_probe`) in each phase, and
//!   the quiet latencies again without the messages that were on their way
//!   during one: a diagnosis of the disk, beside the figures, never instead.
//!
//! Run through `scripts/bench/federation`, which starts both targets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use tessera_bench::flush_probe::{self, FlushProbe};
use tessera_bench::{peak_rss_mib, percentile, rss_mib};
use tessera_events::ruma::OwnedUserId;
use tessera_tests::client::enc;
use tessera_tests::fake_remote::{FakeRemote, json_of};
use tessera_tests::{FederationSpec, Spec, TestCluster, TestUser};

#[derive(Parser, Debug, Clone)]
struct Args {
    /// `tessera` starts a cluster of release binaries; `synapse` uses a running Synapse.
    #[arg(long, default_value = "tessera")]
    target: String,
    /// Flood size.
    #[arg(long, default_value_t = 20_000)]
    flood: usize,
    /// Seconds of quiet traffic before the flood.
    #[arg(long, default_value_t = 20)]
    idle_seconds: u64,
    /// Room-workers of the Tessera cluster.
    #[arg(long, default_value_t = 2)]
    room_workers: usize,
    /// For a running target: its client API base URL, server name, shared secret and pid.
    #[arg(long)]
    client_url: Option<String>,
    #[arg(long)]
    server_name: Option<String>,
    #[arg(long)]
    shared_secret: Option<String>,
    #[arg(long)]
    pid: Vec<u32>,
    /// The Tessera cluster's per-origin PDU rate limit and burst (default:
    /// the shipped configuration's).
    #[arg(long, default_value_t = tessera_runtime::config::FederationConfig::default().origin_pdus_per_second)]
    origin_rate: u64,
    #[arg(long, default_value_t = tessera_runtime::config::FederationConfig::default().origin_pdu_burst)]
    origin_burst: u64,
    /// Give up waiting for the flood to become visible after this long without progress.
    #[arg(long, default_value_t = 60)]
    stall_seconds: u64,
    /// Milliseconds between two quiet messages (round-robin over the quiet rooms).
    #[arg(long, default_value_t = 50)]
    quiet_interval_ms: u64,
    /// Sync as Element does, with lazy-loaded members (`room.state.lazy_load_members`).
    #[arg(long)]
    lazy_load_members: bool,
    /// The Tessera cluster's `federation.staged_batch` (default: the shipped one).
    #[arg(long, default_value_t = tessera_runtime::config::FederationConfig::default().staged_batch)]
    staged_batch: i64,
    /// Write every quiet message's timing to this CSV file: when it was sent
    /// (ms from the flood's start, negative before it), when its transaction
    /// was answered and when bob and alice saw it (ms after sending).
    #[arg(long)]
    samples_csv: Option<std::path::PathBuf>,
    /// Before the idle phase, this many users of the flooding server join
    /// the busy room (in order, 50 a transaction, one at a time), so the
    /// flood lands in a room with a large state.
    #[arg(long, default_value_t = 0)]
    busy_room_members: usize,
    /// After the busy room's members joined, this many new servers join it
    /// one after another with `send_join?omit_members=true` (as Synapse
    /// does); each join's time and the federation-receiver's peak RSS before
    /// and after them are printed.
    #[arg(long, default_value_t = 0)]
    omit_members_joins: usize,
    /// How many remote servers flood the busy room together, event i coming
    /// from server i mod this, each building on its own latest event: the
    /// room has that many forward extremities throughout, as when a spam
    /// wave comes from several servers at once.
    #[arg(long, default_value_t = 1)]
    flood_origins: usize,
    /// Before every M-th flood message, its server has a new user join the
    /// busy room (`@flood-<i>`), so the flood changes the room's state too
    /// (0: messages only). The joins come on top of the `--flood` messages.
    #[arg(long, default_value_t = 0)]
    flood_join_every: usize,
    /// Where the storage flush probe writes its file: a directory on the
    /// database's disk (default: the temporary directory).
    #[arg(long)]
    flush_probe_dir: Option<std::path::PathBuf>,
    /// Flood the busy room this many times, each flood of `--flood` events
    /// after `--idle-seconds` of quiet traffic alone; every figure is then
    /// over all of them (their quiet samples pooled), so one run gives a p99
    /// during the flood from several hundred messages rather than ~100.
    #[arg(long, default_value_t = 1)]
    floods: usize,
    /// This many more local users join the busy room and follow `/sync`
    /// throughout, as a room's local members do (each syncing again as soon
    /// as it has an answer); not timed.
    #[arg(long, default_value_t = 0)]
    busy_room_local_users: usize,
    /// The Tessera cluster's `sync_worker.busy_room_response_interval_ms`
    /// (default: the shipped one; 0 turns the bounded rate off).
    #[arg(long, default_value_t = tessera_runtime::config::SyncWorkerConfig::default().busy_room_response_interval_ms)]
    busy_room_interval_ms: u64,
    /// Run the flooding servers (their HTTP servers, signing and sending)
    /// on threads of low CPU priority, as if they were on machines of their
    /// own; for diagnosis: how much of the quiet rooms' extra time is the
    /// load generator's share of the cores.
    #[arg(long)]
    flood_low_priority: bool,
}

/// Quiet traffic right after a flood drained is neither idle nor during it.
const SETTLE: Duration = Duration::from_secs(3);

/// When the quiet messages count as idle and when as during a flood.
struct Phases {
    /// Before the first flood, and between a flood's end (plus [`SETTLE`])
    /// and the next flood's start.
    idle: Vec<(Instant, Instant)>,
    /// Each flood from its first transaction until its last event was visible.
    during: Vec<(Instant, Instant)>,
}

impl Phases {
    fn new(first_quiet: Instant, floods: &[(Instant, Instant)]) -> Self {
        let mut idle = Vec::new();
        let mut from = first_quiet;
        for (start, end) in floods {
            if from < *start {
                idle.push((from, *start));
            }
            from = *end + SETTLE;
        }
        Self {
            idle,
            during: floods.to_vec(),
        }
    }

    fn contains(&self, at: &Instant, during: bool) -> bool {
        if during {
            self.during
                .iter()
                .any(|(from, to)| (*from..=*to).contains(at))
        } else {
            self.idle.iter().any(|(from, to)| (*from..*to).contains(at))
        }
    }

    fn name(&self, at: &Instant) -> &'static str {
        if self.contains(at, true) {
            "during"
        } else if self.contains(at, false) {
            "idle"
        } else {
            "after"
        }
    }
}

/// Where events showed up in the local user's /sync.
#[derive(Default)]
struct Seen {
    /// Quiet message body → arrival.
    quiet: HashMap<String, Instant>,
    /// Highest flood index visible, with when it was first seen.
    flood_progress: Vec<(usize, Instant)>,
    /// Each /sync request: when it was sent and how long its answer took.
    syncs: Vec<(Instant, Duration)>,
}

struct Target {
    client_url: String,
    sync_url: String,
    server_name: String,
    alice: TestUser,
    /// In the quiet rooms only.
    bob: TestUser,
    /// `--busy-room-local-users` of them.
    locals: Vec<TestUser>,
    pids: Vec<u32>,
    cluster: Option<TestCluster>,
}

async fn target(args: &Args) -> anyhow::Result<Target> {
    let http = tessera_tests::http_client_builder().build()?;
    if args.target == "tessera" {
        let cluster = TestCluster::start(Spec {
            room_workers: args.room_workers,
            partitions: 256,
            pool_size: 16,
            min_connections: tessera_runtime::config::DatabaseConfig::default().min_connections,
            log_filter: "warn".to_owned(),
            federation: Some(FederationSpec {
                max_staged_per_room: 100_000,
                origin_pdus_per_second: args.origin_rate,
                origin_pdu_burst: args.origin_burst,
                staged_batch: args.staged_batch,
                ..FederationSpec::default()
            }),
            sync_busy_room: Some((
                tessera_runtime::config::SyncWorkerConfig::default().busy_room_events_per_second,
                args.busy_room_interval_ms,
            )),
            ..Spec::default()
        })
        .await;
        let alice = cluster.register("alice").await;
        let bob = cluster.register("bob").await;
        let mut locals = Vec::new();
        for i in 0..args.busy_room_local_users {
            locals.push(cluster.register(&format!("local-{i}")).await);
        }
        let mut pids = vec![cluster.pid("federation-receiver")];
        pids.extend(cluster.live_room_workers().iter().map(|w| cluster.pid(w)));
        return Ok(Target {
            client_url: cluster.client_api_url.clone(),
            sync_url: cluster.sync_urls[0].clone(),
            server_name: cluster.server_name.clone(),
            alice,
            bob,
            locals,
            pids,
            cluster: Some(cluster),
        });
    }
    let client_url = args
        .client_url
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--client-url is needed"))?;
    let secret = args
        .shared_secret
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("--shared-secret is needed"))?;
    let alice = tessera_tests::client::register(&http, &client_url, secret, "alice", false).await;
    let bob = tessera_tests::client::register(&http, &client_url, secret, "bob", false).await;
    let mut locals = Vec::new();
    for i in 0..args.busy_room_local_users {
        let name = format!("local-{i}");
        locals
            .push(tessera_tests::client::register(&http, &client_url, secret, &name, false).await);
    }
    Ok(Target {
        sync_url: client_url.clone(),
        client_url,
        server_name: args
            .server_name
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--server-name is needed"))?,
        alice,
        bob,
        locals,
        pids: args.pid.clone(),
        cluster: None,
    })
}

async fn create_room(
    http: &reqwest::Client,
    base: &str,
    user: &TestUser,
) -> anyhow::Result<String> {
    let response = http
        .post(format!("{base}/_matrix/client/v3/createRoom"))
        .bearer_auth(&user.token)
        .json(&json!({ "preset": "public_chat" }))
        .send()
        .await?;
    let body: Value = response.json().await?;
    body["room_id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("createRoom: {body}"))
}

async fn join(
    http: &reqwest::Client,
    base: &str,
    user: &TestUser,
    room: &str,
) -> anyhow::Result<()> {
    let response = http
        .post(format!("{base}/_matrix/client/v3/join/{}", enc(room)))
        .bearer_auth(&user.token)
        .json(&json!({}))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "join: {}",
        response.text().await?
    );
    Ok(())
}

/// How many members a room's `/joined_members` lists.
async fn joined_members(
    http: &reqwest::Client,
    base: &str,
    user: &TestUser,
    room: &str,
) -> anyhow::Result<usize> {
    let response = http
        .get(format!(
            "{base}/_matrix/client/v3/rooms/{}/joined_members",
            enc(room)
        ))
        .bearer_auth(&user.token)
        .send()
        .await?;
    let body: Value = response.json().await?;
    body["joined"]
        .as_object()
        .map(|joined| joined.len())
        .ok_or_else(|| anyhow::anyhow!("joined_members: {body}"))
}

/// Send one transaction, retrying on 429 and 5xx; returns attempts made.
async fn send_with_retry(remote: &FakeRemote, txn: &str, pdus: &[Value]) -> usize {
    for attempt in 1..=200 {
        let (status, body) = remote.send(txn, pdus, &[]).await;
        match status {
            200 => return attempt,
            429 => {
                tokio::time::sleep(Duration::from_millis(
                    body["retry_after_ms"]
                        .as_u64()
                        .unwrap_or(500)
                        .clamp(50, 10_000),
                ))
                .await
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    200
}

fn sync_loop(
    http: reqwest::Client,
    url: String,
    user: TestUser,
    busy: String,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    filter: Option<String>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // The default timeline limit, as clients use it: a busy room's sync is
        // `limited`, and flood progress is read from its newest events.
        let mut since: Option<String> = None;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut request = format!("{url}/_matrix/client/v3/sync?timeout=1000");
            if let Some(filter) = &filter {
                request.push_str(&format!("&filter={}", enc(filter)));
            }
            if let Some(since) = &since {
                request.push_str(&format!("&since={since}"));
            }
            let sent = Instant::now();
            let Ok(response) = http.get(&request).bearer_auth(&user.token).send().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let arrived = Instant::now();
            let Ok(body) = response.json::<Value>().await else {
                continue;
            };
            if let Some(next) = body["next_batch"].as_str() {
                since = Some(next.to_owned());
            }
            let mut seen = seen.lock().unwrap();
            seen.syncs.push((sent, arrived - sent));
            for (room, data) in body["rooms"]["join"].as_object().into_iter().flatten() {
                for event in data["timeline"]["events"].as_array().into_iter().flatten() {
                    let Some(text) = event["content"]["body"].as_str() else {
                        continue;
                    };
                    if room == &busy {
                        if let Some(n) = text
                            .strip_prefix("flood ")
                            .and_then(|n| n.parse::<usize>().ok())
                            && seen.flood_progress.last().is_none_or(|(max, _)| n > *max)
                        {
                            seen.flood_progress.push((n, arrived));
                        }
                    } else if text.starts_with("quiet ") {
                        seen.quiet.entry(text.to_owned()).or_insert(arrived);
                    }
                }
            }
        }
    })
}

/// Flood events visible in the busy room, counted through /messages.
async fn count_visible(http: &reqwest::Client, base: &str, user: &TestUser, room: &str) -> usize {
    let mut from: Option<String> = None;
    let mut count = 0;
    for _ in 0..200 {
        let mut url = format!(
            "{base}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1000",
            enc(room)
        );
        if let Some(from) = &from {
            url.push_str(&format!("&from={}", enc(from)));
        }
        let Ok(response) = http.get(&url).bearer_auth(&user.token).send().await else {
            break;
        };
        let Ok(body) = response.json::<Value>().await else {
            break;
        };
        let chunk = body["chunk"].as_array().cloned().unwrap_or_default();
        count += chunk
            .iter()
            .filter(|e| {
                e["content"]["body"]
                    .as_str()
                    .is_some_and(|b| b.starts_with("flood "))
            })
            .count();
        match body["end"].as_str() {
            Some(end) if !chunk.is_empty() => from = Some(end.to_owned()),
            _ => break,
        }
    }
    count
}

/// A transaction of the flood: its origin and PDUs.
type Transaction = (Arc<FakeRemote>, Vec<Value>);

/// One flood's events (those numbered `range`), each origin's share in
/// transactions of 50, the origins' transactions interleaved; with the
/// number of PDUs (joins included).
fn flood_events(
    flooders: &[(Arc<FakeRemote>, OwnedUserId)],
    busy: &str,
    range: std::ops::Range<usize>,
    join_every: usize,
) -> (Vec<Transaction>, usize) {
    let mut per_origin: Vec<Vec<Value>> = vec![Vec::new(); flooders.len()];
    for i in range {
        let (flooder, spammer) = &flooders[i % flooders.len()];
        if join_every > 0 && i % join_every == 0 {
            let joiner = flooder.user(&format!("flood-{i}"));
            per_origin[i % flooders.len()].push(json_of(&flooder.build(
                busy,
                &joiner,
                "m.room.member",
                Some(joiner.as_str()),
                json!({ "membership": "join" }),
            )));
        }
        per_origin[i % flooders.len()].push(json_of(&flooder.text(
            busy,
            spammer,
            &format!("flood {i}"),
        )));
    }
    let pdus = per_origin.iter().map(Vec::len).sum();
    let chunked: Vec<Vec<Vec<Value>>> = per_origin
        .iter()
        .map(|pdus| pdus.chunks(50).map(<[Value]>::to_vec).collect())
        .collect();
    let mut transactions = Vec::new();
    for round in 0..chunked.iter().map(Vec::len).max().unwrap_or(0) {
        for (origin, chunks) in chunked.iter().enumerate() {
            if let Some(chunk) = chunks.get(round) {
                transactions.push((Arc::clone(&flooders[origin].0), chunk.clone()));
            }
        }
    }
    (transactions, pdus)
}

/// A runtime owned by async code: dropped without blocking.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().expect("until dropped").handle().clone()
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

fn rss(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| rss_mib(*p)).sum()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = tessera_tests::http_client_builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let mut target = target(&args).await?;
    eprintln!("== target {} ({})", args.target, target.server_name);
    let busy = create_room(&http, &target.client_url, &target.alice).await?;
    for local in &target.locals {
        join(&http, &target.client_url, local, &busy).await?;
    }
    let mut quiet_rooms = Vec::new();
    for _ in 0..10 {
        let room = create_room(&http, &target.client_url, &target.alice).await?;
        join(&http, &target.client_url, &target.bob, &room).await?;
        quiet_rooms.push(room);
    }
    // The flooding server lives on a runtime of its own (its HTTP server,
    // connections and sending): serializing and signing 50-PDU transactions
    // would otherwise hold the threads that time the quiet messages and read
    // /sync, and the load generator's own queueing would count as latency.
    let flood_owner;
    let flood_runtime = if args.flood_low_priority {
        tessera_runtime::bulk::low_priority_runtime("bench-flood", 2)?
    } else {
        flood_owner = OwnRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("bench-flood")
                .enable_all()
                .build()?,
        ));
        flood_owner.handle()
    };
    let join_flooder = |busy: String| {
        let server_name = target.server_name.clone();
        async move {
            let flooder = FakeRemote::start(&server_name).await;
            let spammer: OwnedUserId = flooder.user("spammer");
            let joined = flooder.join(&busy, &spammer).await;
            joined
                .map(|_| (flooder, spammer))
                .map_err(|e| e.to_string())
        }
    };
    let mut flooders = vec![
        flood_runtime
            .spawn(join_flooder(busy.clone()))
            .await?
            .map_err(|e| anyhow::anyhow!("flooder join: {e}"))?,
    ];
    if args.busy_room_members > 0 {
        let members = args.busy_room_members;
        let (joined, took) = flood_runtime
            .spawn({
                let (flooder, busy) = (Arc::clone(&flooders[0].0), busy.clone());
                async move {
                    let joins: Vec<Value> = flooder
                        .member_joins(&busy, members)
                        .iter()
                        .map(|p| json_of(p))
                        .collect();
                    let started = Instant::now();
                    for (i, chunk) in joins.chunks(50).enumerate() {
                        send_with_retry(&flooder, &format!("members-{i}"), chunk).await;
                    }
                    (joins.len(), started)
                }
            })
            .await?;
        // Joined when the busy room's member list has them all (alice and
        // the spammer besides).
        loop {
            let count = joined_members(&http, &target.client_url, &target.alice, &busy).await?;
            if count >= joined + 2 {
                break;
            }
            anyhow::ensure!(
                took.elapsed() < Duration::from_secs(600),
                "only {count} of {} members joined after 10 minutes",
                joined + 2
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eprintln!(
            "   {joined} members joined the busy room in {:.1} s ({:.0} joins/s)",
            took.elapsed().as_secs_f64(),
            joined as f64 / took.elapsed().as_secs_f64()
        );
    }
    if args.omit_members_joins > 0 {
        let receiver = target.pids[0];
        let peak_before = peak_rss_mib(receiver).unwrap_or(f64::NAN);
        let rss_before = rss_mib(receiver).unwrap_or(f64::NAN);
        let mut took = Vec::new();
        for _ in 0..args.omit_members_joins {
            let joiner = FakeRemote::start(&target.server_name).await;
            let user = joiner.user("member");
            let started = Instant::now();
            joiner
                .join_with_query(&busy, &user, "?omit_members=true")
                .await
                .map_err(|e| anyhow::anyhow!("omit_members join: {e}"))?;
            took.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        took.sort_by(f64::total_cmp);
        eprintln!(
            "   {} omit_members joins: p50 {:.0} ms, max {:.0} ms; receiver RSS {rss_before:.0} MiB, peak {peak_before:.0} → {:.0} MiB",
            took.len(),
            percentile(&took, 50.0),
            took.last().copied().unwrap_or(f64::NAN),
            peak_rss_mib(receiver).unwrap_or(f64::NAN)
        );
    }
    // The other flooding servers join after the members, so each one's view
    // of the room (what it builds on) has them.
    for _ in 1..args.flood_origins.max(1) {
        flooders.push(
            flood_runtime
                .spawn(join_flooder(busy.clone()))
                .await?
                .map_err(|e| anyhow::anyhow!("flooder join: {e}"))?,
        );
    }
    // One remote server per quiet room, as in a real federation, so that no
    // origin has more than a transaction or two in flight.
    let mut talkers = Vec::new();
    for room in &quiet_rooms {
        let talker = FakeRemote::start(&target.server_name).await;
        let friend: OwnedUserId = talker.user("friend");
        talker
            .join(room, &friend)
            .await
            .map_err(|e| anyhow::anyhow!("talker join: {e}"))?;
        talkers.push((talker, friend));
    }
    let floods = args.floods.max(1);
    eprintln!(
        "   rooms joined; building {} flood events",
        args.flood * floods
    );
    let mut flood_transactions = Vec::new();
    for flood in 0..floods {
        let (transactions, pdus) = flood_events(
            &flooders,
            &busy,
            flood * args.flood..(flood + 1) * args.flood,
            args.flood_join_every,
        );
        flood_transactions.push((transactions, pdus));
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let seen_by_bob = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let filter = args
        .lazy_load_members
        .then(|| json!({"room": {"state": {"lazy_load_members": true}}}).to_string());
    let syncer = sync_loop(
        http.clone(),
        target.sync_url.clone(),
        target.alice.clone(),
        busy.clone(),
        Arc::clone(&seen),
        Arc::clone(&stop),
        filter.clone(),
    );
    let bob_syncer = sync_loop(
        http.clone(),
        target.sync_url.clone(),
        target.bob.clone(),
        busy.clone(),
        Arc::clone(&seen_by_bob),
        Arc::clone(&stop),
        filter.clone(),
    );
    let local_syncers: Vec<_> = target
        .locals
        .iter()
        .map(|user| {
            sync_loop(
                http.clone(),
                target.sync_url.clone(),
                user.clone(),
                busy.clone(),
                Arc::default(),
                Arc::clone(&stop),
                filter.clone(),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let probe_dir = args
        .flush_probe_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let probe = FlushProbe::start(&probe_dir)
        .map_err(|e| anyhow::anyhow!("flush probe in {}: {e}", probe_dir.display()))?;
    let idle_start = Instant::now();

    // Quiet traffic for the whole run.
    let quiet_sent: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let quiet_acked: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let quiet_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let interval_ms = args.quiet_interval_ms.max(1);
    let quiet = {
        let (talkers, rooms, sent, stop, acked) = (
            talkers.clone(),
            quiet_rooms.clone(),
            Arc::clone(&quiet_sent),
            Arc::clone(&quiet_stop),
            Arc::clone(&quiet_acked),
        );
        tokio::spawn(async move {
            let mut i = 0usize;
            let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                ticker.tick().await;
                let room = &rooms[i % rooms.len()];
                let (talker, friend) = &talkers[i % talkers.len()];
                let body = format!("quiet {i}");
                let pdu = talker.text(room, friend, &body);
                let started = Instant::now();
                sent.lock().unwrap().push((body.clone(), started));
                let (talker, txn, acked) =
                    (Arc::clone(talker), format!("quiet-{i}"), Arc::clone(&acked));
                tokio::spawn(async move {
                    send_with_retry(&talker, &txn, &[json_of(&pdu)]).await;
                    acked.lock().unwrap().insert(body, Instant::now());
                });
                i += 1;
            }
        })
    };
    let rss_samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut rss_before = f64::NAN;
    let mut sampler = None;
    // Each flood: its start, when its last event was visible (or progress
    // stopped), and how long sending it took.
    let mut flood_windows: Vec<(Instant, Instant)> = Vec::new();
    let mut flood_sent = Vec::new();
    for (flood, (transactions, pdus)) in flood_transactions.into_iter().enumerate() {
        eprintln!("   idle phase: {} s of quiet traffic", args.idle_seconds);
        tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
        if flood == 0 {
            rss_before = rss(&target.pids);
        }
        eprintln!(
            "   flood phase{}: {} messages and {} joins from {} servers, 50 PDUs a transaction, 4 in flight",
            if floods > 1 {
                format!(" {} of {floods}", flood + 1)
            } else {
                String::new()
            },
            args.flood,
            pdus - args.flood,
            flooders.len()
        );
        let flood_start = Instant::now();
        if sampler.is_none() {
            let (pids, samples, stop) = (
                target.pids.clone(),
                Arc::clone(&rss_samples),
                Arc::clone(&quiet_stop),
            );
            sampler = Some(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    samples.lock().unwrap().push(rss(&pids));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }));
        }
        let retries: usize = flood_runtime
            .spawn({
                use futures::StreamExt;
                futures::stream::iter(transactions.into_iter().enumerate().map(
                    move |(i, (flooder, chunk))| async move {
                        send_with_retry(&flooder, &format!("flood-{flood}-{i}"), &chunk).await - 1
                    },
                ))
                .buffer_unordered(4)
                .collect::<Vec<_>>()
            })
            .await?
            .into_iter()
            .sum();
        flood_sent.push(flood_start.elapsed());
        eprintln!(
            "   flood sent in {:.1} s ({retries} retries); waiting for it to show up",
            flood_start.elapsed().as_secs_f64()
        );

        // Wait until the flood's last event is visible, or progress stalls.
        let last = (flood + 1) * args.flood - 1;
        let mut last_progress = (0usize, Instant::now());
        let end = loop {
            let newest = seen.lock().unwrap().flood_progress.last().copied();
            let max = newest.map_or(0, |(n, _)| n);
            if max >= last {
                break newest.map_or(flood_start, |(_, at)| at);
            }
            if max > last_progress.0 {
                last_progress = (max, Instant::now());
            } else if last_progress.1.elapsed() > Duration::from_secs(args.stall_seconds) {
                eprintln!(
                    "   no progress for {} s; stopping the wait",
                    args.stall_seconds
                );
                break newest.map_or(flood_start, |(_, at)| at.max(flood_start));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        flood_windows.push((flood_start, end));
        tokio::time::sleep(SETTLE).await;
    }
    quiet_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = quiet.await;
    if let Some(sampler) = sampler {
        let _ = sampler.await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = syncer.await;
    let _ = bob_syncer.await;
    for syncer in local_syncers {
        let _ = syncer.await;
    }
    let stalls = probe.stalls();
    drop(probe);
    let visible = count_visible(&http, &target.client_url, &target.alice, &busy).await;
    if let (Some(cluster), Ok(dir)) = (&target.cluster, std::env::var("BENCH_METRICS_DIR")) {
        let mut names = vec!["federation-receiver".to_owned(), "sync-worker-0".to_owned()];
        names.extend(cluster.live_room_workers());
        for name in names {
            std::fs::write(format!("{dir}/{name}.prom"), cluster.metrics(&name).await)?;
        }
    }

    // The cluster's processes stop, then its database goes.
    if let Some(cluster) = target.cluster.take() {
        cluster.remove().await;
    }

    // Figures.
    let seen = seen.lock().unwrap();
    let seen_by_bob = seen_by_bob.lock().unwrap();
    let sent = quiet_sent.lock().unwrap();
    // Quiet messages sent before a flood started are "idle"; those sent
    // from its start until its last event was visible are "during"; those
    // sent while it drained and settled count in neither.
    let phases = Phases::new(idle_start, &flood_windows);
    let in_phase = |at: &Instant, during: bool| phases.contains(at, during);
    // A message's way overlapped a storage stall if one was under way
    // between its sending and bob's seeing it.
    let stalled = |body: &String, at: &Instant| {
        let seen_at = seen_by_bob.quiet.get(body).copied().unwrap_or(*at);
        flush_probe::longest_overlapping(&stalls, *at, seen_at)
    };
    let latencies_of = |seen: &Seen, during: bool, skip_stalled: bool| -> (Vec<f64>, usize) {
        let mut values: Vec<f64> = sent
            .iter()
            .filter(|(_, at)| in_phase(at, during))
            .filter(|(body, at)| !skip_stalled || stalled(body, at).is_none())
            .filter_map(|(body, at)| {
                seen.quiet
                    .get(body)
                    .map(|arrived| arrived.duration_since(*at).as_secs_f64() * 1000.0)
            })
            .collect();
        values.sort_by(f64::total_cmp);
        let missing = sent
            .iter()
            .filter(|(b, at)| in_phase(at, during) && !seen.quiet.contains_key(b))
            .count();
        (values, missing)
    };
    let latencies = |seen: &Seen, during: bool| latencies_of(seen, during, false);
    let (idle, idle_missing) = latencies(&seen_by_bob, false);
    let (during, during_missing) = latencies(&seen_by_bob, true);
    let (alice_idle, alice_idle_missing) = latencies(&seen, false);
    let (alice_during, alice_during_missing) = latencies(&seen, true);
    let acked = quiet_acked.lock().unwrap();
    let ack_latencies = |during: bool| -> Vec<f64> {
        let mut values: Vec<f64> = sent
            .iter()
            .filter(|(_, at)| in_phase(at, during))
            .filter_map(|(body, at)| {
                acked
                    .get(body)
                    .map(|a| a.duration_since(*at).as_secs_f64() * 1000.0)
            })
            .collect();
        values.sort_by(f64::total_cmp);
        values
    };
    let (idle_ack, during_ack) = (ack_latencies(false), ack_latencies(true));
    if let Some(path) = &args.samples_csv {
        let after = |at: &Instant, then: Option<&Instant>| {
            then.map_or(String::new(), |t| {
                format!("{:.1}", t.duration_since(*at).as_secs_f64() * 1000.0)
            })
        };
        let mut csv = String::from(
            "flood,sent_ms_from_flood_start,answered_ms,bob_ms,alice_ms,flush_stall_ms,phase\n",
        );
        for (body, at) in sent.iter() {
            // The flood the message came before or during (the last one
            // for messages after it).
            let flood = flood_windows
                .iter()
                .position(|(_, end)| *at <= *end + SETTLE)
                .unwrap_or(flood_windows.len() - 1);
            let flood_start = flood_windows[flood].0;
            let offset = if *at >= flood_start {
                at.duration_since(flood_start).as_secs_f64()
            } else {
                -flood_start.duration_since(*at).as_secs_f64()
            };
            csv.push_str(&format!(
                "{},{:.1},{},{},{},{},{}\n",
                flood + 1,
                offset * 1000.0,
                after(at, acked.get(body)),
                after(at, seen_by_bob.quiet.get(body)),
                after(at, seen.quiet.get(body)),
                stalled(body, at).map_or(String::new(), |d| format!(
                    "{:.1}",
                    d.as_secs_f64() * 1000.0
                )),
                phases.name(at),
            ));
        }
        std::fs::write(path, csv)?;
    }
    eprintln!(
        "   quiet transaction answered: idle p50 {:.1} p99 {:.1} ms, during the flood p50 {:.1} p99 {:.1} ms",
        percentile(&idle_ack, 50.0),
        percentile(&idle_ack, 99.0),
        percentile(&during_ack, 50.0),
        percentile(&during_ack, 99.0)
    );
    {
        // Answered /sync requests (not long-poll timeouts) before and during the flood.
        let answered = |during: bool| -> Vec<f64> {
            let mut v: Vec<f64> = seen
                .syncs
                .iter()
                .filter(|(at, took)| in_phase(at, during) && *took < Duration::from_millis(900))
                .map(|(_, took)| took.as_secs_f64() * 1000.0)
                .collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let (before, while_flooding) = (answered(false), answered(true));
        eprintln!(
            "   /sync answers: idle {} (p50 {:.1} ms), during the flood {} (p50 {:.1} p99 {:.1} ms)",
            before.len(),
            percentile(&before, 50.0),
            while_flooding.len(),
            percentile(&while_flooding, 50.0),
            percentile(&while_flooding, 99.0)
        );
    }
    // Seconds from each flood's start until its last event was visible.
    let flood_seconds: Vec<f64> = flood_windows
        .iter()
        .map(|(start, end)| end.duration_since(*start).as_secs_f64())
        .collect();
    let flooding: f64 = flood_seconds.iter().sum();
    // One flood's rate per quarter of it; several floods' rate each.
    let rates: Vec<String> = if floods > 1 {
        flood_seconds
            .iter()
            .map(|s| format!("{:.0}", args.flood as f64 / s))
            .collect()
    } else {
        (1..=4)
            .map(|q| {
                let (lo, hi) = ((q - 1) * args.flood / 4, q * args.flood / 4 - 1);
                let at = |n: usize| {
                    seen.flood_progress
                        .iter()
                        .find(|(m, _)| *m >= n)
                        .map(|(_, t)| *t)
                };
                match (at(lo), at(hi)) {
                    (Some(a), Some(b)) if b > a => format!(
                        "{:.0}",
                        (hi - lo) as f64 / b.duration_since(a).as_secs_f64()
                    ),
                    _ => "-".to_owned(),
                }
            })
            .collect()
    };
    let rss_during = rss_samples
        .lock()
        .unwrap()
        .iter()
        .cloned()
        .fold(0.0, f64::max);
    // A quiet message is lost when either viewer never saw it; each viewer's
    // own count goes to stderr.
    let lost = |during: bool| {
        sent.iter()
            .filter(|(body, at)| {
                in_phase(at, during)
                    && !(seen.quiet.contains_key(body) && seen_by_bob.quiet.contains_key(body))
            })
            .count()
    };
    eprintln!(
        "   quiet messages never seen: bob {idle_missing} idle, {during_missing} during; alice {alice_idle_missing} idle, {alice_during_missing} during"
    );
    println!(
        "| {} | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {} of {} | {:.0} events/s ({} per {}) | {:.0} → {:.0} MiB | {} / {} |",
        args.target,
        percentile(&idle, 50.0),
        percentile(&idle, 99.0),
        percentile(&during, 50.0),
        percentile(&during, 99.0),
        percentile(&alice_during, 50.0),
        percentile(&alice_during, 99.0),
        visible,
        args.flood * floods,
        visible as f64 / flooding,
        rates.join(" / "),
        if floods > 1 { "flood" } else { "quarter" },
        rss_before,
        rss_during,
        lost(false),
        lost(true),
    );
    eprintln!(
        "   alice (also in the busy room): quiet p50 / p99 idle {:.1} / {:.1} ms, during the flood {:.1} / {:.1} ms",
        percentile(&alice_idle, 50.0),
        percentile(&alice_idle, 99.0),
        percentile(&alice_during, 50.0),
        percentile(&alice_during, 99.0),
    );
    {
        // The stalls that began in any of `windows`, in ms.
        let in_windows = |windows: &[(Instant, Instant)]| -> Vec<f64> {
            stalls
                .iter()
                .filter(|(start, _)| {
                    windows
                        .iter()
                        .any(|(from, to)| (from..=to).contains(&start))
                })
                .map(|(_, took)| took.as_secs_f64() * 1000.0)
                .collect()
        };
        let describe = |v: &[f64]| match v.iter().cloned().reduce(f64::max) {
            Some(max) => format!("{} (longest {max:.0} ms)", v.len()),
            None => "none".to_owned(),
        };
        eprintln!(
            "   storage flushes of {} ms or more (probe in {}): idle {}, during the flood {}",
            flush_probe::SLOW.as_millis(),
            probe_dir.display(),
            describe(&in_windows(&phases.idle)),
            describe(&in_windows(&phases.during)),
        );
        let (idle_clear, _) = latencies_of(&seen_by_bob, false, true);
        let (during_clear, _) = latencies_of(&seen_by_bob, true, true);
        eprintln!(
            "   bob without the messages a storage stall overlapped ({} idle, {} during left out): p50 / p99 idle {:.1} / {:.1} ms, during the flood {:.1} / {:.1} ms",
            idle.len() - idle_clear.len(),
            during.len() - during_clear.len(),
            percentile(&idle_clear, 50.0),
            percentile(&idle_clear, 99.0),
            percentile(&during_clear, 50.0),
            percentile(&during_clear, 99.0),
        );
    }
    eprintln!(
        "   flood sent in {} s, last flood event visible after {} s; quiet messages sent: {} idle, {} during",
        flood_sent
            .iter()
            .map(|d| format!("{:.1}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" / "),
        flood_seconds
            .iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(" / "),
        sent.iter().filter(|(_, at)| in_phase(at, false)).count(),
        sent.iter().filter(|(_, at)| in_phase(at, true)).count(),
    );
    Ok(())
}
