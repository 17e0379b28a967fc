//! Catching forks and equivocating orderers: what this device recorded of each epoch, the
//! reports it sends and receives, and the proofs it keeps.
//!
//! After every epoch it reaches, the device records the commit's certificate and a digest of
//! the epoch authenticator (`epochs-0`, with the channel state, in one commit) and queues a
//! signed [`EpochReport`] for the daemon to send through the relay to the other members. A
//! report or a late commit that disagrees with the record gives a fork (kept in `forks-0`) or,
//! when one orderer signed both commits, an equivocation proof (kept in `convicted-0`): that
//! orderer's signatures stop counting in every channel, and the proof goes to the relay.
//! Evidence is committed at once, in its own transaction: a later failure of the inbox batch
//! that found it does not undo it.

use std::collections::{BTreeMap, HashMap, VecDeque};

use chitchat_proto::PublicKey;
use chitchat_proto::ordering::{
    ChannelId, EpochCert, EpochRecord, EpochReport, EpochReportBody, Equivocation, Finding,
    compare, reports_epoch,
};

use super::{Engine, Event, Step};
use crate::store::{Batch, ForkRecord};
use chitchat_proto::Timestamp;

/// Reports of epochs this device has not reached yet, kept in memory to compare later.
const MAX_AHEAD_REPORTS: usize = 1024;
/// How far ahead of this device's epoch a report is kept.
const AHEAD_EPOCHS: u64 = 64;
/// Records kept in memory per channel (older ones are read from `epochs-0`).
const RECENT_RECORDS: usize = 8;
/// Proofs waiting to go to the relay, at most.
const MAX_OUTGOING_PROOFS: usize = 64;

/// The engine's evidence state.
#[derive(Debug, Default)]
pub(super) struct Evidence {
    /// Orderers convicted, with the proof.
    convicted: BTreeMap<PublicKey, Equivocation>,
    /// The last records of each channel.
    recent: HashMap<ChannelId, VecDeque<(u64, EpochRecord)>>,
    /// Reports of epochs ahead of this device's.
    ahead: BTreeMap<(ChannelId, u64), Vec<EpochReport>>,
    ahead_len: usize,
    /// This device's latest report of each channel, to send.
    reports: BTreeMap<ChannelId, EpochReport>,
    /// Proofs to give the relay.
    proofs: Vec<Equivocation>,
}

impl Evidence {
    pub(super) fn load(convicted: Vec<(PublicKey, Equivocation)>) -> Self {
        Self { convicted: convicted.into_iter().collect(), ..Self::default() }
    }

    /// The convicted orderers' keys.
    pub(super) fn convicted_keys(&self) -> Vec<PublicKey> {
        self.convicted.keys().copied().collect()
    }
}

/// What the daemon sends for the evidence machinery.
#[derive(Debug, Default)]
pub struct Outgoing {
    /// This device's latest report of each channel that reached a new epoch.
    pub reports: Vec<EpochReport>,
    /// Equivocation proofs found since the last time.
    pub proofs: Vec<Equivocation>,
}

impl Outgoing {
    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.reports.is_empty() && self.proofs.is_empty()
    }
}

/// An orderer convicted of equivocation, as the status shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Conviction {
    /// The orderer's key (hex).
    pub orderer: String,
    /// The relay's host, when the orderer is a relay this device knows.
    pub relay: Option<String>,
    /// The channel it signed two commits in (hex).
    pub channel: String,
    /// The epoch.
    pub epoch: u64,
}

