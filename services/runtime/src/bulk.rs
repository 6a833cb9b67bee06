//! Low priority for bulk work: a tokio runtime whose threads run at a higher
//! nice value, for a large federation transaction or a flooded room's turns.
//!
//! Why: on a machine with few cores, a flood would keep every thread busy,
//! and a one-event transaction for a quiet room would queue behind it. With
//! the bulk work at a higher nice value, the OS scheduler runs
//! latency-sensitive work first whenever the cores are short; when they are
//! not, the bulk work still gets all the CPU that is left.
//!
//! Nice values only order threads that compete inside one scheduling group:
//! on Linux with autogroups, a process's threads compete with Postgres's as
//! a whole, and the database runs the flood's statements at the same
//! priority as a quiet room's. So bulk work also steps aside by itself:
//! while latency-sensitive work holds an [`Urgent`] guard, code running on a
//! low-priority runtime waits at its next [`yield_to_urgent`] (between
//! PDUs, before a turn), leaving the cores and the database to the quiet
//! request; it never waits more than half of the time.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

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
    ON_BULK_THREAD.set(true);
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::process::setpriority_process(None, BULK_NICE) {
        tracing::debug!(%error, "cannot lower a bulk thread's priority");
    }
}

/// Whether the calling thread belongs to a low-priority runtime.
pub fn on_low_priority_thread() -> bool {
    ON_BULK_THREAD.get()
}

/// The longest one bulk step waits for urgent work to finish.
pub const MAX_DEFERRAL: Duration = Duration::from_millis(20);

thread_local! {
    /// Whether this thread belongs to a low-priority runtime.
    static ON_BULK_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Latency-sensitive work in flight in this process, and the signal that
/// the last of it finished.
struct Deference {
    urgent: AtomicUsize,
    idle: Notify,
    epoch: Instant,
    /// Until when (nanoseconds since `epoch`) bulk work does not defer: as
    /// long again as it last waited, so that a steady stream of urgent work
    /// slows bulk work down by half at most and never starves it.
    free_until_ns: AtomicU64,
}

fn deference() -> &'static Deference {
    static DEFERENCE: OnceLock<Deference> = OnceLock::new();
    DEFERENCE.get_or_init(|| Deference {
        urgent: AtomicUsize::new(0),
        idle: Notify::new(),
        epoch: Instant::now(),
        free_until_ns: AtomicU64::new(0),
    })
}

/// Marks latency-sensitive work (a quiet room's transaction or turn) as in
/// flight until dropped; bulk work in this process defers to it.
#[must_use = "the work counts as urgent only while the guard lives"]
pub struct Urgent(());

/// Start urgent work. Called off the low-priority runtimes (bulk work that
/// marked itself urgent would wait for itself).
pub fn urgent() -> Urgent {
    deference().urgent.fetch_add(1, Ordering::AcqRel);
    Urgent(())
}

impl Drop for Urgent {
    fn drop(&mut self) {
        let deference = deference();
        if deference.urgent.fetch_sub(1, Ordering::AcqRel) == 1 {
            deference.idle.notify_waiters();
        }
    }
}

/// A point where bulk work may pause: on a low-priority runtime's thread,
/// waits while urgent work is in flight (at most [`MAX_DEFERRAL`], and not
/// again until it has run as long as it waited). Anywhere else, and when
/// nothing is urgent, returns at once.
pub async fn yield_to_urgent() {
    defer().await;
}

/// [`yield_to_urgent`], saying how long it waited, if it did.
async fn defer() -> Option<Duration> {
    if !ON_BULK_THREAD.get() {
        return None;
    }
    let deference = deference();
    if deference.urgent.load(Ordering::Acquire) == 0 {
        return None;
    }
    let now = deference.epoch.elapsed();
    if (now.as_nanos() as u64) < deference.free_until_ns.load(Ordering::Relaxed) {
        return None;
    }
    let started = Instant::now();
    let _ = tokio::time::timeout(MAX_DEFERRAL, async {
        loop {
            let idle = deference.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if deference.urgent.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    })
    .await;
    let waited = started.elapsed();
    let free_until = deference.epoch.elapsed() + waited;
    deference
        .free_until_ns
        .fetch_max(free_until.as_nanos() as u64, Ordering::Relaxed);
    metrics::histogram!("tessera_bulk_deferral_seconds").record(waited.as_secs_f64());
    Some(waited)
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

    /// One test for the process-wide deference, so that no other test's
    /// urgent work overlaps it.
    #[tokio::test]
    async fn bulk_work_waits_for_urgent_work_but_never_for_ever() {
        let bulk = low_priority_runtime("test-defer", 1).unwrap();

        // Off the low-priority runtime nothing waits, even with urgent work.
        let guard = urgent();
        tokio::time::timeout(Duration::from_secs(5), yield_to_urgent())
            .await
            .expect("only bulk threads defer");

        // A bulk step waits while urgent work is in flight...
        let (reached_tx, mut reached) = tokio::sync::oneshot::channel();
        let step = bulk.spawn(async move {
            yield_to_urgent().await;
            let _ = reached_tx.send(());
        });
        tokio::time::sleep(MAX_DEFERRAL / 4).await;
        assert!(
            reached.try_recv().is_err(),
            "the bulk step went on while urgent work was in flight"
        );
        // ...and goes on when it is done.
        drop(guard);
        step.await.unwrap();
        reached.await.unwrap();
        // Past the free time that wait earned (it waited MAX_DEFERRAL at most).
        tokio::time::sleep(MAX_DEFERRAL * 2).await;

        // Urgent work that never ends delays a bulk step by MAX_DEFERRAL at
        // most, and the step after it not at all.
        let _forever = urgent();
        let steps = bulk.spawn(async { (defer().await, defer().await) });
        let (first, second) = tokio::time::timeout(Duration::from_secs(30), steps)
            .await
            .expect("a bulk step waited for ever")
            .unwrap();
        assert!(first.is_some_and(|waited| waited >= MAX_DEFERRAL));
        assert_eq!(second, None, "the next step runs as long as it waited");
    }
}
