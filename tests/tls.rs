//! TLS listener: TLS 1.2+ only, ACK over TLS, a stalled handshake is cut off.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::ServerName;
use trackgate::config::{ListenerConfig, TlsConfig};

fn client(
    cert_der: rustls::pki_types::CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_acknowledged_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();

    let redis = RedisServer::start();
    let mut config = test_config(&redis);
    config.limits.handshake_timeout_s = 1;
    config.listeners.push(ListenerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        tls: Some(TlsConfig {
            cert_path,
            key_path,
        }),
    });
    let (gw, keys) = start_gateway(config).await;
    let tls_addr = gw.tracker_addrs[1];
    let der = certified.cert.der().clone();

    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
        let stream = client(der.clone(), versions)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake");
        let mut t = Tracker::new(stream);
        let id = imei(60);
        t.send(&cce_frame(&id, &[fix_at(now_s(), 0), fix_at(now_s(), 1)]))
            .await;
        let reply = t
            .reply(Duration::from_secs(10))
            .await
            .expect("confirmation over TLS");
        assert!(reply.contains(",CCE,2*"), "{reply}");
    }
    let mut conn = redis.conn().await;
    assert_eq!(stream_len(&mut conn, &pseudonym(&keys, &imei(60))).await, 4);

    // Plain text on the TLS port is refused at once (not left to the timeout) and never
    // stored.
    let mut plain = Tracker::connect(tls_addr).await;
    plain
        .send(&cce_frame(&imei(61), &[fix_at(now_s(), 0)]))
        .await;
    let started = std::time::Instant::now();
    assert!(plain.closed_within(Duration::from_secs(5)).await);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "refused before the handshake timeout"
    );
    assert_eq!(stream_len(&mut conn, &pseudonym(&keys, &imei(61))).await, 0);

    // A client that opens TCP and never starts the handshake is closed.
    let mut stalled = Tracker::connect(tls_addr).await;
    assert!(stalled.closed_within(Duration::from_secs(5)).await);
    gw.shutdown();
    gw.wait().await;
}
