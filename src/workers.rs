//! How many threads run the server's data path, and the runtimes that
//! run it.
//!
//! With one worker everything runs on tokio's current-thread runtime: every
//! task is woken by the I/O driver on the same thread, with no cross-thread
//! unpark per packet: the lowest latency for one busy peer (bench/run
//! compares it with a pool).
//!
//! With more, a [`WorkerPool`]: that many threads named
//! [`WORKER_THREAD_NAME`], each running a current-thread runtime of its own
//! (thread per core, no work stealing). The server hands each accepted
//! connection to one worker, in turn, and everything of that connection
//! runs there: its socket reader and writer (so a TLS connection's shared
//! state is never contended between threads) and its writes into the tun,
//! on that worker's tun queue. The tun queue of worker k is read by a task
//! on worker k, and the kernel steers a flow's packets leaving the host to
//! the queue its last packet was written on, so a connection's return
//! traffic is read on its own thread too. What still crosses threads: a
//! packet from one client to a client on another worker, and the shared
//! pieces the README's "how it scales" paragraph names (the peer table's
//! read lock, the memory budget's atomic). The main thread keeps what is
//! not per packet: accepting, the control socket, metrics, the cluster.

use std::io;
use std::num::NonZeroUsize;

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Builder, Handle, Runtime};
use tokio_util::sync::CancellationToken;

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

/// The daemon's main runtime: current-thread. A server with more than one
/// worker starts a [`WorkerPool`] beside it for the data path.
pub fn runtime() -> io::Result<Runtime> {
    Builder::new_current_thread().enable_all().build()
}

/// `workers` threads, each running a current-thread runtime until the pool
/// is dropped (which stops them, dropping what still runs there, and waits
/// for the threads).
#[derive(Debug)]
pub struct WorkerPool {
    handles: Vec<Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
    next: AtomicUsize,
}

thread_local! {
    /// The index of the worker this thread is, if it is one.
    static WORKER_INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker the calling thread is (0 outside a pool: the
/// one-thread server's own thread, or the main thread).
pub fn current_index() -> usize {
    WORKER_INDEX.with(Cell::get)
}

impl WorkerPool {
    /// Starts `workers` threads, each with its runtime.
    pub fn start(workers: usize) -> io::Result<WorkerPool> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers);
        for index in 0..workers {
            let runtime = runtime()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(WORKER_THREAD_NAME.into())
                .spawn(move || {
                    WORKER_INDEX.with(|i| i.set(index));
                    runtime.block_on(stop.cancelled());
                    // Whatever still runs here is dropped with the runtime;
                    // its blocking tasks get a moment to finish.
                    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
                })?;
            threads.push(thread);
        }
        Ok(WorkerPool {
            handles,
            threads,
            stop,
            next: AtomicUsize::new(0),
        })
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never, for a started pool).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Worker `index`'s runtime.
    pub fn handle(&self, index: usize) -> &Handle {
        &self.handles[index % self.handles.len()]
    }

    /// The next worker in turn (round robin), for a new connection.
    pub fn next(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
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
    fn a_pool_runs_each_worker_on_a_named_thread_of_its_own() {
        let pool = WorkerPool::start(3).expect("starts");
        assert_eq!(pool.len(), 3);
        let main = runtime().expect("builds");
        let mut seen = Vec::new();
        for index in 0..3 {
            let task = pool.handle(index).spawn(async {
                let name = std::thread::current().name().map(str::to_owned);
                (name, std::thread::current().id(), current_index())
            });
            seen.push(main.block_on(task).expect("the task runs"));
        }
        for (index, (name, _, worker)) in seen.iter().enumerate() {
            assert_eq!(name.as_deref(), Some(WORKER_THREAD_NAME));
            assert_eq!(*worker, index, "a task on worker {index} knows its index");
        }
        assert!(seen[0].1 != seen[1].1 && seen[1].1 != seen[2].1 && seen[0].1 != seen[2].1);
        // Connections are dealt out in turn.
        let turns: Vec<usize> = (0..4).map(|_| pool.next()).collect();
        assert_eq!(turns, [0, 1, 2, 0]);
        // Dropping the pool stops its threads (and waits for them).
        drop(pool);
        assert_eq!(current_index(), 0, "outside a pool: 0");
    }
}
