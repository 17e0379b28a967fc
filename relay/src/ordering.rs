//! Commit ordering: `chitchat-proto`'s [`Orderer`] (the ordering state, each channel's public
//! MLS state and the channel rules, sans I/O) as the replicated state machine of an openraft
//! group, with its log in redb.
//!
//! Today the group has one member, this relay (the fast path for channels whose members all sit
//! on one relay). The storage, state machine and type configuration are those a multi-relay
//! group needs; what a later issue adds is a [`RaftNetwork`] that reaches other relays and
//! membership changes that follow a channel's relay set.
//!
//! - Log, vote, committed index and the last snapshot live in their own redb file
//!   (`ordering.redb`), each append fsync'd before openraft is told it is durable.
//! - The state machine is in memory, rebuilt on start from the last snapshot plus the committed
//!   log after it (openraft re-applies them).
//! - An answer to [`Ordering::submit`] means the entry is committed (durable) and applied.
//! - **First valid commit wins.** Entries carry the commit itself; the orderer keeps each
//!   channel's public MLS state and lets a commit take its epoch only if it is valid against that
//!   state and the channel rules (signed by a member, proposals that apply, allowed). This check is
//!   deterministic, so every replica reaches the same verdict from the same log. Credential checks
//!   depend on each relay's directory and clock, so the submitting relay makes them before it
//!   proposes ([`Ordering::check`]).
//! - **Fan-out follows the log.** Each winner's [`Accepted`] goes to the [`FanoutSink`] before
//!   any answer leaves, and again when the log is applied again after a restart (the sink skips
//!   what its watermark says is done).

// openraft's storage traits fix the error type (`StorageError`, over 200 bytes).
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use chitchat_proto::channel::{ChannelError, CredentialCheck, PublicState};
use chitchat_proto::codec::{Bytes, decode, encode};
pub use chitchat_proto::ordering::{Accepted, MEMBER_EPOCHS};
use chitchat_proto::ordering::{
    ChannelId, CommitRef, EpochCert, OrderCommand, Orderer, OrderingLimits, OrderingState,
    StoragePairs, Verdict, Waiting,
};
use chitchat_proto::wire::SealedWelcomes;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

openraft::declare_raft_types!(
    /// The relay's Raft type configuration: entries are [`RelayCommand`]s, answers
    /// [`RelayOutcome`]s.
    pub TypeConfig:
        D = RelayCommand,
        R = Vec<RelayOutcome>,
);

/// An entry of the ordering log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayCommand {
    /// Start ordering a channel from its public state.
    Open {
        /// The channel.
        channel: ChannelId,
        /// GroupInfo and ratchet tree.
        state: PublicState,
    },
    /// Ask for an epoch with this commit (entries written before fan-out moved into the state
    /// machine; applied as [`RelayCommand::Order`] without Welcomes).
    Submit {
        /// What is ordered.
        commit: CommitRef,
        /// The commit itself, checked against the channel's public state on apply.
        bytes: Bytes,
    },
    /// Ask for an epoch with this commit; if it wins, fan it out with its Welcomes (in a
    /// channel of several relays: once its certificate is in the log, [`RelayCommand::Deliver`]).
    Order {
        /// What is ordered; `submitter` is the device that submitted it, which must be the
        /// member that committed it.
        commit: CommitRef,
        /// The commit itself, checked against the channel's public state on apply.
        bytes: Bytes,
        /// The Welcomes for the devices it adds (sealed by the submitter).
        welcome: Option<SealedWelcomes>,
    },
    /// The certificate of a winner of a channel of several relays (a majority of its relays
    /// signed): every relay of the group fans the winner out to its own members with it.
    Deliver {
        /// The certificate.
        cert: EpochCert,
    },
    /// Start ordering a channel from its public state, replacing a stale copy of a channel
    /// that moved away and came back (see `proto`'s `OrderCommand::Reopen`).
    Reopen {
        /// The channel.
        channel: ChannelId,
        /// GroupInfo and ratchet tree.
        state: PublicState,
    },
    /// Commands submitted while the entry before was being written, applied in order as if
    /// each had an entry of its own (one answer each; their winners' fan-outs share the entry's
    /// index and are written together). A batch inside a batch is refused.
    Batch(Vec<RelayCommand>),
}

pub use chitchat_proto::ordering::Delivery;

/// Where accepted commits go. An answer to [`Ordering::submit`] waits until
/// [`FanoutSink::deliver`] made their fan-out durable, so nothing acknowledged is lost.
pub trait FanoutSink: Send + Sync + 'static {
    /// Makes the fan-out of these commits durable, skipping those whose index is at or below
    /// the watermark, and moves the watermark to the last. An error stops the ordering group.
    fn deliver(
        &self,
        accepted: Vec<Delivery>,
    ) -> futures::future::BoxFuture<'_, Result<(), String>>;
    /// The highest log index whose fan-out is durable, if one was ever recorded.
    fn watermark(&self) -> Result<Option<u64>, String>;
    /// Records the watermark (a store that never recorded one starts at the log's end: its
    /// relay fanned out before the watermark existed).
    fn set_watermark(&self, index: u64) -> futures::future::BoxFuture<'_, Result<(), String>>;
}

/// The answer to one [`RelayCommand`]: the orderer's verdict. (An entry's answer is one per
/// command: several for a [`RelayCommand::Batch`].)
pub type RelayOutcome = Verdict;

/// Most commands in one [`RelayCommand::Batch`].
pub const MAX_BATCH: usize = 256;
/// Most batches being written at once.
const BATCHES_IN_FLIGHT: usize = 2;
/// Most commands waiting for a batch.
const BATCH_QUEUE: usize = 4096;

/// The openraft handle for the ordering group.
pub type Raft = openraft::Raft<TypeConfig>;

const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("raft-log-0");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("raft-meta-0");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";
const SNAPSHOT: &str = "snapshot";
/// Entries kept in the log after a snapshot, so a slow follower can catch up without one.
const LOG_AFTER_SNAPSHOT: u64 = 1000;
/// Bytes of a snapshot sent to a follower in one message.
const SNAPSHOT_CHUNK: u64 = 512 * 1024;
/// Largest log entry or snapshot read back.
const MAX_RECORD: usize = 1 << 30;

