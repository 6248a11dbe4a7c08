//! nom parsers for the small text fields of AAA-style reports.
//!
//! Each parser takes one whole comma-separated field and must consume all of it; the
//! callers turn a failure into a [`DecodeError`] naming the field and its offset.

use nom::bytes::complete::take_while_m_n;
use nom::character::complete::{char, digit0, digit1, hex_digit1};
use nom::combinator::{all_consuming, opt};
use nom::sequence::preceded;
use nom::{IResult, Parser};

type Res<'a, T> = IResult<&'a [u8], T, ()>;

fn digits_value(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Unsigned decimal integer (`"1697"`).
pub(crate) fn unsigned(field: &[u8]) -> Option<u64> {
    let r: Res<'_, &[u8]> = all_consuming(digit1).parse(field);
    r.ok().and_then(|(_, d)| digits_value(d))
}

/// Signed decimal with an optional fraction, as fixed point with `scale` decimals.
/// Extra decimals are rounded half away from zero (`"1.25"` at scale 1 → 13).
pub(crate) fn fixed(field: &[u8], scale: u32) -> Option<i64> {
    let r: Res<'_, _> =
        all_consuming((opt(char('-')), digit1, opt(preceded(char('.'), digit0)))).parse(field);
    let (_, (neg, int, frac)) = r.ok()?;
    let frac = frac.unwrap_or(b"");
    let mut value = i64::try_from(digits_value(int)?).ok()?;
    for i in 0..scale as usize {
        let d = frac.get(i).map_or(0, |&d| i64::from(d - b'0'));
        value = value.checked_mul(10)?.checked_add(d)?;
    }
    if frac.get(scale as usize).is_some_and(|&d| d >= b'5') {
        value = value.checked_add(1)?;
    }
    Some(if neg.is_some() { -value } else { value })
}

/// Hexadecimal integer of up to 8 digits (`"086E1B2B"`).
pub(crate) fn hex(field: &[u8]) -> Option<u32> {
    let r: Res<'_, &[u8]> = all_consuming(hex_digit1).parse(field);
    let (_, d) = r.ok()?;
    if d.len() > 8 {
        return None;
    }
    d.iter().try_fold(0u32, |acc, &b| {
        Some(acc << 4 | u32::from(crate::checksum::hex_value(b)?))
    })
}

fn two_digits(input: &[u8]) -> Res<'_, u8> {
    let (rest, d) = take_while_m_n(2, 2, |b: u8| b.is_ascii_digit()).parse(input)?;
    Ok((rest, (d[0] - b'0') * 10 + (d[1] - b'0')))
}

/// `yymmddHHMMSS` → (year, month, day, hour, minute, second), years 2000–2099.
pub(crate) fn datetime(field: &[u8]) -> Option<[u8; 6]> {
    let r: Res<'_, _> = all_consuming((
        two_digits, two_digits, two_digits, two_digits, two_digits, two_digits,
    ))
    .parse(field);
    let (_, (y, mo, d, h, mi, s)) = r.ok()?;
    Some([y, mo, d, h, mi, s])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_point() {
        assert_eq!(fixed(b"-27.257698", 6), Some(-27_257_698));
        assert_eq!(fixed(b"41.0", 1), Some(410));
        assert_eq!(fixed(b"41", 1), Some(410));
        assert_eq!(fixed(b"0.25", 1), Some(3));
        assert_eq!(fixed(b"-7", 0), Some(-7));
        assert_eq!(fixed(b"1.", 1), Some(10));
        assert_eq!(fixed(b"", 1), None);
        assert_eq!(fixed(b"-", 1), None);
        assert_eq!(fixed(b"1.2.3", 1), None);
        assert_eq!(fixed(b"99999999999999999999", 0), None);
    }

    #[test]
    fn integers() {
        assert_eq!(unsigned(b"0035"), Some(35));
        assert_eq!(unsigned(b"3a"), None);
        assert_eq!(hex(b"FB2"), Some(0xfb2));
        assert_eq!(hex(b"086e1b2b"), Some(0x086e_1b2b));
        assert_eq!(hex(b"123456789"), None);
    }

    #[test]
    fn dates() {
        assert_eq!(datetime(b"220718171428"), Some([22, 7, 18, 17, 14, 28]));
        assert_eq!(datetime(b"22071817142"), None);
        assert_eq!(datetime(b"2207181714289"), None);
    }
}
