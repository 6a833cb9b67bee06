//! Sync checkpoints: full vectors of partition positions that sync tokens are
//! encoded against, so a token carries only small deltas.

use crate::{Result, Store};

impl Store {
    /// Store a checkpoint; returns its ID.
    pub async fn create_checkpoint(&self, positions: &[i64]) -> Result<i64> {
        let row = self
            .query_one(
                "INSERT INTO sync_checkpoints (positions) VALUES ($1) RETURNING id",
                &[&positions],
            )
            .await?;
        Ok(row.get(0))
    }

    pub async fn checkpoint(&self, id: i64) -> Result<Option<Vec<i64>>> {
        let row = self
            .query_opt(
                "SELECT positions FROM sync_checkpoints WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Drop checkpoints older than `days`, always keeping the newest.
    pub async fn expire_checkpoints(&self, days: u64) -> Result<u64> {
        let n = self
            .execute(
                "DELETE FROM sync_checkpoints WHERE created_at < now() - make_interval(days => $1)
                 AND id < (SELECT max(id) FROM sync_checkpoints)",
                &[&(days as i32)],
            )
            .await?;
        Ok(n)
    }
}
