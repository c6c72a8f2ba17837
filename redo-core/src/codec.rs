//! Little-endian cursor used by every decoder. Reads are bounds-checked and
//! return `DecodeError`, so arbitrary bytes can never panic a decoder.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated: needed {needed} bytes at offset {offset}, {available} available")]
    Truncated { offset: usize, needed: usize, available: usize },
    #[error("bad CRC32C at offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { offset: usize, stored: u32, computed: u32 },
    #[error("invalid {what} at offset {offset}: {value}")]
    Invalid { what: &'static str, offset: usize, value: u64 },
    #[error("{trailing} trailing bytes after message")]
    Trailing { trailing: usize },
}

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated { offset: self.pos, needed: n, available: self.remaining() });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.bytes(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().expect("4 bytes")))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().expect("8 bytes")))
    }

    /// A u32 length that must not exceed `max` nor the bytes left.
    pub(crate) fn len(&mut self, what: &'static str, max: usize) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let n = self.u32()? as usize;
        if n > max || n > self.remaining() {
            return Err(DecodeError::Invalid { what, offset, value: n as u64 });
        }
        Ok(n)
    }

    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            trailing => Err(DecodeError::Trailing { trailing }),
        }
    }
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
