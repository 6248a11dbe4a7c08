//! One writer task: it takes jobs from its queue, holds them per device, sends every idle
//! node one pipeline of append calls at a time and settles what comes back (confirm the
//! jobs, or back the device off for a retry).
//!
//! Invariants: a device has at most one call in flight and only its oldest group is sent,
//! so its fixes reach the stream in the order they were read; a job's `done` fires only
//! once Redis confirmed it.
//!
//! The writer's state comes in groups that change together, each testable without Redis:
//! [`Settings`] (fixed), [`Intake`] (what is held, the batching window), [`Retry`] (one
//! call's backoff), [`Routing`] (the cluster slot map and its refresh), [`NodeGate`]
//! (per-node backpressure) and [`WriterMetrics`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::gate::{NodeGate, SlotGate};
use super::node::{NodeAddr, NodeDone, NodeSender, Outcome, is_routing, is_transient};
use super::{Upkeep, WriteJob};
use crate::config::RedisConfig;
use crate::metrics as m;
use crate::pseudonym::Pseudonym;
use crate::redis_conn::{RedisConn, SlotMap, key_slot};
use crate::redis_memory::{self, OomTally, OomWatch};
use crate::store::fixes_key;
use crate::store::scripts::{self, Appended};

/// A writer's fixed settings (`[redis]`, and the upkeep of the append script).
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    batch_max_fixes: usize,
    batch_max_delay: Duration,
    backoff: Backoff,
    held_max_jobs: usize,
    node_held_max_jobs: usize,
    max_permanent_failures: u32,
    upkeep: Upkeep,
}

impl Settings {
    pub(super) fn new(config: &RedisConfig, upkeep: Upkeep) -> Self {
        Settings {
            batch_max_fixes: config.batch_max_fixes,
            batch_max_delay: Duration::from_millis(config.batch_max_delay_ms),
            backoff: Backoff {
                initial: Duration::from_millis(config.retry_backoff_initial_ms),
                max: Duration::from_millis(config.retry_backoff_max_ms),
            },
            held_max_jobs: config.held_max_jobs,
            node_held_max_jobs: config.node_held_max_jobs,
            max_permanent_failures: config.max_permanent_failures,
            upkeep,
        }
    }
}

/// Capped exponential backoff: `initial`, doubling up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backoff {
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// The wait after one of `current`.
    fn after(self, current: Duration) -> Duration {
        (current * 2).min(self.max)
    }
}

/// Batch ids, unique across the writers (one shared sequence) and gateways (a random
/// instance number): the append script recognises a replay by its batch id.
#[derive(Debug, Clone)]
pub(super) struct BatchIds {
    seq: Arc<AtomicU64>,
    instance: u32,
}

impl BatchIds {
    pub(super) fn new() -> Self {
        BatchIds {
            seq: Arc::new(AtomicU64::new(0)),
            instance: rand::random(),
        }
    }

    fn next(&self) -> Arc<str> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}-{seq:x}", self.instance).into()
    }
}

/// What every writer of a gateway shares.
#[derive(Clone)]
pub(super) struct Shared {
    pub(super) conn: RedisConn,
    pub(super) sender: NodeSender,
    pub(super) settings: Settings,
    pub(super) ids: BatchIds,
    pub(super) abort: CancellationToken,
    /// Out-of-memory episodes, shared with the other writers and `/readyz`.
    pub(super) oom: Arc<OomWatch>,
}

/// One call's retry state: when it may go again, and how it failed so far.
#[derive(Debug)]
struct Retry {
    /// Backoff after a failure: not sent again before this.
    not_before: Option<Instant>,
    backoff: Duration,
    /// Failed on routing (node gone, `MOVED`): a new slot map ends the backoff.
    waiting_route: bool,
    /// Failed attempts so far (the device waits on its node while this is not 0).
    failures: u32,
    permanent_failures: u32,
    /// Redis refused it for want of memory at least once: it counts as waiting in the
    /// out-of-memory episode until it is written.
    oom_refused: bool,
}

impl Retry {
    fn new(policy: Backoff) -> Self {
        Retry {
            not_before: None,
            backoff: policy.initial,
            waiting_route: false,
            failures: 0,
            permanent_failures: 0,
            oom_refused: false,
        }
    }

