//! Gateway configuration: one TOML file, every limit a named field with its unit in the
//! name, unknown fields refused (a typo must not silently fall back to a default).
//!
//! Secrets can come from the environment instead of the file: `TRACKGATE_REDIS_URL`,
//! `TRACKGATE_REDIS_CLUSTER_NODES` (comma-separated), `TRACKGATE_REDIS_PASSWORD`,
//! `TRACKGATE_KEY_FILE`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Ninety days, the product's default retention.
pub const DEFAULT_TTL_S: u64 = 90 * 24 * 3600;

/// Upper bound for `limits.max_frame_bytes`: real frames stay under ~1.1 KB, and the
/// framer's early-resync check rescans a growing partial frame, so its cost grows with
/// the square of this cap for a hostile byte-at-a-time sender.
pub const MAX_FRAME_BYTES: usize = 16 * 1024;

/// Upper bound for TTLs (10 years): keeps millisecond arithmetic far from overflow.
pub const MAX_TTL_S: u64 = 10 * 365 * 24 * 3600;

/// Upper bound of every timeout, backoff and grace period (one day, in ms).
const MAX_LIMIT_MS: u64 = 24 * 3600 * 1000;

/// Largest batch one Redis call may be asked for (`…_chunk_entries`, scan counts).
const MAX_CHUNK_ENTRIES: u64 = 100_000;

/// Upper bound for `redis.wait_replicas` (a typo such as 10 would stall every ACK).
pub const MAX_WAIT_REPLICAS: u32 = 5;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Tracker listeners; at least one. Plain TCP unless `tls` is set.
    pub listeners: Vec<ListenerConfig>,
    pub limits: Limits,
    pub protocol: ProtocolConfig,
    pub redis: RedisConfig,
    pub retention: RetentionConfig,
    pub keys: KeysConfig,
    pub http: HttpConfig,
    pub purge: PurgeConfig,
    pub storage: StorageConfig,
    pub audit: AuditConfig,
}

/// The audit trail (`tg:audit`, hash-chained: `crate::audit`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Lines older than this are trimmed by the sweeper (archive them first with
    /// `trackgate audit export`). `0` keeps them forever.
    pub retention_s: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            retention_s: 400 * 86_400,
        }
    }
}

/// Storage layout: the live tail and the compressed history (DESIGN §5).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Fixes received longer ago than this leave the live tail (one stream entry each) and
    /// are sealed into compressed history chunks. Consumers that follow the tail see every
    /// fix for at least this long.
    pub compact_after_s: u64,
    /// How often a compaction pass runs (one gateway per pass, lease `tg:{compact}:lease`).
    /// A pass looks at every device (a round trip each) and seals those with a chunk's
    /// worth due: looking less often costs less and seals no later in practice.
    pub compact_interval_s: u64,
    /// A device's due fixes are sealed once they fill a chunk (`chunk_max_fixes`), or once
    /// the oldest was received this long ago: a chunk is then written about once instead
    /// of rewritten for every few fixes a pass brings. The live tail holds up to this
    /// long of a slow device's fixes.
    pub seal_max_wait_s: u64,
    /// Rows per history chunk at most: larger chunks cost fewer bytes per fix, smaller
    /// ones less work when a purge or the TTL rewrites a chunk.
    pub chunk_max_fixes: usize,
    /// Tail entries one device seals per pass at most (bounds one script call).
    pub compact_device_max_fixes: usize,
    /// Tail entries one pass seals at most over all devices; the rest waits for the next.
    pub compact_pass_max_fixes: u64,
    /// A fix time more than this after its receive time is not trusted for ordering and
    /// retention (a device clock far ahead would keep it past its TTL): such a fix is
    /// kept by its receive time. Its reported time is still exported unchanged. The
    /// retention sweep reads the history chunks that start up to this long after its cut
    /// (a row up to this far ahead of its receipt may expire by receive time), so a
    /// short tolerance keeps sweeps cheap.
    pub future_fix_tolerance_s: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            compact_after_s: 900,
            compact_interval_s: 300,
            seal_max_wait_s: 6 * 3600,
            chunk_max_fixes: 256,
            compact_device_max_fixes: 4096,
            compact_pass_max_fixes: 1_000_000,
            future_fix_tolerance_s: 300,
        }
    }
}

/// Most rows a history chunk may be asked to hold (the codec's own bound is larger, so
/// merging a late batch into a full chunk still fits).
pub const MAX_CHUNK_FIXES: usize = 4096;

