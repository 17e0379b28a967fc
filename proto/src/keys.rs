//! Ed25519 keys and domain-separated signatures.
//!
//! Every signature in ChitChat is made over `label || 0x00 || canonical encoding`, where the label
//! names what is signed ([`Label`]). A signature made for one purpose therefore never verifies
//! for another, even when the encodings happen to coincide.

use std::fmt;

use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// What a signature is for. The label is part of every signed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// A device identity record.
    Dir,
    /// A relay's sponsorship of a device.
    Sponsorship,
    /// A linked device revoking another.
    Revocation,
    /// A relay's signature on the winning commit of an epoch.
    EpochCert,
    /// A pack's Merkle root.
    PackRoot,
    /// A device answering a relay's authentication challenge.
    AuthChallenge,
    /// A gossiped envelope's outer signature.
    Envelope,
    /// A member asking the channel's admins to remove it.
    LeaveRequest,
    /// A member telling the others which commit and state it reached in an epoch.
    EpochReport,
}

impl Label {
    /// The label's bytes, as prefixed to signed messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dir => "chitchat/v1/dir",
            Self::Sponsorship => "chitchat/v1/sponsorship",
            Self::Revocation => "chitchat/v1/revocation",
            Self::EpochCert => "chitchat/v1/epoch-cert",
            Self::PackRoot => "chitchat/v1/pack-root",
            Self::AuthChallenge => "chitchat/v1/auth-challenge",
            Self::Envelope => "chitchat/v1/envelope",
            Self::LeaveRequest => "chitchat/v1/leave-request",
            Self::EpochReport => "chitchat/v1/epoch-report",
        }
    }

    fn message(self, body: &[u8]) -> Vec<u8> {
        let label = self.as_str().as_bytes();
        let mut m = Vec::with_capacity(label.len() + 1 + body.len());
        m.extend_from_slice(label);
        m.push(0);
        m.extend_from_slice(body);
        m
    }
}

/// Why a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The public key is not a valid Ed25519 point.
    #[error("invalid public key")]
    InvalidKey,
    /// The signature does not match the key, label and message.
    #[error("bad signature")]
    BadSignature,
}

/// An Ed25519 public key: a device's id, or a relay's key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PublicKey(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl PublicKey {
    /// Verifies `signature` over `label` and `body` (strict Ed25519: no malleable signatures,
    /// no small-order keys).
    pub fn verify(
        &self,
        label: Label,
        body: &[u8],
        signature: &Signature,
    ) -> Result<(), SignatureError> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(&self.0)
            .map_err(|_| SignatureError::InvalidKey)?;
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(&label.message(body), &sig).map_err(|_| SignatureError::BadSignature)
    }

    /// Lowercase hex of the key.
    pub fn to_hex(&self) -> String {
        hex_string(&self.0)
    }

    /// Parses the hex form of [`PublicKey::to_hex`].
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = parse_hex(s)?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// An Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Signature(#[serde(with = "serde_bytes")] pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}..)", hex_string(&self.0[..8]))
    }
}

/// An Ed25519 signing key: a device identity key or a relay key.
///
/// It is made from a 32-byte seed that the caller draws from its own randomness; the seed is
/// zeroed when the key is dropped.
pub struct SecretKey {
    key: ed25519_dalek::SigningKey,
}

impl SecretKey {
    /// The key whose seed is `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self { key: ed25519_dalek::SigningKey::from_bytes(&seed) }
    }

    /// The seed, for storing the key. Keep it secret.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.key.to_bytes())
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }

    /// Signs `body` under `label`.
    pub fn sign(&self, label: Label, body: &[u8]) -> Signature {
        Signature(self.key.sign(&label.message(body)).to_bytes())
    }
}

impl Clone for SecretKey {
    fn clone(&self) -> Self {
        Self::from_seed(*self.seed())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey").field("public", &self.public()).finish_non_exhaustive()
    }
}

pub(crate) fn hex_string(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub(crate) fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_separates_domains() {
        let k = SecretKey::from_seed([7; 32]);
        let sig = k.sign(Label::Dir, b"body");
        assert_eq!(k.public().verify(Label::Dir, b"body", &sig), Ok(()));
        assert_eq!(
            k.public().verify(Label::Sponsorship, b"body", &sig),
            Err(SignatureError::BadSignature)
        );
    }

    #[test]
    fn hex_round_trip() {
        let k = SecretKey::from_seed([9; 32]).public();
        assert_eq!(PublicKey::from_hex(&k.to_hex()), Some(k));
        assert_eq!(PublicKey::from_hex("zz"), None);
    }
}