    /// When it may go again, if that is after `now`.
    fn wait_until(&self, now: Instant) -> Option<Instant> {
        self.not_before.filter(|t| *t > now)
    }

    /// A failed attempt: hold back for the backoff, which then doubles. Returns when it
    /// may go again.
    fn failed(&mut self, now: Instant, policy: Backoff) -> Instant {
        let at = now + self.backoff;
        self.not_before = Some(at);
        self.failures += 1;
        self.backoff = policy.after(self.backoff);
        at
    }

    /// A permanent error (not worth retrying as it is): true once it is the `max`th, when
    /// the call is given up.
    fn permanent(&mut self, max: u32) -> bool {
        self.permanent_failures += 1;
        self.permanent_failures >= max
    }

    /// Its node answered with a routing error: a new slot map ends the backoff.
    fn lost_route(&mut self) {
        self.waiting_route = true;
    }

    /// No node serves its slot in the cached map: hold back until a new map or the end
    /// of the backoff, which then doubles (not a failed attempt). Returns when it may go.
    fn unrouted(&mut self, now: Instant, policy: Backoff) -> Instant {
        self.waiting_route = true;
        let at = now + self.backoff;
        self.not_before = Some(at);
        self.backoff = policy.after(self.backoff);
        at
    }

    /// A new slot map arrived: a call held back for its route may go at once.
    fn rerouted(&mut self) {
        if self.waiting_route {
            self.not_before = None;
            self.waiting_route = false;
        }
    }
}

/// The cluster slot map the writer routes by, and its refresh.
#[derive(Debug)]
struct Routing {
    /// `None` until first fetched.
    slots: Option<SlotMap>,
    /// A routing error was seen: fetch the map again (still routing with the old one,
    /// except to the nodes that failed).
    stale: bool,
    /// Nodes that failed with a routing error: nothing is sent to them until a new slot
    /// map has arrived (after a failover it routes elsewhere).
    suspect: HashSet<NodeAddr>,
    /// After a failed fetch: not again before this (doubling, like the write backoff).
    fetch_not_before: Option<Instant>,
    fetch_backoff: Duration,
}

/// What a slot map fetch brought.
#[derive(Debug)]
enum Fetched {
    /// A map other than the cached one (failover, resharding).
    Changed,
    Same,
    /// No map; asked again in `retry_in`.
    Failed {
        error: redis::RedisError,
        retry_in: Duration,
    },
}

impl Routing {
    fn new(policy: Backoff) -> Self {
        Routing {
            slots: None,
            stale: false,
            suspect: HashSet::new(),
            fetch_not_before: None,
            fetch_backoff: policy.initial,
        }
    }

    /// Whether to fetch the map now (none yet, or stale, and not backing off); if so,
    /// the fetch counts as started.
    fn fetch_due(&mut self, now: Instant) -> bool {
        let want = self.slots.is_none() || self.stale;
        if want && self.fetch_not_before.is_none_or(|t| t <= now) {
            self.stale = false;
            self.fetch_not_before = None;
            return true;
        }
        false
    }

    /// `node` answered with a routing error: fetch again, send it nothing meanwhile.
    fn lost(&mut self, node: &NodeAddr) {
        self.stale = true;
        self.suspect.insert(node.clone());
    }

    /// A slot the map does not cover (resharding, cluster down): fetch again.
    fn uncovered(&mut self) {
        self.stale = true;
    }

    /// Whether calls may go to `node`.
    fn usable(&self, node: &NodeAddr) -> bool {
        !self.suspect.contains(node)
    }

    /// A fetch came back (at `now`).
    fn fetched(
        &mut self,
        fetched: redis::RedisResult<SlotMap>,
        now: Instant,
        policy: Backoff,
    ) -> Fetched {
        match fetched {
            Ok(map) => {
                let changed = self.slots.as_ref() != Some(&map);
                self.slots = Some(map);
                self.suspect.clear();
                self.fetch_backoff = policy.initial;
                if changed {
                    Fetched::Changed
                } else {
                    Fetched::Same
                }
            }
            Err(error) => {
                // Ask again after a backoff; devices on the suspect nodes (or all, without
                // any map yet) wait for it, everyone else goes on.
                let retry_in = self.fetch_backoff;
                self.stale = true;
                self.fetch_not_before = Some(now + retry_in);
                self.fetch_backoff = policy.after(retry_in);
                Fetched::Failed { error, retry_in }
            }
        }
    }
}

