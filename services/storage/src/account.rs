//! Account data (global and per room) and filters.
//!
//! Account data changes go on the user's own data stream: each write takes the
//! next `users.stream_pos` in the same transaction, so `/sync` can ask for
//! "everything after position N" without missing a concurrent write.

use serde_json::Value;

use crate::{Result, Store};

#[derive(Debug, Clone)]
pub struct AccountDataRow {
    /// Empty for global account data.
    pub room_id: String,
    pub kind: String,
    pub content: Value,
    pub stream_pos: i64,
}

impl Store {
    /// Set account data; returns the user's new data-stream position.
    pub async fn set_account_data(
        &self,
        user_id: &str,
        room_id: &str,
        kind: &str,
        content: &Value,
    ) -> Result<i64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let pos: i64 = tx
            .query_one("UPDATE users SET stream_pos = stream_pos + 1 WHERE user_id = $1 RETURNING stream_pos", &[&user_id])
            .await?
            .get(0);
        tx.execute(
            "INSERT INTO account_data (user_id, room_id, type, content, stream_pos) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (user_id, room_id, type) DO UPDATE SET content = EXCLUDED.content, stream_pos = EXCLUDED.stream_pos",
            &[&user_id, &room_id, &kind, content, &pos],
        )
        .await?;
        tx.commit().await?;
        Ok(pos)
    }

    pub async fn account_data(
        &self,
        user_id: &str,
        room_id: &str,
        kind: &str,
    ) -> Result<Option<Value>> {
        let row = self.query_opt(
                "SELECT content FROM account_data WHERE user_id = $1 AND room_id = $2 AND type = $3",
                &[&user_id, &room_id, &kind],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Account data changed after `after` (all of it for 0).
    pub async fn account_data_since(
        &self,
        user_id: &str,
        after: i64,
    ) -> Result<Vec<AccountDataRow>> {
        let rows = self
            .query(
                "SELECT room_id, type, content, stream_pos FROM account_data
                 WHERE user_id = $1 AND stream_pos > $2 ORDER BY stream_pos",
                &[&user_id, &after],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| AccountDataRow {
                room_id: r.get(0),
                kind: r.get(1),
                content: r.get(2),
                stream_pos: r.get(3),
            })
            .collect())
    }

    /// The user's data-stream position.
    pub async fn user_stream_pos(&self, user_id: &str) -> Result<i64> {
        let row = self
            .query_opt(
                "SELECT stream_pos FROM users WHERE user_id = $1",
                &[&user_id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)).unwrap_or(0))
    }

    /// Store a filter; returns its ID.
    pub async fn create_filter(&self, user_id: &str, filter: &Value) -> Result<i64> {
        let row = self
            .query_one(
                "INSERT INTO filters (user_id, filter_id, filter)
                 SELECT $1, COALESCE(max(filter_id), -1) + 1, $2 FROM filters WHERE user_id = $1
                 RETURNING filter_id",
                &[&user_id, filter],
            )
            .await?;
        Ok(row.get(0))
    }

    pub async fn filter(&self, user_id: &str, filter_id: i64) -> Result<Option<Value>> {
        let row = self
            .query_opt(
                "SELECT filter FROM filters WHERE user_id = $1 AND filter_id = $2",
                &[&user_id, &filter_id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }
}
