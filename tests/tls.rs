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

    for (k, versions) in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ]
    .into_iter()
    .enumerate()
    {
        let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
        let stream = client(der.clone(), versions)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake");
        let mut t = Tracker::new(stream);
        let id = imei(60);
        // Other fixes each time: the same fix sent twice is stored once.
        let i = 2 * k as i32;
        t.send(&cce_frame(
            &id,
            &[fix_at(now_s(), i), fix_at(now_s(), i + 1)],
        ))
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

/// A TLS gateway with a throwaway certificate; handshake timeout 2 s.
async fn tls_gateway() -> (
    RedisServer,
    trackgate::gateway::Gateway,
    std::net::SocketAddr,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let redis = RedisServer::start();
    let mut config = test_config(&redis);
    config.limits.handshake_timeout_s = 2;
    config.listeners = vec![ListenerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        tls: Some(TlsConfig {
            cert_path,
            key_path,
        }),
    }];
    let (gw, _keys) = start_gateway(config).await;
    let addr = gw.tracker_addrs[0];
    (redis, gw, addr, dir)
}

/// A minimal ClientHello whose highest version is `version` (0x0301 = TLS 1.0, 0x0302 =
/// TLS 1.1): no `supported_versions` extension, RSA and ECDHE-RSA CBC suites, as an old
/// client sends it.
fn legacy_client_hello(version: u16) -> Vec<u8> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&version.to_be_bytes());
    hello.extend_from_slice(&[0x5a; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x06, 0xc0, 0x13, 0x00, 0x2f, 0x00, 0x35]);
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// Everything the server sends until it closes (bounded).
async fn server_bytes(stream: &mut tokio::net::TcpStream, wait: Duration) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
            Err(_) => return (out, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_0_and_1_1_clients_are_refused() {
    use tokio::io::AsyncWriteExt;
    let (_redis, gw, addr, _dir) = tls_gateway().await;
    for (name, version) in [("TLS 1.0", 0x0301u16), ("TLS 1.1", 0x0302)] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&legacy_client_hello(version)).await.unwrap();
        let (reply, closed) = server_bytes(&mut s, Duration::from_secs(5)).await;
        assert!(closed, "{name}: connection closed");
        // The only answer is an alert record (content type 21): never a ServerHello
        // (a handshake record, type 22).
        assert!(!reply.is_empty(), "{name}: an alert, not silence");
        assert_eq!(reply[0], 0x15, "{name}: alert record, got {reply:02x?}");
        assert!(
            reply.len() >= 7 && reply[5] == 2 && [70, 40].contains(&reply[6]),
            "{name}: fatal protocol_version/handshake_failure alert: {reply:02x?}"
        );
    }
    // A real TLS client pinned to 1.0/1.1, where the local OpenSSL still offers them.
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok()
    {
        for flag in ["-tls1", "-tls1_1"] {
            let out = tokio::process::Command::new("openssl")
                .args(["s_client", "-connect", &addr.to_string(), flag])
                .args(["-cipher", "DEFAULT@SECLEVEL=0", "-servername", "localhost"])
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(!out.status.success(), "openssl {flag} connected: {stdout}");
            assert!(
                !stdout.contains("BEGIN CERTIFICATE") && !stdout.contains("Cipher is ECDHE"),
                "openssl {flag} got a session: {stdout}"
            );
        }
    }
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_garbage_is_dropped_and_a_stalled_handshake_times_out() {
    use tokio::io::AsyncWriteExt;
    let (_redis, gw, addr, _dir) = tls_gateway().await;
    // Garbage that is not a TLS record: refused at once.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    s.write_all(&[0x42; 300]).await.unwrap();
    let (_, closed) = server_bytes(&mut s, Duration::from_secs(5)).await;
    assert!(closed);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "not left to the timeout"
    );
    // A record header announcing a big ClientHello, then a trickle of garbage: the
    // handshake never completes and is cut off at the handshake timeout (2 s).
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    s.write_all(&[0x16, 0x03, 0x01, 0x3f, 0xff, 0x01, 0x00, 0x3f])
        .await
        .unwrap();
    let trickle = async {
        for _ in 0..10 {
            if s.write_all(&[0x42; 16]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    trickle.await;
    let (_, closed) = server_bytes(&mut s, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(closed, "closed at the handshake timeout");
    assert!(
        (Duration::from_millis(1800)..Duration::from_secs(6)).contains(&waited),
        "{waited:?}"
    );
    gw.shutdown();
    gw.wait().await;
}