/// The jobs a writer holds, and its batching window.
#[derive(Debug, Default)]
struct Intake {
    /// Jobs taken from the queue and not yet settled.
    held_jobs: usize,
    /// Fixes taken since the last dispatch (a full batch is sent without waiting).
    fresh_fixes: usize,
    /// When the oldest job not yet considered for sending arrived.
    window_start: Option<Instant>,
    /// Creation order of groups, so the oldest work goes first.
    group_seq: u64,
}

impl Intake {
    fn took(&mut self, fixes: usize) {
        self.held_jobs += 1;
        self.fresh_fixes += fixes;
        self.window_start.get_or_insert_with(Instant::now);
    }

    fn next_seq(&mut self) -> u64 {
        self.group_seq += 1;
        self.group_seq
    }

    /// Everything taken so far was considered for sending: a new window.
    fn dispatched(&mut self) {
        self.window_start = None;
        self.fresh_fixes = 0;
    }
}

/// A writer's metric handles.
struct WriterMetrics {
    queue: metrics::Gauge,
    held: metrics::Gauge,
    fixes_written: metrics::Counter,
    /// Fixes confirmed but not written: refused by a purge, or a resend already stored.
    fixes_purged: metrics::Counter,
    fixes_resent: metrics::Counter,
    write_seconds: metrics::Histogram,
}

impl WriterMetrics {
    fn new(writer: usize) -> Self {
        WriterMetrics {
            queue: metrics::gauge!(m::QUEUE_DEPTH, "writer" => writer.to_string()),
            held: metrics::gauge!(m::WRITER_HELD_JOBS, "writer" => writer.to_string()),
            fixes_written: metrics::counter!(m::FIXES_WRITTEN),
            fixes_purged: metrics::counter!(m::FIXES_NOT_STORED, "reason" => "purged"),
            fixes_resent: metrics::counter!(m::FIXES_NOT_STORED, "reason" => "resent"),
            write_seconds: metrics::histogram!(m::REDIS_WRITE_SECONDS),
        }
    }
}

/// One device's share of the work: one script call each time it is sent.
struct Group {
    /// Given at the first send and kept for every retry: the script recognises a replay
    /// by it. Jobs never join a group once it has one (a retry carrying them would be
    /// taken for a replay, and they would be skipped).
    batch_id: Option<Arc<str>>,
    jobs: Vec<WriteJob>,
    /// Fixes in `jobs`: a group is closed at `batch_max_fixes`, so one call stays small.
    fixes: usize,
    /// Writer-wide creation order, so the oldest work goes first.
    seq: u64,
    retry: Retry,
}

/// A device's groups, oldest first. Only the head is sent, and only while nothing else of
/// the device is in flight: its fixes reach the stream in the order they were read, and a
/// retry never races a newer call.
#[derive(Default)]
struct DeviceQueue {
    groups: VecDeque<Group>,
    in_flight: bool,
    /// The device's cluster slot, computed on first need.
    slot: Option<u16>,
}

type InFlight = FuturesUnordered<Pin<Box<dyn Future<Output = NodeDone> + Send>>>;
type SlotFetch = Pin<Box<dyn Future<Output = redis::RedisResult<SlotMap>> + Send>>;
type ScriptLoad = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Lower `slot` to `at` if that is earlier.
fn earliest(slot: &mut Option<Instant>, at: Instant) {
    *slot = Some(slot.map_or(at, |r| r.min(at)));
}

/// One writer task: its queue, the work it holds per device, and its calls in flight.
pub(super) struct Writer {
    id: usize,
    conn: RedisConn,
    sender: NodeSender,
    rx: mpsc::Receiver<WriteJob>,
    settings: Settings,
    ids: BatchIds,
    abort: CancellationToken,
    oom: Arc<OomWatch>,
    gate: NodeGate,
    routing: Routing,
    intake: Intake,
    metrics: WriterMetrics,
    /// Devices with work held by this writer.
    devices: HashMap<Pseudonym, DeviceQueue>,
    /// Earliest backoff expiry among the devices waiting for a retry.
    next_retry: Option<Instant>,
    in_flight: InFlight,
    /// Nodes with a pipeline of this writer in flight.
    busy: HashSet<NodeAddr>,
    slot_fetch: Option<SlotFetch>,
    /// `SCRIPT LOAD` after a `NOSCRIPT`, in the background.
    script_load: Option<ScriptLoad>,
}

