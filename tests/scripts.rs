//! The data model's Lua scripts (`src/store/scripts/*.lua`), each driven directly against
//! a real redis-server through its typed call.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::*;
use jiff::Timestamp;
use redis::AsyncCommands;
use trackgate::pseudonym::Pseudonym;
use trackgate::store::row::{Row, VALUES};
use trackgate::store::scripts::{
    self, AppendBatch, AppendFrame, Appended, OwnerChange, RangeStep, RangeStepDone, Swap,
    SweepStep, Swept, swap,
};
use trackgate::store::{
    StoredFix, fixes_key, hist_key, late_key, meta_key, owner_key, owner_since_key, seen_key,
    tomb_key,
};
use trackgate::store::{chunk, tail};
use trackgate_protocols::MessageKind;

fn device() -> Pseudonym {
    Pseudonym::parse("p1_abcdefghijklmnopqrstuvwxyz").unwrap()
}

async fn tail_ids(
    conn: &mut redis::aio::MultiplexedConnection,
    p: &Pseudonym,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id: String = conn
            .xadd(fixes_key(p), "*", &[("t", i.to_string())])
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

#[tokio::test]
async fn a_seal_moves_tail_entries_into_chunks_atomically() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let p = device();
    let ids = tail_ids(&mut conn, &p, 3).await;
    let _: () = conn.pexpire(fixes_key(&p), 60_000).await.unwrap();
    let _: () = conn.zadd(late_key(&p), &ids[1], 5).await.unwrap();
    let _: () = conn.sadd(seen_key(&p), &[-17i64, 42]).await.unwrap();
    let s = Swap {
        tail_ids: ids[..2].to_vec(),
        seen_digests: vec![-17],
        old_chunks: vec![],
        new_chunks: vec![(10, b"chunk-a".to_vec()), (20, b"chunk-b".to_vec())],
        prefix: None,
    };
    assert!(swap(&mut conn, &p, &s).await.unwrap());
    let left: u64 = conn.xlen(fixes_key(&p)).await.unwrap();
    assert_eq!(left, 1, "the sealed entries left the tail");
    let chunks: Vec<(Vec<u8>, i64)> = conn.zrange_withscores(hist_key(&p), 0, -1).await.unwrap();
    assert_eq!(
        chunks,
        [(b"chunk-a".to_vec(), 10), (b"chunk-b".to_vec(), 20)]
    );
    let late: u64 = conn.zcard(late_key(&p)).await.unwrap();
    assert_eq!(late, 0, "sealed entries leave the late index");
    let seen: Vec<i64> = conn.smembers(seen_key(&p)).await.unwrap();
    assert_eq!(seen, [42], "sealed entries' digests are forgotten");
    let pttl: i64 = conn.pttl(hist_key(&p)).await.unwrap();
    assert!(
        pttl > 50_000,
        "history lives as long as the tail would: {pttl}"
    );
}

#[tokio::test]
async fn a_seal_whose_inputs_changed_does_nothing() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let p = device();
    let ids = tail_ids(&mut conn, &p, 2).await;
    let _: () = conn.zadd(hist_key(&p), b"old".to_vec(), 1).await.unwrap();
    // A purge took one of the entries meanwhile.
    let _: () = conn.xdel(fixes_key(&p), &[&ids[0]]).await.unwrap();
    let s = Swap {
        tail_ids: ids.clone(),
        old_chunks: vec![b"old".to_vec()],
        new_chunks: vec![(1, b"new".to_vec())],
        ..Swap::default()
    };
    assert!(!swap(&mut conn, &p, &s).await.unwrap());
    // Another gateway replaced the chunk meanwhile.
    let s = Swap {
        tail_ids: ids[1..].to_vec(),
        old_chunks: vec![b"replaced".to_vec()],
        new_chunks: vec![(1, b"new".to_vec())],
        ..Swap::default()
    };
    assert!(!swap(&mut conn, &p, &s).await.unwrap());
    let left: u64 = conn.xlen(fixes_key(&p)).await.unwrap();
    let chunks: Vec<Vec<u8>> = conn.zrange(hist_key(&p), 0, -1).await.unwrap();
    assert_eq!(
        (left, chunks),
        (1, vec![b"old".to_vec()]),
        "nothing changed"
    );
    // Rewriting a chunk alone (a purge inside it) swaps it for its survivors.
    let s = Swap {
        old_chunks: vec![b"old".to_vec()],
        new_chunks: vec![(2, b"survivors".to_vec())],
        ..Swap::default()
    };
    assert!(swap(&mut conn, &p, &s).await.unwrap());
    let chunks: Vec<Vec<u8>> = conn.zrange(hist_key(&p), 0, -1).await.unwrap();
    assert_eq!(chunks, [b"survivors".to_vec()]);
}

