//! Customers, their API tokens, and device ownership (DESIGN §5).
//!
//! * `tg:customer:<id>` — hash: name, time zone, weekend days, holidays, retention.
//! * `tg:customer:<id>:tokens` — hash: token id → SHA-256 of the token secret. The token
//!   itself (`tgk.<customer>.<token id>.<secret>`) is shown once, at issue time, and never
//!   stored; checks compare digests in constant time.
//! * `tg:{P}:owner` — the owning customer id, under the device's pseudonym for *every* key
//!   version, so ownership survives key rotation and no raw IMEI is stored. It carries no
//!   TTL: ownership outlives the location data.

use std::collections::HashMap;

use jiff::civil::{Date, Weekday};
use redis::AsyncCommands;
use redis::aio::ConnectionLike;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::calendar::{BusinessCalendar, CalendarError};
use crate::pseudonym::{Imei, KeyRing};
use crate::store::keys::{
    CUSTOMER_HOLIDAYS, CUSTOMER_NAME, CUSTOMER_RETENTION_S, CUSTOMER_TZ, CUSTOMER_WEEKEND,
    customer_key, tokens_key,
};
use crate::store::scripts::{self, OwnerChange};

pub use crate::store::keys::{owner_key, owner_since_key};

/// Registry problems.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("invalid customer id {0:?}: use 1-64 of a-z, 0-9, '-', '_'")]
    CustomerId(String),
    #[error("customer {0} already exists")]
    Exists(String),
    #[error("no customer {0}")]
    NoCustomer(String),
    #[error("{0}")]
    Calendar(#[from] CalendarError),
    #[error("invalid field {field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

/// A customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    pub id: String,
    pub name: String,
    /// IANA time zone for the purge deadline.
    pub tz: String,
    pub weekend: Vec<Weekday>,
    pub holidays: Vec<Date>,
    /// Retention agreed with this customer, if not the default.
    pub retention_s: Option<u64>,
}

impl Customer {
    pub fn new(id: &str, name: &str, tz: &str) -> Customer {
        Customer {
            id: id.into(),
            name: name.into(),
            tz: tz.into(),
            weekend: vec![Weekday::Saturday, Weekday::Sunday],
            holidays: Vec::new(),
            retention_s: None,
        }
    }

    pub fn calendar(&self) -> Result<BusinessCalendar, CalendarError> {
        Ok(BusinessCalendar::new(&self.tz)?
            .with_weekend(self.weekend.iter().copied())
            .with_holidays(self.holidays.iter().copied()))
    }
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn weekday_name(d: Weekday) -> &'static str {
    match d {
        Weekday::Monday => "mon",
        Weekday::Tuesday => "tue",
        Weekday::Wednesday => "wed",
        Weekday::Thursday => "thu",
        Weekday::Friday => "fri",
        Weekday::Saturday => "sat",
        Weekday::Sunday => "sun",
    }
}

