//! Payloads at rest (DESIGN §9): sealed with AES-256-GCM (`ring`, the rustls provider
//! already in the build) under a data key per calendar month (UTC) and key version, held
//! in the key file beside the pseudonym keys.
//!
//! Every gateway seals under the same month key, about 2.6·10¹¹ times a month at 100k
//! fixes/s: far past the 2³² random 96-bit nonces AES-GCM allows one key. So no envelope
//! is sealed with the month key itself: each process draws a random 8-byte salt once and
//! seals under `HKDF-SHA256(month key, salt)`, with a counter as the nonce. A (subkey,
//! nonce) pair then never repeats unless two processes draw the same salt (about
//! n²/2⁶⁵ for n processes in a month). XChaCha20-Poly1305 with random nonces was tried
//! instead: +41 % gateway CPU (cpu-ab), against no measurable cost for this. Destroying a month's key
//! (`trackgate keys prune`) makes every copy of what it sealed unreadable: memory, AOF,
//! RDB, replicas and backups alike (crypto-shredding).
//!
//! An envelope is `month u16 BE · key version u8 · salt (8) · counter u64 BE · ciphertext
//! · tag (16)`: 35 bytes more than the plaintext. The additional data binds the purpose,
//! the device's pseudonym and the caller's `bind` bytes (for a chunk: its clear header),
//! so an envelope moved to another device or entry does not open.
//!
//! Which key seals data of month M: M's newest version, or, when the file has no key for M
//! (a fix older than the file), the nearest later month's. Data is then destroyed later
//! than it could be, never earlier.

use std::collections::BTreeMap;
use std::fmt;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;

/// Envelope bytes before the ciphertext: month, key version, salt, counter.
const HEAD: usize = 3 + 8 + 8;
/// Subkeys of other processes' salts kept for opening (cleared when full).
const OPEN_CACHE: usize = 4096;

use crate::pseudonym::Pseudonym;

/// A calendar month (UTC), as months since 1970-01.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month(pub u16);

impl Month {
    /// The month of Unix second `s`; `None` before 1970 or after the year 7431.
    pub fn of_unix(s: i64) -> Option<Month> {
        let ts = jiff::Timestamp::from_second(s).ok()?;
        let d = ts.to_zoned_datetime(jiff::tz::TimeZone::UTC).date();
        Month::from_ym(i32::from(d.year()), d.month() as u8)
    }

    fn from_ym(year: i32, month: u8) -> Option<Month> {
        let n = (year - 1970).checked_mul(12)? + i32::from(month) - 1;
        u16::try_from(n).ok().map(Month)
    }

    /// `YYYY-MM`.
    pub fn parse(s: &str) -> Option<Month> {
        let (y, m) = s.split_once('-')?;
        let (y, m): (i32, u8) = (y.parse().ok()?, m.parse().ok()?);
        if !(1..=12).contains(&m) || y < 1970 || m.to_string().len() > 2 {
            return None;
        }
        Month::from_ym(y, m)
    }

    pub fn next(self) -> Month {
        Month(self.0.saturating_add(1))
    }

    /// Unix second at which this month starts.
    pub fn start_unix(self) -> i64 {
        let (y, m) = (1970 + i32::from(self.0 / 12), (self.0 % 12) as i8 + 1);
        jiff::civil::date(y as i16, m, 1)
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .map(|z| z.timestamp().as_second())
            .unwrap_or(i64::MAX)
    }

    /// The month now.
    pub fn now() -> Month {
        Month::of_unix(jiff::Timestamp::now().as_second()).unwrap_or(Month(0))
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", 1970 + self.0 / 12, self.0 % 12 + 1)
    }
}

/// Why an envelope could not be sealed or opened. Never carries identifiers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    #[error("no data key for {0} or any later month")]
    NoKey(Month),
    #[error("data key {month} v{version} is gone (pruned or never held here)")]
    KeyGone { month: Month, version: u8 },
    #[error("sealed payload truncated")]
    Truncated,
    #[error("sealed payload does not open (tampered, moved or wrong key)")]
    Forged,
}

impl VaultError {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            VaultError::NoKey(_) => "no_key",
            VaultError::KeyGone { .. } => "key_gone",
            VaultError::Truncated => "truncated",
            VaultError::Forged => "forged",
        }
    }
}

