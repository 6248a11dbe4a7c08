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

/// A port nobody listens on right now, and never one handed out before in this test
/// process: the OS may give a port just released again, and two "free" ports of one
/// set-up (a gateway's tracker and HTTP ports) then collided now and then.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
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
        Self::start_with(&[])
    }

    /// A server with extra `redis-server` arguments, e.g. AOF: `["--appendonly", "yes",
    /// "--appendfsync", "always"]` (then [`RedisServer::restart`] keeps the data).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let mut r = RedisServer::unstarted(free_port());
        r.extra = extra.iter().map(|a| a.to_string()).collect();
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

    /// A replica of `primary`, waiting until its replication link is up.
    pub fn start_replica_of(primary: &RedisServer) -> RedisServer {
        let r = Self::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut c = r.client().get_connection().unwrap();
        loop {
            let info: String = redis::cmd("INFO").arg("replication").query(&mut c).unwrap();
            if info.contains("master_link_status:up") {
                return r;
            }
            assert!(Instant::now() < deadline, "replica did not sync");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", "redis.log"])
            .args(&self.extra)
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
            resume(c.id());
        }
        self.kill();
    }
}

/// SIGCONT for a process a test may have frozen, before it is killed. Never fails: the
/// process may have exited already (a node that could not bind its port), and a panic in
/// a drop during a panic aborts the whole test binary.
fn resume(pid: u32) {
    let _ = Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
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
    let mut c = base_test_config();
    c.redis.url = redis.url();
    c.redis.response_timeout_ms = 500;
    c.redis.connect_timeout_ms = 500;
    c
}

/// What every test configuration shares, whatever the Redis backend.
fn base_test_config() -> Config {
    let mut c = Config {
        listeners: vec![ListenerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            tls: None,
        }],
        ..Config::default()
    };
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

/// Wait until fixes read now are received after a purge's cutoff (Unix ms) and the
/// `purge.clock_skew_margin_ms` the purge applied: until then its tombstone refuses them.
pub async fn past_purge_margin(cutoff_ms: i64, margin_ms: u64) {
    let wait_ms = cutoff_ms + margin_ms as i64 + 50 - Timestamp::now().as_millisecond();
    tokio::time::sleep(Duration::from_millis(wait_ms.max(0) as u64)).await;
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

    /// Send where the gateway may already have closed the connection (the write may fail).
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
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
pub async fn stream_len<C: redis::aio::ConnectionLike + Send + Sync>(
    conn: &mut C,
    p: &Pseudonym,
) -> usize {
    conn.xlen(trackgate::store::fixes_key(p)).await.unwrap()
}

/// Redis writers on their own connection, as the gateway starts them (default upkeep
/// interval, 60 s).
pub fn start_writers(cfg: &trackgate::config::RedisConfig) -> trackgate::sink::Writers {
    trackgate::sink::start(
        trackgate::redis_conn::connect(cfg).unwrap(),
        cfg,
        trackgate::sink::Upkeep::from(&trackgate::config::RetentionConfig::default()),
        tokio_util::sync::CancellationToken::new(),
        Arc::new(trackgate::redis_memory::OomWatch::from(cfg)),
    )
}

/// The mileage values (the tests' per-fix marker) stored in a device's stream, in stream
/// order: sealed payloads are opened with `vault` (writers driven directly by a test
/// store clear ones).
pub async fn stored_mileages<C: redis::aio::ConnectionLike + Send + Sync>(
    conn: &mut C,
    vault: &trackgate::store::vault::Vault,
    p: &Pseudonym,
) -> Vec<i64> {
    use trackgate::store::{PACKED_FIELDS, tail};
    let mileage = PACKED_FIELDS
        .iter()
        .position(|(n, _)| *n == "mileage_m")
        .unwrap();
    tail::range(conn, p, "-", "+", 1_000_000)
        .await
        .unwrap()
        .iter()
        .filter_map(|e| tail::row_of(e, vault, p, i64::MAX, "test").ok())
        .filter_map(|r| r.values[mileage])
        .collect()
}

/// Wait (at most `wait`) until `p`'s live tail holds `n` entries.
pub async fn wait_tail_len(
    conn: &trackgate::redis_conn::RedisConn,
    p: &Pseudonym,
    n: u64,
    wait: Duration,
    what: &str,
) {
    let key = trackgate::store::fixes_key(p);
    eventually(wait, what, || {
        let mut conn = conn.clone();
        let key = key.clone();
        async move { conn.xlen::<_, u64>(&key).await.unwrap() == n }
    })
    .await;
}

/// `CONFIG SET name value` (e.g. `maxmemory`, `maxmemory-policy`) on a running server.
pub async fn config_set<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    name: &str,
    value: &str,
) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query_async(conn)
        .await
        .unwrap();
}

