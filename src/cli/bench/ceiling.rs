//! The physical ceiling: how many stream appends this Redis does per second on this
//! machine, measured with `redis-benchmark` in the same run as the gateway. The gateway
//! cannot store fixes faster than Redis appends entries, so its throughput is reported
//! as a ratio to this.

use serde::{Deserialize, Serialize};

/// `redis-benchmark` results.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Ceiling {
    /// Bytes of the `d` value appended (the packed size of a typical stored fix).
    pub value_bytes: usize,
    /// XADD per second with 64 commands per pipeline (what batched writers can reach).
    pub xadd_pipelined_per_s: f64,
    /// XADD per second, one command per round trip.
    pub xadd_unpipelined_per_s: f64,
    pub clients: u32,
}

/// Arguments of one `redis-benchmark` run: random stream keys (`-r`), XADD of a `t` and
/// a `d` field like a stored fix.
pub(crate) fn args(
    port: u16,
    requests: u64,
    pipeline: u32,
    clients: u32,
    value: &str,
) -> Vec<String> {
    let mut a: Vec<String> = [
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-c",
        &clients.to_string(),
        "-n",
        &requests.to_string(),
        "-r",
        "100000",
        "-P",
        &pipeline.to_string(),
        "--csv",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(
        [
            "XADD",
            crate::store::keys::BENCH_FIXES_KEY,
            "*",
            "t",
            "1760000000",
            "d",
            value,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    a
}

/// Requests per second from `redis-benchmark --csv` output (the `rps` column of the
/// last data row).
pub(crate) fn parse_rps(csv: &str) -> Option<f64> {
    csv.lines()
        .filter(|l| !l.starts_with("\"test\""))
        .filter_map(|l| {
            let cols: Vec<&str> = l.split(',').map(|c| c.trim_matches('"')).collect();
            cols.get(1).and_then(|v| v.parse::<f64>().ok())
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rps_column_of_redis_benchmark_csv() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\"\n\
                   \"XADD tg:{bench:__rand_int__}:fixes * t 1760000000 d xxxxx\",\"412371.12\",\"6.9\",\"1.2\",\"6.8\"\n";
        assert_eq!(parse_rps(csv), Some(412_371.12));
        assert_eq!(parse_rps("\"test\",\"rps\"\n"), None);
        assert_eq!(parse_rps(""), None);
    }

    #[test]
    fn the_command_appends_a_fix_sized_value_to_random_streams() {
        let a = args(6390, 1000, 64, 50, "abc");
        let joined = a.join(" ");
        assert!(
            joined.contains("-p 6390 -c 50 -n 1000 -r 100000 -P 64 --csv"),
            "{joined}"
        );
        assert!(joined.ends_with("XADD tg:{bench:__rand_int__}:fixes * t 1760000000 d abc"));
    }
}
