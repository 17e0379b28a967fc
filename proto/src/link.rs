//! Linking a new device to a user: the one-time code and the two messages of the exchange.
//!
//! The user's existing device (the *offerer*) draws a [`LinkSecret`] and shows a [`LinkCode`]:
//! the secret and the URL of the user's relay, as text and as a QR code. The relay learns only
//! the [`LinkSlot`] (a hash of the secret) the offerer opens there, never the secret itself.
//!
//! 1. The new device (the *joiner*) puts a [`LinkHello`] in the slot: its self-signed record and
//!    a proof, keyed by the secret, over the slot and that record.
//! 2. The offerer checks the proof, publishes a record that lists the joiner, and puts a
//!    [`LinkAnswer`] in the slot: that record (sponsored by the relay) and a proof, keyed by the
//!    secret, over the slot, the joiner and the record.
//! 3. The joiner checks that proof and the record, and registers under the user's name with a
//!    record that lists the offerer: the relay sponsors it without an invite, since the two
//!    records name each other.
//!
//! Both proofs need the secret, so neither side can be played by the relay (which sees the slot
//! and both messages) or by anyone who guesses a slot. The relay takes one hello per slot, so a
//! code works once.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::codec::{Canonical, encode};
use crate::identity::{Address, DeviceId, Dir, IdentityError, RelayTrust};

/// How long a link code stays usable, at most.
pub const LINK_TTL_MS: u64 = 15 * 60 * 1000;
/// The longest relay URL a code carries, in bytes.
pub const MAX_LINK_URL_LEN: usize = 256;

const SLOT_CONTEXT: &str = "chitchat/v1/link-slot";
const PROOF_CONTEXT: &str = "chitchat/v1/link-proof";
const SECRET_LEN: usize = 16;

/// The alphabet of the code's secret: Crockford's base32 (no I, L, O or U), read in either case.
pub(crate) fn alphabet() -> data_encoding::Encoding {
    let mut spec = data_encoding::Specification::new();
    spec.symbols.push_str("0123456789ABCDEFGHJKMNPQRSTVWXYZ");
    spec.translate.from.push_str("abcdefghjkmnpqrstvwxyzOoIiLl");
    spec.translate.to.push_str("ABCDEFGHJKMNPQRSTVWXYZ001111");
    spec.check_trailing_bits = true;
    // The specification is a constant; it is valid (tests run it).
    spec.encoding().unwrap_or_else(|_| data_encoding::BASE32_NOPAD.clone())
}

/// `bytes` in [`alphabet`], in groups of four letters joined by dashes.
pub(crate) fn grouped(bytes: &[u8]) -> String {
    let text = alphabet().encode(bytes);
    let groups: Vec<&str> =
        text.as_bytes().chunks(4).map(|c| std::str::from_utf8(c).unwrap_or("")).collect();
    groups.join("-")
}

/// The one-time secret of a link: 128 bits, drawn by the offerer, never sent to the relay.
#[derive(Clone, PartialEq, Eq, zeroize::ZeroizeOnDrop)]
pub struct LinkSecret([u8; SECRET_LEN]);

impl fmt::Debug for LinkSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LinkSecret(..)")
    }
}

impl LinkSecret {
    /// Draws a fresh secret.
    pub fn generate(rng: &mut impl rand_core::CryptoRng) -> Self {
        let mut bytes = [0u8; SECRET_LEN];
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The slot the offerer opens at the relay: a hash of the secret, which does not give it.
    pub fn slot(&self) -> LinkSlot {
        let hash = blake3::derive_key(SLOT_CONTEXT, &self.0);
        let mut slot = [0u8; 16];
        slot.copy_from_slice(&hash[..16]);
        LinkSlot(slot)
    }

    fn proof(&self, role: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let key = blake3::derive_key(PROOF_CONTEXT, &self.0);
        let mut mac = blake3::Hasher::new_keyed(&key);
        mac.update(role);
        for part in parts {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        *mac.finalize().as_bytes()
    }

    /// Compares in constant time (blake3's `Hash` equality is).
    fn check(&self, got: &[u8; 32], role: &[u8], parts: &[&[u8]]) -> Result<(), LinkError> {
        if blake3::Hash::from_bytes(*got) == blake3::Hash::from_bytes(self.proof(role, parts)) {
            Ok(())
        } else {
            Err(LinkError::BadProof)
        }
    }
}

/// Where the two sides of a link meet at the relay (a hash of the secret).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct LinkSlot(pub [u8; 16]);

/// What the new device needs: the user's relay and the secret. Shown as text,
/// `XXXX-XXXX-XXXX-XXXX-XXXX-XXXX-XX@URL`, and as a QR code of the same text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkCode {
    /// The relay's HTTP address, as the offerer registered with it (its `.well-known` names the
    /// relay's host, key and addresses).
    pub relay_url: String,
    /// The one-time secret.
    pub secret: LinkSecret,
}

impl fmt::Display for LinkCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", grouped(&self.secret.0), self.relay_url)
    }
}

