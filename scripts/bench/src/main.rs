//! `tessera-bench`: local send → `/sync` latency and message throughput on a
//! real cluster of release binaries (Postgres, Redis, gRPC, HTTP: nothing
//! mocked), with 1 and 2 room-workers.
//!
//! Phase 1, latency: a sender sends at a fixed rate (open loop, default 500
//! messages/s) round-robin over N rooms; a receiver in all of them follows
//! `/sync` with long-polls. Latency is from the start of the sender's `PUT
//! /send` to the moment the receiver's `/sync` response containing the event
//! arrives. Every message must arrive exactly once.
//!
//! Phase 2, throughput: C concurrent senders, each sending the next message as
//! soon as the previous one is acknowledged (closed loop), for T seconds.
//!
//! Run it through `scripts/bench/run`, which builds the release binaries.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use tessera_bench::percentile;
use tessera_tests::client::enc;
use tessera_tests::{Spec, TestCluster, TestUser};
use tokio::sync::Mutex;

#[derive(Parser, Debug)]
struct Args {
    /// Room-worker counts to measure, comma separated.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    room_workers: Vec<usize>,
    /// Messages per second in the latency phase.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Rooms the messages are spread over.
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    /// Concurrent senders in the throughput phase.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds of the throughput phase.
    #[arg(long, default_value_t = 15)]
    throughput_seconds: u64,
}

struct Report {
    room_workers: usize,
    sent: usize,
    received: usize,
    duplicates: usize,
    achieved_rate: f64,
    latency_ms: Vec<f64>,
    throughput: f64,
    ack_ms: Vec<f64>,
}

async fn send(
    http: &reqwest::Client,
    base: &str,
    user: &TestUser,
    room: &str,
    txn: &str,
    body: &str,
) -> anyhow::Result<()> {
    let url = format!(
        "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
        enc(room)
    );
    let response = http
        .put(url)
        .bearer_auth(&user.token)
        .json(&json!({ "msgtype": "m.text", "body": body }))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "send failed: {}",
        response.text().await?
    );
    Ok(())
}

