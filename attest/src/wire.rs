//! A bounded reader for the TPM 2.0 wire format (big-endian integers and
//! `TPM2B_*` size-prefixed buffers), for bytes that came from the network.
//!
//! Every read checks the remaining length first; a structure that claims more
//! bytes than it holds, or than the field allows, is rejected with the name
//! of the field. Nothing here allocates more than the input's length.

/// A TPM structure did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The bytes ended inside `field`.
    #[error("truncated at {field}: needs {needed} more bytes, {left} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        left: usize,
    },
    /// A size-prefixed field is larger than the structure allows.
    #[error("{field} is {found} bytes, more than the limit of {limit}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// Its limit.
        limit: usize,
        /// The size it claims.
        found: usize,
    },
    /// Bytes were left after the structure ended.
    #[error("{trailing} trailing bytes after {structure}")]
    Trailing {
        /// The structure.
        structure: &'static str,
        /// How many bytes were left.
        trailing: usize,
    },
    /// A field holds a value this code does not accept.
    #[error("{field}: unexpected value {value:#x}")]
    Unexpected {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u32,
    },
}

/// Reads TPM wire-format fields from a byte slice, front to back.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        if n > self.bytes.len() {
            return Err(WireError::Truncated {
                field,
                needed: n,
                left: self.bytes.len(),
            });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A `TPM2B_*`: a u16 size, then that many bytes (at most `limit`).
    pub(crate) fn sized(
        &mut self,
        limit: usize,
        field: &'static str,
    ) -> Result<&'a [u8], WireError> {
        let size = usize::from(self.u16(field)?);
        if size > limit {
            return Err(WireError::TooLarge {
                field,
                limit,
                found: size,
            });
        }
        self.take(size, field)
    }

    /// Fails unless every byte was read.
    pub(crate) fn finish(self, structure: &'static str) -> Result<(), WireError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing {
                structure,
                trailing: self.bytes.len(),
            })
        }
    }
}

/// Appends a `TPM2B_*` (u16 size, bytes). `data` must be under 64 KiB.
pub(crate) fn put_sized(out: &mut Vec<u8>, data: &[u8]) {
    let len = u16::try_from(data.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&data[..usize::from(len)]);
}

/// TPM 2.0 algorithm and structure identifiers used here (TPM 2.0 Part 2).
pub(crate) mod alg {
    pub const RSA: u16 = 0x0001;
    pub const AES: u16 = 0x0006;
    pub const SHA256: u16 = 0x000B;
    pub const NULL: u16 = 0x0010;
    pub const RSASSA: u16 = 0x0014;
    pub const RSAPSS: u16 = 0x0016;
    pub const ECDSA: u16 = 0x0018;
    pub const ECDAA: u16 = 0x001A;
    pub const ECC: u16 = 0x0023;
    pub const CFB: u16 = 0x0043;
    pub const ECC_NIST_P256: u16 = 0x0003;
    pub const ECC_NIST_P384: u16 = 0x0004;
    /// `TPM_GENERATED_VALUE`: the TPM puts it in every structure it signs.
    pub const TPM_GENERATED: u32 = 0xff54_4347;
    /// `TPM_ST_ATTEST_QUOTE`.
    pub const ST_ATTEST_QUOTE: u16 = 0x8018;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sized_field_claiming_more_than_the_limit_is_rejected_before_reading() {
        let mut r = Reader::new(&[0xff, 0xff, 1, 2, 3]);
        assert_eq!(
            r.sized(64, "extraData"),
            Err(WireError::TooLarge {
                field: "extraData",
                limit: 64,
                found: 0xffff
            })
        );
    }

    #[test]
    fn truncated_and_trailing_are_named() {
        let mut r = Reader::new(&[0, 4, 1, 2]);
        assert!(matches!(
            r.sized(64, "pcrDigest"),
            Err(WireError::Truncated {
                field: "pcrDigest",
                needed: 4,
                left: 2
            })
        ));
        let mut r = Reader::new(&[0, 1, 2]);
        r.u16("x").unwrap();
        assert_eq!(
            r.finish("TPMS_ATTEST"),
            Err(WireError::Trailing {
                structure: "TPMS_ATTEST",
                trailing: 1
            })
        );
    }
}
