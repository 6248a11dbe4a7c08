//! Keyed pseudonyms for IMEIs (DESIGN §4).
//!
//! `P = "p" + version + "_" + base32(HMAC-SHA256(key[version], "imei:" + imei))[..26]`
//! (RFC 4648 alphabet, lower-cased). A plain hash would not do: the IMEI space is small
//! enough to enumerate, so only a secret key makes the pseudonym one-way for someone who
//! reads the database.
//!
//! The raw IMEI is wrapped in [`Imei`], whose `Debug` is redacted and which has no
//! `Display`, so it cannot reach a log line or a panic message by accident.

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::store::vault::{Month, Vault};

/// Length of the base32 part of a pseudonym (130 bits).
const DIGEST_CHARS: usize = 26;

/// A raw IMEI. Redacted in `Debug`, no `Display`: the only way out is [`Imei::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Imei(Box<str>);

impl Imei {
    /// Wrap 14–15 ASCII digits (the framer has checked them already).
    pub fn new(digits: &str) -> Option<Imei> {
        ((14..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| Imei(digits.into()))
    }

    /// The digits, for the two places that need them: the HMAC input and the reply
    /// frame back to the same device.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Imei {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Imei(<redacted>)")
    }
}

/// A device pseudonym, safe to store and log.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pseudonym(Arc<str>);

impl Pseudonym {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parse a stored pseudonym (`p<version>_<26 base32 chars>`).
    pub fn parse(s: &str) -> Option<Pseudonym> {
        let rest = s.strip_prefix('p')?;
        let (version, digest) = rest.split_once('_')?;
        let ok = !version.is_empty()
            && version.bytes().all(|b| b.is_ascii_digit())
            && digest.len() == DIGEST_CHARS
            && digest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
        ok.then(|| Pseudonym(s.into()))
    }

    /// The key version it was made with.
    pub fn key_version(&self) -> u32 {
        self.0[1..]
            .split_once('_')
            .and_then(|(v, _)| v.parse().ok())
            .unwrap_or(0)
    }
}

impl fmt::Display for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pseudonym({})", self.0)
    }
}

/// One key as stored in the key file.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    version: u32,
    /// New writes use the newest key whose `not_before` has passed.
    not_before: Timestamp,
    /// 32 random bytes, hex.
    secret_hex: String,
}

/// One data key (payloads at rest, [`crate::store::vault`]) as stored in the key file.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataKeyEntry {
    /// Calendar month (UTC) whose data it seals, `YYYY-MM`.
    month: String,
    version: u8,
    /// 32 random bytes, hex.
    secret_hex: String,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default, rename = "key")]
    keys: Vec<KeyEntry>,
    #[serde(default, rename = "data_key")]
    data_keys: Vec<DataKeyEntry>,
}

struct Key {
    version: u32,
    not_before: Timestamp,
    mac: Hmac<Sha256>,
}

/// Key file problems.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path}: {problem}")]
    Invalid { path: String, problem: String },
}

/// The versioned keys, and the data keys of the payloads at rest. Cheap to share (`Arc`
/// inside the gateway).
pub struct KeyRing {
    /// Sorted by version, ascending.
    keys: Vec<Key>,
    vault: Arc<Vault>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let versions: Vec<u32> = self.keys.iter().map(|k| k.version).collect();
        f.debug_struct("KeyRing")
            .field("versions", &versions)
            .finish_non_exhaustive()
    }
}

impl KeyRing {
    /// Load a key file written by [`KeyRing::generate`] / [`KeyRing::rotate`].
    pub fn load(path: &Path) -> Result<KeyRing, KeyError> {
        let file = read_key_file(path)?;
        KeyRing::from_file(&file).map_err(|problem| KeyError::Invalid {
            path: path.display().to_string(),
            problem,
        })
    }

    fn from_file(file: &KeyFile) -> Result<KeyRing, String> {
        let mut ring = KeyRing::from_entries(&file.keys)?;
        ring.vault = Arc::new(vault_of(&file.data_keys)?);
        Ok(ring)
    }

