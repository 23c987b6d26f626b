//! The retry budget's window: requests and retries of a cluster over the budget's interval, in ten
//! buckets of atomics. Every request deposits into the current bucket; a retry withdraws when the
//! window's totals allow it. Concurrent requests may see the same totals, so the budget can be exceeded
//! by the number of retries decided at the same instant: the price of keeping it off a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use weft_model::RetryBudget;

const BUCKETS: usize = 10;

#[derive(Debug)]
pub(crate) struct BudgetWindow {
    origin: Instant,
    buckets: [Bucket; BUCKETS],
}

#[derive(Debug, Default)]
struct Bucket {
    /// Which bucket since `origin` this slot holds now.
    number: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl BudgetWindow {
    pub(crate) fn new(origin: Instant) -> Self {
        Self {
            origin,
            buckets: Default::default(),
        }
    }

    fn number(&self, now: Instant, interval: Duration) -> u64 {
        let width = (interval.as_nanos() / BUCKETS as u128).max(1);
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos() / width).unwrap_or(u64::MAX)
    }

    /// The slot of the current bucket, emptied first if it still held an older one.
    fn current(&self, now: Instant, interval: Duration) -> &Bucket {
        let number = self.number(now, interval);
        let slot = &self.buckets[(number % BUCKETS as u64) as usize];
        let held = slot.number.load(Ordering::Acquire);
        if held != number
            && slot
                .number
                .compare_exchange(held, number, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }

    fn totals(&self, now: Instant, interval: Duration) -> (u64, u64) {
        let current = self.number(now, interval);
        self.buckets
            .iter()
            .filter(|b| {
                let n = b.number.load(Ordering::Acquire);
                n <= current && n + BUCKETS as u64 > current
            })
            .fold((0, 0), |(requests, retries), b| {
                (
                    requests + b.requests.load(Ordering::Relaxed),
                    retries + b.retries.load(Ordering::Relaxed),
                )
            })
    }

    pub(crate) fn deposit(&self, now: Instant, budget: &RetryBudget) {
        self.current(now, budget.interval)
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if it has one.
    pub(crate) fn withdraw(&self, now: Instant, budget: &RetryBudget) -> bool {
        let (requests, retries) = self.totals(now, budget.interval);
        if !budget.allows(requests, retries) {
            return false;
        }
        self.current(now, budget.interval)
            .retries
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    pub(crate) fn refund(&self, now: Instant, budget: &RetryBudget) {
        let retries = &self.current(now, budget.interval).retries;
        let _ = retries.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_beyond_the_interval_are_forgotten() {
        let budget = RetryBudget {
            budget_percent: 50.0,
            min_retries: 0,
            interval: Duration::from_secs(10),
        };
        let window = BudgetWindow::new(Instant::now());
        for _ in 0..4 {
            window.deposit(Instant::now(), &budget);
        }
        assert!(window.withdraw(Instant::now(), &budget));
        assert!(window.withdraw(Instant::now(), &budget));
        assert!(!window.withdraw(Instant::now(), &budget), "half of four");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            !window.withdraw(Instant::now(), &budget),
            "still inside the interval"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(
            !window.withdraw(Instant::now(), &budget),
            "no requests left in the window"
        );
        for _ in 0..2 {
            window.deposit(Instant::now(), &budget);
        }
        assert!(window.withdraw(Instant::now(), &budget));
        window.refund(Instant::now(), &budget);
        assert!(
            window.withdraw(Instant::now(), &budget),
            "a refund gives the retry back"
        );
        assert!(!window.withdraw(Instant::now(), &budget));
    }
}