/// A seal of the tail's oldest entries `ids`, in prefix mode.
fn prefix_swap(ids: &[String]) -> Swap {
    Swap {
        tail_ids: ids.to_vec(),
        new_chunks: vec![(1, format!("chunk-{}", ids.len()).into_bytes())],
        prefix: Some(tail::Info::id_after(ids.last().unwrap()).unwrap()),
        ..Swap::default()
    }
}

#[tokio::test]
async fn a_prefix_seal_trims_exactly_the_entries_read_and_nothing_after() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let p = device();
    let ids = tail_ids(&mut conn, &p, 5).await;
    let info = tail::info(&mut conn, &p).await.unwrap().unwrap();
    assert_eq!(
        (
            info.len,
            info.removed,
            info.first_id.as_deref(),
            info.last_id.as_deref()
        ),
        (5, Some(0), Some(ids[0].as_str()), Some(ids[4].as_str()))
    );
    // Written after the read: they stay.
    let later = tail_ids(&mut conn, &p, 2).await;
    let s = prefix_swap(&ids[..3]);
    assert!(swap(&mut conn, &p, &s).await.unwrap());
    let left: Vec<String> = tail::range(&mut conn, &p, "-", "+", 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(left, [&ids[3..], &later[..]].concat());
    let info = tail::info(&mut conn, &p).await.unwrap().unwrap();
    assert_eq!(
        info.removed,
        Some(3),
        "the count of removed entries only grows"
    );
    let other = Pseudonym::parse("p1_zyxwvutsrqponmlkjihgfedcba").unwrap();
    assert!(
        tail::info(&mut conn, &other).await.unwrap().is_none(),
        "no tail"
    );
}

#[tokio::test]
async fn a_prefix_seal_after_any_removal_or_a_new_stream_does_nothing() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let p = device();
    let ids = tail_ids(&mut conn, &p, 4).await;
    // A purge removed an entry in the middle of the prefix after it was read.
    let _: () = conn.xdel(fixes_key(&p), &[&ids[1]]).await.unwrap();
    let s = prefix_swap(&ids[..3]);
    assert!(!swap(&mut conn, &p, &s).await.unwrap());
    // The sweeper trimmed the first one.
    let s = prefix_swap(&ids[..3]);
    let _: () = conn.xdel(fixes_key(&p), &[&ids[0]]).await.unwrap();
    assert!(!swap(&mut conn, &p, &s).await.unwrap());
    // A complete purge deleted the stream and the device wrote a new one: its removed
    // count starts again at 0, but its first id is newer.
    let _: () = conn.del(fixes_key(&p)).await.unwrap();
    let _new = tail_ids(&mut conn, &p, 4).await;
    let s = prefix_swap(&ids[..3]);
    assert!(!swap(&mut conn, &p, &s).await.unwrap());
    let left: u64 = conn.xlen(fixes_key(&p)).await.unwrap();
    let chunks: u64 = conn.zcard(hist_key(&p)).await.unwrap();
    assert_eq!((left, chunks), (4, 0), "nothing changed");
}

/// A fix taken at `fix_s`, laid out for storage.
fn stored(fix_s: i64) -> StoredFix {
    StoredFix::from_fix(
        MessageKind::Aaa,
        &fix_at(Timestamp::from_second(fix_s).unwrap(), 0),
    )
}

const TTL: Duration = Duration::from_secs(3600);

