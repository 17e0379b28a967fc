//! The fan-out of ordered commits, driven by the ordering state machine as it applies the log.
//!
//! When an entry's commit wins its epoch, [`CommitFanout::deliver`] writes, in one durable write
//! of the store: the commit with this relay's certificate (one unsealed [`Envelope::Commit`]
//! record in the inbox of every member of the epoch it ends, past the inbox quota, since a member
//! that misses a commit cannot follow its channel), the Welcomes for the devices it adds, and the
//! fan-out watermark (the entry's log index). The submitter's answer waits for it. A relay that
//! dies between ordering and fan-out re-applies the log on restart and fans out what the
//! watermark says is missing; what it says is done is not written twice.

use std::sync::Arc;

use chitchat_proto::ordering::EpochCertBody;
use chitchat_proto::wire::{Envelope, OrderedCommit};
use chitchat_proto::{SecretKey, Timestamp};
use futures::future::BoxFuture;

use crate::federation::Federation;
use crate::metrics::Metrics;
use crate::ordering::{Delivery, FanoutSink};
use crate::service::{Waiters, certify, now};
use crate::store::{Fanned, HistoryLimits, InboxQuota, Onward, QueueLimits, Store, Write, Written};

/// Fault injection for tests: `CHITCHAT_RELAY_FAULT=exit-before-fanout` makes the relay abort
/// after a commit is ordered (durable in the log) and before its fan-out is written.
pub const FAULT_ENV: &str = "CHITCHAT_RELAY_FAULT";

/// The relay's [`FanoutSink`]: its store, its key (for the certificates), its metrics, and its
/// waiting fetches (woken by what is delivered).
pub struct CommitFanout {
    store: Store,
    key: SecretKey,
    metrics: Arc<Metrics>,
    waiters: Arc<Waiters>,
    /// The bounds of every inbox (Welcomes are held to them; commits are not).
    quota: InboxQuota,
    exit_before_fanout: bool,
    /// The key of this group's watermark in `meta-0`.
    watermark: String,
    /// Where the Welcomes for devices of relays a commit brings into the set go, and their
    /// queues' bounds.
    federation: Option<(Arc<Federation>, QueueLimits)>,
    /// The bounds of each channel's history, which every commit joins (`None`: none kept).
    history: Option<HistoryLimits>,
}

impl std::fmt::Debug for CommitFanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitFanout").finish_non_exhaustive()
    }
}

impl CommitFanout {
    /// A sink writing to `store`, certifying with `key`, holding Welcomes to `quota`.
    pub fn new(
        store: Store,
        key: SecretKey,
        metrics: Arc<Metrics>,
        waiters: Arc<Waiters>,
        quota: InboxQuota,
    ) -> Self {
        let exit_before_fanout = std::env::var(FAULT_ENV).is_ok_and(|f| f == "exit-before-fanout");
        let watermark = crate::store::FANNED_OUT.to_owned();
        Self {
            store,
            key,
            metrics,
            waiters,
            quota,
            exit_before_fanout,
            watermark,
            federation: None,
            history: None,
        }
    }

    /// The same sink, keeping every commit in its channel's history within `limits`.
    pub fn with_history(mut self, limits: Option<HistoryLimits>) -> Self {
        self.history = limits;
        self
    }

    /// The same sink, queueing the Welcomes of devices of relays a commit brings into the set
    /// for those relays (within `limits`).
    pub fn with_federation(mut self, federation: Arc<Federation>, limits: QueueLimits) -> Self {
        self.federation = Some((federation, limits));
        self
    }

    /// The same sink for the group `group` (its own watermark).
    pub fn for_group(&self, group: &[u8; 32]) -> Self {
        let hex = crate::groups::group_hex(group);
        Self {
            store: self.store.clone(),
            key: self.key.clone(),
            metrics: self.metrics.clone(),
            waiters: self.waiters.clone(),
            quota: self.quota,
            exit_before_fanout: self.exit_before_fanout,
            watermark: format!("{}-{hex}", crate::store::FANNED_OUT),
            federation: self.federation.clone(),
            history: self.history,
        }
    }

