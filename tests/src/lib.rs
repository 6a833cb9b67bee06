//! Test harness: start real Tessera processes against real Postgres and Redis.
//!
//! Every [`TestCluster`] gets its own database (`tessera_t_*`), its own Redis
//! key prefix, its own ports and a temporary folder with the config and each
//! process's log. Binaries come from `target/debug` (build them first:
//! `cargo build --workspace --bins`, which `scripts/test` does).

pub mod client;
pub mod collector;
pub mod fake_remote;
pub mod synapse;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rand::Rng;
use tokio::process::{Child, Command};

pub use client::{Api, TestUser};

/// What to start.
#[derive(Debug, Clone)]
pub struct Spec {
    pub room_workers: usize,
    pub sync_workers: usize,
    pub gateway: bool,
    pub partitions: u32,
    pub lease_ttl_ms: u64,
    pub heartbeat_ms: u64,
    pub pool_size: usize,
    /// Connections each process opens at start. Tests keep this low: several
    /// clusters run at once against one Postgres.
    pub min_connections: usize,
    pub log_filter: String,
    /// Start a federation-receiver (TLS, self-signed); the server name is then
    /// `127.0.0.1:<its port>` so other servers can find it.
    pub federation: Option<FederationSpec>,
    /// Export traces from every process to this OTLP/gRPC endpoint.
    pub otlp_endpoint: Option<String>,
    /// The room-workers' `room_worker.state_cache_events` (their default when None).
    pub state_cache_events: Option<usize>,
    /// The sync-workers' `sync_worker.busy_room_events_per_second` and
    /// `busy_room_response_interval_ms` (their defaults when None).
    pub sync_busy_room: Option<(u32, u64)>,
}

/// Federation settings for a test cluster.
#[derive(Debug, Clone)]
pub struct FederationSpec {
    pub missing_prev_wait_ms: u64,
    pub max_staged_per_room: i64,
    pub staged_batch: i64,
    pub origin_pdus_per_second: u64,
    pub origin_pdu_burst: u64,
    /// The receiver's `federation_receiver.concurrent_memberships`.
    pub concurrent_memberships: usize,
}

impl Default for FederationSpec {
    fn default() -> Self {
        Self {
            missing_prev_wait_ms: 300,
            max_staged_per_room: 100_000,
            staged_batch: 200,
            origin_pdus_per_second: 100_000,
            origin_pdu_burst: 100_000,
            concurrent_memberships: tessera_runtime::config::FederationReceiverConfig::default()
                .concurrent_memberships,
        }
    }
}

impl Spec {
    /// `room_workers` room-workers and a federation-receiver with the default
    /// federation settings.
    pub fn federated(room_workers: usize) -> Self {
        Self {
            room_workers,
            federation: Some(FederationSpec::default()),
            ..Self::default()
        }
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost: (cert PEM, key PEM).
pub fn self_signed() -> (String, String) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("self-signed certificate");
    (cert.cert.pem(), cert.signing_key.serialize_pem())
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            room_workers: 2,
            sync_workers: 1,
            gateway: false,
            partitions: 16,
            lease_ttl_ms: 3000,
            heartbeat_ms: 300,
            pool_size: 6,
            min_connections: 1,
            log_filter: "info,ruma_state_res=warn".to_owned(),
            federation: None,
            otlp_endpoint: None,
            state_cache_events: None,
            sync_busy_room: None,
        }
    }
}

struct Process {
    child: Child,
    admin_port: u16,
    log: PathBuf,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub db_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub shared_secret: String,
    pub client_api_url: String,
    pub sync_urls: Vec<String>,
    pub gateway_url: Option<String>,
    /// The Matrix server name (`127.0.0.1:<federation port>` with federation).
    pub server_name: String,
    spec: Spec,
    config: PathBuf,
    processes: HashMap<String, Process>,
    stopped: std::collections::HashSet<String>,
    next_worker: usize,
    pub http: reqwest::Client,
}

/// An HTTP client for tests and benchmarks. reqwest is built without a
/// default TLS provider in this workspace, so one is installed first.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// A free loopback port for a process to listen on: bound and released,
/// picked below Linux's ephemeral range (32768 and up), where the kernel
/// never hands a port to an outgoing connection (a port from `bind(:0)`
/// was sometimes taken by a database connection before the process bound
/// it), and never the same one twice in this test process.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().expect("ports lock");
    for _ in 0..1000 {
        let port = rand::thread_rng().gen_range(20_000..32_000);
        if !handed_out.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
    panic!("no free port between 20000 and 32000")
}

/// The Python interpreter of a virtualenv `scripts/test` prepares: the one
/// `env` names, else `.local/<venv>/bin/python`; `what` says what it holds,
/// for the failure message when it is missing.
pub fn venv_python(env: &str, venv: &str, what: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let python = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".local").join(venv).join("bin/python"));
    assert!(
        python.exists(),
        "{} is missing: this test needs {what}; run scripts/test, which installs it",
        python.display()
    );
    python
}