async fn measure(args: &Args, room_workers: usize) -> anyhow::Result<Report> {
    eprintln!("== {room_workers} room-worker(s): starting the cluster");
    let cluster = TestCluster::start(Spec {
        room_workers,
        sync_workers: 1,
        partitions: 256,
        pool_size: 16,
        min_connections: tessera_runtime::config::DatabaseConfig::default().min_connections,
        log_filter: "warn".to_owned(),
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let alice = cluster.register("alice").await;
    let bob = cluster.register("bob").await;
    let mut rooms = Vec::new();
    for _ in 0..args.rooms {
        let room = api.public_room(&alice).await;
        api.join(&bob, &room).await;
        rooms.push(room);
    }
    let http = tessera_tests::http_client_builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let base = cluster.client_api_url.clone();

    // Warm up connections and caches.
    for i in 0..100 {
        send(
            &http,
            &base,
            &alice,
            &rooms[i % rooms.len()],
            &format!("warm{i}"),
            "warm-up",
        )
        .await?;
    }

    // Receiver: long-polls and notes when each message arrives.
    let received: Arc<Mutex<HashMap<u64, Vec<Instant>>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let filter = json!({ "room": { "timeline": { "limit": 5000 } } }).to_string();
    let mut since = api.sync(&bob, None, 0).await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    let receiver = {
        let (http, received, stop, bob, sync_base, filter) = (
            http.clone(),
            received.clone(),
            stop.clone(),
            bob.clone(),
            cluster.sync_urls[0].clone(),
            filter.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let response = http
                    .get(format!(
                        "{sync_base}/_matrix/client/v3/sync?since={since}&timeout=1000&filter={}",
                        enc(&filter)
                    ))
                    .bearer_auth(&bob.token)
                    .send()
                    .await;
                let arrived = Instant::now();
                let Ok(response) = response else { continue };
                let Ok(body) = response.json::<Value>().await else {
                    continue;
                };
                if let Some(next) = body["next_batch"].as_str() {
                    since = next.to_owned();
                }
                let mut received = received.lock().await;
                for room in body["rooms"]["join"]
                    .as_object()
                    .into_iter()
                    .flat_map(|m| m.values())
                {
                    for event in room["timeline"]["events"].as_array().into_iter().flatten() {
                        if let Some(seq) = event["content"]["body"]
                            .as_str()
                            .and_then(|b| b.strip_prefix("lat-"))
                            .and_then(|s| s.parse().ok())
                        {
                            received.entry(seq).or_default().push(arrived);
                        }
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Sender: open loop at the target rate.
    eprintln!(
        "   latency phase: {} msg/s for {} s over {} rooms",
        args.rate,
        args.seconds,
        rooms.len()
    );
    let total = args.rate * args.seconds;
    let sent_at: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let failures = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(total as usize);
    for seq in 0..total {
        ticker.tick().await;
        let (http, base, alice, room, sent_at, failures) = (
            http.clone(),
            base.clone(),
            alice.clone(),
            rooms[seq as usize % rooms.len()].clone(),
            sent_at.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            sent_at.lock().await.insert(seq, Instant::now());
            if send(
                &http,
                &base,
                &alice,
                &room,
                &format!("lat{seq}"),
                &format!("lat-{seq}"),
            )
            .await
            .is_err()
            {
                failures.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let send_elapsed = started.elapsed();
    for _ in 0..300 {
        if received.lock().await.len() as u64 >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    receiver.await?;
    let received = received.lock().await;
    let sent_at = sent_at.lock().await;
    let mut latency_ms: Vec<f64> = received
        .iter()
        .filter_map(|(seq, arrivals)| {
            Some(arrivals[0].duration_since(*sent_at.get(seq)?).as_secs_f64() * 1000.0)
        })
        .collect();
    latency_ms.sort_by(f64::total_cmp);
    let duplicates = received.values().map(|a| a.len() - 1).sum();
    anyhow::ensure!(
        failures.load(Ordering::Relaxed) == 0,
        "{} sends failed",
        failures.load(Ordering::Relaxed)
    );

    // Throughput: closed loop.
    eprintln!(
        "   throughput phase: {} concurrent senders for {} s",
        args.concurrency, args.throughput_seconds
    );
    let acked = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.throughput_seconds);
    let ack_ms: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut senders = Vec::new();
    for s in 0..args.concurrency {
        let (http, base, alice, room, acked, ack_ms) = (
            http.clone(),
            base.clone(),
            alice.clone(),
            rooms[s % rooms.len()].clone(),
            acked.clone(),
            ack_ms.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut i = 0u64;
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                if send(
                    &http,
                    &base,
                    &alice,
                    &room,
                    &format!("tp{s}-{i}"),
                    "throughput",
                )
                .await
                .is_ok()
                {
                    acked.fetch_add(1, Ordering::Relaxed);
                    mine.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                i += 1;
            }
            ack_ms.lock().await.extend(mine);
        }));
    }
    let tp_started = Instant::now();
    for sender in senders {
        sender.await?;
    }
    let throughput = acked.load(Ordering::Relaxed) as f64 / tp_started.elapsed().as_secs_f64();
    let mut ack_ms = ack_ms.lock().await.clone();
    ack_ms.sort_by(f64::total_cmp);
    cluster.remove().await;
    Ok(Report {
        room_workers,
        sent: total as usize,
        received: received.len(),
        duplicates,
        achieved_rate: total as f64 / send_elapsed.as_secs_f64(),
        latency_ms,
        throughput,
        ack_ms,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut reports = Vec::new();
    for &n in &args.room_workers {
        reports.push(measure(&args, n).await?);
    }
    println!(
        "| room-workers | sent | received (dups) | offered rate | send→/sync p50 | p99 | max | throughput (closed loop, {} senders) | ack p50 | ack p99 |",
        args.concurrency
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &reports {
        println!(
            "| {} | {} | {} ({}) | {:.0} msg/s | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} msg/s | {:.1} ms | {:.1} ms |",
            r.room_workers,
            r.sent,
            r.received,
            r.duplicates,
            r.achieved_rate,
            percentile(&r.latency_ms, 50.0),
            percentile(&r.latency_ms, 99.0),
            r.latency_ms.last().copied().unwrap_or(f64::NAN),
            r.throughput,
            percentile(&r.ack_ms, 50.0),
            percentile(&r.ack_ms, 99.0),
        );
    }
    Ok(())
}
