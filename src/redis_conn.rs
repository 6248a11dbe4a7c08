//! One Redis connection type for every role (writers, API, purge, export, registry, sweeper,
//! admin CLI), over either a single server or a Redis Cluster (`redis.mode`).
//!
//! * **Standalone**: a [`ConnectionManager`] (one multiplexed connection that reconnects
//!   by itself).
//! * **Cluster**: redis-rs's async [`ClusterConnection`]: one multiplexed connection per
//!   node, commands routed by the slot of their first key, `MOVED`/`ASK` followed and the
//!   slot map refreshed on failover. It is created on first use, so the gateway starts
//!   (and `/readyz` says "not ready") while the cluster is unreachable, like standalone.
//!
//! What the callers must respect in cluster mode (and do, see DESIGN §5 and README):
//! * a pipeline or `MULTI` is refused client-side (`CROSSSLOT`) if its keys hash to
//!   different slots, so every multi-key unit of work uses one hash tag (`{P}` per device,
//!   `{purge}` for the purge bookkeeping), and the writers group a batch by node
//!   ([`SlotMap`], [`key_slot`]) and send each group to its node by address
//!   ([`RedisConn::node_pipeline`]);
//! * `SCAN` sees one node only: [`RedisConn::scan_targets`] lists the primaries and
//!   [`RedisConn::scan_page`] routes a page to one of them;
//! * `SCRIPT LOAD` goes to every primary (redis-rs routes it so).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use tokio::sync::OnceCell;

use crate::config::{RedisConfig, RedisMode};

/// A Redis connection in either mode. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub enum RedisConn {
    Standalone(ConnectionManager),
    Cluster(LazyCluster),
}

/// `CLUSTER SLOTS`: which node serves which slots (and their replicas).
async fn cluster_slots(c: &LazyCluster) -> RedisResult<Value> {
    let mut conn = c.get().await?;
    redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await
}

impl fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisConn::Standalone(_) => f.write_str("RedisConn::Standalone"),
            RedisConn::Cluster(c) => write!(f, "RedisConn::Cluster({c:?})"),
        }
    }
}

/// A cluster connection made on first use (and again after a failed attempt).
#[derive(Clone)]
pub struct LazyCluster {
    client: Arc<ClusterClient>,
    conn: Arc<OnceCell<ClusterConnection>>,
    connect_timeout: Duration,
}

impl fmt::Debug for LazyCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyCluster")
            .field("connected", &self.conn.initialized())
            .finish_non_exhaustive()
    }
}

impl LazyCluster {
    async fn get(&self) -> RedisResult<ClusterConnection> {
        let c = self
            .conn
            .get_or_try_init(|| async {
                match tokio::time::timeout(self.connect_timeout, self.client.get_async_connection())
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no cluster node answered within connect_timeout_ms",
                    ))),
                }
            })
            .await?;
        Ok(c.clone())
    }
}

/// Where one `SCAN` (or another per-node command) runs: the server, or one cluster
/// primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanTarget {
    Server,
    Node { host: String, port: u16 },
}

impl fmt::Display for ScanTarget {
    /// `server` or `host:port`: never the URL, which may carry a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanTarget::Server => f.write_str("server"),
            ScanTarget::Node { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Connect as `config.redis.mode` says. Lazy in both modes: nothing is dialled here.
pub fn connect(config: &RedisConfig) -> RedisResult<RedisConn> {
    match config.mode {
        RedisMode::Standalone => connect_standalone(config).map(RedisConn::Standalone),
        RedisMode::Cluster => {
            let mut b = redis::cluster::ClusterClientBuilder::new(config.cluster_nodes.clone())
                .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
                .response_timeout(Duration::from_millis(config.response_timeout_ms))
                // The writers retry with their own backoff; the client's own retries
                // (for MOVED/ASK/TRYAGAIN and reconnects) stay short.
                .retries(3)
                .max_retry_wait(config.retry_backoff_max_ms);
            if let Some(pw) = &config.password {
                b = b.password(pw);
            }
            if let Some(certs) = tls_certificates(config)? {
                b = b.certs(certs);
            }
            let client = b.build()?;
            Ok(RedisConn::Cluster(LazyCluster {
                client: Arc::new(client),
                conn: Arc::new(OnceCell::new()),
                connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            }))
        }
    }
}

/// The CA and client certificate for `rediss://`, when configured (validated in
/// [`crate::config::Config::validate`]). `None`: a plain connection, or TLS trusting the
/// system's roots with no client certificate, which the URL scheme alone gives.
fn tls_certificates(config: &RedisConfig) -> RedisResult<Option<redis::TlsCertificates>> {
    let read = |p: &std::path::Path, what: &'static str| {
        std::fs::read(p).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Io, what, format!("{}: {e}", p.display())))
        })
    };
    let root_cert = match &config.tls_ca_path {
        Some(p) => Some(read(p, "cannot read redis.tls_ca_path")?),
        None => None,
    };
    let client_tls = match (&config.tls_client_cert_path, &config.tls_client_key_path) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert, "cannot read redis.tls_client_cert_path")?,
            client_key: read(key, "cannot read redis.tls_client_key_path")?,
        }),
        _ => None,
    };
    Ok(
        (root_cert.is_some() || client_tls.is_some()).then_some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }),
    )
}