type StorageResult<T> = Result<T, StorageError<u64>>;

fn read_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_logs(&e).into()
}

fn corrupt(what: &'static str) -> StorageError<u64> {
    StorageIOError::read_logs(&std::io::Error::other(format!("corrupt {what}"))).into()
}

/// The log store on redb. Cloned handles share the database.
#[derive(Clone, Debug)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    fn meta<T: Serialize + serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> StorageResult<Option<T>> {
        let r = self.db.begin_read().map_err(read_err)?;
        let t = r.open_table(META).map_err(read_err)?;
        let Some(v) = t.get(key).map_err(read_err)? else { return Ok(None) };
        decode(v.value(), MAX_RECORD).map(Some).map_err(|_| corrupt("raft metadata"))
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> StorageResult<()> {
        let mut w = self.db.begin_write().map_err(write_err)?;
        w.set_durability(Durability::Immediate).map_err(write_err)?;
        w.open_table(META)
            .map_err(write_err)?
            .insert(key, encode(value).as_slice())
            .map_err(write_err)?;
        w.commit().map_err(write_err)
    }

    fn last_entry_id(&self) -> StorageResult<Option<LogId<u64>>> {
        let r = self.db.begin_read().map_err(read_err)?;
        let t = r.open_table(LOG).map_err(read_err)?;
        let Some((_, v)) = t.last().map_err(read_err)? else { return Ok(None) };
        let e: Entry<TypeConfig> =
            decode(v.value(), MAX_RECORD).map_err(|_| corrupt("log entry"))?;
        Ok(Some(e.log_id))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let r = self.db.begin_read().map_err(read_err)?;
        let t = r.open_table(LOG).map_err(read_err)?;
        let mut out = Vec::new();
        for item in t.range(range).map_err(read_err)? {
            let (_, v) = item.map_err(read_err)?;
            out.push(decode(v.value(), MAX_RECORD).map_err(|_| corrupt("log entry"))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        // Written as an `Option` (as the committed id is): read back as one.
        let last_purged_log_id = self.meta::<Option<LogId<u64>>>(PURGED)?.flatten();
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        self.put_meta(VOTE, vote)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        self.meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StorageResult<()> {
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<u64>>> {
        Ok(self.meta::<Option<LogId<u64>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut w = self.db.begin_write().map_err(write_err)?;
        w.set_durability(Durability::Immediate).map_err(write_err)?;
        {
            let mut t = w.open_table(LOG).map_err(write_err)?;
            for e in entries {
                t.insert(e.log_id.index, encode(&e).as_slice()).map_err(write_err)?;
            }
        }
        w.commit().map_err(write_err)?;
        // Only now is the append durable.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        let mut w = self.db.begin_write().map_err(write_err)?;
        w.set_durability(Durability::Immediate).map_err(write_err)?;
        w.open_table(LOG)
            .map_err(write_err)?
            .retain_in(log_id.index.., |_, _| false)
            .map_err(write_err)?;
        w.commit().map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        let mut w = self.db.begin_write().map_err(write_err)?;
        w.set_durability(Durability::Immediate).map_err(write_err)?;
        w.open_table(META)
            .map_err(write_err)?
            .insert(PURGED, encode(&Some(log_id)).as_slice())
            .map_err(write_err)?;
        w.open_table(LOG)
            .map_err(write_err)?
            .retain_in(..=log_id.index, |_, _| false)
            .map_err(write_err)?;
        w.commit().map_err(write_err)
    }
}

/// What a snapshot holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct SnapshotData {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    state: OrderingState,
    /// Each channel's public-group storage.
    channels: Vec<(ChannelId, StoragePairs)>,
    /// Winners waiting for their certificate.
    pending: Vec<Waiting>,
}

/// A snapshot written before winners could wait for a certificate.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct SnapshotDataV1 {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    state: OrderingState,
    channels: Vec<(ChannelId, StoragePairs)>,
}

impl SnapshotData {
    /// Reads a snapshot of this version or the one before.
    fn decode(bytes: &[u8]) -> Option<Self> {
        if let Ok(d) = decode::<Self>(bytes, MAX_RECORD) {
            return Some(d);
        }
        let v1: SnapshotDataV1 = decode(bytes, MAX_RECORD).ok()?;
        Some(Self {
            last_applied: v1.last_applied,
            membership: v1.membership,
            state: v1.state,
            channels: v1.channels,
            pending: Vec::new(),
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

/// The replicated state, in memory: `proto`'s [`Orderer`] (which also keeps the winners
/// waiting for their certificate) and what openraft needs besides.
#[derive(Debug)]
struct Machine {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    orderer: Orderer,
}

impl Machine {
    fn from_snapshot(data: SnapshotData, state_budget: u64) -> Result<Self, ChannelError> {
        Ok(Self {
            last_applied: data.last_applied,
            membership: data.membership,
            orderer: Orderer::restore(data.state, data.channels, data.pending)?
                .with_state_budget(state_budget),
        })
    }

    fn snapshot(&self) -> SnapshotData {
        let (state, channels) = self.orderer.export();
        SnapshotData {
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            state,
            channels,
            pending: self.orderer.waiting().cloned().collect(),
        }
    }

    /// Applies the entry at log index `index`: one command, or a batch of them in order.
    fn apply_entry(
        &mut self,
        index: u64,
        command: RelayCommand,
        deliveries: &mut Vec<Delivery>,
    ) -> Vec<RelayOutcome> {
        let RelayCommand::Batch(commands) = command else {
            let (outcome, delivery) = self.apply(index, command);
            deliveries.extend(delivery);
            return vec![outcome];
        };
        // (A batch inside a batch is refused by `apply`.)
        commands
            .into_iter()
            .map(|command| {
                let (outcome, delivery) = self.apply(index, command);
                deliveries.extend(delivery);
                outcome
            })
            .collect()
    }

    /// Applies one command of the entry at log index `index`.
    fn apply(&mut self, index: u64, command: RelayCommand) -> (RelayOutcome, Option<Delivery>) {
        let command = match command {
            RelayCommand::Open { channel, state } => OrderCommand::Open { channel, state },
            RelayCommand::Reopen { channel, state } => OrderCommand::Reopen { channel, state },
            RelayCommand::Submit { commit, bytes } => {
                OrderCommand::Order { commit, bytes, welcome: None }
            }
            RelayCommand::Order { commit, bytes, welcome } => {
                OrderCommand::Order { commit, bytes, welcome }
            }
            RelayCommand::Deliver { cert } => OrderCommand::Deliver { cert },
            RelayCommand::Batch(_) => {
                return (Verdict::Invalid("a batch inside a batch".into()), None);
            }
        };
        self.orderer.apply(index, command)
    }
}

/// The state machine: the replicated [`Machine`], snapshotted into the log store's database,
/// and the sink its accepted commits go to.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<Machine>>,
    /// Held by an apply until the fan-out of its entries is durable, and by a snapshot while
    /// it reads the state: a snapshot never covers an entry whose fan-out is not durable yet
    /// (the log before a snapshot may go, and a relay that dies before the fan-out re-applies
    /// only the log after its snapshot).
    fanning: Arc<Mutex<()>>,
    store: LogStore,
    sink: Arc<dyn FanoutSink>,
    state_budget: u64,
    /// A fault switch for tests (`CHITCHAT_RELAY_FAULT=slow-apply`): a replica of a group of
    /// several relays applies every batch of entries half a second late, so that it lags
    /// behind its group.
    slow_apply: bool,
}

impl Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine").finish_non_exhaustive()
    }
}

impl StateMachine {
    /// The current ordering state (a copy).
    pub async fn state(&self) -> OrderingState {
        self.inner.lock().await.orderer.state().clone()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let data = {
            let _fanned = self.fanning.lock().await;
            self.inner.lock().await.snapshot()
        };
        let bytes = encode(&data);
        let snapshot_id = data
            .last_applied
            .map_or_else(|| "none".to_owned(), |l| format!("{}-{}", l.leader_id, l.index));
        let meta = SnapshotMeta {
            last_log_id: data.last_applied,
            last_membership: data.membership.clone(),
            snapshot_id,
        };
        self.store
            .put_meta(SNAPSHOT, &StoredSnapshot { meta: meta.clone(), data: bytes.clone() })?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>)> {
        let d = self.inner.lock().await;
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Vec<RelayOutcome>>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        if self.slow_apply {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        let mut out = Vec::new();
        let mut accepted = Vec::new();
        let _fanning = self.fanning.lock().await;
        {
            let mut m = self.inner.lock().await;
            for e in entries {
                m.last_applied = Some(e.log_id);
                match e.payload {
                    EntryPayload::Normal(command) => {
                        out.push(m.apply_entry(e.log_id.index, command, &mut accepted));
                    }
                    EntryPayload::Membership(membership) => {
                        m.membership = StoredMembership::new(Some(e.log_id), membership);
                        // Never read: membership entries have no client waiting.
                        out.push(Vec::new());
                    }
                    EntryPayload::Blank => out.push(Vec::new()),
                }
            }
        }
        // No answer leaves before the fan-out of what these entries accepted is durable.
        if !accepted.is_empty() {
            self.sink.deliver(accepted).await.map_err(|e| {
                tracing::error!(error = %e, "fan-out of ordered commits failed; ordering stops");
                StorageError::from(StorageIOError::write_state_machine(&std::io::Error::other(e)))
            })?;
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let bytes = snapshot.into_inner();
        let data = SnapshotData::decode(&bytes).ok_or_else(|| corrupt("snapshot"))?;
        let machine = Machine::from_snapshot(data, self.state_budget)
            .map_err(|_| corrupt("snapshot channels"))?;
        self.store.put_meta(SNAPSHOT, &StoredSnapshot { meta: meta.clone(), data: bytes })?;
        *self.inner.lock().await = machine;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let Some(s) = self.store.meta::<StoredSnapshot>(SNAPSHOT)? else { return Ok(None) };
        Ok(Some(Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

/// The network of a one-relay group: there is no one else to reach. A multi-relay group
/// replaces it with one that speaks to the other relays over libp2p.
#[derive(Clone, Debug, Default)]
pub struct NoPeers;

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeers;

    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> Self::Network {
        NoPeers
    }
}

fn unreachable<E: std::error::Error>() -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(
        "a one-relay group has no peers",
    )))
}

impl RaftNetwork<TypeConfig> for NoPeers {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let _ = NetworkError::new(&std::io::Error::other("unused"));
        Err(unreachable())
    }
}

/// Why the ordering group failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum OrderingError {
    /// Its storage failed.
    #[error("ordering storage: {0}")]
    Storage(String),
    /// Raft refused or failed (shutting down, no quorum, ...).
    #[error("raft: {0}")]
    Raft(String),
    /// This relay does not lead the group; `leader` does, if known.
    #[error("not the group's leader")]
    NotLeader {
        /// The leader's node id.
        leader: Option<u64>,
    },
}

/// Largest state budget ([`GroupOptions::state_budget`]): its snapshot (the state, a few
/// percent of framing, one commit's overshoot) stays under [`MAX_RECORD`].
pub const MAX_STATE_BUDGET: u64 = 768 * 1024 * 1024;

/// How an ordering group is run.
#[derive(Clone, Copy, Debug)]
pub struct GroupOptions {
    /// Limits of the ordering state, for a group that starts empty (a restored group keeps
    /// those it was made with).
    pub limits: OrderingLimits,
    /// The channels' state the group holds at most ([`Orderer::with_state_budget`]), at most
    /// [`MAX_STATE_BUDGET`].
    pub state_budget: u64,
    /// Log entries between snapshots.
    pub snapshot_every: u64,
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self {
            limits: OrderingLimits::default(),
            state_budget: chitchat_proto::ordering::DEFAULT_STATE_BUDGET,
            snapshot_every: 10_000,
        }
    }
}

/// A command waiting for its batch, and where its answer goes.
type Pending =
    (RelayCommand, usize, tokio::sync::oneshot::Sender<Result<(RelayOutcome, u64), OrderingError>>);

/// The relay's ordering group.
#[derive(Clone)]
pub struct Ordering {
    raft: Raft,
    state_machine: StateMachine,
    /// Commands on their way into the log: while a batch is written, those submitted meanwhile
    /// wait and go together in the next entry (openraft 0.9 writes one entry per
    /// `client_write`, each with its own appends and fsyncs).
    batcher: tokio::sync::mpsc::Sender<Pending>,
}

impl Debug for Ordering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ordering").finish_non_exhaustive()
    }
}

