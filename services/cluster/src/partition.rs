//! The room → partition hash.
//!
//! `partition(room_id) = u64::from_be_bytes(SHA-256(room_id as UTF-8)[0..8]) mod P`
//!
//! SHA-256 is slower than a non-cryptographic hash but universal: any tool, in
//! any language, can compute where a room lives, and the value never changes
//! between releases or platforms. P is fixed when the cluster is created.

use sha2::{Digest, Sha256};

pub fn partition_of(room_id: &str, partitions: u32) -> u32 {
    let digest = Sha256::digest(room_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_stable() {
        // Fixed values: changing them would orphan every room of every cluster.
        // Cross-checked with Python: int.from_bytes(hashlib.sha256(b"!abc:example.org").digest()[:8], "big") % 256
        assert_eq!(partition_of("!abc:example.org", 256), 240);
        assert_eq!(
            partition_of("!abc:example.org", 7),
            partition_of("!abc:example.org", 7)
        );
        assert_eq!(partition_of("", 256), 20);
    }

    #[test]
    fn rooms_spread_over_partitions() {
        let mut counts = vec![0u32; 16];
        for i in 0..16_000 {
            counts[partition_of(&format!("!room{i}:example.org"), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
