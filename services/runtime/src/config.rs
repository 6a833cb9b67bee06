//! The cluster-wide configuration: one TOML file shared by every role, with
//! environment overrides (`TESSERA_SECTION__KEY=value`, e.g.
//! `TESSERA_DATABASE__URL=postgres://...`).
//!
//! Every field has a default so a minimal file only needs `server_name`; every
//! section rejects unknown keys so a typo fails the start instead of being ignored.
//! `docs/operations.md` documents each key; `Config::example_toml` renders the
//! defaults so the example never drifts from the code.

use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The environment variable prefix for overrides.
pub const ENV_PREFIX: &str = "TESSERA_";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The Matrix server name: the part after the colon in `@user:server_name`.
    pub server_name: String,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub cluster: ClusterConfig,
    pub registration: RegistrationConfig,
    pub limits: LimitsConfig,
    pub client_api: ClientApiConfig,
    pub room_worker: RoomWorkerConfig,
    pub sync_worker: SyncWorkerConfig,
    pub federation: FederationConfig,
    pub federation_receiver: FederationReceiverConfig,
    pub gateway: GatewayConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost".to_owned(),
            database: DatabaseConfig::default(),
            redis: RedisConfig::default(),
            cluster: ClusterConfig::default(),
            registration: RegistrationConfig::default(),
            limits: LimitsConfig::default(),
            client_api: ClientApiConfig::default(),
            room_worker: RoomWorkerConfig::default(),
            sync_worker: SyncWorkerConfig::default(),
            federation: FederationConfig::default(),
            federation_receiver: FederationReceiverConfig::default(),
            gateway: GatewayConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// libpq-style connection URL of the one shared Postgres database.
    pub url: String,
    /// Connections this process keeps open, at most.
    pub pool_size: usize,
    /// Connections opened at start (at most `pool_size`), so that the first
    /// burst of load does not also pay for connecting: a new Postgres
    /// connection costs a backend process, and its first statements are
    /// prepared afresh, on the cores that burst needs.
    pub min_connections: usize,
    /// Apply pending migrations at start (under an advisory lock, so exactly one
    /// process applies them). Turn off where a migration job runs them instead.
    pub migrate_on_start: bool,
    /// Seconds to keep retrying the first connection before giving up.
    pub connect_timeout_secs: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://root@127.0.0.1:5432/tessera".to_owned(),
            pool_size: 16,
            min_connections: 8,
            migrate_on_start: true,
            connect_timeout_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub url: String,
    /// Prefix of every key this cluster uses, so clusters (and tests) can share a
    /// Redis without seeing each other's streams.
    pub key_prefix: String,
    /// Approximate number of entries kept per partition stream (XADD MAXLEN ~).
    /// Readers that fall further behind catch up from Postgres.
    pub stream_max_len: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/".to_owned(),
            key_prefix: "tessera".to_owned(),
            stream_max_len: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Number of room partitions. Fixed when the cluster is first started: a
    /// process configured with a different value refuses to start.
    pub partitions: u32,
    /// How long a partition lease lasts without renewal. A room-worker killed
    /// with SIGKILL loses its partitions after this long.
    pub lease_ttl_ms: u64,
    /// How often a room-worker heartbeats, renews its leases and rebalances.
    pub heartbeat_interval_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            partitions: 256,
            lease_ttl_ms: 10_000,
            heartbeat_interval_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    /// Open registration: anyone may create an account through `/register`.
    /// Off by default; leave it off on any public server unless you mean it.
    pub open: bool,
    /// Holders of a registration token (`m.login.registration_token`, created
    /// with the Synapse-compatible admin API) may register even while open
    /// registration is off.
    pub tokens: bool,
    /// Shared secret for `/_synapse/admin/v1/register` (the endpoint
    /// `register_new_matrix_user` uses). Unset disables that endpoint.
    pub shared_secret: Option<String>,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            open: false,
            tokens: true,
            shared_secret: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Default and maximum `/sync` timeline length per room.
    pub sync_timeline_limit: u32,
    pub sync_timeline_limit_max: u32,
    /// Longest `/sync` long-poll honoured, in milliseconds.
    pub sync_timeout_max_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            sync_timeline_limit: 20,
            sync_timeline_limit_max: 500,
            sync_timeout_max_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientApiConfig {
    pub listen: SocketAddr,
    /// The URL clients reach the server at, given in
    /// `/.well-known/matrix/client` (default `http://<server_name>`), as
    /// Synapse's `public_baseurl`.
    pub public_baseurl: Option<String>,
    /// When set, `/.well-known/matrix/server` answers `{"m.server": <this>}`
    /// (such as `matrix.example.com:443`), delegating federation for the
    /// server name there; unset, that path is not served.
    pub well_known_server: Option<String>,
}

