//! How many threads run the server's data path, and the async runtime that
//! runs it.
//!
//! With one worker the runtime is tokio's current-thread one: every task is
//! woken by the I/O driver on the same thread, with no cross-thread unpark
//! per packet (the lowest latency for one busy peer; measured with bench/run
//! on a 2-core machine: idle RTT 0.47 -> 0.33 ms against a 2-worker pool).
//! With more, it is tokio's multi-thread runtime with that many workers,
//! named [`WORKER_THREAD_NAME`]: each connection's tasks (its socket reader
//! and writer) run on whichever worker picks them up, so two busy clients
//! are served by two cores. Packets still cross the shared pieces the
//! README's "how it scales" paragraph names (the peer table's read lock, the
//! memory budget's atomic, the one tun queue).

use std::io;
use std::num::NonZeroUsize;

use tokio::runtime::{Builder, Runtime};

use crate::config::ConfigError;
use crate::limits::MAX_WORKERS;

/// The name of every worker thread of a multi-worker runtime (what `ps -T`
/// and /proc/PID/task/*/comm show).
pub const WORKER_THREAD_NAME: &str = "svpn-worker";

/// `workers` checked: 1..=[`MAX_WORKERS`]; absent: the CPUs this process may
/// run on (1 if that cannot be told).
pub fn resolve(workers: Option<usize>) -> Result<usize, ConfigError> {
    match workers {
        None => Ok(std::thread::available_parallelism()
            .map_or(1, NonZeroUsize::get)
            .min(MAX_WORKERS)),
        Some(0) => Err(ConfigError::new(
            "workers",
            "must be at least 1 (1 runs the data path on one thread)",
        )),
        Some(n) if n > MAX_WORKERS => Err(ConfigError::new(
            "workers",
            format!("{n} is more than {MAX_WORKERS}"),
        )),
        Some(n) => Ok(n),
    }
}

/// The runtime for `workers` threads: current-thread for 1, else a
/// multi-thread pool of named workers.
pub fn runtime(workers: usize) -> io::Result<Runtime> {
    if workers <= 1 {
        return Builder::new_current_thread().enable_all().build();
    }
    Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(WORKER_THREAD_NAME)
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_checked() {
        assert_eq!(resolve(Some(1)).expect("1 is fine"), 1);
        assert_eq!(resolve(Some(16)).expect("16 is fine"), 16);
        let default = resolve(None).expect("the default is fine");
        assert!((1..=MAX_WORKERS).contains(&default), "{default}");
        let zero = resolve(Some(0)).expect_err("0 is refused").to_string();
        assert!(
            zero.contains("workers") && zero.contains("at least 1"),
            "{zero}"
        );
        let huge = resolve(Some(MAX_WORKERS + 1))
            .expect_err("too many")
            .to_string();
        assert!(huge.contains("workers"), "{huge}");
    }

    #[test]
    fn a_multi_worker_runtime_runs_on_named_threads() {
        let runtime = runtime(2).expect("builds");
        let name = runtime
            .block_on(async {
                tokio::spawn(async { std::thread::current().name().map(str::to_owned) }).await
            })
            .expect("the task runs");
        assert_eq!(name.as_deref(), Some(WORKER_THREAD_NAME));
    }
}
