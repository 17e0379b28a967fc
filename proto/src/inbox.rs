//! Sealing payloads to a device's inbox key (HPKE, RFC 9180).
//!
//! Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, base mode. The HPKE
//! `info` binds the recipient's [`DeviceId`], so a sealed payload re-addressed to another inbox
//! does not open. A relay that stores a [`SealedEnvelope`] learns the recipient and the length,
//! nothing else.

use std::fmt;

use hpke::{Deserializable as _, Kem as _, Serializable as _};
use serde::{Deserialize, Serialize};

use crate::codec::Canonical;
use crate::identity::DeviceId;
use crate::wire::{MAX_INBOX_PAYLOAD_LEN, Validate};

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

const INFO_PREFIX: &[u8] = b"chitchat/v1/inbox";

/// Why a payload could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboxError {
    /// The envelope is addressed to another device.
    #[error("envelope is for another device")]
    WrongRecipient,
    /// The recipient's public key is not a valid X25519 key.
    #[error("invalid inbox public key")]
    InvalidKey,
    /// Decryption failed: tampered, truncated, or sealed to another key.
    #[error("cannot open envelope")]
    OpenFailed,
    /// The payload is larger than [`MAX_INBOX_PAYLOAD_LEN`].
    #[error("payload too large")]
    TooLarge,
}

/// A device's inbox key pair. Made from a seed the caller draws; kept on the device.
pub struct InboxSecret {
    secret: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; 32],
}

impl InboxSecret {
    /// Derives the key pair from 32 bytes of the caller's randomness (RFC 9180 DeriveKeyPair).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let (secret, public) = Kem::derive_keypair(seed);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&public.to_bytes());
        Self { secret, public: bytes }
    }

    /// The public key, to publish in the device's record.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// Opens an envelope addressed to `me`.
    pub fn open(&self, me: DeviceId, envelope: &SealedEnvelope) -> Result<Vec<u8>, InboxError> {
        if envelope.recipient != me {
            return Err(InboxError::WrongRecipient);
        }
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&envelope.enc)
            .map_err(|_| InboxError::OpenFailed)?;
        hpke::single_shot_open::<Aead, Kdf, Kem>(
            &hpke::OpModeR::Base,
            &self.secret,
            &enc,
            &info(me),
            &envelope.ciphertext,
            &[],
        )
        .map_err(|_| InboxError::OpenFailed)
    }
}

impl fmt::Debug for InboxSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxSecret").finish_non_exhaustive()
    }
}

/// A payload sealed to one device's inbox key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SealedEnvelope {
    /// The device whose inbox it goes to; the only thing a relay learns.
    pub recipient: DeviceId,
    /// The HPKE encapsulated key.
    #[serde(with = "serde_bytes")]
    pub enc: [u8; 32],
    /// The AEAD ciphertext.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for SealedEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedEnvelope")
            .field("recipient", &self.recipient)
            .field("len", &self.ciphertext.len())
            .finish()
    }
}

impl Canonical for SealedEnvelope {
    const MAX_LEN: usize = MAX_INBOX_PAYLOAD_LEN + 128;
}

impl Validate for SealedEnvelope {
    fn validate(&self) -> Result<(), &'static str> {
        // The AEAD adds a 16-byte tag.
        if self.ciphertext.len() > MAX_INBOX_PAYLOAD_LEN + 16 {
            return Err("sealed payload too large");
        }
        Ok(())
    }
}

/// Seals `plaintext` to `recipient`'s inbox key, drawing the ephemeral key from `rng`.
pub fn seal(
    rng: &mut impl rand_core::CryptoRng,
    recipient: DeviceId,
    inbox_key: &[u8; 32],
    plaintext: &[u8],
) -> Result<SealedEnvelope, InboxError> {
    if plaintext.len() > MAX_INBOX_PAYLOAD_LEN {
        return Err(InboxError::TooLarge);
    }
    let pk =
        <Kem as hpke::Kem>::PublicKey::from_bytes(inbox_key).map_err(|_| InboxError::InvalidKey)?;
    let (enc, ciphertext) = hpke::single_shot_seal_with_rng::<Aead, Kdf, Kem>(
        &hpke::OpModeS::Base,
        &pk,
        &info(recipient),
        plaintext,
        &[],
        rng,
    )
    .map_err(|_| InboxError::InvalidKey)?;
    let mut enc_bytes = [0u8; 32];
    enc_bytes.copy_from_slice(&enc.to_bytes());
    Ok(SealedEnvelope { recipient, enc: enc_bytes, ciphertext })
}

fn info(recipient: DeviceId) -> Vec<u8> {
    let mut info = INFO_PREFIX.to_vec();
    info.extend_from_slice(recipient.as_bytes());
    info
}

#[cfg(test)]
mod tests {
    use rand_core::SeedableRng;

    use super::*;
    use crate::keys::SecretKey;

    fn device(n: u8) -> DeviceId {
        DeviceId(SecretKey::from_seed([n; 32]).public())
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let bob = InboxSecret::from_seed(&[2; 32]);
        let carol = InboxSecret::from_seed(&[3; 32]);
        let env = seal(&mut rng, device(2), &bob.public(), b"hello").expect("seal");
        assert_eq!(bob.open(device(2), &env).expect("open"), b"hello");
        // Another device cannot open it, even when the envelope is re-addressed to it.
        assert_eq!(carol.open(device(2), &env), Err(InboxError::OpenFailed));
        let mut moved = env.clone();
        moved.recipient = device(3);
        assert_eq!(bob.open(device(2), &moved), Err(InboxError::WrongRecipient));
        assert_eq!(carol.open(device(3), &moved), Err(InboxError::OpenFailed));
        // A flipped bit is detected.
        let mut bad = env;
        bad.ciphertext[0] ^= 1;
        assert_eq!(bob.open(device(2), &bad), Err(InboxError::OpenFailed));
    }

    #[test]
    fn rejects_oversized_payload() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let bob = InboxSecret::from_seed(&[2; 32]);
        let big = vec![0u8; MAX_INBOX_PAYLOAD_LEN + 1];
        assert_eq!(seal(&mut rng, device(2), &bob.public(), &big), Err(InboxError::TooLarge));
    }
}
