//! Canonical postcard encoding.
//!
//! Every protocol type is encoded with postcard. Decoding is strict: the input must be within a
//! size limit, must be consumed to the last byte, and must re-encode to exactly the same bytes.
//! The last rule makes every accepted encoding canonical, so that signatures and hashes over
//! encodings are unambiguous (a set encoded out of order, an over-long varint or a boolean byte
//! other than 0 or 1 is rejected rather than normalised).

use serde::{Serialize, de::DeserializeOwned};

/// Why bytes could not be decoded. Every variant means "the peer sent bad data".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input is longer than the limit for this type.
    #[error("input of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Length of the input.
        len: usize,
        /// The limit that applied.
        max: usize,
    },
    /// The input is not a valid encoding of the type.
    #[error("malformed encoding: {0}")]
    Malformed(String),
    /// A valid value was followed by more bytes.
    #[error("{count} trailing bytes after the value")]
    TrailingBytes {
        /// How many bytes were left over.
        count: usize,
    },
    /// The value decoded, but its canonical encoding differs from the input.
    #[error("non-canonical encoding")]
    NonCanonical,
    /// The frame carries a protocol version this implementation does not speak.
    #[error("unsupported protocol version {got} (supported: {supported})")]
    UnsupportedVersion {
        /// The version in the frame.
        got: u16,
        /// The version this implementation speaks.
        supported: u16,
    },
    /// The value decoded, but breaks a limit or rule of its type.
    #[error("invalid value: {0}")]
    Invalid(&'static str),
}

/// Encodes a value with postcard.
///
/// Protocol types contain no sequences of unknown length, so encoding cannot fail; a failure
/// would be a bug in this crate.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    #[allow(clippy::expect_used)]
    postcard::to_allocvec(value).expect("protocol types always encode")
}

/// The length of [`encode`]'s output for `value`, computed without encoding it.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    #[allow(clippy::expect_used)]
    postcard::experimental::serialized_size(value).expect("protocol types always encode")
}

/// Decodes a value that must be canonical and at most `max_len` bytes long.
pub fn decode<T>(bytes: &[u8], max_len: usize) -> Result<T, DecodeError>
where
    T: Serialize + DeserializeOwned,
{
    if bytes.len() > max_len {
        return Err(DecodeError::TooLarge { len: bytes.len(), max: max_len });
    }
    let (value, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { count: rest.len() });
    }
    if encode(&value) != bytes {
        return Err(DecodeError::NonCanonical);
    }
    Ok(value)
}

/// A type with a canonical byte encoding and a size limit.
///
/// Implemented by every record that is signed, hashed or stored.
pub trait Canonical: Serialize + DeserializeOwned {
    /// The largest encoding accepted by [`Canonical::from_bytes`].
    const MAX_LEN: usize;

    /// The canonical encoding.
    fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes a canonical encoding of at most [`Canonical::MAX_LEN`] bytes.
    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode(bytes, Self::MAX_LEN)
    }
}

/// An owned byte string, encoded as postcard bytes (length, then the bytes).
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize, Serialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Bytes(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes(len {})", self.0.len())
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}
