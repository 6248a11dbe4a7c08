//! Purges reach Redis' own files (DESIGN §7, issue 17 item 3). A purge removes fixes from
//! memory, but the AOF keeps the writes that made them until its next rewrite, and the
//! last RDB snapshot keeps them until the next one. So a completed purge marks the
//! primaries' files dirty (`dirty_ms` in [`PURGE_DISK_KEY`]). At most every
//! `purge.disk_rewrite_interval_s`, one gateway (lease) rewrites them: `BGREWRITEAOF`
//! where the AOF is on, `BGSAVE` where snapshots are configured, on every primary, and it
//! waits until each has finished. The rewrite's start and end go into the same hash. A
//! purge completed before a rewrite started is gone from the files when that rewrite
//! ends: its receipt says so (`disk_rewritten_at`).
//!
//! Replicas keep files of their own: each primary's connected replicas (`INFO
//! replication`) are reached directly, with the same credentials and TLS settings as the
//! primaries, and rewritten the same way. One that cannot be reached fails the attempt
//! (retried; the receipts wait).

use std::time::Duration;

use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use crate::config::RedisConfig;
use crate::metrics as m;
use crate::redis_conn::{RedisConn, ScanTarget};
use crate::store::keys::{PURGE_DISK_KEY, PURGE_DISK_LEASE_KEY};

/// Hash fields of [`PURGE_DISK_KEY`].
pub const F_DIRTY: &str = "dirty_ms";
pub const F_STARTED: &str = "started_ms";
pub const F_DONE: &str = "done_ms";

/// When the rewrite that covers a purge completed at `completed_ms` ended, if one has:
/// from the fields of [`PURGE_DISK_KEY`].
pub fn rewritten_at(
    completed_ms: i64,
    started_ms: Option<i64>,
    done_ms: Option<i64>,
) -> Option<i64> {
    match (started_ms, done_ms) {
        (Some(s), Some(d)) if completed_ms <= s && d >= s => Some(d),
        _ => None,
    }
}

/// One Redis server whose files are rewritten: a primary (through the gateway's
/// connection) or a replica (a connection of its own).
enum Node<'a> {
    Primary(&'a RedisConn, &'a ScanTarget),
    Replica(redis::aio::MultiplexedConnection),
}

impl Node<'_> {
    async fn query(&self, cmd: redis::Cmd) -> redis::RedisResult<redis::Value> {
        match self {
            Node::Primary(conn, target) => conn.query_on(target, cmd).await,
            Node::Replica(c) => {
                let mut c = c.clone();
                cmd.query_async(&mut c).await
            }
        }
    }

    /// `INFO <section>` as (field, value) pairs.
    async fn info(&self, section: &str) -> redis::RedisResult<Vec<(String, String)>> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg(section);
        let text: String = redis::from_redis_value(self.query(cmd).await?)?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect())
    }

    /// What persistence the server has, from `CONFIG GET` (both assumed on when `CONFIG`
    /// is disabled: rewriting a file that does not exist only writes the data left).
    async fn persistence(&self) -> (bool, bool) {
        let get = |name: &'static str| {
            let mut cmd = redis::cmd("CONFIG");
            cmd.arg("GET").arg(name);
            async move {
                let v = self.query(cmd).await.ok()?;
                let pair: Vec<String> = redis::from_redis_value(v).ok()?;
                pair.get(1).cloned()
            }
        };
        let aof = get("appendonly").await.is_none_or(|v| v == "yes");
        let rdb = get("save").await.is_none_or(|v| !v.trim().is_empty());
        (aof, rdb)
    }
}

/// The replicas connected to a primary (`INFO replication`: `slaveN:ip=…,port=…`).
async fn replicas_of(node: &Node<'_>) -> redis::RedisResult<Vec<(String, u16)>> {
    Ok(node
        .info("replication")
        .await?
        .into_iter()
        .filter(|(k, _)| {
            k.strip_prefix("slave")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|(_, v)| {
            let get = |name: &str| {
                v.split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            };
            Some((get("ip")?, get("port")?.parse().ok()?))
        })
        .collect())
}

/// A connection to the replica at `host:port`, with the credentials and TLS settings the
/// gateway uses for the primaries.
async fn connect_replica(
    config: &RedisConfig,
    host: &str,
    port: u16,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let mut one = config.clone();
    let base = match config.mode {
        crate::config::RedisMode::Standalone => config.url.clone(),
        crate::config::RedisMode::Cluster => {
            config.cluster_nodes.first().cloned().unwrap_or_default()
        }
    };
    one.url = with_address(&base, host, port);
    one.mode = crate::config::RedisMode::Standalone;
    let client = crate::redis_conn::client(&one)?;
    client.get_multiplexed_async_connection().await
}

/// `url` (`redis[s]://[user:pass@]host:port[/db][?…]`) with another host and port.
pub fn with_address(url: &str, host: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((a, r)) => (format!("{a}@"), r),
        None => (String::new(), rest),
    };
    let tail = rest.find(['/', '?']).map_or("", |i| &rest[i..]);
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    format!("{scheme}://{auth}{host}:{port}{tail}")
}

