//! One tracker connection: frames in, fixes to the write queue, replies out in order once
//! Redis has confirmed what they cover.
//!
//! A single task owns the socket. It reads frames through [`MeitrackCodec`] (a tokio-util
//! `Decoder` over the protocols framer) and keeps the replies it owes in a
//! `FuturesOrdered`, each waiting for its write job, so the device gets its
//! confirmations in the order it sent the frames, and never before the data is stored.
//! Reading pauses when `max_inflight_frames` replies are outstanding or the write queue is
//! full: a slow Redis slows the devices instead of filling memory.
//!
//! The connection is bound to the first IMEI it sends; the IMEI lives only in this task
//! (for the reply frames) and leaves it only as a pseudonym.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::sync::CancellationToken;
use trackgate_protocols::{FrameError, Framer, Message, MessageKind, Scan, decode, expected_reply};

use crate::collection::Collection;
use crate::config::Config;
use crate::metrics as m;
use crate::pseudonym::{Imei, KeyRing, Pseudonym};
use crate::retention::Retention;
use crate::sink::{Sink, SubmitError, WriteJob};
use crate::store::StoredFix;

/// What the codec yields. `Debug` never shows frame bytes (they hold the IMEI).
pub enum Inbound {
    /// A complete frame whose length, checksum, IMEI and command checked out.
    Frame(Bytes),
    /// A frame the framer rejected (the bytes are already skipped).
    Rejected(FrameError),
    /// The peer closed with this many bytes of an unfinished frame buffered.
    Truncated(usize),
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Inbound::Frame(b) => write!(f, "Frame({} bytes)", b.len()),
            Inbound::Rejected(e) => write!(f, "Rejected({e:?})"),
            Inbound::Truncated(n) => write!(f, "Truncated({n})"),
        }
    }
}

/// Codec failure: the connection cannot continue.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("fatal framing error: {0}")]
    Fatal(FrameError),
    #[error("{0} bytes of junk since the last frame")]
    TooMuchJunk(usize),
}

/// tokio-util `Decoder` over [`Framer`]: no copies (a frame is split off the read buffer),
/// junk skipped and counted, and too much junk since the last frame is an error.
#[derive(Debug)]
pub struct MeitrackCodec {
    framer: Framer,
    junk_since_frame: usize,
    max_junk_bytes: usize,
}

impl MeitrackCodec {
    pub fn new(framer: Framer, max_junk_bytes: usize) -> Self {
        MeitrackCodec {
            framer,
            junk_since_frame: 0,
            max_junk_bytes,
        }
    }
}

