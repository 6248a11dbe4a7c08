//! A `redis-server` child process on a free loopback port in a temp dir, killed on drop.
//! Used by `trackgate demo` and the benchmarks (tests have their own synchronous twin).

use std::net::TcpListener as StdListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A redis-server child killed on drop.
#[derive(Debug)]
pub struct RedisChild {
    child: tokio::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisChild {
    /// Start it and wait until it answers PING.
    pub async fn start() -> Result<RedisChild, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--logfile", "redis.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    "redis-server not found on PATH. Install it: `sudo apt-get install redis-server` \
                     (Debian/Ubuntu), `sudo dnf install redis` (Fedora) or `brew install redis` (macOS)"
                        .to_string()
                } else {
                    format!("cannot start redis-server: {e}")
                }
            })?;
        let r = RedisChild {
            child,
            port,
            _dir: dir,
        };
        let client = redis::Client::open(r.url()).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return Ok(r);
                }
            }
            if Instant::now() > deadline {
                return Err("redis-server did not come up within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