impl Writer {
    pub(super) fn new(
        id: usize,
        rx: mpsc::Receiver<WriteJob>,
        gate: Arc<SlotGate>,
        shared: &Shared,
    ) -> Self {
        let settings = shared.settings;
        Writer {
            id,
            conn: shared.conn.clone(),
            sender: shared.sender.clone(),
            rx,
            settings,
            ids: shared.ids.clone(),
            abort: shared.abort.clone(),
            oom: shared.oom.clone(),
            gate: NodeGate::new(gate, settings.node_held_max_jobs),
            routing: Routing::new(settings.backoff),
            intake: Intake::default(),
            metrics: WriterMetrics::new(id),
            devices: HashMap::new(),
            next_retry: None,
            in_flight: FuturesUnordered::new(),
            busy: HashSet::new(),
            slot_fetch: None,
            script_load: None,
        }
    }

    pub(super) async fn run(mut self) {
        // Best effort: with the script cached the first batch needs no NOSCRIPT round.
        self.load_script().await;
        let mut rx_open = true;
        loop {
            if !rx_open && self.devices.is_empty() && self.in_flight.is_empty() {
                break;
            }
            let take = rx_open && self.room();
            let wake = self.next_wake();
            tokio::select! {
                biased;
                () = self.abort.cancelled() => break,
                Some(done) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.settle(done);
                    self.dispatch();
                }
                () = poll_opt(&mut self.script_load), if self.script_load.is_some() => {
                    self.script_load = None;
                }
                fetched = poll_opt(&mut self.slot_fetch), if self.slot_fetch.is_some() => {
                    self.slot_fetch = None;
                    self.slots_fetched(fetched);
                    self.dispatch();
                }
                () = sleep_until_opt(wake), if wake.is_some() => {
                    self.oom.poll(Instant::now());
                    self.dispatch();
                }
                job = self.rx.recv(), if take => rx_open = self.on_job(job),
            }
            self.metrics.queue.set(self.rx.len() as f64);
            self.metrics.held.set(self.intake.held_jobs as f64);
        }
        self.gate.open_all();
        let left = self.intake.held_jobs + self.rx.len();
        if left > 0 {
            tracing::error!(
                writer = self.id,
                jobs = left,
                "writer stopped with unwritten jobs; they were not acknowledged"
            );
            metrics::counter!(m::JOBS_UNWRITTEN).increment(left as u64);
        }
    }

    /// A job from the queue (`None`: closed). Takes what else is queued, and sends once a
    /// batch is full or nothing more can come. False once the queue is closed.
    fn on_job(&mut self, job: Option<WriteJob>) -> bool {
        let Some(job) = job else {
            self.dispatch();
            return false;
        };
        self.take(job);
        let rx_open = self.take_queued();
        if self.intake.fresh_fixes >= self.settings.batch_max_fixes || !rx_open {
            self.dispatch();
        }
        rx_open
    }

    fn load_script(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut conn = self.conn.clone();
        async move {
            let load = scripts::load_append(&mut conn);
            let _ = tokio::time::timeout(Duration::from_secs(1), load).await;
        }
    }

    /// Room for another job under `held_max_jobs` (jobs of closed nodes not counted).
    fn room(&self) -> bool {
        self.intake
            .held_jobs
            .saturating_sub(self.gate.closed_held())
            < self.settings.held_max_jobs
    }

    fn next_wake(&self) -> Option<Instant> {
        let window = self
            .intake
            .window_start
            .map(|t| t + self.settings.batch_max_delay);
        // The end of an out-of-memory episode, if it is this writer's to see.
        let oom_end = self.oom.active().then(|| self.oom.end_due()).flatten();
        [
            window,
            self.next_retry,
            self.routing.fetch_not_before,
            oom_end,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Hold `job` in its device's queue: in the open (never sent) last group, or a new one.
    fn take(&mut self, job: WriteJob) {
        self.intake.took(job.fixes.len());
        let dq = match self.devices.get_mut(&job.device) {
            Some(dq) => dq,
            None => self.devices.entry(job.device.clone()).or_default(),
        };
        let fixes = job.fixes.len();
        match dq.groups.back_mut() {
            Some(open) if open.batch_id.is_none() && open.fixes < self.settings.batch_max_fixes => {
                open.fixes += fixes;
                open.jobs.push(job);
            }
            _ => {
                dq.groups.push_back(Group {
                    batch_id: None,
                    jobs: vec![job],
                    fixes,
                    seq: self.intake.next_seq(),
                    retry: Retry::new(self.settings.backoff),
                });
            }
        }
    }

    /// Take what is already queued, without waiting, up to a batch; false once the queue
    /// is closed and empty.
    fn take_queued(&mut self) -> bool {
        while self.intake.fresh_fixes < self.settings.batch_max_fixes && self.room() {
            match self.rx.try_recv() {
                Ok(job) => self.take(job),
                Err(mpsc::error::TryRecvError::Empty) => return true,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
        true
    }

    /// Send every device whose turn it is, one pipeline per idle node (about
    /// `batch_max_fixes` fixes each, the oldest work first). Devices left behind wait for
    /// their node's pipeline to come back, a new slot map, or the end of their backoff.
    fn dispatch(&mut self) {
        self.intake.dispatched();
        self.next_retry = None;
        let now = Instant::now();
        let due = self.due(now);
        let cluster = self.conn.is_cluster();
        if cluster {
            self.update_gate();
        }
        if cluster && self.slot_fetch.is_none() && self.routing.fetch_due(now) {
            let conn = self.conn.clone();
            self.slot_fetch = Some(Box::pin(async move { conn.slot_map().await }));
        }
        if due.is_empty() || (cluster && self.routing.slots.is_none()) {
            return; // nothing to send, or routed once the map arrives
        }
        let now_ms = jiff::Timestamp::now().as_millisecond();
        for (node, devices) in self.by_node(due, now, cluster) {
            self.send(node, devices, now_ms);
        }
    }

    /// The devices whose head call may go now (nothing of theirs in flight, no backoff
    /// running), with their head's creation order; notes the earliest backoff expiry.
    fn due(&mut self, now: Instant) -> Vec<(u64, Pseudonym)> {
        let mut due = Vec::new();
        for (p, dq) in &self.devices {
            let Some(head) = dq.groups.front() else {
                continue;
            };
            if dq.in_flight {
                continue;
            }
            match head.retry.wait_until(now) {
                Some(t) => earliest(&mut self.next_retry, t),
                None => due.push((head.seq, p.clone())),
            }
        }
        due
    }

    /// The `due` devices by node, oldest work first, about `batch_max_fixes` per node;
    /// devices of busy or suspect nodes wait, those of uncovered slots back off.
    fn by_node(
        &mut self,
        mut due: Vec<(u64, Pseudonym)>,
        now: Instant,
        cluster: bool,
    ) -> Vec<(NodeAddr, Vec<Pseudonym>)> {
        due.sort_unstable_by_key(|(seq, _)| *seq);
        // Per node: the devices and the fixes of their head calls.
        let mut per_node: Vec<(NodeAddr, Vec<Pseudonym>, usize)> = Vec::new();
        let mut unrouted = 0usize;
        for (_, p) in due {
            let Some(dq) = self.devices.get_mut(&p) else {
                continue;
            };
            let node = match &self.routing.slots {
                Some(map) if cluster => {
                    let slot = *dq
                        .slot
                        .get_or_insert_with(|| key_slot(fixes_key(&p).as_bytes()));
                    match map.node(slot) {
                        Some(n) => n.clone(),
                        None => {
                            // Not covered (resharding, cluster down): ask for a new map.
                            unrouted += 1;
                            if let Some(head) = dq.groups.front_mut() {
                                let at = head.retry.unrouted(now, self.settings.backoff);
                                earliest(&mut self.next_retry, at);
                            }
                            continue;
                        }
                    }
                }
                _ => (String::new(), 0),
            };
            if self.busy.contains(&node) || !self.routing.usable(&node) {
                continue; // sent when the node's pipeline returns, or the new map arrives
            }
            let fixes = dq.groups.front().map_or(0, |g| g.fixes);
            match per_node.iter_mut().find(|(n, _, _)| *n == node) {
                Some((_, devices, n)) => {
                    if *n + fixes <= self.settings.batch_max_fixes {
                        devices.push(p);
                        *n += fixes;
                    } // else: full; goes with this node's next pipeline
                }
                None => per_node.push((node, vec![p], fixes)),
            }
        }
        if unrouted > 0 {
            self.routing.uncovered();
            tracing::warn!(
                writer = self.id,
                devices = unrouted,
                "slots not covered by the cached cluster map; retrying"
            );
        }
        per_node
            .into_iter()
            .map(|(node, devices, _)| (node, devices))
            .collect()
    }

    /// Send the head calls of `candidates` to `node`, as one pipeline in flight.
    fn send(&mut self, node: NodeAddr, candidates: Vec<Pseudonym>, now_ms: i64) {
        let fresh_id = self.ids.next();
        let mut devices = Vec::with_capacity(candidates.len());
        let mut pipe = redis::Pipeline::with_capacity(candidates.len());
        for p in candidates {
            let Some(dq) = self.devices.get_mut(&p) else {
                continue;
            };
            let Some(head) = dq.groups.front_mut() else {
                continue;
            };
            dq.in_flight = true;
            let id = head.batch_id.get_or_insert_with(|| fresh_id.clone());
            let batch = self.settings.upkeep.batch(id, now_ms);
            scripts::append(&mut pipe, &p, &batch, head.jobs.iter().map(WriteJob::frame));
            devices.push(p);
        }
        self.busy.insert(node.clone());
        let sender = self.sender.clone();
        self.in_flight.push(Box::pin(async move {
            let started = Instant::now();
            let outcomes = sender.send(&node, pipe).await;
            NodeDone {
                node,
                devices,
                outcomes,
                elapsed: started.elapsed(),
            }
        }));
    }

    /// Close the slots of every node for which this writer holds `node_held_max_jobs` jobs
    /// of waiting devices (devices whose write failed and is being retried), so their
    /// connections stop reading while the other nodes' devices go on; open them again
    /// below half that (or when the node's devices are written).
    fn update_gate(&mut self) {
        let Some(map) = &self.routing.slots else {
            return;
        };
        let mut waiting: Vec<(NodeAddr, usize)> = Vec::new();
        for (p, dq) in &self.devices {
            if dq.groups.front().is_none_or(|h| h.retry.failures == 0) {
                continue;
            }
            let slot = dq.slot.unwrap_or_else(|| key_slot(fixes_key(p).as_bytes()));
            let Some(node) = map.node(slot) else {
                continue;
            };
            let jobs: usize = dq.groups.iter().map(|g| g.jobs.len()).sum();
            match waiting.iter_mut().find(|(n, _)| n == node) {
                Some((_, n)) => *n += jobs,
                None => waiting.push((node.clone(), jobs)),
            }
        }
        if let Some(closed) = self.gate.update(waiting, map) {
            tracing::warn!(writer = self.id, nodes = ?closed, "holding too much for a failing node: its devices wait (connections stop reading)");
        }
    }

    fn slots_fetched(&mut self, fetched: redis::RedisResult<SlotMap>) {
        match self
            .routing
            .fetched(fetched, Instant::now(), self.settings.backoff)
        {
            Fetched::Changed => {
                // The cluster changed (failover, resharding): devices that back off
                // after a routing error may have a working route now.
                for dq in self.devices.values_mut().filter(|dq| !dq.in_flight) {
                    if let Some(head) = dq.groups.front_mut() {
                        head.retry.rerouted();
                    }
                }
            }
            Fetched::Same => {}
            Fetched::Failed { error, retry_in } => {
                tracing::warn!(writer = self.id, error = %error, retry_in_ms = retry_in.as_millis() as u64, "could not fetch the cluster slot map");
                metrics::counter!(m::REDIS_WRITE_ERRORS).increment(1);
            }
        }
    }

    /// Record the outcome of a node pipeline: confirm what was applied, set the rest back
    /// for a retry after its own backoff. Refusals for want of memory are not logged here
    /// but counted into the out-of-memory episode ([`OomWatch`]), which logs its start and
    /// end once for all writers: a full Redis refuses every retry of every device.
    fn settle(&mut self, done: NodeDone) {
        self.busy.remove(&done.node);
        self.metrics
            .write_seconds
            .record(done.elapsed.as_secs_f64());
        let now = Instant::now();
        let mut failed: Option<(usize, String)> = None;
        let mut any_failed = false;
        let mut oom = OomTally::default();
        let mut oom_error = None;
        let mut noscript = false;
        for (p, outcome) in done.devices.iter().zip(done.outcomes) {
            let Some(dq) = self.devices.get_mut(p) else {
                continue;
            };
            dq.in_flight = false;
            match outcome {
                Outcome::Applied(n) => self.confirm(p, n, &mut oom),
                Outcome::Failed(e) => {
                    any_failed = true;
                    noscript |= e.code() == Some("NOSCRIPT");
                    if is_routing(&e) && self.conn.is_cluster() {
                        self.routing.lost(&done.node);
                        if let Some(head) = dq.groups.front_mut() {
                            head.retry.lost_route();
                        }
                    }
                    if redis_memory::is_oom(&e) {
                        oom.refused += 1;
                        if let Some(head) = dq.groups.front_mut().filter(|h| !h.retry.oom_refused) {
                            head.retry.oom_refused = true;
                            oom.new_devices += 1;
                            oom.new_jobs += head.jobs.len();
                        }
                        self.failed(p, &e, now);
                        oom_error.get_or_insert(e);
                    } else if self.failed(p, &e, now) {
                        let f = failed.get_or_insert_with(|| (0, e.to_string()));
                        f.0 += 1;
                    }
                }
            }
        }
        if any_failed {
            metrics::counter!(m::REDIS_WRITE_ERRORS).increment(1);
        }
        self.oom.record(oom, oom_error.as_ref(), now);
        if let Some((devices, error)) = failed {
            tracing::warn!(
                writer = self.id,
                node = %format_args!("{}:{}", done.node.0, done.node.1),
                devices,
                error = %error,
                "redis write failed; these devices' fixes are kept for a retry"
            );
        }
        if noscript && self.script_load.is_none() {
            // A restarted Redis (or a promoted replica) lacks the script; the devices
            // retry after their backoff, by when it is loaded (on every primary).
            self.script_load = Some(Box::pin(self.load_script()));
        }
    }

    /// The head call of `p` was applied: its jobs are confirmed.
    fn confirm(&mut self, p: &Pseudonym, n: Appended, oom: &mut OomTally) {
        let Some(dq) = self.devices.get_mut(p) else {
            return;
        };
        if let Some(g) = dq.groups.pop_front() {
            self.intake.held_jobs -= g.jobs.len();
            if g.retry.oom_refused {
                oom.done_devices += 1;
                oom.done_jobs += g.jobs.len();
            }
            for job in g.jobs {
                if let Some(done) = job.done {
                    let _ = done.send(()); // the connection may be gone; fine
                }
            }
        }
        if dq.groups.is_empty() {
            self.devices.remove(p);
        }
        if let Appended::Written {
            written,
            purged,
            resent,
        } = n
        {
            self.metrics.fixes_written.increment(written);
            self.metrics.fixes_purged.increment(purged);
            self.metrics.fixes_resent.increment(resent);
        }
    }

    /// The head call of `p` failed with `e`: back off, or give up on a permanent error
    /// after `redis.max_permanent_failures` attempts (unacknowledged, so one broken key cannot
    /// hold the device forever). True if it will be retried.
    fn failed(&mut self, p: &Pseudonym, e: &redis::RedisError, now: Instant) -> bool {
        let Some(dq) = self.devices.get_mut(p) else {
            return false;
        };
        let Some(head) = dq.groups.front_mut() else {
            return false;
        };
        if !is_transient(e) && head.retry.permanent(self.settings.max_permanent_failures) {
            let (jobs, oom_refused) = dq
                .groups
                .pop_front()
                .map_or((0, false), |g| (g.jobs.len(), g.retry.oom_refused));
            if oom_refused {
                let gone = OomTally {
                    done_devices: 1,
                    done_jobs: jobs,
                    ..OomTally::default()
                };
                self.oom.record(gone, None, now);
            }
            if dq.groups.is_empty() {
                self.devices.remove(p);
            }
            self.intake.held_jobs -= jobs;
            metrics::counter!(m::JOBS_UNWRITTEN).increment(jobs as u64);
            tracing::error!(
                writer = self.id,
                device = %p,
                error = %e,
                "giving up on this device's write; not acknowledged"
            );
            return false;
        }
        let at = head.retry.failed(now, self.settings.backoff);
        earliest(&mut self.next_retry, at);
        true
    }
}

/// Await the future in `slot`, or never if there is none.
async fn poll_opt<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(350),
    };

    fn node(port: u16) -> NodeAddr {
        ("10.0.0.1".to_string(), port)
    }

    fn refused() -> redis::RedisError {
        redis::RedisError::from((redis::ErrorKind::Io, "connection refused"))
    }

    #[test]
    fn a_failing_call_backs_off_doubling_up_to_the_cap() {
        let mut r = Retry::new(POLICY);
        let t0 = Instant::now();
        assert_eq!(r.wait_until(t0), None, "a new call may go at once");
        let mut waits = Vec::new();
        for _ in 0..4 {
            waits.push(r.failed(t0, POLICY) - t0);
        }
        let ms = |n| Duration::from_millis(n);
        assert_eq!(waits, [ms(100), ms(200), ms(350), ms(350)]);
        assert_eq!(r.failures, 4);
        assert_eq!(r.wait_until(t0), Some(t0 + ms(350)));
        assert_eq!(
            r.wait_until(t0 + ms(350)),
            None,
            "due once the backoff ran out"
        );
    }

    #[test]
    fn a_permanent_error_gives_up_at_the_limit() {
        let mut r = Retry::new(POLICY);
        assert!(!r.permanent(3));
        assert!(!r.permanent(3));
        assert!(r.permanent(3), "the third is the last");
    }

    #[test]
    fn a_call_waiting_for_its_route_goes_when_a_new_map_arrives() {
        let mut r = Retry::new(POLICY);
        let t0 = Instant::now();
        r.failed(t0, POLICY);
        r.rerouted();
        assert!(
            r.wait_until(t0).is_some(),
            "a plain failure waits out its backoff"
        );
        let mut r = Retry::new(POLICY);
        r.lost_route();
        r.failed(t0, POLICY);
        r.rerouted();
        assert_eq!(
            r.wait_until(t0),
            None,
            "a routing failure ends with the new map"
        );
        let at = r.unrouted(t0, POLICY);
        assert_eq!(
            at - t0,
            Duration::from_millis(200),
            "the backoff kept doubling"
        );
        assert_eq!(r.failures, 1, "an uncovered slot is no failed attempt");
    }

    #[test]
    fn a_failed_map_fetch_backs_off_and_a_new_map_clears_the_suspects() {
        let mut r = Routing::new(POLICY);
        let t0 = Instant::now();
        assert!(r.fetch_due(t0), "no map yet");
        let Fetched::Failed { retry_in, .. } = r.fetched(Err(refused()), t0, POLICY) else {
            panic!("a failed fetch");
        };
        assert_eq!(retry_in, POLICY.initial);
        assert!(!r.fetch_due(t0), "backing off");
        let t1 = t0 + POLICY.initial;
        assert!(r.fetch_due(t1));
        let Fetched::Failed { retry_in, .. } = r.fetched(Err(refused()), t1, POLICY) else {
            panic!("a failed fetch");
        };
        assert_eq!(retry_in, Duration::from_millis(200), "doubled");
        let t2 = t1 + retry_in;
        assert!(r.fetch_due(t2));
        assert!(matches!(
            r.fetched(Ok(SlotMap::default()), t2, POLICY),
            Fetched::Changed
        ));
        assert!(!r.fetch_due(t2), "fresh");
        r.lost(&node(7000));
        assert!(!r.usable(&node(7000)) && r.usable(&node(7001)));
        assert!(r.fetch_due(t2), "a routing error makes the map stale");
        assert!(matches!(
            r.fetched(Ok(SlotMap::default()), t2, POLICY),
            Fetched::Same
        ));
        assert!(r.usable(&node(7000)), "a new map clears the suspects");
        assert_eq!(r.fetch_backoff, POLICY.initial, "and the fetch backoff");
    }

    #[test]
    fn the_batching_window_opens_with_the_first_job_and_closes_at_dispatch() {
        let mut i = Intake::default();
        i.took(3);
        let start = i.window_start;
        i.took(2);
        assert_eq!((i.held_jobs, i.fresh_fixes), (2, 5));
        assert_eq!(i.window_start, start, "the oldest job starts the window");
        i.dispatched();
        assert_eq!((i.held_jobs, i.fresh_fixes, i.window_start), (2, 0, None));
        assert_eq!((i.next_seq(), i.next_seq()), (1, 2));
    }
}