impl Ordering {
    /// Opens the group's storage at `path` and starts this relay as its only member (node 1),
    /// restoring the state from the last snapshot and the committed log.
    ///
    /// Accepted commits go to `sink`; entries applied again on restart whose fan-out is not yet
    /// durable are fanned out then.
    pub async fn open(
        path: &Path,
        options: GroupOptions,
        sink: Arc<dyn FanoutSink>,
    ) -> Result<Self, OrderingError> {
        let members = BTreeMap::from([(1, BasicNode::new("self"))]);
        let o = Self::open_group(path, options, sink, 1, members, NoPeers, true).await?;
        o.raft
            .wait(Some(std::time::Duration::from_secs(10)))
            .metrics(|m| m.current_leader == Some(1), "this relay leads its group")
            .await
            .map_err(|e| OrderingError::Raft(e.to_string()))?;
        Ok(o)
    }

    /// Opens the storage at `path` of a group whose members are `members` (node id → host),
    /// this relay being `me`, reaching the others through `network`. `initialize` makes this
    /// relay propose the initial membership if the group has none yet (every member may: the
    /// same membership proposed twice is one).
    pub async fn open_group<N: RaftNetworkFactory<TypeConfig>>(
        path: &Path,
        options: GroupOptions,
        sink: Arc<dyn FanoutSink>,
        me: u64,
        members: BTreeMap<u64, BasicNode>,
        network: N,
        initialize: bool,
    ) -> Result<Self, OrderingError> {
        let GroupOptions { limits, state_budget, snapshot_every } = options;
        if state_budget > MAX_STATE_BUDGET {
            return Err(OrderingError::Storage(format!(
                "a state budget of {state_budget} bytes makes snapshots larger than this relay \
                 reads back; at most {MAX_STATE_BUDGET}"
            )));
        }
        let storage = |e: &dyn std::fmt::Display| OrderingError::Storage(e.to_string());
        let db = Database::create(path).map_err(|e| storage(&e))?;
        {
            let w = db.begin_write().map_err(|e| storage(&e))?;
            w.open_table(LOG).map_err(|e| storage(&e))?;
            w.open_table(META).map_err(|e| storage(&e))?;
            w.commit().map_err(|e| storage(&e))?;
        }
        let log = LogStore { db: Arc::new(db) };
        // A store that never recorded a watermark belongs to a relay that fanned out before the
        // watermark existed: everything in the log is done.
        if sink.watermark().map_err(|e| storage(&e))?.is_none() {
            let last = log.last_entry_id().map_err(|e| storage(&e))?.map_or(0, |l| l.index);
            sink.set_watermark(last).await.map_err(|e| storage(&e))?;
        }
        let initial = match log.meta::<StoredSnapshot>(SNAPSHOT).map_err(|e| storage(&e))? {
            Some(s) => SnapshotData::decode(&s.data)
                .ok_or_else(|| OrderingError::Storage("corrupt snapshot".into()))?,
            None => SnapshotData { state: OrderingState::new(limits), ..Default::default() },
        };
        let initial = Machine::from_snapshot(initial, state_budget)
            .map_err(|e| OrderingError::Storage(e.to_string()))?;
        let solo = members.len() == 1;
        let slow_apply =
            !solo && std::env::var(crate::service::FAULT_ENV).is_ok_and(|f| f == "slow-apply");
        if slow_apply {
            tracing::warn!("FAULT SWITCH ON: this replica applies its log late; for tests only");
        }
        let state_machine = StateMachine {
            inner: Arc::new(Mutex::new(initial)),
            fanning: Arc::new(Mutex::new(())),
            store: log.clone(),
            sink,
            state_budget,
            slow_apply,
        };
        let config = openraft::Config {
            cluster_name: "chitchat-ordering".into(),
            heartbeat_interval: if solo { 250 } else { 150 },
            election_timeout_min: if solo { 500 } else { 750 },
            election_timeout_max: if solo { 1000 } else { 1500 },
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every.max(1)),
            max_in_snapshot_log_to_keep: LOG_AFTER_SNAPSHOT,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK,
            max_payload_entries: 256,
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(|e| OrderingError::Raft(e.to_string()))?);
        let raft = Raft::new(me, config, network, log, state_machine.clone())
            .await
            .map_err(|e| OrderingError::Raft(e.to_string()))?;
        if initialize
            && !raft.is_initialized().await.map_err(|e| OrderingError::Raft(e.to_string()))?
        {
            raft.initialize(members).await.map_err(|e| OrderingError::Raft(e.to_string()))?;
        }
        // An entry of a group of several relays must fit one federation frame.
        let batch_bytes = if solo {
            4 * 1024 * 1024
        } else {
            chitchat_proto::federation::MAX_RAFT_PAYLOAD - 8 * 1024
        };
        let (batcher, queue) = tokio::sync::mpsc::channel(BATCH_QUEUE);
        tokio::spawn(batch_loop(raft.clone(), queue, batch_bytes));
        Ok(Self { raft, state_machine, batcher })
    }

    /// The openraft handle (for the RPCs other relays send).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Waits until the log is applied up to `index`, at most `timeout`.
    pub async fn wait_applied(&self, index: u64, timeout: std::time::Duration) -> bool {
        self.raft.wait(Some(timeout)).applied_index_at_least(Some(index), "applied").await.is_ok()
    }

    /// The winners waiting for their certificate (channels of several relays), with the log
    /// index of each.
    pub async fn waiting(&self) -> Vec<(chitchat_proto::ordering::EpochCertBody, u64)> {
        let m = self.state_machine.inner.lock().await;
        m.orderer
            .waiting()
            .map(|w| {
                let c = &w.accepted.commit;
                let body = chitchat_proto::ordering::EpochCertBody {
                    channel: c.channel,
                    epoch: c.epoch,
                    hash: c.hash,
                };
                (body, w.accepted.index)
            })
            .collect()
    }

    /// Whether this relay leads the group now.
    pub fn leads(&self, own: u64) -> bool {
        self.raft.metrics().borrow().current_leader == Some(own)
    }

    /// The commit that won `epoch` of `channel`, if this group ordered it and remembers it.
    pub async fn winner(&self, channel: &ChannelId, epoch: u64) -> Option<CommitRef> {
        self.state_machine.inner.lock().await.orderer.state().winner(channel, epoch).cloned()
    }

    /// Orders one command: returns once it is committed (durable) and applied.
    pub async fn submit(&self, command: RelayCommand) -> Result<RelayOutcome, OrderingError> {
        self.submit_at(command).await.map(|(outcome, _)| outcome)
    }

    /// Like [`Ordering::submit`], with the log index of the entry.
    pub async fn submit_at(
        &self,
        command: RelayCommand,
    ) -> Result<(RelayOutcome, u64), OrderingError> {
        if matches!(command, RelayCommand::Batch(_)) {
            return Err(OrderingError::Raft("batches are made here, not submitted".into()));
        }
        let size = chitchat_proto::codec::encoded_len(&command);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.batcher
            .send((command, size, tx))
            .await
            .map_err(|_| OrderingError::Raft("the ordering group stopped".into()))?;
        rx.await.map_err(|_| OrderingError::Raft("the ordering group stopped".into()))?
    }

    /// Checks a commit against the channel's current public state, with `check` for the
    /// credentials it brings in (this relay's directory). Done before proposing. Returns the
    /// member that committed it.
    pub async fn check(
        &self,
        channel: &ChannelId,
        commit: &[u8],
        check: &impl CredentialCheck,
    ) -> Result<chitchat_proto::DeviceId, ChannelError> {
        let m = self.state_machine.inner.lock().await;
        m.orderer.check(channel, commit, check)
    }

    /// The member devices of the channel's current epoch and of `epoch` (the current ones if
    /// `epoch` is not among the last [`MEMBER_EPOCHS`] known), sorted; `None` if the channel is
    /// not ordered here.
    pub async fn member_sets(
        &self,
        channel: &ChannelId,
        epoch: u64,
    ) -> Option<(Arc<[chitchat_proto::DeviceId]>, Arc<[chitchat_proto::DeviceId]>)> {
        self.state_machine.inner.lock().await.orderer.member_sets(channel, epoch)
    }

    /// Whether `state` is exactly the channel's public state here (`None`: not known here, or
    /// not a state).
    pub async fn matches(&self, channel: &ChannelId, state: &PublicState) -> Option<bool> {
        self.state_machine.inner.lock().await.orderer.matches(channel, state)
    }

    /// The channel's current config, if it is ordered here.
    pub async fn config(
        &self,
        channel: &ChannelId,
    ) -> Option<Result<chitchat_proto::channel::ChannelConfig, ChannelError>> {
        self.state_machine.inner.lock().await.orderer.config(channel)
    }

    /// The channels ordered here whose relay set is `relays` (each channel's config names its
    /// set).
    pub async fn channels_of(&self, relays: &[chitchat_proto::RelayId]) -> Vec<ChannelId> {
        let m = self.state_machine.inner.lock().await;
        m.orderer
            .channel_ids()
            .filter(|c| {
                m.orderer.config(c).is_some_and(|r| {
                    r.is_ok_and(|config| crate::service::relay_set(&config.relays) == relays)
                })
            })
            .copied()
            .collect()
    }

    /// Whether `device` is a member of the channel at `epoch` (`None`: the channel is not
    /// ordered here, or that epoch's members are not known).
    pub async fn is_member(
        &self,
        channel: &ChannelId,
        device: &chitchat_proto::DeviceId,
        epoch: u64,
    ) -> Option<bool> {
        self.state_machine.inner.lock().await.orderer.is_member(channel, device, epoch)
    }

    /// The epoch the channel's next commit must be built on, if it is ordered here.
    pub async fn next_epoch(&self, channel: &ChannelId) -> Option<u64> {
        self.state_machine.inner.lock().await.orderer.next_epoch(channel)
    }

    /// The channel's next epoch once this replica reached `epoch` (it applies the log behind
    /// the group's leader), waiting for its applies up to `timeout`; then whatever it is.
    pub async fn next_epoch_reaching(
        &self,
        channel: &ChannelId,
        epoch: u64,
        timeout: std::time::Duration,
    ) -> Option<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = self.next_epoch(channel).await;
            if next.is_none_or(|n| n >= epoch) {
                return next;
            }
            let applied = self.raft.metrics().borrow().last_applied.map_or(0, |l| l.index);
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || !self.wait_applied(applied + 1, left).await {
                return self.next_epoch(channel).await;
            }
        }
    }

    /// The current ordering state (a copy).
    pub async fn state(&self) -> OrderingState {
        self.state_machine.state().await
    }

    /// Channels ordered, and the bytes of state they hold against the budget.
    pub async fn size(&self) -> (usize, u64) {
        let m = self.state_machine.inner.lock().await;
        (m.orderer.state().channel_count(), m.orderer.state_bytes())
    }

    /// Stops the group.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

