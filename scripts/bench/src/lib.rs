//! Helpers shared by the benchmark tools.

/// The p-th percentile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Resident set size of a process, in MiB (from /proc).
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS:")
}

/// The highest resident set size a process has had, in MiB (from /proc).
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmHWM:")
}

fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Storage flush stalls seen while a benchmark runs.
///
/// Every commit waits for the database's write-ahead log to reach the disk,
/// so when the disk takes a long time to flush, every server's quiet
/// messages wait together, whatever it is doing. A benchmark's tail latency
/// on a shared or virtual disk then says as much about the disk as about the
/// server; the probe writes 8 KiB and flushes it (`fdatasync`) every 20 ms
/// in a file of its own and records each flush that took 20 ms or more, so
/// the results can say which slow messages coincided with a slow disk.
pub mod flush_probe {
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// A flush at least this long counts as a stall.
    pub const SLOW: Duration = Duration::from_millis(20);
    const EVERY: Duration = Duration::from_millis(20);

    /// A running probe; it stops and removes its file when dropped.
    pub struct FlushProbe {
        stalls: Arc<Mutex<Vec<(Instant, Duration)>>>,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
        path: PathBuf,
    }

    impl FlushProbe {
        /// Start probing with a file in `dir` (which should be on the
        /// database's disk).
        pub fn start(dir: &Path) -> std::io::Result<Self> {
            let path = dir.join(format!("tessera-flush-probe-{}", std::process::id()));
            let mut file = std::fs::File::create(&path)?;
            let stalls: Arc<Mutex<Vec<(Instant, Duration)>>> = Arc::default();
            let stop = Arc::new(AtomicBool::new(false));
            let thread = {
                let (stalls, stop) = (Arc::clone(&stalls), Arc::clone(&stop));
                std::thread::Builder::new()
                    .name("flush-probe".to_owned())
                    .spawn(move || {
                        let block = [0x5au8; 8192];
                        let mut written = 0usize;
                        while !stop.load(Ordering::Relaxed) {
                            // Overwrite the same 1 MiB, as a log segment is reused.
                            if written.is_multiple_of(128) {
                                let _ = std::io::Seek::rewind(&mut file);
                            }
                            let started = Instant::now();
                            if file
                                .write_all(&block)
                                .and_then(|()| file.sync_data())
                                .is_err()
                            {
                                return;
                            }
                            let took = started.elapsed();
                            if took >= SLOW {
                                stalls.lock().unwrap().push((started, took));
                            }
                            written += 1;
                            std::thread::sleep(EVERY);
                        }
                    })?
            };
            Ok(Self {
                stalls,
                stop,
                thread: Some(thread),
                path,
            })
        }

        /// The stalls so far: when each flush started and how long it took.
        pub fn stalls(&self) -> Vec<(Instant, Duration)> {
            self.stalls.lock().unwrap().clone()
        }
    }

    impl Drop for FlushProbe {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// The longest stall that overlaps `from..=to`, if any.
    pub fn longest_overlapping(
        stalls: &[(Instant, Duration)],
        from: Instant,
        to: Instant,
    ) -> Option<Duration> {
        stalls
            .iter()
            .filter(|(start, took)| *start <= to && *start + *took >= from)
            .map(|(_, took)| *took)
            .max()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_stall_overlaps_the_messages_on_their_way_during_it() {
            let t0 = Instant::now();
            let ms = Duration::from_millis;
            let stalls = [(t0 + ms(100), ms(50)), (t0 + ms(300), ms(200))];
            // Sent before the stall, seen during it; sent during it; sent
            // before and seen after it.
            assert_eq!(
                longest_overlapping(&stalls, t0 + ms(90), t0 + ms(120)),
                Some(ms(50))
            );
            assert_eq!(
                longest_overlapping(&stalls, t0 + ms(140), t0 + ms(200)),
                Some(ms(50))
            );
            assert_eq!(
                longest_overlapping(&stalls, t0 + ms(50), t0 + ms(600)),
                Some(ms(200))
            );
            // Between the stalls, and before any.
            assert_eq!(
                longest_overlapping(&stalls, t0 + ms(160), t0 + ms(290)),
                None
            );
            assert_eq!(longest_overlapping(&stalls, t0, t0 + ms(99)), None);
        }

        #[test]
        fn the_probe_flushes_a_file_of_its_own_and_removes_it() {
            let dir = tempfile::tempdir().unwrap();
            let probe = FlushProbe::start(dir.path()).unwrap();
            std::thread::sleep(EVERY * 3);
            let file = std::fs::read_dir(dir.path())
                .unwrap()
                .next()
                .unwrap()
                .unwrap();
            assert!(
                file.metadata().unwrap().len() >= 8192,
                "the probe wrote nothing"
            );
            drop(probe);
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }
}
