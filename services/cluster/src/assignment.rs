//! Which worker should own each partition: rendezvous (highest random weight)
//! hashing. Every worker computes the same answer from the same set of live
//! workers, with no coordinator; adding or removing one worker moves only the
//! partitions that worker gains or loses (about P/N of them).

use sha2::{Digest, Sha256};

fn score(worker_id: &str, partition: u32) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(worker_id.as_bytes());
    hasher.update(b":");
    hasher.update(partition.to_be_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The worker that should own `partition`, among `workers`.
pub fn desired_owner(partition: u32, workers: &[String]) -> Option<&str> {
    workers
        .iter()
        .max_by_key(|w| (score(w, partition), w.as_str()))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn adding_a_worker_moves_only_its_share() {
        let two = workers(&["rw-0", "rw-1"]);
        let three = workers(&["rw-0", "rw-1", "rw-2"]);
        let mut moved = 0;
        for p in 0..256 {
            let before = desired_owner(p, &two).unwrap();
            let after = desired_owner(p, &three).unwrap();
            if before != after {
                assert_eq!(after, "rw-2", "partitions only move to the new worker");
                moved += 1;
            }
        }
        assert!(
            (60..110).contains(&moved),
            "about a third moved, got {moved}"
        );
    }

    #[test]
    fn no_workers_no_owner() {
        assert_eq!(desired_owner(3, &[]), None);
    }
}
