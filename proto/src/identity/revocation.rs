//! Revoking a lost or stolen device, and the user's recovery code.
//!
//! A [`Revocation`] names a device and the user it is revoked from, and carries signatures over
//! that: by the user's other devices, and perhaps by the user's **recovery key**. The user's
//! relay (which holds the user's name, and so knows the user's devices) accepts it when
//! [`quorum`] holds:
//!
//! - the devices that signed are **more than half of the user's settled devices, the target
//!   counted** if it is one: a device is *settled* [`SETTLED_MS`] (a week) after it registered
//!   (with three settled devices, two must sign; with four, three); or
//! - one of the user's devices signed it **and** the recovery key did.
//!
//! So a lost device cannot revoke the others on its own: beside it there is always a settled
//! device that did not sign (the target, or the devices that outvote it); the devices it links
//! itself get no vote for a week, in which the user revokes it and them; and it does not hold the
//! recovery code, which the user wrote down at registration and no device keeps. With two
//! devices, the remaining one needs the recovery code (neither device alone can be told from a
//! thief holding the other).
//!
//! The recovery key is an Ed25519 key derived from a 128-bit [`RecoverySecret`], shown once as a
//! [`RecoveryCode`]. The relay learns only its public half.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Address, DeviceId, IdentityError, MAX_LINKED_DEVICES};
use crate::codec::{Canonical, encode};
use crate::keys::{Label, PublicKey, SecretKey, Signature};

const RECOVERY_CONTEXT: &str = "chitchat/v1/recovery-key";
const RECOVERY_LEN: usize = 16;

/// The signed part of a [`Revocation`]: the same for every signer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct RevocationBody {
    /// The device revoked.
    pub target: DeviceId,
    /// The user it is revoked from (its name at the relay that holds it).
    pub user: Address,
}

/// A user's devices (and perhaps the recovery key) revoking one of the user's devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Revocation {
    /// Who is revoked.
    pub body: RevocationBody,
    /// The signing devices and their signatures under [`Label::Revocation`], in device order,
    /// each once, at most [`MAX_LINKED_DEVICES`].
    pub signers: Vec<(DeviceId, Signature)>,
    /// The recovery key's signature under [`Label::Revocation`], if given.
    pub recovery: Option<Signature>,
}

impl Canonical for Revocation {
    const MAX_LEN: usize = 512 + MAX_LINKED_DEVICES * 100;
}

impl Revocation {
    /// A revocation of `target` from `user` with no signature yet.
    pub fn new(target: DeviceId, user: Address) -> Self {
        Self { body: RevocationBody { target, user }, signers: Vec::new(), recovery: None }
    }

    /// Adds (or replaces) the signature of the device whose key is `key`.
    pub fn sign(&mut self, key: &SecretKey) {
        let device = DeviceId(key.public());
        let signature = key.sign(Label::Revocation, &encode(&self.body));
        match self.signers.binary_search_by_key(&device, |(d, _)| *d) {
            Ok(i) => self.signers[i].1 = signature,
            Err(i) => self.signers.insert(i, (device, signature)),
        }
    }

    /// Adds the recovery key's signature.
    pub fn sign_recovery(&mut self, secret: &RecoverySecret) {
        self.recovery = Some(secret.key().sign(Label::Revocation, &encode(&self.body)));
    }

    /// Merges the signatures of `other` (a revocation of the same device from the same user)
    /// into this one. Both are checked first ([`Revocation::verify`]).
    pub fn merge(&mut self, other: &Revocation) -> Result<(), IdentityError> {
        if other.body != self.body {
            return Err(IdentityError::WrongDevice);
        }
        for (device, signature) in &other.signers {
            if let Err(i) = self.signers.binary_search_by_key(device, |(d, _)| *d) {
                if self.signers.len() >= MAX_LINKED_DEVICES {
                    return Err(IdentityError::Limit("too many signers"));
                }
                self.signers.insert(i, (*device, *signature));
            }
        }
        if self.recovery.is_none() {
            self.recovery = other.recovery;
        }
        Ok(())
    }

    /// Checks every signature: each signer's under its own key, the recovery signature (if any)
    /// under `recovery_key`. The target cannot sign its own revocation, signers are in order and
    /// once each. Returns the devices that signed and whether the recovery key did.
    pub fn verify(
        &self,
        recovery_key: Option<&PublicKey>,
    ) -> Result<(BTreeSet<DeviceId>, bool), IdentityError> {
        let devices = self.verify_signers()?;
        let body = encode(&self.body);
        let recovered = match (&self.recovery, recovery_key) {
            (None, _) => false,
            (Some(signature), Some(key)) => {
                key.verify(Label::Revocation, &body, signature)?;
                true
            }
            (Some(_), None) => {
                return Err(IdentityError::Limit("the user has no recovery code"));
            }
        };
        Ok((devices, recovered))
    }