/// Parse `mon`…`sun`.
pub fn parse_weekday(s: &str) -> Option<Weekday> {
    Some(match s.trim().to_ascii_lowercase().get(..3)? {
        "mon" => Weekday::Monday,
        "tue" => Weekday::Tuesday,
        "wed" => Weekday::Wednesday,
        "thu" => Weekday::Thursday,
        "fri" => Weekday::Friday,
        "sat" => Weekday::Saturday,
        "sun" => Weekday::Sunday,
        _ => return None,
    })
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The registry, over any Redis connection.
#[derive(Debug, Clone)]
pub struct Registry<C> {
    conn: C,
    /// Longest retention a customer may be given.
    pub max_retention_s: u64,
}

impl<C: ConnectionLike + Clone + Send + Sync> Registry<C> {
    pub fn new(conn: C, max_retention_s: u64) -> Self {
        Registry {
            conn,
            max_retention_s,
        }
    }

    /// Create a customer; refuses an existing id.
    pub async fn add_customer(&self, c: &Customer) -> Result<(), RegistryError> {
        if !valid_id(&c.id) {
            return Err(RegistryError::CustomerId(c.id.clone()));
        }
        // The zone must exist, and the calendar must leave business days to set purge
        // deadlines by (a week of weekend days or a year of holidays would not).
        c.calendar()?.deadline(jiff::Timestamp::now())?;
        if let Some(r) = c.retention_s {
            if r == 0 || r > self.max_retention_s {
                return Err(RegistryError::Invalid {
                    field: "retention_s",
                    problem: format!("must be 1..={}", self.max_retention_s),
                });
            }
        }
        let mut conn = self.conn.clone();
        let key = customer_key(&c.id);
        let created: bool = conn.hset_nx(&key, CUSTOMER_NAME, &c.name).await?;
        if !created {
            return Err(RegistryError::Exists(c.id.clone()));
        }
        let weekend: Vec<&str> = c.weekend.iter().map(|d| weekday_name(*d)).collect();
        let holidays: Vec<String> = c.holidays.iter().map(|d| d.to_string()).collect();
        let mut fields = vec![
            (CUSTOMER_TZ, c.tz.clone()),
            (CUSTOMER_WEEKEND, weekend.join(",")),
            (CUSTOMER_HOLIDAYS, holidays.join(",")),
        ];
        if let Some(r) = c.retention_s {
            fields.push((CUSTOMER_RETENTION_S, r.to_string()));
        }
        let _: () = conn.hset_multiple(&key, &fields).await?;
        Ok(())
    }

    pub async fn customer(&self, id: &str) -> Result<Option<Customer>, RegistryError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let mut conn = self.conn.clone();
        let h: HashMap<String, String> = conn.hgetall(customer_key(id)).await?;
        let Some(name) = h.get(CUSTOMER_NAME) else {
            return Ok(None);
        };
        let list = |k: &str| -> Vec<String> {
            h.get(k)
                .map(|v| {
                    v.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(Some(Customer {
            id: id.into(),
            name: name.clone(),
            tz: h.get(CUSTOMER_TZ).cloned().unwrap_or_else(|| "UTC".into()),
            weekend: list(CUSTOMER_WEEKEND)
                .iter()
                .filter_map(|d| parse_weekday(d))
                .collect(),
            holidays: list(CUSTOMER_HOLIDAYS)
                .iter()
                .filter_map(|d| d.parse().ok())
                .collect(),
            retention_s: h.get(CUSTOMER_RETENTION_S).and_then(|v| v.parse().ok()),
        }))
    }

    /// Replace a customer's holiday calendar.
    pub async fn set_holidays(&self, id: &str, holidays: &[Date]) -> Result<(), RegistryError> {
        self.require(id).await?;
        let list: Vec<String> = holidays.iter().map(|d| d.to_string()).collect();
        let mut conn = self.conn.clone();
        let _: () = conn
            .hset(customer_key(id), CUSTOMER_HOLIDAYS, list.join(","))
            .await?;
        Ok(())
    }

    async fn require(&self, id: &str) -> Result<Customer, RegistryError> {
        self.customer(id)
            .await?
            .ok_or_else(|| RegistryError::NoCustomer(id.into()))
    }

    /// Issue a token; the returned string is the only copy of it.
    pub async fn issue_token(&self, customer: &str) -> Result<(String, String), RegistryError> {
        self.require(customer).await?;
        let tid = hex::encode(rand::random::<[u8; 4]>());
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let mut conn = self.conn.clone();
        let _: () = conn
            .hset(tokens_key(customer), &tid, sha256_hex(&secret))
            .await?;
        Ok((tid.clone(), format!("tgk.{customer}.{tid}.{secret}")))
    }

    /// Revoke a token by id; true if it existed.
    pub async fn revoke_token(&self, customer: &str, tid: &str) -> Result<bool, RegistryError> {
        let mut conn = self.conn.clone();
        let n: u64 = conn.hdel(tokens_key(customer), tid).await?;
        Ok(n > 0)
    }

    /// The customer a token belongs to, if it is valid.
    pub async fn authenticate(&self, token: &str) -> Result<Option<String>, RegistryError> {
        let mut parts = token.splitn(4, '.');
        let (Some("tgk"), Some(customer), Some(tid), Some(secret)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Ok(None);
        };
        if !valid_id(customer) || tid.len() != 8 {
            return Ok(None);
        }
        let mut conn = self.conn.clone();
        let stored: Option<String> = conn.hget(tokens_key(customer), tid).await?;
        let given = sha256_hex(secret);
        // Compare digests in constant time; an absent token compares against a dummy.
        let stored = stored.unwrap_or_else(|| "0".repeat(64));
        let ok: bool = stored.as_bytes().ct_eq(given.as_bytes()).into();
        Ok(ok.then(|| customer.to_owned()))
    }

    /// Make `customer` the owner of the device (under every key version).
    pub async fn assign(
        &self,
        imei: &Imei,
        customer: &str,
        keys: &KeyRing,
    ) -> Result<(), RegistryError> {
        self.require(customer).await?;
        // One command per key version: the owner keys carry different `{P}` tags, so in a
        // cluster they live in different slots and one pipeline could not hold them.
        // Setting them is idempotent; a failure half-way is reported and simply redone.
        let mut conn = self.conn.clone();
        let change = self.owner_change();
        let pseudonyms = keys.all_pseudonyms(imei);
        let before = self.ownership(imei, keys).await?.map(|(owner, _)| owner);
        for p in &pseudonyms {
            scripts::assign_owner(&mut conn, p, customer, change).await?;
        }
        if before.as_deref() != Some(customer) {
            crate::collection::owner_changed(&mut conn, &pseudonyms).await?;
        }
        Ok(())
    }

    pub async fn unassign(&self, imei: &Imei, keys: &KeyRing) -> Result<(), RegistryError> {
        let mut conn = self.conn.clone();
        let change = self.owner_change();
        let pseudonyms = keys.all_pseudonyms(imei);
        for p in &pseudonyms {
            scripts::unassign_owner(&mut conn, p, change).await?;
        }
        crate::collection::owner_changed(&mut conn, &pseudonyms).await?;
        Ok(())
    }

    /// An ownership change now: how long an `owner_since` mark matters is the longest
    /// retention (data before it lives at most this long).
    fn owner_change(&self) -> OwnerChange {
        OwnerChange {
            now_ms: jiff::Timestamp::now().as_millisecond(),
            since_ttl_ms: self.max_retention_s.saturating_mul(1000).max(1),
        }
    }

    /// The owner recorded under any of the device's pseudonyms.
    pub async fn owner(
        &self,
        imei: &Imei,
        keys: &KeyRing,
    ) -> Result<Option<String>, RegistryError> {
        Ok(self.ownership(imei, keys).await?.map(|(owner, _)| owner))
    }

    /// The owner and since when they own the device (Unix ms; `None` if not recorded).
    /// Every key version is read, whatever the answer: stopping at the first hit would
    /// let response times tell an owned device from an unknown one.
    pub async fn ownership(
        &self,
        imei: &Imei,
        keys: &KeyRing,
    ) -> Result<Option<(String, Option<i64>)>, RegistryError> {
        let mut conn = self.conn.clone();
        let mut found: Option<(String, Option<i64>)> = None;
        for p in keys.all_pseudonyms(imei) {
            let owner: Option<String> = conn.get(owner_key(&p)).await?;
            let since: Option<i64> = conn.get(owner_since_key(&p)).await?;
            if let Some(owner) = owner
                && found.is_none()
            {
                found = Some((owner, since));
            } else if let (Some((_, best)), Some(s)) = (found.as_mut(), since) {
                // Versions written by the same assignment agree; after a later one the
                // newest start counts.
                *best = Some(best.map_or(s, |b| b.max(s)));
            }
        }
        Ok(found)
    }
}
