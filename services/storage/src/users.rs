//! Accounts, devices and access tokens (stored only as SHA-256 hashes), plus the
//! state registration needs: registration tokens, shared-secret nonces and
//! interactive-auth sessions. All of it lives in Postgres so that any
//! client-api process can serve any request.

use std::time::Duration;

use crate::{Result, Store, conflict};

#[derive(Debug, Clone)]
pub struct UserRow {
    pub user_id: String,
    pub password_hash: Option<String>,
    pub admin: bool,
    pub deactivated: bool,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

/// A user as the admin API lists them.
#[derive(Debug, Clone)]
pub struct ListedUser {
    pub user_id: String,
    pub admin: bool,
    pub deactivated: bool,
    pub user_type: Option<String>,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    pub created_ms: i64,
}

/// Who an access token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenOwner {
    pub user_id: String,
    pub device_id: String,
    pub admin: bool,
}

pub struct NewUser<'a> {
    pub user_id: &'a str,
    pub password_hash: Option<&'a str>,
    pub admin: bool,
    pub user_type: Option<&'a str>,
    pub displayname: Option<&'a str>,
}

/// Registration token details, as the Synapse admin API shows them.
#[derive(Debug, Clone)]
pub struct RegistrationTokenRow {
    pub token: String,
    pub uses_allowed: Option<i32>,
    pub pending: i32,
    pub completed: i32,
    pub expiry_time: Option<i64>,
}

impl Store {
    /// Create an account; [`crate::StoreError::Conflict`] if the ID is taken.
    pub async fn create_user(&self, user: &NewUser<'_>) -> Result<()> {
        self.execute(
                "INSERT INTO users (user_id, password_hash, admin, user_type, displayname) VALUES ($1, $2, $3, $4, $5)",
                &[&user.user_id, &user.password_hash, &user.admin, &user.user_type, &user.displayname],
            )
            .await
            .map_err(conflict)?;
        Ok(())
    }

    pub async fn user(&self, user_id: &str) -> Result<Option<UserRow>> {
        let row = self.query_opt(
                "SELECT user_id, password_hash, admin, deactivated, displayname, avatar_url FROM users WHERE user_id = $1",
                &[&user_id],
            )
            .await?;
        Ok(row.map(|r| UserRow {
            user_id: r.get(0),
            password_hash: r.get(1),
            admin: r.get(2),
            deactivated: r.get(3),
            displayname: r.get(4),
            avatar_url: r.get(5),
        }))
    }

    pub async fn set_displayname(&self, user_id: &str, displayname: Option<&str>) -> Result<bool> {
        let n = self
            .execute(
                "UPDATE users SET displayname = $2 WHERE user_id = $1",
                &[&user_id, &displayname],
            )
            .await?;
        Ok(n == 1)
    }

    pub async fn set_avatar_url(&self, user_id: &str, avatar_url: Option<&str>) -> Result<bool> {
        let n = self
            .execute(
                "UPDATE users SET avatar_url = $2 WHERE user_id = $1",
                &[&user_id, &avatar_url],
            )
            .await?;
        Ok(n == 1)
    }

