//! Wiring and lifecycle of `trackgate serve`: bind listeners, start writers, sweeper and
//! HTTP endpoints, and shut down in the order that loses nothing.
//!
//! Shutdown (SIGTERM, Ctrl-C, or [`Gateway::shutdown`]):
//! 1. listeners stop accepting;
//! 2. connections stop reading, wait until what they read is written, send the replies
//!    they owe, and close;
//! 3. the write queues drain and writers exit.
//!
//! All of it within `shutdown_grace_s`; whatever is still unwritten then is abandoned
//! *unacknowledged* (counted and logged), so devices keep it and send it again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trackgate_protocols::{Direction, Framer};

use crate::config::{Config, MAX_TTL_S};
use crate::connection::Shared;
use crate::pseudonym::KeyRing;
use crate::purge::Purger;
use crate::redis_memory::{EvictingPolicy, MemoryStatus, OomWatch, PolicyWatch};
use crate::registry::Registry;
use crate::retention::{self, Retention};
use crate::{api, api_admin, api_v1, auth_limit, listener, metrics, redis_conn, sink};

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] listener::TlsError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis would delete data when full (see [`crate::redis_memory`]).
    #[error(transparent)]
    EvictingPolicy(#[from] EvictingPolicy),
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    /// Bound tracker listener addresses, in configuration order.
    pub tracker_addrs: Vec<SocketAddr>,
    /// Bound metrics/health address.
    pub http_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    done: JoinHandle<()>,
}

