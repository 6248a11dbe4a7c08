//! The Redis writer: a bounded queue per writer task, batched pipelined writes, and the
//! completion signal that lets a connection acknowledge its device.
//!
//! * **Backpressure.** Each writer owns a bounded queue (`queue_depth_jobs`) and holds at
//!   most `held_max_jobs` jobs taken from it. A connection awaits room before it reads its
//!   next frame, so a slow or paused Redis stops reading from sockets instead of growing
//!   memory.
//! * **Order.** A device always goes to the same writer (hash of its pseudonym), and a
//!   writer sends a device's next call only once its previous one is settled, so a
//!   device's fixes reach its stream in the order they were read.
//! * **Isolation.** A writer keeps one pipeline in flight per Redis node and retries each
//!   device on its own backoff: a cluster shard that fails (primary down, `WAIT` short of
//!   replicas) holds back its own devices only. Once a writer holds `node_held_max_jobs`
//!   for one failing node, it gates that node's slots (`SlotGate`): the connections of
//!   its devices wait before queueing more, the rest go on.
//! * **Nothing lost.** A call that fails is retried with capped exponential backoff until
//!   it succeeds or the process is told to give up (shutdown grace over). A job's `done`
//!   fires only after Redis confirmed it; a job that is never written is never confirmed,
//!   so the device keeps (and resends) its cached records.
//! * **Exactly once per batch.** A pipeline that timed out may still run on the server
//!   later. Each device's part of a batch is one script call tagged with the batch id; the
//!   script skips a call whose id is already recorded as the device's last batch, so a
//!   retry never duplicates fixes. The same script applies retention (trim + expiry, at most
//!   once per `retention.ingest_upkeep_interval_s` per device) and refuses entries
//!   received before a purge cutoff.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::RedisConfig;
use crate::metrics as m;
use crate::pseudonym::Pseudonym;
use crate::redis_conn::{RedisConn, SlotMap, key_slot};
use crate::redis_memory::{self, OomTally, OomWatch};
use crate::store::scripts::{self, AppendBatch, AppendFrame, Appended};
use crate::store::{StoredFix, fixes_key};

/// One decoded frame's worth of fixes for one device.
#[derive(Debug)]
pub struct WriteJob {
    pub device: Pseudonym,
    pub fixes: Vec<StoredFix>,
    /// When the gateway read the frame (Unix ms): purge cutoffs compare against it.
    pub received_ms: i64,
    /// The device's retention.
    pub ttl: Duration,
    /// Fired once every fix of the job is in Redis.
    pub done: Option<oneshot::Sender<()>>,
}

impl WriteJob {
    /// The job as the append script takes it.
    fn frame(&self) -> AppendFrame<'_> {
        AppendFrame {
            received_ms: self.received_ms,
            ttl: self.ttl,
            fixes: &self.fixes,
        }
    }
}

/// The queue is gone: the gateway is shutting down.
#[derive(Debug, thiserror::Error)]
#[error("write queue closed")]
pub struct SinkClosed;

/// Handle for connections: routes jobs to writers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sink {
    queues: Arc<[mpsc::Sender<WriteJob>]>,
    gates: Arc<[Arc<SlotGate>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Sink {
    /// Queue `job` on its device's writer, waiting while that queue is full, or while the
    /// writer holds too much for the failing cluster node of the device's slot.
    pub async fn submit(&self, job: WriteJob) -> Result<(), SinkClosed> {
        let i = self.writer_of(&job);
        if let Some(gate) = self.gates.get(i) {
            gate.wait_open(&job.device).await;
        }
        self.queues[i].send(job).await.map_err(|_| SinkClosed)
    }

    /// [`Sink::submit`], waiting at most `wait`. When the queue has room and no slot is
    /// gated (nearly always) the job is queued at once with no timer; only the slow path
    /// is boxed, so a connection's task does not carry a timer's state all the time.
    pub async fn submit_within(&self, job: WriteJob, wait: Duration) -> Result<(), SubmitError> {
        let i = self.writer_of(&job);
        let gated = self
            .gates
            .get(i)
            .is_some_and(|g| g.any_closed.load(Ordering::Acquire));
        let job = if gated {
            job
        } else {
            match self.queues[i].try_send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(SubmitError::Closed),
                Err(mpsc::error::TrySendError::Full(job)) => job,
            }
        };
        match Box::pin(tokio::time::timeout(wait, self.submit(job))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(SinkClosed)) => Err(SubmitError::Closed),
            Err(_) => Err(SubmitError::TimedOut),
        }
    }

    fn writer_of(&self, job: &WriteJob) -> usize {
        (self.hasher.hash_one(&job.device) % self.queues.len() as u64) as usize
    }
}