    /// The data keys.
    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    fn from_entries(entries: &[KeyEntry]) -> Result<KeyRing, String> {
        if entries.is_empty() {
            return Err("no keys; run `trackgate keys generate`".into());
        }
        let mut keys = Vec::with_capacity(entries.len());
        for e in entries {
            let secret = hex::decode(&e.secret_hex)
                .map_err(|_| format!("key version {}: secret_hex is not hex", e.version))?;
            if secret.len() != 32 {
                return Err(format!(
                    "key version {}: secret must be 32 bytes",
                    e.version
                ));
            }
            let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&secret)
                .map_err(|_| format!("key version {}: unusable secret", e.version))?;
            keys.push(Key {
                version: e.version,
                not_before: e.not_before,
                mac,
            });
        }
        keys.sort_by_key(|k| k.version);
        if keys.windows(2).any(|w| w[0].version == w[1].version) {
            return Err("duplicate key version".into());
        }
        Ok(KeyRing {
            keys,
            vault: Arc::new(Vault::empty()),
        })
    }

    /// A throwaway ring with one random key and data keys for this month and the next
    /// [`MONTHS_AHEAD`] (demo, tests).
    pub fn ephemeral() -> KeyRing {
        let mut file = KeyFile {
            keys: vec![new_entry(1, Timestamp::UNIX_EPOCH)],
            data_keys: Vec::new(),
        };
        add_months(&mut file, Month::now(), MONTHS_AHEAD);
        // Fresh entries are always valid.
        KeyRing::from_file(&file).unwrap_or_else(|e| unreachable!("{e}"))
    }

    /// Create a key file with one key and data keys for this month and the next
    /// [`MONTHS_AHEAD`], readable by the owner only. Refuses to overwrite.
    pub fn generate(path: &Path) -> Result<(), KeyError> {
        let mut file = KeyFile {
            keys: vec![new_entry(1, Timestamp::now())],
            data_keys: Vec::new(),
        };
        add_months(&mut file, Month::now(), MONTHS_AHEAD);
        write_key_file(path, &file, true)
    }

    /// Add data keys for every month from this one to `ahead` months on that the file
    /// lacks. Returns the months added.
    pub fn add_data_months(path: &Path, ahead: u16) -> Result<Vec<Month>, KeyError> {
        let mut file = read_key_file(path)?;
        let added = add_months(&mut file, Month::now(), ahead);
        if !added.is_empty() {
            write_key_file(path, &file, false)?;
        }
        Ok(added)
    }

    /// Destroy the data keys of every month that ended more than `keep` ago
    /// (crypto-shredding: what they sealed, in every copy, cannot be read any more).
    /// Returns the months destroyed.
    pub fn prune_data_months(
        path: &Path,
        keep: std::time::Duration,
    ) -> Result<Vec<Month>, KeyError> {
        let mut file = read_key_file(path)?;
        let due = months_due(&file, Timestamp::now().as_second(), keep);
        if !due.is_empty() {
            file.data_keys
                .retain(|k| Month::parse(&k.month).is_none_or(|m| !due.contains(&m)));
            write_key_file(path, &file, false)?;
        }
        Ok(due)
    }

    /// Data-key months held that ended more than `keep` before `now_s`: they should have
    /// been destroyed (`trackgate keys prune`).
    pub fn overdue_months(&self, now_s: i64, keep: std::time::Duration) -> Vec<Month> {
        let keep_s = i64::try_from(keep.as_secs()).unwrap_or(i64::MAX);
        self.vault
            .months()
            .into_iter()
            .filter(|m| m.next().start_unix().saturating_add(keep_s) < now_s)
            .collect()
    }

    /// Months a gateway must hold data keys for before it starts: this one and the next
    /// (`Err` names the missing ones).
    pub fn check_data_months(&self, now: Month) -> Result<(), String> {
        let missing: Vec<String> = [now, now.next()]
            .into_iter()
            .filter(|m| !self.vault.holds(*m))
            .map(|m| m.to_string())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "the key file has no data key for {}: add them with `trackgate keys months <key file>`",
            missing.join(" and ")
        ))
    }

    /// Add a key one version above the newest, valid from `not_before` (default now).
    /// Old keys stay: export and purge still need them for data written under them.
    pub fn rotate(path: &Path, not_before: Option<Timestamp>) -> Result<u32, KeyError> {
        let mut file = read_key_file(path)?;
        let next = file.keys.iter().map(|k| k.version).max().unwrap_or(0) + 1;
        file.keys
            .push(new_entry(next, not_before.unwrap_or_else(Timestamp::now)));
        write_key_file(path, &file, false)?;
        Ok(next)
    }

    /// The key new writes use at `now`: the newest whose `not_before` has passed (the
    /// oldest if none has, so a clock behind the file still works).
    fn current_at(&self, now: Timestamp) -> Option<&Key> {
        self.keys
            .iter()
            .rev()
            .find(|k| k.not_before <= now)
            .or(self.keys.first())
    }

    /// Pseudonym of `imei` under the current key.
    pub fn pseudonym(&self, imei: &Imei) -> Pseudonym {
        self.pseudonym_at(imei, Timestamp::now())
    }

    fn pseudonym_at(&self, imei: &Imei, now: Timestamp) -> Pseudonym {
        match self.current_at(now) {
            Some(k) => compute(k, imei),
            // Unreachable for a loaded ring (it has ≥ 1 key); never fall back to a hash.
            None => Pseudonym("p0_unkeyed".into()),
        }
    }

    /// Pseudonyms of `imei` under every key (export and purge look under all of them,
    /// so rotation never strands data).
    pub fn all_pseudonyms(&self, imei: &Imei) -> Vec<Pseudonym> {
        self.keys.iter().map(|k| compute(k, imei)).collect()
    }

    pub fn versions(&self) -> Vec<u32> {
        self.keys.iter().map(|k| k.version).collect()
    }
}