fn batch(id: &str, now_ms: i64) -> AppendBatch<'_> {
    AppendBatch {
        batch_id: id,
        now_ms,
        upkeep: Duration::from_secs(60),
        late_after: Duration::from_secs(600),
    }
}

/// Run one append call of `frames` (received ms, fixes) for `p`.
async fn append(
    conn: &mut redis::aio::MultiplexedConnection,
    p: &Pseudonym,
    batch: &AppendBatch<'_>,
    frames: &[(i64, Vec<StoredFix>)],
) -> redis::RedisResult<Appended> {
    let mut pipe = redis::pipe();
    let frames = frames.iter().map(|(received_ms, fixes)| AppendFrame {
        received_ms: *received_ms,
        ttl: TTL,
        fixes,
    });
    scripts::append(&mut pipe, p, batch, frames);
    let mut replies: Vec<Appended> = pipe.query_async(conn).await?;
    Ok(replies.remove(0))
}

fn now_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

#[tokio::test]
async fn an_append_is_an_evalsha_that_needs_the_script_loaded() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let p = device();
    let now = now_ms();
    let frames = [(now, vec![stored(now / 1000)])];
    let e = append(&mut conn, &p, &batch("b1", now), &frames)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("NOSCRIPT"), "{e}");
    scripts::load_append(&mut conn).await.unwrap();
    let n = append(&mut conn, &p, &batch("b1", now), &frames).await;
    assert_eq!(n.unwrap().written(), 1);
}

#[tokio::test]
async fn a_replayed_batch_id_writes_nothing() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    scripts::load_append(&mut conn).await.unwrap();
    let p = device();
    let now = now_ms();
    let frames = [
        (
            now - 5,
            vec![stored(now / 1000 - 2), stored(now / 1000 - 1)],
        ),
        (now, vec![stored(now / 1000)]),
    ];
    let first = append(&mut conn, &p, &batch("b1", now), &frames).await;
    assert_eq!(first.unwrap().written(), 3);
    let replay = append(&mut conn, &p, &batch("b1", now + 10), &frames).await;
    assert_eq!(replay.unwrap(), Appended::Replay);
    let len: u64 = conn.xlen(fixes_key(&p)).await.unwrap();
    assert_eq!(len, 3, "the replay added nothing");
    let resent = append(&mut conn, &p, &batch("b2", now + 20), &frames[1..]).await;
    assert_eq!(
        resent.unwrap(),
        Appended::Written {
            written: 0,
            purged: 0,
            resent: 1
        },
        "the same fix under a new batch id (a device's resend) is not written again"
    );
    let twice = [(
        now + 25,
        vec![stored(now / 1000 + 5), stored(now / 1000 + 5)],
    )];
    let once = append(&mut conn, &p, &batch("b2b", now + 25), &twice).await;
    assert_eq!(
        once.unwrap(),
        Appended::Written {
            written: 1,
            purged: 0,
            resent: 1
        },
        "the same fix twice in one call is written once"
    );
    let new_fix = [(now + 30, vec![stored(now / 1000 + 1)])];
    let next = append(&mut conn, &p, &batch("b3", now + 30), &new_fix).await;
    assert_eq!(next.unwrap().written(), 1, "a new batch id is written");
    let (lb, kv): (String, u32) = redis::cmd("HMGET")
        .arg(meta_key(&p))
        .arg("lb")
        .arg("kv")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((lb.as_str(), kv), ("b3", p.key_version()));
}

#[tokio::test]
async fn a_tombstone_refuses_an_entry_received_before_its_cutoff() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    scripts::load_append(&mut conn).await.unwrap();
    let p = device();
    let now = now_ms();
    let t = now / 1000;
    // A range purge of [t - 50, t - 40] at now.
    let _: () = conn
        .hset(tomb_key(&p), format!("r:{}:{}", t - 50, t - 40), now)
        .await
        .unwrap();
    let frames = [
        (now - 99, vec![stored(t - 45), stored(t - 30)]), // in the range: one refused
        (now + 1, vec![stored(t - 46)]),                  // after the cutoff: kept
    ];
    let n = append(&mut conn, &p, &batch("b1", now), &frames).await;
    assert_eq!(
        n.unwrap(),
        Appended::Written {
            written: 2,
            purged: 1,
            resent: 0
        }
    );
    let entries: redis::streams::StreamRangeReply = conn.xrange_all(fixes_key(&p)).await.unwrap();
    let times: Vec<i64> = entries
        .ids
        .iter()
        .map(|e| e.get::<i64>("t").unwrap())
        .collect();
    assert_eq!(times, [t - 30, t - 46]);
}

