//! Synapse (from PyPI) as a real federation peer of a test cluster: one
//! process on loopback with its own SQLite database, federation over TLS
//! (self-signed; certificate checks off and loopback allowed, as on a test
//! network), open registration and raised rate limits.
//!
//! `scripts/test` installs matrix-synapse into `.local/synapse-venv` and
//! points `TESSERA_TEST_SYNAPSE_PYTHON` at its interpreter.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::client::enc;
use crate::{free_port, http_client_builder, self_signed, venv_python};

/// The matrix-synapse release the tests (and the benchmark) install.
pub const VERSION: &str = "1.163.0";

/// The password of every user [`Synapse::register`] makes.
pub const PASSWORD: &str = "a-long-test-password";

pub struct Synapse {
    pub server_name: String,
    pub client_url: String,
    dir: tempfile::TempDir,
    child: Child,
    http: reqwest::Client,
}

impl Synapse {
    /// Start Synapse and wait (bounded) until its client API answers.
    pub async fn start() -> Synapse {
        let python = venv_python(
            "TESSERA_TEST_SYNAPSE_PYTHON",
            "synapse-venv",
            &format!("matrix-synapse {VERSION}"),
        );
        let dir = tempfile::tempdir().expect("temporary folder");
        let (client_port, federation_port) = (free_port(), free_port());
        let server_name = format!("127.0.0.1:{federation_port}");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let (cert, key) = self_signed();
        std::fs::write(path("tls.crt"), cert).expect("write cert");
        std::fs::write(path("tls.key"), key).expect("write key");
        let limit = "{ per_second: 1000, burst_count: 1000 }";
        let config = format!(
            r#"server_name: "{server_name}"
pid_file: {pid}
signing_key_path: {signing}
media_store_path: {media}
log_config: {log_config}
report_stats: false
trusted_key_servers: []
suppress_key_server_warning: true
enable_registration: true
enable_registration_without_verification: true
tls_certificate_path: {cert}
tls_private_key_path: {key}
federation_verify_certificates: false
ip_range_whitelist: ["127.0.0.0/8"]
federation_ip_range_blacklist: []
listeners:
  - {{ port: {client_port}, bind_addresses: ["127.0.0.1"], type: http, tls: false, x_forwarded: false,
      resources: [ {{ names: [client], compress: false }} ] }}
  - {{ port: {federation_port}, bind_addresses: ["127.0.0.1"], type: http, tls: true,
      resources: [ {{ names: [federation, keys], compress: false }} ] }}
database: {{ name: sqlite3, args: {{ database: {db} }} }}
rc_message: {limit}
rc_registration: {limit}
rc_login: {{ address: {limit}, account: {limit} }}
rc_joins: {{ local: {limit}, remote: {limit} }}
rc_room_creation: {limit}
presence: {{ enabled: false }}
"#,
            pid = path("homeserver.pid"),
            signing = path("signing.key"),
            media = path("media"),
            log_config = path("log.yaml"),
            cert = path("tls.crt"),
            key = path("tls.key"),
            db = path("homeserver.db"),
        );
        std::fs::write(path("homeserver.yaml"), config).expect("write config");
        std::fs::write(
            path("log.yaml"),
            format!(
                "version: 1\n\
                 formatters: {{ plain: {{ format: '%(asctime)s %(levelname)s %(name)s %(message)s' }} }}\n\
                 handlers: {{ file: {{ class: logging.FileHandler, filename: {}, formatter: plain }} }}\n\
                 root: {{ level: INFO, handlers: [file] }}\n\
                 disable_existing_loggers: false\n",
                path("homeserver.log")
            ),
        )
        .expect("write log config");
        let generated = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "--generate-keys", "-c"])
            .arg(path("homeserver.yaml"))
            .output()
            .await
            .expect("run synapse --generate-keys");
        assert!(
            generated.status.success(),
            "synapse --generate-keys: {}",
            String::from_utf8_lossy(&generated.stderr)
        );
        let stdout = std::fs::File::create(path("stdout.log")).expect("stdout log");
        let child = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(path("homeserver.yaml"))
            .stdout(stdout.try_clone().expect("stdout log"))
            .stderr(stdout)
            .kill_on_drop(true)
            .spawn()
            .expect("start synapse");
        let mut synapse = Synapse {
            server_name,
            client_url: format!("http://127.0.0.1:{client_port}"),
            dir,
            child,
            http: http_client_builder().build().expect("HTTP client"),
        };
        for _ in 0..240 {
            if let Ok(answer) = synapse
                .http
                .get(format!("{}/health", synapse.client_url))
                .send()
                .await
                && answer.status().is_success()
            {
                return synapse;
            }
            if let Ok(Some(status)) = synapse.child.try_wait() {
                panic!("Synapse exited ({status}):\n{}", synapse.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("Synapse did not start within 60 s:\n{}", synapse.log_tail());
    }

    /// The end of Synapse's log and output, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut tail = String::new();
        for name in ["stdout.log", "homeserver.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(40);
            tail.push_str(&format!("--- {name}\n{}\n", lines[start..].join("\n")));
        }
        tail
    }

    /// A client-server API call as `token`: (status, body).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.client_url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = request.send().await.expect("Synapse answers");
        let status = answer.status().as_u16();
        let body = answer.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Send a text message to `room` as `token`'s user: (status, body).
    pub async fn send_text(&self, token: &str, room: &str, txn: &str, text: &str) -> (u16, Value) {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(room)
        );
        let content = json!({ "msgtype": "m.text", "body": text });
        self.call(Method::PUT, &path, Some(token), Some(content))
            .await
    }

    /// Redact `event_id` in `room` as `token`'s user: (status, body).
    pub async fn redact(
        &self,
        token: &str,
        room: &str,
        event_id: &str,
        txn: &str,
        reason: Option<&str>,
    ) -> (u16, Value) {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/redact/{}/{txn}",
            enc(room),
            enc(event_id)
        );
        let body = reason.map_or_else(|| json!({}), |reason| json!({ "reason": reason }));
        self.call(Method::PUT, &path, Some(token), Some(body)).await
    }

    /// Leave `room` as `token`'s user: (status, body).
    pub async fn leave(&self, token: &str, room: &str) -> (u16, Value) {
        let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(room));
        self.call(Method::POST, &path, Some(token), Some(json!({})))
            .await
    }

    /// Register a user (open registration, with [`PASSWORD`]); returns
    /// (user ID, access token).
    pub async fn register(&self, localpart: &str) -> (String, String) {
        let (status, body) = self
            .call(
                Method::POST,
                "/_matrix/client/v3/register",
                None,
                Some(json!({
                    "username": localpart,
                    "password": PASSWORD,
                    "auth": { "type": "m.login.dummy" },
                })),
            )
            .await;
        assert_eq!(status, 200, "register {localpart} on Synapse: {body}");
        (
            body["user_id"].as_str().expect("user_id").to_owned(),
            body["access_token"].as_str().expect("token").to_owned(),
        )
    }
}