    /// Create (or reuse) a device and give it a new access token. Logging in
    /// again with an existing device ID replaces that device's old tokens.
    pub async fn create_session(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
        token_hash: &[u8],
    ) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO devices (user_id, device_id, display_name, last_seen_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (user_id, device_id) DO UPDATE
             SET display_name = COALESCE(EXCLUDED.display_name, devices.display_name), last_seen_at = now()",
            &[&user_id, &device_id, &display_name],
        )
        .await?;
        tx.execute(
            "DELETE FROM access_tokens WHERE user_id = $1 AND device_id = $2",
            &[&user_id, &device_id],
        )
        .await?;
        tx.execute(
            "INSERT INTO access_tokens (token_hash, user_id, device_id) VALUES ($1, $2, $3)",
            &[&token_hash, &user_id, &device_id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The owner of a token, unless the account is deactivated.
    pub async fn token_owner(&self, token_hash: &[u8]) -> Result<Option<TokenOwner>> {
        let row = self.query_opt(
                "SELECT t.user_id, t.device_id, u.admin FROM access_tokens t JOIN users u ON u.user_id = t.user_id
                 WHERE t.token_hash = $1 AND NOT u.deactivated",
                &[&token_hash],
            )
            .await?;
        Ok(row.map(|r| TokenOwner {
            user_id: r.get(0),
            device_id: r.get(1),
            admin: r.get(2),
        }))
    }

    /// `/logout`: the device and its tokens go.
    pub async fn delete_device(&self, user_id: &str, device_id: &str) -> Result<()> {
        self.execute(
            "DELETE FROM devices WHERE user_id = $1 AND device_id = $2",
            &[&user_id, &device_id],
        )
        .await?;
        Ok(())
    }

    /// Users for the admin API: `limit` from `offset`, newest or oldest first,
    /// deactivated ones only when asked; and how many there are in all.
    pub async fn list_users(
        &self,
        offset: i64,
        limit: i64,
        newest_first: bool,
        include_deactivated: bool,
    ) -> Result<(Vec<ListedUser>, i64)> {
        let order = if newest_first { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT user_id, admin, deactivated, user_type, displayname, avatar_url,
                    (extract(epoch FROM created_at) * 1000)::bigint, count(*) OVER ()
             FROM users WHERE $3 OR NOT deactivated
             ORDER BY created_at {order}, user_id {order} OFFSET $1 LIMIT $2"
        );
        let rows = self
            .query(&sql, &[&offset, &limit, &include_deactivated])
            .await?;
        let total = match rows.first() {
            Some(row) => row.get(7),
            None => self
                .query_opt(
                    "SELECT count(*) FROM users WHERE $1 OR NOT deactivated",
                    &[&include_deactivated],
                )
                .await?
                .map(|r| r.get(0))
                .unwrap_or(0),
        };
        let users = rows
            .iter()
            .map(|r| ListedUser {
                user_id: r.get(0),
                admin: r.get(1),
                deactivated: r.get(2),
                user_type: r.get(3),
                displayname: r.get(4),
                avatar_url: r.get(5),
                created_ms: r.get(6),
            })
            .collect();
        Ok((users, total))
    }

    /// Deactivate an account: it can no longer log in, and every device and
    /// access token goes. False when there is no such user.
    pub async fn deactivate_user(&self, user_id: &str) -> Result<bool> {
        let updated = self
            .execute(
                "UPDATE users SET deactivated = true WHERE user_id = $1",
                &[&user_id],
            )
            .await?;
        self.delete_all_devices(user_id).await?;
        Ok(updated > 0)
    }

    /// `/logout/all`: every device and token of the user goes.
    pub async fn delete_all_devices(&self, user_id: &str) -> Result<()> {
        self.execute("DELETE FROM devices WHERE user_id = $1", &[&user_id])
            .await?;
        Ok(())
    }

    pub async fn devices(&self, user_id: &str) -> Result<Vec<(String, Option<String>)>> {
        let rows = self
            .query(
                "SELECT device_id, display_name FROM devices WHERE user_id = $1 ORDER BY device_id",
                &[&user_id],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    // --- registration tokens ---

    pub async fn create_registration_token(
        &self,
        token: &str,
        uses_allowed: Option<i32>,
        expiry_time: Option<i64>,
    ) -> Result<()> {
        self.execute(
                "INSERT INTO registration_tokens (token, uses_allowed, expiry_time) VALUES ($1, $2, $3)",
                &[&token, &uses_allowed, &expiry_time],
            )
            .await
            .map_err(conflict)?;
        Ok(())
    }

    pub async fn registration_tokens(&self) -> Result<Vec<RegistrationTokenRow>> {
        let rows = self.query("SELECT token, uses_allowed, pending, completed, expiry_time FROM registration_tokens ORDER BY created_at", &[])
            .await?;
        Ok(rows
            .iter()
            .map(|r| RegistrationTokenRow {
                token: r.get(0),
                uses_allowed: r.get(1),
                pending: r.get(2),
                completed: r.get(3),
                expiry_time: r.get(4),
            })
            .collect())
    }

    pub async fn delete_registration_token(&self, token: &str) -> Result<bool> {
        let n = self
            .execute(
                "DELETE FROM registration_tokens WHERE token = $1",
                &[&token],
            )
            .await?;
        Ok(n == 1)
    }

    /// Whether a token can still be used (not expired, uses left counting pending ones).
    pub async fn registration_token_valid(&self, token: &str, now_ms: i64) -> Result<bool> {
        let row = self
            .query_opt(
                "SELECT 1 FROM registration_tokens WHERE token = $1
                 AND (expiry_time IS NULL OR expiry_time > $2)
                 AND (uses_allowed IS NULL OR pending + completed < uses_allowed)",
                &[&token, &now_ms],
            )
            .await?;
        Ok(row.is_some())
    }

    /// Count a completed registration against the token.
    pub async fn consume_registration_token(&self, token: &str, now_ms: i64) -> Result<bool> {
        let n = self
            .execute(
                "UPDATE registration_tokens SET completed = completed + 1 WHERE token = $1
                 AND (expiry_time IS NULL OR expiry_time > $2)
                 AND (uses_allowed IS NULL OR pending + completed < uses_allowed)",
                &[&token, &now_ms],
            )
            .await?;
        Ok(n == 1)
    }

    // --- shared-secret registration nonces ---

    pub async fn create_nonce(&self, nonce: &str) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM shared_secret_nonces WHERE created_at < now() - interval '1 hour'",
                &[],
            )
            .await?;
        client
            .execute(
                "INSERT INTO shared_secret_nonces (nonce) VALUES ($1)",
                &[&nonce],
            )
            .await?;
        Ok(())
    }

    /// Use a nonce once; false if unknown, used or older than `max_age`.
    pub async fn consume_nonce(&self, nonce: &str, max_age: Duration) -> Result<bool> {
        let n = self.execute(
                "DELETE FROM shared_secret_nonces WHERE nonce = $1 AND created_at > now() - make_interval(secs => $2::float8)",
                &[&nonce, &max_age.as_secs_f64()],
            )
            .await?;
        Ok(n == 1)
    }

    // --- user-interactive auth sessions ---

    pub async fn create_uia_session(&self, session_id: &str) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM uia_sessions WHERE created_at < now() - interval '1 day'",
                &[],
            )
            .await?;
        client
            .execute(
                "INSERT INTO uia_sessions (session_id) VALUES ($1)",
                &[&session_id],
            )
            .await?;
        Ok(())
    }

    /// Completed stages of a session and the registration token it proved.
    pub async fn uia_session(
        &self,
        session_id: &str,
    ) -> Result<Option<(Vec<String>, Option<String>)>> {
        let row = self
            .query_opt(
                "SELECT completed, registration_token FROM uia_sessions WHERE session_id = $1",
                &[&session_id],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    pub async fn complete_uia_stage(
        &self,
        session_id: &str,
        stage: &str,
        registration_token: Option<&str>,
    ) -> Result<()> {
        self.execute(
            "UPDATE uia_sessions SET completed = array_append(completed, $2),
                        registration_token = COALESCE($3, registration_token)
                 WHERE session_id = $1 AND NOT ($2 = ANY(completed))",
            &[&session_id, &stage, &registration_token],
        )
        .await?;
        Ok(())
    }

    pub async fn delete_uia_session(&self, session_id: &str) -> Result<()> {
        self.execute(
            "DELETE FROM uia_sessions WHERE session_id = $1",
            &[&session_id],
        )
        .await?;
        Ok(())
    }
}