/// A numeric field of `INFO <section>` (e.g. `memory`, `used_memory`).
pub async fn info_u64<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    section: &str,
    field: &str,
) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO {section}"))
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

// ---------------------------------------------------------------------------------------
// Redis Cluster: 3 primaries + 3 replicas on free ports in a temp dir.

/// A port that is free, below 55536 (the cluster bus uses port + 10000), whose bus port
/// is free too, and that this test process has not handed out before (parallel tests
/// each start clusters).
fn free_cluster_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let p = free_port();
        if p < 55_000 && StdListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            let mut given = GIVEN.lock().unwrap();
            if !given.contains(&p) {
                given.push(p);
                return p;
            }
        }
    }
}

/// One cluster node process.
pub struct ClusterNode {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl ClusterNode {
    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            // Fast failover in tests: a dead primary is noticed after 1 s.
            .args(["--cluster-node-timeout", "1000"])
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--cluster-require-full-coverage", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)");
        self.child = Some(child);
    }

    /// Wait until this node answers, and it is our process answering: if the port was
    /// taken meanwhile (another test, another program), start again on another port.
    fn wait_started(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "cluster node did not start");
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                self.kill();
                self.port = free_cluster_port();
                self.spawn();
                continue;
            }
            let pid = self.child.as_ref().map(Child::id);
            let ours = self.sync_conn().is_some_and(|mut c| {
                redis::cmd("INFO")
                    .arg("server")
                    .query::<String>(&mut c)
                    .is_ok_and(|i| {
                        pid.is_some_and(|pid| i.contains(&format!("process_id:{pid}\r\n")))
                    })
            });
            if ours {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn sync_conn(&self) -> Option<redis::Connection> {
        redis::Client::open(self.url())
            .ok()?
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()
    }

    /// Start the killed node again from its `nodes.conf`: it rejoins the cluster (as a
    /// replica of whoever took over its slots).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Freeze the node (SIGSTOP): its connections stay open, nothing answers.
    pub fn freeze(&self) {
        if let Some(c) = &self.child {
            signal(c.id(), "-STOP");
        }
    }

    pub fn thaw(&self) {
        if let Some(c) = &self.child {
            signal(c.id(), "-CONT");
        }
    }

    /// Kill the process (SIGKILL: no goodbye to the cluster).
    pub fn kill(&mut self) {
        if let Some(c) = &self.child {
            resume(c.id());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A local Redis Cluster owned by the test; killed on drop.
pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Start 3 primaries + 3 replicas and wait until every node reports `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..6 {
            let d = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let mut n = ClusterNode {
                port: free_cluster_port(),
                dir: d,
                child: None,
            };
            n.spawn();
            nodes.push(n);
        }
        let mut cluster = RedisCluster { nodes, _dir: dir };
        for n in &mut cluster.nodes {
            n.wait_started();
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli on PATH");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok(Duration::from_secs(20));
        cluster
    }

    /// Wait until every live node says `cluster_state:ok` and every live replica's link
    /// to its primary is up.
    pub fn wait_ok(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let ok = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                n.sync_conn().is_some_and(|mut c| {
                    let cluster_ok = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query::<String>(&mut c)
                        .is_ok_and(|i| i.contains("cluster_state:ok"));
                    // A replica counts once its link to the primary is up (WAIT needs it).
                    let replication_ok = redis::cmd("INFO")
                        .arg("replication")
                        .query::<String>(&mut c)
                        .is_ok_and(|i| {
                            i.contains("role:master") || i.contains("master_link_status:up")
                        });
                    cluster_ok && replication_ok
                })
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn seed_urls(&self) -> Vec<String> {
        self.nodes.iter().map(ClusterNode::url).collect()
    }

    /// The port of the primary serving `key`'s slot, asked from a live node.
    pub fn primary_of(&self, key: &str) -> u16 {
        let mut c = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .find_map(ClusterNode::sync_conn)
            .expect("a live node");
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)
            .unwrap();
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut c).unwrap();
        for r in slots {
            let redis::Value::Array(parts) = r else {
                continue;
            };
            let (Some(redis::Value::Int(a)), Some(redis::Value::Int(b))) =
                (parts.first(), parts.get(1))
            else {
                continue;
            };
            if (*a..=*b).contains(&slot) {
                if let Some(redis::Value::Array(m)) = parts.get(2) {
                    if let Some(redis::Value::Int(p)) = m.get(1) {
                        return *p as u16;
                    }
                }
            }
        }
        panic!("no primary for slot {slot}");
    }

    /// The port of a live replica of the primary on `primary`.
    pub fn replica_of(&self, primary: u16) -> u16 {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some() && n.port != primary)
            .find(|n| {
                n.sync_conn().is_some_and(|mut c| {
                    redis::cmd("INFO")
                        .arg("replication")
                        .query::<String>(&mut c)
                        .is_ok_and(|i| {
                            i.contains("role:slave")
                                && i.contains(&format!("master_port:{primary}\r\n"))
                        })
                })
            })
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no replica of {primary}"))
    }

    pub fn node_mut(&mut self, port: u16) -> &mut ClusterNode {
        let ports: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}; nodes: {ports:?}"))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

/// Either backend, so one test body runs against both.
pub enum Backend {
    Standalone(RedisServer),
    Cluster(RedisCluster),
}

impl Backend {
    /// What the backend-neutral tests of a suite run on: a standalone server, or the 3+3
    /// cluster when `TRACKGATE_TEST_BACKEND=cluster` (CI runs those suites both ways).
    pub fn from_env() -> Backend {
        if cluster_pass() {
            Backend::cluster()
        } else {
            Backend::standalone()
        }
    }

    pub fn standalone() -> Backend {
        Backend::Standalone(RedisServer::start())
    }

    pub fn cluster() -> Backend {
        Backend::Cluster(RedisCluster::start())
    }

    /// `test_config`, pointed at this backend.
    pub fn config(&self) -> Config {
        match self {
            Backend::Standalone(r) => test_config(r),
            Backend::Cluster(c) => {
                let mut cfg = base_test_config();
                cfg.redis.mode = trackgate::config::RedisMode::Cluster;
                cfg.redis.cluster_nodes = c.seed_urls();
                cfg.redis.response_timeout_ms = 1500;
                cfg.redis.connect_timeout_ms = 1000;
                cfg
            }
        }
    }

    /// A connection of the gateway's own kind (cluster-aware in cluster mode).
    pub fn conn(&self) -> trackgate::redis_conn::RedisConn {
        trackgate::redis_conn::connect(&self.config().redis).unwrap()
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Standalone(_) => "standalone",
            Backend::Cluster(_) => "cluster",
        }
    }
}

/// This run is the cluster pass of the suites (`TRACKGATE_TEST_BACKEND=cluster`).
pub fn cluster_pass() -> bool {
    std::env::var("TRACKGATE_TEST_BACKEND").is_ok_and(|v| v == "cluster")
}

/// For tests that stop, freeze or restart a single Redis process: they run in the
/// standalone pass only (the cluster's own fault tests are in `tests/cluster.rs`).
pub fn standalone_only(test: &str) -> bool {
    if cluster_pass() {
        eprintln!("{test}: stops a single Redis process; runs in the standalone pass only");
        return false;
    }
    true
}

/// The NDJSON export of `q` (a whole device, as `trackgate::export::stream` writes it), one
/// string per line.
pub async fn export_lines(
    conn: &trackgate::redis_conn::RedisConn,
    q: trackgate::export::ExportQuery,
) -> Vec<String> {
    use futures::StreamExt;
    let mut body = Vec::new();
    let mut s = std::pin::pin!(trackgate::export::stream(conn.clone(), q));
    while let Some(part) = s.next().await {
        body.extend_from_slice(&part.unwrap());
    }
    String::from_utf8(body)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}