/// Why [`Sink::submit_within`] did not queue a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("write queue closed")]
    Closed,
    #[error("no room in the write queue in time")]
    TimedOut,
}

/// Cluster slots whose devices must wait before their next job is queued: the writer
/// closes the slots of a node once it holds `node_held_max_jobs` jobs for devices waiting
/// on that node. A bit per slot, so a connection checks its device with one atomic load
/// (and nothing at all while every slot is open).
#[derive(Debug)]
struct SlotGate {
    any_closed: std::sync::atomic::AtomicBool,
    closed: Vec<AtomicU64>,
    opened: tokio::sync::Notify,
}

impl SlotGate {
    fn new() -> Self {
        SlotGate {
            any_closed: std::sync::atomic::AtomicBool::new(false),
            closed: (0..16384 / 64).map(|_| AtomicU64::new(0)).collect(),
            opened: tokio::sync::Notify::new(),
        }
    }

    fn is_closed(&self, slot: u16) -> bool {
        self.closed
            .get(usize::from(slot / 64))
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (slot % 64)) != 0)
    }

    async fn wait_open(&self, device: &Pseudonym) {
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
    fn set_closed(&self, ranges: &[(u16, u16)]) {
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

/// Writer tasks and their queues.
#[derive(Debug)]
pub struct Writers {
    pub sink: Sink,
    pub tasks: Vec<JoinHandle<()>>,
}

/// Start `config.writers` writer tasks on clones of `conn`. They run until every [`Sink`]
/// clone is dropped and their jobs are written, or until `abort` fires (then unwritten
/// jobs are dropped unconfirmed).
///
/// Work goes out as one pipeline per Redis node, at most one in flight per node and
/// writer: on a single server that is one pipeline at a time; on a cluster the devices
/// are grouped by the primary serving their slot (from a cached slot map) and each node
/// gets its own pipeline, independently of the others. (redis-rs refuses a pipeline whose
/// keys span slots when it routes by itself, so the writer routes by address.) With
/// `wait_replicas > 0` each node pipeline ends in `WAIT`, on the connection that carried
/// the writes, and a device is confirmed only if its node's `WAIT` saw enough replicas.
///
/// A device whose call fails is retried with its own backoff while the writer goes on
/// with everyone else, so one failing shard (a primary down, a replica that cannot keep
/// up with `WAIT`) holds back only its own devices' ACKs. A failing device's later jobs
/// wait behind the failed one (order, and the replay rule of the append script), up to
/// `held_max_jobs` jobs held per writer. A node that answers `MOVED`/`ASK`, or cannot be
/// reached, makes the writer fetch the slot map again (in the background, routing with the
/// old map meanwhile).
/// What the append script does besides appending, from the retention settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upkeep {
    /// Trim and expiry at most this often per device
    /// ([`crate::config::RetentionConfig::ingest_upkeep`]).
    pub interval: Duration,
    /// A fix taken more than this before it was received goes into the device's late
    /// index, for the sweeper to delete by fix time (`retention.sweep_interval_s`: later
    /// than that, trimming by receive time would keep it past its fix time's retention by
    /// more than a sweep interval).
    pub late_after: Duration,
}

impl From<&crate::config::RetentionConfig> for Upkeep {
    fn from(r: &crate::config::RetentionConfig) -> Self {
        Upkeep {
            interval: r.ingest_upkeep(),
            late_after: Duration::from_secs(r.sweep_interval_s),
        }
    }
}

impl Upkeep {
    /// What an append call carries besides its frames, for batch `batch_id` at `now_ms`.
    fn batch(self, batch_id: &str, now_ms: i64) -> AppendBatch<'_> {
        AppendBatch {
            batch_id,
            now_ms,
            upkeep: self.interval,
            late_after: self.late_after,
        }
    }
}

