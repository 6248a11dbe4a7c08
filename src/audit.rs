//! The audit trail: an append-only stream `tg:audit` of privacy actions (purge requested
//! and completed, export, ownership change, token issued or revoked). Entries name the
//! actor, the action, the device by pseudonym(s) and the outcome; never a raw IMEI.

use redis::aio::ConnectionLike;

pub use crate::store::keys::AUDIT_KEY;

/// One audit line.
#[derive(Debug, Clone)]
pub struct AuditEvent<'a> {
    /// `customer:<id>` or `admin`.
    pub actor: &'a str,
    /// e.g. `purge.requested`, `purge.completed`, `export`, `device.assign`.
    pub action: &'a str,
    /// Pseudonyms, comma-separated (empty when not about a device).
    pub devices: &'a str,
    /// `ok`, `denied`, `pending`, `failed`.
    pub outcome: &'a str,
    /// Free text without personal data (ids, counts).
    pub detail: &'a str,
}

/// Append `event`. Callers treat a failure as the action's failure: an action that cannot
/// be audited is not carried out silently.
pub async fn append<C: ConnectionLike + Send>(
    conn: &mut C,
    event: &AuditEvent<'_>,
) -> redis::RedisResult<()> {
    redis::cmd("XADD")
        .arg(AUDIT_KEY)
        .arg("*")
        .arg("actor")
        .arg(event.actor)
        .arg("action")
        .arg(event.action)
        .arg("devices")
        .arg(event.devices)
        .arg("outcome")
        .arg(event.outcome)
        .arg("detail")
        .arg(event.detail)
        .query_async(conn)
        .await
}

/// Append a successful admin action (actor `admin`).
pub async fn admin<C: ConnectionLike + Send>(
    conn: &mut C,
    action: &str,
    devices: &str,
    detail: &str,
) -> redis::RedisResult<()> {
    append(
        conn,
        &AuditEvent {
            actor: "admin",
            action,
            devices,
            outcome: "ok",
            detail,
        },
    )
    .await
}
