//! The Redis writer: a bounded queue per writer task, batched pipelined writes, and the
//! completion signal that lets a connection acknowledge its device.
//!
//! * **Backpressure.** Each writer owns a bounded queue (`queue_depth_jobs`). A connection
//!   awaits room before it reads its next frame, so a slow or paused Redis stops reading
//!   from sockets instead of growing memory.
//! * **Order.** A device always goes to the same writer (hash of its pseudonym), and a
//!   writer finishes one batch before it starts the next, so a device's fixes reach its
//!   stream in the order they were read.
//! * **Nothing lost.** A batch that fails is retried with capped exponential backoff until
//!   it succeeds or the process is told to give up (shutdown grace over). A job's `done`
//!   fires only after Redis confirmed it; a job that is never written is never confirmed,
//!   so the device keeps (and resends) its cached records.
//! * **Exactly once per batch.** A pipeline that timed out may still run on the server
//!   later. Each device's part of a batch is one script call tagged with the batch id; the
//!   script skips a call whose id is already recorded as the device's last batch, so a
//!   retry never duplicates fixes. The same script applies retention (trim + expiry, once
//!   per device per batch) and refuses entries received before a purge cutoff.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::RedisConfig;
use crate::metrics as m;
use crate::pseudonym::Pseudonym;
use crate::redis_conn::{RedisConn, SlotMap, key_slot};
use crate::storage::{FieldValue, StoredFix, fixes_key, meta_key, tomb_key};

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

/// The queue is gone: the gateway is shutting down.
#[derive(Debug, thiserror::Error)]
#[error("write queue closed")]
pub struct SinkClosed;

/// Handle for connections: routes jobs to writers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sink {
    queues: Arc<[mpsc::Sender<WriteJob>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Sink {
    /// Queue `job` on its device's writer, waiting while that queue is full.
    pub async fn submit(&self, job: WriteJob) -> Result<(), SinkClosed> {
        let i = (self.hasher.hash_one(&job.device) % self.queues.len() as u64) as usize;
        self.queues[i].send(job).await.map_err(|_| SinkClosed)
    }
}

/// Retention (trim, expiry) and the idempotent, purge-aware append, in one atomic step
/// per device and batch. A replay rewrites the batch id (a no-op write) so that it is
/// replicated again: a `WAIT` after a retry on a new connection then also covers the
/// first attempt's data. KEYS: fixes stream, meta hash, tombstone hash.
/// ARGV: batch id, ttl ms, trim cutoff ms, now ms, key version, then per entry:
/// received ms, fix time s (or -1), field count, field/value pairs.
///
/// Tombstone (written by purges, `crate::purge`): field `all` = cutoff ms of a complete
/// purge; fields `r:<from_s>:<to_s>` = cutoff ms of a range purge over fix times. An entry
/// received at or before a cutoff that covers it is not written: a purge is final even
/// for data that was already in flight when it ran.
const APPEND_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[2], 'lb') == ARGV[1] then
  redis.call('HSET', KEYS[2], 'lb', ARGV[1])
  return -1
end
local tomb = redis.call('HGETALL', KEYS[3])
local all = -1
local ranges = {}
for t = 1, #tomb, 2 do
  local f, v = tomb[t], tonumber(tomb[t + 1])
  if v == nil then return redis.error_reply('ERR bad tombstone value') end
  if f == 'all' then
    all = v
  else
    local a, b = string.match(f, '^r:(-?%d+):(-?%d+)$')
    if a == nil then return redis.error_reply('ERR bad tombstone field') end
    ranges[#ranges + 1] = {tonumber(a), tonumber(b), v}
  end
end
local i = 6
local written = 0
while i <= #ARGV do
  local recv = tonumber(ARGV[i])
  local fixt = tonumber(ARGV[i + 1])
  local n = tonumber(ARGV[i + 2])
  local keep = recv > all
  if keep then
    for _, r in ipairs(ranges) do
      if recv <= r[3] and fixt >= r[1] and fixt <= r[2] then keep = false break end
    end
  end
  if keep then
    redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 3, i + 2 + n))
    written = written + 1
  end
  i = i + 3 + n
