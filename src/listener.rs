//! Accept loops: one per configured listener, plain TCP or TLS.
//!
//! The connection cap is a semaphore shared by all listeners. A permit is taken before each
//! accept; when none is left the new socket is accepted and closed at once (counted as
//! rejected), so a device at the cap backs off and retries instead of hanging unserved in
//! the kernel's backlog, and the devices already connected keep being served. Accept
//! errors (e.g. out of file descriptors) pause the loop with capped exponential backoff
//! instead of spinning.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::config::TlsConfig;
use crate::connection::{self, Shared};
use crate::metrics as m;

/// TLS setup problems.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {detail}")]
    Pem { path: String, detail: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS acceptor for TLS 1.2 and 1.3 only, from PEM files.
pub fn tls_acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let pem_err = |p: &Path, e: &dyn std::fmt::Display| TlsError::Pem {
        path: p.display().to_string(),
        detail: e.to_string(),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_path)
        .map_err(|e| pem_err(&config.cert_path, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(&config.cert_path, &e))?;
    if certs.is_empty() {
        return Err(pem_err(&config.cert_path, &"no certificate in file"));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key_path)
        .map_err(|e| pem_err(&config.key_path, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// Accept on `listener` until shutdown, serving each connection on `tracker`.
pub async fn run(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
) {
    let label = if tls.is_some() { "tls" } else { "tcp" };
    let backoff_max = Duration::from_millis(shared.config.limits.accept_backoff_max_ms);
    let backoff_min = Duration::from_millis(5).min(backoff_max);
    let mut backoff = backoff_min;
    loop {
        let permit = permits.clone().try_acquire_owned().ok();
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shared.shutdown.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff = backoff_min;
                a
            }
            Err(e) => {
                metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "accept_error").increment(1);
                tracing::warn!(listener = label, error = %e, pause_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(backoff_max);
                continue;
            }
        };
        // Slots may have been freed while this loop waited in accept.
        let permit = permit.or_else(|| permits.clone().try_acquire_owned().ok());
        let Some(permit) = permit else {
            metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "max_connections").increment(1);
            tracing::debug!(listener = label, %peer, "connection cap reached; closing new connection");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        metrics::counter!(m::CONNECTIONS_ACCEPTED, "listener" => label).increment(1);
        let shared = shared.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let _permit = permit;
            metrics::gauge!(m::CONNECTIONS_OPEN).increment(1.0);
            let deadline = Instant::now() + shared.config.handshake_timeout();
            match tls {
                None => connection::serve(tcp, peer, shared, deadline).await,
                Some(acceptor) => {
                    let hs = tokio::time::timeout_at(deadline.into(), acceptor.accept(tcp)).await;
                    match hs {
                        Ok(Ok(stream)) => connection::serve(stream, peer, shared, deadline).await,
                        Ok(Err(e)) => {
                            metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "tls_handshake").increment(1);
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "handshake_timeout").increment(1);
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                }
            }
            metrics::gauge!(m::CONNECTIONS_OPEN).decrement(1.0);
        });
    }
}

/// Local address of a bound listener, for logs and tests.
pub fn local_addr(l: &TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}
