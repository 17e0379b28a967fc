//! Device identities, identity records, relay sponsorships, user links and revocation.
//!
//! - A device is its Ed25519 key; its [`DeviceId`] is the public half.
//! - A device publishes a [`Dir`] (device identity record), signed by itself, with a sequence
//!   number: the valid record with the highest sequence number wins.
//! - A relay vouches for a device with a [`Sponsorship`]: `name@host` belongs to this device
//!   until `expires`.
//! - Devices are one user when their records list each other ([`linked`]); a one-sided listing
//!   links nothing.
//! - The user's devices revoke one of them together ([`Revocation`], see [`revocation`]: more
//!   than half of the user's devices, or one with the user's recovery code); a device can revoke
//!   itself by publishing a record with `revoked` set.
//!
//! Every record here is self-validating: anyone can check it without trusting whoever served it,
//! given the relay keys it trusts.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::{Canonical, encode};
use crate::keys::{Label, PublicKey, SecretKey, Signature, SignatureError};
use crate::{MAX_CLOCK_SKEW_MS, Timestamp};

pub mod revocation;
pub use revocation::{RecoveryCode, RecoverySecret, Revocation, RevocationBody};

/// Most devices one record may list as linked.
pub const MAX_LINKED_DEVICES: usize = 32;
/// Most sponsorships one record may carry.
pub const MAX_SPONSORSHIPS: usize = 8;
/// Longest display name, in bytes.
pub const MAX_DISPLAY_NAME_LEN: usize = 128;
/// Longest device name ("laptop"), in bytes.
pub const MAX_DEVICE_NAME_LEN: usize = 64;
/// Longest local name (`alice` in `alice@relay.example`), in bytes.
pub const MAX_LOCAL_NAME_LEN: usize = 64;
/// Longest relay host name, in bytes.
pub const MAX_HOST_LEN: usize = 253;

/// A device's identity: the public half of its Ed25519 key.
///
/// The same key signs the device's MLS leaf (its BasicCredential identity is these 32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct DeviceId(pub PublicKey);

impl DeviceId {
    /// The 32 key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0.0
    }

    /// The device whose key bytes are `bytes`, if there are exactly 32 of them.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(PublicKey(bytes.try_into().ok()?)))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", &self.0.to_hex()[..16])
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A relay: its host name and its Ed25519 key (also its libp2p identity).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct RelayId {
    /// The relay's host name, as in `alice@relay.example`.
    pub host: String,
    /// The relay's public key.
    pub key: PublicKey,
}

/// A user address, `local@host`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Address {
    /// The name the relay gave the device's user.
    pub local: String,
    /// The relay's host name.
    pub host: String,
}

impl Address {
    /// Parses `local@host`, checking both halves.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let (local, host) = s.split_once('@').ok_or(IdentityError::BadName("missing '@'"))?;
        check_local_name(local)?;
        check_host(host)?;
        Ok(Self { local: local.to_owned(), host: host.to_owned() })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.host)
    }
}

/// Why an identity record, sponsorship, link or revocation was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// A signature did not verify.
    #[error("signature: {0}")]
    Signature(#[from] SignatureError),
    /// The sponsorship names another relay than the one trusted for its host.
    #[error("sponsorship is signed by an untrusted key for its host")]
    UntrustedRelay,
    /// The relay that sponsors the device is on the block list.
    #[error("relay {0} is blocked")]
    BlockedRelay(String),
    /// The sponsorship is for another device than the record's.
    #[error("sponsorship is for another device")]
    WrongDevice,
    /// The record or sponsorship has expired.
    #[error("expired at {expires:?} (now {now:?})")]
    Expired {
        /// When it expired.
        expires: Timestamp,
        /// The time it was checked at.
        now: Timestamp,
    },
    /// The record or sponsorship was issued in the future, beyond the allowed clock skew.
    #[error("issued in the future at {issued:?} (now {now:?})")]
    NotYetValid {
        /// When it claims to have been issued.
        issued: Timestamp,
        /// The time it was checked at.
        now: Timestamp,
    },
    /// The device has been revoked.
    #[error("device is revoked")]
    Revoked,
    /// No valid sponsorship from a trusted, unblocked relay.
    #[error("no valid sponsorship")]
    Unsponsored,
    /// The devices do not both list each other.
    #[error("devices are not linked both ways")]
    NotLinked,
    /// A name or host is not well-formed.
    #[error("bad name: {0}")]
    BadName(&'static str),
    /// A limit of the record was exceeded.
    #[error("limit exceeded: {0}")]
    Limit(&'static str),
    /// A revocation has too few signatures of the user's devices yet.
    #[error("{signed} of the {needed} devices' signatures needed (or one and the recovery code)")]
    Quorum {
        /// Signatures of the user's other devices that count.
        signed: usize,
        /// How many are needed without the recovery code.
        needed: usize,
    },
}

/// The signed part of a relay's [`Sponsorship`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SponsorshipBody {
    /// The sponsored device.
    pub device: DeviceId,
    /// The name the relay gives the device's user.
    pub local_name: String,
    /// The sponsoring relay (host and key).
    pub relay: RelayId,
    /// When the relay issued it.
    pub issued: Timestamp,
    /// When it stops being valid.
    pub expires: Timestamp,
}

/// A relay's signed statement that `local_name@host` is this device, until `expires`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Sponsorship {
    /// What the relay vouches for.
    pub body: SponsorshipBody,
    /// The relay's signature over the body, under [`Label::Sponsorship`].
    pub signature: Signature,
}

