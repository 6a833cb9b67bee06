//! Where a partition's owner is, for callers (client-api, and later the
//! federation-receiver). Lookups are cached briefly; a redirect or a failed
//! call invalidates the entry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tessera_storage::Store;
use tessera_storage::cluster::OwnerRow;

const FRESH_FOR: Duration = Duration::from_secs(5);

pub struct OwnerDirectory {
    store: Store,
    cache: Mutex<HashMap<u32, (OwnerRow, Instant)>>,
}

impl OwnerDirectory {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The owner of a partition, or `None` while it is between owners.
    pub async fn owner(
        &self,
        partition: u32,
    ) -> Result<Option<OwnerRow>, tessera_storage::StoreError> {
        if let Some((row, at)) = self.cache.lock().expect("directory lock").get(&partition)
            && at.elapsed() < FRESH_FOR
        {
            return Ok(Some(row.clone()));
        }
        let row = self.store.partition_owner(partition).await?;
        if let Some(row) = &row {
            self.cache
                .lock()
                .expect("directory lock")
                .insert(partition, (row.clone(), Instant::now()));
        }
        Ok(row)
    }

    pub fn invalidate(&self, partition: u32) {
        self.cache
            .lock()
            .expect("directory lock")
            .remove(&partition);
    }
}
