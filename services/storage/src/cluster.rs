//! Cluster settings, room-worker registrations and partition leases.
//!
//! A lease row carries an `epoch` that increases on every change of owner. Every
//! write for a partition re-checks owner, epoch and expiry in its own transaction
//! (see [`crate::persist`]), so a worker that lost its lease can never write.

use std::time::Duration;

use crate::{Result, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRow {
    pub worker_id: String,
    pub grpc_addr: String,
    pub draining: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub partition: u32,
    /// The owner while the lease is unexpired.
    pub owner: Option<String>,
    pub epoch: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerRow {
    pub worker_id: String,
    pub grpc_addr: String,
    pub epoch: i64,
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Store {
    /// Record the cluster's server name and partition count on first start;
    /// afterwards refuse to run with different ones (changing either would
    /// orphan every room).
    pub async fn init_cluster(&self, server_name: &str, partitions: u32) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO cluster_settings (server_name, partitions) VALUES ($1, $2)
             ON CONFLICT (singleton) DO NOTHING",
            &[&server_name, &(partitions as i32)],
        )
        .await?;
        let row = tx
            .query_one("SELECT server_name, partitions FROM cluster_settings", &[])
            .await?;
        let (stored_name, stored_partitions): (String, i32) = (row.get(0), row.get(1));
        if stored_name != server_name {
            return Err(StoreError::Incompatible(format!(
                "this database belongs to server_name {stored_name:?}, but the configuration says {server_name:?}"
            )));
        }
        if stored_partitions as u32 != partitions {
            return Err(StoreError::Incompatible(format!(
                "this cluster was created with {stored_partitions} partitions, but \
                 cluster.partitions is {partitions}; the partition count cannot change"
            )));
        }
        tx.execute(
            "INSERT INTO partition_leases (partition) SELECT generate_series(0, $1 - 1)
             ON CONFLICT DO NOTHING",
            &[&(partitions as i32)],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Register or refresh a room-worker.
    pub async fn heartbeat_worker(
        &self,
        worker_id: &str,
        grpc_addr: &str,
        draining: bool,
    ) -> Result<()> {
        self.execute(
                "INSERT INTO room_workers (worker_id, grpc_addr, heartbeat_at, draining)
                 VALUES ($1, $2, now(), $3)
                 ON CONFLICT (worker_id) DO UPDATE
                 SET grpc_addr = EXCLUDED.grpc_addr, heartbeat_at = now(), draining = EXCLUDED.draining",
                &[&worker_id, &grpc_addr, &draining],
            )
            .await?;
        Ok(())
    }

    pub async fn remove_worker(&self, worker_id: &str) -> Result<()> {
        self.execute(
            "DELETE FROM room_workers WHERE worker_id = $1",
            &[&worker_id],
        )
        .await?;
        Ok(())
    }

    /// Workers that heartbeated within `ttl` and are not draining: the set
    /// partitions are spread over.
    pub async fn active_workers(&self, ttl: Duration) -> Result<Vec<WorkerRow>> {
        let rows = self.query(
                "SELECT worker_id, grpc_addr, draining FROM room_workers
                 WHERE heartbeat_at > now() - make_interval(secs => $1::float8 / 1000.0) AND NOT draining
                 ORDER BY worker_id",
                &[&millis(ttl)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| WorkerRow {
                worker_id: r.get(0),
                grpc_addr: r.get(1),
                draining: r.get(2),
            })
            .collect())
    }

    /// Every partition with its current (unexpired) owner.
    pub async fn leases(&self) -> Result<Vec<LeaseRow>> {
        let rows = self
            .query(
                "SELECT partition, CASE WHEN expires_at > now() THEN owner END, epoch
                 FROM partition_leases ORDER BY partition",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| LeaseRow {
                partition: r.get::<_, i32>(0) as u32,
                owner: r.get(1),
                epoch: r.get(2),
            })
            .collect())
    }

    /// Take a free or expired partition (or one a previous incarnation of this
    /// worker still holds: the new epoch fences it). Returns the new epoch, or
    /// `None` if someone else holds it.
    pub async fn claim_partition(
        &self,
        partition: u32,
        worker_id: &str,
        ttl: Duration,
    ) -> Result<Option<i64>> {
        let row = self.query_opt(
                "UPDATE partition_leases
                 SET owner = $2, epoch = epoch + 1, expires_at = now() + make_interval(secs => $3::float8 / 1000.0)
                 WHERE partition = $1 AND (owner IS NULL OR expires_at <= now() OR owner = $2)
                 RETURNING epoch",
                &[&(partition as i32), &worker_id, &millis(ttl)],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Extend the leases this worker holds at the given epochs. Returns the
    /// partitions renewed; any other was lost.
    ///
    /// A persist holds its partition's lease row locked until it commits (it
    /// takes its positions there), so one statement renewing every lease
    /// would wait on a flooded partition's persist while holding the rows it
    /// had already renewed, and every quiet partition's persist behind those
    /// would wait with it: a flood's commit time added to quiet rooms' events
    /// once a heartbeat. So the leases not being written are renewed at once
    /// (`SKIP LOCKED`), and only then, in a statement of their own that
    /// holds no other row, the ones that were.
    pub async fn renew_leases(
        &self,
        worker_id: &str,
        held: &[(u32, i64)],
        ttl: Duration,
    ) -> Result<Vec<u32>> {
        let (partitions, epochs): (Vec<i32>, Vec<i64>) =
            held.iter().map(|(p, e)| (*p as i32, *e)).unzip();
        let rows = self
            .query(
                "WITH held AS (
                     SELECT * FROM unnest($2::int[], $3::bigint[]) AS h(partition, epoch)
                 ), free AS (
                     SELECT l.partition FROM partition_leases l JOIN held h USING (partition)
                     WHERE l.epoch = h.epoch AND l.owner = $1 AND l.expires_at > now()
                     FOR UPDATE OF l SKIP LOCKED
                 ), renewed AS (
                     UPDATE partition_leases l
                     SET expires_at = now() + make_interval(secs => $4::float8 / 1000.0)
                     FROM free WHERE l.partition = free.partition
                     RETURNING l.partition
                 )
                 SELECT partition, true, NULL::bigint FROM renewed
                 UNION ALL
                 SELECT l.partition, false, l.epoch FROM partition_leases l JOIN held h USING (partition)
                 WHERE l.epoch = h.epoch AND l.owner = $1 AND l.expires_at > now()
                   AND l.partition NOT IN (SELECT partition FROM free)",
                &[&worker_id, &partitions, &epochs, &millis(ttl)],
            )
            .await?;
        let mut renewed = Vec::with_capacity(rows.len());
        let (mut busy, mut busy_epochs) = (Vec::new(), Vec::new());
        for row in &rows {
            let partition: i32 = row.get(0);
            if row.get(1) {
                renewed.push(partition as u32);
            } else {
                busy.push(partition);
                busy_epochs.push(row.get::<_, i64>(2));
            }
        }
        if !busy.is_empty() {
            let rows = self
                .query(
                    "UPDATE partition_leases l
                     SET expires_at = now() + make_interval(secs => $4::float8 / 1000.0)
                     FROM unnest($2::int[], $3::bigint[]) AS h(partition, epoch)
                     WHERE l.partition = h.partition AND l.epoch = h.epoch AND l.owner = $1
                       AND l.expires_at > now()
                     RETURNING l.partition",
                    &[&worker_id, &busy, &busy_epochs, &millis(ttl)],
                )
                .await?;
            renewed.extend(rows.iter().map(|r| r.get::<_, i32>(0) as u32));
        }
        Ok(renewed)
    }

    /// Hand a partition back so another worker can claim it at once.
    pub async fn release_partition(
        &self,
        partition: u32,
        worker_id: &str,
        epoch: i64,
    ) -> Result<bool> {
        let n = self
            .execute(
                "UPDATE partition_leases SET owner = NULL, expires_at = '-infinity'
                 WHERE partition = $1 AND owner = $2 AND epoch = $3",
                &[&(partition as i32), &worker_id, &epoch],
            )
            .await?;
        Ok(n == 1)
    }

    /// Who owns a partition now, and where to reach them.
    pub async fn partition_owner(&self, partition: u32) -> Result<Option<OwnerRow>> {
        let row = self
            .query_opt(
                "SELECT l.owner, w.grpc_addr, l.epoch FROM partition_leases l
                 JOIN room_workers w ON w.worker_id = l.owner
                 WHERE l.partition = $1 AND l.expires_at > now()",
                &[&(partition as i32)],
            )
            .await?;
        Ok(row.map(|r| OwnerRow {
            worker_id: r.get(0),
            grpc_addr: r.get(1),
            epoch: r.get(2),
        }))
    }

    /// The newest committed position of every partition (0 when empty).
    pub async fn partition_heads(&self) -> Result<Vec<i64>> {
        let rows = self
            .query(
                "SELECT next_pos - 1 FROM partition_leases ORDER BY partition",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}