impl Canonical for Sponsorship {
    const MAX_LEN: usize = 1024;
}

impl Sponsorship {
    /// Issues a sponsorship signed by the relay's key. The caller checks the names first.
    pub fn issue(relay_key: &SecretKey, body: SponsorshipBody) -> Self {
        debug_assert_eq!(relay_key.public(), body.relay.key);
        let signature = relay_key.sign(Label::Sponsorship, &encode(&body));
        Self { body, signature }
    }

    /// The address it gives the device.
    pub fn address(&self) -> Address {
        Address { local: self.body.local_name.clone(), host: self.body.relay.host.clone() }
    }

    /// Checks the signature, the names and the validity period, and that the signing key is the
    /// one `trust` knows for the host.
    pub fn verify(&self, trust: &impl RelayTrust, now: Timestamp) -> Result<(), IdentityError> {
        let b = &self.body;
        check_local_name(&b.local_name)?;
        check_host(&b.relay.host)?;
        if trust.is_blocked(&b.relay.host) {
            return Err(IdentityError::BlockedRelay(b.relay.host.clone()));
        }
        if trust.relay_key(&b.relay.host) != Some(b.relay.key) {
            return Err(IdentityError::UntrustedRelay);
        }
        b.relay.key.verify(Label::Sponsorship, &encode(b), &self.signature)?;
        check_period(b.issued, Some(b.expires), now)
    }
}

/// A profile: what a device tells others about its user.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Profile {
    /// Display name, at most [`MAX_DISPLAY_NAME_LEN`] bytes.
    pub display_name: String,
    /// BLAKE3 hash of the avatar blob, if any.
    pub avatar: Option<[u8; 32]>,
}

/// The signed part of a [`Dir`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct DirBody {
    /// The device this record describes (and whose key signs it).
    pub device: DeviceId,
    /// Sequence number: the valid record with the highest one wins.
    pub seq: u64,
    /// X25519 public key that inbox payloads are sealed to (HPKE).
    #[serde(with = "serde_bytes")]
    pub inbox_key: [u8; 32],
    /// Other devices of the same user. A link holds only if they list this device too.
    pub linked: BTreeSet<DeviceId>,
    /// Relays' sponsorships of this device.
    pub sponsorships: Vec<Sponsorship>,
    /// Display name and avatar.
    pub profile: Profile,
    /// Set when the device has revoked itself; a revoked device is never trusted again.
    pub revoked: bool,
    /// When the device signed this record.
    pub issued: Timestamp,
}

/// A device identity record: self-signed, sequence-numbered, self-validating.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Dir {
    /// The record.
    pub body: DirBody,
    /// The device's signature over the body, under [`Label::Dir`].
    pub signature: Signature,
}

impl Canonical for Dir {
    const MAX_LEN: usize = 16 * 1024;
}

impl Dir {
    /// Signs a record with the device's key.
    pub fn sign(device_key: &SecretKey, body: DirBody) -> Self {
        debug_assert_eq!(DeviceId(device_key.public()), body.device);
        let signature = device_key.sign(Label::Dir, &encode(&body));
        Self { body, signature }
    }

    /// The device it describes.
    pub fn device(&self) -> DeviceId {
        self.body.device
    }

    /// Checks the self-signature and the record's limits. It says nothing about sponsorship or
    /// revocation; see [`Dir::verify`] for that.
    pub fn verify_signature(&self) -> Result<(), IdentityError> {
        let b = &self.body;
        if b.linked.len() > MAX_LINKED_DEVICES {
            return Err(IdentityError::Limit("too many linked devices"));
        }
        if b.linked.contains(&b.device) {
            return Err(IdentityError::Limit("a device cannot link itself"));
        }
        if b.sponsorships.len() > MAX_SPONSORSHIPS {
            return Err(IdentityError::Limit("too many sponsorships"));
        }
        if b.profile.display_name.len() > MAX_DISPLAY_NAME_LEN {
            return Err(IdentityError::Limit("display name too long"));
        }
        b.device.0.verify(Label::Dir, &encode(b), &self.signature)?;
        Ok(())
    }

