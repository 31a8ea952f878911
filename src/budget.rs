//! Memory held for peers, budgeted in bytes: what every send queue holds, and
//! what partly read frames hold. One budget per server, shared by every
//! connection.
//!
//! * Queued bytes: a push that would take the total past its share fails
//!   ([`crate::connection::PushError::OverBudget`]); the peer table then
//!   closes the largest holder first.
//! * Partly read frames: a connection that has the header of a frame larger
//!   than [`SMALL_FRAME`] but not yet its body must reserve the frame's
//!   length before reading on; while the budget is spent it waits, and its
//!   bytes stay in the kernel's socket buffer (not in our memory) until the
//!   frame timeout closes it. Idle peers and small frames never touch it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Frames up to this length are read without reserving from the budget:
/// what an idle or chatty peer holds stays small anyway.
pub const SMALL_FRAME: usize = 4096;

/// The share of the budget that send queues may hold; the rest is for
/// partly read frames.
const QUEUED_SHARE_PERCENT: usize = 75;

/// The budget of one server.
#[derive(Debug)]
pub struct MemoryBudget {
    queued: AtomicUsize,
    queued_limit: usize,
    reads: Arc<Semaphore>,
    reads_limit: usize,
    /// Connections closed because the budget was spent.
    closed: AtomicU64,
}

impl MemoryBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Arc<MemoryBudget> {
        let queued_limit = total / 100 * QUEUED_SHARE_PERCENT;
        let reads_limit = (total - queued_limit).min(Semaphore::MAX_PERMITS);
        Arc::new(MemoryBudget {
            queued: AtomicUsize::new(0),
            queued_limit,
            reads: Arc::new(Semaphore::new(reads_limit)),
            reads_limit,
            closed: AtomicU64::new(0),
        })
    }

    /// Bytes in every send queue now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Bytes reserved by partly read frames now.
    pub fn reading(&self) -> usize {
        self.reads_limit - self.reads.available_permits()
    }

    /// Connections closed so far because the budget was spent.
    pub fn closed(&self) -> u64 {
        self.closed.load(Ordering::Relaxed)
    }

    /// Counts a connection closed for the budget.
    pub fn count_closed(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes `len` queued bytes from the budget, if they fit.
    pub fn try_queue(&self, len: usize) -> bool {
        self.queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + len <= self.queued_limit).then_some(used + len)
            })
            .is_ok()
    }

    /// Gives back `len` queued bytes.
    pub fn unqueue(&self, len: usize) {
        self.queued.fetch_sub(len, Ordering::Relaxed);
    }

    /// Reserves `len` bytes for a frame being read, waiting while the budget
    /// is spent; the reservation lasts as long as the permit. `None` only if
    /// the budget were closed, which it never is.
    pub async fn reserve_read(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let len = len.min(self.reads_limit).min(u32::MAX as usize) as u32;
        self.reads.clone().acquire_many_owned(len).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn queued_bytes_stop_at_their_share() {
        let budget = MemoryBudget::new(1000);
        assert!(budget.try_queue(700));
        assert!(budget.try_queue(50));
        assert!(!budget.try_queue(1));
        budget.unqueue(50);
        assert!(budget.try_queue(50));
        assert_eq!(budget.queued(), 750);
    }

    #[tokio::test]
    async fn reads_wait_while_the_budget_is_spent() {
        let budget = MemoryBudget::new(4000);
        let first = budget.reserve_read(1000).await;
        assert_eq!(budget.reading(), 1000);
        let second = tokio::time::timeout(Duration::from_millis(50), budget.reserve_read(1));
        assert!(second.await.is_err(), "the budget was spent");
        drop(first);
        let third = tokio::time::timeout(Duration::from_millis(50), budget.reserve_read(1000));
        assert!(third.await.is_ok());
        budget.count_closed();
        assert_eq!(budget.closed(), 1);
    }
}
