//! Helpers shared by this crate's unit tests.

use std::sync::OnceLock;

use ruma::{OwnedUserId, ServerName, UserId};
use serde_json::Value;

use crate::build::EventTemplate;
use crate::keys::SigningKey;

pub fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let (doc, version) = SigningKey::generate();
        SigningKey::from_document(&doc, &version).unwrap()
    })
}

pub fn server() -> &'static ServerName {
    <&ServerName>::try_from("test.local").unwrap()
}

pub fn user(name: &str) -> OwnedUserId {
    UserId::parse(format!("@{name}:test.local")).unwrap()
}

pub fn template(
    sender: &str,
    kind: &str,
    state_key: Option<&str>,
    content: Value,
) -> EventTemplate {
    EventTemplate {
        kind: kind.to_owned(),
        state_key: state_key.map(str::to_owned),
        content,
        sender: user(sender),
        origin_server_ts: 1_700_000_000_000,
        redacts: None,
    }
}
