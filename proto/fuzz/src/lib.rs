//! Shared checks of the fuzz targets: a decoder never panics, and what it accepts is canonical.

use chitchat_proto::codec::Canonical;
use chitchat_proto::wire::{self, Validate};

/// Decodes `data` as `T`; if accepted, the value must re-encode to exactly `data`.
pub fn canonical<T: Canonical>(data: &[u8]) {
    if let Ok(value) = T::from_bytes(data) {
        assert_eq!(value.to_bytes(), data, "accepted a non-canonical encoding");
    }
}

/// Decodes `data` as a frame of `T`; if accepted, it must re-encode to exactly `data`.
pub fn frame<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + Validate,
{
    if let Ok(value) = wire::decode_frame::<T>(data) {
        assert_eq!(wire::encode_frame(&value).ok().as_deref(), Some(data));
    }
}
