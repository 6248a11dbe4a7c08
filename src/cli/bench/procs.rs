//! The processes a benchmark runs: the gateway (`trackgate serve`) and the load
//! generator (`trackgate loadgen`), each its own process so their CPU and memory are
//! measured apart, plus the readings taken from them (RSS, metrics, Redis INFO).

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::config::{Config, ListenerConfig, TlsConfig};
use crate::loadgen::report::LoadReport;
use crate::pseudonym::KeyRing;

/// A free loopback port (the listener is dropped; fine for a benchmark on its own box).
pub(crate) fn free_port() -> Result<u16, String> {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// A self-signed certificate for `localhost` in `dir`: (cert path, key path).
pub(crate) fn self_signed(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(|e| format!("certificate: {e}"))?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).map_err(|e| e.to_string())?;
    std::fs::write(&key, ck.signing_key.serialize_pem()).map_err(|e| e.to_string())?;
    Ok((cert, key))
}

/// A `trackgate serve` child, killed on drop.
#[derive(Debug)]
pub(crate) struct GatewayProc {
    child: Child,
    pub tracker: SocketAddr,
    pub http: SocketAddr,
}

impl GatewayProc {
    /// Start a gateway on `redis_url` with its config and key file in `dir`.
    pub(crate) async fn start(
        redis_url: &str,
        dir: &Path,
        tls: Option<(PathBuf, PathBuf)>,
        max_connections: usize,
    ) -> Result<GatewayProc, String> {
        Self::start_with(redis_url, dir, tls, max_connections, |_| {}).await
    }

    /// [`GatewayProc::start`], with `configure` applied to the config last.
    pub(crate) async fn start_with(
        redis_url: &str,
        dir: &Path,
        tls: Option<(PathBuf, PathBuf)>,
        max_connections: usize,
        configure: impl FnOnce(&mut Config),
    ) -> Result<GatewayProc, String> {
        let tracker: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let http: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let key_file = dir.join("keys.json");
        if !key_file.exists() {
            KeyRing::generate(&key_file).map_err(|e| e.to_string())?;
        }
        let mut config = Config {
            listeners: vec![ListenerConfig {
                bind: tracker,
                tls: tls.map(|(cert_path, key_path)| TlsConfig {
                    cert_path,
                    key_path,
                }),
            }],
            ..Config::default()
        };
        config.redis.url = redis_url.to_string();
        config.http.bind = Some(http);
        config.keys.key_file = key_file;
        config.limits.max_connections = max_connections;
        // Idle connections are the point of some runs: keep them.
        config.limits.idle_timeout_s = 3600;
        config.limits.handshake_timeout_s = 60;
        config.limits.shutdown_grace_s = 5;
        configure(&mut config);
        config.validate().map_err(|e| e.to_string())?;
        let path = dir.join("gateway.toml");
        let text = toml::to_string(&config).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("gateway.log")).map_err(|e| e.to_string())?,
            ))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the gateway: {e}"))?;
        let gw = GatewayProc {
            child,
            tracker,
            http,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(gw.tracker).await.is_err() {
            if Instant::now() > deadline {
                return Err(format!(
                    "the gateway did not listen within 20 s (see {})",
                    dir.join("gateway.log").display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(gw)
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Resident memory of the gateway process, in bytes.
    pub(crate) fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(self.pid()?)
    }

    /// A gauge or counter from the gateway's `/metrics` (the sum over its label sets).
    pub(crate) async fn metric(&self, name: &str) -> Option<f64> {
        let url = format!("http://{}/metrics", self.http);
        let name = name.to_string();
        let body = tokio::task::spawn_blocking(move || {
            ureq::get(&url)
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
        })
        .await
        .ok()??;
        metric_sum(&body, &name)
    }

    /// SIGTERM, then wait (the gateway drains and acknowledges).
    pub(crate) async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Sum of every sample of `name` in a Prometheus text page.
pub(crate) fn metric_sum(page: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// VmRSS of a process, in bytes (Linux).
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// User plus system CPU time of a process so far, in seconds (Linux `/proc/<pid>/stat`).
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it start at 3 (state),
    // so utime (14) and stime (15) are the 12th and 13th after the closing parenthesis.
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: f64 = rest.next()?.parse().ok()?;
    let stime: f64 = rest.next()?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_s())
}

/// The kernel's `USER_HZ` (`getconf CLK_TCK`), 100 where it cannot be asked.
fn clock_ticks_per_s() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t: &f64| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Redis's CPU time so far (`INFO cpu`: `used_cpu_user` + `used_cpu_sys`), in seconds.
pub(crate) async fn redis_cpu_seconds(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .unwrap_or_default();
    ["used_cpu_user", "used_cpu_sys"]
        .iter()
        .filter_map(|name| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .sum()
}

/// Start `trackgate loadgen` with `args` (plus a report file and `--quiet`).
pub(crate) fn spawn_loadgen(args: &[String], report: &Path) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Command::new(exe)
        .arg("loadgen")
        .args(args)
        .arg("--quiet")
        .arg("--report-json")
        .arg(report)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the load generator: {e}"))
}

/// Run the load generator to its end and read its report.
pub(crate) async fn run_loadgen(args: &[String], report: &Path) -> Result<LoadReport, String> {
    let status = spawn_loadgen(args, report)?
        .wait()
        .await
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("loadgen {} failed: {status}", args.join(" ")));
    }
    let text = std::fs::read_to_string(report).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", report.display()))
}

/// `INFO` field `name` (e.g. `used_memory`) as a number.
pub(crate) async fn redis_info(
    conn: &mut redis::aio::MultiplexedConnection,
    name: &str,
) -> Option<f64> {
    let info: String = redis::cmd("INFO").query_async(conn).await.ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_label_sets_and_ignores_longer_names() {
        let page = "# TYPE trackgate_connections_open gauge\n\
                    trackgate_connections_open{listener=\"a\"} 3\n\
                    trackgate_connections_open{listener=\"b\"} 4\n\
                    trackgate_connections_opened_total 99\n";
        assert_eq!(metric_sum(page, "trackgate_connections_open"), Some(7.0));
        assert_eq!(metric_sum(page, "trackgate_missing"), None);
    }

    #[test]
    fn cpu_time_of_this_process_is_read_and_grows() {
        let before = cpu_seconds(std::process::id()).unwrap_or(-1.0);
        assert!(before >= 0.0, "{before}");
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = cpu_seconds(std::process::id()).unwrap_or(0.0);
        assert!(after - before >= 0.05, "{before} → {after}");
    }

    #[test]
    fn rss_of_this_process_is_read() {
        let rss = rss_bytes(std::process::id());
        assert!(rss.is_some_and(|b| b > 1024 * 1024), "{rss:?}");
    }
}
