//! Commit ordering: `chitchat-proto`'s [`OrderingState`] as the replicated state machine of an
//! openraft group, with its log in redb.
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

// openraft's storage traits fix the error type (`StorageError`, over 200 bytes).
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use chitchat_proto::codec::{decode, encode};
use chitchat_proto::ordering::{OrderingCommand, OrderingLimits, OrderingState, Outcome};
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
    /// The relay's Raft type configuration: entries are ordering commands, answers outcomes.
    pub TypeConfig:
        D = OrderingCommand,
        R = Outcome,
);

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
        let last_purged_log_id: Option<LogId<u64>> = self.meta(PURGED)?;
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
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

/// The state machine: the ordering state, in memory, snapshotted into the log store's database.
#[derive(Clone, Debug)]
pub struct StateMachine {
    inner: Arc<Mutex<SnapshotData>>,
    store: LogStore,
}

impl StateMachine {
    /// The current ordering state (a copy).
    pub async fn state(&self) -> OrderingState {
        self.inner.lock().await.state.clone()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let data = self.inner.lock().await.clone();
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

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Outcome>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut d = self.inner.lock().await;
        let mut out = Vec::new();
        for e in entries {
            d.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Normal(command) => out.push(d.state.apply(&command)),
                EntryPayload::Membership(m) => {
                    d.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Outcome::Opened); // never read: membership entries have no client
                }
                EntryPayload::Blank => out.push(Outcome::Opened),
            }
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
        let data: SnapshotData = decode(&bytes, MAX_RECORD).map_err(|_| corrupt("snapshot"))?;
        self.store.put_meta(SNAPSHOT, &StoredSnapshot { meta: meta.clone(), data: bytes })?;
        *self.inner.lock().await = data;
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
#[derive(Debug, thiserror::Error)]
pub enum OrderingError {
    /// Its storage failed.
    #[error("ordering storage: {0}")]
    Storage(String),
    /// Raft refused or failed (not the leader, shutting down, ...).
    #[error("raft: {0}")]
    Raft(String),
}

/// The relay's ordering group.
#[derive(Clone)]
pub struct Ordering {
    raft: Raft,
    state_machine: StateMachine,
}

impl Debug for Ordering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ordering").finish_non_exhaustive()
    }
}

impl Ordering {
    /// Opens the group's storage at `path` and starts this relay as its only member (node 1),
    /// restoring the state from the last snapshot and the committed log.
    pub async fn open(path: &Path, limits: OrderingLimits) -> Result<Self, OrderingError> {
        let storage = |e: &dyn std::fmt::Display| OrderingError::Storage(e.to_string());
        let db = Database::create(path).map_err(|e| storage(&e))?;
        {
            let w = db.begin_write().map_err(|e| storage(&e))?;
            w.open_table(LOG).map_err(|e| storage(&e))?;
            w.open_table(META).map_err(|e| storage(&e))?;
            w.commit().map_err(|e| storage(&e))?;
        }
        let log = LogStore { db: Arc::new(db) };
        let initial = match log.meta::<StoredSnapshot>(SNAPSHOT).map_err(|e| storage(&e))? {
            Some(s) => decode(&s.data, MAX_RECORD)
                .map_err(|_| OrderingError::Storage("corrupt snapshot".into()))?,
            None => SnapshotData { state: OrderingState::new(limits), ..Default::default() },
        };
        let state_machine =
            StateMachine { inner: Arc::new(Mutex::new(initial)), store: log.clone() };
        let config = openraft::Config {
            cluster_name: "chitchat-ordering".into(),
            heartbeat_interval: 250,
            election_timeout_min: 500,
            election_timeout_max: 1000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(10_000),
            max_in_snapshot_log_to_keep: LOG_AFTER_SNAPSHOT,
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(|e| OrderingError::Raft(e.to_string()))?);
        let raft = Raft::new(1, config, NoPeers, log, state_machine.clone())
            .await
            .map_err(|e| OrderingError::Raft(e.to_string()))?;
        if !raft.is_initialized().await.map_err(|e| OrderingError::Raft(e.to_string()))? {
            let members = BTreeMap::from([(1, BasicNode::new("self"))]);
            raft.initialize(members).await.map_err(|e| OrderingError::Raft(e.to_string()))?;
        }
        raft.wait(Some(std::time::Duration::from_secs(10)))
            .metrics(|m| m.current_leader == Some(1), "this relay leads its group")
            .await
            .map_err(|e| OrderingError::Raft(e.to_string()))?;
        Ok(Self { raft, state_machine })
    }

    /// Orders one command: returns once it is committed (durable) and applied.
    pub async fn submit(&self, command: OrderingCommand) -> Result<Outcome, OrderingError> {
        let response = self
            .raft
            .client_write(command)
            .await
            .map_err(|e| OrderingError::Raft(e.to_string()))?;
        Ok(response.data)
    }

    /// The current ordering state (a copy).
    pub async fn state(&self) -> OrderingState {
        self.state_machine.state().await
    }

    /// Stops the group.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use chitchat_proto::ordering::{ChannelId, CommitHash, CommitRef};
    use chitchat_proto::{DeviceId, PublicKey};

    use super::*;

    fn commit(epoch: u64, h: u8) -> CommitRef {
        CommitRef {
            channel: ChannelId([1; 32]),
            epoch,
            hash: CommitHash([h; 32]),
            submitter: DeviceId(PublicKey([h; 32])),
        }
    }

    #[tokio::test]
    async fn first_commit_wins_and_survives_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ordering.redb");
        let (a, b) = (commit(0, 0xa), commit(0, 0xb));
        {
            let o = Ordering::open(&path, OrderingLimits::default()).await.expect("open");
            assert_eq!(
                o.submit(OrderingCommand::Submit(a)).await.expect("submit"),
                Outcome::Accepted(a)
            );
            assert_eq!(
                o.submit(OrderingCommand::Submit(b)).await.expect("submit"),
                Outcome::Conflict { winner: a }
            );
            o.shutdown().await;
        }
        // Reopened: the winner is remembered, the next epoch is open.
        let o = Ordering::open(&path, OrderingLimits::default()).await.expect("reopen");
        assert_eq!(
            o.submit(OrderingCommand::Submit(b)).await.expect("submit"),
            Outcome::Conflict { winner: a }
        );
        let next = commit(1, 0xc);
        assert_eq!(
            o.submit(OrderingCommand::Submit(next)).await.expect("submit"),
            Outcome::Accepted(next)
        );
        assert_eq!(o.state().await.next_epoch(&ChannelId([1; 32])), Some(2));
        o.shutdown().await;
    }
}