    /// One winner's fan-out, and the relays whose queues it fills.
    fn fanned(&self, delivery: Delivery, now: Timestamp) -> (Fanned, Vec<String>) {
        let Delivery { accepted, cert, new_relays } = delivery;
        // Welcomes for devices not registered here go, durably with the fan-out, to the
        // relays the commit brings into the set: the first user of a relay gets its Welcome
        // from there, whatever happens to the inviter.
        let onward = match &self.federation {
            Some((_, limits)) if !new_relays.is_empty() && !accepted.welcomes.is_empty() => {
                let own = self.key.public();
                let hosts: Vec<String> =
                    new_relays.iter().filter(|r| r.key != own).map(|r| r.host.clone()).collect();
                (!hosts.is_empty()).then_some(Onward { hosts, limits: *limits })
            }
            _ => None,
        };
        let kick = onward.as_ref().map(|o| o.hosts.clone()).unwrap_or_default();
        let c = accepted.commit;
        let body = EpochCertBody { channel: c.channel, epoch: c.epoch, hash: c.hash };
        let cert = cert.unwrap_or_else(|| certify(&self.key, body));
        let envelope =
            Envelope::Commit(OrderedCommit { channel: c.channel, commit: accepted.bytes.0, cert });
        let unbounded = InboxQuota { max_items: u64::MAX, max_bytes: u64::MAX };
        let commit = Write::Fanout {
            sender: c.submitter,
            envelope,
            recipients: accepted.recipients.into(),
            now,
            quota: unbounded,
            onward: None,
            seen: None,
            history: self.history,
        };
        let quota = self.quota;
        let welcomes = accepted
            .welcomes
            .into_iter()
            .map(|envelope| Write::Enqueue { sender: c.submitter, envelope, now, quota })
            .collect();
        (Fanned { commit: Box::new(commit), welcomes, onward }, kick)
    }
}

impl FanoutSink for CommitFanout {
    fn deliver(&self, accepted: Vec<Delivery>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if self.exit_before_fanout {
                // Only for a fan-out not yet done (not for entries applied again on restart).
                let watermark = self.watermark()?;
                if accepted.iter().any(|d| watermark.is_none_or(|w| d.accepted.index > w)) {
                    tracing::error!("fault injection: exiting before the fan-out of a commit");
                    std::process::abort();
                }
            }
            let now = now();
            // One write per log entry (a batch entry has several winners): the watermark
            // moves once the whole entry is fanned out.
            let mut writes: Vec<Write> = Vec::new();
            let mut kicks = Vec::new();
            for a in accepted {
                let index = a.accepted.index;
                let (fanned, kick) = self.fanned(a, now);
                kicks.push(kick);
                match writes.last_mut() {
                    Some(Write::Ordered { index: i, fanned: f, .. }) if *i == index => {
                        f.push(fanned);
                    }
                    _ => writes.push(Write::Ordered {
                        key: self.watermark.clone(),
                        index,
                        fanned: vec![fanned],
                    }),
                }
            }
            let results =
                futures::future::join_all(writes.into_iter().map(|w| self.store.write(w))).await;
            if let Some((federation, _)) = &self.federation {
                for host in kicks.iter().flatten() {
                    federation.kick(host);
                }
            }
            for result in results {
                match result.map_err(|e| e.to_string())? {
                    Written::Posted { delivered, .. } => {
                        self.metrics.commits_accepted.inc();
                        self.metrics.enqueues.inc_by(delivered.len() as u64);
                        for device in delivered {
                            self.waiters.wake(device);
                        }
                    }
                    Written::AlreadyFannedOut => {}
                    other => return Err(format!("unexpected answer to a fan-out: {other:?}")),
                }
            }
            Ok(())
        })
    }

    fn watermark(&self) -> Result<Option<u64>, String> {
        self.store.fanned_out(&self.watermark).map_err(|e| e.to_string())
    }

    fn set_watermark(&self, index: u64) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.store
                .write(Write::SetFannedOut { key: self.watermark.clone(), index })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}