impl StorageConfig {
    /// `future_fix_tolerance_s` as the signed seconds the row code compares with.
    pub fn future_tolerance_s(&self) -> i64 {
        i64::try_from(self.future_fix_tolerance_s).unwrap_or(i64::MAX)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let day_s = MAX_LIMIT_MS / 1000;
        for (field, v) in [
            ("storage.compact_after_s", self.compact_after_s),
            ("storage.compact_interval_s", self.compact_interval_s),
            ("storage.seal_max_wait_s", self.seal_max_wait_s),
            (
                "storage.future_fix_tolerance_s",
                self.future_fix_tolerance_s,
            ),
        ] {
            if !(1..=day_s).contains(&v) {
                return Err(invalid(field, format!("must be 1 to {day_s} (one day)")));
            }
        }
        if !(16..=MAX_CHUNK_FIXES).contains(&self.chunk_max_fixes) {
            return Err(invalid(
                "storage.chunk_max_fixes",
                format!("must be 16 to {MAX_CHUNK_FIXES}"),
            ));
        }
        if !(1..=MAX_CHUNK_ENTRIES as usize).contains(&self.compact_device_max_fixes) {
            return Err(invalid(
                "storage.compact_device_max_fixes",
                format!("must be 1 to {MAX_CHUNK_ENTRIES} (one Redis call each)"),
            ));
        }
        if self.compact_pass_max_fixes == 0 {
            return Err(invalid(
                "storage.compact_pass_max_fixes",
                "must be greater than 0",
            ));
        }
        Ok(())
    }
}

/// Purges (DESIGN §7).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PurgeConfig {
    /// How often the worker retries pending purges (and checks deadlines).
    pub worker_interval_s: u64,
    /// How far apart the clocks of the gateways may be. A purge's cutoff comes from the
    /// clock of the gateway that serves the API, a fix's receive time from the clock of
    /// the gateway that read it; the tombstone refuses in-flight fixes received up to
    /// this much after the cutoff, so a reading gateway whose clock is ahead cannot slip
    /// a fix received before the purge past it. Costs at most this long of fixes received
    /// just after a purge request.
    pub clock_skew_margin_ms: u64,
    /// A range purge's fast path examines the whole stream up to this many entries; a
    /// longer stream's fast path only examines the receive times around the range (the
    /// fixes that arrived on time) and leaves the rest to the worker (receipt `pending`).
    pub fast_full_scan_max_entries: u64,
    /// How far around the range the fast path of a long stream looks by receive time
    /// (clock skew before, delivery delay after).
    pub fast_window_margin_ms: u64,
    /// Entries one range-purge script call examines: keeps each call short (Redis is
    /// single threaded; a long script stalls every gateway's writes).
    pub range_chunk_entries: usize,
    /// A purge's audit lines are left to the gateway that journaled or completed it for
    /// this long before the worker writes the ones still owed (a line may then appear
    /// twice, never not at all).
    pub audit_grace_ms: u64,
    /// After purges complete, every primary's AOF and RDB are rewritten at most this
    /// often (`BGREWRITEAOF`, `BGSAVE`), so the purged data also leaves Redis' files; the
    /// receipt says when (`disk_rewritten_at`). Keep it well under a business day (the
    /// purge deadline). `0` never rewrites.
    pub disk_rewrite_interval_s: u64,
    /// How long one rewrite may take on a primary before the attempt counts as failed
    /// (and is tried again).
    pub disk_rewrite_wait_s: u64,
}

impl Default for PurgeConfig {
    fn default() -> Self {
        PurgeConfig {
            worker_interval_s: 60,
            clock_skew_margin_ms: 2000,
            fast_full_scan_max_entries: 20_000,
            fast_window_margin_ms: 10 * 60 * 1000,
            range_chunk_entries: 2000,
            audit_grace_ms: 60_000,
            disk_rewrite_interval_s: 3600,
            disk_rewrite_wait_s: 600,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listeners: vec![ListenerConfig {
                bind: SocketAddr::from(([0, 0, 0, 0], 5020)),
                tls: None,
            }],
            limits: Limits::default(),
            protocol: ProtocolConfig::default(),
            redis: RedisConfig::default(),
            retention: RetentionConfig::default(),
            keys: KeysConfig::default(),
            http: HttpConfig::default(),
            purge: PurgeConfig::default(),
            storage: StorageConfig::default(),
            audit: AuditConfig::default(),
        }
    }
}