#[tokio::test]
async fn a_complete_purge_refuses_what_was_taken_before_it_whenever_it_arrives() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    scripts::load_append(&mut conn).await.unwrap();
    let p = device();
    let now = now_ms();
    let t = now / 1000;
    let cutoff = t * 1000 - 10_000; // a complete purge ten seconds ago
    scripts::purge_all(&mut conn, &p, cutoff, cutoff, Duration::from_secs(60))
        .await
        .unwrap();
    let frames = [
        (cutoff, vec![stored(t + 1)]), // received at the cutoff: refused
        // Received after it: the device's cache, taken before (refused), and a fix taken
        // after it (kept).
        (now, vec![stored(t - 3_600), stored(t - 11), stored(t)]),
    ];
    let n = append(&mut conn, &p, &batch("b1", now), &frames).await;
    assert_eq!(
        n.unwrap(),
        Appended::Written {
            written: 1,
            purged: 3,
            resent: 0
        }
    );
    let entries: redis::streams::StreamRangeReply = conn.xrange_all(fixes_key(&p)).await.unwrap();
    let times: Vec<i64> = entries
        .ids
        .iter()
        .map(|e| e.get::<i64>("t").unwrap())
        .collect();
    assert_eq!(times, [t], "only the fix taken after the purge");
}

#[tokio::test]
async fn a_late_fix_is_indexed_by_fix_time_and_the_tail_expires_after_its_ttl() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    scripts::load_append(&mut conn).await.unwrap();
    let p = device();
    let now = now_ms();
    let t = now / 1000;
    // late_after is 600 s: a fix taken an hour before it was received is late.
    let frames = [(now, vec![stored(t), stored(t - 3600)])];
    let n = append(&mut conn, &p, &batch("b1", now), &frames).await;
    assert_eq!(n.unwrap().written(), 2);
    let late: Vec<(String, i64)> = conn.zrange_withscores(late_key(&p), 0, -1).await.unwrap();
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].1, t - 3600, "scored by fix time");
    let pttl: i64 = conn.pttl(fixes_key(&p)).await.unwrap();
    assert!(pttl > 3_600_000, "tail expires after ttl + upkeep: {pttl}");
}

/// A history chunk of `n` rows at `t0`, `t0 + 1`, …
fn chunk_of(n: i64, t0: i64) -> Vec<u8> {
    let rows: Vec<Row> = (0..n)
        .map(|i| Row {
            recv_ms: (t0 + i) * 1000,
            seq: 0,
            time: t0 + i,
            fix_time_s: Some(t0 + i),
            kind: 0,
            values: [None; VALUES],
            extras: None,
        })
        .collect();
    chunk::encode(&rows)
}

