//! Finds Meitrack frames in a byte buffer.
//!
//! ```text
//! $$ <flag> <len> , <imei> , <cmd> [, <payload>] * <cs> \r\n
//! ```
//! `<len>` counts the bytes from the first `,` through the final `\n`. Binary payloads (CCE,
//! CCC) may contain any byte, so the framer trusts `<len>` and only then checks that the
//! declared end really is `*XX\r\n` and that the checksum matches. It never copies: a
//! [`Frame`] borrows the caller's buffer, and the caller removes `frame.len()` bytes (or
//! `skip` bytes after a rejection) before scanning again. That makes the framer behave
//! identically whether bytes arrive whole, byte by byte or in random chunks.

use crate::checksum::{checksum, hex_value};
use crate::error::FrameError;

/// Default cap on one frame: the largest real frames (photo chunks, full CCE batches) stay
/// under ~1.1 KB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 2048;

/// Upper bound on any configured cap (1 MiB): keeps the length arithmetic far from
/// overflow and a hostile length from pinning memory.
pub const MAX_FRAME_BYTES_LIMIT: usize = 1 << 20;

/// Which side sent the frames being scanned; selects the start marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Tracker → server frames, starting `$$`.
    DeviceToServer,
    /// Server → tracker frames (replies, commands), starting `@@`.
    ServerToDevice,
}

impl Direction {
    /// The start-marker byte (written twice).
    pub fn marker(self) -> u8 {
        match self {
            Direction::DeviceToServer => b'$',
            Direction::ServerToDevice => b'@',
        }
    }
}

/// One checked frame, borrowing the scanned buffer.
///
/// `Debug` shows the command and sizes but never the bytes: a frame carries the device's
/// IMEI, which must not reach a log line through a `{:?}`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    raw: &'a [u8],
    imei_start: usize,
    imei_end: usize,
    payload_start: usize,
    payload_end: usize,
}

impl std::fmt::Debug for Frame<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("len", &self.raw.len())
            .field("command", &self.command_str())
            .field("payload_len", &(self.payload_end - self.payload_start))
            .finish_non_exhaustive()
    }
}

impl<'a> Frame<'a> {
    /// The whole frame, from the first marker byte through `\n`.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Number of bytes the frame occupies in the buffer (consume this many).
    #[allow(clippy::len_without_is_empty)] // a frame is never empty
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// The data identifier / sequence flag; replies reuse it.
    pub fn flag(&self) -> u8 {
        self.raw[2]
    }

    /// The IMEI as sent (14 or 15 ASCII digits; checked by the framer).
    pub fn imei(&self) -> &'a str {
        // The framer checked these bytes are ASCII digits.
        std::str::from_utf8(&self.raw[self.imei_start..self.imei_end]).unwrap_or("")
    }

    /// The three-character command (`AAA`, `CCE`, …).
    pub fn command(&self) -> [u8; 3] {
        let c = self.imei_end + 1;
        [self.raw[c], self.raw[c + 1], self.raw[c + 2]]
    }

    /// The command as text (`"AAA"`).
    pub fn command_str(&self) -> &'a str {
        let c = self.imei_end + 1;
        std::str::from_utf8(&self.raw[c..c + 3]).unwrap_or("???")
    }

    /// Payload bytes between `<cmd>,` and `*` (empty when the command has none).
    pub fn payload(&self) -> &'a [u8] {
        &self.raw[self.payload_start..self.payload_end]
    }

    /// Offset of the payload's first byte within the frame, for error reporting.
    pub fn payload_offset(&self) -> usize {
        self.payload_start
    }
}

/// What [`Framer::scan`] found at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan<'a> {
    /// A complete, checked frame at offset 0; consume `frame.len()` bytes.
    Frame(Frame<'a>),
    /// The buffer holds the beginning of a frame (or nothing); read more bytes.
    /// `needed` is the number of missing bytes when the length is already known.
    Incomplete { needed: Option<usize> },
    /// The bytes at offset 0 are not (the start of) a valid frame: drop `skip` bytes
    /// (always ≥ 1) and scan again.
    Reject { error: FrameError, skip: usize },
}