/// Rewrite one server's files and wait (at most `wait`) until it has.
async fn rewrite_one(node: &Node<'_>, wait: Duration) -> Result<(), String> {
    let (aof, rdb) = node.persistence().await;
    if aof {
        let r = node.query(redis::cmd("BGREWRITEAOF")).await;
        // One already running started before this purge finished: schedule another.
        if let Err(e) = r {
            if !e.to_string().contains("already in progress") {
                return Err(format!("BGREWRITEAOF: {e}"));
            }
            let mut again = redis::cmd("BGREWRITEAOF");
            again.arg("SCHEDULE");
            let _ = node.query(again).await;
        }
    }
    if rdb {
        let mut cmd = redis::cmd("BGSAVE");
        cmd.arg("SCHEDULE");
        node.query(cmd).await.map_err(|e| format!("BGSAVE: {e}"))?;
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let i = node.info("persistence").await.map_err(|e| e.to_string())?;
        let get = |k: &str| i.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let busy = [
            "aof_rewrite_in_progress",
            "aof_rewrite_scheduled",
            "rdb_bgsave_in_progress",
        ]
        .iter()
        .any(|k| get(k) == Some("1"));
        if !busy {
            for k in ["aof_last_bgrewrite_status", "rdb_last_bgsave_status"] {
                if get(k).is_some_and(|v| v != "ok") {
                    return Err(format!("{k}: {}", get(k).unwrap_or_default()));
                }
            }
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err("rewrite still running".into());
        }
    }
}

/// Rewrite every primary's files if a purge completed since the last rewrite started and
/// the last one ended more than `interval` ago. Returns the end time (ms) of a rewrite
/// done now.
pub async fn rewrite_if_due(
    conn: &RedisConn,
    config: &RedisConfig,
    interval: Duration,
    wait: Duration,
) -> redis::RedisResult<Option<i64>> {
    let mut c = conn.clone();
    let (dirty, done): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
        .arg(PURGE_DISK_KEY)
        .arg(F_DIRTY)
        .arg(F_DONE)
        .query_async(&mut c)
        .await?;
    let now = jiff::Timestamp::now().as_millisecond();
    let interval_ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
    if dirty.is_none() || done.is_some_and(|d| now - d < interval_ms) {
        return Ok(None);
    }
    // Purges completing from here on need the next rewrite: they mark it dirty again.
    let _: () = redis::pipe()
        .atomic()
        .hdel(PURGE_DISK_KEY, F_DIRTY)
        .ignore()
        .hset(PURGE_DISK_KEY, F_STARTED, now)
        .ignore()
        .query_async(&mut c)
        .await?;
    let mut failed = Vec::new();
    for target in conn.scan_targets().await? {
        let primary = Node::Primary(conn, &target);
        if let Err(e) = rewrite_one(&primary, wait).await {
            failed.push(format!("primary {target}: {e}"));
        }
        let replicas = match replicas_of(&primary).await {
            Ok(r) => r,
            Err(e) => {
                failed.push(format!("replicas of {target}: {e}"));
                continue;
            }
        };
        for (host, port) in replicas {
            let done = match connect_replica(config, &host, port).await {
                Ok(c) => rewrite_one(&Node::Replica(c), wait).await,
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = done {
                failed.push(format!("replica {host}:{port}: {e}"));
            }
        }
    }
    if !failed.is_empty() {
        // Still dirty: the next tick tries again (the receipts wait).
        let _: () = c.hset(PURGE_DISK_KEY, F_DIRTY, now).await?;
        metrics::counter!(m::DISK_REWRITES, "outcome" => "failed").increment(1);
        tracing::warn!(errors = %failed.join("; "), "rewriting Redis' files after purges failed; retrying");
        return Ok(None);
    }
    let end = jiff::Timestamp::now().as_millisecond();
    let _: () = c.hset(PURGE_DISK_KEY, F_DONE, end).await?;
    metrics::counter!(m::DISK_REWRITES, "outcome" => "done").increment(1);
    tracing::info!(took_ms = end - now, "Redis' files rewritten after purges");
    Ok(Some(end))
}

/// Check every `tick` until `stop`, when this gateway (`instance`) holds the lease.
pub async fn run(
    conn: RedisConn,
    config: RedisConfig,
    interval: Duration,
    wait: Duration,
    tick: Duration,
    instance: String,
    stop: CancellationToken,
) {
    let instance = instance.as_str();
    let config = &config;
    crate::periodic::every(tick, stop, || {
        let mut conn = conn.clone();
        async move {
            let lease = crate::retention::Lease {
                key: PURGE_DISK_LEASE_KEY,
                skipped: m::DISK_REWRITES_SKIPPED,
                job: "disk rewrite",
            };
            // A lease per tick, like the sweeper's: a gateway that finds the files clean
            // (or another one rewriting: `dirty_ms` is gone) does nothing.
            if !lease.take(&mut conn, instance, tick).await {
                return;
            }
            if let Err(e) = rewrite_if_due(&conn, config, interval, wait).await {
                tracing::warn!(error = %e, "disk rewrite check failed; will retry");
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_is_reached_with_the_primarys_scheme_credentials_and_database() {
        assert_eq!(
            with_address("redis://10.0.0.1:6379", "10.0.0.2", 6380),
            "redis://10.0.0.2:6380"
        );
        assert_eq!(
            with_address(
                "rediss://u:p@a.example:6379/2?protocol=resp3",
                "b.example",
                7000
            ),
            "rediss://u:p@b.example:7000/2?protocol=resp3"
        );
        assert_eq!(with_address("redis://a:1", "::1", 2), "redis://[::1]:2");
    }

    #[test]
    fn a_purge_is_on_disk_only_once_a_rewrite_that_started_after_it_ended() {
        assert_eq!(rewritten_at(100, None, None), None);
        assert_eq!(rewritten_at(100, Some(150), None), None, "running");
        assert_eq!(
            rewritten_at(100, Some(150), Some(90)),
            None,
            "the previous one's end"
        );
        assert_eq!(rewritten_at(100, Some(150), Some(200)), Some(200));
        assert_eq!(rewritten_at(100, Some(100), Some(200)), Some(200));
        assert_eq!(
            rewritten_at(160, Some(150), Some(200)),
            None,
            "completed after the start"
        );
    }
}
