//! Customers, tokens and ownership against a real redis-server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::*;
use redis::AsyncCommands;
use trackgate::pseudonym::{Imei, KeyRing};
use trackgate::registry::{Customer, Registry, RegistryError};

#[tokio::test]
async fn tokens_are_shown_once_stored_hashed_and_revocable() {
    let redis = RedisServer::start();
    let reg = Registry::new(redis.conn().await, 365 * 86400);
    reg.add_customer(&Customer::new("acme", "ACME", "Europe/Berlin"))
        .await
        .unwrap();
    assert!(matches!(
        reg.add_customer(&Customer::new("acme", "again", "UTC"))
            .await,
        Err(RegistryError::Exists(_))
    ));
    assert!(
        reg.add_customer(&Customer::new("Bad Id", "x", "UTC"))
            .await
            .is_err()
    );
    assert!(
        reg.add_customer(&Customer::new("mars", "x", "Mars/Base"))
            .await
            .is_err()
    );
    // A calendar without business days could never give a purge its deadline.
    let mut idle = Customer::new("idle", "x", "UTC");
    idle.weekend = vec![
        jiff::civil::Weekday::Monday,
        jiff::civil::Weekday::Tuesday,
        jiff::civil::Weekday::Wednesday,
        jiff::civil::Weekday::Thursday,
        jiff::civil::Weekday::Friday,
        jiff::civil::Weekday::Saturday,
        jiff::civil::Weekday::Sunday,
    ];
    assert!(matches!(
        reg.add_customer(&idle).await,
        Err(RegistryError::Calendar(_))
    ));

    let (tid, token) = reg.issue_token("acme").await.unwrap();
    assert_eq!(
        reg.authenticate(&token).await.unwrap().as_deref(),
        Some("acme")
    );
    // Only a digest is stored.
    let mut conn = redis.conn().await;
    let stored: Vec<String> = conn.hvals("tg:customer:acme:tokens").await.unwrap();
    let secret = token.rsplit('.').next().unwrap();
    assert!(stored.iter().all(|v| !v.contains(secret)));
    // Tampered or foreign tokens fail.
    // Change the last character to a different one: pushing a fixed '0'
    // would leave the token unchanged whenever it already ended in '0'.
    let mut forged = token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    assert_ne!(forged, token);
    assert_eq!(reg.authenticate(&forged).await.unwrap(), None);
    assert_eq!(
        reg.authenticate(&token.replace("acme", "other"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(reg.authenticate("garbage").await.unwrap(), None);
    assert!(reg.revoke_token("acme", &tid).await.unwrap());
    assert_eq!(reg.authenticate(&token).await.unwrap(), None);
}

#[tokio::test]
async fn ownership_is_kept_under_every_key_version_without_the_imei() {
    let redis = RedisServer::start();
    let reg = Registry::new(redis.conn().await, 365 * 86400);
    reg.add_customer(&Customer::new("acme", "ACME", "UTC"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    KeyRing::generate(&file).unwrap();
    KeyRing::rotate(&file, None).unwrap();
    let ring = KeyRing::load(&file).unwrap();
    let raw = imei(80);
    let dev = Imei::new(&raw).unwrap();
    assert_eq!(reg.owner(&dev, &ring).await.unwrap(), None);
    reg.assign(&dev, "acme", &ring).await.unwrap();
    assert_eq!(
        reg.owner(&dev, &ring).await.unwrap().as_deref(),
        Some("acme")
    );
    let mut conn = redis.conn().await;
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    assert_eq!(keys.iter().filter(|k| k.ends_with(":owner")).count(), 2);
    assert!(keys.iter().all(|k| !k.contains(&raw)));
    assert!(matches!(
        reg.assign(&dev, "nobody", &ring).await,
        Err(RegistryError::NoCustomer(_))
    ));
    reg.unassign(&dev, &ring).await.unwrap();
    assert_eq!(reg.owner(&dev, &ring).await.unwrap(), None);
}

#[tokio::test]
async fn a_change_of_owner_leaves_the_history_behind() {
    let redis = RedisServer::start();
    let reg = Registry::new(redis.conn().await, 365 * 86400);
    for id in ["acme", "rival"] {
        reg.add_customer(&Customer::new(id, id, "UTC"))
            .await
            .unwrap();
    }
    let ring = KeyRing::ephemeral();
    let dev = Imei::new(&imei(81)).unwrap();
    let since = |o: Option<(String, Option<i64>)>| o.unwrap().1;
    reg.assign(&dev, "acme", &ring).await.unwrap();
    assert_eq!(
        since(reg.ownership(&dev, &ring).await.unwrap()),
        None,
        "a first owner sees the whole retention"
    );
    let before = jiff::Timestamp::now().as_millisecond();
    reg.assign(&dev, "rival", &ring).await.unwrap();
    let sold = since(reg.ownership(&dev, &ring).await.unwrap()).expect("marked");
    assert!(sold >= before, "{sold} < {before}");
    reg.assign(&dev, "rival", &ring).await.unwrap();
    assert_eq!(
        since(reg.ownership(&dev, &ring).await.unwrap()),
        Some(sold),
        "the same owner again keeps their history"
    );
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    reg.unassign(&dev, &ring).await.unwrap();
    reg.assign(&dev, "acme", &ring).await.unwrap();
    let back = since(reg.ownership(&dev, &ring).await.unwrap()).expect("marked");
    assert!(
        back > sold,
        "after an unassignment the next owner starts afresh"
    );
    let mut conn = redis.conn().await;
    let ttl: i64 = conn
        .pttl(trackgate::registry::owner_since_key(&ring.pseudonym(&dev)))
        .await
        .unwrap();
    assert!(ttl > 0, "the mark expires with the longest retention");
}