end
if written > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
redis.call('HSET', KEYS[2], 'lb', ARGV[1], 'ls', ARGV[4], 'kv', ARGV[5], 'tt', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return written
"#;

/// The append script (see [`APPEND_SCRIPT`]).
pub fn append_script() -> redis::Script {
    redis::Script::new(APPEND_SCRIPT)
}

/// Writer tasks and their queues.
#[derive(Debug)]
pub struct Writers {
    pub sink: Sink,
    pub tasks: Vec<JoinHandle<()>>,
}

/// Start `config.writers` writer tasks on clones of `conn`. They run until every [`Sink`]
/// clone is dropped and their queues are drained, or until `abort` fires (then unwritten
/// jobs are dropped unconfirmed).
///
/// A batch goes out as one pipeline per Redis node: on a single server one pipeline; on a
/// cluster the devices are grouped by the primary serving their slot (from a cached slot
/// map) and each group is one pipeline to that node, the groups concurrently. (redis-rs
/// refuses a pipeline whose keys span slots when it routes by itself, so the writer routes
/// by address.) A node that answers `MOVED`/`ASK`, or cannot be reached (failover),
/// makes the writer fetch the slot map again and retry the affected devices; the append
/// script makes retries idempotent. With `wait_replicas > 0` each node pipeline ends in
/// `WAIT`, on the connection that carried the writes, and a device is confirmed only if
/// its node's `WAIT` saw enough replicas.
pub fn start(conn: RedisConn, config: &RedisConfig, abort: CancellationToken) -> Writers {
    let script = Arc::new(append_script());
    let batch_seq = Arc::new(AtomicU64::new(0));
    let instance: u32 = rand::random();
    let mut queues = Vec::with_capacity(config.writers);
    let mut tasks = Vec::with_capacity(config.writers);
    for id in 0..config.writers {
        let (tx, rx) = mpsc::channel(config.queue_depth_jobs);
        queues.push(tx);
        let w = Writer {
            id,
            conn: conn.clone(),
            rx,
            script: script.clone(),
            batch_max_fixes: config.batch_max_fixes,
            batch_max_delay: Duration::from_millis(config.batch_max_delay_ms),
            backoff_initial: Duration::from_millis(config.retry_backoff_initial_ms),
            backoff_max: Duration::from_millis(config.retry_backoff_max_ms),
            batch_seq: batch_seq.clone(),
            instance,
            abort: abort.clone(),
            slots: None,
            wait_replicas: config.wait_replicas,
            wait_timeout_ms: config.wait_timeout_ms,
        };
        tasks.push(tokio::spawn(w.run()));
    }
    Writers {
        sink: Sink {
            queues: queues.into(),
            hasher: std::collections::hash_map::RandomState::new(),
        },
        tasks,
    }
}

struct Writer {
    id: usize,
    conn: RedisConn,
    rx: mpsc::Receiver<WriteJob>,
    script: Arc<redis::Script>,
    batch_max_fixes: usize,
    batch_max_delay: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    batch_seq: Arc<AtomicU64>,
    instance: u32,
    abort: CancellationToken,
    /// Cluster slot map; `None` until fetched, and again after a routing error.
    slots: Option<SlotMap>,
    wait_replicas: u32,
    wait_timeout_ms: u64,
}

/// What became of one device's script call.
enum Outcome {
    /// Applied (count of fixes written; -1 for a replay), and replicated as configured.
    Applied(i64),
    /// Not confirmed: the call or its node failed, or `WAIT` came up short.
    Failed(redis::RedisError),
}

impl Writer {
    async fn run(mut self) {
        // Best effort: with the script cached the first batch needs no NOSCRIPT round.
        let mut conn = self.conn.clone();
        let load = self.script.prepare_invoke();
        let _ = tokio::time::timeout(Duration::from_secs(1), load.load_async(&mut conn)).await;
        let mut batch: Vec<WriteJob> = Vec::new();
        loop {
            let first = tokio::select! {
                job = self.rx.recv() => job,
                () = self.abort.cancelled() => None,
            };
            let Some(first) = first else { break };
            let mut fixes = first.fixes.len();
            batch.push(first);
            let deadline = tokio::time::Instant::now() + self.batch_max_delay;
            while fixes < self.batch_max_fixes {
                // Take what is already queued without waiting; wait only up to the deadline.
                let next = match self.rx.try_recv() {
                    Ok(job) => Some(job),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        tokio::time::timeout_at(deadline, self.rx.recv())
                            .await
                            .unwrap_or_default()
                    }
                };
                let Some(job) = next else { break };
                fixes += job.fixes.len();
                batch.push(job);
            }
            metrics::gauge!(m::QUEUE_DEPTH, "writer" => self.id.to_string())
                .set(self.rx.len() as f64);
            let Some(written) = self.write_with_retry(&batch).await else {
                break; // aborted: the batch stays unconfirmed
            };
            for (job, ok) in batch.drain(..).zip(written) {
                if let (true, Some(done)) = (ok, job.done) {
                    let _ = done.send(()); // the connection may have gone; that is fine
                }
            }
        }
        let left = batch.len() + self.rx.len();
        if left > 0 {
            tracing::error!(
                writer = self.id,
                jobs = left,
                "writer stopped with unwritten jobs; they were not acknowledged"
            );
            metrics::counter!(m::JOBS_UNWRITTEN).increment(left as u64);
        }
    }

    /// Write until Redis confirms every device's part of the batch; `None` if aborted
    /// first. Returns, per job, whether it was written. A device whose part keeps failing
    /// with a permanent error (wrong key type, script error) is given up after
    /// [`MAX_PERMANENT_FAILURES`] attempts, unacknowledged, so one broken key cannot stall
    /// every other device on this writer.
    async fn write_with_retry(&mut self, batch: &[WriteJob]) -> Option<Vec<bool>> {
        let seq = self.batch_seq.fetch_add(1, Ordering::Relaxed);
        let batch_id = format!("{:08x}-{seq:x}", self.instance);
        let mut groups = group_by_device(batch);
        let mut written = vec![false; batch.len()];
        let mut backoff = self.backoff_initial;
        let mut attempt = 0u32;
        loop {
            let started = Instant::now();
            let pending: Vec<&mut Group<'_>> = groups.iter_mut().filter(|g| !g.settled).collect();
            if pending.is_empty() {
                return Some(written);
            }
            let calls: Vec<(Vec<u8>, redis::Cmd)> = pending
                .iter()
                .map(|g| {
                    (
                        fixes_key(g.device).into_bytes(),
                        append_call(&self.script, batch, g, &batch_id),
                    )
                })
                .collect();
            let outcomes = self.send(calls).await;
            attempt += 1;
            metrics::histogram!(m::REDIS_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
            let mut retry_reason: Option<String> = None;
            for (g, outcome) in pending.into_iter().zip(outcomes) {
                match outcome {
                    Outcome::Applied(n) => {
                        g.settled = true;
                        for &j in &g.jobs {
                            written[j] = true;
                        }
                        // -1: a replay of a batch already applied.
                        metrics::counter!(m::FIXES_WRITTEN).increment(n.max(0) as u64);
                    }
                    Outcome::Failed(e) if is_transient(&e) => {
                        if is_routing(&e) {
                            self.slots = None;
                        }
                        retry_reason = Some(e.to_string());
                    }
                    Outcome::Failed(e) => {
                        g.permanent_failures += 1;
                        if g.permanent_failures >= MAX_PERMANENT_FAILURES {
                            g.settled = true;
                            metrics::counter!(m::JOBS_UNWRITTEN).increment(g.jobs.len() as u64);
                            tracing::error!(
                                writer = self.id,
                                device = %g.device,
                                error = %e,
                                "giving up on this device's part of a batch; not acknowledged"
                            );
                        } else {
                            retry_reason = Some(e.to_string());
                        }
                    }
                }
            }
            let Some(reason) = retry_reason else {
                continue; // all settled (or given up): the loop head returns
            };
            metrics::counter!(m::REDIS_WRITE_ERRORS).increment(1);
            tracing::warn!(
                writer = self.id,
                attempt,
                error = %reason,
                retry_in_ms = backoff.as_millis() as u64,
                "redis write failed; keeping the batch"
            );
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.abort.cancelled() => return None,
            }
            backoff = (backoff * 2).min(self.backoff_max);
            // A restarted Redis (or a promoted replica) may lack the script; loading it
            // again (on every primary) is cheap.
            let mut conn = self.conn.clone();
            let _ = self.script.prepare_invoke().load_async(&mut conn).await;
        }
    }

    /// Send the calls `(routing key, command)`, one pipeline per node, and report per call.
    async fn send(&mut self, calls: Vec<(Vec<u8>, redis::Cmd)>) -> Vec<Outcome> {
        if !self.conn.is_cluster() {
            let cmds: Vec<redis::Cmd> = calls.into_iter().map(|(_, c)| c).collect();
            return self.node_send(&(String::new(), 0), cmds).await;
        }
        if self.slots.is_none() {
            match self.conn.slot_map().await {
                Ok(map) => self.slots = Some(map),
                Err(e) => return calls.iter().map(|_| Outcome::Failed(e.clone())).collect(),
            }
        }
        let map = self.slots.clone().unwrap_or_default();
        // Group by node, keeping each call's index.
        let mut by_node: Vec<NodeBatch> = Vec::new();
        let mut unrouted: Vec<usize> = Vec::new();
        for (i, (key, cmd)) in calls.into_iter().enumerate() {
            let Some(node) = map.node(key_slot(&key)) else {
                unrouted.push(i);
                continue;
            };
            match by_node.iter_mut().find(|(n, _, _)| n == node) {
                Some((_, idx, cmds)) => {
                    idx.push(i);
                    cmds.push(cmd);
                }
                None => by_node.push((node.clone(), vec![i], vec![cmd])),
            }
        }
        let total = by_node.iter().map(|(_, idx, _)| idx.len()).sum::<usize>() + unrouted.len();
        let this = &*self;
        let sent = by_node.into_iter().map(|(node, idx, cmds)| async move {
            let outcomes = this.node_send(&node, cmds).await;
            (idx, outcomes)
        });
        let mut out: Vec<Option<Outcome>> = (0..total).map(|_| None).collect();
        for (idx, outcomes) in futures::future::join_all(sent).await {
            for (i, o) in idx.into_iter().zip(outcomes) {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(o);
                }
            }
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Outcome::Failed(redis::RedisError::from((
                        redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                        "slot not covered by the cached slot map",
                    )))
                })
            })
            .collect()
    }

    /// One pipeline to one node (`node` is ignored on a single server): the calls, then
    /// `WAIT` if configured. Per call: applied, or why not.
    async fn node_send(&self, node: &(String, u16), cmds: Vec<redis::Cmd>) -> Vec<Outcome> {
        let n = cmds.len();
        let mut pipe = redis::pipe();
        for cmd in cmds {
            pipe.add_command(cmd);
        }
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
        let results: Vec<redis::RedisResult<i64>> = replies
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

/// One node's share of a batch: its address, the calls' indices, the calls.
type NodeBatch = ((String, u16), Vec<usize>, Vec<redis::Cmd>);

/// Errors after which the cached slot map is suspect.
fn is_routing(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(e.code(), Some("MOVED" | "ASK" | "CLUSTERDOWN" | "TRYAGAIN"))
}

/// Attempts after which a device's part of a batch that fails with a permanent error
/// (not a connection problem) is given up.
pub const MAX_PERMANENT_FAILURES: u32 = 5;

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

/// One device's share of a batch.
struct Group<'a> {
    device: &'a Pseudonym,
    /// Indices into the batch, in order.
    jobs: Vec<usize>,
    settled: bool,
    permanent_failures: u32,
}