/// Frame scanner with its limits. Cheap to copy; holds no buffer.
#[derive(Debug, Clone, Copy)]
pub struct Framer {
    marker: u8,
    max_frame_bytes: usize,
    max_len_digits: usize,
    early_resync: bool,
}

impl Default for Framer {
    fn default() -> Self {
        Framer::new(Direction::DeviceToServer, DEFAULT_MAX_FRAME_BYTES)
    }
}

/// Smallest possible `<len>`: `,` + 14-digit IMEI + `,` + 3-byte command + `*XX\r\n`.
const MIN_DECLARED_LEN: usize = 1 + 14 + 1 + 3 + 5;

impl Framer {
    /// A framer for `direction` refusing frames longer than `max_frame_bytes` in total
    /// (clamped to [`MAX_FRAME_BYTES_LIMIT`]).
    pub fn new(direction: Direction, max_frame_bytes: usize) -> Self {
        let max_frame_bytes = max_frame_bytes.clamp(1, MAX_FRAME_BYTES_LIMIT);
        let max_len_digits = max_frame_bytes.ilog10() as usize + 1;
        Framer {
            marker: direction.marker(),
            max_frame_bytes,
            max_len_digits,
            early_resync: false,
        }
    }

    /// Give up on a frame whose declared length has not arrived yet as soon as the bytes
    /// show the length is wrong: the buffer already ends in a complete `*XX\r\n` trailer
    /// with a matching checksum (a device that overstates its length), or a complete,
    /// valid frame starts after the header (a corrupted header). Such a frame is rejected
    /// as a `length` error at once instead of waiting for bytes that may never come:
    /// on a live connection the device is waiting for its ACK and sends nothing more.
    ///
    /// Off by default because it changes the outcome at the *end* of an input (a short
    /// frame at the end of a file is `length`, not `incomplete`); anywhere else in a
    /// stream the result is the same, only earlier. The gateway turns it on.
    pub fn with_early_resync(mut self, on: bool) -> Self {
        self.early_resync = on;
        self
    }

