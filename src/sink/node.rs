//! Sending one pipeline to one Redis node and reading back, per device call, whether it
//! was applied (and replicated, with `WAIT`) or why not.
//!
//! A node pipeline is the writer's unit of work on the wire: every device call in it went
//! to the same node, so one failing node answers for its own devices only.

use std::time::Duration;

use crate::config::RedisConfig;
use crate::metrics as m;
use crate::redis_conn::RedisConn;
use crate::store::scripts::Appended;

/// A node's address; `("", 0)` stands for the single server.
pub(super) type NodeAddr = (String, u16);

/// What became of one device's script call.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Applied, and replicated as configured.
    Applied(Appended),
    /// Not confirmed: the call or its node failed, or `WAIT` came up short.
    Failed(redis::RedisError),
}

/// Sends node pipelines; owns what it needs so that pipelines run on their own.
#[derive(Clone)]
pub(super) struct NodeSender {
    conn: RedisConn,
    wait_replicas: u32,
    wait_timeout_ms: u64,
}

impl NodeSender {
    pub(super) fn new(conn: RedisConn, config: &RedisConfig) -> Self {
        NodeSender {
            conn,
            wait_replicas: config.wait_replicas,
            wait_timeout_ms: config.wait_timeout_ms,
        }
    }

    /// One pipeline of append calls to one node (`node` is ignored on a single server),
    /// then `WAIT` if configured. Per call: applied, or why not.
    pub(super) async fn send(&self, node: &NodeAddr, mut pipe: redis::Pipeline) -> Vec<Outcome> {
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

/// A node pipeline's answer: per device, in the order sent.
#[derive(Debug)]
pub(super) struct NodeDone {
    pub(super) node: NodeAddr,
    pub(super) devices: Vec<crate::pseudonym::Pseudonym>,
    pub(super) outcomes: Vec<Outcome>,
    pub(super) elapsed: Duration,
}

/// Errors after which the cached slot map is suspect.
pub(super) fn is_routing(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(e.code(), Some("MOVED" | "ASK" | "CLUSTERDOWN" | "TRYAGAIN"))
}

/// Errors worth retrying as they are: connection trouble, timeouts, and server states
/// that pass (script cache lost, out of memory, loading, failover).
pub(super) fn is_transient(e: &redis::RedisError) -> bool {
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
