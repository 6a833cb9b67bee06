//! Sync positions and the tokens that carry them.
//!
//! A reader's position is a vector with one entry per partition: `positions[p]
//! = n` means every event of partition `p` up to position `n` has been
//! delivered. Partition positions are gap-free and in commit order (see
//! `tessera_storage::persist`), so this is exact: no event is skipped or
//! repeated, and a room's events (all in one partition) come in order.
//! Partitions are independent, so a slow or dead owner holds back only its own
//! partitions, never the rest.
//!
//! A full vector is too big for a token (256 partitions × up to 8 bytes), so a
//! token names a *checkpoint*, a full vector stored in Postgres, and carries
//! only the partitions that differ from it, as small signed deltas:
//!
//! `s` + base64url( version=1, varint checkpoint, varint user_pos,
//!                  varint count, count × (varint partition gap, zigzag delta) )
//!
//! `user_pos` is the reader's position in the user's own data stream (account
//! data). A writer whose token would exceed [`CHECKPOINT_AT_LEN`] characters
//! stores its current vector as a new checkpoint and encodes against that
//! instead, so tokens stay well under 1 KiB whatever the load.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Token length beyond which the writer makes a new checkpoint.
pub const CHECKPOINT_AT_LEN: usize = 512;

const VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed sync token")]
    Malformed,
    #[error("sync token refers to partitions this cluster does not have")]
    WrongCluster,
    #[error("sync token has expired")]
    Expired,
}

/// A decoded token, before its checkpoint is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub checkpoint: u64,
    pub user_pos: i64,
    /// (partition, position − checkpoint[partition]), partitions ascending, no zeros.
    pub deltas: Vec<(u32, i64)>,
}

impl Token {
    /// The token for `positions`, relative to `checkpoint`.
    pub fn new(checkpoint_id: u64, checkpoint: &[i64], positions: &[i64], user_pos: i64) -> Self {
        let deltas = positions
            .iter()
            .enumerate()
            .filter_map(|(p, &pos)| {
                let base = checkpoint.get(p).copied().unwrap_or(0);
                (pos != base).then_some((p as u32, pos - base))
            })
            .collect();
        Self {
            checkpoint: checkpoint_id,
            user_pos,
            deltas,
        }
    }

    /// The full position vector, given the checkpoint's vector.
    pub fn positions(&self, checkpoint: &[i64]) -> Result<Vec<i64>, TokenError> {
        let mut positions = checkpoint.to_vec();
        for &(p, delta) in &self.deltas {
            let slot = positions
                .get_mut(p as usize)
                .ok_or(TokenError::WrongCluster)?;
            *slot = slot.checked_add(delta).ok_or(TokenError::Malformed)?;
            if *slot < 0 {
                return Err(TokenError::Malformed);
            }
        }
        Ok(positions)
    }

    pub fn encode(&self) -> String {
        let mut bytes = vec![VERSION];
        put_varint(&mut bytes, self.checkpoint);
        put_varint(&mut bytes, self.user_pos.max(0) as u64);
        put_varint(&mut bytes, self.deltas.len() as u64);
        let mut previous = 0u32;
        for &(p, delta) in &self.deltas {
            put_varint(&mut bytes, u64::from(p - previous));
            put_varint(&mut bytes, zigzag(delta));
            previous = p;
        }
        format!("s{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let body = text.strip_prefix('s').ok_or(TokenError::Malformed)?;
        if body.len() > 4096 {
            return Err(TokenError::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed)?;
        let mut input = bytes.as_slice();
        if take_byte(&mut input)? != VERSION {
            return Err(TokenError::Malformed);
        }
        let checkpoint = get_varint(&mut input)?;
        let user_pos = i64::try_from(get_varint(&mut input)?).map_err(|_| TokenError::Malformed)?;
        let count = get_varint(&mut input)?;
        if count > 65_536 {
            return Err(TokenError::Malformed);
        }
        let mut deltas = Vec::with_capacity(count as usize);
        let mut partition = 0u64;
        for i in 0..count {
            let gap = get_varint(&mut input)?;
            if i > 0 && gap == 0 {
                return Err(TokenError::Malformed);
            }
            partition = partition.checked_add(gap).ok_or(TokenError::Malformed)?;
            let p = u32::try_from(partition).map_err(|_| TokenError::Malformed)?;
            deltas.push((p, unzigzag(get_varint(&mut input)?)));
        }
        if !input.is_empty() {
            return Err(TokenError::Malformed);
        }
        Ok(Self {
            checkpoint,
            user_pos,
            deltas,
        })
    }
}

/// Encode `positions` against a checkpoint, or `None` when the result would
/// be longer than [`CHECKPOINT_AT_LEN`]: the caller then stores `positions` as
/// a new checkpoint and encodes against it.
pub fn encode_against(
    checkpoint_id: u64,
    checkpoint: &[i64],
    positions: &[i64],
    user_pos: i64,
) -> Option<String> {
    let token = Token::new(checkpoint_id, checkpoint, positions, user_pos).encode();
    (token.len() <= CHECKPOINT_AT_LEN).then_some(token)
}

/// The position after serving `since` from a reader at `view`: whatever the
/// client has seen stays seen, whatever the reader has is now seen too.
pub fn merge(since: &[i64], view: &[i64]) -> Vec<i64> {
    since.iter().zip(view).map(|(a, b)| *a.max(b)).collect()
}

/// The ranges `(partition, after, upto]` the reader has and the client has not.
pub fn unseen(since: &[i64], view: &[i64]) -> Vec<(u32, i64, i64)> {
    since
        .iter()
        .zip(view)
        .enumerate()
        .filter(|(_, (s, v))| v > s)
        .map(|(p, (s, v))| (p as u32, *s, *v))
        .collect()
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(input: &mut &[u8]) -> Result<u64, TokenError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = take_byte(input)?;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(TokenError::Malformed)
}

fn take_byte(input: &mut &[u8]) -> Result<u8, TokenError> {
    let (&first, rest) = input.split_first().ok_or(TokenError::Malformed)?;
    *input = rest;
    Ok(first)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests;