/// One tracker listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to bind, e.g. `0.0.0.0:5020`. Port 0 picks a free port (tests).
    pub bind: SocketAddr,
    /// Serve TLS (1.2+) with this certificate instead of plain TCP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// PEM certificate chain and private key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// Per-connection and process limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open tracker connections across all listeners; the excess is accepted and closed
    /// at once (counted), so devices back off instead of hanging in the backlog.
    pub max_connections: usize,
    /// Time for the TLS handshake plus the first frame of a new connection.
    pub handshake_timeout_s: u64,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout_s: u64,
    /// Largest frame accepted, in bytes (at most 16 KiB).
    pub max_frame_bytes: usize,
    /// Rejected frames in a row before the connection is closed.
    pub max_consecutive_bad_frames: u32,
    /// Bytes outside any frame (junk) since the last frame before the connection is closed:
    /// a stream of noise would otherwise keep its slot and burn CPU until the idle timeout.
    pub max_junk_bytes: usize,
    /// Frames read from one connection but not yet written to Redis; reading pauses
    /// when reached.
    pub max_inflight_frames: usize,
    /// Initial read buffer of a connection; grows only while a large frame arrives.
    pub read_buffer_bytes: usize,
    /// Longest pause of the accept loop after an accept error (e.g. out of fds).
    pub accept_backoff_max_ms: u64,
    /// Time to send one reply before the connection is given up.
    pub write_timeout_s: u64,
    /// Longest wait for Redis to confirm the oldest frame of a connection whose reading
    /// is paused (`max_inflight_frames` reached), or to take a frame into a full write
    /// queue. Beyond it the connection is closed without that ACK and its slot freed: a
    /// device whose shard is down would otherwise hold a slot forever (with reading
    /// paused neither its hang-up nor the idle timeout is seen) and, by reconnecting,
    /// take another. What was already queued is still written.
    pub ack_wait_timeout_s: u64,
    /// On SIGTERM/Ctrl-C: time to finish writing and acknowledging what was received.
    pub shutdown_grace_s: u64,
    /// At shutdown a connection keeps reading (bytes the device already sent are received
    /// data, stored and confirmed) until its socket has been quiet this long…
    pub shutdown_quiet_ms: u64,
    /// …but no longer than this in all: a device that never pauses cannot hold shutdown.
    pub shutdown_read_max_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            handshake_timeout_s: 20,
            idle_timeout_s: 900,
            max_frame_bytes: trackgate_protocols::DEFAULT_MAX_FRAME_BYTES,
            max_consecutive_bad_frames: 8,
            max_junk_bytes: 65_536,
            max_inflight_frames: 16,
            read_buffer_bytes: 1024,
            accept_backoff_max_ms: 1000,
            write_timeout_s: 10,
            ack_wait_timeout_s: 60,
            shutdown_grace_s: 30,
            shutdown_quiet_ms: 50,
            shutdown_read_max_ms: 500,
        }
    }
}

/// Protocol behaviour.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolConfig {
    /// Answer CCE batches with `CCE,<n>` once written (protocol notes §5).
    pub confirm_cce: bool,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig { confirm_cce: true }
    }
}

/// How the gateway talks to Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One server (`redis.url`), optionally with replicas behind it.
    Standalone,
    /// A Redis Cluster, discovered from `redis.cluster_nodes`.
    Cluster,
}

/// Redis and the write path.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `standalone` (uses `url`) or `cluster` (uses `cluster_nodes`).
    pub mode: RedisMode,
    /// `redis://host:port/db`; env `TRACKGATE_REDIS_URL` overrides. Standalone mode.
    pub url: String,
    /// Cluster mode: seed nodes (`redis://host:port`), a few are enough: the topology is
    /// discovered from them. Env `TRACKGATE_REDIS_CLUSTER_NODES` (comma-separated)
    /// overrides.
    pub cluster_nodes: Vec<String>,
    /// Replicas that must have a write before the device gets its ACK (`WAIT`); 0 acks
    /// once the primary has it. With 1, no acknowledged fix is lost when a primary dies
    /// and its replica takes over.
    pub wait_replicas: u32,
    /// Longest `WAIT` for those replicas; a batch not replicated in time is retried (the
    /// append is idempotent), and its devices are not acknowledged meanwhile.
    pub wait_timeout_ms: u64,
    /// Env `TRACKGATE_REDIS_PASSWORD` overrides. Never logged.
    #[serde(skip_serializing)]
    pub password: Option<String>,
    /// TLS to Redis (`rediss://` URLs only): PEM file of the CA certificate(s) that signed
    /// the server's certificate, for a private CA. Absent: the system's trust store.
    pub tls_ca_path: Option<PathBuf>,
    /// TLS client certificate (PEM) for servers that require one (`tls-auth-clients yes`);
    /// set together with `tls_client_key_path`.
    pub tls_client_cert_path: Option<PathBuf>,
    /// Private key (PEM) of `tls_client_cert_path`. Never logged.
    pub tls_client_key_path: Option<PathBuf>,
    /// Writer tasks; a device always goes to the same writer, so its fixes stay in order.
    pub writers: usize,
    /// Write jobs (one decoded frame each) queued per writer; connections stop reading
    /// when their writer's queue is full.
    pub queue_depth_jobs: usize,
    /// Jobs a writer holds once taken from its queue: being written, or waiting for their
    /// device's earlier job, or for a retry after their shard failed (a Redis Cluster node
    /// that is down, or whose `WAIT` comes up short). Devices on healthy shards keep being
    /// written meanwhile; at this bound the writer stops taking jobs (backpressure for
    /// every device of that writer).
    pub held_max_jobs: usize,
    /// Cluster mode: jobs a writer holds for devices waiting on one failing node (backing
    /// off after a failed write) before it stops reading from the connections of every
    /// device on that node's slots, which leaves the other nodes' devices served (the
    /// writer-wide `held_max_jobs` would stop them all).
    pub node_held_max_jobs: usize,
    /// Fixes per Redis pipeline (per node on a cluster).
    pub batch_max_fixes: usize,
    /// Longest wait for a batch to fill before it is written anyway.
    pub batch_max_delay_ms: u64,
    /// Time for Redis to answer one pipeline before it is retried.
    pub response_timeout_ms: u64,
    /// Attempts at a device's batch that Redis refuses with a permanent error (a key of
    /// the wrong type, a script error) before it is dropped unacknowledged and counted,
    /// so one broken key cannot hold its device forever. Transient errors retry on.
    pub max_permanent_failures: u32,
    /// Time to (re)connect.
    pub connect_timeout_ms: u64,
    /// Backoff between retries of a failed pipeline: starts here, doubles, capped below.
    pub retry_backoff_initial_ms: u64,
    pub retry_backoff_max_ms: u64,
    /// Start (and keep writing) although Redis runs an evicting `maxmemory-policy`
    /// (anything but `noeviction`). A full Redis then deletes keys to make room:
    /// acknowledged fixes, purge tombstones and bookkeeping included. Off: `serve` refuses
    /// to start on such a server. For a Redis that holds nothing else and whose memory is
    /// known to suffice; logged as a warning at start and shown by the metric
    /// `trackgate_redis_evicting_policy`.
    pub allow_evicting_policy: bool,
    /// How often `maxmemory-policy` is checked again on every primary after the start
    /// check: a restarted, failed-over or reconfigured Redis may come back with another
    /// policy (the connection gives no signal when it reconnects).
    pub policy_check_interval_s: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            mode: RedisMode::Standalone,
            url: "redis://127.0.0.1:6379".into(),
            cluster_nodes: Vec::new(),
            wait_replicas: 0,
            wait_timeout_ms: 1000,
            password: None,
            tls_ca_path: None,
            tls_client_cert_path: None,
            tls_client_key_path: None,
            writers: 2,
            queue_depth_jobs: 1024,
            held_max_jobs: 16384,
            node_held_max_jobs: 4096,
            batch_max_fixes: 512,
            batch_max_delay_ms: 2,
            max_permanent_failures: 5,
            response_timeout_ms: 2000,
            connect_timeout_ms: 2000,
            retry_backoff_initial_ms: 50,
            retry_backoff_max_ms: 2000,
            allow_evicting_policy: false,
            policy_check_interval_s: 60,
        }
    }
}