/// Where a Tessera binary is: `TESSERA_TEST_BIN_DIR` if set (the benchmark
/// points it at `target/release`), else `target/debug`.
pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("TESSERA_TEST_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root")
                .to_path_buf();
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"))
                .join("debug")
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// Delete every Redis key under `prefix` (a cluster's streams).
async fn delete_redis_keys(redis_url: &str, prefix: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await?;
    for batch in keys.chunks(500) {
        redis::cmd("DEL")
            .arg(batch)
            .query_async::<()>(&mut conn)
            .await?;
    }
    Ok(())
}

pub fn redis_url() -> String {
    std::env::var("TESSERA_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

impl TestCluster {
    pub async fn start(spec: Spec) -> Self {
        let mut dir = tempfile::tempdir().expect("temp dir");
        // For looking at the processes' logs after a run (benchmarks, debugging).
        if std::env::var_os("TESSERA_TEST_KEEP_LOGS").is_some() {
            dir.disable_cleanup(true);
            eprintln!("logs kept in {}", dir.path().display());
        }
        let db_url = tessera_storage::test_util::create_database().await;
        let suffix: u64 = rand::thread_rng().r#gen();
        let redis_prefix = format!("tessera-test-{suffix:016x}");
        let shared_secret = format!("secret-{suffix:x}");
        let api_port = free_port();
        let sync_ports: Vec<u16> = (0..spec.sync_workers).map(|_| free_port()).collect();
        let gateway_port = free_port();
        let config = dir.path().join("tessera.toml");
        let federation_port = free_port();
        let server_name = match spec.federation {
            Some(_) => format!("127.0.0.1:{federation_port}"),
            None => "test.local".to_owned(),
        };
        let federation_section = match &spec.federation {
            Some(f) => {
                let (cert, key) = self_signed();
                let cert_path = dir.path().join("tls.crt");
                let key_path = dir.path().join("tls.key");
                std::fs::write(&cert_path, cert).expect("write cert");
                std::fs::write(&key_path, key).expect("write key");
                format!(
                    r#"
[federation]
verify_certificates = false
missing_prev_wait_ms = {}
max_staged_per_room = {}
staged_batch = {}
origin_pdus_per_second = {}
origin_pdu_burst = {}

[federation_receiver]
listen = "127.0.0.1:{federation_port}"
tls_certificate = "{}"
tls_private_key = "{}"
concurrent_memberships = {}
"#,
                    f.missing_prev_wait_ms,
                    f.max_staged_per_room,
                    f.staged_batch,
                    f.origin_pdus_per_second,
                    f.origin_pdu_burst,
                    cert_path.display(),
                    key_path.display(),
                    f.concurrent_memberships
                )
            }
            None => String::new(),
        };
        let sync_urls: Vec<String> = sync_ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        std::fs::write(
            &config,
            format!(
                r#"server_name = "{server_name}"

[database]
url = "{db_url}"
pool_size = {pool_size}
min_connections = {min_connections}

[redis]
url = "{redis}"
key_prefix = "{redis_prefix}"

[cluster]
partitions = {partitions}
lease_ttl_ms = {ttl}
heartbeat_interval_ms = {hb}

[registration]
shared_secret = "{shared_secret}"

[client_api]
listen = "127.0.0.1:{api_port}"
public_baseurl = "https://client.tessera.test"
well_known_server = "federation.tessera.test:443"

[gateway]
listen = "127.0.0.1:{gateway_port}"
client_api = ["http://127.0.0.1:{api_port}"]
sync_workers = {sync_list:?}

[log]
filter = "{log_filter}"
{telemetry_section}
{room_worker_section}
{sync_worker_section}
{federation_section}"#,
                redis = redis_url(),
                partitions = spec.partitions,
                ttl = spec.lease_ttl_ms,
                hb = spec.heartbeat_ms,
                pool_size = spec.pool_size,
                min_connections = spec.min_connections,
                log_filter = spec.log_filter,
                sync_list = sync_urls,
                room_worker_section = spec
                    .state_cache_events
                    .map(|events| format!("[room_worker]\nstate_cache_events = {events}\n"))
                    .unwrap_or_default(),
                sync_worker_section = spec
                    .sync_busy_room
                    .map(|(rate, interval)| format!(
                        "[sync_worker]\nbusy_room_events_per_second = {rate}\nbusy_room_response_interval_ms = {interval}\n"
                    ))
                    .unwrap_or_default(),
                telemetry_section = match &spec.otlp_endpoint {
                    Some(endpoint) => format!(
                        "[telemetry]\notlp_endpoint = \"{endpoint}\"\nexport_interval_ms = 200\n"
                    ),
                    None => String::new(),
                },
            ),
        )
        .expect("write config");
        let mut cluster = Self {
            dir,
            db_url,
            redis_url: redis_url(),
            redis_prefix,
            shared_secret,
            client_api_url: format!("http://127.0.0.1:{api_port}"),
            sync_urls,
            gateway_url: spec
                .gateway
                .then(|| format!("http://127.0.0.1:{gateway_port}")),
            server_name,
            spec: spec.clone(),
            config,
            processes: HashMap::new(),
            stopped: std::collections::HashSet::new(),
            next_worker: 0,
            http: http_client_builder()
                .timeout(Duration::from_secs(90))
                .build()
                .expect("http client"),
        };
        // The first room-worker migrates; the rest start once it is ready.
        for _ in 0..spec.room_workers {
            let name = cluster.add_room_worker_unready();
            cluster.wait_ready(&name).await;
        }
        cluster.spawn("client-api", "tessera-client-api", &[]);
        for (i, port) in sync_ports.iter().enumerate() {
            cluster.spawn(
                &format!("sync-worker-{i}"),
                "tessera-sync-worker",
                &[("TESSERA_SYNC_WORKER__LISTEN", format!("127.0.0.1:{port}"))],
            );
        }
        if spec.gateway {
            cluster.spawn("gateway", "tessera-gateway", &[]);
        }
        if spec.federation.is_some() {
            cluster.spawn("federation-receiver", "tessera-federation-receiver", &[]);
        }
        let names: Vec<String> = cluster.processes.keys().cloned().collect();
        for name in names {
            cluster.wait_ready(&name).await;
        }
        if spec.room_workers > 0 {
            cluster.wait_balanced().await;
        }
        cluster
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    fn spawn(&mut self, name: &str, binary_name: &str, env: &[(&str, String)]) {
        let admin_port = free_port();
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(binary(binary_name));
        // Our own TESSERA_TEST_* variables would read as config overrides.
        for (key, _) in std::env::vars() {
            if key.starts_with("TESSERA_") {
                command.env_remove(key);
            }
        }
        command
            .env("TESSERA_CONFIG", &self.config)
            .env("TESSERA_ADMIN__LISTEN", format!("127.0.0.1:{admin_port}"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary_name}: {e}"));
        self.processes.insert(
            name.to_owned(),
            Process {
                child,
                admin_port,
                log,
            },
        );
    }

    fn add_room_worker_unready(&mut self) -> String {
        let name = format!("room-worker-{}", self.next_worker);
        self.next_worker += 1;
        let port = free_port();
        self.spawn(
            &name,
            "tessera-room-worker",
            &[
                ("TESSERA_ROOM_WORKER__LISTEN", format!("127.0.0.1:{port}")),
                ("TESSERA_ROOM_WORKER__WORKER_ID", name.clone()),
            ],
        );
        name
    }

    /// Start one more room-worker and wait until it serves.
    pub async fn add_room_worker(&mut self) -> String {
        let name = self.add_room_worker_unready();
        self.wait_ready(&name).await;
        name
    }

    /// Start another process of a role that already runs (e.g. a restarted sync-worker).
    pub async fn restart_sync_worker(&mut self, index: usize) {
        let name = format!("sync-worker-{index}");
        self.kill(&name).await;
        let port: u16 = self.sync_urls[index]
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("sync port");
        self.spawn(
            &name,
            "tessera-sync-worker",
            &[("TESSERA_SYNC_WORKER__LISTEN", format!("127.0.0.1:{port}"))],
        );
        self.stopped.remove(&name);
        self.wait_ready(&name).await;
    }

    pub fn log_tail(&self, name: &str) -> String {
        let text = self
            .processes
            .get(name)
            .and_then(|p| std::fs::read_to_string(&p.log).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Delete every Redis key of this cluster, as a Redis restarted empty
    /// would lose them.
    pub async fn wipe_redis(&self) {
        delete_redis_keys(&self.redis_url, &self.redis_prefix)
            .await
            .expect("delete the cluster's Redis keys");
    }

    /// Stop every process, then drop the cluster's database and delete its
    /// Redis streams (benchmarks, which run outside `scripts/test` and its
    /// clean-up).
    pub async fn remove(self) {
        let database = self.db_url.clone();
        let (redis_url, prefix) = (self.redis_url.clone(), self.redis_prefix.clone());
        drop(self);
        if let Err(error) = tessera_storage::test_util::drop_database(&database).await {
            eprintln!("could not drop the cluster's database {database}: {error}");
        }
        if let Err(error) = delete_redis_keys(&redis_url, &prefix).await {
            eprintln!("could not delete the cluster's Redis keys {prefix}:*: {error}");
        }
    }

    /// A process's Prometheus metrics text.
    pub async fn metrics(&self, name: &str) -> String {
        let port = self.processes[name].admin_port;
        self.http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    pub async fn wait_ready(&mut self, name: &str) {
        let port = self.processes[name].admin_port;
        for _ in 0..600 {
            if let Ok(r) = self
                .http
                .get(format!("http://127.0.0.1:{port}/health/ready"))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            if let Ok(Some(status)) = self
                .processes
                .get_mut(name)
                .expect("process")
                .child
                .try_wait()
            {
                panic!(
                    "{name} exited with {status} while starting:\n{}",
                    self.log_tail(name)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{name} did not become ready in 60 s:\n{}",
            self.log_tail(name)
        );
    }

    /// Wait (bounded) until every partition has a live owner.
    pub async fn wait_all_partitions_owned(&self) {
        let store = self.store().await;
        for _ in 0..300 {
            let leases = store.leases().await.expect("leases");
            if leases.iter().all(|l| l.owner.is_some()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("partitions stayed without owner for 30 s");
    }

    /// Room-workers started and not stopped or killed.
    pub fn live_room_workers(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .processes
            .keys()
            .filter(|n| n.starts_with("room-worker-") && !self.stopped.contains(*n))
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Wait (bounded) until every partition is owned by the worker the
    /// rendezvous assignment picks among the live ones.
    pub async fn wait_balanced(&self) {
        let workers = self.live_room_workers();
        let store = self.store().await;
        for _ in 0..300 {
            let leases = store.leases().await.expect("leases");
            if leases.iter().all(|l| {
                l.owner.as_deref()
                    == tessera_cluster::assignment::desired_owner(l.partition, &workers)
            }) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "partitions did not settle on {workers:?} within 30 s: {:?}",
            self.owners().await
        );
    }

    /// Partitions per owner, from the lease table.
    pub async fn owners(&self) -> HashMap<String, usize> {
        let mut owners = HashMap::new();
        for lease in self.store().await.leases().await.expect("leases") {
            *owners
                .entry(lease.owner.unwrap_or_else(|| "(none)".to_owned()))
                .or_default() += 1;
        }
        owners
    }

    /// A plain connection to the cluster's database, for a test's own checks.
    pub async fn db(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.db_url, tokio_postgres::NoTls)
            .await
            .expect("connect to the cluster's database");
        tokio::spawn(connection);
        client
    }

    pub async fn store(&self) -> tessera_storage::Store {
        tessera_storage::Store::connect(&self.db_url, 2, Duration::from_secs(5))
            .await
            .expect("store")
    }

    pub fn pid(&self, name: &str) -> u32 {
        self.processes[name]
            .child
            .id()
            .unwrap_or_else(|| panic!("{name} is not running"))
    }

    pub fn signal(&self, name: &str, signal: &str) {
        let pid = self.pid(name);
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {name} failed");
    }

    /// SIGTERM and wait for a clean exit (bounded).
    pub async fn stop(&mut self, name: &str) -> std::process::ExitStatus {
        self.signal(name, "TERM");
        self.stopped.insert(name.to_owned());
        let process = self.processes.get_mut(name).expect("process");

        tokio::time::timeout(Duration::from_secs(60), process.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} did not exit within 60 s of SIGTERM"))
            .expect("wait")
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self, name: &str) {
        self.stopped.insert(name.to_owned());
        if let Some(process) = self.processes.get_mut(name) {
            let _ = process.child.kill().await;
        }
    }

    pub fn api(&self) -> Api {
        Api::new(
            self.http.clone(),
            self.client_api_url.clone(),
            self.sync_urls.first().cloned().unwrap_or_default(),
        )
    }

    /// Register a user with the shared secret and log in.
    pub async fn register(&self, name: &str) -> TestUser {
        client::register(
            &self.http,
            &self.client_api_url,
            &self.shared_secret,
            name,
            false,
        )
        .await
    }

    pub async fn register_admin(&self, name: &str) -> TestUser {
        client::register(
            &self.http,
            &self.client_api_url,
            &self.shared_secret,
            name,
            true,
        )
        .await
    }
}

/// An event's (rejected, soft-failed) flags, if it is stored (either keeps it
/// from clients).
pub async fn stored_flags(cluster: &TestCluster, event_id: &str) -> Option<(bool, bool)> {
    let row = cluster
        .db()
        .await
        .query_opt(
            "SELECT rejected, soft_failed FROM events WHERE event_id = $1",
            &[&event_id],
        )
        .await
        .unwrap();
    row.map(|r| (r.get(0), r.get(1)))
}

/// Wait (bounded) until an event is stored; its (rejected, soft-failed) flags.
pub async fn wait_stored(cluster: &TestCluster, event_id: &str) -> (bool, bool) {
    for _ in 0..100 {
        if let Some(flags) = stored_flags(cluster, event_id).await {
            return flags;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{event_id} was never stored");
}
