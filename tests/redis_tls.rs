//! TLS to Redis (`rediss://`): location data crosses the network to Redis encrypted, to a
//! server certificate issued by a private CA (`redis.tls_ca_path`) and, where the server
//! asks for one, with a client certificate. A gateway that cannot verify the server (or
//! is refused for want of a certificate) writes nothing and so acknowledges nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A private CA, a server certificate for localhost and a client certificate, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "trackgate test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        for (name, sans) in [
            ("server", vec!["localhost".to_string()]),
            ("client", vec!["trackgate".to_string()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A redis-server with a TLS port that requires client certificates from the CA
    /// (and its plain port for the test's own reads).
    fn redis(&self, tls_port: u16) -> RedisServer {
        let file = |f: &str| self.path(f).display().to_string();
        RedisServer::start_with(&[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &file("server.pem"),
            "--tls-key-file",
            &file("server.key"),
            "--tls-ca-cert-file",
            &file("ca.pem"),
            "--tls-auth-clients",
            "yes",
        ])
    }
}

/// Send one two-fix batch; whether the device got its confirmation.
async fn batch_confirmed(gw: &trackgate::gateway::Gateway, id: &str, wait: Duration) -> bool {
    let mut t = Tracker::connect(gw.tracker_addrs[0]).await;
    t.send(&ccc_frame(id, &[fix_at(now_s(), 0), fix_at(now_s(), 1)]))
        .await;
    t.reply(wait).await.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixes_are_written_over_tls_with_a_private_ca_and_a_client_certificate() {
    let pki = Pki::new();
    let tls_port = free_port();
    let redis = pki.redis(tls_port);
    let mut config = test_config(&redis);
    // The TLS port: a plain RESP client is not answered there, so what gets stored
    // went over TLS.
    config.redis.url = format!("rediss://localhost:{tls_port}");
    config.redis.tls_ca_path = Some(pki.path("ca.pem"));
    config.redis.tls_client_cert_path = Some(pki.path("client.pem"));
    config.redis.tls_client_key_path = Some(pki.path("client.key"));
    let (gw, keys) = start_gateway(config).await;
    let id = imei(301);
    assert!(batch_confirmed(&gw, &id, Duration::from_secs(10)).await);
    let mut conn = redis.conn().await;
    assert_eq!(stream_len(&mut conn, &pseudonym(&keys, &id)).await, 2);
    gw.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unverifiable_server_or_a_missing_client_certificate_gets_nothing_written() {
    let pki = Pki::new();
    let tls_port = free_port();
    let redis = pki.redis(tls_port);
    let url = format!("rediss://localhost:{tls_port}");
    // (case, trust the private CA, present the client certificate)
    let cases = [
        // The system's roots do not know the private CA.
        ("no CA", false, true),
        // The server requires a client certificate.
        ("no client certificate", true, false),
    ];
    for (n, (case, with_ca, with_client)) in cases.into_iter().enumerate() {
        let mut config = test_config(&redis);
        config.redis.url = url.clone();
        config.redis.tls_ca_path = with_ca.then(|| pki.path("ca.pem"));
        if with_client {
            config.redis.tls_client_cert_path = Some(pki.path("client.pem"));
            config.redis.tls_client_key_path = Some(pki.path("client.key"));
        }
        let (gw, keys) = start_gateway(config).await;
        let id = imei(310 + n as u32);
        assert!(
            !batch_confirmed(&gw, &id, Duration::from_secs(2)).await,
            "{case}: confirmed without a verified TLS connection"
        );
        let mut conn = redis.conn().await;
        assert_eq!(
            stream_len(&mut conn, &pseudonym(&keys, &id)).await,
            0,
            "{case}"
        );
        gw.shutdown();
    }
}
