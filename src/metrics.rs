//! Metric names (DESIGN §8) and the Prometheus recorder. Labels never carry an IMEI or a
//! pseudonym: per-device series would both leak and explode cardinality.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS_OPEN: &str = "trackgate_connections_open";
pub const CONNECTIONS_ACCEPTED: &str = "trackgate_connections_accepted_total";
pub const CONNECTIONS_REJECTED: &str = "trackgate_connections_rejected_total";
pub const CONNECTIONS_CLOSED: &str = "trackgate_connections_closed_total";
pub const FRAMES: &str = "trackgate_frames_total";
pub const FRAME_ERRORS: &str = "trackgate_frame_errors_total";
pub const JUNK_BYTES: &str = "trackgate_junk_bytes_total";
pub const RECORDS_REJECTED: &str = "trackgate_records_rejected_total";
/// Decode errors by `scope` (`frame`: the whole frame refused; `record`: one record of a
/// batch skipped) and `reason` (`truncated`, `syntax`, `out_of_range`, `overrun`,
/// `non_utf8`).
pub const DECODE_ERRORS: &str = "trackgate_decode_errors_total";
pub const FIXES_RECEIVED: &str = "trackgate_fixes_received_total";
pub const FIXES_EXPIRED_AT_INGEST: &str = "trackgate_fixes_expired_at_ingest_total";
pub const FIXES_WRITTEN: &str = "trackgate_fixes_written_total";
pub const JOBS_UNWRITTEN: &str = "trackgate_jobs_unwritten_total";
pub const QUEUE_DEPTH: &str = "trackgate_write_queue_depth";
/// Jobs a writer has taken from its queue and not yet settled (in flight, or waiting for
/// a retry behind a failing shard); at `redis.held_max_jobs` the writer stops taking more.
pub const WRITER_HELD_JOBS: &str = "trackgate_writer_held_jobs";
pub const REDIS_WRITE_SECONDS: &str = "trackgate_redis_write_seconds";
pub const REDIS_WRITE_ERRORS: &str = "trackgate_redis_write_errors_total";
/// Batches whose `WAIT` saw fewer replicas than `redis.wait_replicas` (retried, not ACKed).
pub const REDIS_WAIT_SHORT: &str = "trackgate_redis_wait_short_total";
/// 1 while Redis refuses writes for want of memory (an out-of-memory episode, see
/// `crate::redis_memory`), else 0.
pub const REDIS_OOM: &str = "trackgate_redis_oom";
/// Device write attempts Redis refused with `OOM` (each is retried, nothing dropped).
pub const REDIS_OOM_REFUSED: &str = "trackgate_redis_oom_refused_total";
/// 1 while a Redis primary runs an evicting `maxmemory-policy` (allowed by
/// `redis.allow_evicting_policy`, or found after the start), else 0.
pub const REDIS_EVICTING_POLICY: &str = "trackgate_redis_evicting_policy";
pub const ACK_SECONDS: &str = "trackgate_ack_latency_seconds";
pub const ACKS_SENT: &str = "trackgate_acks_sent_total";
pub const RETENTION_TRIMMED: &str = "trackgate_retention_trimmed_total";
pub const RETENTION_SWEEPS: &str = "trackgate_retention_sweeps_total";
/// Sweep ticks skipped because another gateway holds the sweep lease.
pub const RETENTION_SWEEPS_SKIPPED: &str = "trackgate_retention_sweeps_skipped_total";
/// Failed or timed-out lookups of a device's retention (its owner's agreement); until
/// one succeeds the longest retention applies provisionally.
pub const RETENTION_LOOKUP_FAILURES: &str = "trackgate_retention_lookup_failures_total";
pub const PURGES_COMPLETED: &str = "trackgate_purges_completed_total";
pub const PURGES_OVERDUE: &str = "trackgate_purges_overdue";
pub const AUTH_RATE_LIMITED: &str = "trackgate_auth_rate_limited_total";
/// Fixes confirmed to their device but not stored, by `reason`: `purged` (a purge's
/// tombstone refused them: in flight at the purge, or taken before a complete purge's
/// cutoff and sent again from the device's cache), `resent` (already stored: a batch
/// resent after its ACK was lost).
pub const FIXES_NOT_STORED: &str = "trackgate_fixes_not_stored_total";
/// Tail entries sealed into history chunks by compaction.
pub const FIXES_SEALED: &str = "trackgate_fixes_sealed_total";
/// Fixes stored twice (a batch resent after its ACK was lost) dropped at sealing.
pub const FIXES_DEDUPLICATED: &str = "trackgate_fixes_deduplicated_total";
/// Compaction passes run (and skipped: another gateway held the lease).
pub const COMPACTIONS: &str = "trackgate_compactions_total";
pub const COMPACTIONS_SKIPPED: &str = "trackgate_compactions_skipped_total";
/// A device's seal found its tail or chunks changed meanwhile (a purge, the sweeper):
/// retried next pass.
pub const COMPACTION_CONFLICTS: &str = "trackgate_compaction_conflicts_total";
/// Stored rows that cannot be read, by `kind` and `role` (export, purge, compaction,
/// retention): tail entries (`trackgate_tail_entry_errors_total`) and history chunks.
pub const TAIL_ENTRY_ERRORS: &str = "trackgate_tail_entry_errors_total";
pub const CHUNK_ERRORS: &str = "trackgate_chunk_errors_total";
/// Connections closed because their device is blocked (`crate::collection`).
pub const CONNECTIONS_BLOCKED: &str = "trackgate_connections_blocked_total";
/// Rewrites of Redis' files after purges, by `outcome` (done, failed), and the ticks
/// skipped because another gateway held the lease.
pub const DISK_REWRITES: &str = "trackgate_disk_rewrites_total";
pub const DISK_REWRITES_SKIPPED: &str = "trackgate_disk_rewrites_skipped_total";
/// Data-key months the key file still holds past the longest retention (each should have
/// been destroyed with `trackgate keys prune`).
pub const DATA_KEYS_OVERDUE: &str = "trackgate_data_keys_overdue";
/// 1 while this gateway lacks the data key of this month or the next (it reads its key
/// file at start: run `trackgate keys months` and restart it).
pub const DATA_KEYS_MISSING: &str = "trackgate_data_keys_missing";

