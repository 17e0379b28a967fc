//! A user's devices at their relay: linking a new device ([`chitchat_proto::link`]), the
//! device list with names and when each was last seen.

use chitchat_proto::link::{LINK_TTL_MS, LinkAnswer, LinkHello, LinkSlot};
use chitchat_proto::wire::{DeviceEntry, ErrorCode, Response};
use chitchat_proto::{DeviceId, Timestamp};

use super::{Relay, error, from_write, unavailable};
use crate::store::Write;

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
                }
            })
            .collect();
        Response::OwnDevices(entries)
    }

    pub(super) async fn name_device(&self, me: DeviceId, name: String) -> Response {
        match self.store.write(Write::NameDevice { device: me, name }).await {
            Ok(_) => Response::DeviceNamed,
            Err(e) => from_write(e),
        }
    }
}
