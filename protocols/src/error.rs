//! Typed errors, one enum per layer.
//!
//! Every variant carries the byte offset (from the first byte of the frame, or of the
//! scanned buffer for [`FrameError::Junk`]) and the name of the field it concerns, so a log
//! line can say exactly what was wrong without quoting the frame (which holds the IMEI).

/// The framing layer refused some bytes.
///
/// A caller tells the three outcomes of [`crate::Framer::scan`] apart as: `Incomplete`
/// (wait for more bytes), a rejection with [`FrameError::is_fatal`] false (skip and go on),
/// and a fatal rejection (the stream cannot be trusted any more; close the connection).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Bytes before the next frame start marker (`$$` / `@@`).
    #[error("{len} junk byte(s) before a frame start at offset {offset}")]
    Junk { offset: usize, len: usize },
    /// The flag, length digits or the comma after them are malformed.
    #[error("malformed frame header ({field}) at offset {offset}")]
    Header { offset: usize, field: &'static str },
    /// The declared length is above the configured cap: the frame cannot be held, so its
    /// checksum cannot be checked, and the bytes that follow are its unchecked body.
    #[error("declared frame length {declared} exceeds max_frame_bytes {max}")]
    Oversized {
        offset: usize,
        declared: usize,
        max: usize,
    },
    /// No `*XX\r\n` at the end the length field declares.
    #[error("no `*XX\\r\\n` at the declared frame end (offset {offset})")]
    Length { offset: usize },
    /// The checksum digits do not match the byte sum.
    #[error(
        "checksum mismatch at offset {offset}: frame says {declared:02X}, bytes sum to {computed:02X}"
    )]
    Checksum {
        offset: usize,
        declared: u8,
        computed: u8,
    },
    /// The IMEI field is not 14 or 15 ASCII digits.
    #[error("IMEI field at offset {offset} is not 14-15 ASCII digits")]
    Imei { offset: usize },
    /// The command field is not three ASCII alphanumerics followed by `,` or `*`.
    #[error("command field at offset {offset} is not 3 ASCII alphanumerics")]
    Command { offset: usize },
}

impl FrameError {
    /// Offset of the problem, counted from the start of the scanned buffer.
    pub fn offset(&self) -> usize {
        match *self {
            FrameError::Junk { offset, .. }
            | FrameError::Header { offset, .. }
            | FrameError::Oversized { offset, .. }
            | FrameError::Length { offset }
            | FrameError::Checksum { offset, .. }
            | FrameError::Imei { offset }
            | FrameError::Command { offset } => offset,
        }
    }

    /// Name of the frame field concerned.
    pub fn field(&self) -> &'static str {
        match self {
            FrameError::Junk { .. } => "start",
            FrameError::Header { field, .. } => field,
            FrameError::Oversized { .. } | FrameError::Length { .. } => "length",
            FrameError::Checksum { .. } => "checksum",
            FrameError::Imei { .. } => "imei",
            FrameError::Command { .. } => "command",
        }
    }

    /// Stable kind name, as used by `trackgate decode` and metric labels
    /// (`framing`, `length`, `checksum`, `imei`).
    pub fn kind(&self) -> &'static str {
        match self {
            FrameError::Junk { .. } | FrameError::Header { .. } | FrameError::Command { .. } => {
                "framing"
            }
            FrameError::Oversized { .. } | FrameError::Length { .. } => "length",
            FrameError::Checksum { .. } => "checksum",
            FrameError::Imei { .. } => "imei",
        }
    }

    /// True when the connection should be closed rather than resynchronised: a declared
    /// length above the cap means the following bytes are an unchecked (possibly binary)
    /// body that would otherwise be scanned as a stream of fake frames.
    pub fn is_fatal(&self) -> bool {
        matches!(self, FrameError::Oversized { .. })
    }
}

/// A checked frame whose payload does not follow the message grammar.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload ended before this field.
    #[error("payload ends before field `{field}` (offset {offset})")]
    Truncated { field: &'static str, offset: usize },
    /// The field does not have the expected syntax.
    #[error("field `{field}` at offset {offset} is malformed: {expected}")]
    Syntax {
        field: &'static str,
        offset: usize,
        expected: &'static str,
    },
    /// The field parsed but its value is impossible (latitude 91°, month 13, …).
    #[error("field `{field}` at offset {offset} is out of range")]
    OutOfRange { field: &'static str, offset: usize },
    /// A CCE packet's parameter groups run past the packet's declared length.
    #[error("field `{field}` at offset {offset} overruns its packet's declared length")]
    Overrun { field: &'static str, offset: usize },
    /// A text field holds bytes that are not UTF-8.
    #[error("text field `{field}` at offset {offset} is not UTF-8")]
    NonUtf8 { field: &'static str, offset: usize },
}

impl DecodeError {
    /// Offset from the first byte of the frame.
    pub fn offset(&self) -> usize {
        match *self {
            DecodeError::Truncated { offset, .. }
            | DecodeError::Syntax { offset, .. }
            | DecodeError::OutOfRange { offset, .. }
            | DecodeError::Overrun { offset, .. }
            | DecodeError::NonUtf8 { offset, .. } => offset,
        }
    }

    /// Name of the field concerned.
    pub fn field(&self) -> &'static str {
        match *self {
            DecodeError::Truncated { field, .. }
            | DecodeError::Syntax { field, .. }
            | DecodeError::OutOfRange { field, .. }
            | DecodeError::Overrun { field, .. }
            | DecodeError::NonUtf8 { field, .. } => field,
        }
    }

    /// Stable short name for metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::Syntax { .. } => "syntax",
            DecodeError::OutOfRange { .. } => "out_of_range",
            DecodeError::Overrun { .. } => "overrun",
            DecodeError::NonUtf8 { .. } => "non_utf8",
        }
    }

    pub(crate) fn shifted(self, by: usize) -> Self {
        match self {
            DecodeError::Truncated { field, offset } => DecodeError::Truncated {
                field,
                offset: offset + by,
            },
            DecodeError::Syntax {
                field,
                offset,
                expected,
            } => DecodeError::Syntax {
                field,
                offset: offset + by,
                expected,
            },
            DecodeError::OutOfRange { field, offset } => DecodeError::OutOfRange {
                field,
                offset: offset + by,
            },
            DecodeError::Overrun { field, offset } => DecodeError::Overrun {
                field,
                offset: offset + by,
            },
            DecodeError::NonUtf8 { field, offset } => DecodeError::NonUtf8 {
                field,
                offset: offset + by,
            },
        }
    }
}

/// A reply or command could not be encoded.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("flag must be one printable ASCII byte other than `,` and `*`")]
    Flag,
    #[error("IMEI must be 14-15 ASCII digits")]
    Imei,
    #[error("command must be 3 ASCII alphanumerics")]
    Command,
    /// A parameter holds a byte that would break the envelope (`,` inside a field,
    /// `*`, `\r`, `\n`) or is otherwise outside its allowed form.
    #[error("parameter `{field}` holds a byte or value it may not")]
    Param { field: &'static str },
    #[error("encoded frame would be {len} bytes, above the 4-digit length field")]
    TooLong { len: usize },
}