/// Command labels of [`FRAMES`] and [`ACKS_SENT`]: the commands we model, and `other`
/// (device-chosen strings must not mint series).
pub const TYPE_LABELS: [&str; 9] = [
    "AAA", "AFF", "CCE", "CCC", "AAC", "D00", "D03", "D82", "other",
];

/// Handles for the series touched on every frame and fix, registered once per gateway
/// (after [`install`]): looking a series up by name and labels each time was about 4 %
/// of the gateway's CPU in the profile.
#[derive(Clone)]
pub struct HotMetrics {
    pub fixes_received: metrics::Counter,
    pub ack_seconds: metrics::Histogram,
    frames_ok: Vec<metrics::Counter>,
    acks_sent: Vec<metrics::Counter>,
}

impl HotMetrics {
    pub fn new() -> Self {
        HotMetrics {
            fixes_received: metrics::counter!(FIXES_RECEIVED),
            ack_seconds: metrics::histogram!(ACK_SECONDS),
            frames_ok: TYPE_LABELS
                .iter()
                .map(|t| metrics::counter!(FRAMES, "type" => *t, "outcome" => "ok"))
                .collect(),
            acks_sent: TYPE_LABELS
                .iter()
                .map(|t| metrics::counter!(ACKS_SENT, "type" => *t))
                .collect(),
        }
    }

    /// `trackgate_frames_total{type, outcome="ok"}`; `label` is one of [`TYPE_LABELS`].
    pub fn frame_ok(&self, label: &str) -> &metrics::Counter {
        &self.frames_ok[type_index(label)]
    }

    /// `trackgate_acks_sent_total{type}`; `label` is one of [`TYPE_LABELS`].
    pub fn ack_sent(&self, label: &str) -> &metrics::Counter {
        &self.acks_sent[type_index(label)]
    }
}

impl std::fmt::Debug for HotMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HotMetrics")
    }
}

impl Default for HotMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn type_index(label: &str) -> usize {
    TYPE_LABELS
        .iter()
        .position(|t| *t == label)
        .unwrap_or(TYPE_LABELS.len() - 1)
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the process-wide Prometheus recorder (once; later calls reuse it). `None` if
/// another recorder was installed first (e.g. by an embedding program).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
            ];
            PrometheusBuilder::new()
                .set_buckets(&buckets)
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}
