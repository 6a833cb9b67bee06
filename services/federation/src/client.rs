//! Outbound federation requests, signed with `X-Matrix` (key fetches are not
//! signed: they are how a server learns our key in the first place).

use std::sync::Arc;
use std::time::Duration;

use ruma::api::federation::authentication::{XMatrix, XMatrixSigningInput};
use ruma::{OwnedServerName, ServerName};
use serde_json::Value;
use tessera_events::keys::SigningKey;
use tracing::Instrument;

use crate::discovery::Discovery;

#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("{destination}: {error}")]
    Transport { destination: String, error: String },
    #[error("{destination} answered {status}: {body}")]
    Status {
        destination: String,
        status: u16,
        body: String,
    },
    #[error("{destination} answered with invalid JSON: {error}")]
    Json { destination: String, error: String },
    #[error("cannot sign the request: {0}")]
    Signing(String),
}

pub struct FederationClient {
    inner: Arc<Inner>,
    /// The runtime the client was made on, unless that was a low-priority
    /// one. A request from a low-priority runtime's thread (a flooded room's
    /// turn, a large transaction) runs there instead: the connection it
    /// opens is driven by the runtime it was opened on, and a quiet request
    /// that later takes it from the pool would wait for that runtime's
    /// busy, low-priority threads on every read.
    home: Option<tokio::runtime::Handle>,
}

struct Inner {
    http: reqwest::Client,
    origin: OwnedServerName,
    key: Arc<SigningKey>,
    discovery: Discovery,
}

impl FederationClient {
    /// `verify_certificates: false` only for test networks (see the config).
    pub fn new(origin: OwnedServerName, key: Arc<SigningKey>, verify_certificates: bool) -> Self {
        crate::install_tls_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .tls_danger_accept_invalid_certs(!verify_certificates)
            .pool_max_idle_per_host(32)
            .build()
            .expect("the TLS provider is installed");
        let discovery = Discovery::new(http.clone());
        let home = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|_| !tessera_runtime::bulk::on_low_priority_thread());
        Self {
            inner: Arc::new(Inner {
                http,
                origin,
                key,
                discovery,
            }),
            home,
        }
    }

    pub fn origin(&self) -> &ServerName {
        &self.inner.origin
    }

    pub fn key(&self) -> &SigningKey {
        &self.inner.key
    }

    pub async fn get(
        &self,
        destination: &ServerName,
        path: &str,
    ) -> Result<Value, FederationError> {
        self.send(http::Method::GET, destination, path, None, true)
            .await
    }

    pub async fn post(
        &self,
        destination: &ServerName,
        path: &str,
        body: &Value,
    ) -> Result<Value, FederationError> {
        self.send(http::Method::POST, destination, path, Some(body), true)
            .await
    }

    pub async fn put(
        &self,
        destination: &ServerName,
        path: &str,
        body: &Value,
    ) -> Result<Value, FederationError> {
        self.send(http::Method::PUT, destination, path, Some(body), true)
            .await
    }

    /// An unauthenticated GET (the key endpoints).
    pub async fn get_unsigned(
        &self,
        destination: &ServerName,
        path: &str,
    ) -> Result<Value, FederationError> {
        self.send(http::Method::GET, destination, path, None, false)
            .await
    }

    /// An unauthenticated POST (notary key queries).
    pub async fn post_unsigned(
        &self,
        destination: &ServerName,
        path: &str,
        body: &Value,
    ) -> Result<Value, FederationError> {
        self.send(http::Method::POST, destination, path, Some(body), false)
            .await
    }

    async fn send(
        &self,
        method: http::Method,
        destination: &ServerName,
        path: &str,
        body: Option<&Value>,
        sign: bool,
    ) -> Result<Value, FederationError> {
        let bytes = body.map(|b| serde_json::to_vec(b).expect("JSON values serialize"));
        let text = match self
            .home
            .as_ref()
            .filter(|_| tessera_runtime::bulk::on_low_priority_thread())
        {
            None => {
                self.inner
                    .exchange(method, destination, path, bytes, sign)
                    .await?
            }
            Some(home) => {
                let (inner, to, path) = (
                    Arc::clone(&self.inner),
                    destination.to_owned(),
                    path.to_owned(),
                );
                // In the caller's span, so the request's trace context goes
                // out; the answer is parsed back here, at the caller's priority.
                let on_home = home.spawn(
                    async move { inner.exchange(method, &to, &path, bytes, sign).await }
                        .instrument(tracing::Span::current()),
                );
                match on_home.await {
                    Ok(text) => text?,
                    Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                    Err(_) => {
                        return Err(FederationError::Transport {
                            destination: destination.to_string(),
                            error: "the request's task was cancelled (shutting down)".to_owned(),
                        });
                    }
                }
            }
        };
        serde_json::from_str(&text).map_err(|e| FederationError::Json {
            destination: destination.to_string(),
            error: e.to_string(),
        })
    }
}