    /// Checks what the record proves on its own: the self-signature, that the device has not
    /// revoked itself, and that it was not issued in the future. No relay vouches for its name:
    /// this is all a member of a relay-less channel (a LAN, ordered by its creator's device)
    /// can check, the peer's key being proven by the connection it came on.
    pub fn verify_self(&self, now: Timestamp) -> Result<(), IdentityError> {
        self.verify_signature()?;
        if self.body.revoked {
            return Err(IdentityError::Revoked);
        }
        check_period(self.body.issued, None, now)
    }

    /// Checks everything a peer must check before trusting the device: the self-signature, that
    /// the device has not revoked itself, and that at least one sponsorship is valid now, for this
    /// device, from a trusted relay that is not blocked. Returns the addresses it is valid for.
    pub fn verify(
        &self,
        trust: &impl RelayTrust,
        now: Timestamp,
    ) -> Result<Vec<Address>, IdentityError> {
        self.verify_self(now)?;
        let mut addresses = Vec::new();
        let mut last_error = IdentityError::Unsponsored;
        for s in &self.body.sponsorships {
            if s.body.device != self.body.device {
                last_error = IdentityError::WrongDevice;
                continue;
            }
            match s.verify(trust, now) {
                Ok(()) => addresses.push(s.address()),
                Err(e) => last_error = e,
            }
        }
        if addresses.is_empty() {
            return Err(last_error);
        }
        Ok(addresses)
    }

    /// Whether this record replaces `older`: same device, higher sequence number.
    pub fn supersedes(&self, older: &Dir) -> bool {
        self.body.device == older.body.device && self.body.seq > older.body.seq
    }
}

/// What the caller trusts about relays: the key of each known host, and its block list.
pub trait RelayTrust {
    /// The key trusted for `host` (from its `.well-known` or from configuration).
    fn relay_key(&self, host: &str) -> Option<PublicKey>;
    /// Whether devices sponsored by `host` are to be dropped.
    fn is_blocked(&self, host: &str) -> bool;
}

/// A fixed set of trusted relays and blocked hosts.
#[derive(Clone, Debug, Default)]
pub struct TrustedRelays {
    /// Known relays.
    pub relays: Vec<RelayId>,
    /// Hosts whose sponsorships are ignored.
    pub blocked: BTreeSet<String>,
}

impl RelayTrust for TrustedRelays {
    fn relay_key(&self, host: &str) -> Option<PublicKey> {
        self.relays.iter().find(|r| r.host == host).map(|r| r.key)
    }

    fn is_blocked(&self, host: &str) -> bool {
        self.blocked.contains(host)
    }
}

/// Whether two verified records belong to one user: each must list the other.
///
/// The caller verifies both records first (see [`Dir::verify`]).
pub fn linked(a: &Dir, b: &Dir) -> Result<(), IdentityError> {
    if a.body.linked.contains(&b.body.device) && b.body.linked.contains(&a.body.device) {
        Ok(())
    } else {
        Err(IdentityError::NotLinked)
    }
}

/// Checks a local name: 1 to 64 bytes of `a-z`, `0-9`, `.`, `_` and `-`, not starting with a dot.
pub fn check_local_name(name: &str) -> Result<(), IdentityError> {
    if name.is_empty() || name.len() > MAX_LOCAL_NAME_LEN {
        return Err(IdentityError::BadName("local name must be 1 to 64 bytes"));
    }
    if name.starts_with('.') {
        return Err(IdentityError::BadName("local name starts with a dot"));
    }
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-');
    if !name.chars().all(ok) {
        return Err(IdentityError::BadName("local name has characters outside a-z 0-9 . _ -"));
    }
    Ok(())
}

/// Checks a host name: lowercase DNS labels of `a-z`, `0-9` and `-`, or `localhost`, with an
/// optional `:port`.
pub fn check_host(host: &str) -> Result<(), IdentityError> {
    let name = match host.rsplit_once(':') {
        Some((name, port)) => {
            port.parse::<u16>().map_err(|_| IdentityError::BadName("bad port"))?;
            name
        }
        None => host,
    };
    if name.is_empty() || host.len() > MAX_HOST_LEN {
        return Err(IdentityError::BadName("host must be 1 to 253 bytes"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if !name.split('.').all(label_ok) {
        return Err(IdentityError::BadName("host is not a lowercase DNS name"));
    }
    Ok(())
}

fn check_period(
    issued: Timestamp,
    expires: Option<Timestamp>,
    now: Timestamp,
) -> Result<(), IdentityError> {
    if issued > now.plus_ms(MAX_CLOCK_SKEW_MS) {
        return Err(IdentityError::NotYetValid { issued, now });
    }
    match expires {
        Some(expires) if now >= expires => Err(IdentityError::Expired { expires, now }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