impl Engine {
    /// Records what this device reached at `epoch` (into `b`, with the channel state), queues
    /// its report, and compares the reports that waited for this epoch.
    pub(super) fn reached(
        &mut self,
        id: ChannelId,
        epoch: u64,
        record: EpochRecord,
        b: &mut Batch,
        events: &mut Vec<Event>,
        now: Timestamp,
    ) {
        b.epoch(id, epoch, record.clone());
        let recent = self.evidence.recent.entry(id).or_default();
        recent.push_back((epoch, record.clone()));
        while recent.len() > RECENT_RECORDS {
            recent.pop_front();
        }
        let members = self
            .channels
            .get(&id)
            .and_then(|h| h.channel.as_ref())
            .map_or(0, |c| c.members().len());
        if reports_epoch(&id, epoch, &self.device(), members) {
            let body = EpochReportBody {
                channel: id,
                epoch,
                digest: record.digest,
                cert: record.cert.clone(),
                device: self.device(),
            };
            self.evidence.reports.insert(id, EpochReport::sign(&self.key, body));
        }
        let waiting: Vec<(ChannelId, u64)> =
            self.evidence.ahead.range((id, 0)..=(id, epoch)).map(|(k, _)| *k).collect();
        for key in waiting {
            let reports = self.evidence.ahead.remove(&key).unwrap_or_default();
            self.evidence.ahead_len = self.evidence.ahead_len.saturating_sub(reports.len());
            if key.1 == epoch {
                for r in reports {
                    self.compare_report(&record, &r.body, events, now);
                }
            }
        }
    }

    /// Whether the channel's orderers can still certify anything: not if a majority of them
    /// is convicted of equivocation.
    pub(super) fn orderers_convicted(&self, orderers: &[PublicKey]) -> bool {
        let convicted = orderers.iter().filter(|o| self.evidence.convicted.contains_key(o)).count();
        orderers.len() - convicted < orderers.len() / 2 + 1
    }