#[tokio::test]
async fn purge_all_counts_and_removes_everything_and_raises_the_cutoff_only() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let p = device();
    tail_ids(&mut conn, &p, 3).await;
    let _: () = conn
        .zadd(hist_key(&p), chunk_of(200, 1000), 1000)
        .await
        .unwrap();
    let _: () = conn
        .zadd(hist_key(&p), chunk_of(5, 2000), 2000)
        .await
        .unwrap();
    let _: () = conn.hset(meta_key(&p), "lb", "b1").await.unwrap();
    let _: () = conn.zadd(late_key(&p), "1-0", 1).await.unwrap();
    let ttl = Duration::from_secs(60);
    let n = scripts::purge_all(&mut conn, &p, 500, 300_000, ttl)
        .await
        .unwrap();
    assert_eq!(n, 3 + 200 + 5, "tail entries and chunk rows");
    for key in [fixes_key(&p), hist_key(&p), meta_key(&p), late_key(&p)] {
        let exists: bool = conn.exists(&key).await.unwrap();
        assert!(!exists, "{key} is gone");
    }
    let n = scripts::purge_all(&mut conn, &p, 400, 200_000, ttl)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing left");
    let cutoff: i64 = conn.hget(tomb_key(&p), "all").await.unwrap();
    assert_eq!(cutoff, 500, "an older purge does not lower the cutoff");
    scripts::purge_all(&mut conn, &p, 600, 400_000, ttl)
        .await
        .unwrap();
    let cutoff: i64 = conn.hget(tomb_key(&p), "all").await.unwrap();
    assert_eq!(cutoff, 600);
    let fields: Vec<String> = conn.hkeys(tomb_key(&p)).await.unwrap();
    let taken: Vec<&String> = fields.iter().filter(|f| f.starts_with("r:0:")).collect();
    assert_eq!(taken, ["r:0:400"], "one fix-time range, the widest");
    let pttl: i64 = conn.pttl(tomb_key(&p)).await.unwrap();
    assert!(pttl > 50_000 && pttl <= 60_000, "tombstone ttl: {pttl}");
}

/// A retried older purge of a range (the worker finishing a request whose fast path
/// failed) must not lower the cutoff a newer, completed purge of it set.
#[tokio::test]
async fn a_range_cutoff_only_rises() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let p = device();
    let ttl = Duration::from_secs(60);
    for cutoff in [200, 100, 300, 250] {
        scripts::purge_range_mark(&mut conn, &p, (10, 20), cutoff, ttl)
            .await
            .unwrap();
    }
    let cutoff: i64 = conn.hget(tomb_key(&p), "r:10:20").await.unwrap();
    assert_eq!(cutoff, 300);
    let pttl: i64 = conn.pttl(tomb_key(&p)).await.unwrap();
    assert!(
        pttl > 50_000,
        "the tombstone lives at least the ttl: {pttl}"
    );
}

#[tokio::test]
async fn a_range_step_deletes_exactly_the_fixes_in_range() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let p = device();
    // Fix times 5, 10, …, 30 and one entry without a fix time.
    for t in [5, 10, 15, 20, 25, 30] {
        let _: String = conn
            .xadd(fixes_key(&p), "*", &[("t", t.to_string())])
            .await
            .unwrap();
    }
    let no_time: String = conn.xadd(fixes_key(&p), "*", &[("d", "x")]).await.unwrap();
    // Two entries per step, from the start to the end.
    let (mut start, mut deleted, mut steps) = ("-".to_string(), 0, 0);
    loop {
        let step = RangeStep {
            start: &start,
            end: "+",
            count: 2,
            from_s: 10,
            to_s: 20,
        };
        let RangeStepDone { last, deleted: n } = scripts::purge_range_step(&mut conn, &p, &step)
            .await
            .unwrap();
        deleted += n;
        steps += 1;
        match last {
            Some(last) => start = format!("({last}"),
            None => break,
        }
    }
    assert_eq!(
        (deleted, steps),
        (3, 5),
        "four steps, the last one finding nothing"
    );
    let entries: redis::streams::StreamRangeReply = conn.xrange_all(fixes_key(&p)).await.unwrap();
    let left: Vec<Option<i64>> = entries.ids.iter().map(|e| e.get("t")).collect();
    assert_eq!(left, [Some(5), Some(25), Some(30), None]);
    assert_eq!(entries.ids[3].id, no_time);
}