    /// The cap on one frame, in bytes.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Look at the start of `buf`.
    pub fn scan<'a>(&self, buf: &'a [u8]) -> Scan<'a> {
        let m = self.marker;
        // 1. Anything before the next marker pair is junk.
        if buf.len() < 2 || buf[0] != m || buf[1] != m {
            return self.skip_junk(buf);
        }
        // 2. Flag: one printable byte that is not a separator.
        let Some(&flag) = buf.get(2) else {
            return Scan::Incomplete { needed: None };
        };
        if !(0x21..=0x7e).contains(&flag) || flag == b',' || flag == b'*' {
            return header_error(2, "flag");
        }
        // 3. Length digits up to the first comma: one more than the cap needs (a leading
        // zero). The same limit applies whether or not the comma has arrived yet, so the
        // verdict never depends on where the socket cut the bytes.
        let max_digits = self.max_len_digits + 1;
        let mut declared = 0usize;
        let mut i = 3;
        loop {
            let Some(&b) = buf.get(i) else {
                return if i - 3 > max_digits {
                    header_error(i, "length")
                } else {
                    Scan::Incomplete { needed: None }
                };
            };
            match b {
                b'0'..=b'9' if i - 3 < max_digits => {
                    declared = declared * 10 + usize::from(b - b'0');
                    i += 1;
                    // More digits only make it larger: say "too long" as soon as it is
                    // certain, so the verdict does not depend on whether the comma has
                    // arrived yet.
                    if i + declared > self.max_frame_bytes {
                        return oversized(declared, self.max_frame_bytes);
                    }
                }
                b',' if i > 3 => break,
                _ => return header_error(i, "length"),
            }
        }
        let comma = i;
        let total = comma + declared;
        if total > self.max_frame_bytes {
            return oversized(declared, self.max_frame_bytes);
        }
        if declared < MIN_DECLARED_LEN {
            return header_error(3, "length");
        }
        if buf.len() < total {
            if self.early_resync && self.length_is_wrong(buf, comma) {
                return length_error(3);
            }
            return Scan::Incomplete {
                needed: Some(total - buf.len()),
            };
        }
        let raw = &buf[..total];
        // 4. The declared end must be `*XX\r\n`.
        let star = total - 5;
        let (Some(hi), Some(lo)) = (hex_value(raw[total - 4]), hex_value(raw[total - 3])) else {
            return length_error(star);
        };
        if raw[star] != b'*' || raw[total - 2] != b'\r' || raw[total - 1] != b'\n' {
            return length_error(star);
        }
        // From here on the frame's boundaries are consistent, so a rejection skips it whole.
        let declared_cs = hi << 4 | lo;
        let computed = checksum(&raw[..=star]);
        if declared_cs != computed {
            return Scan::Reject {
                error: FrameError::Checksum {
                    offset: total - 4,
                    declared: declared_cs,
                    computed,
                },
                skip: total,
            };
        }
        // 5. IMEI: 14-15 digits up to the next comma.
        let imei_start = comma + 1;
        let imei_len = raw[imei_start..star]
            .iter()
            .position(|&b| b == b',')
            .unwrap_or(star - imei_start);
        let imei_end = imei_start + imei_len;
        if !(14..=15).contains(&imei_len)
            || !raw[imei_start..imei_end].iter().all(u8::is_ascii_digit)
            || imei_end == star
        {
            return Scan::Reject {
                error: FrameError::Imei { offset: imei_start },
                skip: total,
            };
        }
        // 6. Command: three alphanumerics, then `,payload` or directly `*`.
        let cmd = imei_end + 1;
        let cmd_ok = cmd + 3 <= star
            && raw[cmd..cmd + 3].iter().all(u8::is_ascii_alphanumeric)
            && (cmd + 3 == star || raw[cmd + 3] == b',');
        if !cmd_ok {
            return Scan::Reject {
                error: FrameError::Command { offset: cmd },
                skip: total,
            };
        }
        let payload_start = if cmd + 3 == star { star } else { cmd + 4 };
        Scan::Frame(Frame {
            raw,
            imei_start,
            imei_end,
            payload_start,
            payload_end: star,
        })
    }

    /// For a frame still waiting for bytes: do the bytes already prove its length wrong?
    fn length_is_wrong(&self, buf: &[u8], comma: usize) -> bool {
        // (a) A complete trailer with a matching checksum ends the buffer.
        let n = buf.len();
        if n >= comma + MIN_DECLARED_LEN && buf[n - 2..] == *b"\r\n" && buf[n - 5] == b'*' {
            if let (Some(hi), Some(lo)) = (hex_value(buf[n - 4]), hex_value(buf[n - 3])) {
                if checksum(&buf[..n - 4]) == (hi << 4 | lo) {
                    return true;
                }
            }
        }
        // (b) A complete valid frame starts at a later marker.
        let m = self.marker;
        let plain = Framer {
            early_resync: false,
            ..*self
        };
        let mut from = 1;
        while let Some(p) = buf[from..].windows(2).position(|w| w[0] == m && w[1] == m) {
            let at = from + p;
            if let Scan::Frame(_) = plain.scan(&buf[at..]) {
                return true;
            }
            from = at + 1;
        }
        false
    }

    /// Report the junk before the next marker pair (or the whole buffer, keeping a trailing
    /// lone marker byte that may start the next frame).
    fn skip_junk(&self, buf: &[u8]) -> Scan<'static> {
        let m = self.marker;
        let next = buf.windows(2).position(|w| w[0] == m && w[1] == m);
        let skip = match next {
            Some(p) => p,
            None if buf.last() == Some(&m) => buf.len() - 1,
            None => buf.len(),
        };
        if skip == 0 {
            Scan::Incomplete { needed: None }
        } else {
            Scan::Reject {
                error: FrameError::Junk {
                    offset: 0,
                    len: skip,
                },
                skip,
            }
        }
    }
}

