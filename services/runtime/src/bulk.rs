//! Low priority for bulk work: a tokio runtime whose threads run at a higher
//! nice value, for a large federation transaction or a flooded room's turns.
//!
//! Why: on a machine with few cores, a flood would keep every thread busy,
//! and a one-event transaction for a quiet room would queue behind it. With
//! the bulk work at a higher nice value, the OS scheduler runs
//! latency-sensitive work first whenever the cores are short; when they are
//! not, the bulk work still gets all the CPU that is left.

/// The nice value of bulk threads (0 is normal, 19 the lowest priority).
pub const BULK_NICE: i32 = 10;

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

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn bulk_runtime_threads_run_at_a_lower_priority_than_their_caller() {
        let bulk = low_priority_runtime("test-bulk", 1).unwrap();
        let ours = rustix::process::getpriority_process(None).unwrap();
        let theirs = bulk
            .spawn(async { rustix::process::getpriority_process(None).unwrap() })
            .await
            .unwrap();
        assert_eq!(theirs, BULK_NICE.max(ours));
        // The caller's own thread is untouched.
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), ours);
    }
}