    /// What this device recorded when it reached `epoch`.
    pub(super) fn record_of(&self, id: &ChannelId, epoch: u64) -> Option<EpochRecord> {
        if let Some(r) = self
            .evidence
            .recent
            .get(id)
            .and_then(|v| v.iter().find(|(e, _)| *e == epoch).map(|(_, r)| r.clone()))
        {
            return Some(r);
        }
        match self.store.epoch_record(id, epoch) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(channel = %id, epoch, error = %e, "cannot read an epoch record");
                None
            }
        }
    }

    /// A commit for an epoch this device already passed (a loser's, a duplicate, or another
    /// commit an orderer certified as well): its certificate against the one applied.
    pub(super) fn check_late_commit(
        &mut self,
        id: ChannelId,
        cert: &EpochCert,
        events: &mut Vec<Event>,
    ) {
        let Some(epoch) = cert.body.epoch.checked_add(1) else { return };
        let Some(ours) = self.record_of(&id, epoch).and_then(|r| r.cert) else { return };
        for proof in Equivocation::find(&ours, cert) {
            self.convict(proof, events);
        }
    }

    /// Another member's report: compared now if this device recorded that epoch, kept for
    /// later if the epoch is a little ahead.
    pub(super) fn receive_report(
        &mut self,
        report: EpochReport,
        now: Timestamp,
        events: &mut Vec<Event>,
    ) -> Step {
        if let Err(e) = report.verify() {
            tracing::warn!(error = %e, "dropping an epoch report");
            self.dropped.invalid += 1;
            return Step::Dropped;
        }
        let body = &report.body;
        let id = body.channel;
        if body.device == self.device() {
            return Step::Done;
        }
        let Some(channel) = self.channels.get(&id).and_then(|h| h.channel.as_ref()) else {
            return Step::Done;
        };
        let current = channel.epoch();
        if !channel.members().contains(&body.device) {
            tracing::debug!(channel = %id, "an epoch report of a non-member; ignored");
            return Step::Done;
        }
        if let Some(own) = self.record_of(&id, body.epoch) {
            let body = body.clone();
            self.compare_report(&own, &body, events, now);
        } else if body.epoch > current
            && body.epoch <= current.saturating_add(AHEAD_EPOCHS)
            && self.evidence.ahead_len < MAX_AHEAD_REPORTS
        {
            self.evidence.ahead.entry((id, body.epoch)).or_default().push(report);
            self.evidence.ahead_len += 1;
        }
        Step::Done
    }

    fn compare_report(
        &mut self,
        own: &EpochRecord,
        body: &EpochReportBody,
        events: &mut Vec<Event>,
        now: Timestamp,
    ) {
        for finding in compare(own, body) {
            match finding {
                Finding::Equivocation(proof) => self.convict(proof, events),
                Finding::Fork { channel, epoch, device, kind } => {
                    self.fork(ForkRecord { channel, epoch, device, kind, at: now }, events);
                }
            }
        }
    }

    fn fork(&mut self, fork: ForkRecord, events: &mut Vec<Event>) {
        tracing::error!(
            channel = %fork.channel,
            epoch = fork.epoch,
            member = %self.name_of(&fork.device),
            kind = ?fork.kind,
            "FORK: another member of the channel is in another state of this epoch"
        );
        let mut b = Batch::default();
        b.fork(fork.clone());
        if let Err(e) = self.store.commit(b) {
            tracing::error!(error = %e, "cannot keep a fork");
        }
        events.push(Event::Fork {
            channel: fork.channel.to_string(),
            epoch: fork.epoch,
            device: fork.device.0.to_hex(),
            kind: format!("{:?}", fork.kind),
        });
    }

    /// Keeps a proof, stops counting the orderer's signatures everywhere, and queues the proof
    /// for the relay.
    fn convict(&mut self, proof: Equivocation, events: &mut Vec<Event>) {
        let Ok(signer) = proof.verify() else { return };
        if self.evidence.convicted.contains_key(&signer) {
            return;
        }
        let (channel, epoch) = proof.epoch();
        // Only an orderer of the channel is convicted: any key can sign two hashes, and a
        // report may carry signatures of anyone.
        let orderer = self
            .channels
            .get(&channel)
            .and_then(|h| h.channel.as_ref())
            .is_some_and(|c| c.config().orderers().contains(&signer));
        if !orderer {
            tracing::debug!(%channel, "two signatures of a key that orders nothing here; ignored");
            return;
        }
        let relay = self.relay_of(&signer);
        tracing::error!(
            orderer = %signer.to_hex(),
            relay = relay.as_deref().unwrap_or("?"),
            %channel,
            epoch,
            "EQUIVOCATION: an orderer signed two commits for one epoch; its signatures no longer count"
        );
        let mut b = Batch::default();
        b.convicted(signer, proof.clone());
        if let Err(e) = self.store.commit(b) {
            tracing::error!(error = %e, "cannot keep an equivocation proof");
        }
        self.evidence.convicted.insert(signer, proof.clone());
        if self.evidence.proofs.len() < MAX_OUTGOING_PROOFS {
            self.evidence.proofs.push(proof);
        }
        let keys = self.evidence.convicted_keys();
        for held in self.channels.values_mut() {
            if let Some(c) = held.channel.as_mut() {
                c.set_convicted(keys.clone());
            }
        }
        events.push(Event::Equivocation {
            orderer: signer.to_hex(),
            relay,
            channel: channel.to_string(),
            epoch,
        });
    }

    /// The host of the relay with this key, if this device knows it.
    fn relay_of(&self, key: &PublicKey) -> Option<String> {
        self.account
            .iter()
            .map(|a| &a.relay.id)
            .chain(self.relays.values())
            .find(|r| r.key == *key)
            .map(|r| r.host.clone())
    }

    /// What to send: reports of the epochs reached, and new proofs.
    pub fn take_outgoing(&mut self) -> Outgoing {
        Outgoing {
            reports: std::mem::take(&mut self.evidence.reports).into_values().collect(),
            proofs: std::mem::take(&mut self.evidence.proofs),
        }
    }

    /// Puts back what could not be sent (unless a newer report of the channel is waiting).
    pub fn untake_outgoing(&mut self, unsent: Outgoing) {
        for report in unsent.reports {
            self.evidence.reports.entry(report.body.channel).or_insert(report);
        }
        for proof in unsent.proofs {
            if self.evidence.proofs.len() < MAX_OUTGOING_PROOFS {
                self.evidence.proofs.push(proof);
            }
        }
    }

    /// The orderers convicted of equivocation.
    pub fn convictions(&self) -> Vec<Conviction> {
        self.evidence
            .convicted
            .iter()
            .map(|(key, proof)| {
                let (channel, epoch) = proof.epoch();
                Conviction {
                    orderer: key.to_hex(),
                    relay: self.relay_of(key),
                    channel: channel.to_string(),
                    epoch,
                }
            })
            .collect()
    }

    /// The forks found.
    pub fn forks(&self) -> Result<Vec<ForkRecord>, crate::store::StoreError> {
        self.store.forks()
    }
}