impl LinkCode {
    /// Reads a code as [`fmt::Display`] writes it; dashes and spaces in the secret are ignored,
    /// and so is its case.
    pub fn parse(text: &str) -> Result<Self, LinkError> {
        let (secret, url) = text.trim().split_once('@').ok_or(LinkError::BadCode("no '@'"))?;
        let secret: String = secret.chars().filter(|c| !matches!(c, '-' | ' ')).collect();
        let bytes = alphabet()
            .decode(secret.as_bytes())
            .map_err(|_| LinkError::BadCode("the secret is not 26 letters and digits"))?;
        let secret: [u8; SECRET_LEN] =
            bytes.try_into().map_err(|_| LinkError::BadCode("the secret is not 26 characters"))?;
        if url.is_empty() || url.len() > MAX_LINK_URL_LEN || url.chars().any(char::is_whitespace) {
            return Err(LinkError::BadCode("the relay's address is missing or malformed"));
        }
        Ok(Self { relay_url: url.to_owned(), secret: LinkSecret(secret) })
    }
}

/// The joiner's first message: its record and the proof that it holds the code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct LinkHello {
    /// The joiner's self-signed record (no sponsorship yet).
    pub dir: Dir,
    /// Keyed by the secret, over the slot and the record.
    pub proof: [u8; 32],
}

impl Canonical for LinkHello {
    const MAX_LEN: usize = Dir::MAX_LEN + 64;
}

impl LinkHello {
    /// The hello of the device whose record is `dir`.
    pub fn new(secret: &LinkSecret, dir: Dir) -> Self {
        let proof = secret.proof(b"hello", &[&secret.slot().0, &encode(&dir)]);
        Self { dir, proof }
    }

    /// Checks the proof and the record's own signature. Returns the joining device.
    pub fn verify(&self, secret: &LinkSecret, now: Timestamp) -> Result<DeviceId, LinkError> {
        secret.check(&self.proof, b"hello", &[&secret.slot().0, &encode(&self.dir)])?;
        self.dir.verify_self(now)?;
        Ok(self.dir.device())
    }
}

/// The offerer's answer: its record, which lists the joiner, and the proof that it holds the code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct LinkAnswer {
    /// The offerer's current record: sponsored by the relay, listing the joiner.
    pub dir: Dir,
    /// Keyed by the secret, over the slot, the joiner and the record.
    pub proof: [u8; 32],
}

impl Canonical for LinkAnswer {
    const MAX_LEN: usize = Dir::MAX_LEN + 64;
}

impl LinkAnswer {
    /// The answer to `joiner`, with the offerer's record `dir`.
    pub fn new(secret: &LinkSecret, joiner: DeviceId, dir: Dir) -> Self {
        let proof = secret.proof(b"answer", &[&secret.slot().0, joiner.as_bytes(), &encode(&dir)]);
        Self { dir, proof }
    }

    /// Checks the proof, that the record verifies (sponsored by a relay `trust` knows for
    /// `host`) and lists `joiner`. Returns the user's address at `host`.
    pub fn verify(
        &self,
        secret: &LinkSecret,
        joiner: DeviceId,
        trust: &impl RelayTrust,
        host: &str,
        now: Timestamp,
    ) -> Result<Address, LinkError> {
        let parts: [&[u8]; 3] = [&secret.slot().0, joiner.as_bytes(), &encode(&self.dir)];
        secret.check(&self.proof, b"answer", &parts)?;
        let addresses = self.dir.verify(trust, now)?;
        if !self.dir.body.linked.contains(&joiner) {
            return Err(LinkError::NotListed);
        }
        addresses.into_iter().find(|a| a.host == host).ok_or(LinkError::OtherRelay)
    }
}