/// Writes the commands of `queue` into the log: each batch is what waited while the batches
/// before were written (at most [`MAX_BATCH`] commands and `batch_bytes` bytes; a single
/// command goes as itself), [`BATCHES_IN_FLIGHT`] at a time. Stops when the group is dropped.
async fn batch_loop(
    raft: Raft,
    mut queue: tokio::sync::mpsc::Receiver<Pending>,
    batch_bytes: usize,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    let mut next: Option<Pending> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let first = match next.take() {
            Some(p) => p,
            None => match queue.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut size = first.1;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(p) if size + p.1 <= batch_bytes => {
                    size += p.1;
                    batch.push(p);
                }
                Ok(p) => {
                    next = Some(p);
                    break;
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            write_batch(&raft, batch).await;
            drop(slot);
        });
    }
}

/// Writes one batch and answers each of its commands.
async fn write_batch(raft: &Raft, mut batch: Vec<Pending>) {
    use openraft::error::{ClientWriteError, RaftError};
    let (command, answers) = if batch.len() == 1 {
        let (command, _, tx) = batch.remove(0);
        (command, vec![tx])
    } else {
        let (commands, answers): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|(c, _, tx)| (c, tx)).unzip();
        (RelayCommand::Batch(commands), answers)
    };
    let result = match raft.client_write(command).await {
        Ok(response) if response.data.len() == answers.len() => {
            let index = response.log_id.index;
            for (tx, outcome) in answers.into_iter().zip(response.data) {
                let _ = tx.send(Ok((outcome, index)));
            }
            return;
        }
        Ok(response) => OrderingError::Raft(format!(
            "{} answers for {} commands",
            response.data.len(),
            answers.len()
        )),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            OrderingError::NotLeader { leader: f.leader_id }
        }
        Err(e) => OrderingError::Raft(e.to_string()),
    };
    for tx in answers {
        let _ = tx.send(Err(result.clone()));
    }
}