pub fn start(
    conn: RedisConn,
    config: &RedisConfig,
    upkeep: Upkeep,
    abort: CancellationToken,
    oom: Arc<OomWatch>,
) -> Writers {
    let batch_seq = Arc::new(AtomicU64::new(0));
    let instance: u32 = rand::random();
    let sender = NodeSender {
        conn: conn.clone(),
        wait_replicas: config.wait_replicas,
        wait_timeout_ms: config.wait_timeout_ms,
    };
    let mut queues = Vec::with_capacity(config.writers);
    let mut gates = Vec::with_capacity(config.writers);
    let mut tasks = Vec::with_capacity(config.writers);
    for id in 0..config.writers {
        let (tx, rx) = mpsc::channel(config.queue_depth_jobs);
        queues.push(tx);
        let gate = Arc::new(SlotGate::new());
        gates.push(gate.clone());
        let w = Writer {
            id,
            conn: conn.clone(),
            sender: sender.clone(),
            rx,
            batch_max_fixes: config.batch_max_fixes,
            batch_max_delay: Duration::from_millis(config.batch_max_delay_ms),
            backoff_initial: Duration::from_millis(config.retry_backoff_initial_ms),
            backoff_max: Duration::from_millis(config.retry_backoff_max_ms),
            held_max_jobs: config.held_max_jobs,
            node_held_max_jobs: config.node_held_max_jobs,
            max_permanent_failures: config.max_permanent_failures,
            oom: oom.clone(),
            gate,
            closed_nodes: Vec::new(),
            closed_held: 0,
            upkeep,
            batch_seq: batch_seq.clone(),
            instance,
            abort: abort.clone(),
            slots: None,
            slots_stale: false,
            suspect: HashSet::new(),
            slot_fetch: None,
            fetch_not_before: None,
            fetch_backoff: Duration::from_millis(config.retry_backoff_initial_ms),
            script_load: None,
            queue_gauge: metrics::gauge!(m::QUEUE_DEPTH, "writer" => id.to_string()),
            held_gauge: metrics::gauge!(m::WRITER_HELD_JOBS, "writer" => id.to_string()),
            fixes_written: metrics::counter!(m::FIXES_WRITTEN),
            write_seconds: metrics::histogram!(m::REDIS_WRITE_SECONDS),
            devices: HashMap::new(),
            group_seq: 0,
            held_jobs: 0,
            fresh_fixes: 0,
            window_start: None,
            next_retry: None,
            in_flight: FuturesUnordered::new(),
            busy: HashSet::new(),
        };
        tasks.push(tokio::spawn(w.run()));
    }
    Writers {
        sink: Sink {
            queues: queues.into(),
            gates: gates.into(),
            hasher: std::collections::hash_map::RandomState::new(),
        },
        tasks,
    }
}

/// A node's address; `("", 0)` stands for the single server.
type NodeAddr = (String, u16);

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

/// What became of one device's script call.
enum Outcome {
    /// Applied, and replicated as configured.
    Applied(Appended),
    /// Not confirmed: the call or its node failed, or `WAIT` came up short.
    Failed(redis::RedisError),
}

/// A node pipeline's answer: per device, in the order sent.
struct NodeDone {
    node: NodeAddr,
    devices: Vec<Pseudonym>,
    outcomes: Vec<Outcome>,
    elapsed: Duration,
}

