//! The Meitrack frame checksum: the sum of every byte from the first `$` (or `@`) through
//! the `*`, modulo 256, written as two hex digits.

/// Sum of `bytes` modulo 256.
///
/// Written as a plain fold so the compiler can vectorise it; the benches use it as the
/// "checksum-only" baseline the decoders are measured against.
#[inline]
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, &b| acc.wrapping_add(b))
}

/// Value of one ASCII hex digit (either case).
#[inline]
pub(crate) fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Upper-case hex digits of `value`, as devices and the vendor documents write them.
#[inline]
pub(crate) fn hex_digits(value: u8) -> [u8; 2] {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    [
        DIGITS[usize::from(value >> 4)],
        DIGITS[usize::from(value & 0x0f)],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_good_command_checksum() {
        // From the protocol notes: `@@A25,123456789012345,A10*58\r\n`.
        assert_eq!(checksum(b"@@A25,123456789012345,A10*"), 0x58);
    }

    #[test]
    fn hex_round_trip() {
        for v in 0..=255u8 {
            let [h, l] = hex_digits(v);
            let back = hex_value(h).map(|h| h << 4 | hex_value(l).unwrap_or(0xff));
            assert_eq!(back, Some(v));
        }
        assert_eq!(hex_value(b'g'), None);
        assert_eq!(hex_value(b'a'), Some(10));
    }
}
