//! What every handler can reach.

use std::sync::Arc;

use ruma::{OwnedServerName, ServerName};
use tessera_cluster::router::RoomRouter;
use tessera_matrix_http::auth::HasStore;
use tessera_replication::Publisher;
use tessera_runtime::Config;
use tessera_storage::Store;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub store: Store,
    pub router: RoomRouter,
    pub publisher: Publisher,
    pub config: Config,
    pub server_name: OwnedServerName,
}

impl AppState {
    pub fn new(store: Store, router: RoomRouter, publisher: Publisher, config: Config) -> Self {
        let server_name =
            OwnedServerName::try_from(config.server_name.clone()).expect("validated server_name");
        Self(Arc::new(Inner {
            store,
            router,
            publisher,
            config,
            server_name,
        }))
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Inner {
    pub fn server_name(&self) -> &ServerName {
        &self.server_name
    }

    /// Whether a user ID belongs to this server.
    pub fn is_local(&self, user_id: &ruma::UserId) -> bool {
        user_id.server_name() == self.server_name
    }
}

impl HasStore for AppState {
    fn store(&self) -> &Store {
        &self.0.store
    }
}
