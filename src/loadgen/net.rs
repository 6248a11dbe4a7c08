//! How simulated devices reach the gateway: which source address, TCP or TLS, and the
//! safety rules around both.
//!
//! * **Loopback only** unless told otherwise: a load generator pointed at someone else's
//!   server by a typo is a denial-of-service tool.
//! * **Source addresses.** One source IP has ~28k ephemeral ports per destination, so
//!   100k connections are spread over several `127.0.0.x` addresses (all of 127/8 is
//!   local on Linux), round-robin by device.
//! * **File descriptors** are raised by [`crate::fd_limit`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Connections one source IP is given at most (ephemeral range 32768–60999 is 28k).
pub const CONNECTIONS_PER_SOURCE_IP: usize = 20_000;

/// Why a run cannot start.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "target {0} is not a loopback address; pass --allow-remote if you really mean to load a remote host"
    )]
    NotLoopback(SocketAddr),
    #[error("source address {0} is not a loopback address")]
    SourceNotLoopback(IpAddr),
    #[error("source address {0} and target {1} are of different IP families")]
    FamilyMismatch(IpAddr, SocketAddr),
    #[error(transparent)]
    FdLimit(#[from] crate::fd_limit::FdLimitError),
    #[error("TLS: {0}")]
    Tls(String),
}

/// Refuse targets off this machine unless `allow_remote`.
pub fn check_targets(targets: &[SocketAddr], allow_remote: bool) -> Result<(), NetError> {
    match targets.iter().find(|t| !t.ip().is_loopback()) {
        Some(t) if !allow_remote => Err(NetError::NotLoopback(*t)),
        _ => Ok(()),
    }
}

/// Source addresses for `devices` connections: the given ones, or enough of
/// 127.0.0.2, 127.0.0.3, … that no address carries more than [`CONNECTIONS_PER_SOURCE_IP`].
/// `None` lets the kernel choose (a single, small IPv4 or any IPv6 run).
pub fn source_addrs(
    given: &[IpAddr],
    devices: usize,
    targets: &[SocketAddr],
) -> Result<Vec<IpAddr>, NetError> {
    if !given.is_empty() {
        for ip in given {
            if !ip.is_loopback() {
                return Err(NetError::SourceNotLoopback(*ip));
            }
            if let Some(t) = targets.iter().find(|t| t.is_ipv4() != ip.is_ipv4()) {
                return Err(NetError::FamilyMismatch(*ip, *t));
            }
        }
        return Ok(given.to_vec());
    }
    let all_v4_loopback = targets.iter().all(|t| t.ip().is_loopback() && t.is_ipv4());
    if devices <= CONNECTIONS_PER_SOURCE_IP || !all_v4_loopback {
        return Ok(Vec::new());
    }
    let n = devices.div_ceil(CONNECTIONS_PER_SOURCE_IP).min(250);
    Ok((0..n)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8)))
        .collect())
}

/// TLS settings of a run: which CA to trust and the name the certificate is for.
#[derive(Clone)]
pub struct TlsClient {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Trust the certificates in the PEM file at `ca_path` (the gateway's own, for a
    /// self-signed test certificate).
    pub fn from_ca_file(ca_path: &std::path::Path, server_name: &str) -> Result<Self, NetError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_path)
            .map_err(|e| NetError::Tls(format!("{}: {e}", ca_path.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| NetError::Tls(format!("{}: {e}", ca_path.display())))?;
        Self::from_certs(certs, server_name)
    }

    pub fn from_certs(
        certs: Vec<CertificateDer<'static>>,
        server_name: &str,
    ) -> Result<Self, NetError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs {
            roots
                .add(c)
                .map_err(|e| NetError::Tls(format!("CA certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| NetError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| NetError::Tls(format!("server name {server_name:?}: {e}")))?;
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

/// Where device `index` connects from and to.
#[derive(Debug, Clone)]
pub struct Route {
    pub targets: Vec<SocketAddr>,
    pub sources: Vec<IpAddr>,
    pub tls: Option<TlsClient>,
}

impl Route {
    pub fn plain(target: SocketAddr) -> Route {
        Route {
            targets: vec![target],
            sources: Vec::new(),
            tls: None,
        }
    }

    /// Open device `index`'s TCP connection (TLS is layered by [`Route::tls_handshake`]).
    pub async fn connect_tcp(&self, index: usize) -> std::io::Result<TcpStream> {
        let target = *self
            .targets
            .get(index % self.targets.len().max(1))
            .ok_or(std::io::ErrorKind::AddrNotAvailable)?;
        let Some(src) = self.sources.get(index % self.sources.len().max(1)) else {
            return TcpStream::connect(target).await;
        };
        let socket = if src.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(*src, 0))?;
        socket.connect(target).await
    }

    pub async fn tls_handshake(
        tls: &TlsClient,
        tcp: TcpStream,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        tls.connector.connect(tls.server_name.clone(), tcp).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    #[test]
    fn remote_targets_need_the_explicit_flag() {
        let local = [addr("127.0.0.1:5000"), addr("[::1]:5000")];
        assert!(check_targets(&local, false).is_ok());
        let remote = [addr("127.0.0.1:5000"), addr("192.0.2.7:5000")];
        assert!(matches!(
            check_targets(&remote, false),
            Err(NetError::NotLoopback(a)) if a == remote[1]
        ));
        assert!(check_targets(&remote, true).is_ok());
    }

    #[test]
    fn large_runs_spread_over_enough_loopback_sources() {
        let t = [addr("127.0.0.1:5000")];
        assert!(source_addrs(&[], 10_000, &t).unwrap_or_default().is_empty());
        let s = source_addrs(&[], 100_000, &t).unwrap_or_default();
        assert_eq!(s.len(), 5);
        assert!(s.iter().all(|ip| ip.is_loopback()));
        assert_eq!(s[0], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        let given = [IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))];
        assert!(matches!(
            source_addrs(&given, 10, &t),
            Err(NetError::SourceNotLoopback(_))
        ));
    }
}