impl Default for ClientApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8081".parse().expect("literal address"),
            public_baseurl: None,
            well_known_server: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomWorkerConfig {
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// The address other processes use to reach this worker (defaults to
    /// `listen`). In Kubernetes, the pod's DNS name or IP and port.
    pub advertise: Option<String>,
    /// Stable identity of this worker; defaults to `<hostname>-<pid>`.
    pub worker_id: Option<String>,
    /// Rooms processed concurrently; each room is still strictly sequential.
    pub concurrency: usize,
    /// Most events taken from one room in one turn of the fair scheduler.
    pub batch_size: usize,
    /// How long SIGTERM waits for in-flight work before handing partitions over anyway.
    pub drain_timeout_ms: u64,
    /// Postgres connections of the bulk lane (backlogged rooms' turns and a
    /// flood's staging). Their statements run at the database's normal
    /// priority whatever the lane's threads do, so this caps how much of
    /// the database a flood can use at once: one connection, at most one
    /// backend's CPU per worker, leaves the rest to quiet rooms.
    pub bulk_connections: usize,
    /// How many state events the rooms' current states kept in memory
    /// between turns may hold in all (about 6 KiB each); past it, the rooms
    /// used least recently are read from Postgres again on their next turn.
    /// A room larger than this alone is still kept while in use.
    pub state_cache_events: usize,
}

impl Default for RoomWorkerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9101".parse().expect("literal address"),
            advertise: None,
            worker_id: None,
            concurrency: 8,
            batch_size: 50,
            drain_timeout_ms: 20_000,
            bulk_connections: 1,
            state_cache_events: 100_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncWorkerConfig {
    pub listen: SocketAddr,
    /// Seconds between two sync checkpoints written by this worker (see
    /// `docs/architecture.md`, "Sync tokens").
    pub checkpoint_interval_secs: u64,
    /// Days a sync token stays valid.
    pub token_lifetime_days: u64,
    /// Events a second (over the last second or two) from which a room is
    /// busy for `/sync` (0: no room is).
    pub busy_room_events_per_second: u32,
    /// A device whose only news is busy rooms' events gets at most one such
    /// answer per this many milliseconds, counted from its request; news in
    /// any other room, or for the user, is answered at once (0: off).
    pub busy_room_response_interval_ms: u64,
}

impl Default for SyncWorkerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8082".parse().expect("literal address"),
            checkpoint_interval_secs: 60,
            token_lifetime_days: 30,
            busy_room_events_per_second: 20,
            busy_room_response_interval_ms: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Check remote servers' TLS certificates. Turn off only on test networks
    /// (loopback benchmarks), as Synapse's `federation_verify_certificates`.
    pub verify_certificates: bool,
    /// Servers trusted to vouch for other servers' keys (notaries), asked when
    /// a server's own key endpoint cannot be reached.
    pub trusted_key_servers: Vec<String>,
    /// How long our published key response says it is valid, in hours.
    pub key_validity_hours: u64,
    /// Staged PDUs a room may have before new transactions carrying PDUs for
    /// it are answered 429 (only that room's origins are slowed).
    pub max_staged_per_room: i64,
    /// Sustained PDUs per second accepted from one origin (per receiver), and
    /// the burst above it, an EDU counting as a PDU; beyond them the origin
    /// gets 429.
    pub origin_pdus_per_second: u64,
    pub origin_pdu_burst: u64,
    /// How long a PDU whose prev_events are missing waits for them to arrive
    /// in other transactions before they are fetched from the origin.
    pub missing_prev_wait_ms: u64,
    /// Staged PDUs a room-worker processes for one room in one turn.
    pub staged_batch: i64,
    /// How long the answer to an inbound transaction is kept to answer the
    /// origin's retries of it; receivers delete older records every half
    /// hour. (Synapse keeps a month; here a retry answered after that is
    /// processed again, which changes nothing, so a day is plenty.)
    pub transaction_retention_hours: u64,
    /// A signing key file in Synapse's `signing.key` format (`ed25519
    /// <version> <unpadded base64 seed>`), to keep a server's key, such as
    /// one moving from Synapse. Unset: the cluster generates a key on first
    /// start and keeps it in Postgres.
    pub signing_key_path: Option<std::path::PathBuf>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            verify_certificates: true,
            trusted_key_servers: vec![],
            key_validity_hours: 24 * 7,
            max_staged_per_room: 100_000,
            origin_pdus_per_second: 5_000,
            origin_pdu_burst: 20_000,
            missing_prev_wait_ms: 1_000,
            staged_batch: 200,
            transaction_retention_hours: 24,
            signing_key_path: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationReceiverConfig {
    /// Where the server-server API listens (plain HTTP behind a TLS-terminating
    /// proxy, or TLS itself when a certificate is configured).
    pub listen: SocketAddr,
    /// PEM certificate chain and private key: serve TLS directly (as on 8448).
    pub tls_certificate: Option<String>,
    pub tls_private_key: Option<String>,
    /// Membership events (send_join, send_leave, send_knock) handed to the
    /// rooms' owners at once; more wait their turn. A join's answer can hold
    /// a large room's whole state (tens of MB in a room with 20,000 members
    /// when the joining server does not ask for `omit_members`), so this
    /// bounds what a wave of joins can make a receiver hold.
    pub concurrent_memberships: usize,
}