/// The subkey HKDF-Expand(`prk`, "subkey" ‖ `salt`).
fn derive(prk: &hkdf::Prk, salt: [u8; 8]) -> Option<LessSafeKey> {
    let info: [&[u8]; 2] = [b"subkey", &salt];
    let okm = prk.expand(&info, &AES_256_GCM).ok()?;
    Some(LessSafeKey::new(UnboundKey::from(okm)))
}

/// The GCM nonce of counter `n`: 4 zero bytes, then `n` big-endian.
fn nonce_of(n: u64) -> Nonce {
    let mut b = [0u8; NONCE_LEN];
    b[4..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(b)
}

/// What an envelope is for (part of the additional data).
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    /// A history chunk; bind = its clear header.
    Chunk,
    /// A live-tail entry's payload; bind = its fix time as stored (`t`), or `-`.
    Tail,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::Chunk => b"chunk",
            Purpose::Tail => b"tail",
        }
    }
}

/// Bytes an envelope adds to its plaintext.
pub const OVERHEAD: usize = HEAD + 16;

/// A subkey's month, key version and salt.
type SubkeyId = (Month, u8, [u8; 8]);

/// The data keys of one key file. Cheap to share behind an `Arc`.
pub struct Vault {
    /// Per (month, version): the HKDF pseudo-random key made from the month's secret.
    keys: BTreeMap<(Month, u8), hkdf::Prk>,
    /// This process's salt and nonce counter.
    salt: [u8; 8],
    counter: AtomicU64,
    /// This process's subkeys (its salt), made once: sealing takes no lock.
    own: BTreeMap<(Month, u8), Arc<LessSafeKey>>,
    /// Other processes' subkeys by (month, version, salt), made when first opened.
    others: Mutex<HashMap<SubkeyId, Arc<LessSafeKey>>>,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held: Vec<String> = self.keys.keys().map(|(m, v)| format!("{m} v{v}")).collect();
        f.debug_struct("Vault").field("keys", &held).finish()
    }
}

