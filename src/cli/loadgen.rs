//! `trackgate loadgen`: a simulated fleet against a running gateway, with live rates and
//! an ACK-latency histogram. See [`crate::loadgen`] for how devices behave.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::gateway::termination_signal;
use crate::loadgen::fleet::{self, FleetConfig, FleetStats};
use crate::loadgen::net::{Route, TlsClient, check_targets, source_addrs};
use crate::loadgen::realistic::SimulatedTime;
use crate::loadgen::report::{LoadReport, Offered, Sample};

/// Arguments of `trackgate loadgen`.
#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// Gateway tracker port(s); devices are spread over them round-robin.
    #[arg(long = "target", default_value = "127.0.0.1:5020", num_args = 1..)]
    pub targets: Vec<SocketAddr>,
    /// Simulated devices, one connection each.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Seconds between two sends of one device (open loop: sends fall due on schedule
    /// whether or not the gateway keeps up).
    #[arg(long, default_value_t = 10.0)]
    pub interval_s: f64,
    /// Share of sends that are a CCE batch (confirmed, latency measured) instead of an AAA report.
    #[arg(long, default_value_t = 0.2)]
    pub cce_share: f64,
    /// Fixes in one scheduled CCE batch.
    #[arg(long, default_value_t = 10)]
    pub batch_fixes: usize,
    /// Chance per send of losing coverage (5–20 fixes cached, then sent as one batch).
    #[arg(long, default_value_t = 0.0)]
    pub outage_probability: f64,
    /// Connect, send one report, then stay idle (for memory per connection).
    #[arg(long)]
    pub idle: bool,
    /// Every send is one AAA report with one fix: no CCE batches, no coverage gaps.
    #[arg(long, conflicts_with_all = ["cce_share", "batch_fixes", "outage_probability", "idle"])]
    pub aaa_only: bool,
    /// With --aaa-only: devices report like real ones on a simulated clock. Each report's
    /// fix time is this many seconds after the device's previous one (sent as fast as
    /// --interval-s allows, not in real time), starting far enough back that the last
    /// report (by --max-frames, else --duration-s) is about now, at most 89 days back and
    /// never in the future. Altitude walks slowly, satellites/HDOP/GSM signal change now
    /// and then by one step, the cell every few dozen reports, odometer and run time
    /// advance with the simulated time, and the analog input and battery/power readings
    /// carry small noise.
    #[arg(long, requires = "aaa_only", value_name = "S")]
    pub sim_interval_s: Option<f64>,
    /// Spread the first connections over this many seconds (default: one interval).
    #[arg(long)]
    pub ramp_s: Option<f64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// Stop after this many frames.
    #[arg(long)]
    pub max_frames: Option<u64>,
    /// Seconds to wait for a batch confirmation before reconnecting.
    #[arg(long, default_value_t = 30)]
    pub ack_timeout_s: u64,
    /// Source address(es) to connect from (default: 127.0.0.2… as needed, 20k connections each).
    #[arg(long = "source-ip", num_args = 1..)]
    pub source_ips: Vec<IpAddr>,
    /// Connect with TLS, trusting the certificate(s) in this PEM file.
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Name the gateway's certificate is issued for.
    #[arg(long, default_value = "localhost")]
    pub tls_server_name: String,
    /// First IMEI (fake `35…` range by default); device i uses base + i.
    #[arg(long, default_value_t = 350_000_000_000_000)]
    pub imei_base: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the run's report (totals, latency, per-second timeline, CDF) here as JSON.
    #[arg(long, value_name = "FILE")]
    pub report_json: Option<PathBuf>,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Allow targets that are not loopback addresses.
    #[arg(long)]
    pub allow_remote: bool,
    /// Seconds at the start whose batches stay out of the steady-state latency
    /// (`latency_steady` in the report): opening many connections at once costs SYN
    /// retries and first-frame work that a sustained rate does not have.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_s: f64,
    /// Worker threads of the load generator [default: one per CPU]. Fewer keeps it from
    /// competing with a gateway and Redis on the same box for more than that many cores.
    #[arg(long)]
    pub threads: Option<usize>,
}

