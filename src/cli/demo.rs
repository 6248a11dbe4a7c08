//! `trackgate demo`: the whole product on one machine with one command.
//!
//! Starts its own `redis-server` child (free port, temp dir, no persistence), throwaway
//! pseudonymization keys, the gateway, and a simulated fleet; prints live stats until
//! Ctrl-C / SIGTERM or `--duration-s`. The Redis child is killed on every exit path: on
//! return, on error, and on panic (the handle kills on drop).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ListenerConfig};
use crate::gateway::{Gateway, termination_signal};
use crate::loadgen::fleet::{self, FleetConfig, FleetStats};
use crate::pseudonym::KeyRing;
use crate::redis_child::RedisChild;

/// Arguments of `trackgate demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 200)]
    pub devices: usize,
    /// Seconds between two reports of one device.
    #[arg(long, default_value_t = 1.0)]
    pub report_interval_s: f64,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration_s: Option<u64>,
    /// Seconds between two stats lines.
    #[arg(long, default_value_t = 2)]
    pub stats_interval_s: u64,
    /// Serve metrics on this address (default: a free port on 127.0.0.1).
    #[arg(long)]
    pub http: Option<std::net::SocketAddr>,
}

pub(super) fn run(args: &DemoArgs) -> ExitCode {
    super::serve::init_logging_quiet();
    let rt = match super::runtime("demo", "tg-demo") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(demo(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trackgate demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: &DemoArgs) -> Result<(), String> {
    let redis = RedisChild::start().await?;
    let mut config = Config {
        listeners: vec![ListenerConfig {
            bind: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
            tls: None,
        }],
        ..Config::default()
    };
    config.redis.url = redis.url();
    config.http.bind = Some(args.http.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()));
    config.limits.shutdown_grace_s = 10;
    config.keys.key_file = "(ephemeral)".into();
    let keys = Arc::new(KeyRing::ephemeral());
    let gateway = Gateway::start(config, keys)
        .await
        .map_err(|e| e.to_string())?;
    let addr = gateway.tracker_addrs[0];
    println!(
        "trackgate demo: redis-server on port {}, gateway on {addr}, metrics on http://{}/metrics",
        redis.port,
        gateway.http_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    println!(
        "simulating {} devices reporting every {:.1} s; Ctrl-C to stop",
        args.devices, args.report_interval_s
    );

    let stats = Arc::new(FleetStats::default());
    let stop = CancellationToken::new();
    let mut fleet_config = FleetConfig::new(addr, args.devices);
    fleet_config.report_interval = Duration::from_secs_f64(args.report_interval_s.max(0.01));
    let fleet = tokio::spawn(fleet::run(fleet_config, stats.clone(), stop.clone()));

    let client = redis::Client::open(redis.url()).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let baseline = used_memory(&mut conn).await.unwrap_or(0);
    let started = Instant::now();
    let deadline = args.duration_s.map(|s| started + Duration::from_secs(s));
    let mut tick = tokio::time::interval(Duration::from_secs(args.stats_interval_s.max(1)));
    tick.tick().await;
    let mut last_stored = 0u64;
    let mut last_at = Instant::now();
    println!(
        "{:>6} {:>9} {:>10} {:>8} {:>9} {:>9} {:>12}",
        "t_s", "conns", "stored", "fixes/s", "ack_p50", "ack_p99", "redis_B/fix"
    );
    let signal = termination_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut signal => break,
        }
        let stored = super::count_stored_fixes(&mut conn)
            .await
            .unwrap_or(last_stored);
        let now = Instant::now();
        let rate = (stored.saturating_sub(last_stored)) as f64 / (now - last_at).as_secs_f64();
        (last_stored, last_at) = (stored, now);
        let mem = used_memory(&mut conn).await.unwrap_or(baseline);
        let per_fix = if stored > 0 {
            format!("{:.0}", mem.saturating_sub(baseline) as f64 / stored as f64)
        } else {
            "-".into()
        };
        let lat = stats.take_interval();
        let (p50, p99) = if lat.count > 0 {
            (
                format!("{:.1}ms", lat.p50_ms),
                format!("{:.1}ms", lat.p99_ms),
            )
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "{:>6} {:>9} {:>10} {:>8.0} {:>9} {:>9} {:>12}",
            started.elapsed().as_secs(),
            stats.connected.load(Ordering::Relaxed),
            stored,
            rate,
            p50,
            p99,
            per_fix
        );
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    println!("stopping: fleet, then gateway (drains and acknowledges), then redis-server");
    stop.cancel();
    let _ = fleet.await;
    gateway.shutdown();
    gateway.wait().await;
    let stored = super::count_stored_fixes(&mut conn)
        .await
        .unwrap_or(last_stored);
    println!(
        "sent {} fixes in {} frames; {} stored; {} batches confirmed; {} ACK timeouts",
        stats.fixes_sent.load(Ordering::Relaxed),
        stats.frames_sent.load(Ordering::Relaxed),
        stored,
        stats.batches_confirmed.load(Ordering::Relaxed),
        stats.ack_timeouts.load(Ordering::Relaxed),
    );
    redis.stop().await;
    Ok(())
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> Option<u64> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
}