    /// Checks the devices' signatures only (what a device of the user can check: the recovery
    /// key is known to the relay alone). Returns the devices that signed.
    pub fn verify_signers(&self) -> Result<BTreeSet<DeviceId>, IdentityError> {
        if self.signers.len() > MAX_LINKED_DEVICES {
            return Err(IdentityError::Limit("too many signers"));
        }
        if !self.signers.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(IdentityError::Limit("signers out of order or twice"));
        }
        let body = encode(&self.body);
        let mut devices = BTreeSet::new();
        for (device, signature) in &self.signers {
            if *device == self.body.target {
                return Err(IdentityError::Limit("a device cannot sign its own revocation"));
            }
            device.0.verify(Label::Revocation, &body, signature)?;
            devices.insert(*device);
        }
        Ok(devices)
    }
}

/// How long after registering a device gets a vote on revocations: a week.
pub const SETTLED_MS: u64 = 7 * 24 * 3600 * 1000;

/// Whether the devices that signed (`signed`, as [`Revocation::verify`] returned them, with
/// `recovered` for the recovery key) may revoke `target`. `voters` are the user's settled
/// devices (registered [`SETTLED_MS`] or longer ago; the target among them if it is settled),
/// `devices` all the user's devices (the target among them). Signatures of devices that are
/// not the user's count for nothing.
pub fn quorum(
    devices: &BTreeSet<DeviceId>,
    voters: &BTreeSet<DeviceId>,
    target: DeviceId,
    signed: &BTreeSet<DeviceId>,
    recovered: bool,
) -> Result<(), IdentityError> {
    if !devices.contains(&target) {
        return Err(IdentityError::NotLinked);
    }
    let (counted, needed) = tally(voters, target, signed);
    let any = signed.iter().any(|d| *d != target && devices.contains(d));
    if counted >= needed || (recovered && any) {
        Ok(())
    } else {
        Err(IdentityError::Quorum { signed: counted, needed })
    }
}

/// The signatures of `signed` that count towards revoking `target` (settled devices other
/// than it), and how many a quorum needs without the recovery key: see [`quorum`].
pub fn tally(
    voters: &BTreeSet<DeviceId>,
    target: DeviceId,
    signed: &BTreeSet<DeviceId>,
) -> (usize, usize) {
    let counted = signed.iter().filter(|d| **d != target && voters.contains(d)).count();
    (counted, voters.len() / 2 + 1)
}

/// The secret behind a user's recovery key: 128 bits, shown once as a [`RecoveryCode`], kept by
/// no device.
#[derive(Clone, PartialEq, Eq, zeroize::ZeroizeOnDrop)]
pub struct RecoverySecret([u8; RECOVERY_LEN]);

impl fmt::Debug for RecoverySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecoverySecret(..)")
    }
}

impl RecoverySecret {
    /// Draws a fresh secret.
    pub fn generate(rng: &mut impl rand_core::CryptoRng) -> Self {
        let mut bytes = [0u8; RECOVERY_LEN];
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The recovery key (its public half is what the relay keeps).
    pub fn key(&self) -> SecretKey {
        SecretKey::from_seed(blake3::derive_key(RECOVERY_CONTEXT, &self.0))
    }

    /// The code to write down: `XXXX-XXXX-XXXX-XXXX-XXXX-XXXX-XX` (Crockford's base32).
    pub fn code(&self) -> RecoveryCode {
        RecoveryCode(crate::link::grouped(&self.0))
    }

    /// Reads a code as [`RecoverySecret::code`] writes it; dashes, spaces and case are ignored,
    /// and O, I and L read as 0, 1 and 1.
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let text: String = text.trim().chars().filter(|c| !matches!(c, '-' | ' ')).collect();
        let bytes = crate::link::alphabet()
            .decode(text.as_bytes())
            .map_err(|_| IdentityError::BadName("a recovery code is 26 letters and digits"))?;
        let bytes: [u8; RECOVERY_LEN] = bytes
            .try_into()
            .map_err(|_| IdentityError::BadName("a recovery code is 26 letters and digits"))?;
        Ok(Self(bytes))
    }
}

/// A recovery code as text.
#[derive(Clone, PartialEq, Eq, zeroize::ZeroizeOnDrop)]
pub struct RecoveryCode(String);

impl fmt::Display for RecoveryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RecoveryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecoveryCode(..)")
    }
}