#[cfg(test)]
mod tests {
    use chitchat_proto::channel::{
        AcceptAll, AdminPolicy, Change, Channel, ChannelConfig, Identity, StagedCommit,
    };
    use chitchat_proto::ordering::{CertSignature, EpochCert, EpochCertBody};
    use chitchat_proto::wire::commit_hash;
    use chitchat_proto::{DeviceId, SecretKey};
    use openmls_rust_crypto::OpenMlsRustCrypto;

    use super::*;
    use chitchat_proto::ordering::Outcome;

    struct Alice {
        key: SecretKey,
        me: Identity,
        provider: OpenMlsRustCrypto,
        channel: Channel,
    }

    impl Alice {
        fn new() -> Self {
            let key = SecretKey::from_seed([1; 32]);
            let me = Identity::new(&key);
            let provider = OpenMlsRustCrypto::default();
            let config = ChannelConfig {
                mime: "application/octet-stream".into(),
                name: "t".into(),
                relays: vec![],
                admins: AdminPolicy::AnyMember,
                creator: me.device(),
            };
            let channel =
                Channel::create(&provider, &me, ChannelId([3; 32]), config).expect("create");
            Self { key, me, provider, channel }
        }

        fn stage(&mut self) -> StagedCommit {
            let update = Change { update: true, ..Default::default() };
            self.channel.stage(&self.provider, &self.me, &update, &AcceptAll).expect("stage")
        }