/// Why a link code or message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The code's text is not a link code.
    #[error("not a link code: {0}")]
    BadCode(&'static str),
    /// A proof was not made with the code's secret.
    #[error("the other side does not hold this link code")]
    BadProof,
    /// The record in a link message does not verify.
    #[error("record: {0}")]
    Record(#[from] IdentityError),
    /// The offerer's record does not list the new device.
    #[error("the other device's record does not list this one")]
    NotListed,
    /// The offerer's record is sponsored by another relay than the code's.
    #[error("the other device is not registered at the code's relay")]
    OtherRelay,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::identity::{DirBody, Profile, RelayId, Sponsorship, SponsorshipBody, TrustedRelays};
    use crate::keys::SecretKey;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn dir(key: &SecretKey, linked: &[DeviceId], sponsorships: Vec<Sponsorship>) -> Dir {
        Dir::sign(
            key,
            DirBody {
                device: DeviceId(key.public()),
                seq: 2,
                inbox_key: [7; 32],
                linked: linked.iter().copied().collect::<BTreeSet<_>>(),
                sponsorships,
                profile: Profile::default(),
                revoked: false,
                issued: Timestamp(1_000),
            },
        )
    }

    fn sponsored(relay: &SecretKey, device: &SecretKey, linked: &[DeviceId]) -> Dir {
        let body = SponsorshipBody {
            device: DeviceId(device.public()),
            local_name: "alice".into(),
            relay: RelayId { host: "relay.example".into(), key: relay.public() },
            issued: Timestamp(1_000),
            expires: Timestamp(1_000_000),
        };
        dir(device, linked, vec![Sponsorship::issue(relay, body)])
    }

    fn trust(relay: &SecretKey) -> TrustedRelays {
        TrustedRelays {
            relays: vec![RelayId { host: "relay.example".into(), key: relay.public() }],
            ..Default::default()
        }
    }

    #[test]
    fn codes_read_back_and_refuse_garbage() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let code = LinkCode {
            relay_url: "http://127.0.0.1:8080".into(),
            secret: LinkSecret::generate(&mut rng),
        };
        let text = code.to_string();
        assert_eq!(text.split('@').next().map(str::len), Some(26 + 6));
        assert_eq!(LinkCode::parse(&text), Ok(code.clone()));
        // Lower case, spaces instead of dashes, O for 0 and l for 1: the same code.
        let sloppy = text.to_lowercase().replace('-', " ").replace('0', "o").replace('1', "l");
        assert_eq!(LinkCode::parse(&sloppy).map(|c| c.secret), Ok(code.secret.clone()));
        for bad in [
            "",
            "ABCD",
            "ABCD@http://x",
            &text.replace('@', ""),
            &format!("{}Z@http://x", &text[..text.find('@').unwrap_or(0)]),
            &format!("{}@", &text[..text.find('@').unwrap_or(0)]),
            &format!("{}@http://a b", &text[..text.find('@').unwrap_or(0)]),
            "UUUU-UUUU-UUUU-UUUU-UUUU-UUUU-UU@http://x",
        ] {
            assert!(matches!(LinkCode::parse(bad), Err(LinkError::BadCode(_))), "{bad:?}");
        }
        // The 130 bits of 26 characters hold 128: the last two must be zero.
        let mut last = text.clone();
        let at = last.find('@').unwrap_or(0);
        last.replace_range(at - 1..at, "1");
        assert!(matches!(LinkCode::parse(&last), Err(LinkError::BadCode(_))));
    }

    #[test]
    fn the_exchange_needs_the_secret_on_both_sides() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let secret = LinkSecret::generate(&mut rng);
        let other = LinkSecret::generate(&mut rng);
        assert_ne!(secret.slot(), other.slot());
        let (relay, old, new) = (key(1), key(2), key(3));
        let joiner = DeviceId(new.public());
        let now = Timestamp(2_000);

        let hello = LinkHello::new(&secret, dir(&new, &[], vec![]));
        assert_eq!(hello.verify(&secret, now), Ok(joiner));
        assert_eq!(hello.verify(&other, now), Err(LinkError::BadProof));
        // The relay swapping in its own device's record breaks the proof.
        let mut swapped = hello.clone();
        swapped.dir = dir(&key(9), &[], vec![]);
        assert_eq!(swapped.verify(&secret, now), Err(LinkError::BadProof));
        // A record whose signature fails is refused even with a good proof.
        let mut forged = dir(&new, &[], vec![]);
        forged.body.seq = 3;
        let hello = LinkHello::new(&secret, forged);
        assert!(matches!(hello.verify(&secret, now), Err(LinkError::Record(_))));

        let answer = LinkAnswer::new(&secret, joiner, sponsored(&relay, &old, &[joiner]));
        let t = trust(&relay);
        let address = answer.verify(&secret, joiner, &t, "relay.example", now);
        assert_eq!(address.map(|a| a.to_string()), Ok("alice@relay.example".to_owned()));
        assert_eq!(
            answer.verify(&other, joiner, &t, "relay.example", now),
            Err(LinkError::BadProof)
        );
        // An answer made for another joiner does not serve this one.
        let third = DeviceId(key(4).public());
        assert_eq!(
            answer.verify(&secret, third, &t, "relay.example", now),
            Err(LinkError::BadProof)
        );
        // A record that does not list the joiner, or another relay's, or an untrusted key.
        let unlisted = LinkAnswer::new(&secret, joiner, sponsored(&relay, &old, &[]));
        assert_eq!(
            unlisted.verify(&secret, joiner, &t, "relay.example", now),
            Err(LinkError::NotListed)
        );
        assert_eq!(
            answer.verify(&secret, joiner, &t, "other.example", now),
            Err(LinkError::OtherRelay)
        );
        assert!(matches!(
            answer.verify(&secret, joiner, &trust(&key(5)), "relay.example", now),
            Err(LinkError::Record(IdentityError::UntrustedRelay))
        ));
        // An unsponsored offerer proves nothing about the user's name.
        let bare = LinkAnswer::new(&secret, joiner, dir(&old, &[joiner], vec![]));
        assert!(matches!(
            bare.verify(&secret, joiner, &t, "relay.example", now),
            Err(LinkError::Record(IdentityError::Unsponsored))
        ));
    }
}
