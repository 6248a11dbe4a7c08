//! A little-endian read cursor over a binary payload, built on nom's number parsers.
//!
//! It keeps the absolute offset of every read so errors point at the exact byte, and turns
//! nom's "not enough input" into [`DecodeError::Truncated`] with the field name.

use nom::IResult;
use nom::bytes::complete::take;
use nom::number::complete::{be_u16, le_i32, le_u8, le_u16, le_u32};

use crate::error::DecodeError;

pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf[0]` within the payload.
    base: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8], base: usize) -> Self {
        Cursor { buf, pos: 0, base }
    }

    /// Absolute offset of the next byte.
    pub(crate) fn offset(&self) -> usize {
        self.base + self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    // Generic (not a fn pointer) so each number parser inlines into its caller.
    #[inline]
    fn run<T, F>(&mut self, field: &'static str, p: F) -> Result<T, DecodeError>
    where
        F: FnOnce(&'a [u8]) -> IResult<&'a [u8], T, ()>,
    {
        let input = &self.buf[self.pos..];
        match p(input) {
            Ok((rest, v)) => {
                self.pos = self.buf.len() - rest.len();
                Ok(v)
            }
            Err(_) => Err(DecodeError::Truncated {
                field,
                offset: self.offset(),
            }),
        }
    }

    #[inline]
    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.run(field, le_u8)
    }

    #[inline]
    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.run(field, le_u16)
    }

    #[inline]
    pub(crate) fn u16_be(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.run(field, be_u16)
    }

    #[inline]
    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.run(field, le_u32)
    }

    #[inline]
    pub(crate) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.run(field, le_i32)
    }

    pub(crate) fn peek_u8(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    pub(crate) fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let input = &self.buf[self.pos..];
        let r: IResult<&'a [u8], &'a [u8], ()> = take(n)(input);
        match r {
            Ok((rest, v)) => {
                self.pos = self.buf.len() - rest.len();
                Ok(v)
            }
            Err(_) => Err(DecodeError::Truncated {
                field,
                offset: self.offset(),
            }),
        }
    }
}