type InFlight = FuturesUnordered<Pin<Box<dyn Future<Output = NodeDone> + Send>>>;
type SlotFetch = Pin<Box<dyn Future<Output = redis::RedisResult<SlotMap>> + Send>>;
type ScriptLoad = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Writer {
    id: usize,
    conn: RedisConn,
    sender: NodeSender,
    rx: mpsc::Receiver<WriteJob>,
    batch_max_fixes: usize,
    batch_max_delay: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    held_max_jobs: usize,
    node_held_max_jobs: usize,
    max_permanent_failures: u32,
    /// Out-of-memory episodes, shared with the other writers and `/readyz`.
    oom: Arc<OomWatch>,
    /// This writer's slot gate (see [`SlotGate`]) and the nodes it has closed.
    gate: Arc<SlotGate>,
    closed_nodes: Vec<NodeAddr>,
    /// Jobs held for devices on the closed nodes: not counted against `held_max_jobs`
    /// (the gate bounds them), so the other nodes' devices keep being taken.
    closed_held: usize,
    /// Upkeep interval and late threshold, for the append script.
    upkeep: Upkeep,
    batch_seq: Arc<AtomicU64>,
    instance: u32,
    abort: CancellationToken,
    /// Cluster slot map; `None` until first fetched.
    slots: Option<SlotMap>,
    /// A routing error was seen: fetch the map again (still routing with the old one,
    /// except to the nodes that failed).
    slots_stale: bool,
    /// Nodes that failed with a routing error: nothing is sent to them until a new slot
    /// map has arrived (after a failover it routes elsewhere).
    suspect: HashSet<NodeAddr>,
    slot_fetch: Option<SlotFetch>,
    /// After a failed fetch: not again before this (doubling, like the write backoff).
    fetch_not_before: Option<Instant>,
    fetch_backoff: Duration,
    /// `SCRIPT LOAD` after a `NOSCRIPT`, in the background.
    script_load: Option<ScriptLoad>,
    queue_gauge: metrics::Gauge,
    held_gauge: metrics::Gauge,
    fixes_written: metrics::Counter,
    write_seconds: metrics::Histogram,
    /// Devices with work held by this writer.
    devices: HashMap<Pseudonym, DeviceQueue>,
    group_seq: u64,
    /// Jobs taken from the queue and not yet settled.
    held_jobs: usize,
    /// Fixes taken since the last dispatch (a full batch is sent without waiting).
    fresh_fixes: usize,
    /// When the oldest job not yet considered for sending arrived.
    window_start: Option<Instant>,
    /// Earliest backoff expiry among the devices waiting for a retry.
    next_retry: Option<Instant>,
    in_flight: InFlight,
    /// Nodes with a pipeline of this writer in flight.
    busy: HashSet<NodeAddr>,
}