        /// Merges its pending commit, certified by itself (a relay-less channel's orderer).
        fn merge(&mut self, staged: &StagedCommit) {
            let body = EpochCertBody {
                channel: self.channel.id(),
                epoch: staged.epoch,
                hash: staged.hash,
            };
            let cert = EpochCert { body, signatures: vec![CertSignature::sign(&self.key, &body)] };
            self.channel.accept_own(&self.provider, &cert).expect("merge");
        }
    }

    /// A sink that keeps what it is given, with a watermark as the store keeps it.
    #[derive(Default)]
    struct Recorded {
        state: std::sync::Mutex<(Option<u64>, Vec<Accepted>)>,
    }

    impl Recorded {
        fn at(watermark: Option<u64>) -> Arc<Self> {
            Arc::new(Self { state: std::sync::Mutex::new((watermark, Vec::new())) })
        }

        fn delivered(&self) -> Vec<Accepted> {
            self.state.lock().expect("lock").1.clone()
        }
    }

    impl FanoutSink for Recorded {
        fn deliver(
            &self,
            accepted: Vec<Delivery>,
        ) -> futures::future::BoxFuture<'_, Result<(), String>> {
            // An entry's deliveries (several for a batch) are done, or not, together.
            let mut s = self.state.lock().expect("lock");
            let before = s.0;
            for a in accepted.into_iter().map(|d| d.accepted) {
                if before.is_none_or(|w| a.index > w) {
                    s.0 = s.0.max(Some(a.index));
                    s.1.push(a);
                }
            }
            Box::pin(async { Ok(()) })
        }

        fn watermark(&self) -> Result<Option<u64>, String> {
            Ok(self.state.lock().expect("lock").0)
        }

