//! Outbound federation requests, signed with `X-Matrix` (key fetches are not
//! signed: they are how a server learns our key in the first place).

use std::sync::Arc;
use std::time::Duration;

use ruma::api::federation::authentication::{XMatrix, XMatrixSigningInput};
use ruma::{OwnedServerName, ServerName};
use serde_json::Value;
use tessera_events::keys::SigningKey;

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
        Self {
            http,
            origin,
            key,
            discovery,
        }
    }

    pub fn origin(&self) -> &ServerName {
        &self.origin
    }

    pub fn key(&self) -> &SigningKey {
        &self.key
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
        let target = self.discovery.resolve(destination).await;
        let bytes = body
            .map(|b| serde_json::to_vec(b).expect("JSON values serialize"))
            .unwrap_or_default();
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
        if body.is_some() {
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
        serde_json::from_str(&text).map_err(|e| FederationError::Json {
            destination: destination.to_string(),
            error: e.to_string(),
        })
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