impl Gateway {
    /// Bind everything and start serving.
    pub async fn start(config: Config, keys: Arc<KeyRing>) -> Result<Gateway, StartError> {
        let vault = keys.vault().clone();
        let keys_for_checks = keys.clone();
        let prometheus = metrics::install();
        let config = Arc::new(config);
        let conn = redis_conn::connect(&config.redis)?;
        // Before any device is accepted: an evicting Redis would delete what we ACK.
        let policy = Arc::new(PolicyWatch::from(&config.redis));
        policy.at_start(&conn).await?;
        let memory = MemoryStatus {
            oom: Arc::new(OomWatch::from(&config.redis)),
            policy: policy.clone(),
        };
        let abort = CancellationToken::new();
        let writers = sink::start(
            conn.clone(),
            &config.redis,
            sink::Upkeep::from(&config.retention),
            abort.clone(),
            memory.oom.clone(),
        );
        let shutdown = CancellationToken::new();
        let framer = Framer::new(Direction::DeviceToServer, config.limits.max_frame_bytes)
            .with_early_resync(true);
        let retention = Retention::new(&config.retention)
            .with_future_tolerance(&config.storage)
            .with_vault(vault.clone())
            .with_audit(&config.audit);
        let shared = Arc::new(Shared {
            config: config.clone(),
            keys,
            sink: writers.sink.clone(),
            retention: retention.clone(),
            framer,
            shutdown: shutdown.clone(),
            redis: conn.clone(),
            hot: crate::metrics::HotMetrics::new(),
        });
        drop(writers.sink);

        let permits = Arc::new(Semaphore::new(config.limits.max_connections));
        let tracker = TaskTracker::new();
        let mut tracker_addrs = Vec::new();
        let mut accept_loops = Vec::new();
        for l in &config.listeners {
            let tls = l.tls.as_ref().map(listener::tls_acceptor).transpose()?;
            let bound = TcpListener::bind(l.bind)
                .await
                .map_err(|source| StartError::Bind {
                    addr: l.bind,
                    source,
                })?;
            let addr = bound.local_addr().unwrap_or(l.bind);
            tracing::info!(%addr, tls = tls.is_some(), "listening for trackers");
            tracker_addrs.push(addr);
            accept_loops.push(tokio::spawn(listener::run(
                bound,
                tls,
                shared.clone(),
                permits.clone(),
                tracker.clone(),
            )));
        }

        // Tombstones must outlive any write from before a purge that is still queued or
        // retried; a retention period is far beyond that, and bounds their memory.
        let tomb_ttl = Duration::from_secs(config.retention.ttl_s);
        let mut http_addr = None;
        let mut http_task = None;
        if let Some(bind) = config.http.bind {
            let bound = TcpListener::bind(bind)
                .await
                .map_err(|source| StartError::Bind { addr: bind, source })?;
            http_addr = bound.local_addr().ok();
            tracing::info!(addr = ?http_addr, "serving /metrics, /healthz, /readyz");
            // Its own connection: a readiness PING must not queue behind big pipelines.
            let api_conn = redis_conn::connect(&config.redis)?;
            let v1 = api_v1::V1State {
                registry: Registry::new(api_conn.clone(), MAX_TTL_S),
                purger: Purger::new(api_conn.clone(), tomb_ttl)
                    .with_config(&config.purge)
                    .with_vault(vault.clone()),
                keys: shared.keys.clone(),
                audit_conn: api_conn.clone(),
                retention: Retention::new(&config.retention),
                export_chunk_entries: config.http.export_chunk_entries,
                future_tolerance_s: config.storage.future_tolerance_s(),
            };
            let mut authed = api_v1::router(v1.clone());
            if let Some(admin) = &config.http.admin_token_sha256 {
                authed = authed.merge(api_admin::router(v1, admin.to_ascii_lowercase()));
            }
            let limit = auth_limit::AuthLimit::new(
                config.http.auth_failures_per_minute,
                config.http.auth_failure_tracked_ips,
            );
            let authed = authed.layer(axum::middleware::from_fn_with_state(
                limit,
                auth_limit::layer,
            ));
            let app =
                api::router(api_conn, memory, prometheus.clone(), shutdown.clone()).merge(authed);
            let stop = shutdown.clone();
            http_task = Some(tokio::spawn(async move {
                let service = app.into_make_service_with_connect_info::<SocketAddr>();
                let _ = axum::serve(bound, service)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
            }));
        }

        let mut purger = Purger::new(conn.clone(), tomb_ttl)
            .with_config(&config.purge)
            .with_vault(vault.clone());
        if !conn.is_cluster() {
            purger = purger.with_legacy_migration();
        }
        let purge_worker = tokio::spawn(purger.run_worker(
            Duration::from_secs(config.purge.worker_interval_s),
            shutdown.clone(),
        ));
        let policy_checks = tokio::spawn(policy.run(conn.clone(), shutdown.clone()));
        let sweeper = tokio::spawn(retention::run_sweeper(
            conn.clone(),
            retention,
            Duration::from_secs(config.retention.sweep_interval_s),
            hex::encode(rand::random::<[u8; 8]>()),
            shutdown.clone(),
        ));
        let compactor = tokio::spawn(crate::compact::run_compactor(
            conn.clone(),
            crate::compact::Compaction::new(&config.storage, vault.clone()),
            hex::encode(rand::random::<[u8; 8]>()),
            shutdown.clone(),
        ));
        // After purges, the primaries' AOF and RDB are rewritten (`purge.disk_rewrite_*`),
        // checked as often as the purge worker runs.
        let disk_rewrites = (config.purge.disk_rewrite_interval_s > 0).then(|| {
            tokio::spawn(crate::disk::run(
                conn.clone(),
                config.redis.clone(),
                Duration::from_secs(config.purge.disk_rewrite_interval_s),
                Duration::from_secs(config.purge.disk_rewrite_wait_s),
                Duration::from_secs(
                    config
                        .purge
                        .worker_interval_s
                        .min(config.purge.disk_rewrite_interval_s),
                ),
                hex::encode(rand::random::<[u8; 8]>()),
                shutdown.clone(),
            ))
        });
        // Data keys past the longest retention: a gauge, and a warning every hour while
        // the key file still holds any (months end while a gateway runs).
        let key_check = {
            let (keys, keep, stop) = (
                keys_for_checks.clone(),
                config.data_key_keep(),
                shutdown.clone(),
            );
            tokio::spawn(crate::periodic::every(
                Duration::from_secs(3600),
                stop,
                move || {
                    let keys = keys.clone();
                    async move {
                        // This gateway reads its key file at start only: past the last month it
                        // holds, nothing can be sealed (and so nothing is stored).
                        let missing = keys.check_data_months(crate::store::vault::Month::now());
                        ::metrics::gauge!(crate::metrics::DATA_KEYS_MISSING)
                            .set(f64::from(u8::from(missing.is_err())));
                        if let Err(e) = missing {
                            tracing::error!("{e}; then restart this gateway");
                        }
                        let overdue = keys.overdue_months(jiff::Timestamp::now().as_second(), keep);
                        ::metrics::gauge!(crate::metrics::DATA_KEYS_OVERDUE)
                            .set(overdue.len() as f64);
                        if !overdue.is_empty() {
                            let months: Vec<String> =
                                overdue.iter().map(|m| m.to_string()).collect();
                            tracing::warn!(months = %months.join(","), "the key file still holds data keys past the longest retention; destroy them with `trackgate keys prune`");
                        }
                    }
                },
            ))
        };
        let upkeep = prometheus.map(|h| {
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = tick.tick() => h.run_upkeep(),
                        () = stop.cancelled() => return,
                    }
                }
            })
        });

        let grace = Duration::from_secs(config.limits.shutdown_grace_s);
        let stop = shutdown.clone();
        let done = tokio::spawn(async move {
            stop.cancelled().await;
            tracing::info!(
                grace_s = grace.as_secs(),
                "shutting down: finishing received data"
            );
            let deadline = tokio::time::Instant::now() + grace;
            for a in accept_loops {
                let _ = a.await;
            }
            tracker.close();
            if tokio::time::timeout_at(deadline, tracker.wait())
                .await
                .is_err()
            {
                tracing::error!("shutdown grace over with connections still waiting for Redis");
            }
            drop(shared); // last queue senders (with the connections'): writers drain and exit
            let mut writers_left = writers.tasks;
            let drained = tokio::time::timeout_at(deadline, async {
                for w in &mut writers_left {
                    let _ = w.await;
                }
            })
            .await;
            if drained.is_err() {
                tracing::error!(
                    "shutdown grace over with writes pending; abandoning them unacknowledged"
                );
                abort.cancel();
                // Writers notice the abort at their next await; do not wait on Redis for it.
                let settle = tokio::time::Instant::now() + Duration::from_secs(1);
                for mut w in writers_left {
                    if tokio::time::timeout_at(settle, &mut w).await.is_err() {
                        tracing::error!("a writer did not stop; aborting it");
                        w.abort();
                    }
                }
            }
            // Background tasks stop on the shutdown token; never wait past the deadline for
            // them (a sweep of many keys, an HTTP client that never finishes its request).
            let late = deadline.max(tokio::time::Instant::now());
            let mut background = vec![sweeper, purge_worker, compactor, policy_checks];
            background.extend(disk_rewrites);
            background.push(key_check);
            background.extend(http_task);
            background.extend(upkeep);
            for mut t in background {
                if tokio::time::timeout_at(late, &mut t).await.is_err() {
                    t.abort();
                }
            }
            tracing::info!("gateway stopped");
        });

        Ok(Gateway {
            tracker_addrs,
            http_addr,
            shutdown,
            done,
        })
    }

    /// Begin graceful shutdown.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// A token that starts shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Wait until fully stopped (after [`Gateway::shutdown`]).
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Resolve on SIGTERM or Ctrl-C.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