impl Decoder for MeitrackCodec {
    type Item = Inbound;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, CodecError> {
        loop {
            match self.framer.scan(src) {
                Scan::Frame(f) => {
                    let n = f.len();
                    self.junk_since_frame = 0;
                    return Ok(Some(Inbound::Frame(src.split_to(n).freeze())));
                }
                Scan::Incomplete { needed } => {
                    if let Some(n) = needed {
                        src.reserve(n);
                    }
                    return Ok(None);
                }
                Scan::Reject {
                    error: FrameError::Junk { .. },
                    skip,
                } => {
                    metrics::counter!(m::JUNK_BYTES).increment(skip as u64);
                    src.advance(skip);
                    self.junk_since_frame = self.junk_since_frame.saturating_add(skip);
                    if self.junk_since_frame > self.max_junk_bytes {
                        return Err(CodecError::TooMuchJunk(self.junk_since_frame));
                    }
                }
                Scan::Reject { error, skip } => {
                    src.advance(skip);
                    if error.is_fatal() {
                        return Err(CodecError::Fatal(error));
                    }
                    return Ok(Some(Inbound::Rejected(error)));
                }
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, CodecError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() => Ok(None),
            None => {
                let n = src.len();
                src.clear();
                Ok(Some(Inbound::Truncated(n)))
            }
        }
    }
}

/// Everything a connection needs from the gateway.
#[derive(Debug)]
pub struct Shared {
    pub config: Arc<Config>,
    pub keys: Arc<KeyRing>,
    pub sink: Sink,
    pub retention: Retention,
    pub framer: Framer,
    /// Fired at shutdown: stop reading, finish what was read.
    pub shutdown: CancellationToken,
    /// For per-connection lookups (the owner's retention), not for writes.
    pub redis: crate::redis_conn::RedisConn,
    pub hot: m::HotMetrics,
}

/// Wait for an optional timer (never resolves without one).
async fn poll_timer(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timer.as_mut() {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// A reply waiting for its write job.
type PendingAck = Pin<Box<dyn Future<Output = AckReady> + Send>>;

/// The replies a connection owes, in read order, and when each frame was read (the
/// oldest bounds the wait for Redis: `limits.ack_wait_timeout_s`).
#[derive(Default)]
struct PendingAcks {
    acks: FuturesOrdered<PendingAck>,
    read_at: std::collections::VecDeque<tokio::time::Instant>,
}

impl PendingAcks {
    fn push(&mut self, ack: PendingAck, read_at: Instant) {
        self.acks.push_back(ack);
        self.read_at
            .push_back(tokio::time::Instant::from_std(read_at));
    }

    async fn next(&mut self) -> Option<AckReady> {
        let ready = self.acks.next().await;
        if ready.is_some() {
            self.read_at.pop_front();
        }
        ready
    }

    fn is_empty(&self) -> bool {
        self.acks.is_empty()
    }

    fn len(&self) -> usize {
        self.acks.len()
    }

    /// When the oldest unanswered frame was read (now if none).
    fn oldest_read_at(&self) -> tokio::time::Instant {
        self.read_at
            .front()
            .copied()
            .unwrap_or_else(tokio::time::Instant::now)
    }
}

struct AckReady {
    stored: bool,
    reply: Option<Vec<u8>>,
    kind: &'static str,
    read_at: Instant,
}

struct Device {
    imei: Imei,
    /// The IMEI's digits as hex (how raw extras store them), for scrubbing; made once.
    imei_hex: String,
    pseudonym: Pseudonym,
    /// Its pseudonyms under the older key versions, newest first: ownership is looked up
    /// under every version (`pseudonym` first). Empty, and no allocation, with one key.
    older: Box<[Pseudonym]>,
    /// The retention of this device's fixes (its owner's agreement, or the default).
    /// Provisional ([`Retention::provisional_ttl`], the longest a device can have) while
    /// the lookup fails when the device identifies itself: looked up again with the
    /// frames that follow (at most every `redis.retry_backoff_max_ms`). What was written
    /// meanwhile follows the right retention from the first write after (the append
    /// script resets the expiry and trims when a device's retention changes; the sweeper
    /// then trims exactly).
    ttl: Duration,
    /// Whether its fixes are stored (`crate::collection`), looked up with the retention.
    collection: Collection,
    /// When to look the retention up next: `retention.owner_refresh_s` after a success,
    /// `redis.retry_backoff_max_ms` after a failure.
    next_lookup: Instant,
}

/// Why a connection ended (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Eof,
    HandshakeTimeout,
    IdleTimeout,
    BadFrames,
    Junk,
    FatalFrame,
    Io,
    WriteTimeout,
    AckTimeout,
    Shutdown,
    QueueClosed,
    /// The device is blocked (`crate::collection`).
    Blocked,
}

impl CloseReason {
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Eof => "eof",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::BadFrames => "bad_frames",
            CloseReason::Junk => "junk",
            CloseReason::FatalFrame => "fatal_frame",
            CloseReason::Io => "io_error",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::AckTimeout => "ack_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::QueueClosed => "queue_closed",
            CloseReason::Blocked => "blocked",
        }
    }
}