fn compute(key: &Key, imei: &Imei) -> Pseudonym {
    let mut mac = key.mac.clone();
    mac.update(b"imei:");
    mac.update(imei.expose().as_bytes());
    let digest = mac.finalize().into_bytes();
    let mut b32 = data_encoding::BASE32_NOPAD.encode(&digest);
    b32.truncate(DIGEST_CHARS);
    b32.make_ascii_lowercase();
    Pseudonym(format!("p{}_{b32}", key.version).into())
}

/// Data-key months `trackgate keys generate` and `keys months` make beyond this one.
pub const MONTHS_AHEAD: u16 = 2;

fn vault_of(entries: &[DataKeyEntry]) -> Result<Vault, String> {
    let mut parsed = Vec::with_capacity(entries.len());
    for e in entries {
        let month = Month::parse(&e.month)
            .ok_or_else(|| format!("data key {:?}: month must be YYYY-MM", e.month))?;
        let secret = hex::decode(&e.secret_hex)
            .map_err(|_| format!("data key {month} v{}: secret_hex is not hex", e.version))?;
        parsed.push((month, e.version, secret));
    }
    Vault::new(parsed.iter().map(|(m, v, s)| (*m, *v, s.as_slice())))
}

/// Add a version-1 data key for each month from `from` to `from + ahead` that `file` has
/// no key for; returns them.
fn add_months(file: &mut KeyFile, from: Month, ahead: u16) -> Vec<Month> {
    let held: Vec<Option<Month>> = file
        .data_keys
        .iter()
        .map(|k| Month::parse(&k.month))
        .collect();
    let mut added = Vec::new();
    let mut m = from;
    for _ in 0..=ahead {
        if !held.contains(&Some(m)) {
            let secret: [u8; 32] = rand::random();
            file.data_keys.push(DataKeyEntry {
                month: m.to_string(),
                version: 1,
                secret_hex: hex::encode(secret),
            });
            added.push(m);
        }
        m = m.next();
    }
    added
}

fn months_due(file: &KeyFile, now_s: i64, keep: std::time::Duration) -> Vec<Month> {
    let keep_s = i64::try_from(keep.as_secs()).unwrap_or(i64::MAX);
    let mut due: Vec<Month> = file
        .data_keys
        .iter()
        .filter_map(|k| Month::parse(&k.month))
        .filter(|m| m.next().start_unix().saturating_add(keep_s) < now_s)
        .collect();
    due.sort();
    due.dedup();
    due
}

fn new_entry(version: u32, not_before: Timestamp) -> KeyEntry {
    let secret: [u8; 32] = rand::random();
    KeyEntry {
        version,
        not_before,
        secret_hex: hex::encode(secret),
    }
}

fn read_key_file(path: &Path) -> Result<KeyFile, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| KeyError::Invalid {
        path: path.display().to_string(),
        problem: e.to_string(),
    })
}

