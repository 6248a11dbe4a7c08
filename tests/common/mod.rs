//! Test harness: a real `redis-server` on a free port in a temp dir, an in-process
//! gateway pointed at it, and a fake tracker that speaks the protocol.
//!
//! Never touches a Redis on 6379; every server is started and stopped by the test.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use redis::AsyncCommands;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use trackgate::config::{Config, ListenerConfig};
use trackgate::gateway::Gateway;
use trackgate::pseudonym::{Imei, KeyRing, Pseudonym};
use trackgate_protocols::encode::{self, aaa_payload, ccc_payload, cce_payload};
use trackgate_protocols::{Cell, Direction, Fix};

pub mod fleet;
pub mod gwproc;
pub mod redis_scan;
pub mod results;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A redis-server child process owned by the test.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Extra `redis-server` arguments (after the defaults, so they win).
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Start with extra arguments, e.g. AOF: `["--appendonly", "yes", "--appendfsync",
    /// "always"]` (then [`RedisServer::restart`] keeps the data).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let mut r = RedisServer::unstarted(free_port());
        r.extra = extra.iter().map(|s| s.to_string()).collect();
        r.spawn();
        r
    }

    /// A server object for `port` that is not running yet ([`RedisServer::restart`]
    /// starts it): for "Redis unreachable at start-up".
    pub fn unstarted(port: u16) -> RedisServer {
        RedisServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            extra: Vec::new(),
        }
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", "redis.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = redis::Client::open(self.url()).and_then(|c| c.get_connection()) {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Freeze the server (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self) {
        signal(self.pid(), "-STOP");
    }

    pub fn thaw(&self) {
        signal(self.pid(), "-CONT");
    }

    /// Kill (SIGKILL) and start again on the same port. Data is gone unless the server
    /// was started with persistence (e.g. AOF via [`RedisServer::start_with`]).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGKILL, no restart.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            signal(c.id(), "-CONT");
        }
        self.kill();
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid}");
}

/// A configuration for tests: one plain listener on a free port, metrics on a free port,
/// short timeouts.
pub fn test_config(redis: &RedisServer) -> Config {
    let mut c = Config {
        listeners: vec![ListenerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            tls: None,
        }],
        ..Config::default()
    };
    c.redis.url = redis.url();
    c.redis.response_timeout_ms = 500;
    c.redis.connect_timeout_ms = 500;
    c.redis.retry_backoff_initial_ms = 20;
    c.redis.retry_backoff_max_ms = 200;
    c.http.bind = Some("127.0.0.1:0".parse().unwrap());
    c.keys.key_file = PathBuf::from("unused-in-tests");
    c.limits.shutdown_grace_s = 10;
    c
}

/// Start a gateway with a throwaway key ring.
pub async fn start_gateway(config: Config) -> (Gateway, Arc<KeyRing>) {
    config.validate().expect("valid test config");
    let keys = Arc::new(KeyRing::ephemeral());
    let gw = Gateway::start(config, keys.clone())
        .await
        .expect("gateway starts");
    (gw, keys)
}

/// A fake IMEI, distinct per `n`.
pub fn imei(n: u32) -> String {
    format!("35000000{n:07}")
}

pub fn pseudonym(keys: &KeyRing, imei: &str) -> Pseudonym {
    keys.pseudonym(&Imei::new(imei).unwrap())
}

/// A plausible fix at `time`.
pub fn fix_at(time: Timestamp, i: i32) -> Fix<'static> {
    Fix {
        event: Some(35),
        time: Some(time),
        valid: Some(true),
        lat_e6: Some(48_137_154 + i),
        lon_e6: Some(11_576_124 - i),
        speed_kmh_x10: Some(420),
        course_deg: Some(90),
        altitude_m: Some(519),
        satellites: Some(9),
        hdop_x10: Some(9),
        gsm_signal: Some(20),
        mileage_m: Some(1000 + i as u64),
        runtime_s: Some(5000),
        cell: Some(Cell {
            mcc: 262,
            mnc: 1,
            lac: 0x1234,
            cell_id: 0x5678,
        }),
        inputs: Some(1),
        outputs: Some(0),
        ..Fix::default()
    }
}

/// Whole seconds (the wire formats carry no sub-second part).
pub fn now_s() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap()
}

fn frame(imei: &str, cmd: &[u8; 3], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode::frame(
        Direction::DeviceToServer,
        b'A',
        imei,
        cmd,
        payload,
        &mut out,
    )
    .unwrap();
    out
}

pub fn aaa_frame(imei: &str, fix: &Fix<'_>) -> Vec<u8> {
    let mut p = Vec::new();
    aaa_payload(fix, &mut p).unwrap();
    frame(imei, b"AAA", &p)
}

pub fn cce_frame(imei: &str, fixes: &[Fix<'_>]) -> Vec<u8> {
    let mut p = Vec::new();
    cce_payload(fixes, 0, &mut p).unwrap();
    frame(imei, b"CCE", &p)
}

pub fn ccc_frame(imei: &str, fixes: &[Fix<'_>]) -> Vec<u8> {
    let mut p = Vec::new();
    ccc_payload(fixes, 0, &mut p).unwrap();
    frame(imei, b"CCC", &p)
}

/// A fake tracker connection.
pub struct Tracker<S> {
    pub stream: S,
    buf: Vec<u8>,
}

impl Tracker<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> Tracker<TcpStream> {
        Tracker::new(TcpStream::connect(addr).await.unwrap())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Tracker<S> {
    pub fn new(stream: S) -> Self {
        Tracker {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next `@@…\r\n` reply, or `None` if none arrives within `wait` (or EOF).
    pub async fn reply(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            let mut chunk = [0u8; 512];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// True if the gateway closed the connection within `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let mut chunk = [0u8; 512];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return false,
            }
        }
    }
}

/// Entries in a device's stream.
pub async fn stream_len(conn: &mut redis::aio::MultiplexedConnection, p: &Pseudonym) -> usize {
    conn.xlen(trackgate::storage::fixes_key(p)).await.unwrap()
}

/// Wait until `f` holds (polling), or panic after `wait`.
pub async fn eventually<F, Fut>(wait: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}
