//! Purges reach Redis' own files (DESIGN §7, issue 17 item 3). A purge removes fixes from
//! memory, but the AOF keeps the writes that made them until its next rewrite, and the
//! last RDB snapshot keeps them until the next one. So a completed purge marks the files
//! dirty (`dirty_ms` in [`PURGE_DISK_KEY`]) and records the rewrite epoch it saw
//! (`disk_epoch`). At most every `purge.disk_rewrite_interval_s` (failed attempts too),
//! one gateway, holding a lease for the whole run, starts epoch `E + 1` and rewrites:
//! `BGREWRITEAOF` where the AOF is on, `BGSAVE` where snapshots are configured, on every
//! primary and replica, one fresh rewrite each (one already running copied the data
//! before the purge: it is waited out), waiting until each has finished. Then it records
//! `done_epoch` and `done_ms`. A purge whose `disk_epoch` is below `done_epoch` completed
//! before that rewrite started: it is gone from the files, and its receipt says when
//! (`disk_rewritten_at`, kept in the purge's record once seen). Epochs, not clocks, order
//! the two, so gateways' clocks do not matter.
//!
//! Replicas keep files of their own: each primary's connected replicas (`INFO
//! replication`) are reached directly, with the same credentials and TLS settings as the
//! primaries, and rewritten the same way. One that cannot be reached fails the attempt
//! (retried; the receipts wait).

use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionLike;
use tokio_util::sync::CancellationToken;

use crate::config::RedisConfig;
use crate::metrics as m;
use crate::redis_conn::{RedisConn, ScanTarget};
use crate::store::keys::{PURGE_DISK_KEY, PURGE_DISK_LEASE_KEY};

/// Hash fields of [`PURGE_DISK_KEY`].
pub const F_DIRTY: &str = "dirty_ms";
pub const F_EPOCH: &str = "epoch";
pub const F_DONE_EPOCH: &str = "done_epoch";
pub const F_DONE: &str = "done_ms";
pub const F_FAILED: &str = "failed_ms";

/// Whether the files were rewritten after a purge that saw rewrite epoch `seen`: a
/// rewrite that started later (epoch above it) has ended.
pub fn covers(seen_epoch: i64, done_epoch: Option<i64>) -> bool {
    done_epoch.is_some_and(|d| d > seen_epoch)
}

/// After a purge completed: the files owe a rewrite, and the purge remembers the epoch it
/// saw (its record's `disk_epoch`).
pub async fn purge_completed<C: ConnectionLike + Send + Sync>(
    conn: &mut C,
    record_key: &str,
    now_ms: i64,
) -> redis::RedisResult<()> {
    let epoch: i64 = conn.hincr(PURGE_DISK_KEY, F_EPOCH, 0).await?;
    let _: () = conn.hset(record_key, "disk_epoch", epoch).await?;
    // Again: a rewrite that started between the completion and the read cleared it.
    let _: () = conn.hset(PURGE_DISK_KEY, F_DIRTY, now_ms).await?;
    Ok(())
}