/// Serve one connection until it closes. `handshake_deadline` bounds the time to the
/// first frame (the TLS handshake, if any, already spent part of it).
pub async fn serve<S>(stream: S, peer: SocketAddr, shared: Arc<Shared>, handshake_deadline: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &shared.config.limits;
    let codec = MeitrackCodec::new(shared.framer, shared.config.limits.max_junk_bytes);
    let mut framed = FramedRead::with_capacity(stream, codec, limits.read_buffer_bytes);
    let mut conn = Conn {
        shared: shared.clone(),
        device: None,
        bad_in_row: 0,
        last_read_at: Instant::now(),
    };
    let mut pending = PendingAcks::default();
    let ack_wait = Duration::from_secs(limits.ack_wait_timeout_s);
    let idle = Duration::from_secs(limits.idle_timeout_s);
    let write_timeout = Duration::from_secs(limits.write_timeout_s);
    let hot = &shared.hot;
    let mut deadline = tokio::time::Instant::from_std(handshake_deadline);
    let mut reading = true;
    // One timer for the ACK wait, armed when replies are owed and re-armed only when it
    // fires (to the then oldest frame's bound): a timer per frame cost a visible share of
    // the gateway's CPU. Boxed on first use: idle connections (most) never carry one.
    let mut ack_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut ack_armed = false;

    let reason = loop {
        if !reading && pending.is_empty() {
            break CloseReason::Shutdown;
        }
        if !ack_armed && !pending.is_empty() {
            let due = pending.oldest_read_at() + ack_wait;
            match ack_timer.as_mut() {
                Some(t) => t.as_mut().reset(due),
                None => ack_timer = Some(Box::pin(tokio::time::sleep_until(due))),
            }
            ack_armed = true;
        }
        tokio::select! {
            biased;
            Some(ack) = pending.next(), if !pending.is_empty() => {
                if let Some(reason) = send_ack(framed.get_mut(), ack, write_timeout, hot).await {
                    break reason;
                }
                // Time spent waiting for Redis (reading paused) is not the device's idleness.
                deadline = deadline.max(tokio::time::Instant::now() + idle);
            }
            // Only while reading is paused (at max_inflight_frames, or shutting down):
            // otherwise the device's hang-up or idleness is seen by reading, and polling
            // the timer every turn showed in the profile.
            () = poll_timer(&mut ack_timer), if ack_armed && (!reading || pending.len() >= limits.max_inflight_frames) => {
                let due = pending.oldest_read_at() + ack_wait;
                if pending.is_empty() {
                    ack_armed = false;
                } else if due <= tokio::time::Instant::now() {
                    break CloseReason::AckTimeout;
                } else if let Some(t) = ack_timer.as_mut() {
                    t.as_mut().reset(due);
                }
            }
            () = shared.shutdown.cancelled(), if reading => {
                reading = false;
                // Bytes the device already sent (in our buffer or the kernel's) are received
                // data: store and confirm them too. Read until the socket has been quiet for
                // a moment (the reactor may not have seen the last bytes yet,
                // limits.shutdown_quiet_ms), at most limits.shutdown_read_max_ms in all.
                // Not capped by max_inflight_frames: these bytes were sent before the
                // shutdown and are worth storing; shutdown_read_max_ms bounds the frames'
                // handling too (a full write queue), not only the reads, so the work stays
                // bounded by time and the write queue.
                let until = tokio::time::Instant::now()
                    + Duration::from_millis(limits.shutdown_read_max_ms);
                let quiet_for = Duration::from_millis(limits.shutdown_quiet_ms);
                loop {
                    let quiet = until.min(tokio::time::Instant::now() + quiet_for);
                    let Ok(Some(Ok(item))) = tokio::time::timeout_at(quiet, framed.next()).await else {
                        break;
                    };
                    match item {
                        Inbound::Frame(raw) => match tokio::time::timeout_at(until, conn.frame(raw)).await {
                            Ok(Ok(Some(ack))) => pending.push(ack, conn.last_read_at),
                            Ok(Ok(None)) => {}
                            Ok(Err(_)) | Err(_) => break,
                        },
                        other => conn.inbound_error(&other),
                    }
                }
            }
            item = tokio::time::timeout_at(deadline, framed.next()),
                if reading && pending.len() < limits.max_inflight_frames =>
            {
                let item = match item {
                    Err(_) if conn.device.is_none() => break CloseReason::HandshakeTimeout,
                    Err(_) => break CloseReason::IdleTimeout,
                    Ok(None) => break CloseReason::Eof,
                    Ok(Some(Err(CodecError::Io(_)))) => break CloseReason::Io,
                    Ok(Some(Err(CodecError::Fatal(e)))) => {
                        conn.frame_error(e.kind(), &e.to_string());
                        break CloseReason::FatalFrame;
                    }
                    Ok(Some(Err(CodecError::TooMuchJunk(n)))) => {
                        tracing::warn!(
                            junk_bytes = n,
                            "closing: junk without a frame beyond limits.max_junk_bytes"
                        );
                        break CloseReason::Junk;
                    }
                    Ok(Some(Ok(item))) => item,
                };
                match item {
                    Inbound::Frame(raw) => {
                        // Waiting for room in a full write queue (or a gated shard) is
                        // bounded like waiting for the ACK (in `frame`).
                        let result = conn.frame(raw).await;
                        // After the frame is queued: waiting for queue room is not idleness.
                        deadline = tokio::time::Instant::now() + idle;
                        match result {
                            Ok(Some(ack)) => pending.push(ack, conn.last_read_at),
                            Ok(None) => {}
                            Err(reason) => break reason,
                        }
                    }
                    other => conn.inbound_error(&other),
                }
                if conn.bad_in_row >= limits.max_consecutive_bad_frames {
                    break CloseReason::BadFrames;
                }
            }
        }
    };

    // Whatever was read is still written (the jobs are queued either way). Confirm it if
    // the device can still hear us; a dead socket does not wait, so its connection slot is
    // freed at once. Waiting is bounded by the idle timeout (shutdown by the grace period).
    if !matches!(
        reason,
        CloseReason::Eof | CloseReason::Io | CloseReason::WriteTimeout | CloseReason::AckTimeout
    ) {
        let drain = async {
            while let Some(ack) = pending.next().await {
                if send_ack(framed.get_mut(), ack, write_timeout, hot)
                    .await
                    .is_some()
                {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(idle, drain).await;
    }
    // Bounded: a TLS close_notify to a peer that stopped reading must not hold the slot.
    let _ = tokio::time::timeout(write_timeout, framed.get_mut().shutdown()).await;
    metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => reason.label()).increment(1);
    match &conn.device {
        Some(d) => {
            tracing::debug!(%peer, device = %d.pseudonym, reason = reason.label(), "connection closed")
        }
        None => {
            tracing::debug!(%peer, reason = reason.label(), "connection closed before a valid frame")
        }
    }
}

/// Write one reply; `Some(reason)` if the connection must close.
async fn send_ack<S: AsyncWrite + Unpin>(
    stream: &mut S,
    ack: AckReady,
    write_timeout: Duration,
    hot: &m::HotMetrics,
) -> Option<CloseReason> {
    if !ack.stored {
        // The write was abandoned (shutdown grace over): no confirmation, ever.
        return None;
    }
    let reply = ack.reply?;
    match tokio::time::timeout(write_timeout, stream.write_all(&reply)).await {
        Ok(Ok(())) => {
            hot.ack_sent(ack.kind).increment(1);
            hot.ack_seconds.record(ack.read_at.elapsed().as_secs_f64());
            None
        }
        Ok(Err(_)) => Some(CloseReason::Io),
        Err(_) => Some(CloseReason::WriteTimeout),
    }
}

struct Conn {
    shared: Arc<Shared>,
    device: Option<Device>,
    bad_in_row: u32,
    /// When the frame being handled was read (one clock read per frame, shared).
    last_read_at: Instant,
}

impl Conn {
    /// A rejected or truncated frame: counted and logged (never silently dropped).
    fn inbound_error(&mut self, item: &Inbound) {
        match item {
            Inbound::Frame(_) => {}
            Inbound::Rejected(e) => self.frame_error(e.kind(), &e.to_string()),
            Inbound::Truncated(n) => self.frame_error(
                "incomplete",
                &format!("connection closed {n} bytes into a frame"),
            ),
        }
    }

    fn frame_error(&mut self, kind: &'static str, detail: &str) {
        self.bad_in_row += 1;
        metrics::counter!(m::FRAME_ERRORS, "kind" => kind).increment(1);
        // No IMEI here: frame errors carry offsets and field names only.
        match &self.device {
            Some(d) => tracing::warn!(device = %d.pseudonym, kind, detail, "frame rejected"),
            None => tracing::warn!(
                kind,
                detail,
                "frame rejected before the device identified itself"
            ),
        }
    }

    /// Handle one checked frame; returns the reply to wait for, if any.
    async fn frame(&mut self, raw: Bytes) -> Result<Option<PendingAck>, CloseReason> {
        let read_at = Instant::now();
        self.last_read_at = read_at;
        let received_ms = jiff::Timestamp::now().as_millisecond();
        let Scan::Frame(frame) = self.shared.framer.scan(&raw) else {
            // The codec already checked this exact slice; a mismatch is a bug, not input.
            self.frame_error("framing", "frame did not re-scan");
            return Ok(None);
        };
        let kind = frame.command_str();
        // Bind the connection to its first IMEI; refuse any other on it.
        let pseudonym = match &self.device {
            Some(d) if d.imei.expose() == frame.imei() => d.pseudonym.clone(),
            Some(_) => {
                self.frame_error(
                    "imei_mismatch",
                    "frame from another IMEI on a bound connection",
                );
                return Ok(None);
            }
            None => {
                let Some(imei) = Imei::new(frame.imei()) else {
                    self.frame_error("imei", "IMEI not 14-15 digits");
                    return Ok(None);
                };
                let pseudonym = self.shared.keys.pseudonym(&imei);
                let mut owners = self.shared.keys.all_pseudonyms(&imei);
                owners.sort_by_key(|p| std::cmp::Reverse(p.key_version()));
                let looked_up = self.lookup_ttl(&owners).await;
                owners.retain(|p| *p != pseudonym);
                let ttl =
                    looked_up.map_or_else(|| self.shared.retention.provisional_ttl(), |(t, _)| t);
                // A failed lookup stores provisionally (as before this state existed); the
                // next frames look again.
                let collection = looked_up.map_or(Collection::Active, |(_, c)| c);
                if looked_up.is_none() {
                    tracing::warn!(device = %pseudonym, ttl_s = ttl.as_secs(), "retention lookup failed: the longest retention applies provisionally, corrected with the next frame that finds it");
                }
                tracing::debug!(device = %pseudonym, ttl_s = ttl.as_secs(), "device identified");
                self.device = Some(Device {
                    imei_hex: hex::encode(imei.expose()),
                    imei,
                    pseudonym: pseudonym.clone(),
                    older: owners.into_boxed_slice(),
                    ttl,
                    collection,
                    next_lookup: self.next_lookup(looked_up.is_some()),
                });
                pseudonym
            }
        };
        self.refresh_ttl(read_at).await;
        let collection = self
            .device
            .as_ref()
            .map_or(Collection::Active, |d| d.collection);
        if collection == Collection::Blocked {
            metrics::counter!(m::CONNECTIONS_BLOCKED).increment(1);
            tracing::info!(device = %pseudonym, "device blocked: connection closed");
            return Err(CloseReason::Blocked);
        }
        let msg = match decode(&frame) {
            Ok(msg) => msg,
            Err(e) => {
                metrics::counter!(m::FRAMES, "type" => type_label(kind), "outcome" => "decode_error").increment(1);
                metrics::counter!(m::DECODE_ERRORS, "scope" => "frame", "reason" => e.reason())
                    .increment(1);
                self.frame_error("decode", &e.to_string());
                return Ok(None);
            }
        };
        self.bad_in_row = 0;
        let outcome = if let MessageKind::Other(_) = msg.kind {
            // Well-formed, but nothing we model (no position, no reply owed): counted and
            // logged, never stored. The command is 3 checked alphanumerics, safe to log.
            tracing::warn!(device = %pseudonym, command = kind, "frame with an unknown command ignored");
            "unknown_command"
        } else {
            "ok"
        };
        if outcome == "ok" {
            self.shared.hot.frame_ok(type_label(kind)).increment(1);
        } else {
            metrics::counter!(m::FRAMES, "type" => type_label(kind), "outcome" => outcome)
                .increment(1);
        }
        for e in &msg.rejected {
            metrics::counter!(m::RECORDS_REJECTED).increment(1);
            metrics::counter!(m::DECODE_ERRORS, "scope" => "record", "reason" => e.reason())
                .increment(1);
            tracing::warn!(device = %pseudonym, command = kind, detail = %e, "record in batch skipped");
        }
        let fixes = if collection == Collection::Paused {
            // Acknowledged as usual (the device drops them), never stored.
            metrics::counter!(m::FIXES_NOT_STORED, "reason" => "paused")
                .increment(msg.fixes.len() as u64);
            Ok(Vec::new())
        } else {
            self.stored_fixes(&msg, &pseudonym)
        };
        let fixes = match fixes {
            Ok(fixes) => fixes,
            Err(e) => {
                // No data key for this month or a later one (the key file was not extended
                // ahead; `serve` refuses to start that way): nothing is stored, nothing
                // confirmed, the device keeps the fixes and sends them again.
                metrics::counter!(m::FIXES_NOT_STORED, "reason" => "no_data_key")
                    .increment(msg.fixes.len() as u64);
                tracing::error!(device = %pseudonym, error = %e, "fixes not stored: run `trackgate keys months` on the key file and restart");
                let ready = AckReady {
                    stored: false,
                    reply: None,
                    kind: type_label(kind),
                    read_at,
                };
                return Ok(Some(Box::pin(async move { ready })));
            }
        };
        let reply = expected_reply(&msg, self.shared.config.protocol.confirm_cce).and_then(|r| {
            let mut out = Vec::with_capacity(48);
            r.encode(frame.flag(), frame.imei(), &mut out)
                .ok()
                .map(|()| out)
        });
        let label = type_label(kind);
        if fixes.is_empty() {
            if reply.is_none() {
                return Ok(None);
            }
            let ready = AckReady {
                stored: true,
                reply,
                kind: label,
                read_at,
            };
            return Ok(Some(Box::pin(async move { ready })));
        }
        let (done_tx, done_rx) = oneshot::channel();
        let job = WriteJob {
            ttl: self.device_ttl(),
            device: pseudonym,
            fixes,
            received_ms,
            done: Some(done_tx),
        };
        let wait = Duration::from_secs(self.shared.config.limits.ack_wait_timeout_s);
        match self.shared.sink.submit_within(job, wait).await {
            Ok(()) => {}
            Err(SubmitError::Closed) => return Err(CloseReason::QueueClosed),
            Err(SubmitError::TimedOut) => return Err(CloseReason::AckTimeout),
        }
        Ok(Some(Box::pin(async move {
            AckReady {
                stored: done_rx.await.is_ok(),
                reply,
                kind: label,
                read_at,
            }
        })))
    }

    /// One lookup of the retention and the collection state of the device with these
    /// pseudonyms; `None` (counted) if Redis failed or did not answer within
    /// `retention.lookup_timeout_ms`.
    async fn lookup_ttl(&self, owners: &[Pseudonym]) -> Option<(Duration, Collection)> {
        let wait = Duration::from_millis(self.shared.config.retention.lookup_timeout_ms);
        let mut redis = self.shared.redis.clone();
        let both = async {
            let ttl = self.shared.retention.ttl_for(&mut redis, owners).await?;
            let state = crate::collection::state_of(&mut redis, owners).await?;
            redis::RedisResult::Ok((ttl, state))
        };
        match tokio::time::timeout(wait, both).await {
            Ok(Ok(found)) => Some(found),
            _ => {
                metrics::counter!(m::RETENTION_LOOKUP_FAILURES).increment(1);
                None
            }
        }
    }

    /// When to look a device's retention up next, after a lookup that `succeeded` or not.
    fn next_lookup(&self, succeeded: bool) -> Instant {
        let c = &self.shared.config;
        Instant::now()
            + if succeeded {
                Duration::from_secs(c.retention.owner_refresh_s)
            } else {
                Duration::from_millis(c.redis.retry_backoff_max_ms)
            }
    }

    /// Look the bound device's retention up again when due: `retention.owner_refresh_s`
    /// after the last success (a new owner, a changed agreement), soon after a failure.
    /// A failed refresh keeps the last answer.
    async fn refresh_ttl(&mut self, now: Instant) {
        let Some(owners) = self
            .device
            .as_ref()
            .filter(|d| now >= d.next_lookup)
            .map(|d| {
                std::iter::once(d.pseudonym.clone())
                    .chain(d.older.iter().cloned())
                    .collect::<Vec<_>>()
            })
        else {
            return;
        };
        let fresh = self.lookup_ttl(&owners).await;
        let next = self.next_lookup(fresh.is_some());
        let Some(d) = self.device.as_mut() else {
            return;
        };
        d.next_lookup = next;
        if let Some((ttl, collection)) = fresh {
            if ttl != d.ttl {
                tracing::info!(device = %d.pseudonym, ttl_s = ttl.as_secs(), "device retention changed");
            }
            if collection != d.collection {
                tracing::info!(device = %d.pseudonym, state = collection.as_str(), "device collection state changed");
            }
            d.ttl = ttl;
            d.collection = collection;
        }
    }

    /// The bound device's retention (a frame is only handled once its device is bound).
    fn device_ttl(&self) -> Duration {
        self.device
            .as_ref()
            .map_or(self.shared.retention.default_ttl(), |d| d.ttl)
    }

    /// The message's fixes laid out for storage (device `p`'s, payloads sealed with this
    /// month's data key), minus those already past retention.
    fn stored_fixes(
        &self,
        msg: &Message<'_>,
        p: &Pseudonym,
    ) -> Result<Vec<StoredFix>, crate::store::vault::VaultError> {
        let ttl = self.device_ttl();
        let now_s = jiff::Timestamp::now().as_second();
        let month =
            crate::store::vault::Month::of_unix(now_s).unwrap_or(crate::store::vault::Month(0));
        let vault = self.shared.keys.vault();
        let mut out = Vec::with_capacity(msg.fixes.len());
        for fix in &msg.fixes {
            self.shared.hot.fixes_received.increment(1);
            let fix_time_s = fix.time.map(|t| t.as_second());
            if self
                .shared
                .retention
                .expired_at_ingest(fix_time_s, ttl, now_s)
            {
                metrics::counter!(m::FIXES_EXPIRED_AT_INGEST).increment(1);
                continue; // checked before packing: expired fixes cost nothing more
            }
            let stored = StoredFix::from_fix(msg.kind, fix);
            let stored = match &self.device {
                Some(d) => stored.scrubbed_with(d.imei.expose(), &d.imei_hex),
                None => stored,
            };
            out.push(stored.sealed(vault, p, month)?);
        }
        Ok(out)
    }
}

/// Bounded metric label for a command (device-chosen strings must not mint series).
fn type_label(cmd: &str) -> &'static str {
    match cmd {
        "AAA" => "AAA",
        "AFF" => "AFF",
        "CCE" => "CCE",
        "CCC" => "CCC",
        "AAC" => "AAC",
        "D00" => "D00",
        "D03" => "D03",
        "D82" => "D82",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AAC: &[u8] = b"$$z27,350000000000099,AAC,1*B9\r\n";

    fn codec() -> MeitrackCodec {
        MeitrackCodec::new(Framer::default().with_early_resync(true), 64)
    }

    #[test]
    fn junk_beyond_the_limit_since_the_last_frame_is_an_error() {
        let mut c = codec();
        // 60 bytes of noise, a frame (resets the count), 60 more: under the limit each time.
        let mut buf = BytesMut::from(&[b'x'; 60][..]);
        buf.extend_from_slice(AAC);
        buf.extend_from_slice(&[b'y'; 60]);
        assert!(matches!(c.decode(&mut buf), Ok(Some(Inbound::Frame(_)))));
        assert!(matches!(c.decode(&mut buf), Ok(None)));
        // 10 more bytes of noise cross the 64-byte limit.
        buf.extend_from_slice(&[b'z'; 10]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(CodecError::TooMuchJunk(70))
        ));
    }

    #[test]
    fn codec_skips_junk_and_splits_frames() {
        let mut buf = BytesMut::from(&b"noise"[..]);
        buf.extend_from_slice(AAC);
        buf.extend_from_slice(&AAC[..10]);
        let mut c = codec();
        match c.decode(&mut buf).unwrap() {
            Some(Inbound::Frame(f)) => assert_eq!(&f[..], AAC),
            other => panic!("{other:?}"),
        }
        assert!(c.decode(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), 10, "the partial frame stays buffered");
        match c.decode_eof(&mut buf).unwrap() {
            Some(Inbound::Truncated(10)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn codec_reports_rejections_and_fatal_lengths() {
        let mut bad = AAC.to_vec();
        bad[27] = b'0'; // checksum digit
        let mut buf = BytesMut::from(&bad[..]);
        let mut c = codec();
        assert!(matches!(c.decode(&mut buf), Ok(Some(Inbound::Rejected(_)))));
        let mut buf = BytesMut::from(&b"$$A99999,"[..]);
        assert!(matches!(c.decode(&mut buf), Err(CodecError::Fatal(_))));
    }
}
