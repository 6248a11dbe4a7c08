//! Collection control per device (DESIGN §7, issue 16 item 3): `active` (stored as
//! usual), `paused` (frames are acknowledged as usual, nothing is stored, counted in
//! `trackgate_fixes_not_stored_total{reason="paused"}`) or `blocked` (admin only: the
//! connection is closed once the device identifies itself, counted in
//! `trackgate_connections_blocked_total`).
//!
//! The state lives in `tg:{P}:state` under the device's pseudonym for every key version,
//! without a TTL (a paused device stores nothing, so it must outlive the data). A
//! connection reads it when the device identifies itself and again every
//! `retention.owner_refresh_s`, with the retention: a change reaches every gateway's open
//! connections within that time.

use redis::AsyncCommands;
use redis::aio::ConnectionLike;

use crate::pseudonym::Pseudonym;
use crate::store::keys::state_key;

/// A device's collection state.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Collection {
    #[default]
    Active,
    Paused,
    Blocked,
}

impl Collection {
    pub fn as_str(self) -> &'static str {
        match self {
            Collection::Active => "active",
            Collection::Paused => "paused",
            Collection::Blocked => "blocked",
        }
    }

    fn parse(s: &str) -> Option<Collection> {
        match s {
            "active" => Some(Collection::Active),
            "paused" => Some(Collection::Paused),
            "blocked" => Some(Collection::Blocked),
            _ => None,
        }
    }
}

/// The state of the device with these pseudonyms (every key version): the strictest one
/// found (`blocked` over `paused` over `active`). A value that cannot be read counts as
/// `paused`: nothing is stored on a guess.
pub async fn state_of<C: ConnectionLike + Send + Sync>(
    conn: &mut C,
    pseudonyms: &[Pseudonym],
) -> redis::RedisResult<Collection> {
    let mut out = Collection::Active;
    for p in pseudonyms {
        let v: Option<String> = conn.get(state_key(p)).await?;
        let s = match v {
            None => Collection::Active,
            Some(v) => Collection::parse(&v).unwrap_or(Collection::Paused),
        };
        out = out.max(s);
    }
    Ok(out)
}

/// Who changes a state: a customer cannot change a blocked device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Customer,
    Operator,
}

/// Set the state of the device with these pseudonyms (`active` removes the key). For a
/// customer, a blocked device stays blocked: false (checked and set in one step per key,
/// so a block landing meanwhile wins).
pub async fn set<C: ConnectionLike + Send + Sync>(
    conn: &mut C,
    pseudonyms: &[Pseudonym],
    state: Collection,
    by: By,
) -> redis::RedisResult<bool> {
    let mut all = true;
    for p in pseudonyms {
        all &= crate::store::scripts::collection_set(conn, p, state.as_str(), by == By::Operator)
            .await?;
    }
    Ok(all)
}

/// The device changed hands (or has no owner any more): a pause was the previous owner's
/// decision and goes; a block, the operator's, stays.
pub async fn owner_changed<C: ConnectionLike + Send + Sync>(
    conn: &mut C,
    pseudonyms: &[Pseudonym],
) -> redis::RedisResult<()> {
    set(conn, pseudonyms, Collection::Active, By::Customer)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_strictest_state_wins_and_names_round_trip() {
        assert!(Collection::Blocked > Collection::Paused);
        assert!(Collection::Paused > Collection::Active);
        for s in [Collection::Active, Collection::Paused, Collection::Blocked] {
            assert_eq!(Collection::parse(s.as_str()), Some(s));
        }
        assert_eq!(Collection::parse("Paused"), None);
    }
}
