//! Each client's share of a cluster's connection slots: once fewer than half the slots are free, a
//! client (a caller's identity, or its address) that already holds its share (the slots divided among
//! the clients holding any) is refused another instead of waiting, so one client holding slots with
//! slow requests cannot take them all from the others. A lone client may take all but a tenth, kept
//! for clients that arrive after it.
//!
//! Clients are counted in a fixed table of atomic counters indexed by a hash of the client, so
//! counting costs no lock and no allocation; two clients that share a counter share a quota.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::OwnedSemaphorePermit;

const BUCKETS: usize = 256;
/// A lone client leaves a tenth of the slots free (once half are in use) for clients to come.
const RESERVE_DIVISOR: u32 = 10;

#[derive(Debug)]
pub(crate) struct ClientShares {
    held: [AtomicU32; BUCKETS],
    /// Counters above zero: the clients holding slots.
    clients: AtomicU32,
}

impl Default for ClientShares {
    fn default() -> Self {
        Self {
            held: std::array::from_fn(|_| AtomicU32::new(0)),
            clients: AtomicU32::new(0),
        }
    }
}

impl ClientShares {
    fn bucket(client: u64) -> usize {
        usize::try_from(client % BUCKETS as u64).unwrap_or(0)
    }

    /// Whether `client` must be refused a slot, with `free` of `max` slots free.
    pub(crate) fn over_share(&self, client: u64, free: usize, max: u32) -> bool {
        let contended = u64::try_from(free).unwrap_or(u64::MAX) * 2 < u64::from(max);
        if !contended {
            return false;
        }
        let held = self.held[Self::bucket(client)].load(Ordering::Relaxed);
        // Counting the asking client, in case it holds nothing yet.
        let clients = self.clients.load(Ordering::Relaxed).max(1) + u32::from(held == 0);
        let share = match clients {
            // Alone, a client may take all but a reserve, so that a client arriving later finds
            // slots to take.
            1 => max - max / RESERVE_DIVISOR,
            n => max / n,
        };
        // A share of every slot is no share: at `max_connections` the request waits as pending.
        let share = share.max(1);
        held >= share && share < max
    }

    /// Counts a slot `client` took, for as long as the returned slot lives.
    pub(crate) fn take(self: &Arc<Self>, client: u64, permit: OwnedSemaphorePermit) -> ConnectionSlot {
        let bucket = Self::bucket(client);
        if self.held[bucket].fetch_add(1, Ordering::Relaxed) == 0 {
            self.clients.fetch_add(1, Ordering::Relaxed);
        }
        ConnectionSlot {
            _permit: permit,
            shares: self.clone(),
            bucket,
        }
    }
}

/// An upstream connection slot of a cluster, counted against the client that holds it.
#[derive(Debug)]
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    shares: Arc<ClientShares>,
    bucket: usize,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if self.shares.held[self.bucket].fetch_sub(1, Ordering::Relaxed) == 1 {
            self.shares.clients.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
