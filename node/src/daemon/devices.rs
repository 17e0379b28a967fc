//! The user's devices: linking a new one ([`chitchat_proto::link`]), naming this one, and the
//! list the relay keeps.
//!
//! The offering device (registered) opens a slot at its relay and shows the code; a task asks
//! the relay what the slot holds until a hello comes or the code expires. A hello whose proof
//! holds makes this device publish a record that lists the new device (durable in the account
//! first), then answer. The new device, registered nowhere, puts its hello in the slot, waits
//! for the answer, checks it, and registers under the user's name with a record that lists the
//! offerer: the relay sponsors it without an invite.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chitchat_proto::identity::{
    MAX_LINKED_DEVICES, RecoveryCode, RecoverySecret, Revocation, TrustedRelays,
};
use chitchat_proto::link::{LINK_TTL_MS, LinkAnswer, LinkCode, LinkHello, LinkSecret, LinkSlot};
use chitchat_proto::ordering::ChannelId;
use chitchat_proto::wire::{DeviceEntry, ErrorCode, Request, Response, check_device_name};
use chitchat_proto::{DeviceId, Timestamp};

use super::{Node, NodeError, fetch_well_known, link_for, now, refused};
use crate::engine::{EngineError, Event};
use crate::store::Account;

/// How often each side of a link asks the relay what the slot holds.
const LINK_POLL: Duration = Duration::from_millis(500);
/// How long a new device waits for the other device to answer its hello.
const ANSWER_WAIT: Duration = Duration::from_secs(120);

/// How often a device checks that every device of its user is in each of its channels (it
/// also does when it links one, and at start).
const FOLLOW_INTERVAL: Duration = Duration::from_secs(60);

/// How long after its registration a device of the user that is in none of this device's
/// channels is still taken for one whose link was cut short (and brought in).
const FOLLOW_NEW_FOR_MS: u64 = 3_600_000;

/// Passes of [`Node::follow_task`]'s work, a second apart, right after a link.
const FOLLOW_RIGHT_AFTER_LINK: usize = 30;

/// A link code this device shows, and until when it works.
#[derive(Debug)]
pub struct LinkOffer {
    /// The code (its secret never leaves this device but in it).
    pub code: LinkCode,
    /// When the relay closes its slot.
    pub expires: Timestamp,
}

/// What the relay answered a new device's hello, in words for its user.
fn join_refused(response: Response) -> NodeError {
    match response {
        Response::Error { code: ErrorCode::TokenInvalid, .. } => NodeError::Relay {
            code: "token_invalid",
            message: "the link code is wrong or has expired".into(),
        },
        Response::Error { code: ErrorCode::TokenUsed, .. } => NodeError::Relay {
            code: "token_used",
            message: "the link code was used already: ask for a new one".into(),
        },
        other => refused(other),
    }
}

impl Node {
    /// Opens a link slot at the relay and returns the code to show; a task answers the new
    /// device when it comes. A new offer ends the previous one.
    pub async fn offer_link(self: &Arc<Self>) -> Result<LinkOffer, NodeError> {
        let account =
            self.with(|e| e.account().cloned()).await.ok_or(EngineError::NotRegistered)?;
        if account.dir.body.linked.len() >= MAX_LINKED_DEVICES {
            return Err(NodeError::Invalid(format!(
                "this device is linked to {MAX_LINKED_DEVICES} devices already"
            )));
        }
        let link = self.link()?;
        let secret = LinkSecret::generate(&mut rand::rng());
        let slot = secret.slot();
        let expires = now().plus_ms(LINK_TTL_MS);
        match link.call(&Request::OfferLink { slot, expires }).await? {
            Response::LinkOffered => {}
            other => return Err(refused(other)),
        }
        if let Ok(mut offer) = self.offer.lock() {
            *offer = Some(slot);
        }
        tokio::spawn(self.clone().offer_task(secret.clone(), expires));
        Ok(LinkOffer { code: LinkCode { relay_url: account.relay.url, secret }, expires })
    }