/// Hard retention of location history (DESIGN §6).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Default lifetime of a fix.
    pub ttl_s: u64,
    /// The sweeper trims every stream to the TTL this often; data is physically gone by
    /// TTL + this interval.
    pub sweep_interval_s: u64,
    /// Upper bound for a customer's agreed retention (`retention_s` of the customer,
    /// set with `trackgate customer add` or the admin API).
    pub max_customer_ttl_s: u64,
    /// How often the write path trims a device's stream and pushes its expiry out (to
    /// TTL + this, so a key never expires before its newest fix's TTL). Capped at
    /// `sweep_interval_s`, which keeps "physically gone by TTL + sweep interval" true.
    /// Doing it on every write cost about a tenth of Redis's time per write.
    pub ingest_upkeep_interval_s: u64,
    /// A connected device's retention (its owner's agreement) is looked up again this
    /// often, so a new owner or a changed agreement applies to connections that stay open
    /// for weeks.
    pub owner_refresh_s: u64,
    /// Time for one retention lookup. If it fails when a device connects, the longest
    /// retention a device can have applies provisionally (nothing is dropped or trimmed on
    /// a guess) and the following frames look again, at most every
    /// `redis.retry_backoff_max_ms`, until one succeeds (its write trims to the real
    /// retention). Below `limits.ack_wait_timeout_s`.
    pub lookup_timeout_ms: u64,
    /// Stream keys asked for per SCAN call of the sweeper.
    pub sweep_scan_count: usize,
    /// Late deliveries (see `tg:{P}:late`) one sweeper script call deletes at most.
    pub sweep_late_chunk_entries: u64,
}

impl RetentionConfig {
    /// [`RetentionConfig::ingest_upkeep_interval_s`], capped at the sweep interval.
    pub fn ingest_upkeep(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.ingest_upkeep_interval_s.min(self.sweep_interval_s))
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            ttl_s: DEFAULT_TTL_S,
            sweep_interval_s: 3600,
            max_customer_ttl_s: 365 * 24 * 3600,
            ingest_upkeep_interval_s: 60,
            sweep_scan_count: 500,
            sweep_late_chunk_entries: 1000,
            owner_refresh_s: 300,
            lookup_timeout_ms: 2000,
        }
    }
}

/// Pseudonymization and data keys.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Key file written by `trackgate keys generate`; env `TRACKGATE_KEY_FILE` overrides.
    pub key_file: PathBuf,
    /// A month's data key is due for destruction (`trackgate keys prune`) once the month
    /// ended longer ago than the longest retention (`retention.ttl_s`,
    /// `retention.max_customer_ttl_s`) plus the sweep interval plus this grace; `serve`
    /// warns while it still holds one.
    pub data_key_grace_s: u64,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            key_file: PathBuf::new(),
            data_key_grace_s: 7 * 86_400,
        }
    }
}

