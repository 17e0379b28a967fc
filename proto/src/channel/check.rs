//! Checking a new member's identity before it joins a channel.

use std::collections::BTreeMap;

use super::{ChannelConfig, UserId};
use crate::Timestamp;
use crate::identity::{DeviceId, Dir, RelayId, RelayTrust};

/// Decides whether a device may be in a channel, and whether a channel's orderers are to be
/// trusted. The caller implements it with what it knows: the device's latest identity record,
/// its sponsorship, the relays it trusts and blocks.
pub trait CredentialCheck {
    /// `Ok` if `device` may be a member as `user` (its credential's claim: an address must be
    /// one its record's sponsorships give it); `Err` says why not.
    fn check(&self, device: DeviceId, user: &UserId) -> Result<(), String>;

    /// `Ok` if a channel with this config may be joined: its orderers certify every commit the
    /// device will merge, so at least one of them must be a relay the device trusts (its own).
    /// Called for every Welcome.
    fn check_orderers(&self, config: &ChannelConfig) -> Result<(), String>;

    /// `Ok` if `relay` may join a channel's relay set (a commit that adds it): a relay is an
    /// orderer, whose signatures count from the next epoch, so it must be a relay the caller
    /// knows under this host with this key, and not blocked.
    fn check_relay(&self, relay: &RelayId) -> Result<(), String>;
}

/// A [`CredentialCheck`] over a set of known device identity records, verified against trusted
/// relays at a given time (see [`Dir::verify`]). Unknown devices are rejected.
#[derive(Debug)]
pub struct KnownDirs<'a, T: RelayTrust> {
    /// The latest record of each known device.
    pub dirs: &'a BTreeMap<DeviceId, Dir>,
    /// The relays trusted and blocked.
    pub trust: &'a T,
    /// The time to check validity at.
    pub now: Timestamp,
}

impl<T: RelayTrust> CredentialCheck for KnownDirs<'_, T> {
    fn check(&self, device: DeviceId, user: &UserId) -> Result<(), String> {
        let dir = self.dirs.get(&device).ok_or("no identity record for the device")?;
        if dir.device() != device {
            return Err("identity record is for another device".into());
        }
        let addresses = dir.verify(self.trust, self.now).map_err(|e| e.to_string())?;
        claims(device, user, &addresses)
    }

    /// At least one relay of the channel's set is trusted under its host name with its very
    /// key, and not blocked. A channel without relays (ordered by its creator's device) is
    /// refused: nothing here vouches for that device as an orderer.
    fn check_orderers(&self, config: &ChannelConfig) -> Result<(), String> {
        let trusted = config.relays.iter().any(|r| {
            self.trust.relay_key(&r.host) == Some(r.key) && !self.trust.is_blocked(&r.host)
        });
        if trusted {
            Ok(())
        } else if config.relays.is_empty() {
            Err("the channel has no relay".into())
        } else {
            let hosts: Vec<&str> = config.relays.iter().map(|r| r.host.as_str()).collect();
            Err(format!("none of its relays is trusted here: {}", hosts.join(", ")))
        }
    }

    fn check_relay(&self, relay: &RelayId) -> Result<(), String> {
        if self.trust.is_blocked(&relay.host) {
            return Err(format!("the relay {} is blocked", relay.host));
        }
        if self.trust.relay_key(&relay.host) != Some(relay.key) {
            return Err(format!("the relay {} is not known here with that key", relay.host));
        }
        Ok(())
    }
}

/// Accepts every device and every orderer. For a replicated state machine that checks a
/// commit's structure and rules only (credentials depend on each relay's directory and clock,
/// so the relay a device submits to checks them before it proposes), and for tests that play a
/// careless committer.
#[derive(Clone, Copy, Debug, Default)]
pub struct AcceptAll;

/// Whether a credential's user claim holds for a device whose record verified for
/// `addresses`: an address must be one of them; a device alone must be itself.
pub fn claims(
    device: DeviceId,
    user: &UserId,
    addresses: &[crate::identity::Address],
) -> Result<(), String> {
    match user {
        UserId::Device(d) if *d == device => Ok(()),
        UserId::Device(_) => Err("the credential names another device as its user".into()),
        UserId::Address(a) if addresses.contains(a) => Ok(()),
        UserId::Address(a) => Err(format!("the device's record is not sponsored as {a}")),
    }
}

impl CredentialCheck for AcceptAll {
    fn check(&self, _: DeviceId, _: &UserId) -> Result<(), String> {
        Ok(())
    }

    fn check_orderers(&self, _: &ChannelConfig) -> Result<(), String> {
        Ok(())
    }

    fn check_relay(&self, _: &RelayId) -> Result<(), String> {
        Ok(())
    }
}