#[tokio::test]
async fn a_sweep_trims_by_minid_and_the_late_index_by_fix_time() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let p = device();
    // Received at 1 s … 5 s; the last three were taken long before (fix times 1, 2, 3).
    let entries = [
        ("1000-0", 1),
        ("2000-0", 2),
        ("3000-0", 1),
        ("4000-0", 2),
        ("5000-0", 3),
    ];
    for (id, t) in entries {
        let _: String = conn
            .xadd(fixes_key(&p), id, &[("t", t.to_string())])
            .await
            .unwrap();
    }
    for (id, t) in &entries[2..] {
        let _: () = conn.zadd(late_key(&p), *id, *t).await.unwrap();
    }
    let tail = fixes_key(&p);
    let step = |min_id_ms, late_chunk| SweepStep {
        tail: &tail,
        min_id_ms,
        fix_cutoff_s: 3,
        late_chunk,
    };
    let swept = |removed, late_taken| Swept {
        removed,
        late_taken,
    };
    let s = scripts::sweep_stream(&mut conn, &p, &step(2500, 1)).await;
    assert_eq!(
        s.unwrap(),
        swept(3, 1),
        "two by receive time, a chunk of one late"
    );
    let s = scripts::sweep_stream(&mut conn, &p, &step(2500, 1)).await;
    assert_eq!(s.unwrap(), swept(1, 1));
    let s = scripts::sweep_stream(&mut conn, &p, &step(2500, 1)).await;
    assert_eq!(s.unwrap(), swept(0, 0), "a fix taken at the cutoff stays");
    let len: u64 = conn.xlen(fixes_key(&p)).await.unwrap();
    let late: u64 = conn.zcard(late_key(&p)).await.unwrap();
    assert_eq!((len, late), (1, 1));
    // Without a late index only the trim runs.
    let _: () = conn.del(late_key(&p)).await.unwrap();
    let s = scripts::sweep_stream(&mut conn, &p, &step(5001, 10)).await;
    assert_eq!(s.unwrap(), swept(1, 0));
}

async fn owned_since(conn: &mut redis::aio::MultiplexedConnection, p: &Pseudonym) -> Option<i64> {
    conn.get(owner_since_key(p)).await.unwrap()
}

#[tokio::test]
async fn assigning_another_owner_leaves_the_history_behind() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let p = device();
    let change = |now_ms| OwnerChange {
        now_ms,
        since_ttl_ms: 60_000,
    };
    scripts::assign_owner(&mut conn, &p, "acme", change(100))
        .await
        .unwrap();
    let owner: Option<String> = conn.get(owner_key(&p)).await.unwrap();
    assert_eq!(owner.as_deref(), Some("acme"));
    assert_eq!(
        owned_since(&mut conn, &p).await,
        None,
        "a first owner sees everything"
    );
    scripts::assign_owner(&mut conn, &p, "acme", change(200))
        .await
        .unwrap();
    assert_eq!(
        owned_since(&mut conn, &p).await,
        None,
        "the same owner again changes nothing"
    );
    scripts::assign_owner(&mut conn, &p, "globex", change(300))
        .await
        .unwrap();
    let owner: Option<String> = conn.get(owner_key(&p)).await.unwrap();
    assert_eq!(owner.as_deref(), Some("globex"));
    assert_eq!(owned_since(&mut conn, &p).await, Some(300));
    let pttl: i64 = conn.pttl(owner_since_key(&p)).await.unwrap();
    assert!(
        pttl > 50_000 && pttl <= 60_000,
        "owner_since expires: {pttl}"
    );
    let owner_ttl: i64 = conn.pttl(owner_key(&p)).await.unwrap();
    assert_eq!(owner_ttl, -1, "ownership has no expiry");
}

#[tokio::test]
async fn unassigning_moves_owner_since_only_if_there_was_an_owner() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let p = device();
    let change = |now_ms| OwnerChange {
        now_ms,
        since_ttl_ms: 60_000,
    };
    scripts::unassign_owner(&mut conn, &p, change(100))
        .await
        .unwrap();
    let since: Option<i64> = conn.get(owner_since_key(&p)).await.unwrap();
    assert_eq!(since, None, "nobody owned it: nothing to leave behind");
    scripts::assign_owner(&mut conn, &p, "acme", change(200))
        .await
        .unwrap();
    scripts::unassign_owner(&mut conn, &p, change(300))
        .await
        .unwrap();
    let owner: Option<String> = conn.get(owner_key(&p)).await.unwrap();
    let since: Option<i64> = conn.get(owner_since_key(&p)).await.unwrap();
    assert_eq!((owner, since), (None, Some(300)));
    // The next owner after an unassignment starts after it too.
    scripts::assign_owner(&mut conn, &p, "acme", change(400))
        .await
        .unwrap();
    let since: Option<i64> = conn.get(owner_since_key(&p)).await.unwrap();
    assert_eq!(since, Some(400));
}