impl Writer {
    async fn run(mut self) {
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
                job = self.rx.recv(), if take => match job {
                    Some(job) => {
                        self.take(job);
                        rx_open = self.take_queued();
                        if self.fresh_fixes >= self.batch_max_fixes || !rx_open {
                            self.dispatch();
                        }
                    }
                    None => {
                        rx_open = false;
                        self.dispatch();
                    }
                },
            }
            self.queue_gauge.set(self.rx.len() as f64);
            self.held_gauge.set(self.held_jobs as f64);
        }
        self.gate.set_closed(&[]); // nobody waits on a writer that is gone
        let left = self.held_jobs + self.rx.len();
        if left > 0 {
            tracing::error!(
                writer = self.id,
                jobs = left,
                "writer stopped with unwritten jobs; they were not acknowledged"
            );
            metrics::counter!(m::JOBS_UNWRITTEN).increment(left as u64);
        }
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
        self.held_jobs.saturating_sub(self.closed_held) < self.held_max_jobs
    }

    fn next_wake(&self) -> Option<Instant> {
        let window = self.window_start.map(|t| t + self.batch_max_delay);
        // The end of an out-of-memory episode, if it is this writer's to see.
        let oom_end = self.oom.active().then(|| self.oom.end_due()).flatten();
        [window, self.next_retry, self.fetch_not_before, oom_end]
            .into_iter()
            .flatten()
            .min()
    }

    /// Hold `job` in its device's queue: in the open (never sent) last group, or a new one.
    fn take(&mut self, job: WriteJob) {
        self.held_jobs += 1;
        self.fresh_fixes += job.fixes.len();
        if self.window_start.is_none() {
            self.window_start = Some(Instant::now());
        }
        let dq = match self.devices.get_mut(&job.device) {
            Some(dq) => dq,
            None => self.devices.entry(job.device.clone()).or_default(),
        };
        let fixes = job.fixes.len();
        match dq.groups.back_mut() {
            Some(open) if open.batch_id.is_none() && open.fixes < self.batch_max_fixes => {
                open.fixes += fixes;
                open.jobs.push(job);
            }
            _ => {
                self.group_seq += 1;
                dq.groups.push_back(Group {
                    batch_id: None,
                    jobs: vec![job],
                    fixes,
                    seq: self.group_seq,
                    not_before: None,
                    backoff: self.backoff_initial,
                    waiting_route: false,
                    failures: 0,
                    permanent_failures: 0,
                    oom_refused: false,
                });
            }
        }
    }

    /// Take what is already queued, without waiting, up to a batch; false once the queue
    /// is closed and empty.
    fn take_queued(&mut self) -> bool {
        while self.fresh_fixes < self.batch_max_fixes && self.room() {
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
        self.window_start = None;
        self.fresh_fixes = 0;
        self.next_retry = None;
        let now = Instant::now();
        let mut due: Vec<(u64, Pseudonym)> = Vec::new();
        for (p, dq) in &self.devices {
            let Some(head) = dq.groups.front() else {
                continue;
            };
            if dq.in_flight {
                continue;
            }
            match head.not_before {
                Some(t) if t > now => {
                    self.next_retry = Some(self.next_retry.map_or(t, |r| r.min(t)));
                }
                _ => due.push((head.seq, p.clone())),
            }
        }
        let cluster = self.conn.is_cluster();
        if cluster {
            self.update_gate();
        }
        let want_map = cluster && (self.slots.is_none() || self.slots_stale);
        if want_map && self.slot_fetch.is_none() && self.fetch_not_before.is_none_or(|t| t <= now) {
            let conn = self.conn.clone();
            self.slot_fetch = Some(Box::pin(async move { conn.slot_map().await }));
            self.slots_stale = false;
            self.fetch_not_before = None;
        }
        if due.is_empty() || (cluster && self.slots.is_none()) {
            return; // nothing to send, or routed once the map arrives
        }
        due.sort_unstable_by_key(|(seq, _)| *seq);
        // Per node: the devices and the fixes of their head calls.
        let mut per_node: Vec<(NodeAddr, Vec<Pseudonym>, usize)> = Vec::new();
        let mut unrouted = 0usize;
        for (_, p) in due {
            let Some(dq) = self.devices.get_mut(&p) else {
                continue;
            };
            let node = match &self.slots {
                Some(map) if cluster => {
                    let slot = *dq
                        .slot
                        .get_or_insert_with(|| key_slot(fixes_key(&p).as_bytes()));
                    match map.node(slot) {
                        Some(n) => n.clone(),
                        None => {
                            // Not covered (resharding, cluster down): ask for a new map.
                            unrouted += 1;
                            self.slots_stale = true;
                            if let Some(head) = dq.groups.front_mut() {
                                head.waiting_route = true;
                                let at = now + head.backoff;
                                head.not_before = Some(at);
                                head.backoff = (head.backoff * 2).min(self.backoff_max);
                                self.next_retry = Some(self.next_retry.map_or(at, |r| r.min(at)));
                            }
                            continue;
                        }
                    }
                }
                _ => (String::new(), 0),
            };
            if self.busy.contains(&node) || self.suspect.contains(&node) {
                continue; // sent when the node's pipeline returns, or the new map arrives
            }
            let fixes = dq.groups.front().map_or(0, |g| g.fixes);
            match per_node.iter_mut().find(|(n, _, _)| *n == node) {
                Some((_, devices, n)) => {
                    if *n + fixes <= self.batch_max_fixes {
                        devices.push(p);
                        *n += fixes;
                    } // else: full; goes with this node's next pipeline
                }
                None => per_node.push((node, vec![p], fixes)),
            }
        }
        if unrouted > 0 {
            tracing::warn!(
                writer = self.id,
                devices = unrouted,
                "slots not covered by the cached cluster map; retrying"
            );
        }
        let now_ms = jiff::Timestamp::now().as_millisecond();
        for (node, candidates, _) in per_node {
            let seq = self.batch_seq.fetch_add(1, Ordering::Relaxed);
            let fresh_id: Arc<str> = format!("{:08x}-{seq:x}", self.instance).into();
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
                let batch = self.upkeep.batch(id, now_ms);
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
    }

    /// Close the slots of every node for which this writer holds `node_held_max_jobs` jobs
    /// of waiting devices (devices whose write failed and is being retried), so their
    /// connections stop reading while the other nodes' devices go on; open them again
    /// below half that (or when the node's devices are written).
    fn update_gate(&mut self) {
        let Some(map) = &self.slots else {
            return;
        };
        let mut waiting: Vec<(NodeAddr, usize)> = Vec::new();
        for (p, dq) in &self.devices {
            if dq.groups.front().is_none_or(|h| h.failures == 0) {
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
        let budget = self.node_held_max_jobs;
        let mut closed: Vec<NodeAddr> = Vec::new();
        self.closed_held = 0;
        for (node, jobs) in waiting {
            if jobs >= budget || (self.closed_nodes.contains(&node) && jobs >= budget / 2) {
                closed.push(node);
                self.closed_held += jobs;
            }
        }
        closed.sort();
        if closed != self.closed_nodes {
            let ranges: Vec<(u16, u16)> = closed.iter().flat_map(|n| map.ranges_of(n)).collect();
            if closed.len() > self.closed_nodes.len() {
                tracing::warn!(writer = self.id, nodes = ?closed, "holding too much for a failing node: its devices wait (connections stop reading)");
            }
            self.gate.set_closed(&ranges);
            self.closed_nodes = closed;
        }
    }

    fn slots_fetched(&mut self, fetched: redis::RedisResult<SlotMap>) {
        match fetched {
            Ok(map) => {
                if self.slots.as_ref() != Some(&map) {
                    // The cluster changed (failover, resharding): devices that back off
                    // after a routing error may have a working route now.
                    for dq in self.devices.values_mut().filter(|dq| !dq.in_flight) {
                        if let Some(head) = dq.groups.front_mut().filter(|h| h.waiting_route) {
                            head.not_before = None;
                            head.waiting_route = false;
                        }
                    }
                }
                self.slots = Some(map);
                self.suspect.clear();
                self.fetch_backoff = self.backoff_initial;
            }
            Err(e) => {
                tracing::warn!(writer = self.id, error = %e, retry_in_ms = self.fetch_backoff.as_millis() as u64, "could not fetch the cluster slot map");
                metrics::counter!(m::REDIS_WRITE_ERRORS).increment(1);
                // Ask again after a backoff; devices on the suspect nodes (or all, without
                // any map yet) wait for it, everyone else goes on.
                self.slots_stale = true;
                self.fetch_not_before = Some(Instant::now() + self.fetch_backoff);
                self.fetch_backoff = (self.fetch_backoff * 2).min(self.backoff_max);
            }
        }
    }

    /// Record the outcome of a node pipeline: confirm what was applied, set the rest back
    /// for a retry after its own backoff. Refusals for want of memory are not logged here
    /// but counted into the out-of-memory episode ([`OomWatch`]), which logs its start and
    /// end once for all writers: a full Redis refuses every retry of every device.
    fn settle(&mut self, done: NodeDone) {
        self.busy.remove(&done.node);
        self.write_seconds.record(done.elapsed.as_secs_f64());
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
                Outcome::Applied(n) => {
                    if let Some(g) = dq.groups.pop_front() {
                        self.held_jobs -= g.jobs.len();
                        if g.oom_refused {
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
                    self.fixes_written.increment(n.written());
                }
                Outcome::Failed(e) => {
                    any_failed = true;
                    noscript |= e.code() == Some("NOSCRIPT");
                    let routing = is_routing(&e) && self.conn.is_cluster();
                    if routing {
                        self.slots_stale = true;
                        self.suspect.insert(done.node.clone());
                        if let Some(head) = dq.groups.front_mut() {
                            head.waiting_route = true;
                        }
                    }
                    if redis_memory::is_oom(&e) {
                        oom.refused += 1;
                        if let Some(head) = dq.groups.front_mut().filter(|h| !h.oom_refused) {
                            head.oom_refused = true;
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
        if !is_transient(e) {
            head.permanent_failures += 1;
            if head.permanent_failures >= self.max_permanent_failures {
                let (jobs, oom_refused) = dq
                    .groups
                    .pop_front()
                    .map_or((0, false), |g| (g.jobs.len(), g.oom_refused));
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
                self.held_jobs -= jobs;
                metrics::counter!(m::JOBS_UNWRITTEN).increment(jobs as u64);
                tracing::error!(
                    writer = self.id,
                    device = %p,
                    error = %e,
                    "giving up on this device's write; not acknowledged"
                );
                return false;
            }
        }
        self.back_off(p, now);
        true
    }

    /// Hold the head call of `p` back for its backoff, which then doubles.
    fn back_off(&mut self, p: &Pseudonym, now: Instant) {
        let Some(head) = self.devices.get_mut(p).and_then(|dq| dq.groups.front_mut()) else {
            return;
        };
        let at = now + head.backoff;
        head.not_before = Some(at);
        head.failures += 1;
        head.backoff = (head.backoff * 2).min(self.backoff_max);
        self.next_retry = Some(self.next_retry.map_or(at, |r| r.min(at)));
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

/// Sends node pipelines; owns what it needs so that pipelines run on their own.
#[derive(Clone)]
struct NodeSender {
    conn: RedisConn,
    wait_replicas: u32,
    wait_timeout_ms: u64,
}

impl NodeSender {
    /// One pipeline to one node (`node` is ignored on a single server): the calls, then
    /// `WAIT` if configured. Per call: applied, or why not.
    async fn send(&self, node: &NodeAddr, mut pipe: redis::Pipeline) -> Vec<Outcome> {
        let n = pipe.len();
        let wait = self.wait_replicas > 0;
        if wait {
            pipe.cmd("WAIT")
                .arg(self.wait_replicas)
                .arg(self.wait_timeout_ms);
        }
        let replies = match self.conn.node_pipeline(node, pipe).await {
            Ok(r) if r.len() == n + usize::from(wait) => r,
            Ok(r) => {
                let e = redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "pipeline answered with the wrong number of replies",
                    format!("{} for {}", r.len(), n + usize::from(wait)),
                ));
                return (0..n).map(|_| Outcome::Failed(e.clone())).collect();
            }
            Err(e) => return (0..n).map(|_| Outcome::Failed(e.clone())).collect(),
        };
        let mut replies = replies.into_iter();
        let results: Vec<redis::RedisResult<Appended>> = replies
            .by_ref()
            .take(n)
            .map(|v| {
                v.extract_error()
                    .and_then(|v| Ok(redis::from_redis_value(v)?))
            })
            .collect();
        let short = if wait {
            let acked: redis::RedisResult<i64> = replies
                .next()
                .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Client, "no WAIT reply")))
                .and_then(|v| v.extract_error())
                .and_then(|v| Ok(redis::from_redis_value(v)?));
            match acked {
                Ok(k) if k >= i64::from(self.wait_replicas) => None,
                Ok(k) => Some(redis::RedisError::from((
                    redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown),
                    "WAIT: too few replicas confirmed in time",
                    format!("{k} of {}", self.wait_replicas),
                ))),
                Err(e) => Some(e),
            }
        } else {
            None
        };
        if short.is_some() {
            metrics::counter!(m::REDIS_WAIT_SHORT).increment(1);
        }
        results
            .into_iter()
            .map(|r| match (r, &short) {
                (Ok(_), Some(e)) => Outcome::Failed(e.clone()),
                (Ok(k), None) => Outcome::Applied(k),
                (Err(e), _) => Outcome::Failed(e),
            })
            .collect()
    }
}

/// Errors after which the cached slot map is suspect.
fn is_routing(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(e.code(), Some("MOVED" | "ASK" | "CLUSTERDOWN" | "TRYAGAIN"))
}

/// Errors worth retrying as they are: connection trouble, timeouts, and server states
/// that pass (script cache lost, out of memory, loading, failover).
fn is_transient(e: &redis::RedisError) -> bool {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        return true;
    }
    matches!(
        e.code(),
        Some(
            "NOSCRIPT"
                | "OOM"
                | "BUSY"
                | "LOADING"
                | "TRYAGAIN"
                | "MASTERDOWN"
                | "READONLY"
                | "CLUSTERDOWN"
                | "MOVED"
                | "ASK"
                | "NOREPLICAS"
        )
    )
}

/// The Redis pipeline for one batch: one EVALSHA per device, in first-seen order.
/// Public for the write-path benchmark.
pub fn build_pipeline(batch: &[WriteJob], batch_id: &str, upkeep: Upkeep) -> redis::Pipeline {
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let mut order: Vec<&Pseudonym> = Vec::new();
    let mut by_device: HashMap<&Pseudonym, Vec<&WriteJob>> = HashMap::new();
    for job in batch {
        by_device
            .entry(&job.device)
            .or_insert_with(|| {
                order.push(&job.device);
                Vec::new()
            })
            .push(job);
    }
    let mut pipe = redis::Pipeline::with_capacity(order.len());
    let call = upkeep.batch(batch_id, now_ms);
    for device in order {
        let jobs = by_device.get(device).map(Vec::as_slice).unwrap_or_default();
        scripts::append(&mut pipe, device, &call, jobs.iter().map(|j| j.frame()));
    }
    pipe
}