    fn offers(&self, slot: LinkSlot) -> bool {
        self.offer.lock().is_ok_and(|o| *o == Some(slot))
    }

    async fn offer_task(self: Arc<Self>, secret: LinkSecret, expires: Timestamp) {
        let slot = secret.slot();
        match self.answer_hello(&secret, expires).await {
            Ok(Some(device)) => {
                tracing::info!(device = %device, "device linked");
                let _ = self.events.send(Event::DeviceLinked { device: device.0.to_hex() });
                // The new device follows the user into every channel: as soon as it has
                // registered and uploaded its KeyPackages, a moment after this answer.
                for _ in 0..FOLLOW_RIGHT_AFTER_LINK {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match self.follow_user(Some(device)).await {
                        Ok(false) => break,
                        Ok(true) => {}
                        Err(e) => tracing::debug!(error = %e, "following the user failed"),
                    }
                }
            }
            Ok(None) => tracing::debug!("link code expired or replaced"),
            Err(e) => {
                tracing::warn!(error = %e, "link failed");
                let _ = self.events.send(Event::LinkFailed { reason: e.to_string() });
            }
        }
        if let Ok(mut offer) = self.offer.lock()
            && *offer == Some(slot)
        {
            *offer = None;
        }
    }

    /// Waits for the hello in this device's slot and answers it. `None`: the code expired or a
    /// newer offer replaced it.
    async fn answer_hello(
        &self,
        secret: &LinkSecret,
        expires: Timestamp,
    ) -> Result<Option<DeviceId>, NodeError> {
        let slot = secret.slot();
        while now() < expires && self.offers(slot) {
            let link = self.link()?;
            match link.call(&Request::LinkPoll { slot }).await {
                Ok(Response::LinkState { hello: Some(hello), .. }) => {
                    // A hello without the secret's proof came from someone who does not hold
                    // the code (the relay, or a guess): the slot is spent, the link fails.
                    let joiner = hello
                        .verify(secret, now())
                        .map_err(|e| NodeError::Invalid(format!("the new device's hello: {e}")))?;
                    self.link_device(joiner, secret, slot).await?;
                    return Ok(Some(joiner));
                }
                Ok(Response::LinkState { hello: None, .. }) => {}
                // The relay counts these polls among requests that need no registration.
                Ok(Response::Error { code: ErrorCode::RateLimited { .. }, .. }) => {}
                Ok(Response::Error { code: ErrorCode::TokenInvalid, .. }) => return Ok(None),
                Ok(other) => return Err(refused(other)),
                Err(e) => tracing::debug!(error = %e, "link poll failed; trying again"),
            }
            tokio::time::sleep(LINK_POLL).await;
        }
        Ok(None)
    }

    /// Lists `joiner` in this device's record (kept in the account first, then published) and
    /// answers its hello with that record.
    async fn link_device(
        &self,
        joiner: DeviceId,
        secret: &LinkSecret,
        slot: LinkSlot,
    ) -> Result<(), NodeError> {
        // Listed before (a retried poll): the same record is published again.
        let dir = self
            .update_linked(move |linked| {
                linked.insert(joiner);
            })
            .await?;
        let answer = LinkAnswer::new(secret, joiner, dir);
        match self.link()?.call(&Request::AnswerLink { slot, answer }).await? {
            Response::LinkAnswered => Ok(()),
            other => Err(refused(other)),
        }
    }