impl Inner {
    /// The request's answer as text, on whichever runtime calls it.
    async fn exchange(
        &self,
        method: http::Method,
        destination: &ServerName,
        path: &str,
        body: Option<Vec<u8>>,
        sign: bool,
    ) -> Result<String, FederationError> {
        let target = self.discovery.resolve(destination).await;
        let has_body = body.is_some();
        let bytes = body.unwrap_or_default();
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", target.base_url))
            .header("host", &target.host_header);
        if sign {
            let for_signing = http::Request::builder()
                .method(method.clone())
                .uri(path)
                .body(bytes.as_slice())
                .map_err(|e| FederationError::Signing(e.to_string()))?;
            let xmatrix = XMatrix::sign_http_request(
                &for_signing,
                XMatrixSigningInput::new(
                    self.origin.clone(),
                    destination.to_owned(),
                    self.key.pair(),
                ),
            )
            .map_err(|e| FederationError::Signing(e.to_string()))?;
            request = request.header(
                http::header::AUTHORIZATION,
                http::HeaderValue::from(&xmatrix),
            );
        }
        if has_body {
            request = request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(bytes);
        }
        let mut trace_headers = http::HeaderMap::new();
        tessera_runtime::traces::inject_headers(&mut trace_headers);
        request = request.headers(trace_headers);
        let started = std::time::Instant::now();
        let response = request
            .send()
            .await
            .map_err(|e| FederationError::Transport {
                destination: destination.to_string(),
                error: error_chain(&e),
            })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| FederationError::Transport {
                destination: destination.to_string(),
                error: e.to_string(),
            })?;
        metrics::histogram!("tessera_federation_client_request_seconds", "method" => method.to_string())
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("tessera_federation_client_requests_total", "method" => method.to_string(), "code" => status.as_u16().to_string())
            .increment(1);
        if !status.is_success() {
            return Err(FederationError::Status {
                destination: destination.to_string(),
                status: status.as_u16(),
                body: text.chars().take(500).collect(),
            });
        }
        Ok(text)
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A request made on a low-priority runtime's thread runs on the
    /// client's home runtime: the connection it opens, kept in the pool for
    /// later requests, leaves no task on the low-priority runtime.
    #[test]
    fn requests_from_low_priority_threads_run_on_the_home_runtime() {
        let home = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (server, client) = home.block_on(async {
            let routes = axum::Router::new().route(
                "/_matrix/federation/v1/version",
                axum::routing::get(|| async { r#"{"server":{}}"# }),
            );
            let (document, version) = SigningKey::generate();
            let key = Arc::new(SigningKey::from_document(&document, &version).unwrap());
            let origin = OwnedServerName::try_from("origin.test").unwrap();
            let client = FederationClient::new(origin, key, false);
            (crate::tls::tests::start(routes).await, Arc::new(client))
        });
        let bulk = tessera_runtime::bulk::low_priority_runtime("test-client-bulk", 1).unwrap();
        let destination = OwnedServerName::try_from(server.address.to_string()).unwrap();
        let answer = home
            .block_on(bulk.spawn({
                let client = Arc::clone(&client);
                async move {
                    assert!(tessera_runtime::bulk::on_low_priority_thread());
                    client
                        .get(&destination, "/_matrix/federation/v1/version")
                        .await
                }
            }))
            .unwrap()
            .unwrap();
        assert_eq!(answer["server"], serde_json::json!({}));
        // The finished task itself leaves the count a moment after its
        // answer; a connection's task would stay as long as the pool keeps it.
        for _ in 0..200 {
            if bulk.metrics().num_alive_tasks() == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            bulk.metrics().num_alive_tasks(),
            0,
            "the pooled connection is not driven by the low-priority runtime"
        );
        drop(server);
    }
}
