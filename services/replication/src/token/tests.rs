//! Token codec tests, and the property test of the whole scheme: random
//! partitions, sync-workers that lag, restart and are switched between, and a
//! client that must see every event exactly once, in order, with small tokens.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

#[test]
fn round_trip() {
    let checkpoint = vec![10, 0, 5, 7];
    let positions = vec![12, 0, 3, 7];
    let token = Token::new(42, &checkpoint, &positions, 9);
    assert_eq!(token.deltas, vec![(0, 2), (2, -2)]);
    let text = token.encode();
    let decoded = Token::decode(&text).unwrap();
    assert_eq!(decoded, token);
    assert_eq!(decoded.positions(&checkpoint).unwrap(), positions);
}

#[test]
fn garbage_is_refused() {
    for bad in [
        "",
        "s",
        "x123",
        "s!!!",
        "sAQ",
        "s_____________",
        &format!("s{}", "A".repeat(5000)),
    ] {
        assert_eq!(
            Token::decode(bad).err(),
            Some(TokenError::Malformed),
            "{bad:?}"
        );
    }
    // A partition beyond this cluster's count.
    let token = Token::new(
        1,
        &[0; 300],
        &{
            let mut v = vec![0; 300];
            v[299] = 1;
            v
        },
        0,
    );
    assert_eq!(
        token.positions(&[0; 256]).err(),
        Some(TokenError::WrongCluster)
    );
    // Deltas that would go negative.
    let token = Token {
        checkpoint: 1,
        user_pos: 0,
        deltas: vec![(0, -5)],
    };
    assert_eq!(token.positions(&[3]).err(), Some(TokenError::Malformed));
}

#[test]
fn tokens_stay_small_even_when_every_partition_moved() {
    let checkpoint = vec![1_000_000i64; 256];
    let positions: Vec<i64> = (0..256).map(|p| 1_000_000 + 50_000 + p).collect();
    assert!(
        encode_against(1, &checkpoint, &positions, 5).is_none(),
        "too far from the checkpoint"
    );
    let fresh = encode_against(2, &positions, &positions, 5).unwrap();
    assert!(fresh.len() < 16, "{fresh}");
}

proptest! {
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let text = format!("s{}", URL_SAFE_NO_PAD.encode(&bytes));
        let _ = Token::decode(&text).and_then(|t| t.positions(&[0; 256]));
    }
}

/// One step of the simulated cluster.
#[derive(Debug, Clone)]
enum Op {
    /// An owner commits `n` events to a partition.
    Commit { partition: usize, n: usize },
    /// A sync-worker reads some of what is committed in a partition.
    Read {
        worker: usize,
        partition: usize,
        fraction: u8,
    },
    /// A sync-worker restarts: it starts from the heads in Postgres with no cache.
    Restart { worker: usize },
    /// The client syncs against some worker.
    Sync { worker: usize },
}

fn op(partitions: usize, workers: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..partitions, 1..40usize).prop_map(|(partition, n)| Op::Commit { partition, n }),
        4 => (0..workers, 0..partitions, any::<u8>()).prop_map(|(worker, partition, fraction)| Op::Read { worker, partition, fraction }),
        1 => (0..workers).prop_map(|worker| Op::Restart { worker }),
        3 => (0..workers).prop_map(|worker| Op::Sync { worker }),
    ]
}

struct Worker {
    view: Vec<i64>,
    checkpoint: Option<(u64, Vec<i64>)>,
}

/// The sync-worker's token handling, as `tessera-sync-worker` does it.
fn sync(
    worker: &mut Worker,
    since: Option<&str>,
    checkpoints: &mut Vec<Vec<i64>>,
) -> (Vec<(u32, i64, i64)>, Vec<i64>, String) {
    let (since, served) = match since {
        None => (worker.view.clone(), vec![]),
        Some(text) => {
            let token = Token::decode(text).unwrap();
            let base = &checkpoints[token.checkpoint as usize];
            let since = token.positions(base).unwrap();
            let served = unseen(&since, &worker.view);
            (since, served)
        }
    };
    let next = merge(&since, &worker.view);
    let encoded = worker
        .checkpoint
        .as_ref()
        .and_then(|(id, vector)| encode_against(*id, vector, &next, 0));
    let token = match encoded {
        Some(token) => token,
        None => {
            checkpoints.push(next.clone());
            let id = (checkpoints.len() - 1) as u64;
            worker.checkpoint = Some((id, next.clone()));
            encode_against(id, &next, &next, 0).unwrap()
        }
    };
    (served, next, token)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn no_skip_no_repeat_in_order_small_tokens(
        partitions in prop_oneof![1..8usize, Just(256usize)],
        workers in 1..4usize,
        ops in proptest::collection::vec(op(8, 3), 1..120),
    ) {
        let mut heads = vec![0i64; partitions];
        let mut checkpoints: Vec<Vec<i64>> = Vec::new();
        let mut pool: Vec<Worker> = (0..workers).map(|_| Worker { view: heads.clone(), checkpoint: None }).collect();
        let mut token: Option<String> = None;
        let mut baseline: Option<Vec<i64>> = None;
        let mut seen: HashMap<u32, Vec<i64>> = HashMap::new();

        let run_sync = |w: &mut Worker, token: &mut Option<String>, baseline: &mut Option<Vec<i64>>, seen: &mut HashMap<u32, Vec<i64>>, checkpoints: &mut Vec<Vec<i64>>| {
            let (served, next, text) = sync(w, token.as_deref(), checkpoints);
            prop_assert!(text.len() < 1024, "token of {} bytes", text.len());
            if baseline.is_none() {
                *baseline = Some(next.clone());
            }
            for (p, after, upto) in served {
                seen.entry(p).or_default().extend(after + 1..=upto);
            }
            *token = Some(text);
            Ok(())
        };

        for op in ops {
            match op {
                Op::Commit { partition, n } => heads[partition % partitions] += n as i64,
                Op::Read { worker, partition, fraction } => {
                    let w = &mut pool[worker % workers];
                    let p = partition % partitions;
                    let gap = heads[p] - w.view[p];
                    w.view[p] += gap * i64::from(fraction) / 255;
                }
                Op::Restart { worker } => pool[worker % workers] = Worker { view: heads.clone(), checkpoint: None },
                Op::Sync { worker } => run_sync(&mut pool[worker % workers], &mut token, &mut baseline, &mut seen, &mut checkpoints)?,
            }
        }
        // Let one worker catch up completely and sync twice (the second must be empty).
        pool[0].view = heads.clone();
        run_sync(&mut pool[0], &mut token, &mut baseline, &mut seen, &mut checkpoints)?;
        let before = seen.clone();
        run_sync(&mut pool[0], &mut token, &mut baseline, &mut seen, &mut checkpoints)?;
        prop_assert_eq!(&before, &seen, "a caught-up sync repeats nothing");

        let baseline = baseline.unwrap();
        for p in 0..partitions {
            let got = seen.remove(&(p as u32)).unwrap_or_default();
            let want: Vec<i64> = (baseline[p] + 1..=heads[p]).collect();
            prop_assert_eq!(got, want, "partition {}: every event after the initial sync, once, in order", p);
        }
    }
}