    /// Completes a link on a device registered nowhere: hello, the other device's answer,
    /// registration under the user's name. `name` names this device in the user's list.
    pub async fn join_link(&self, code: &str, name: Option<String>) -> Result<Account, NodeError> {
        self.check_unregistered().await?;
        let code = LinkCode::parse(code).map_err(|e| NodeError::Invalid(e.to_string()))?;
        if let Some(name) = &name {
            check_device_name(name).map_err(|e| NodeError::Invalid(e.to_owned()))?;
        }
        let relay = fetch_well_known(&code.relay_url).await?;
        let key = self.with(|e| e.key().clone()).await;
        let link = Arc::new(link_for(&self.host, key, &relay, &self.config).await?);
        let slot = code.secret.slot();
        let t = now();
        let first = self.with(move |e| e.first_dir("", t)).await;
        let me = first.device();
        let hello = LinkHello::new(&code.secret, first.clone());
        match link.call(&Request::JoinLink { slot, hello }).await? {
            Response::LinkJoined => {}
            other => return Err(join_refused(other)),
        }
        let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
        let answer = loop {
            match link.call(&Request::LinkPoll { slot }).await? {
                Response::LinkState { answer: Some(answer), .. } => break answer,
                Response::LinkState { .. } => {}
                Response::Error { code: ErrorCode::RateLimited { .. }, .. } => {}
                other => return Err(join_refused(other)),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(NodeError::Invalid(format!(
                    "the other device did not answer within {} s (is its daemon running?); \
                     ask it for a new code",
                    ANSWER_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(LINK_POLL).await;
        };
        let trust = TrustedRelays { relays: vec![relay.id.clone()], ..Default::default() };
        let address = answer
            .verify(&code.secret, me, &trust, &relay.id.host, now())
            .map_err(|e| NodeError::Invalid(format!("the other device's answer: {e}")))?;
        let offerer = answer.dir.clone();
        // This device lists the offerer and the devices the offerer lists (each link holds
        // once the other lists this device too).
        let linked: BTreeSet<DeviceId> = offerer
            .body
            .linked
            .iter()
            .copied()
            .filter(|d| *d != me)
            .chain([offerer.device()])
            .take(MAX_LINKED_DEVICES)
            .collect();
        let t = now();
        let dir = self.with(move |e| e.next_dir(&first, |b| b.linked = linked, t)).await?;
        let request =
            Request::Register { token: None, local_name: address.local.clone(), dir: dir.clone() };
        let sponsorship = match link.call(&request).await? {
            Response::Registered { sponsorship } => sponsorship,
            other => return Err(refused(other)),
        };
        self.with(move |e| e.add_dirs(vec![offerer])).await?;
        let account =
            self.registered_as(link.clone(), relay, address.local, dir, sponsorship).await?;
        if let Some(name) = name {
            match link.call(&Request::NameDevice { name }).await? {
                Response::DeviceNamed => {}
                other => tracing::warn!(answer = ?other, "the device's name was not kept"),
            }
        }
        Ok(account)
    }

    /// Brings the user's other devices into every channel this device is in, now, every
    /// [`FOLLOW_INTERVAL`], and when this device links one: the channel rules let any device of
    /// the user add them. A device of the user that is in none yet (just linked, its KeyPackages
    /// not uploaded yet) is tried again on the next pass. Several of the user's devices may try
    /// at once: the ordering lets one win, and the others find the device a member.
    pub(super) async fn follow_task(self: Arc<Self>) {
        let _ = self.wait_for_link().await;
        loop {
            if let Err(e) = self.follow_user(None).await.map(drop) {
                tracing::debug!(error = %e, "the user's devices not brought into every channel");
            }
            tokio::time::sleep(FOLLOW_INTERVAL).await;
        }
    }

    /// One pass of [`Node::follow_task`]: brings `new` (a device just linked) into every
    /// channel this device is in; or, with `None`, the user's devices registered within the
    /// last hour that are in **none** of them (a link whose follow-up was cut short). Any other
    /// device of the user missing from a channel left it, or was removed: it is not brought
    /// back. `true` if a device is still missing from a channel.
    async fn follow_user(&self, new: Option<DeviceId>) -> Result<bool, NodeError> {
        let Some(account) = self.with(|e| e.account().cloned()).await else {
            return Ok(false);
        };
        let (address, me) = (account.address().to_string(), account.dir.device());
        let since = Timestamp(now().0.saturating_sub(FOLLOW_NEW_FOR_MS));
        // (The records are cached, verified, by the look-up `add_devices_of` makes.)
        let entries = self.own_devices().await?;
        self.apply_revocations(&account, &entries).await;
        if let Err(e) = self.list_linked(&account, &entries).await {
            tracing::debug!(error = %e, "the user's devices not listed in this device's record");
        }
        let own: Vec<DeviceId> = entries
            .into_iter()
            .filter(|d| d.revocation.is_none())
            .filter(|d| match new {
                Some(n) => d.dir.device() == n,
                None => d.registered >= since,
            })
            .map(|d| d.dir.device())
            .filter(|d| *d != me)
            .collect();
        if own.is_empty() {
            return Ok(false);
        }
        let (missing, wanted): (Vec<ChannelId>, Vec<DeviceId>) = self
            .with(move |e| {
                let channels: Vec<(ChannelId, Vec<DeviceId>)> = e
                    .active_channels()
                    .into_iter()
                    .filter(|id| !e.is_relayless(id))
                    .filter_map(|id| e.members(&id).ok().map(|m| (id, m)))
                    .collect();
                let wanted: Vec<DeviceId> = own
                    .into_iter()
                    .filter(|d| new.is_some() || channels.iter().all(|(_, m)| !m.contains(d)))
                    .collect();
                let missing = channels
                    .into_iter()
                    .filter(|(_, m)| wanted.iter().any(|d| !m.contains(d)))
                    .map(|(id, _)| id)
                    .collect();
                (missing, wanted)
            })
            .await;
        let mut still_missing = false;
        for channel in missing {
            match self.add_devices_of(channel, &address, |d| wanted.contains(d)).await {
                Ok(added) => {
                    tracing::info!(%channel, ?added, "the user's devices brought in");
                    for device in added {
                        if let Err(e) = self.hand_over(channel, device).await {
                            tracing::warn!(%channel, %device, error = %e, "history not handed over");
                        }
                    }
                }
                Err(e) => {
                    still_missing = true;
                    tracing::debug!(%channel, error = %e, "the user's devices not added yet");
                }
            }
        }
        Ok(still_missing)
    }

    /// Hands `channel`'s history as this device stored it to `device`, another device of the
    /// user that this device just added: packs sealed to it, one inbox item each (after the
    /// Welcome, which the relay put in its inbox with the ordered commit).
    async fn hand_over(&self, channel: ChannelId, device: DeviceId) -> Result<(), NodeError> {
        let envelopes = self.with(move |e| e.history_for(&channel, device)).await?;
        let link = self.link()?;
        let n = envelopes.len();
        for envelope in envelopes {
            match link.call(&Request::Enqueue { envelope }).await? {
                Response::Enqueued { .. } => {}
                other => return Err(refused(other)),
            }
        }
        tracing::info!(%channel, %device, packs = n, "history handed over");
        Ok(())
    }

    /// The devices registered under this user's name at the relay.
    pub async fn own_devices(&self) -> Result<Vec<DeviceEntry>, NodeError> {
        match self.link()?.call(&Request::OwnDevices).await? {
            Response::OwnDevices(devices) => Ok(devices),
            other => Err(refused(other)),
        }
    }

    /// Names this device in the user's list.
    pub async fn name_device(&self, name: String) -> Result<(), NodeError> {
        check_device_name(&name).map_err(|e| NodeError::Invalid(e.to_owned()))?;
        match self.link()?.call(&Request::NameDevice { name }).await? {
            Response::DeviceNamed => Ok(()),
            other => Err(refused(other)),
        }
    }

    /// Sets the user's recovery code: drawn here, its key's public half given to the relay,
    /// the code returned to be shown once and kept by no device. The relay takes it only from
    /// the user's first device before it links another, and only once.
    pub async fn set_recovery(&self) -> Result<RecoveryCode, NodeError> {
        let secret = RecoverySecret::generate(&mut rand::rng());
        let key = secret.key().public();
        match self.link()?.call(&Request::SetRecovery { key }).await? {
            Response::RecoverySet => Ok(secret.code()),
            other => Err(refused(other)),
        }
    }

    /// Signs the revocation of `target` (another device of this user: its id, a prefix of it
    /// of at least 8 hex digits, or its name in the list) and hands it to the relay, with the
    /// recovery code's signature if `recovery` is given. Once the relay revokes it, this
    /// device takes it out of its record and out of every channel at once (the other devices
    /// of the user do on their next pass).
    pub async fn revoke_device(
        &self,
        target: &str,
        recovery: Option<&str>,
    ) -> Result<RevokeOutcome, NodeError> {
        let account =
            self.with(|e| e.account().cloned()).await.ok_or(EngineError::NotRegistered)?;
        let me = account.dir.device();
        let recovery = recovery
            .map(RecoverySecret::parse)
            .transpose()
            .map_err(|e| NodeError::Invalid(format!("recovery code: {e}")))?;
        let entries = self.own_devices().await?;
        let active: Vec<&DeviceEntry> = entries.iter().filter(|d| d.revocation.is_none()).collect();
        let target = pick_device(&active, target)?;
        if target == me {
            return Err(NodeError::Invalid(
                "a device does not revoke itself: revoke it from another of your devices".into(),
            ));
        }
        let mut revocation = Revocation::new(target, account.address());
        let key = self.with(|e| e.key().clone()).await;
        revocation.sign(&key);
        if let Some(secret) = &recovery {
            revocation.sign_recovery(secret);
        }
        let request = Request::Revoke { revocation: Box::new(revocation) };
        let (revoked, signed, needed) = match self.link()?.call(&request).await? {
            Response::Revoking { revoked, signed, needed } => (revoked, signed, needed),
            other => return Err(refused(other)),
        };
        if revoked {
            tracing::info!(%target, "device revoked");
            self.take_out(&account, BTreeSet::from([target])).await;
        }
        Ok(RevokeOutcome { device: target, revoked, signed, needed })
    }

    /// Acts on the revocations the relay lists for this user: each one's signatures checked
    /// (the relay counted them against the user's devices, as it alone can; it is the user's
    /// relay, which sponsors every device of the user anyway), the device is dropped from this
    /// device's record and removed from every channel this device is in, by an ordered commit
    /// the rules allow any device of the user.
    async fn apply_revocations(&self, account: &Account, entries: &[DeviceEntry]) {
        let me = account.dir.device();
        let user = account.address();
        let revoked: BTreeSet<DeviceId> = entries
            .iter()
            .filter_map(|d| d.revocation.as_ref().map(|r| (d, r)))
            .filter(|(d, r)| {
                r.body.user == user
                    && r.body.target == d.dir.device()
                    && r.body.target != me
                    && r.verify_signers().is_ok_and(|s| !s.is_empty())
            })
            .map(|(d, _)| d.dir.device())
            .collect();
        if !revoked.is_empty() {
            self.take_out(account, revoked).await;
        }
    }

    /// Drops revoked devices from this device's record, and removes them from every channel
    /// this device is in.
    async fn take_out(&self, account: &Account, revoked: BTreeSet<DeviceId>) {
        if !account.dir.body.linked.is_disjoint(&revoked) {
            let gone = revoked.clone();
            if let Err(e) = self.update_linked(move |l| l.retain(|d| !gone.contains(d))).await {
                tracing::warn!(error = %e, "revoked devices not dropped from this device's record");
            }
        }
        let removals: Vec<(ChannelId, Vec<DeviceId>)> = self
            .with(move |e| {
                e.active_channels()
                    .into_iter()
                    .filter(|id| !e.is_relayless(id))
                    .filter_map(|id| {
                        let members = e.members(&id).ok()?;
                        let gone: Vec<DeviceId> =
                            members.into_iter().filter(|m| revoked.contains(m)).collect();
                        (!gone.is_empty()).then_some((id, gone))
                    })
                    .collect()
            })
            .await;
        for (channel, devices) in removals {
            match self.remove(channel, devices.clone()).await {
                Ok(()) => tracing::info!(%channel, ?devices, "revoked devices removed"),
                // Another device of the user may have won the epoch with the same removal.
                Err(e) => tracing::debug!(%channel, error = %e, "revoked devices not removed yet"),
            }
        }
    }

    /// Lists in this device's record every device of the user that lists this one (a device
    /// linked through another of the user's devices lists that one's devices too, which did
    /// not list it back), so that the user's records name each other both ways.
    async fn list_linked(
        &self,
        account: &Account,
        entries: &[DeviceEntry],
    ) -> Result<(), NodeError> {
        let me = account.dir.device();
        let new: BTreeSet<DeviceId> = entries
            .iter()
            .filter(|d| d.revocation.is_none() && d.dir.device() != me)
            .filter(|d| d.dir.body.linked.contains(&me))
            .filter(|d| !account.dir.body.linked.contains(&d.dir.device()))
            .filter(|d| d.dir.verify_signature().is_ok())
            .map(|d| d.dir.device())
            .collect();
        if new.is_empty() || account.dir.body.linked.len() + new.len() > MAX_LINKED_DEVICES {
            return Ok(());
        }
        tracing::info!("this device's record lists the user's other devices");
        self.update_linked(move |l| l.extend(new)).await.map(drop)
    }

    /// Changes the devices this device's record lists: a new record (unless the list stays
    /// the same) kept in the account first, then the record the account holds published (so a
    /// publish that failed goes again, never a lower sequence number). Returns that record.
    async fn update_linked(
        &self,
        change: impl FnOnce(&mut BTreeSet<DeviceId>) + Send + 'static,
    ) -> Result<chitchat_proto::Dir, NodeError> {
        let t = now();
        let dir = self
            .with(move |e| -> Result<chitchat_proto::Dir, EngineError> {
                let mut account = e.account().cloned().ok_or(EngineError::NotRegistered)?;
                let mut linked = account.dir.body.linked.clone();
                change(&mut linked);
                if linked != account.dir.body.linked {
                    account.dir = e.next_dir(&account.dir, |b| b.linked = linked, t)?;
                    e.set_account(account.clone())?;
                }
                Ok(account.dir)
            })
            .await?;
        match self.link()?.call(&Request::PublishDir { dir: dir.clone() }).await? {
            Response::DirPublished => Ok(dir),
            other => Err(refused(other)),
        }
    }
}

/// Where a revocation stands after this device signed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokeOutcome {
    /// The device.
    pub device: DeviceId,
    /// Whether the relay revoked it.
    pub revoked: bool,
    /// Signatures of the user's settled devices the relay counted (of the last day).
    pub signed: u32,
    /// How many it needs without the recovery code.
    pub needed: u32,
}

/// The active device of the list that `which` names: its id in hex, a prefix of it of at
/// least 8 hex digits, or its name.
fn pick_device(devices: &[&DeviceEntry], which: &str) -> Result<DeviceId, NodeError> {
    let which = which.trim();
    let lower = which.to_ascii_lowercase();
    let by_id: Vec<DeviceId> = devices
        .iter()
        .map(|d| d.dir.device())
        .filter(|d| lower.len() >= 8 && d.0.to_hex().starts_with(&lower))
        .collect();
    let by_name: Vec<DeviceId> = devices
        .iter()
        .filter(|d| !d.name.is_empty() && d.name == which)
        .map(|d| d.dir.device())
        .collect();
    match (by_id.as_slice(), by_name.as_slice()) {
        ([one], _) | ([], [one]) => Ok(*one),
        ([], []) => Err(NodeError::Invalid(format!("no device of yours is {which:?}"))),
        _ => Err(NodeError::Invalid(format!(
            "{which:?} names several of your devices: give the device id"
        ))),
    }
}