fn header_error(offset: usize, field: &'static str) -> Scan<'static> {
    Scan::Reject {
        error: FrameError::Header { offset, field },
        skip: 1,
    }
}

fn oversized(declared: usize, max: usize) -> Scan<'static> {
    Scan::Reject {
        error: FrameError::Oversized {
            offset: 3,
            declared,
            max,
        },
        skip: 1,
    }
}

fn length_error(offset: usize) -> Scan<'static> {
    // The length field lied, so where this frame really ends is unknown: step past the
    // marker and let the junk scan find the next one.
    Scan::Reject {
        error: FrameError::Length { offset },
        skip: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AAC: &[u8] = b"$$z27,350000000000099,AAC,1*B9\r\n";

    fn framer() -> Framer {
        Framer::default()
    }

    #[test]
    fn whole_frame() {
        let Scan::Frame(f) = framer().scan(AAC) else {
            panic!("expected a frame")
        };
        assert_eq!(f.len(), AAC.len());
        assert_eq!(f.flag(), b'z');
        assert_eq!(f.imei(), "350000000000099");
        assert_eq!(&f.command(), b"AAC");
        assert_eq!(f.payload(), b"1");
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for n in 0..AAC.len() {
            assert!(
                matches!(framer().scan(&AAC[..n]), Scan::Incomplete { .. }),
                "prefix of {n} bytes"
            );
        }
    }

    #[test]
    fn junk_is_skipped_up_to_marker() {
        let mut buf = b"xx$yy".to_vec();
        buf.extend_from_slice(AAC);
        match framer().scan(&buf) {
            Scan::Reject {
                error: FrameError::Junk { len: 5, .. },
                skip: 5,
            } => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(framer().scan(&buf[5..]), Scan::Frame(_)));
    }

    #[test]
    fn lone_trailing_marker_is_kept() {
        match framer().scan(b"abc$") {
            Scan::Reject { skip: 3, .. } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(framer().scan(b"$"), Scan::Incomplete { needed: None });
    }

    #[test]
    fn bad_checksum_skips_whole_frame() {
        let mut f = AAC.to_vec();
        f[28] = b'4';
        match framer().scan(&f) {
            Scan::Reject {
                error: FrameError::Checksum { .. },
                skip,
            } => assert_eq!(skip, f.len()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrong_length_is_length_error() {
        let f = b"$$z26,350000000000099,AAC,1*B9\r\n";
        match framer().scan(f) {
            Scan::Reject {
                error: FrameError::Length { .. },
                skip: 1,
            } => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oversized_is_fatal() {
        let f = b"$$z9999,8614";
        match framer().scan(f) {
            Scan::Reject { error, .. } => assert!(error.is_fatal()),
            other => panic!("{other:?}"),
        }
        // Too many digits before any comma is refused without waiting for more bytes.
        assert!(matches!(
            framer().scan(b"$$z000000000"),
            Scan::Reject { .. }
        ));
    }

    #[test]
    fn lowercase_checksum_is_accepted() {
        let f = b"$$z27,350000000000099,AAC,1*b9\r\n";
        assert!(matches!(framer().scan(f), Scan::Frame(_)));
    }

    /// Found by the `framer` fuzz target: a zero-padded length (one digit more than the
    /// cap needs) was refused when the bytes ended right after the digits, yet accepted
    /// when the comma was already there, so a TCP split changed the frames.
    #[test]
    fn padded_length_verdict_does_not_depend_on_the_split() {
        let body = b"$$z00027,350000000000099,AAC,1*";
        let mut f = body.to_vec();
        f.extend_from_slice(&crate::checksum::hex_digits(checksum(body)));
        f.extend_from_slice(b"\r\n");
        assert!(matches!(framer().scan(&f), Scan::Frame(_)));
        for cut in 2..f.len() {
            assert!(
                matches!(framer().scan(&f[..cut]), Scan::Incomplete { .. }),
                "prefix of {cut} bytes"
            );
        }
        // Two leading zeros are one digit too many, with or without the comma.
        for input in [&b"$$z000027,"[..], &b"$$z000027"[..]] {
            assert!(matches!(
                framer().scan(input),
                Scan::Reject {
                    error: FrameError::Header { .. },
                    ..
                }
            ));
        }
    }

    #[test]
    fn bad_imei_is_rejected() {
        let body = b"$$z27,86145104091062X,AAC,1*";
        let mut f = body.to_vec();
        f.extend_from_slice(&crate::checksum::hex_digits(checksum(body)));
        f.extend_from_slice(b"\r\n");
        assert!(matches!(
            framer().scan(&f),
            Scan::Reject {
                error: FrameError::Imei { offset: 6 },
                ..
            }
        ));
    }

    #[test]
    fn server_frames_use_at_marker() {
        let f = b"@@A25,123456789012345,A10*58\r\n";
        let Scan::Frame(frame) = Framer::new(Direction::ServerToDevice, 2048).scan(f) else {
            panic!()
        };
        assert_eq!(frame.payload(), b"");
        assert_eq!(frame.command_str(), "A10");
    }

    fn aac() -> Vec<u8> {
        AAC.to_vec()
    }

    #[test]
    fn early_resync_drops_a_corrupt_header_before_a_good_frame() {
        let mut buf = b"$$A999,".to_vec();
        buf.extend_from_slice(&aac());
        assert!(matches!(
            framer().scan(&buf),
            Scan::Incomplete { needed: Some(_) }
        ));
        let early = framer().with_early_resync(true);
        match early.scan(&buf) {
            Scan::Reject { error, skip: 1 } => assert_eq!(error.kind(), "length"),
            other => panic!("expected a length rejection, got {other:?}"),
        }
    }

    #[test]
    fn early_resync_rejects_an_overstated_length_when_the_trailer_is_there() {
        // AAC declares 27; claim 28 and fix the checksum for the new header.
        let mut f = b"$$z28,350000000000099,AAC,1*".to_vec();
        let cs = checksum(&f);
        f.extend_from_slice(format!("{cs:02X}\r\n").as_bytes());
        assert!(matches!(framer().scan(&f), Scan::Incomplete { .. }));
        let early = framer().with_early_resync(true);
        assert!(matches!(early.scan(&f), Scan::Reject { skip: 1, .. }));
        // A genuine prefix of a good frame is still just incomplete.
        for n in 0..AAC.len() {
            assert!(
                matches!(early.scan(&AAC[..n]), Scan::Incomplete { .. }),
                "{n}"
            );
        }
    }

    #[test]
    fn oversized_is_reported_before_the_comma_arrives() {
        let f = Framer::new(Direction::DeviceToServer, 100);
        for input in [&b"$$A123"[..], b"$$A123,", b"$$A1234"] {
            match f.scan(input) {
                Scan::Reject { error, skip: 1 } => assert!(error.is_fatal(), "{input:?}"),
                other => panic!("{input:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn huge_caps_are_clamped_not_overflowing() {
        let f = Framer::new(Direction::DeviceToServer, usize::MAX);
        assert_eq!(f.max_frame_bytes(), MAX_FRAME_BYTES_LIMIT);
        assert!(matches!(
            f.scan(b"$$A999999999999999999999,"),
            Scan::Reject { .. }
        ));
    }

    #[test]
    fn debug_never_shows_the_imei() {
        let Scan::Frame(f) = framer().scan(AAC) else {
            panic!("expected a frame")
        };
        let shown = format!("{f:?} {:?}", framer().scan(AAC));
        assert!(!shown.contains("350000000000099"), "{shown}");
        assert!(shown.contains("AAC"), "{shown}");
    }
}
