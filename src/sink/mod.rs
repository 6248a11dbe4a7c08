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
//!
//! This module is the public side (`Sink`, `WriteJob`, `start`, `Upkeep`); `writer` is the
//! writer task and its state, `node` sends one pipeline to one node and reads the replies,
//! `gate` holds back the connections of a failing node's devices.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::RedisConfig;
use crate::pseudonym::Pseudonym;
use crate::redis_conn::RedisConn;
use crate::redis_memory::OomWatch;
use crate::store::StoredFix;
use crate::store::scripts::{self, AppendBatch, AppendFrame};
use gate::SlotGate;
use node::NodeSender;
use writer::Writer;

mod gate;
mod node;
mod writer;

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
        let gated = self.gates.get(i).is_some_and(|g| g.any_closed());
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

/// Writer tasks and their queues.
#[derive(Debug)]
pub struct Writers {
    pub sink: Sink,
    pub tasks: Vec<JoinHandle<()>>,
}

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
pub fn start(
    conn: RedisConn,
    config: &RedisConfig,
    upkeep: Upkeep,
    abort: CancellationToken,
    oom: Arc<OomWatch>,
) -> Writers {
    let shared = writer::Shared {
        sender: NodeSender::new(conn.clone(), config),
        conn,
        settings: writer::Settings::new(config, upkeep),
        ids: writer::BatchIds::new(),
        abort,
        oom,
    };
    let mut queues = Vec::with_capacity(config.writers);
    let mut gates = Vec::with_capacity(config.writers);
    let mut tasks = Vec::with_capacity(config.writers);
    for id in 0..config.writers {
        let (tx, rx) = mpsc::channel(config.queue_depth_jobs);
        queues.push(tx);
        let gate = Arc::new(SlotGate::new());
        gates.push(gate.clone());
        tasks.push(tokio::spawn(Writer::new(id, rx, gate, &shared).run()));
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