#[tokio::test]
async fn an_empty_stream_is_dropped_and_one_with_entries_kept() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let key = "legacy:journal";
    let id: String = conn.xadd(key, "*", &[("id", "x")]).await.unwrap();
    assert!(!scripts::drop_empty_stream(&mut conn, key).await.unwrap());
    let len: u64 = conn.xlen(key).await.unwrap();
    assert_eq!(len, 1);
    let _: u64 = conn.xdel(key, &[&id]).await.unwrap();
    assert!(scripts::drop_empty_stream(&mut conn, key).await.unwrap());
    let exists: bool = conn.exists(key).await.unwrap();
    assert!(!exists);
    assert!(
        !scripts::drop_empty_stream(&mut conn, key).await.unwrap(),
        "gone: nothing to do"
    );
}

#[tokio::test]
async fn an_audit_line_is_appended_only_onto_the_hash_it_was_chained_to() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let fields = [("ts", "1"), ("actor", "admin")];
    assert!(
        scripts::audit_append(&mut conn, "", "h1", &fields)
            .await
            .unwrap()
    );
    // Another gateway's line came first: this one was hashed onto a stale last line.
    assert!(
        !scripts::audit_append(&mut conn, "", "h2", &fields)
            .await
            .unwrap()
    );
    assert!(
        scripts::audit_append(&mut conn, "h1", "h2", &fields)
            .await
            .unwrap()
    );
    let lines: redis::streams::StreamRangeReply =
        conn.xrange_all(trackgate::audit::AUDIT_KEY).await.unwrap();
    let chain: Vec<(String, String)> = lines
        .ids
        .iter()
        .map(|e| {
            (
                e.get::<String>("prev").unwrap(),
                e.get::<String>("h").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        chain,
        [
            ("".to_string(), "h1".to_string()),
            ("h1".into(), "h2".into())
        ]
    );
    assert_eq!(
        lines.ids[1].get::<String>("actor").as_deref(),
        Some("admin")
    );
}

#[tokio::test]
async fn a_lease_is_released_by_its_holder_only_and_a_rewrite_end_only_moves_forward() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let _: () = conn.set("lease", "gw-a").await.unwrap();
    assert!(
        !scripts::lease_release(&mut conn, "lease", "gw-b")
            .await
            .unwrap()
    );
    assert!(
        scripts::lease_release(&mut conn, "lease", "gw-a")
            .await
            .unwrap()
    );
    let held: bool = conn.exists("lease").await.unwrap();
    assert!(!held);

    assert!(scripts::disk_done(&mut conn, 2, 200).await.unwrap());
    assert!(
        !scripts::disk_done(&mut conn, 1, 300).await.unwrap(),
        "an older rewrite ending late does not claim newer purges"
    );
    let (epoch, ms): (i64, i64) = redis::cmd("HMGET")
        .arg(trackgate::store::keys::PURGE_DISK_KEY)
        .arg("done_epoch")
        .arg("done_ms")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((epoch, ms), (2, 200));
}

#[tokio::test]
async fn a_customer_cannot_change_a_blocked_device_and_the_operator_can() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let p = device();
    let key = trackgate::store::keys::state_key(&p);
    assert!(
        scripts::collection_set(&mut conn, &p, "paused", false)
            .await
            .unwrap()
    );
    let v: Option<String> = conn.get(&key).await.unwrap();
    assert_eq!(v.as_deref(), Some("paused"));
    assert!(
        scripts::collection_set(&mut conn, &p, "blocked", true)
            .await
            .unwrap()
    );
    for state in ["active", "paused"] {
        assert!(
            !scripts::collection_set(&mut conn, &p, state, false)
                .await
                .unwrap()
        );
    }
    let v: Option<String> = conn.get(&key).await.unwrap();
    assert_eq!(v.as_deref(), Some("blocked"), "the block stands");
    assert!(
        scripts::collection_set(&mut conn, &p, "active", true)
            .await
            .unwrap()
    );
    let gone: bool = conn.exists(&key).await.unwrap();
    assert!(!gone, "active is the absence of the key");
}