/// A client for the one server at `config.url`, with the configured password and TLS
/// settings.
pub fn client(config: &RedisConfig) -> RedisResult<redis::Client> {
    use redis::IntoConnectionInfo;
    let mut info = config.url.as_str().into_connection_info()?;
    if let Some(pw) = &config.password {
        let settings = info.redis_settings().clone().set_password(pw);
        info = info.set_redis_settings(settings);
    }
    match tls_certificates(config)? {
        Some(certs) => redis::Client::build_with_tls(info, certs),
        None => redis::Client::open(info),
    }
}

fn connect_standalone(config: &RedisConfig) -> RedisResult<ConnectionManager> {
    let client = client(config)?;
    let cm = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_millis(config.response_timeout_ms)))
        .set_connection_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
        .set_max_delay(Duration::from_millis(config.retry_backoff_max_ms))
        .set_number_of_retries(2);
    ConnectionManager::new_lazy_with_config(client, cm)
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// The cluster's slot map (empty for a single server).
    pub async fn slot_map(&self) -> RedisResult<SlotMap> {
        match self {
            RedisConn::Standalone(_) => Ok(SlotMap::default()),
            RedisConn::Cluster(c) => Ok(SlotMap::from_reply(&cluster_slots(c).await?)),
        }
    }

    /// Send `pipeline` (not a transaction) to one node as it is, whatever slots its keys
    /// hash to (the node answers `MOVED` for a key it does not serve). One reply per
    /// command, errors included as values. On a single server: to that server.
    pub async fn node_pipeline(
        &self,
        node: &(String, u16),
        pipeline: redis::Pipeline,
    ) -> RedisResult<Vec<Value>> {
        let count = pipeline.len();
        match self {
            RedisConn::Cluster(c) => {
                let mut conn = c.get().await?;
                let route = SingleNodeRoutingInfo::ByAddress {
                    host: node.0.clone(),
                    port: node.1,
                };
                conn.route_pipeline(pipeline, 0, count, route).await
            }
            RedisConn::Standalone(cm) => {
                let mut cm = cm.clone();
                cm.req_packed_commands(&pipeline, 0, count).await
            }
        }
    }

    /// Where a full keyspace `SCAN` must run: the server, or every primary.
    pub async fn scan_targets(&self) -> RedisResult<Vec<ScanTarget>> {
        match self {
            RedisConn::Standalone(_) => Ok(vec![ScanTarget::Server]),
            RedisConn::Cluster(c) => {
                let slots = cluster_slots(c).await?;
                Ok(primaries_of(&slots)
                    .into_iter()
                    .map(|(host, port)| ScanTarget::Node { host, port })
                    .collect())
            }
        }
    }

    /// One `SCAN cursor MATCH pattern COUNT count TYPE kind` page on `target`.
    pub async fn scan_page(
        &self,
        target: &ScanTarget,
        cursor: u64,
        pattern: &str,
        count: usize,
        kind: &str,
    ) -> RedisResult<(u64, Vec<String>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count)
            .arg("TYPE")
            .arg(kind);
        let v = self.query_on(target, cmd).await?;
        Ok(redis::from_redis_value(v)?)
    }

    /// Run `cmd` on `target` (one of [`RedisConn::scan_targets`]): for what each primary
    /// must answer for itself, such as `SCAN` or `CONFIG GET`.
    pub async fn query_on(&self, target: &ScanTarget, cmd: Cmd) -> RedisResult<Value> {
        match (self, target) {
            (RedisConn::Cluster(c), ScanTarget::Node { host, port }) => {
                let mut conn = c.get().await?;
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                conn.route_command(cmd, routing).await
            }
            (RedisConn::Cluster(_), ScanTarget::Server) => Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "a cluster needs a node here (see scan_targets)",
            ))),
            (RedisConn::Standalone(cm), _) => {
                let mut cm = cm.clone();
                cmd.query_async(&mut cm).await
            }
        }
    }
}

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the first
/// `{` and the next `}`, if not empty) or of the whole key, modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = key.get(open + 1..)?;
            let close = rest.iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in tagged {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// Which primary serves which slots (from `CLUSTER SLOTS`), for per-node pipelines.
/// A snapshot: a stale entry shows up as `MOVED` or a connection error, and the caller
/// fetches a new one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotMap {
    /// (first slot, last slot, primary index into `nodes`), sorted.
    ranges: Vec<(u16, u16, usize)>,
    nodes: Vec<(String, u16)>,
}

