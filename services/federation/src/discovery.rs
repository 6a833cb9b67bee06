//! Server discovery: from a server name to the base URL of its federation API
//! and the `Host` header to send, following the spec's order:
//!
//! 1. an IP literal: that address, with its port or 8448;
//! 2. a hostname with an explicit port: that host and port;
//! 3. `https://<hostname>/.well-known/matrix/server`, whose `m.server` is then
//!    resolved by 1 and 2, else by SRV (`_matrix-fed._tcp`, then the older
//!    `_matrix._tcp`), else on port 8448;
//! 4. without a well-known: SRV for the hostname, else the hostname on 8448.
//!
//! Answers are cached for an hour (failures of the well-known for ten
//! minutes). When SRV points at another host we connect to that host by name,
//! so TLS is checked against the target's name rather than the delegated one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ruma::{OwnedServerName, ServerName};

const DEFAULT_PORT: u16 = 8448;

/// Where to send requests for a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `https://host:port`
    pub base_url: String,
    /// The `Host` header: the server name, or the delegated name.
    pub host_header: String,
}

/// A server name split into host and optional port.
pub fn split(server: &str) -> (String, Option<u16>) {
    if let Some(rest) = server.strip_prefix('[') {
        // [IPv6]:port
        if let Some((host, after)) = rest.split_once(']') {
            let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
            return (format!("[{host}]"), port);
        }
    }
    match server.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host.to_owned(), port.parse().ok()),
        _ => (server.to_owned(), None),
    }
}

fn is_ip_literal(host: &str) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok()
}

/// Steps 1 and 2: the answer when no network lookup is needed.
pub fn resolve_without_lookup(name: &str) -> Option<Target> {
    let (host, port) = split(name);
    if is_ip_literal(&host) || port.is_some() {
        let port = port.unwrap_or(DEFAULT_PORT);
        return Some(Target {
            base_url: format!("https://{host}:{port}"),
            host_header: name.to_owned(),
        });
    }
    None
}

pub struct Discovery {
    http: reqwest::Client,
    cache: Mutex<HashMap<OwnedServerName, (Target, Instant)>>,
}

impl Discovery {
    pub fn new(http: reqwest::Client) -> Self {
        Self {
            http,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn resolve(&self, server: &ServerName) -> Target {
        if let Some(target) = resolve_without_lookup(server.as_str()) {
            return target;
        }
        if let Some((target, until)) = self.cache.lock().expect("discovery cache").get(server)
            && Instant::now() < *until
        {
            return target.clone();
        }
        let (target, ttl) = self.lookup(server.as_str()).await;
        self.cache
            .lock()
            .expect("discovery cache")
            .insert(server.to_owned(), (target.clone(), Instant::now() + ttl));
        target
    }

    async fn lookup(&self, host: &str) -> (Target, Duration) {
        let well_known = self
            .http
            .get(format!("https://{host}/.well-known/matrix/server"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success());
        let delegated = match well_known {
            Some(response) => response
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| {
                    v.get("m.server")
                        .and_then(|s| s.as_str())
                        .map(str::to_owned)
                }),
            None => None,
        };
        match delegated {
            Some(delegated) => {
                if let Some(target) = resolve_without_lookup(&delegated) {
                    return (target, Duration::from_secs(3600));
                }
                (srv_or_default(&delegated).await, Duration::from_secs(3600))
            }
            None => (srv_or_default(host).await, Duration::from_secs(600)),
        }
    }
}

/// SRV `_matrix-fed._tcp` then `_matrix._tcp`, else the host on 8448.
async fn srv_or_default(host: &str) -> Target {
    if let Ok(Ok(resolver)) = hickory_resolver::Resolver::builder_tokio().map(|b| b.build()) {
        for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
            if let Ok(records) = resolver.srv_lookup(format!("{service}.{host}.")).await
                && let Some(record) = records
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        hickory_resolver::proto::rr::RData::SRV(srv) => Some(srv),
                        _ => None,
                    })
                    .min_by_key(|s| s.priority)
            {
                let target = record.target.to_utf8();
                return Target {
                    base_url: format!("https://{}:{}", target.trim_end_matches('.'), record.port),
                    host_header: host.to_owned(),
                };
            }
        }
    }
    Target {
        base_url: format!("https://{host}:{DEFAULT_PORT}"),
        host_header: host.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_addresses_and_explicit_ports_need_no_lookup() {
        let t = resolve_without_lookup("127.0.0.1:8449").unwrap();
        assert_eq!(
            (t.base_url.as_str(), t.host_header.as_str()),
            ("https://127.0.0.1:8449", "127.0.0.1:8449")
        );
        let t = resolve_without_lookup("127.0.0.1").unwrap();
        assert_eq!(t.base_url, "https://127.0.0.1:8448");
        let t = resolve_without_lookup("[::1]:8000").unwrap();
        assert_eq!(t.base_url, "https://[::1]:8000");
        let t = resolve_without_lookup("[::1]").unwrap();
        assert_eq!(t.base_url, "https://[::1]:8448");
        let t = resolve_without_lookup("matrix.example.org:443").unwrap();
        assert_eq!(
            (t.base_url.as_str(), t.host_header.as_str()),
            ("https://matrix.example.org:443", "matrix.example.org:443")
        );
        assert_eq!(
            resolve_without_lookup("example.org"),
            None,
            "a bare hostname needs well-known or SRV"
        );
    }
}