/// Metrics and health endpoints.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serves `/metrics`, `/healthz`, `/readyz`; absent disables it.
    pub bind: Option<SocketAddr>,
    /// SHA-256 (hex) of the admin API token; env `TRACKGATE_ADMIN_TOKEN` (the token
    /// itself) overrides. Absent: the admin API is off.
    pub admin_token_sha256: Option<String>,
    /// Failed authentications per client address per minute before it gets 429.
    pub auth_failures_per_minute: u32,
    /// Client addresses the failure counter tracks at most (bounds its memory).
    pub auth_failure_tracked_ips: usize,
    /// Stream entries an export reads per Redis call (and holds in memory at once).
    pub export_chunk_entries: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            admin_token_sha256: None,
            auth_failures_per_minute: 20,
            auth_failure_tracked_ips: 65_536,
            export_chunk_entries: 1000,
        }
    }
}

/// A configuration problem, with the path of the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("`{field}`: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

impl Config {
    /// Read, apply environment overrides, validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Config::parse(&text)?;
        config.apply_env(|k| std::env::var(k).ok());
        config.validate()?;
        Ok(config)
    }

    /// Parse TOML (no env, no validation). Errors name the line and the field.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Take secrets from the environment (`get` is `std::env::var` outside tests).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(url) = get("TRACKGATE_REDIS_URL") {
            self.redis.url = url;
        }
        if let Some(nodes) = get("TRACKGATE_REDIS_CLUSTER_NODES") {
            self.redis.cluster_nodes = nodes
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(pw) = get("TRACKGATE_REDIS_PASSWORD") {
            self.redis.password = Some(pw);
        }
        if let Some(f) = get("TRACKGATE_KEY_FILE") {
            self.keys.key_file = PathBuf::from(f);
        }
        if let Some(t) = get("TRACKGATE_ADMIN_TOKEN") {
            use sha2::Digest;
            self.http.admin_token_sha256 = Some(hex::encode(sha2::Sha256::digest(t.as_bytes())));
        }
    }

    /// The `redis.tls_*` files: only with `rediss://` (a plain connection would silently
    /// ignore them), readable, and the client certificate and key together.
    fn validate_redis_tls(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        let files = [
            ("redis.tls_ca_path", &r.tls_ca_path),
            ("redis.tls_client_cert_path", &r.tls_client_cert_path),
            ("redis.tls_client_key_path", &r.tls_client_key_path),
        ];
        let Some((first, _)) = files.iter().find(|(_, p)| p.is_some()) else {
            return Ok(());
        };
        let urls: Vec<&String> = match r.mode {
            RedisMode::Standalone => vec![&r.url],
            RedisMode::Cluster => r.cluster_nodes.iter().collect(),
        };
        if urls.iter().any(|u| !u.starts_with("rediss://")) {
            return Err(invalid(
                *first,
                "is for TLS: the Redis URL(s) must then start with rediss://",
            ));
        }
        for (name, path) in files {
            if let Some(p) = path
                && !p.is_file()
            {
                return Err(invalid(
                    name,
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
        if r.tls_client_cert_path.is_some() != r.tls_client_key_path.is_some() {
            return Err(invalid(
                "redis.tls_client_key_path",
                "set together with redis.tls_client_cert_path (both or neither)",
            ));
        }
        Ok(())
    }

    /// Check what types cannot: non-zero limits, files that must exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(invalid("listeners", "at least one listener is needed"));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if let Some(tls) = &l.tls {
                for (name, p) in [("cert_path", &tls.cert_path), ("key_path", &tls.key_path)] {
                    if !p.is_file() {
                        return Err(invalid(
                            format!("listeners[{i}].tls.{name}"),
                            format!("{} is not a readable file", p.display()),
                        ));
                    }
                }
            }
        }
        let l = &self.limits;
        let r = &self.redis;
        let positive = [
            ("limits.max_connections", l.max_connections as u64),
            ("limits.handshake_timeout_s", l.handshake_timeout_s),
            ("limits.idle_timeout_s", l.idle_timeout_s),
            (
                "limits.max_consecutive_bad_frames",
                u64::from(l.max_consecutive_bad_frames),
            ),
            ("limits.max_junk_bytes", l.max_junk_bytes as u64),
            ("limits.max_inflight_frames", l.max_inflight_frames as u64),
            ("limits.read_buffer_bytes", l.read_buffer_bytes as u64),
            ("limits.write_timeout_s", l.write_timeout_s),
            ("limits.ack_wait_timeout_s", l.ack_wait_timeout_s),
            ("limits.accept_backoff_max_ms", l.accept_backoff_max_ms),
            ("limits.shutdown_read_max_ms", l.shutdown_read_max_ms),
            ("limits.shutdown_quiet_ms", l.shutdown_quiet_ms),
            ("purge.worker_interval_s", self.purge.worker_interval_s),
            (
                "purge.fast_full_scan_max_entries",
                self.purge.fast_full_scan_max_entries,
            ),
            (
                "redis.max_permanent_failures",
                u64::from(r.max_permanent_failures),
            ),
            ("redis.writers", r.writers as u64),
            ("redis.queue_depth_jobs", r.queue_depth_jobs as u64),
            ("redis.held_max_jobs", r.held_max_jobs as u64),
            ("redis.node_held_max_jobs", r.node_held_max_jobs as u64),
            ("redis.batch_max_fixes", r.batch_max_fixes as u64),
            ("redis.response_timeout_ms", r.response_timeout_ms),
            ("redis.connect_timeout_ms", r.connect_timeout_ms),
            ("redis.retry_backoff_initial_ms", r.retry_backoff_initial_ms),
            ("redis.retry_backoff_max_ms", r.retry_backoff_max_ms),
            ("redis.wait_timeout_ms", r.wait_timeout_ms),
            ("redis.policy_check_interval_s", r.policy_check_interval_s),
            ("retention.ttl_s", self.retention.ttl_s),
            (
                "retention.sweep_interval_s",
                self.retention.sweep_interval_s,
            ),
            (
                "retention.ingest_upkeep_interval_s",
                self.retention.ingest_upkeep_interval_s,
            ),
            ("retention.owner_refresh_s", self.retention.owner_refresh_s),
            (
                "retention.lookup_timeout_ms",
                self.retention.lookup_timeout_ms,
            ),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        // Deadlines are `Instant + limit`: an absurd limit would overflow (a panic in
        // every connection task), so time limits are bounded to a day.
        let times = [
            (
                "limits.handshake_timeout_s",
                l.handshake_timeout_s.saturating_mul(1000),
            ),
            (
                "limits.idle_timeout_s",
                l.idle_timeout_s.saturating_mul(1000),
            ),
            (
                "limits.write_timeout_s",
                l.write_timeout_s.saturating_mul(1000),
            ),
            (
                "limits.ack_wait_timeout_s",
                l.ack_wait_timeout_s.saturating_mul(1000),
            ),
            (
                "limits.shutdown_grace_s",
                l.shutdown_grace_s.saturating_mul(1000),
            ),
            ("limits.accept_backoff_max_ms", l.accept_backoff_max_ms),
            ("limits.shutdown_quiet_ms", l.shutdown_quiet_ms),
            ("limits.shutdown_read_max_ms", l.shutdown_read_max_ms),
            (
                "purge.fast_window_margin_ms",
                self.purge.fast_window_margin_ms,
            ),
            ("purge.audit_grace_ms", self.purge.audit_grace_ms),
            (
                "purge.worker_interval_s",
                self.purge.worker_interval_s.saturating_mul(1000),
            ),
            ("redis.response_timeout_ms", r.response_timeout_ms),
            ("redis.connect_timeout_ms", r.connect_timeout_ms),
            ("redis.retry_backoff_max_ms", r.retry_backoff_max_ms),
            ("redis.wait_timeout_ms", r.wait_timeout_ms),
            ("redis.batch_max_delay_ms", r.batch_max_delay_ms),
            (
                "redis.policy_check_interval_s",
                r.policy_check_interval_s.saturating_mul(1000),
            ),
            (
                "retention.owner_refresh_s",
                self.retention.owner_refresh_s.saturating_mul(1000),
            ),
            (
                "retention.lookup_timeout_ms",
                self.retention.lookup_timeout_ms,
            ),
        ];
        for (field, ms) in times {
            if ms > MAX_LIMIT_MS {
                return Err(invalid(field, "must be at most one day"));
            }
        }
        // Counts sent to Redis as COUNT arguments: 0 would make no progress, a huge one
        // would be refused by every call (or make one call long enough to stall every
        // gateway's writes).
        let counts = [
            (
                "retention.sweep_scan_count",
                self.retention.sweep_scan_count as u64,
            ),
            (
                "retention.sweep_late_chunk_entries",
                self.retention.sweep_late_chunk_entries,
            ),
            (
                "http.export_chunk_entries",
                self.http.export_chunk_entries as u64,
            ),
            (
                "purge.range_chunk_entries",
                self.purge.range_chunk_entries as u64,
            ),
        ];
        for (field, v) in counts {
            if !(1..=MAX_CHUNK_ENTRIES).contains(&v) {
                return Err(invalid(
                    field,
                    format!("must be 1 to {MAX_CHUNK_ENTRIES} (one Redis call each)"),
                ));
            }
        }
        self.storage.validate()?;
        if self.purge.clock_skew_margin_ms > 60_000 {
            return Err(invalid(
                "purge.clock_skew_margin_ms",
                "must be at most 60000 (clocks further apart need fixing, not a margin)",
            ));
        }
        if !(64..=MAX_FRAME_BYTES).contains(&l.max_frame_bytes) {
            return Err(invalid(
                "limits.max_frame_bytes",
                format!("must be between 64 and {MAX_FRAME_BYTES}"),
            ));
        }
        if self.retention.ttl_s > MAX_TTL_S {
            return Err(invalid(
                "retention.ttl_s",
                format!("must be at most {MAX_TTL_S} (10 years)"),
            ));
        }
        if self.retention.max_customer_ttl_s > MAX_TTL_S {
            return Err(invalid(
                "retention.max_customer_ttl_s",
                format!("must be at most {MAX_TTL_S} (10 years)"),
            ));
        }
        let redis_url = |u: &str| u.starts_with("redis://") || u.starts_with("rediss://");
        match r.mode {
            RedisMode::Standalone => {
                if !redis_url(&r.url) {
                    return Err(invalid(
                        "redis.url",
                        "must start with redis:// or rediss://",
                    ));
                }
            }
            RedisMode::Cluster => {
                if r.cluster_nodes.is_empty() {
                    return Err(invalid(
                        "redis.cluster_nodes",
                        "cluster mode needs at least one seed node (redis://host:port)",
                    ));
                }
                for (i, n) in r.cluster_nodes.iter().enumerate() {
                    if !redis_url(n) {
                        return Err(invalid(
                            format!("redis.cluster_nodes[{i}]"),
                            "must start with redis:// or rediss://",
                        ));
                    }
                }
            }
        }
        self.validate_redis_tls()?;
        if self.retention.lookup_timeout_ms >= l.ack_wait_timeout_s.saturating_mul(1000) {
            return Err(invalid(
                "retention.lookup_timeout_ms",
                "must be below limits.ack_wait_timeout_s (a device's first frame waits for it)",
            ));
        }
        if r.wait_replicas > MAX_WAIT_REPLICAS {
            return Err(invalid(
                "redis.wait_replicas",
                format!("must be at most {MAX_WAIT_REPLICAS}"),
            ));
        }
        if r.wait_replicas > 0 && r.wait_timeout_ms >= r.response_timeout_ms {
            return Err(invalid(
                "redis.wait_timeout_ms",
                "must be below redis.response_timeout_ms (a WAIT is one response)",
            ));
        }
        if let Some(h) = &self.http.admin_token_sha256 {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    "http.admin_token_sha256",
                    "must be 64 hex digits (sha256sum of the token)",
                ));
            }
        }
        if self.keys.key_file.as_os_str().is_empty() {
            return Err(invalid(
                "keys.key_file",
                "required (or env TRACKGATE_KEY_FILE); create one with `trackgate keys generate`",
            ));
        }
        Ok(())
    }

    /// How long after its month ends a data key must still be held: the longest
    /// retention, the sweep interval and `keys.data_key_grace_s`.
    pub fn data_key_keep(&self) -> Duration {
        let r = &self.retention;
        Duration::from_secs(
            r.ttl_s
                .max(r.max_customer_ttl_s)
                .saturating_add(r.sweep_interval_s)
                .saturating_add(self.keys.data_key_grace_s),
        )
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.idle_timeout_s)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.handshake_timeout_s)
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.retention.ttl_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[listeners]]
        bind = "127.0.0.1:0"

        [keys]
        key_file = "/tmp/keys.toml"
    "#;

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        c.validate().unwrap();
        assert_eq!(c.retention.ttl_s, DEFAULT_TTL_S);
        assert_eq!(c.limits.max_frame_bytes, 2048);
        assert!(c.protocol.confirm_cce);
    }

    #[test]
    fn unknown_field_is_refused_with_its_name() {
        let e = Config::parse("[limits]\nidle_timeout = 5\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("idle_timeout"), "{msg}");
    }

    #[test]
    fn zero_limit_names_the_field() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.redis.batch_max_fixes = 0;
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("redis.batch_max_fixes"), "{msg}");
    }

    /// The message `validate` refuses `c` with (empty if it passes).
    fn refusal(c: &Config) -> String {
        c.validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn a_time_limit_that_would_overflow_a_deadline_is_refused()
    -> Result<(), Box<dyn std::error::Error>> {
        let mut c = Config::parse(MINIMAL)?;
        c.limits.accept_backoff_max_ms = 0;
        assert!(refusal(&c).contains("limits.accept_backoff_max_ms"));
        let mut c = Config::parse(MINIMAL)?;
        c.limits.idle_timeout_s = u64::MAX;
        assert!(refusal(&c).contains("limits.idle_timeout_s"));
        let mut c = Config::parse(MINIMAL)?;
        c.redis.retry_backoff_max_ms = 2 * 24 * 3600 * 1000;
        assert!(refusal(&c).contains("redis.retry_backoff_max_ms"));
        Ok(())
    }

    #[test]
    fn purge_and_batch_limits_are_bounded() -> Result<(), Box<dyn std::error::Error>> {
        let mut c = Config::parse(MINIMAL)?;
        c.purge.worker_interval_s = 0; // a zero period panics tokio's interval
        assert!(refusal(&c).contains("purge.worker_interval_s"));
        let mut c = Config::parse(MINIMAL)?;
        c.purge.range_chunk_entries = usize::MAX;
        assert!(refusal(&c).contains("purge.range_chunk_entries"));
        let mut c = Config::parse(MINIMAL)?;
        c.http.export_chunk_entries = 0;
        assert!(refusal(&c).contains("http.export_chunk_entries"));
        let mut c = Config::parse(MINIMAL)?;
        c.purge.clock_skew_margin_ms = 3_600_000;
        assert!(refusal(&c).contains("purge.clock_skew_margin_ms"));
        let mut c = Config::parse(MINIMAL)?;
        c.limits.shutdown_read_max_ms = u64::MAX;
        assert!(refusal(&c).contains("limits.shutdown_read_max_ms"));
        Ok(())
    }

    #[test]
    fn redis_memory_fields_default_to_safe_and_are_bounded()
    -> Result<(), Box<dyn std::error::Error>> {
        let c = Config::parse(MINIMAL)?;
        assert!(
            !c.redis.allow_evicting_policy,
            "an evicting Redis is refused by default"
        );
        assert_eq!(c.redis.policy_check_interval_s, 60);
        let c = Config::parse(&format!(
            "{MINIMAL}\n[redis]\nallow_evicting_policy = true\npolicy_check_interval_s = 5\n"
        ))?;
        c.validate()?;
        assert!(c.redis.allow_evicting_policy);
        let mut zero = c.clone();
        zero.redis.policy_check_interval_s = 0;
        assert!(refusal(&zero).contains("redis.policy_check_interval_s"));
        let mut huge = c;
        huge.redis.policy_check_interval_s = 2 * 24 * 3600;
        assert!(refusal(&huge).contains("redis.policy_check_interval_s"));
        Ok(())
    }

    #[test]
    fn env_overrides_secrets() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.apply_env(|k| match k {
            "TRACKGATE_REDIS_PASSWORD" => Some("s3cret".into()),
            "TRACKGATE_KEY_FILE" => Some("/run/keys".into()),
            _ => None,
        });
        assert_eq!(c.redis.password.as_deref(), Some("s3cret"));
        assert_eq!(c.keys.key_file, PathBuf::from("/run/keys"));
        let shown = toml::to_string(&c).unwrap();
        assert!(!shown.contains("s3cret"), "passwords are never serialized");
    }

    #[test]
    fn cluster_mode_needs_seed_nodes_and_sane_wait() -> Result<(), Box<dyn std::error::Error>> {
        let text = format!(
            "{MINIMAL}\n[redis]\nmode = \"cluster\"\ncluster_nodes = [\"redis://10.0.0.1:7000\"]\nwait_replicas = 1\nwait_timeout_ms = 500\n"
        );
        let c = Config::parse(&text)?;
        c.validate()?;
        assert_eq!(c.redis.mode, RedisMode::Cluster);
        let refused = |c: &Config| match c.validate() {
            Ok(()) => String::new(),
            Err(e) => e.to_string(),
        };
        let mut empty = c.clone();
        empty.redis.cluster_nodes.clear();
        assert!(refused(&empty).contains("redis.cluster_nodes"));
        let mut bad = c.clone();
        bad.redis.cluster_nodes = vec!["10.0.0.1:7000".into()];
        assert!(refused(&bad).contains("redis.cluster_nodes[0]"));
        let mut slow = c;
        slow.redis.wait_timeout_ms = slow.redis.response_timeout_ms;
        assert!(refused(&slow).contains("redis.wait_timeout_ms"));
        let sentinel = Config::parse("[redis]\nmode = \"sentinel\"\n");
        assert!(matches!(sentinel, Err(e) if e.to_string().contains("mode")));
        Ok(())
    }

    #[test]
    fn missing_tls_file_points_at_the_field() {
        let text = format!(
            "{MINIMAL}\n[[listeners]]\nbind = \"127.0.0.1:0\"\ntls = {{ cert_path = \"/nonexistent.pem\", key_path = \"/nonexistent.key\" }}\n"
        );
        let msg = Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("listeners[1].tls.cert_path"), "{msg}");
    }

    #[test]
    fn redis_tls_files_need_rediss_and_come_in_pairs() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, "not checked here")?;
        let refused = |c: &Config| match c.validate() {
            Ok(()) => String::new(),
            Err(e) => e.to_string(),
        };
        let mut c = Config::parse(MINIMAL)?;
        c.redis.url = "rediss://redis.example:6380".into();
        c.redis.tls_ca_path = Some(pem.clone());
        c.validate()?;
        let mut plain = c.clone();
        plain.redis.url = "redis://redis.example:6379".into();
        assert!(
            refused(&plain).contains("redis.tls_ca_path"),
            "{}",
            refused(&plain)
        );
        let mut missing = c.clone();
        missing.redis.tls_ca_path = Some(dir.path().join("absent.pem"));
        assert!(refused(&missing).contains("is not a readable file"));
        let mut half = c.clone();
        half.redis.tls_client_cert_path = Some(pem.clone());
        assert!(refused(&half).contains("redis.tls_client_key_path"));
        let mut cluster = c;
        cluster.redis.mode = RedisMode::Cluster;
        cluster.redis.cluster_nodes = vec!["rediss://a:7000".into(), "redis://b:7000".into()];
        assert!(refused(&cluster).contains("rediss://"));
        cluster.redis.cluster_nodes[1] = "rediss://b:7000".into();
        cluster.validate()?;
        Ok(())
    }
}