/// When the purge whose record holds `disk_epoch` (and maybe already `disk_ms`) was gone
/// from Redis' files, if it is yet; the first answer is kept in the record.
pub async fn rewritten_at<C: ConnectionLike + Send + Sync>(
    conn: &mut C,
    record_key: &str,
    record: &std::collections::HashMap<String, String>,
) -> redis::RedisResult<Option<i64>> {
    let num = |k: &str| record.get(k).and_then(|v| v.parse::<i64>().ok());
    if let Some(ms) = num("disk_ms") {
        return Ok(Some(ms));
    }
    let Some(seen) = num("disk_epoch") else {
        return Ok(None);
    };
    let (done_epoch, done_ms): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
        .arg(PURGE_DISK_KEY)
        .arg(F_DONE_EPOCH)
        .arg(F_DONE)
        .query_async(conn)
        .await?;
    match (covers(seen, done_epoch), done_ms) {
        (true, Some(ms)) => {
            let _: () = conn.hset(record_key, "disk_ms", ms).await?;
            Ok(Some(ms))
        }
        _ => Ok(None),
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

/// Whether any of `fields` is `1` in `INFO persistence` pairs.
fn any_busy(i: &[(String, String)], fields: &[&str]) -> bool {
    fields
        .iter()
        .any(|k| i.iter().any(|(n, v)| n == k && v == "1"))
}

/// Start one background rewrite (`cmd`: `BGREWRITEAOF` or `BGSAVE`) that begins after
/// now. One already running (Redis's own, or the other kind) copied the data before the
/// purge, and Redis refuses a second meanwhile: wait for it to end and start ours (at
/// most until `deadline`).
async fn start_fresh(
    node: &Node<'_>,
    cmd: &'static str,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    loop {
        match node.query(redis::cmd(cmd)).await {
            Ok(_) => return Ok(()),
            Err(e) if e.to_string().contains("in progress") => {}
            Err(e) => return Err(format!("{cmd}: {e}")),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{cmd}: another rewrite still running"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rewrite one server's files and wait (at most `wait`) until it has.
async fn rewrite_one(node: &Node<'_>, wait: Duration) -> Result<(), String> {
    let (aof, rdb) = node.persistence().await;
    let deadline = tokio::time::Instant::now() + wait;
    // One after the other: Redis runs one background rewrite at a time.
    for (on, cmd) in [(aof, "BGREWRITEAOF"), (rdb, "BGSAVE")] {
        if !on {
            continue;
        }
        start_fresh(node, cmd, deadline).await?;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let i = node.info("persistence").await.map_err(|e| e.to_string())?;
            let busy = any_busy(
                &i,
                &[
                    "aof_rewrite_in_progress",
                    "aof_rewrite_scheduled",
                    "rdb_bgsave_in_progress",
                ],
            );
            if !busy {
                let status = if cmd == "BGSAVE" {
                    "rdb_last_bgsave_status"
                } else {
                    "aof_last_bgrewrite_status"
                };
                let get = |k: &str| i.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
                if get(status).is_some_and(|v| v != "ok") {
                    return Err(format!("{status}: {}", get(status).unwrap_or_default()));
                }
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("{cmd} still running"));
            }
        }
    }
    Ok(())
}

/// Rewrite every primary's and replica's files if a purge completed since the last
/// rewrite started and the last attempt (done or failed) was more than `interval` ago,
/// holding the lease (as `instance`) for the whole run. Returns the end time (ms) of a
/// rewrite done now.
pub async fn rewrite_if_due(
    conn: &RedisConn,
    config: &RedisConfig,
    interval: Duration,
    wait: Duration,
    instance: &str,
) -> redis::RedisResult<Option<i64>> {
    let mut c = conn.clone();
    let (dirty, done, failed): (Option<i64>, Option<i64>, Option<i64>) = redis::cmd("HMGET")
        .arg(PURGE_DISK_KEY)
        .arg(F_DIRTY)
        .arg(F_DONE)
        .arg(F_FAILED)
        .query_async(&mut c)
        .await?;
    let now = jiff::Timestamp::now().as_millisecond();
    let interval_ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
    let recent = |t: Option<i64>| t.is_some_and(|t| now - t < interval_ms);
    if dirty.is_none() || recent(done) || recent(failed) {
        return Ok(None);
    }
    // Every node may take `wait`, one after the other: the lease covers a generous run,
    // and is given back at the end.
    let hold = wait.saturating_mul(16).max(Duration::from_secs(60));
    if !crate::retention::try_lease(&mut c, PURGE_DISK_LEASE_KEY, instance, hold).await? {
        metrics::counter!(m::DISK_REWRITES_SKIPPED).increment(1);
        return Ok(None);
    }
    let outcome = rewrite_all(conn, config, wait).await;
    let _ = crate::store::scripts::lease_release(&mut c, PURGE_DISK_LEASE_KEY, instance).await;
    outcome
}

async fn rewrite_all(
    conn: &RedisConn,
    config: &RedisConfig,
    wait: Duration,
) -> redis::RedisResult<Option<i64>> {
    let mut c = conn.clone();
    let now = jiff::Timestamp::now().as_millisecond();
    // Purges completing from here on need the next rewrite: they mark it dirty again.
    let (epoch,): (i64,) = redis::pipe()
        .atomic()
        .hdel(PURGE_DISK_KEY, F_DIRTY)
        .ignore()
        .hincr(PURGE_DISK_KEY, F_EPOCH, 1)
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
        // Still dirty: tried again after the interval (the receipts wait).
        let _: () = c
            .hset_multiple(PURGE_DISK_KEY, &[(F_DIRTY, now), (F_FAILED, now)])
            .await?;
        metrics::counter!(m::DISK_REWRITES, "outcome" => "failed").increment(1);
        tracing::warn!(errors = %failed.join("; "), "rewriting Redis' files after purges failed; retrying after purge.disk_rewrite_interval_s");
        return Ok(None);
    }
    let end = jiff::Timestamp::now().as_millisecond();
    crate::store::scripts::disk_done(&mut c, epoch, end).await?;
    metrics::counter!(m::DISK_REWRITES, "outcome" => "done").increment(1);
    tracing::info!(took_ms = end - now, "Redis' files rewritten after purges");
    Ok(Some(end))
}

/// Check every `tick` until `stop` (the lease is taken only when a rewrite is due).
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
        let conn = conn.clone();
        async move {
            if let Err(e) = rewrite_if_due(&conn, config, interval, wait, instance).await {
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
    fn a_purge_is_on_disk_once_a_rewrite_of_a_later_epoch_ended() {
        assert!(!covers(0, None));
        assert!(!covers(3, Some(3)), "the rewrite it saw may have copied it");
        assert!(covers(3, Some(4)));
    }
}