pub(super) fn run(args: &LoadgenArgs) -> ExitCode {
    let fleet_config = match fleet_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trackgate loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match super::runtime_with_threads("loadgen", "tg-loadgen", args.threads) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let report = rt.block_on(drive(args, fleet_config));
    print_summary(&report);
    if let Some(path) = &args.report_json {
        let written = serde_json::to_vec_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|j| std::fs::write(path, j).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("trackgate loadgen: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// Check the arguments and turn them into a fleet.
fn fleet_config(args: &LoadgenArgs) -> Result<FleetConfig, String> {
    check_targets(&args.targets, args.allow_remote).map_err(|e| e.to_string())?;
    let first = *args.targets.first().ok_or("no --target")?;
    if !(args.interval_s.is_finite() && args.interval_s > 0.0) {
        return Err("--interval-s must be a positive number".into());
    }
    for (name, p) in [
        ("--cce-share", args.cce_share),
        ("--outage-probability", args.outage_probability),
    ] {
        if !(0.0..=1.0).contains(&p) {
            return Err(format!("{name} must be between 0 and 1"));
        }
    }
    if args.devices == 0 {
        return Err("--devices must be at least 1".into());
    }
    let soft = crate::fd_limit::ensure(args.devices).map_err(|e| e.to_string())?;
    let mut c = FleetConfig::new(first, args.devices);
    c.route = Route {
        targets: args.targets.clone(),
        sources: source_addrs(&args.source_ips, args.devices, &args.targets)
            .map_err(|e| e.to_string())?,
        tls: match &args.tls_ca {
            Some(ca) => Some(
                TlsClient::from_ca_file(ca, &args.tls_server_name).map_err(|e| e.to_string())?,
            ),
            None => None,
        },
    };
    c.report_interval = Duration::from_secs_f64(args.interval_s);
    c.cce_share = args.cce_share;
    c.batch_fixes = args.batch_fixes.clamp(1, c.max_batch_fixes);
    c.outage_probability = args.outage_probability;
    c.idle = args.idle;
    c.aaa_only = args.aaa_only;
    if c.aaa_only {
        c.cce_share = 0.0;
        c.outage_probability = 0.0;
    }
    c.simulated = simulated_time(args)?;
    c.start_spread = Duration::from_secs_f64(args.ramp_s.unwrap_or(args.interval_s).max(0.0));
    c.max_frames = args.max_frames;
    c.imei_base = args.imei_base;
    c.seed = args.seed;
    c.ack_timeout = Duration::from_secs(args.ack_timeout_s.max(1));
    tracing::debug!(
        soft_fd_limit = soft,
        sources = c.route.sources.len(),
        "loadgen ready"
    );
    Ok(c)
}

/// The fleet's simulated clock (`--sim-interval-s`): ends about now after the reports
/// the run is bounded to.
fn simulated_time(args: &LoadgenArgs) -> Result<Option<SimulatedTime>, String> {
    let Some(s) = args.sim_interval_s else {
        return Ok(None);
    };
    if !(1.0..=86_400.0).contains(&s) {
        return Err("--sim-interval-s must be 1 to 86400".into());
    }
    let per_device = match (args.max_frames, args.duration_s) {
        (Some(frames), _) => Some(frames.div_ceil(args.devices as u64)),
        (None, Some(d)) => Some((d.max(0.0) / args.interval_s).ceil() as u64),
        (None, None) => None,
    };
    Ok(Some(SimulatedTime::ending_at(
        jiff::Timestamp::now(),
        Duration::from_secs_f64(s),
        per_device,
    )))
}

async fn drive(args: &LoadgenArgs, config: FleetConfig) -> LoadReport {
    let offered = Offered {
        devices: config.devices as u64,
        report_interval_s: config.report_interval.as_secs_f64(),
        cce_share: config.cce_share,
        batch_fixes: config.batch_fixes as u64,
        tls: config.route.tls.is_some(),
        idle: config.idle,
        aaa_only: config.aaa_only,
        sim_interval_s: config.simulated.map(|t| t.interval.as_secs_f64()),
        fixes_per_s: if config.idle {
            0.0
        } else {
            Offered::rate(
                config.devices,
                config.report_interval.as_secs_f64(),
                config.cce_share,
                config.batch_fixes,
            )
        },
    };
    let stats = Arc::new(FleetStats::default());
    let stop = CancellationToken::new();
    let started = Instant::now();
    let warmup_s = args.warmup_s.max(0.0);
    stats.steady_from(started + Duration::from_secs_f64(warmup_s));
    let mut fleet = tokio::spawn(fleet::run(config, stats.clone(), stop.clone()));
    let bar = progress_bar(args);
    let deadline = args
        .duration_s
        .map(|s| started + Duration::from_secs_f64(s.max(0.0)));
    let mut timeline = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = (stats.counters(), Instant::now());
    let signal = termination_signal();
    tokio::pin!(signal);
    let mut fleet_done = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut signal => break,
            _ = &mut fleet => {
                // --max-frames reached and drained.
                fleet_done = true;
                break;
            }
        }
        let now = Instant::now();
        let c = stats.counters();
        let dt = (now - last.1).as_secs_f64().max(1e-6);
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
        let lat = stats.take_interval();
        let sample = Sample {
            t_s: (now - started).as_secs_f64(),
            connected: c.connected,
            fixes_sent_per_s: rate(c.fixes_sent, last.0.fixes_sent),
            fixes_acked_per_s: rate(c.fixes_acked, last.0.fixes_acked),
            frames_per_s: rate(c.frames_sent, last.0.frames_sent),
            ack_count: lat.count,
            ack_p50_ms: lat.p50_ms,
            ack_p99_ms: lat.p99_ms,
        };
        bar.set_position(sample.t_s as u64);
        bar.set_message(format!(
            "conns {} | sent {:.0}/s acked {:.0}/s | ack p50 {:.1} ms p99 {:.1} ms | reconnects {} errors {}",
            c.connected,
            sample.fixes_sent_per_s,
            sample.fixes_acked_per_s,
            sample.ack_p50_ms,
            sample.ack_p99_ms,
            c.disconnects,
            c.connect_errors
        ));
        timeline.push(sample);
        last = (c, now);
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
    }
    stop.cancel();
    bar.set_message("stopping: waiting for the confirmations of batches in flight");
    if !fleet_done {
        let _ = fleet.await;
    }
    bar.finish_and_clear();
    LoadReport {
        offered,
        duration_s: started.elapsed().as_secs_f64(),
        totals: stats.counters(),
        latency: stats.total_latency(),
        latency_steady: stats.steady_latency(),
        warmup_s,
        timeline,
        latency_cdf: stats.cdf(),
    }
}

fn progress_bar(args: &LoadgenArgs) -> ProgressBar {
    if args.quiet {
        return ProgressBar::hidden();
    }
    let (bar, template) = match args.duration_s {
        Some(s) => (
            ProgressBar::new(s.ceil() as u64),
            "{elapsed_precise} [{bar:20}] {msg}",
        ),
        None => (
            ProgressBar::no_length(),
            "{elapsed_precise} {spinner} {msg}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn print_summary(r: &LoadReport) {
    let t = &r.totals;
    let l = &r.latency;
    println!(
        "{:.1} s, {} devices: sent {} fixes in {} frames ({:.0} fixes/s offered, {:.0}/s sent); \
         {} fixes confirmed in {} batches; {} resent after reconnects; {} disconnects, \
         {} connect errors, {} ACK timeouts",
        r.duration_s,
        r.offered.devices,
        t.fixes_sent,
        t.frames_sent,
        r.offered.fixes_per_s,
        t.fixes_sent as f64 / r.duration_s.max(1e-6),
        t.fixes_acked,
        t.batches_confirmed,
        t.fixes_resent,
        t.disconnects,
        t.connect_errors,
        t.ack_timeouts
    );
    if l.count > 0 {
        println!(
            "ACK latency (from due time, {} batches): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, \
             p99.9 {:.2} ms, max {:.2} ms",
            l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
        );
    }
    let s = &r.latency_steady;
    if r.warmup_s > 0.0 && s.count > 0 {
        println!(
            "  after the {:.1} s warm-up ({} batches): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, \
             p99.9 {:.2} ms, max {:.2} ms",
            r.warmup_s, s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
        );
    }
}
