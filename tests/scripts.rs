//! The data model's Lua scripts (`src/store/scripts/*.lua`), each driven directly against
//! a real redis-server through its typed call.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::*;
use redis::AsyncCommands;
use trackgate::pseudonym::Pseudonym;
use trackgate::store::scripts::{Swap, swap};
use trackgate::store::{fixes_key, hist_key, late_key, seen_key};

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
