//! Everything Redis holds, as bytes: every key (SCAN), its `DUMP` serialization (with RDB
//! compression off, so no value hides inside an LZF block) and a typed read of its values.
//! For "the raw IMEI / token is nowhere in Redis" checks.

/// Keys and their dumps and values, concatenated. Panics on an unexpected key type.
pub async fn everything(conn: &mut redis::aio::MultiplexedConnection) -> (Vec<String>, Vec<u8>) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("rdbcompression")
        .arg("no")
        .query_async(conn)
        .await
        .unwrap();
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for k in &keys {
        out.extend_from_slice(k.as_bytes());
        out.push(b'\n');
        let dump: Option<Vec<u8>> = redis::cmd("DUMP").arg(k).query_async(conn).await.unwrap();
        out.extend_from_slice(&dump.unwrap_or_default());
        out.push(b'\n');
        let kind: String = redis::cmd("TYPE").arg(k).query_async(conn).await.unwrap();
        let cmd = match kind.as_str() {
            "stream" => redis::cmd("XRANGE").arg(k).arg("-").arg("+").clone(),
            "hash" => redis::cmd("HGETALL").arg(k).clone(),
            "string" => redis::cmd("GET").arg(k).clone(),
            "set" => redis::cmd("SMEMBERS").arg(k).clone(),
            "zset" => redis::cmd("ZRANGE")
                .arg(k)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .clone(),
            "list" => redis::cmd("LRANGE").arg(k).arg(0).arg(-1).clone(),
            "none" => continue, // expired between SCAN and now
            other => panic!("unexpected key type {other} for {k}"),
        };
        let v: redis::Value = cmd.query_async(conn).await.unwrap();
        out.extend_from_slice(format!("{v:?}\n").as_bytes());
    }
    (keys, out)
}

/// True if `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
