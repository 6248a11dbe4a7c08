//! The gateway as a separate process (`trackgate serve --config FILE`), for faults that
//! need a real process (kill -9) and for memory measurements (RSS from /proc).
//!
//! The process is killed on Drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trackgate::pseudonym::KeyRing;

use super::free_port;

pub struct GatewayProcess {
    child: Option<Child>,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    pub tracker: SocketAddr,
    pub http: SocketAddr,
    pub keys: KeyRing,
    starts: u32,
}

/// Options for the generated configuration (TOML fragments appended per section).
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    pub redis_url: String,
    /// The `[limits]` lines (defaults: short timeouts for tests).
    pub limits: String,
    /// Extra lines for `[redis]`.
    pub redis: String,
    /// The `[storage]` lines (default: none, the defaults).
    pub storage: String,
}

impl GatewayOptions {
    pub fn new(redis_url: &str) -> Self {
        GatewayOptions {
            redis_url: redis_url.to_owned(),
            limits: "handshake_timeout_s = 10\nidle_timeout_s = 60\nshutdown_grace_s = 5\n".into(),
            redis: String::new(),
            storage: String::new(),
        }
    }
}

impl GatewayProcess {
    /// Write a key file and a config, start `trackgate serve`, wait until `/healthz`.
    pub async fn start(opts: GatewayOptions) -> GatewayProcess {
        let mut g = Self::prepare(opts);
        g.spawn().await;
        g
    }

    /// Start `trackgate serve` where it must refuse to start: its exit status and log.
    /// Panics if it is still running after `wait`.
    pub async fn start_refused(opts: GatewayOptions, wait: Duration) -> (ExitStatus, String) {
        let mut g = Self::prepare(opts);
        g.launch();
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = g.child.as_mut().unwrap().try_wait().unwrap() {
                g.child = None;
                return (status, g.log());
            }
            assert!(
                Instant::now() < deadline,
                "gateway still running after {wait:?}; log: {}",
                g.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Write a key file and a config; start nothing.
    fn prepare(opts: GatewayOptions) -> GatewayProcess {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("keys.toml");
        let out = Command::new(env!("CARGO_BIN_EXE_trackgate"))
            .args(["keys", "generate"])
            .arg(&key_file)
            .output()
            .unwrap();
        assert!(out.status.success(), "keys generate: {out:?}");
        let keys = KeyRing::load(&key_file).unwrap();
        let tracker: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = format!(
            r#"[[listeners]]
bind = "{tracker}"

[limits]
{limits}
[redis]
url = "{url}"
response_timeout_ms = 500
connect_timeout_ms = 500
retry_backoff_initial_ms = 20
retry_backoff_max_ms = 200
{redis}
[keys]
key_file = "{key_file}"

[http]
bind = "{http}"

[storage]
{storage}
"#,
            limits = opts.limits,
            url = opts.redis_url,
            redis = opts.redis,
            storage = opts.storage,
            key_file = key_file.display(),
        );
        let config_path = dir.path().join("trackgate.toml");
        std::fs::write(&config_path, config).unwrap();
        GatewayProcess {
            child: None,
            dir,
            config_path,
            tracker,
            http,
            keys,
            starts: 0,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Start the process (its log in `gateway-<n>.log`); do not wait for it.
    fn launch(&mut self) {
        self.starts += 1;
        let log =
            std::fs::File::create(self.dir.path().join(format!("gateway-{}.log", self.starts)))
                .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_trackgate"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// [`Self::launch`], then wait until `/healthz` answers.
    async fn spawn(&mut self) {
        self.launch();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((200, _)) = http_get(self.http, "/healthz").await {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("gateway exited at start-up: {status}; log: {}", self.log());
            }
            assert!(Instant::now() < deadline, "gateway did not come up");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Everything the gateway processes logged so far (all starts).
    pub fn log(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.starts {
            let p = self.dir.path().join(format!("gateway-{i}.log"));
            out.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
        out
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL: no shutdown, no drain, no last ACK.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again with the same configuration, ports and keys.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// SIGTERM and wait for a clean exit (bounded).
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        super::signal(c.id(), "-TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Resident set size in KiB (Linux /proc).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http, path).await
    }

    /// The value of one metric series (`name{labels}` exactly as rendered), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.get("/metrics").await.unwrap_or((0, String::new()));
        metric_value(&body, series)
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Sum of a metric over the series whose rendering starts with `series` (a name, or a
/// name with some labels: `name{a="b"`).
pub fn metric_value(body: &str, series: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.bytes().next())
                .is_some_and(|b| matches!(b, b' ' | b'{' | b',' | b'}'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A bare HTTP/1.1 GET: (status, body), or `None` if nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http(addr, "GET", path, &[], None).await
}

/// A bare HTTP/1.1 request (JSON body if any): (status, body; chunked bodies decoded),
/// or `None` if nothing answers within 5 s.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&serde_json::Value>,
) -> Option<(u16, String)> {
    http_full(addr, method, path, headers, body)
        .await
        .map(|(status, _, body)| (status, body))
}

/// [`http`], also returning the response head (status line and headers).
pub async fn http_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&serde_json::Value>,
) -> Option<(u16, String, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status: u16 = text.get(9..12)?.parse().ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        Some((status, head.to_owned(), body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

/// Undo HTTP/1.1 chunked transfer encoding.
pub fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n + 2 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}