        fn set_watermark(&self, index: u64) -> futures::future::BoxFuture<'_, Result<(), String>> {
            self.state.lock().expect("lock").0 = Some(index);
            Box::pin(async { Ok(()) })
        }
    }

    fn submit(staged: &StagedCommit, by: DeviceId) -> RelayCommand {
        let commit = CommitRef {
            channel: ChannelId([3; 32]),
            epoch: staged.epoch,
            hash: staged.hash,
            submitter: by,
        };
        RelayCommand::Submit { commit, bytes: Bytes(staged.commit.clone()) }
    }

    #[tokio::test]
    async fn first_valid_commit_wins_and_survives_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ordering.redb");
        let mut alice = Alice::new();
        let me = alice.me.device();
        let state = alice.channel.public_state(&alice.provider, &alice.me).expect("export");
        // Two different commits for epoch 0: b is staged and dropped, a stays pending.
        let b = alice.stage();
        alice.channel.discard_own(&alice.provider).expect("discard");
        let a = alice.stage();
        let first = Recorded::at(None);
        {
            let o =
                Ordering::open(&path, GroupOptions::default(), first.clone()).await.expect("open");
            // Nothing is ordered before the channel is opened.
            assert_eq!(
                o.submit(submit(&a, me)).await.expect("submit"),
                RelayOutcome::Ordering(Outcome::UnknownChannel)
            );
            let open = RelayCommand::Open { channel: ChannelId([3; 32]), state: state.clone() };
            assert_eq!(
                o.submit(open.clone()).await.expect("open"),
                RelayOutcome::Ordering(Outcome::Opened)
            );
            assert_eq!(
                o.submit(open).await.expect("open"),
                RelayOutcome::Ordering(Outcome::AlreadyOpen { next_epoch: 0 })
            );
            // A forged commit (a flipped signature byte) does not take the epoch.
            let mut forged = submit(&a, me);
            if let RelayCommand::Submit { commit, bytes } = &mut forged {
                let n = bytes.0.len();
                bytes.0[n - 67] ^= 1;
                commit.hash = commit_hash(&bytes.0);
            }
            assert!(matches!(o.submit(forged).await.expect("submit"), RelayOutcome::Invalid(_)));
            let RelayOutcome::Ordering(Outcome::Accepted(winner)) =
                o.submit(submit(&a, me)).await.expect("submit")
            else {
                panic!("a wins epoch 0")
            };
            assert_eq!(
                o.submit(submit(&b, me)).await.expect("submit"),
                RelayOutcome::Ordering(Outcome::Conflict { winner })
            );
            o.shutdown().await;
        }
        alice.merge(&a);
        // The winner was fanned out once (to its committer, the only member), the resubmission
        // and the loser not at all.
        let delivered = first.delivered();
        assert_eq!(delivered.len(), 1, "{delivered:?}");
        assert_eq!((delivered[0].commit.hash, &delivered[0].recipients[..]), (a.hash, &[me][..]));
        // A relay whose fan-out never became durable (its watermark is behind) fans the winner
        // out again when it re-applies the log on restart; one whose fan-out is done does not.
        let behind = Recorded::at(Some(0));
        let o =
            Ordering::open(&path, GroupOptions::default(), behind.clone()).await.expect("reopen");
        o.raft
            .wait(Some(std::time::Duration::from_secs(10)))
            .applied_index_at_least(Some(delivered[0].index), "re-applied")
            .await
            .expect("re-applied");
        assert_eq!(behind.delivered(), delivered);
        o.shutdown().await;
        drop(o);
        // Reopened: the winner is remembered, the public state followed it to epoch 1.
        let done = Recorded::at(Some(delivered[0].index));
        let o = Ordering::open(&path, GroupOptions::default(), done.clone()).await.expect("reopen");
        assert!(matches!(
            o.submit(submit(&b, me)).await.expect("submit"),
            RelayOutcome::Ordering(Outcome::Conflict { .. })
        ));
        let c = alice.stage();
        o.check(&ChannelId([3; 32]), &c.commit, &AcceptAll)
            .await
            .expect("valid on the restored state");
        // A snapshot of the state machine restores to one that judges commits alike.
        let data = o.state_machine.inner.lock().await.snapshot();
        let back: SnapshotData = decode(&encode(&data), MAX_RECORD).expect("decode");
        let restored = Machine::from_snapshot(back, u64::MAX).expect("restore");
        assert_eq!(restored.orderer.state(), &o.state().await);
        let id = ChannelId([3; 32]);
        restored.orderer.check(&id, &c.commit, &AcceptAll).expect("valid on the snapshot");
        assert!(
            restored.orderer.check(&id, &b.commit, &AcceptAll).is_err(),
            "b is of a past epoch"
        );
        assert!(matches!(
            o.submit(submit(&c, me)).await.expect("submit"),
            RelayOutcome::Ordering(Outcome::Accepted(_))
        ));
        assert_eq!(o.next_epoch(&ChannelId([3; 32])).await, Some(2));
        assert_eq!(done.delivered().len(), 1, "only c is new");
        assert_eq!(done.delivered()[0].commit.hash, c.hash);
        o.shutdown().await;
    }

    /// Commands submitted while others are being written go into the log together (fewer
    /// entries than commands); each gets its own answer, every winner of a shared entry is fanned
    /// out, and none twice when the log is applied again.
    #[tokio::test]
    async fn commits_submitted_together_share_entries_and_are_all_fanned_out_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ordering.redb");
        let alice = Alice::new();
        let me = alice.me.device();
        let sink = Recorded::at(None);
        let o = Ordering::open(&path, GroupOptions::default(), sink.clone()).await.expect("open");
        let before = o.raft.metrics().borrow().last_log_index.unwrap_or(0);
        let n = 24u8;
        let mut channels: Vec<Channel> = (0..n)
            .map(|i| {
                let config = alice.channel.config().clone();
                Channel::create(&alice.provider, &alice.me, ChannelId([100 + i; 32]), config)
                    .expect("create")
            })
            .collect();
        let opens = channels.iter().map(|c| {
            let state = c.public_state(&alice.provider, &alice.me).expect("export");
            o.submit(RelayCommand::Open { channel: c.id(), state })
        });
        for r in futures::future::join_all(opens).await {
            assert_eq!(r.expect("open"), RelayOutcome::Ordering(Outcome::Opened));
        }
        let update = Change { update: true, ..Default::default() };
        let staged: Vec<StagedCommit> = channels
            .iter_mut()
            .map(|c| c.stage(&alice.provider, &alice.me, &update, &AcceptAll).expect("stage"))
            .collect();
        let orders = channels.iter().zip(&staged).map(|(c, s)| {
            let commit = CommitRef { channel: c.id(), epoch: 0, hash: s.hash, submitter: me };
            let order =
                RelayCommand::Order { commit, bytes: Bytes(s.commit.clone()), welcome: None };
            o.submit_at(order)
        });
        let answers = futures::future::join_all(orders).await;
        let mut indices = std::collections::BTreeSet::new();
        for (r, s) in answers.into_iter().zip(&staged) {
            let (outcome, index) = r.expect("ordered");
            let RelayOutcome::Ordering(Outcome::Accepted(w)) = outcome else {
                panic!("{outcome:?}")
            };
            assert_eq!(w.hash, s.hash, "each command gets its own answer");
            indices.insert(index);
        }
        let entries = o.raft.metrics().borrow().last_log_index.unwrap_or(0) - before;
        assert!(
            entries < 2 * u64::from(n) && indices.len() < usize::from(n),
            "{entries} entries, {} indices for {n} commits submitted together",
            indices.len()
        );
        // Every winner fanned out, those sharing an entry included.
        let channels_of = |d: &[Accepted]| {
            d.iter().map(|a| a.commit.channel).collect::<std::collections::BTreeSet<_>>()
        };
        assert_eq!(channels_of(&sink.delivered()).len(), usize::from(n));
        o.shutdown().await;
        drop(o);
        // Applied again on restart: nothing is fanned out twice.
        let o = Ordering::open(&path, GroupOptions::default(), sink.clone()).await.expect("open");
        assert_eq!(o.next_epoch(&ChannelId([100; 32])).await, Some(1));
        assert_eq!(sink.delivered().len(), usize::from(n));
        o.shutdown().await;
    }

    /// A sink whose fan-out waits until the test lets it go.
    struct Held {
        started: tokio::sync::Notify,
        release: tokio::sync::Semaphore,
    }

    impl FanoutSink for Held {
        fn deliver(&self, _: Vec<Delivery>) -> futures::future::BoxFuture<'_, Result<(), String>> {
            Box::pin(async move {
                self.started.notify_one();
                let _permit = self.release.acquire().await.map_err(|e| e.to_string())?;
                Ok(())
            })
        }

        fn watermark(&self) -> Result<Option<u64>, String> {
            Ok(Some(0))
        }

        fn set_watermark(&self, _: u64) -> futures::future::BoxFuture<'_, Result<(), String>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// A snapshot taken while an entry's fan-out is being written waits for it: otherwise a
    /// relay that died right then would restart from a snapshot past an entry it never fanned
    /// out, and re-apply only the log after it (the commit would reach no member's inbox here).
    #[tokio::test]
    async fn a_snapshot_never_covers_an_entry_whose_fan_out_is_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::create(dir.path().join("log.redb")).expect("db");
        {
            let w = db.begin_write().expect("write");
            w.open_table(META).expect("meta");
            w.commit().expect("commit");
        }
        let sink = Arc::new(Held {
            started: tokio::sync::Notify::new(),
            release: tokio::sync::Semaphore::new(0),
        });
        let initial = SnapshotData {
            state: OrderingState::new(OrderingLimits::default()),
            ..Default::default()
        };
        let mut sm = StateMachine {
            inner: Arc::new(Mutex::new(Machine::from_snapshot(initial, u64::MAX).expect("m"))),
            fanning: Arc::new(Mutex::new(())),
            store: LogStore { db: Arc::new(db) },
            sink: sink.clone(),
            state_budget: u64::MAX,
            slow_apply: false,
        };
        let mut alice = Alice::new();
        let state = alice.channel.public_state(&alice.provider, &alice.me).expect("export");
        let staged = alice.stage();
        let commit = CommitRef {
            channel: alice.channel.id(),
            epoch: 0,
            hash: staged.hash,
            submitter: alice.me.device(),
        };
        let entry = |index, command| Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        };
        let entries = vec![
            entry(1, RelayCommand::Open { channel: alice.channel.id(), state }),
            entry(2, RelayCommand::Order { commit, bytes: Bytes(staged.commit), welcome: None }),
        ];
        let mut applier = sm.clone();
        let applied = tokio::spawn(async move { applier.apply(entries).await });
        sink.started.notified().await;
        // The winner of entry 2 is being fanned out: a snapshot now waits.
        let mut builder = sm.get_snapshot_builder().await;
        let mut snapshot = Box::pin(async move { builder.build_snapshot().await });
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(300), &mut snapshot).await;
        assert!(early.is_err(), "a snapshot was taken while entry 2's fan-out was unwritten");
        sink.release.add_permits(1);
        let snapshot = snapshot.await.expect("snapshot");
        assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(2));
        let answers = applied.await.expect("join").expect("applied");
        assert!(matches!(answers[1][0], RelayOutcome::Ordering(Outcome::Accepted(_))));
    }

    /// A log long enough to be purged after a snapshot (more than [`LOG_AFTER_SNAPSHOT`]
    /// entries past one) is opened again: the purged id is read back as it was written.
    #[tokio::test]
    async fn a_purged_log_opens_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ordering.redb");
        let alice = Alice::new();
        let me = alice.me.device();
        let state = alice.channel.public_state(&alice.provider, &alice.me).expect("export");
        let options = GroupOptions { snapshot_every: 50, ..GroupOptions::default() };
        let sink = Recorded::at(None);
        let o = Ordering::open(&path, options, sink.clone()).await.expect("open");
        let open = RelayCommand::Open { channel: ChannelId([3; 32]), state };
        assert!(matches!(o.submit(open).await, Ok(RelayOutcome::Ordering(Outcome::Opened))));
        // Entries that change nothing (commits for a channel not ordered here) fill the log,
        // one at a time (submitted together, they would share entries).
        let n = LOG_AFTER_SNAPSHOT + 200;
        for i in 0..n {
            let mut id = [9u8; 32];
            id[..8].copy_from_slice(&i.to_be_bytes());
            let commit = CommitRef {
                channel: ChannelId(id),
                epoch: 1,
                hash: chitchat_proto::ordering::CommitHash([0; 32]),
                submitter: me,
            };
            let r = o.submit(RelayCommand::Submit { commit, bytes: Bytes(vec![1]) }).await;
            assert!(matches!(r, Ok(RelayOutcome::Ordering(Outcome::UnknownChannel))), "{r:?}");
        }
        o.shutdown().await;
        drop(o);
        {
            let db = Database::open(&path).expect("db");
            let r = db.begin_read().expect("read");
            let t = r.open_table(LOG).expect("log");
            let (first, _) = t.first().expect("first").expect("an entry");
            assert!(first.value() > 1, "the log was purged up to a snapshot");
        }
        let o = Ordering::open(&path, options, sink).await.expect("a purged log opens again");
        assert_eq!(o.next_epoch(&ChannelId([3; 32])).await, Some(0));
        o.shutdown().await;
    }
}