fn group_by_device(batch: &[WriteJob]) -> Vec<Group<'_>> {
    let mut index: HashMap<&Pseudonym, usize> = HashMap::new();
    let mut groups: Vec<Group<'_>> = Vec::new();
    for (j, job) in batch.iter().enumerate() {
        let g = *index.entry(&job.device).or_insert_with(|| {
            groups.push(Group {
                device: &job.device,
                jobs: Vec::new(),
                settled: false,
                permanent_failures: 0,
            });
            groups.len() - 1
        });
        groups[g].jobs.push(j);
    }
    groups
}

/// The Redis pipeline for one batch: one EVALSHA per device, in first-seen order.
/// Public for the write-path benchmark.
pub fn build_pipeline(
    script: &redis::Script,
    batch: &[WriteJob],
    batch_id: &str,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for g in group_by_device(batch) {
        pipe.add_command(append_call(script, batch, &g, batch_id));
    }
    pipe
}

fn append_call(
    script: &redis::Script,
    batch: &[WriteJob],
    group: &Group<'_>,
    batch_id: &str,
) -> redis::Cmd {
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let device = group.device;
    let ttl_ms = group
        .jobs
        .iter()
        .map(|&j| i64::try_from(batch[j].ttl.as_millis()).unwrap_or(i64::MAX))
        .max()
        .unwrap_or(0);
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash())
        .arg(3)
        .arg(fixes_key(device))
        .arg(meta_key(device))
        .arg(tomb_key(device))
        .arg(batch_id)
        .arg(ttl_ms)
        .arg(now_ms.saturating_sub(ttl_ms))
        .arg(now_ms)
        .arg(device.key_version());
    for &j in &group.jobs {
        let job = &batch[j];
        for fix in &job.fixes {
            cmd.arg(job.received_ms)
                .arg(fix.fix_time_s.unwrap_or(-1))
                .arg(fix.arg_count());
            for (name, value) in &fix.fields {
                cmd.arg(*name);
                match value {
                    FieldValue::Int(i) => cmd.arg(*i),
                    FieldValue::Text(t) => cmd.arg(t.as_str()),
                    FieldValue::Bytes(b) => cmd.arg(b.as_slice()),
                };
            }
        }
    }
    cmd
}