impl SlotMap {
    /// The slot ranges (first, last) served by `node`.
    pub fn ranges_of<'a>(
        &'a self,
        node: &'a (String, u16),
    ) -> impl Iterator<Item = (u16, u16)> + 'a {
        let idx = self.nodes.iter().position(|n| n == node);
        self.ranges
            .iter()
            .filter(move |r| Some(r.2) == idx)
            .map(|r| (r.0, r.1))
    }

    /// The primary `(host, port)` serving `slot`, if covered.
    pub fn node(&self, slot: u16) -> Option<&(String, u16)> {
        let i = self.ranges.partition_point(|r| r.1 < slot);
        let (a, b, n) = *self.ranges.get(i)?;
        (a <= slot && slot <= b)
            .then(|| self.nodes.get(n))
            .flatten()
    }

    fn from_reply(slots: &Value) -> SlotMap {
        let mut map = SlotMap::default();
        let Value::Array(ranges) = slots else {
            return map;
        };
        for r in ranges {
            let Value::Array(parts) = r else { continue };
            let (Some(Value::Int(a)), Some(Value::Int(b))) = (parts.first(), parts.get(1)) else {
                continue;
            };
            let (Ok(a), Ok(b)) = (u16::try_from(*a), u16::try_from(*b)) else {
                continue;
            };
            let Some(node) = parts.get(2).and_then(node_addr) else {
                continue;
            };
            let n = match map.nodes.iter().position(|x| *x == node) {
                Some(n) => n,
                None => {
                    map.nodes.push(node);
                    map.nodes.len() - 1
                }
            };
            map.ranges.push((a, b, n));
        }
        map.ranges.sort_unstable();
        map
    }
}

/// `(host, port)` of a `CLUSTER SLOTS` node entry `[host, port, id, …]`.
fn node_addr(v: &Value) -> Option<(String, u16)> {
    let Value::Array(node) = v else { return None };
    let host = match node.first()? {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => return None,
    };
    match node.get(1)? {
        Value::Int(p) => u16::try_from(*p).ok().map(|p| (host, p)),
        _ => None,
    }
}

/// Distinct primaries `(host, port)` in a `CLUSTER SLOTS` reply: each entry is
/// `[start, end, [host, port, id, …], replicas…]`.
fn primaries_of(slots: &Value) -> Vec<(String, u16)> {
    SlotMap::from_reply(slots).nodes
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Standalone(cm) => cm.req_packed_command(cmd),
            RedisConn::Cluster(c) => {
                let c = c.clone();
                Box::pin(async move {
                    let mut conn = c.get().await?;
                    conn.req_packed_command(cmd).await
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Standalone(cm) => cm.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => {
                let c = c.clone();
                Box::pin(async move {
                    let mut conn = c.get().await?;
                    conn.req_packed_commands(pipeline, offset, count).await
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Standalone(cm) => cm.get_db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primaries_are_read_from_cluster_slots() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let node = |port: i64| Value::Array(vec![bulk("127.0.0.1"), Value::Int(port), bulk("id")]);
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node(7000),
                node(7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node(7001),
                node(7004),
            ]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node(7000)]),
        ]);
        assert_eq!(
            primaries_of(&reply),
            [
                ("127.0.0.1".to_string(), 7000),
                ("127.0.0.1".to_string(), 7001)
            ]
        );
        assert!(primaries_of(&Value::Nil).is_empty());
        let map = SlotMap::from_reply(&reply);
        assert_eq!(map.node(0).map(|n| n.1), Some(7000));
        assert_eq!(map.node(5461).map(|n| n.1), Some(7001));
        assert_eq!(map.node(10922).map(|n| n.1), Some(7001));
        assert_eq!(map.node(16383).map(|n| n.1), Some(7000));
        assert!(SlotMap::default().node(1).is_none());
    }

    #[test]
    fn key_slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(
            key_slot(b"foo{}{bar}"),
            key_slot(b"bar"),
            "empty tag: whole key"
        );
        let p = crate::pseudonym::Pseudonym::parse("p1_abcdefghijklmnopqrstuvwxyz");
        let p = p.expect("a valid pseudonym");
        let (fixes, tomb) = (crate::store::fixes_key(&p), crate::store::tomb_key(&p));
        assert_eq!(key_slot(fixes.as_bytes()), key_slot(tomb.as_bytes()));
    }
}
