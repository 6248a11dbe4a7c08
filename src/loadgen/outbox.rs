//! A device's unconfirmed records, kept the way Meitrack firmware keeps them.
//!
//! Fixes that could not be sent (no coverage, no connection) wait in `pending`. Batches
//! sent as CCE wait in `in_flight` until the gateway confirms them; the gateway answers in
//! order, so each confirmation belongs to the oldest batch. When the connection drops,
//! every unconfirmed batch goes back to the front of `pending`, oldest first, and is sent
//! again after the reconnect: a record leaves the device only once it was confirmed.

use std::collections::VecDeque;
use std::time::Instant;

use trackgate_protocols::Fix;

/// A sent, unconfirmed batch.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// When the batch was due (open-loop schedule); latency is measured from here.
    pub due: Instant,
    /// When it was handed to the socket; the confirmation timeout runs from here.
    pub sent: Instant,
    pub fixes: Vec<Fix<'static>>,
}

/// Pending and in-flight records of one device.
#[derive(Debug, Default)]
pub struct Outbox {
    pending: VecDeque<Fix<'static>>,
    in_flight: VecDeque<InFlight>,
    /// Most records the device holds; the oldest are dropped beyond it (firmware does the same).
    capacity: usize,
    /// Records dropped because the cache was full.
    pub overflowed: u64,
}

impl Outbox {
    pub fn new(capacity_fixes: usize) -> Outbox {
        Outbox {
            capacity: capacity_fixes.max(1),
            ..Outbox::default()
        }
    }

    /// Cache a fix that cannot be sent now.
    pub fn hold(&mut self, fix: Fix<'static>) {
        self.pending.push_back(fix);
        while self.held() > self.capacity {
            if self.pending.pop_front().is_none() {
                break;
            }
            self.overflowed += 1;
        }
    }

    /// Records waiting to be sent.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Records sent and not confirmed.
    pub fn unconfirmed(&self) -> usize {
        self.in_flight.iter().map(|b| b.fixes.len()).sum()
    }

    /// Pending plus unconfirmed records.
    pub fn held(&self) -> usize {
        self.pending.len() + self.unconfirmed()
    }

    /// Up to `max` pending fixes, oldest first, to send as one batch (see [`Outbox::sent`]).
    pub fn next_batch(&mut self, max: usize) -> Vec<Fix<'static>> {
        let n = self.pending.len().min(max.max(1));
        self.pending.drain(..n).collect()
    }

    /// A batch was written to the socket.
    pub fn sent(&mut self, due: Instant, fixes: Vec<Fix<'static>>) {
        self.in_flight.push_back(InFlight {
            due,
            sent: Instant::now(),
            fixes,
        });
    }

    /// The gateway confirmed a batch: it is the oldest one in flight.
    pub fn confirmed(&mut self) -> Option<InFlight> {
        self.in_flight.pop_front()
    }

    /// When the oldest unconfirmed batch was sent.
    pub fn oldest_sent(&self) -> Option<Instant> {
        self.in_flight.front().map(|b| b.sent)
    }

    /// The connection is gone: unconfirmed batches go back in front of the pending
    /// records, in their original order. Returns how many records will be sent again.
    pub fn requeue(&mut self) -> usize {
        let mut n = 0;
        while let Some(b) = self.in_flight.pop_back() {
            n += b.fixes.len();
            for f in b.fixes.into_iter().rev() {
                self.pending.push_front(f);
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fix(t: u32) -> Fix<'static> {
        Fix {
            runtime_s: Some(u64::from(t)),
            ..Fix::default()
        }
    }

    fn ids(fixes: &[Fix<'static>]) -> Vec<u64> {
        fixes.iter().filter_map(|f| f.runtime_s).collect()
    }

    #[test]
    fn unconfirmed_batches_are_resent_in_order_after_a_drop() {
        let now = Instant::now();
        let mut o = Outbox::new(1000);
        for t in 0..10 {
            o.hold(fix(t));
        }
        let a = o.next_batch(4);
        assert_eq!(ids(&a), [0, 1, 2, 3]);
        o.sent(now, a);
        let b = o.next_batch(4);
        o.sent(now, b);
        o.hold(fix(10));
        // The first batch is confirmed, the second is not when the connection drops.
        assert_eq!(o.confirmed().map(|b| ids(&b.fixes)), Some(vec![0, 1, 2, 3]));
        assert_eq!(o.requeue(), 4);
        assert_eq!(o.unconfirmed(), 0);
        let all = o.next_batch(100);
        assert_eq!(
            ids(&all),
            [4, 5, 6, 7, 8, 9, 10],
            "nothing lost, nothing reordered"
        );
    }

    #[test]
    fn confirmations_match_the_oldest_batch() {
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_secs(1);
        let mut o = Outbox::new(10);
        o.sent(t0, vec![fix(1)]);
        o.sent(t1, vec![fix(2), fix(3)]);
        assert!(o.oldest_sent().is_some_and(|s| s >= t0));
        assert_eq!(o.unconfirmed(), 3);
        assert_eq!(o.confirmed().map(|b| b.due), Some(t0));
        assert_eq!(o.confirmed().map(|b| b.due), Some(t1));
        assert!(o.oldest_sent().is_none());
        assert!(o.confirmed().is_none());
    }

    #[test]
    fn a_full_cache_drops_the_oldest_pending_and_counts_it() {
        let mut o = Outbox::new(3);
        for t in 0..5 {
            o.hold(fix(t));
        }
        assert_eq!(o.overflowed, 2);
        assert_eq!(ids(&o.next_batch(10)), [2, 3, 4]);
    }
}
