//! A user's devices at their relay: linking a new device ([`chitchat_proto::link`]), the
//! device list with names and when each was last seen.

use chitchat_proto::identity::Revocation;
use chitchat_proto::link::{LINK_TTL_MS, LinkAnswer, LinkHello, LinkSlot};
use chitchat_proto::wire::{DeviceEntry, ErrorCode, MAX_LISTED_REVOKED, Response};
use chitchat_proto::{DeviceId, Timestamp};

use super::{Relay, error, from_write, unavailable};
use crate::store::{Write, Written};

/// Most devices whose last sighting waits in memory for the next flush (past it, the oldest
/// sightings are not remembered until the flush: a bound, never reached by the devices of one
/// relay in one minute in practice).
pub(super) const MAX_UNFLUSHED_SEEN: usize = 100_000;

impl Relay {
    /// Notes that `device` (registered here) spoke at `now`.
    pub(super) fn note_seen(&self, device: DeviceId, now: Timestamp) {
        if let Ok(mut seen) = self.seen.lock()
            && (seen.len() < MAX_UNFLUSHED_SEEN || seen.contains_key(&device))
        {
            seen.insert(device, now);
        }
    }

    /// Writes the sightings noted since the last flush (every minute, and at shutdown).
    pub async fn flush_seen(&self) -> Result<usize, crate::store::WriteError> {
        let seen: Vec<_> = match self.seen.lock() {
            Ok(mut seen) => std::mem::take(&mut *seen).into_iter().collect(),
            Err(_) => return Ok(0),
        };
        let n = seen.len();
        if n > 0 {
            self.store.write(Write::Seen(seen)).await?;
        }
        Ok(n)
    }

    pub(super) async fn offer_link(
        &self,
        me: DeviceId,
        slot: LinkSlot,
        expires: Timestamp,
        now: Timestamp,
    ) -> Response {
        let expires = expires.min(now.plus_ms(LINK_TTL_MS));
        if expires <= now {
            return error(ErrorCode::BadRequest, "the offer ends before it starts");
        }
        match self.store.write(Write::OfferLink { offerer: me, slot, expires }).await {
            Ok(_) => Response::LinkOffered,
            Err(e) => from_write(e),
        }
    }

    pub(super) async fn join_link(
        &self,
        me: DeviceId,
        slot: LinkSlot,
        hello: LinkHello,
        now: Timestamp,
    ) -> Response {
        // A device registered nowhere may send this: an unknown or closed slot is refused
        // from a read, before anything reaches the writer (and its fsync).
        match self.store.link_slot(&slot) {
            Ok(Some(r)) if r.expires > now => {}
            Ok(_) => return error(ErrorCode::TokenInvalid, "unknown or expired link code"),
            Err(e) => return unavailable(e),
        }
        // The proof needs the secret, which this relay never sees; the record it can check.
        if let Err(e) = hello.dir.verify_self(now) {
            return error(ErrorCode::BadRequest, format!("record: {e}"));
        }
        match self.store.write(Write::JoinLink { joiner: me, slot, hello, now }).await {
            Ok(_) => Response::LinkJoined,
            Err(e) => from_write(e),
        }
    }

    pub(super) fn link_poll(&self, me: DeviceId, slot: LinkSlot, now: Timestamp) -> Response {
        let record = match self.store.link_slot(&slot) {
            Ok(Some(r)) if r.expires > now => r,
            Ok(_) => return error(ErrorCode::TokenInvalid, "unknown or expired link code"),
            Err(e) => return unavailable(e),
        };
        let joiner = record.hello.as_ref().map(|h| h.dir.device());
        if record.offerer != me && joiner != Some(me) {
            return error(ErrorCode::Forbidden, "not a side of this link");
        }
        Response::LinkState {
            hello: record.hello.map(Box::new),
            answer: record.answer.map(Box::new),
        }
    }

    pub(super) async fn answer_link(
        &self,
        me: DeviceId,
        slot: LinkSlot,
        answer: LinkAnswer,
        now: Timestamp,
    ) -> Response {
        if answer.dir.device() != me {
            return error(ErrorCode::Forbidden, "a device answers only with its own record");
        }
        if let Err(e) = answer.dir.verify_signature() {
            return error(ErrorCode::BadRequest, format!("record: {e}"));
        }
        match self.store.write(Write::AnswerLink { offerer: me, slot, answer, now }).await {
            Ok(_) => Response::LinkAnswered,
            Err(e) => from_write(e),
        }
    }

    pub(super) fn own_devices(&self, me: DeviceId) -> Response {
        let devices = match self.store.own_devices(&me) {
            Ok(d) => d,
            Err(e) => return unavailable(e),
        };
        let revoked = match devices.first() {
            Some((record, _)) => {
                match self.store.revoked_of(&record.local_name, MAX_LISTED_REVOKED) {
                    Ok(r) => r,
                    Err(e) => return unavailable(e),
                }
            }
            None => Vec::new(),
        };
        let unflushed = |d: &DeviceId| self.seen.lock().ok().and_then(|s| s.get(d).copied());
        let entries = devices
            .into_iter()
            .map(|(record, info)| {
                let device = record.dir.device();
                DeviceEntry {
                    last_seen: unflushed(&device).max(info.last_seen),
                    dir: record.dir,
                    name: info.name,
                    registered: record.registered,
                    revocation: None,
                }
            })
            .chain(revoked.into_iter().map(|r| DeviceEntry {
                dir: r.dir,
                name: String::new(),
                registered: r.registered,
                last_seen: None,
                revocation: Some(r.revocation),
            }))
            .collect();
        Response::OwnDevices(entries)
    }

    pub(super) async fn name_device(&self, me: DeviceId, name: String) -> Response {
        match self.store.write(Write::NameDevice { device: me, name }).await {
            Ok(_) => Response::DeviceNamed,
            Err(e) => from_write(e),
        }
    }

    pub(super) async fn set_recovery(
        &self,
        me: DeviceId,
        key: chitchat_proto::PublicKey,
    ) -> Response {
        match self.store.write(Write::SetRecovery { device: me, key }).await {
            Ok(_) => Response::RecoverySet,
            Err(e) => from_write(e),
        }
    }

    /// Checks every signature of a revocation (the recovery key's against the user's), then
    /// hands it to the writer, which counts the signatures against the user's devices.
    pub(super) async fn revoke(
        &self,
        me: DeviceId,
        revocation: Revocation,
        now: Timestamp,
    ) -> Response {
        if revocation.body.user.host != self.id.host {
            return error(ErrorCode::BadRequest, "the user is not one of this relay's");
        }
        let recovery_key = match self.store.recovery_key(&revocation.body.user.local) {
            Ok(k) => k,
            Err(e) => return unavailable(e),
        };
        let recovered = match revocation.verify(recovery_key.as_ref()) {
            Ok((_, recovered)) => recovered,
            Err(e) => return error(ErrorCode::BadRequest, format!("revocation: {e}")),
        };
        match self.store.write(Write::Revoke { by: me, revocation, recovered, now }).await {
            Ok(Written::Revoking { revoked, signed, needed }) => Response::Revoking {
                revoked,
                signed: u32::try_from(signed).unwrap_or(u32::MAX),
                needed: u32::try_from(needed).unwrap_or(u32::MAX),
            },
            Ok(other) => unavailable(format!("unexpected {other:?}")),
            Err(e) => from_write(e),
        }
    }
}
