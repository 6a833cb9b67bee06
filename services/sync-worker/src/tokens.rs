//! Since tokens in and out. The encoding is `tessera_replication::token`; this
//! module adds the checkpoints' storage: a cache of those it has read, and the
//! one this worker encodes against (replaced every `checkpoint_interval_secs`,
//! or at once when a token would grow past the size bound).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tessera_replication::token::{Token, TokenError, encode_against};
use tessera_storage::{Store, StoreError};

pub struct Tokens {
    store: Store,
    partitions: usize,
    current: Mutex<Option<(u64, Arc<Vec<i64>>)>>,
    cache: Mutex<HashMap<u64, Arc<Vec<i64>>>>,
}

/// A decoded since token.
pub struct Since {
    pub positions: Vec<i64>,
    pub user_pos: i64,
}

#[derive(Debug)]
pub enum SinceError {
    Token(TokenError),
    Store(StoreError),
}

impl Tokens {
    pub fn new(store: Store, partitions: usize) -> Self {
        Self {
            store,
            partitions,
            current: Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn checkpoint(&self, id: u64) -> Result<Arc<Vec<i64>>, SinceError> {
        if let Some(v) = self.cache.lock().expect("cache lock").get(&id) {
            return Ok(Arc::clone(v));
        }
        let vector = self
            .store
            .checkpoint(id as i64)
            .await
            .map_err(SinceError::Store)?
            .ok_or(SinceError::Token(TokenError::Expired))?;
        if vector.len() != self.partitions {
            return Err(SinceError::Token(TokenError::WrongCluster));
        }
        let vector = Arc::new(vector);
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= 1024 {
            cache.clear();
        }
        cache.insert(id, Arc::clone(&vector));
        Ok(vector)
    }

    pub async fn decode(&self, text: &str) -> Result<Since, SinceError> {
        let token = Token::decode(text).map_err(SinceError::Token)?;
        let checkpoint = self.checkpoint(token.checkpoint).await?;
        let positions = token.positions(&checkpoint).map_err(SinceError::Token)?;
        Ok(Since {
            positions,
            user_pos: token.user_pos,
        })
    }

    async fn store_checkpoint(
        &self,
        positions: &[i64],
    ) -> Result<(u64, Arc<Vec<i64>>), StoreError> {
        let id = self.store.create_checkpoint(positions).await? as u64;
        let vector = Arc::new(positions.to_vec());
        *self.current.lock().expect("current lock") = Some((id, Arc::clone(&vector)));
        self.cache
            .lock()
            .expect("cache lock")
            .insert(id, Arc::clone(&vector));
        metrics::counter!("tessera_sync_checkpoints_written_total").increment(1);
        Ok((id, vector))
    }

    /// Write a new checkpoint of `positions` if they moved since the last one.
    pub async fn refresh_checkpoint(&self, positions: &[i64]) -> Result<(), StoreError> {
        let unchanged = self
            .current
            .lock()
            .expect("current lock")
            .as_ref()
            .is_some_and(|(_, v)| v.as_slice() == positions);
        if !unchanged {
            self.store_checkpoint(positions).await?;
        }
        Ok(())
    }

    pub async fn encode(&self, positions: &[i64], user_pos: i64) -> Result<String, StoreError> {
        let current = self.current.lock().expect("current lock").clone();
        if let Some((id, vector)) = current
            && let Some(token) = encode_against(id, &vector, positions, user_pos)
        {
            return Ok(token);
        }
        let (id, vector) = self.store_checkpoint(positions).await?;
        Ok(encode_against(id, &vector, positions, user_pos)
            .expect("a token against its own positions is tiny"))
    }
}
