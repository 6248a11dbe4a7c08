//! Per-node backpressure: a writer that holds too much for one failing cluster node makes
//! the connections of that node's devices wait, while every other device goes on.
//!
//! [`SlotGate`] is what connections check (one atomic load per job, nothing while every
//! slot is open); [`NodeGate`] is the writer's side, deciding which nodes are closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::node::NodeAddr;
use crate::pseudonym::Pseudonym;
use crate::redis_conn::{SlotMap, key_slot};
use crate::store::fixes_key;

/// Cluster slots whose devices must wait before their next job is queued: the writer
/// closes the slots of a node once it holds `node_held_max_jobs` jobs for devices waiting
/// on that node. A bit per slot, so a connection checks its device with one atomic load
/// (and nothing at all while every slot is open).
#[derive(Debug)]
pub(super) struct SlotGate {
    any_closed: AtomicBool,
    closed: Vec<AtomicU64>,
    opened: tokio::sync::Notify,
}

impl SlotGate {
    pub(super) fn new() -> Self {
        SlotGate {
            any_closed: AtomicBool::new(false),
            closed: (0..16384 / 64).map(|_| AtomicU64::new(0)).collect(),
            opened: tokio::sync::Notify::new(),
        }
    }

    /// Whether any slot is closed (the fast path's one load).
    pub(super) fn any_closed(&self) -> bool {
        self.any_closed.load(Ordering::Acquire)
    }

    fn is_closed(&self, slot: u16) -> bool {
        self.closed
            .get(usize::from(slot / 64))
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (slot % 64)) != 0)
    }

    /// Return once `device`'s slot is open.
    pub(super) async fn wait_open(&self, device: &Pseudonym) {
        if !self.any_closed.load(Ordering::Acquire) {
            return;
        }
        let slot = key_slot(fixes_key(device).as_bytes());
        loop {
            let opened = self.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            if !self.is_closed(slot) {
                return;
            }
            opened.await;
        }
    }

    /// Close exactly `ranges` (first, last slot), opening every other slot.
    pub(super) fn set_closed(&self, ranges: &[(u16, u16)]) {
        let mut words = vec![0u64; self.closed.len()];
        for &(a, b) in ranges {
            for s in a..=b.min(16383) {
                words[usize::from(s / 64)] |= 1 << (s % 64);
            }
        }
        for (w, v) in self.closed.iter().zip(words) {
            w.store(v, Ordering::Release);
        }
        self.any_closed.store(!ranges.is_empty(), Ordering::Release);
        self.opened.notify_waiters();
    }
}

/// A writer's side of its [`SlotGate`]: which nodes it has closed. A node closes once
/// `budget` (`node_held_max_jobs`) jobs wait for it and opens again below half that, so
/// the gate does not flap around the limit.
#[derive(Debug)]
pub(super) struct NodeGate {
    gate: Arc<SlotGate>,
    budget: usize,
    closed: Vec<NodeAddr>,
    /// Jobs held for devices on the closed nodes: not counted against `held_max_jobs`
    /// (the gate bounds them), so the other nodes' devices keep being taken.
    closed_held: usize,
}

impl NodeGate {
    pub(super) fn new(gate: Arc<SlotGate>, budget: usize) -> Self {
        NodeGate {
            gate,
            budget,
            closed: Vec::new(),
            closed_held: 0,
        }
    }

    /// Jobs held for the devices of closed nodes.
    pub(super) fn closed_held(&self) -> usize {
        self.closed_held
    }

    /// Close the slots (in `map`) of exactly the nodes that hold too much: `waiting` is,
    /// per node, the jobs held for its devices that wait for a retry. Returns the closed
    /// nodes when more are closed than before (worth a warning).
    pub(super) fn update(
        &mut self,
        waiting: Vec<(NodeAddr, usize)>,
        map: &SlotMap,
    ) -> Option<&[NodeAddr]> {
        let mut closed: Vec<NodeAddr> = Vec::new();
        self.closed_held = 0;
        for (node, jobs) in waiting {
            if jobs >= self.budget || (self.closed.contains(&node) && jobs >= self.budget / 2) {
                closed.push(node);
                self.closed_held += jobs;
            }
        }
        closed.sort();
        if closed == self.closed {
            return None;
        }
        let ranges: Vec<(u16, u16)> = closed.iter().flat_map(|n| map.ranges_of(n)).collect();
        let more = closed.len() > self.closed.len();
        self.gate.set_closed(&ranges);
        self.closed = closed;
        more.then_some(self.closed.as_slice())
    }

    /// Open every slot: nobody waits on a writer that is gone.
    pub(super) fn open_all(&self) {
        self.gate.set_closed(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16) -> NodeAddr {
        ("10.0.0.1".to_string(), port)
    }

    #[test]
    fn a_slot_gate_closes_exactly_its_ranges() {
        let gate = SlotGate::new();
        assert!(!gate.any_closed());
        gate.set_closed(&[(0, 99), (16000, u16::MAX)]);
        assert!(gate.any_closed());
        assert!(gate.is_closed(0) && gate.is_closed(99) && gate.is_closed(16383));
        assert!(!gate.is_closed(100) && !gate.is_closed(15999));
        gate.set_closed(&[]);
        assert!(!gate.any_closed() && !gate.is_closed(0));
    }

    #[tokio::test]
    async fn a_device_on_an_open_slot_does_not_wait() {
        let gate = SlotGate::new();
        let p = Pseudonym::parse("p1_abcdefghijklmnopqrstuvwxyz").unwrap();
        let slot = key_slot(fixes_key(&p).as_bytes());
        let other = if slot == 0 { 1 } else { slot - 1 };
        gate.set_closed(&[(other, other)]);
        tokio::time::timeout(std::time::Duration::from_secs(1), gate.wait_open(&p))
            .await
            .expect("not gated");
    }

    #[test]
    fn a_node_closes_at_its_budget_and_opens_below_half() {
        let mut g = NodeGate::new(Arc::new(SlotGate::new()), 10);
        let map = SlotMap::default();
        assert_eq!(g.update(vec![(node(1), 9), (node(2), 3)], &map), None);
        assert_eq!((g.closed.len(), g.closed_held()), (0, 0));
        let closed = g.update(vec![(node(1), 10), (node(2), 3)], &map);
        assert_eq!(closed, Some(&[node(1)][..]), "at the budget");
        assert_eq!(g.closed_held(), 10);
        assert_eq!(
            g.update(vec![(node(1), 5)], &map),
            None,
            "still closed at half"
        );
        assert_eq!((g.closed.as_slice(), g.closed_held()), (&[node(1)][..], 5));
        assert_eq!(g.update(vec![(node(1), 4)], &map), None, "opens below half");
        assert_eq!((g.closed.len(), g.closed_held()), (0, 0));
    }
}