fn write_key_file(path: &Path, file: &KeyFile, create_new: bool) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    let text = toml::to_string(file).map_err(|e| KeyError::Invalid {
        path: path.display().to_string(),
        problem: e.to_string(),
    })?;
    let header = "# trackgate pseudonymization and data keys. SECRET: keep out of Redis, backups\n\
                  # of Redis and version control. Losing it makes stored pseudonyms unlinkable\n\
                  # and stored history unreadable; a [[data_key]] removed is that month destroyed.\n";
    // Write a sibling and rename, so a crash never leaves a half-written key file.
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let mut tmp = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new("."))).map_err(io)?;
    tmp.write_all(header.as_bytes()).map_err(io)?;
    tmp.write_all(text.as_bytes()).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    // NamedTempFile is created with mode 0600 on Unix.
    if create_new {
        tmp.persist_noclobber(path).map_err(|e| io(e.error))?;
    } else {
        tmp.persist(path).map_err(|e| io(e.error))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMEI: &str = "350000000000001"; // fake

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn imei() -> Result<Imei, &'static str> {
        Imei::new(IMEI).ok_or("valid test IMEI")
    }

    #[test]
    fn pseudonym_has_the_documented_shape_and_is_stable() -> TestResult {
        let ring = KeyRing::ephemeral();
        let imei = imei()?;
        let p = ring.pseudonym(&imei);
        assert_eq!(p, ring.pseudonym(&imei));
        assert!(p.as_str().starts_with("p1_"), "{p}");
        assert_eq!(p.as_str().len(), 3 + DIGEST_CHARS);
        assert_eq!(Pseudonym::parse(p.as_str()), Some(p.clone()));
        assert_eq!(p.key_version(), 1);
        assert!(!p.as_str().contains(IMEI));
        Ok(())
    }

    #[test]
    fn months_past_the_longest_retention_are_overdue_and_this_one_is_required() -> TestResult {
        let mut file = KeyFile {
            keys: vec![new_entry(1, Timestamp::UNIX_EPOCH)],
            data_keys: Vec::new(),
        };
        let old = Month::parse("2020-01").ok_or("month")?;
        add_months(&mut file, old, 0);
        let ring = KeyRing::from_file(&file)?;
        let now = Month::now();
        assert!(
            ring.check_data_months(now).is_err(),
            "no key for this month"
        );
        add_months(&mut file, now, MONTHS_AHEAD);
        let ring = KeyRing::from_file(&file)?;
        assert!(ring.check_data_months(now).is_ok());
        let keep = std::time::Duration::from_secs(90 * 86_400);
        let now_s = Timestamp::now().as_second();
        assert_eq!(ring.overdue_months(now_s, keep), [old]);
        assert_eq!(months_due(&file, now_s, keep), [old]);
        Ok(())
    }

    #[test]
    fn known_answer() -> TestResult {
        // HMAC-SHA256 with a fixed key: guards the construction against accidental change.
        let entry = KeyEntry {
            version: 3,
            not_before: Timestamp::UNIX_EPOCH,
            secret_hex: "00".repeat(32),
        };
        let ring = KeyRing::from_entries(&[entry])?;
        let p = ring.pseudonym(&imei()?);
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&[0u8; 32])?;
        mac.update(format!("imei:{IMEI}").as_bytes());
        let want = data_encoding::BASE32_NOPAD.encode(&mac.finalize().into_bytes())[..26]
            .to_ascii_lowercase();
        assert_eq!(p.as_str(), format!("p3_{want}"));
        Ok(())
    }

    #[test]
    fn imei_debug_is_redacted() -> TestResult {
        let imei = imei()?;
        assert!(!format!("{imei:?}").contains(IMEI));
        assert!(Imei::new("12345").is_none());
        assert!(Imei::new("35000000000000x").is_none());
        Ok(())
    }

    #[test]
    fn generate_rotate_load() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("keys.toml");
        KeyRing::generate(&path)?;
        assert!(
            KeyRing::generate(&path).is_err(),
            "never overwrites a key file"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)?.permissions().mode();
            assert_eq!(mode & 0o077, 0, "owner-only, got {mode:o}");
        }
        let imei = imei()?;
        let before = KeyRing::load(&path)?.pseudonym(&imei);
        let v = KeyRing::rotate(&path, Some(Timestamp::UNIX_EPOCH))?;
        assert_eq!(v, 2);
        let ring = KeyRing::load(&path)?;
        let after = ring.pseudonym(&imei);
        assert_eq!(after.key_version(), 2);
        assert_ne!(before, after);
        let all = ring.all_pseudonyms(&imei);
        assert!(all.contains(&before) && all.contains(&after));
        Ok(())
    }

    #[test]
    fn future_key_is_not_used_yet() -> TestResult {
        let now = Timestamp::now();
        let entries = [
            new_entry(1, Timestamp::UNIX_EPOCH),
            new_entry(2, now + jiff::SignedDuration::from_hours(1)),
        ];
        let ring = KeyRing::from_entries(&entries)?;
        assert_eq!(ring.pseudonym_at(&imei()?, now).key_version(), 1);
        Ok(())
    }
}
