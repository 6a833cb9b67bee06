//! A small pool of low-priority threads for CPU-heavy bulk work, such as
//! verifying the signatures of a large federation transaction.
//!
//! Why: on a machine with few cores, a flood of big transactions would keep
//! the async threads busy, and a one-event transaction for a quiet room would
//! queue behind it. Here the bulk work runs on its own threads with a higher
//! nice value, so the async threads stay free and the OS scheduler runs
//! latency-sensitive work first whenever the cores are short; when they are
//! not, the bulk work still gets all the CPU that is left.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// The nice value of bulk threads (0 is normal, 19 the lowest priority).
pub const BULK_NICE: i32 = 10;

#[derive(Clone)]
pub struct BulkPool {
    jobs: mpsc::Sender<Job>,
}

impl BulkPool {
    /// Start `threads` named `name-N`, each at nice [`BULK_NICE`].
    pub fn start(name: &str, threads: usize) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return, // the pool was dropped
                        }
                    }
                })?;
        }
        Ok(Self { jobs })
    }

    /// Run `work` on a bulk thread and wait for its result (a panic in
    /// `work` resumes in the caller, as if it had run inline).
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(work)));
        });
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            // No threads left (they only stop when the pool is dropped): run here.
            job();
        }
        match rx.await {
            Ok(Ok(value)) => value,
            Ok(Err(panic)) => resume_unwind(panic),
            Err(_) => panic!("a bulk thread dropped its job"),
        }
    }
}

/// A tokio runtime whose `threads` run at nice [`BULK_NICE`], for async bulk
/// work (a backlogged room's turns). It lives as long as the process. I/O
/// resources such as database connections should be created inside it, so
/// that their background tasks also run at low priority and are never shared
/// with latency-sensitive work.
pub fn low_priority_runtime(name: &str, threads: usize) -> std::io::Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(name)
        .on_thread_start(lower_priority)
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    // Dropping a runtime blocks until its tasks stop; this one is meant to
    // last until exit, so it is never dropped.
    std::mem::forget(runtime);
    Ok(handle)
}

/// Give the calling thread a lower CPU priority. On Linux the nice value is
/// per thread; where this fails, the work runs at normal priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::process::setpriority_process(None, BULK_NICE) {
        tracing::debug!(%error, "cannot lower a bulk thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn runs_work_and_returns_its_result() {
        let pool = BulkPool::start("test-bulk", 2).unwrap();
        let handles: Vec<_> = (0..8u64)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.run(move || i * i).await })
            })
            .collect();
        let mut results = Vec::new();
        for handle in handles {
            results.push(handle.await.unwrap());
        }
        assert_eq!(results, vec![0, 1, 4, 9, 16, 25, 36, 49]);
    }

    #[tokio::test]
    async fn a_panic_comes_back_to_the_caller_and_the_pool_goes_on() {
        let pool = BulkPool::start("test-bulk", 1).unwrap();
        let panicked = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(|| panic!("boom")).await }
        })
        .await;
        assert!(panicked.is_err());
        assert_eq!(pool.run(|| 7).await, 7);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn bulk_threads_run_at_a_lower_priority_than_their_caller() {
        let pool = BulkPool::start("test-bulk", 1).unwrap();
        let ours = rustix::process::getpriority_process(None).unwrap();
        let theirs = pool
            .run(|| rustix::process::getpriority_process(None).unwrap())
            .await;
        assert_eq!(theirs, BULK_NICE.max(ours));
        // The caller's own thread is untouched.
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), ours);
    }
}