impl Vault {
    /// A vault over `(month, version, 32-byte secret)` entries.
    pub fn new<'a>(
        entries: impl IntoIterator<Item = (Month, u8, &'a [u8])>,
    ) -> Result<Vault, String> {
        let mut keys = BTreeMap::new();
        for (month, version, secret) in entries {
            if secret.len() != 32 {
                return Err(format!(
                    "data key {month} v{version}: secret must be 32 bytes"
                ));
            }
            let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"trackgate/1/data-key").extract(secret);
            if keys.insert((month, version), prk).is_some() {
                return Err(format!("data key {month} v{version} appears twice"));
            }
        }
        Ok(Vault::with_keys(keys))
    }

    fn with_keys(keys: BTreeMap<(Month, u8), hkdf::Prk>) -> Vault {
        let salt: [u8; 8] = rand::random();
        let own = keys
            .iter()
            .filter_map(|(id, prk)| Some((*id, Arc::new(derive(prk, salt)?))))
            .collect();
        Vault {
            keys,
            salt,
            counter: AtomicU64::new(0),
            own,
            others: Mutex::new(HashMap::new()),
        }
    }

    /// A vault without keys: it seals nothing and opens nothing.
    pub fn empty() -> Vault {
        Vault::with_keys(BTreeMap::new())
    }

    /// The subkey of (month, version) for `salt`: this process's, or another's, made
    /// once and kept.
    fn subkey(&self, month: Month, version: u8, salt: [u8; 8]) -> Option<Arc<LessSafeKey>> {
        if salt == self.salt {
            return self.own.get(&(month, version)).cloned();
        }
        let mut cache = self.others.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = cache.get(&(month, version, salt)) {
            return Some(k.clone());
        }
        let key = Arc::new(derive(self.keys.get(&(month, version))?, salt)?);
        if cache.len() >= OPEN_CACHE {
            cache.clear();
        }
        cache.insert((month, version, salt), key.clone());
        Some(key)
    }

    /// The months held, ascending, each once.
    pub fn months(&self) -> Vec<Month> {
        let mut m: Vec<Month> = self.keys.keys().map(|(m, _)| *m).collect();
        m.dedup();
        m
    }

    /// Whether a key for `month` is held.
    pub fn holds(&self, month: Month) -> bool {
        self.keys
            .range((month, 0)..=(month, u8::MAX))
            .next()
            .is_some()
    }

    /// The key that seals data of `month` (see the module doc).
    fn sealing_key(&self, month: Month) -> Result<(Month, u8), VaultError> {
        let first = self
            .keys
            .range((month, 0)..)
            .next()
            .map(|((m, _), _)| *m)
            .ok_or(VaultError::NoKey(month))?;
        let ((m, v), _) = self
            .keys
            .range((first, 0)..=(first, u8::MAX))
            .next_back()
            .ok_or(VaultError::NoKey(month))?;
        Ok((*m, *v))
    }

    fn aad(purpose: Purpose, p: &Pseudonym, bind: &[u8], head: &[u8]) -> Vec<u8> {
        let mut a = Vec::with_capacity(16 + p.as_str().len() + bind.len());
        a.extend_from_slice(b"trackgate/1/");
        a.extend_from_slice(purpose.tag());
        a.push(0);
        a.extend_from_slice(p.as_str().as_bytes());
        a.push(0);
        a.extend_from_slice(head);
        a.extend_from_slice(bind);
        a
    }

    /// Seal `plain`, data of `month` of device `p`, appending the envelope to `out`.
    pub fn seal_into(
        &self,
        purpose: Purpose,
        p: &Pseudonym,
        bind: &[u8],
        month: Month,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), VaultError> {
        let (m, v) = self.sealing_key(month)?;
        let key = self
            .subkey(m, v, self.salt)
            .ok_or(VaultError::NoKey(month))?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let start = out.len();
        out.extend_from_slice(&m.0.to_be_bytes());
        out.push(v);
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&n.to_be_bytes());
        let head = out[start..start + 3].to_vec();
        let body = out.len();
        out.extend_from_slice(plain);
        let mut sealed = out.split_off(body);
        key.seal_in_place_append_tag(
            nonce_of(n),
            Aad::from(Self::aad(purpose, p, bind, &head)),
            &mut sealed,
        )
        .map_err(|_| VaultError::Forged)?;
        out.extend_from_slice(&sealed);
        Ok(())
    }

    /// Open an envelope written by [`Vault::seal_into`] with the same purpose, device and
    /// bind bytes.
    pub fn open(
        &self,
        purpose: Purpose,
        p: &Pseudonym,
        bind: &[u8],
        envelope: &[u8],
    ) -> Result<Vec<u8>, VaultError> {
        if envelope.len() < OVERHEAD {
            return Err(VaultError::Truncated);
        }
        let month = Month(u16::from_be_bytes([envelope[0], envelope[1]]));
        let version = envelope[2];
        let mut salt = [0u8; 8];
        salt.copy_from_slice(&envelope[3..11]);
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&envelope[11..HEAD]);
        let key = self
            .subkey(month, version, salt)
            .ok_or(VaultError::KeyGone { month, version })?;
        let mut buf = envelope[HEAD..].to_vec();
        let plain_len = key
            .open_in_place(
                nonce_of(u64::from_be_bytes(counter)),
                Aad::from(Self::aad(purpose, p, bind, &envelope[..3])),
                &mut buf,
            )
            .map_err(|_| VaultError::Forged)?
            .len();
        buf.truncate(plain_len);
        Ok(buf)
    }

    /// The month whose key sealed `envelope` (its first two bytes).
    pub fn month_of(envelope: &[u8]) -> Option<Month> {
        Some(Month(u16::from_be_bytes([
            *envelope.first()?,
            *envelope.get(1)?,
        ])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pseudonym {
        Pseudonym::parse(s).unwrap()
    }

    fn vault(months: &[(Month, u8)]) -> Vault {
        let secrets: Vec<(Month, u8, [u8; 32])> = months
            .iter()
            .map(|(m, v)| (*m, *v, [m.0 as u8 ^ *v; 32]))
            .collect();
        Vault::new(secrets.iter().map(|(m, v, s)| (*m, *v, &s[..]))).unwrap()
    }

    #[test]
    fn months_print_parse_and_start_where_the_calendar_says() {
        let m = Month::parse("2026-12").unwrap();
        assert_eq!(m.to_string(), "2026-12");
        assert_eq!(m.next().to_string(), "2027-01");
        assert_eq!(Month::of_unix(m.start_unix()), Some(m));
        assert_eq!(Month::of_unix(m.start_unix() - 1), Month::parse("2026-11"));
        assert_eq!(m.start_unix(), 1_796_083_200); // 2026-12-01T00:00:00Z
        for bad in ["2026-13", "2026-0", "1969-12", "x-01", "2026"] {
            assert_eq!(Month::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_envelope_opens_only_for_its_device_purpose_and_bind() {
        let m = Month::parse("2026-12").unwrap();
        let v = vault(&[(m, 1)]);
        let (a, b) = (
            p("p1_aaaaaaaaaaaaaaaaaaaaaaaaaa"),
            p("p1_bbbbbbbbbbbbbbbbbbbbbbbbbb"),
        );
        let mut env = Vec::new();
        v.seal_into(Purpose::Chunk, &a, b"head", m, b"lat 51.5", &mut env)
            .unwrap();
        assert_eq!(env.len(), 8 + OVERHEAD);
        assert!(!env.windows(8).any(|w| w == b"lat 51.5"), "no clear text");
        assert_eq!(
            v.open(Purpose::Chunk, &a, b"head", &env).unwrap(),
            b"lat 51.5"
        );
        assert_eq!(
            v.open(Purpose::Chunk, &b, b"head", &env),
            Err(VaultError::Forged)
        );
        assert_eq!(
            v.open(Purpose::Chunk, &a, b"other", &env),
            Err(VaultError::Forged)
        );
        let mut flipped = env.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(
            v.open(Purpose::Chunk, &a, b"head", &flipped),
            Err(VaultError::Forged)
        );
        assert_eq!(
            v.open(Purpose::Chunk, &a, b"head", &env[..OVERHEAD - 1]),
            Err(VaultError::Truncated)
        );
        // Claiming another (held) key version fails too.
        let v2 = vault(&[(m, 1), (m, 2)]);
        let mut moved = env.clone();
        moved[2] = 2;
        assert_eq!(
            v2.open(Purpose::Chunk, &a, b"head", &moved),
            Err(VaultError::Forged)
        );
    }

    #[test]
    fn gateways_seal_under_subkeys_of_their_own_and_open_each_others() {
        let m = Month::parse("2026-12").unwrap();
        let (a, b) = (vault(&[(m, 1)]), vault(&[(m, 1)]));
        let dev = p("p1_aaaaaaaaaaaaaaaaaaaaaaaaaa");
        let (mut x, mut y, mut z) = (Vec::new(), Vec::new(), Vec::new());
        a.seal_into(Purpose::Tail, &dev, b"1", m, b"fix", &mut x)
            .unwrap();
        a.seal_into(Purpose::Tail, &dev, b"1", m, b"fix", &mut y)
            .unwrap();
        b.seal_into(Purpose::Tail, &dev, b"1", m, b"fix", &mut z)
            .unwrap();
        assert_eq!(x[3..11], y[3..11], "one salt per process");
        assert_ne!(x[11..19], y[11..19], "a new nonce per envelope");
        assert_ne!(x[3..11], z[3..11], "another process, another salt");
        for e in [&x, &y, &z] {
            assert_eq!(a.open(Purpose::Tail, &dev, b"1", e).unwrap(), b"fix");
            assert_eq!(b.open(Purpose::Tail, &dev, b"1", e).unwrap(), b"fix");
        }
    }

    #[test]
    fn a_month_without_a_key_uses_the_next_later_one_and_a_pruned_key_is_gone() {
        let (nov, dec, jan) = (
            Month::parse("2026-11").unwrap(),
            Month::parse("2026-12").unwrap(),
            Month::parse("2027-01").unwrap(),
        );
        let v = vault(&[(dec, 1), (dec, 2), (jan, 1)]);
        let a = p("p1_aaaaaaaaaaaaaaaaaaaaaaaaaa");
        let mut env = Vec::new();
        v.seal_into(Purpose::Chunk, &a, b"", nov, b"x", &mut env)
            .unwrap();
        assert_eq!(
            (Vault::month_of(&env), env[2]),
            (Some(dec), 2),
            "newest version of December"
        );
        let mut later = Vec::new();
        assert_eq!(
            v.seal_into(Purpose::Chunk, &a, b"", jan.next(), b"x", &mut later),
            Err(VaultError::NoKey(jan.next()))
        );
        let pruned = vault(&[(jan, 1)]);
        assert_eq!(
            pruned.open(Purpose::Chunk, &a, b"", &env),
            Err(VaultError::KeyGone {
                month: dec,
                version: 2
            })
        );
    }
}