impl Default for FederationReceiverConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8448".parse().expect("literal address"),
            tls_certificate: None,
            tls_private_key: None,
            concurrent_memberships: 8,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Base URLs of client-api processes.
    pub client_api: Vec<String>,
    /// Base URLs of sync-worker processes; requests are spread by access token.
    pub sync_workers: Vec<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8008".parse().expect("literal address"),
            client_api: vec!["http://127.0.0.1:8081".to_owned()],
            sync_workers: vec!["http://127.0.0.1:8082".to_owned()],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct AdminConfig {
    /// Health and metrics listener (`/health/live`, `/health/ready`, `/metrics`).
    /// Unset disables it.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter directives; `RUST_LOG` wins when set.
    pub filter: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info,ruma_state_res=warn".to_owned(),
            format: "text".to_owned(),
        }
    }
}

/// OpenTelemetry traces, exported over OTLP (gRPC) when an endpoint is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The OTLP/gRPC collector, such as `http://otel-collector:4317`. Unset
    /// (the default): no traces are recorded or exported.
    pub otlp_endpoint: Option<String>,
    /// The share of traces kept (0.0 to 1.0) for requests that arrive
    /// without a sampling decision; a `traceparent` header's decision wins.
    pub sample_ratio: f64,
    /// How often finished spans are sent, in milliseconds.
    pub export_interval_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            export_interval_ms: 5000,
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} does not exist")]
    Missing { path: String },
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Semantic(String),
}

impl Config {
    /// Load defaults, then the TOML file (if given), then `TESSERA_*` variables
    /// from `env` (passed in so tests never mutate the process environment).
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Missing {
                    path: path.display().to_string(),
                });
            }
            figment = figment.merge(Toml::file(path));
        }
        // The same semantics as figment's `Env` provider (`__` nests, values parsed
        // leniently as TOML-ish scalars), but over a map the caller hands in.
        let mut overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != "TESSERA_CONFIG")
            .collect();
        overrides.sort();
        for (key, value) in overrides {
            let path = key[ENV_PREFIX.len()..]
                .to_ascii_lowercase()
                .replace("__", ".");
            let value: figment::value::Value = value.parse().expect("infallible");
            figment = figment.merge(Serialized::default(&path, value));
        }
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if ruma_server_name_is_valid(&self.server_name).is_err() {
            return Err(ConfigError::Semantic(format!(
                "server_name {:?} is not a valid Matrix server name",
                self.server_name
            )));
        }
        if self.cluster.partitions == 0 || self.cluster.partitions > 65_536 {
            return Err(ConfigError::Semantic(
                "cluster.partitions must be between 1 and 65536".to_owned(),
            ));
        }
        if self.cluster.heartbeat_interval_ms * 2 > self.cluster.lease_ttl_ms {
            return Err(ConfigError::Semantic(
                "cluster.lease_ttl_ms must be at least twice cluster.heartbeat_interval_ms"
                    .to_owned(),
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::Semantic(
                "log.format must be \"text\" or \"json\"".to_owned(),
            ));
        }
        if self.federation_receiver.concurrent_memberships == 0 {
            return Err(ConfigError::Semantic(
                "federation_receiver.concurrent_memberships must be at least 1".to_owned(),
            ));
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return Err(ConfigError::Semantic(
                "telemetry.sample_ratio must be between 0.0 and 1.0".to_owned(),
            ));
        }
        Ok(())
    }

    /// The defaults rendered as TOML: the basis of the example config file.
    pub fn example_toml() -> String {
        toml_render(&Config::default())
    }
}

/// A server name is a host (DNS name, IPv4, or bracketed IPv6) and an optional port.
fn ruma_server_name_is_valid(name: &str) -> Result<(), ()> {
    if name.is_empty() || name.len() > 255 {
        return Err(());
    }
    let (host, port) = match name.rsplit_once(':') {
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (name, None),
        Some((h, p)) => (h, Some(p)),
        None => (name, None),
    };
    if let Some(port) = port {
        port.parse::<u16>().map_err(|_| ())?;
    }
    if host.starts_with('[') {
        return if host.ends_with(']') { Ok(()) } else { Err(()) };
    }
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(());
    }
    Ok(())
}

fn toml_render(config: &Config) -> String {
    // figment has no serializer; a JSON detour through the `toml` crate would add a
    // dependency, so render the handful of sections by hand from their Serialize form.
    let value = serde_json::to_value(config).expect("config serializes");
    let mut out = String::new();
    let object = value.as_object().expect("config is an object");
    for (key, value) in object {
        if !value.is_object() {
            out.push_str(&format!("{key} = {}\n", render_scalar(value)));
        }
    }
    for (section, value) in object {
        if let Some(fields) = value.as_object() {
            out.push_str(&format!("\n[{section}]\n"));
            for (key, value) in fields {
                if value.is_null() {
                    out.push_str(&format!("# {key} =\n"));
                } else {
                    out.push_str(&format!("{key} = {}\n", render_scalar(value)));
                }
            }
        }
    }
    out
}

fn render_scalar(value: &serde_json::Value) -> String {
    // JSON strings, numbers, booleans and arrays of them are valid TOML as written.
    value.to_string()
}

#[cfg(test)]
mod tests;
