//! Checking a new member's identity before it joins a channel.

use std::collections::BTreeMap;

use crate::Timestamp;
use crate::identity::{DeviceId, Dir, RelayTrust};

/// Decides whether a device may be in a channel. The caller implements it with what it knows:
/// the device's latest identity record, its sponsorship, the relays it trusts and blocks.
pub trait CredentialCheck {
    /// `Ok` if `device` may be a member; `Err` says why not.
    fn check(&self, device: DeviceId) -> Result<(), String>;
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
    fn check(&self, device: DeviceId) -> Result<(), String> {
        let dir = self.dirs.get(&device).ok_or("no identity record for the device")?;
        if dir.device() != device {
            return Err("identity record is for another device".into());
        }
        dir.verify(self.trust, self.now).map(|_| ()).map_err(|e| e.to_string())
    }
}
