//! The ordering groups a relay belongs to: its own one-relay group (channels whose relay set is
//! this relay alone), and one openraft group for each relay set of two or more relays that
//! names it, whose Raft messages travel over federation ([`FedNetwork`]).
//!
//! Layout, and why: a channel is ordered by the relays of its members (its relay set, in its
//! config). Channels with the same relay set share one group, so a relay runs as many groups as
//! it has distinct relay sets with others, not one per channel (100,000 channels cost 100,000
//! entries in a handful of state machines, not 100,000 Raft instances with their timers). A
//! group's members never change: a channel whose relay set changes moves to the group of the
//! new set by an ordered commit (its state opened there at the next epoch), so Raft membership
//! follows the relay set without openraft membership changes.
//!
//! - Group id: BLAKE3 of the sorted relay set's encoding; node id of a relay: the first 8
//!   bytes of its key (a set with two equal prefixes is refused).
//! - Storage: `ordering-groups/GROUP.redb` (log, vote, snapshots), with the relay set in
//!   `GROUP.relays` written first; reopened on start.
//! - A group is created when this relay opens a channel with such a relay set (it proposes the
//!   initial membership), or when a member relay sends it a Raft message for it.
//! - A command submitted here goes to the group's leader ([`FedBody::Propose`]) when this relay
//!   does not lead.
//! - A winner's certificate carries the signatures of a majority of the set: this relay signs,
//!   and asks the others ([`FedBody::Sign`]); each, this relay included, signs only what its own
//!   applied log says won (never on the leader's word: a lying leader gets no honest relay's
//!   signature on a hash the log did not decide, and no honest relay is convicted with it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chitchat_proto::codec::{decode, encode};
use chitchat_proto::federation::{FedBody, FedResponse, MAX_RAFT_PAYLOAD, RaftRpc, group_id};
use chitchat_proto::ordering::{CertSignature, ChannelId, EpochCert, EpochCertBody};
use chitchat_proto::wire::ErrorCode;
use chitchat_proto::{PublicKey, RelayId, SecretKey};
use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tokio::sync::Mutex;

use crate::fanout::CommitFanout;
use crate::federation::{FedError, Federation};
use crate::ordering::{
    GroupOptions, Ordering, OrderingError, RelayCommand, RelayOutcome, TypeConfig,
};

/// Groups of two or more relays one relay may belong to.
pub const MAX_GROUPS: usize = 1024;
/// How long a relay asked to sign waits for its log to reach the winner.
const SIGN_WAIT: Duration = Duration::from_secs(3);
/// How often the leader of each group looks for winners left waiting for a certificate.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Largest encoded command proposed to a multi-relay group (its entry must fit one federation
/// frame).
pub const MAX_COMMAND: usize = MAX_RAFT_PAYLOAD - 4096;

/// The Raft node id of a relay in its groups.
pub fn node_id(relay: &RelayId) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&relay.key.0[..8]);
    u64::from_be_bytes(b)
}

/// A group id in hex (its files' names, its watermark's key).
pub fn group_hex(id: &[u8; 32]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// One group of two or more relays.
pub struct Group {
    /// Its relays, sorted.
    pub relays: Vec<RelayId>,
    /// Its id.
    pub id: [u8; 32],
    /// Its ordering state machine and Raft.
    pub ordering: Ordering,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("relays", &self.relays).finish_non_exhaustive()
    }
}

impl Group {
    fn host_of(&self, node: u64) -> Option<&str> {
        self.relays.iter().find(|r| node_id(r) == node).map(|r| r.host.as_str())
    }
}

/// Why a group could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The relay set is not one this relay can order with.
    #[error("{0}")]
    Refused(String),
    /// Storage or Raft failed.
    #[error(transparent)]
    Ordering(#[from] OrderingError),
    /// Another relay failed.
    #[error(transparent)]
    Federation(#[from] FedError),
}

impl GroupError {
    /// The error code a device gets.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Refused(_) => ErrorCode::Forbidden,
            Self::Ordering(_) => ErrorCode::Unavailable,
            Self::Federation(e) => e.code(),
        }
    }
}

/// The relay's multi-relay groups.
pub struct Groups {
    own: RelayId,
    key: SecretKey,
    dir: PathBuf,
    options: GroupOptions,
    sink: Arc<CommitFanout>,
    federation: Arc<Federation>,
    groups: Mutex<HashMap<[u8; 32], Arc<Group>>>,
    /// Relays convicted of equivocation: their signatures do not count in a certificate this
    /// relay builds.
    convicted: std::sync::RwLock<BTreeSet<PublicKey>>,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups").finish_non_exhaustive()
    }
}

impl Groups {
    /// The groups kept under `dir`, reopened.
    pub async fn open(
        own: RelayId,
        key: SecretKey,
        dir: PathBuf,
        options: GroupOptions,
        sink: Arc<CommitFanout>,
        federation: Arc<Federation>,
    ) -> Result<Self, GroupError> {
        let storage = |e: std::io::Error| OrderingError::Storage(e.to_string());
        std::fs::create_dir_all(&dir).map_err(storage)?;
        let groups = Self {
            own,
            key,
            dir: dir.clone(),
            options,
            sink,
            federation,
            groups: Mutex::new(HashMap::new()),
            convicted: std::sync::RwLock::new(BTreeSet::new()),
        };
        for entry in std::fs::read_dir(&dir).map_err(storage)? {
            let path = entry.map_err(storage)?.path();
            if path.extension().is_some_and(|e| e == "relays") {
                let bytes = std::fs::read(&path).map_err(storage)?;
                let relays: Vec<RelayId> = decode(&bytes, 64 * 1024).map_err(|_| {
                    OrderingError::Storage(format!("corrupt relay set {}", path.display()))
                })?;
                groups.get_or_create(&relays, false).await?;
            }
        }
        Ok(groups)
    }

    /// The group of `relays` if it runs here.
    pub async fn get(&self, relays: &[RelayId]) -> Option<Arc<Group>> {
        self.groups.lock().await.get(&group_id(relays)).cloned()
    }

    /// Every group (to find a channel in).
    pub async fn all(&self) -> Vec<Arc<Group>> {
        self.groups.lock().await.values().cloned().collect()
    }

    /// The group of `relays`, started if it does not run yet (with `initialize`, this relay
    /// proposes its membership). The set must name this relay.
    pub async fn get_or_create(
        &self,
        relays: &[RelayId],
        initialize: bool,
    ) -> Result<Arc<Group>, GroupError> {
        chitchat_proto::federation::check_relay_set(relays)
            .map_err(|e| GroupError::Refused(e.into()))?;
        if !relays.contains(&self.own) {
            return Err(GroupError::Refused("the relay set does not name this relay".into()));
        }
        let mut ids: Vec<u64> = relays.iter().map(node_id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != relays.len() {
            return Err(GroupError::Refused("two relays of the set share a node id".into()));
        }
        let id = group_id(relays);
        let mut groups = self.groups.lock().await;
        if let Some(g) = groups.get(&id) {
            return Ok(g.clone());
        }
        if groups.len() >= MAX_GROUPS {
            return Err(GroupError::Refused(format!(
                "this relay orders with {MAX_GROUPS} relay sets already"
            )));
        }
        let hex = group_hex(&id);
        let set_path = self.dir.join(format!("{hex}.relays"));
        if !set_path.exists() {
            write_durably(&set_path, &encode(&relays.to_vec()))
                .map_err(|e| OrderingError::Storage(e.to_string()))?;
        }
        let members: BTreeMap<u64, BasicNode> =
            relays.iter().map(|r| (node_id(r), BasicNode::new(r.host.clone()))).collect();
        let network = FedNetwork { federation: self.federation.clone(), relays: relays.to_vec() };
        let ordering = Ordering::open_group(
            &self.dir.join(format!("{hex}.redb")),
            self.options,
            Arc::new(self.sink.for_group(&id)),
            node_id(&self.own),
            members,
            network,
            initialize,
        )
        .await?;
        tracing::info!(group = %&hex[..16], relays = relays.len(), "ordering group started");
        let group = Arc::new(Group { relays: relays.to_vec(), id, ordering });
        groups.insert(id, group.clone());
        Ok(group)
    }

    /// Stops counting `relay`'s signatures; `true` if it was not convicted before.
    pub fn convict(&self, relay: PublicKey) -> bool {
        self.convicted.write().is_ok_and(|mut c| c.insert(relay))
    }

    fn is_convicted(&self, relay: &PublicKey) -> bool {
        self.convicted.read().is_ok_and(|c| c.contains(relay))
    }

    /// Orders `command` in `group`: here if this relay leads, else at the leader. Returns the
    /// outcome and the entry's log index.
    pub async fn propose(
        &self,
        group: &Group,
        command: RelayCommand,
    ) -> Result<(RelayOutcome, u64), GroupError> {
        let encoded = encode(&command);
        if encoded.len() > MAX_COMMAND {
            return Err(GroupError::Refused(format!(
                "a command of {} bytes is too large for a channel of several relays (at most \
                 {MAX_COMMAND}: add fewer devices at once)",
                encoded.len()
            )));
        }
        let mut last = None;
        for _ in 0..3 {
            match group.ordering.submit_at(command.clone()).await {
                Ok(r) => return Ok(r),
                Err(OrderingError::NotLeader { leader: Some(leader) }) => {
                    let Some(host) = group.host_of(leader) else { break };
                    let body =
                        FedBody::Propose { relays: group.relays.clone(), command: encoded.clone() };
                    match self.federation.call(host, body).await {
                        Ok((_, FedResponse::Raft(bytes))) => {
                            return decode::<(RelayOutcome, u64)>(&bytes, MAX_RAFT_PAYLOAD)
                                .map_err(|e| {
                                    GroupError::Ordering(OrderingError::Raft(format!(
                                        "the leader's answer: {e}"
                                    )))
                                });
                        }
                        Ok((_, other)) => {
                            last = Some(GroupError::Ordering(OrderingError::Raft(format!(
                                "the leader answered {other:?}"
                            ))));
                        }
                        Err(e) => last = Some(e.into()),
                    }
                }
                Err(OrderingError::NotLeader { leader: None }) => {
                    last = Some(GroupError::Ordering(OrderingError::Raft("no leader yet".into())));
                }
                Err(e) => return Err(e.into()),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(last.unwrap_or(GroupError::Ordering(OrderingError::Raft("no leader".into()))))
    }

    /// Signs `body` if this relay's own applied log says its hash won (waiting up to
    /// [`SIGN_WAIT`] for the log to reach `index`): never on another relay's word, so that a
    /// leader that lies about an outcome cannot get this relay's signature on it.
    async fn sign_own(
        &self,
        group: &Group,
        body: EpochCertBody,
        index: u64,
    ) -> Option<CertSignature> {
        if !group.ordering.wait_applied(index, SIGN_WAIT).await {
            tracing::debug!(channel = %body.channel, index, "own log not there yet; not signing");
            return None;
        }
        match group.ordering.winner(&body.channel, body.epoch).await {
            Some(w) if w.hash == body.hash => Some(CertSignature::sign(&self.key, &body)),
            other => {
                tracing::warn!(channel = %body.channel, epoch = body.epoch, winner = ?other, "asked to certify a commit this relay's log did not decide");
                None
            }
        }
    }

    /// The certificate of a winner of `group` at log `index`: this relay's signature (once its
    /// own log says the hash won) and those of the others, asked in parallel, until a majority
    /// of the set signed.
    pub async fn certify(
        &self,
        group: &Group,
        body: EpochCertBody,
        index: u64,
    ) -> Result<EpochCert, GroupError> {
        use futures::FutureExt as _;
        let need = group.relays.len() / 2 + 1;
        let mut signatures = Vec::new();
        let asks = group.relays.iter().filter(|r| **r != self.own).map(|r| {
            let sign = FedBody::Sign { relays: group.relays.clone(), body, index };
            let key = r.key;
            async move {
                match self.federation.call(&r.host, sign).await {
                    Ok((_, FedResponse::Signed(s)))
                        if s.signer == key && s.verify(&body).is_ok() =>
                    {
                        if self.is_convicted(&key) {
                            tracing::warn!(relay = %r.host, "a signature of a relay convicted of equivocation; not counted");
                            return None;
                        }
                        Some(s)
                    }
                    Ok((_, other)) => {
                        tracing::warn!(relay = %r.host, answer = ?other, "no signature");
                        None
                    }
                    Err(e) => {
                        tracing::debug!(relay = %r.host, error = %e, "no signature");
                        None
                    }
                }
            }
        });
        let mut pending: futures::stream::FuturesUnordered<_> = asks.map(|a| a.boxed()).collect();
        pending.push(self.sign_own(group, body, index).boxed());
        while signatures.len() < need {
            use futures::StreamExt as _;
            match pending.next().await {
                Some(Some(s)) => signatures.push(s),
                Some(None) => {}
                None => break,
            }
        }
        if signatures.len() < need {
            return Err(GroupError::Ordering(OrderingError::Raft(format!(
                "{} of the {need} signatures needed",
                signatures.len()
            ))));
        }
        Ok(EpochCert { body, signatures })
    }

    /// Delivers the winners that wait for a certificate too long: their submitting relay died
    /// (or lost its link) between ordering and `Deliver`. Runs on the group's leader, every
    /// [`SWEEP_EVERY`]; a winner seen waiting on two sweeps in a row is certified here (a
    /// majority of the set signs, as for any winner) and delivered. Two relays delivering one
    /// winner deliver it once (the second certificate finds nothing waiting).
    pub async fn sweep(&self, seen: &mut BTreeSet<(ChannelId, u64)>) {
        let own = node_id(&self.own);
        let mut still = BTreeSet::new();
        for group in self.all().await {
            if !group.ordering.leads(own) {
                continue;
            }
            for (body, index) in group.ordering.waiting().await {
                let key = (body.channel, body.epoch);
                if !seen.contains(&key) {
                    still.insert(key);
                    continue;
                }
                let delivered = match self.certify(&group, body, index).await {
                    Ok(cert) => self.propose(&group, RelayCommand::Deliver { cert }).await,
                    Err(e) => Err(e),
                };
                match delivered {
                    Ok(_) => {
                        tracing::info!(channel = %body.channel, epoch = body.epoch, "delivered a winner its submitting relay left waiting")
                    }
                    Err(e) => {
                        tracing::debug!(channel = %body.channel, error = %e, "a waiting winner is not delivered yet");
                        still.insert(key);
                    }
                }
            }
        }
        *seen = still;
    }

    /// Answers a federation request about groups from `origin`.
    pub async fn handle(&self, origin: &RelayId, body: FedBody) -> FedResponse {
        let refuse = |code: ErrorCode, message: String| FedResponse::Error { code, message };
        let relays = match &body {
            FedBody::Raft { relays, .. }
            | FedBody::Propose { relays, .. }
            | FedBody::Sign { relays, .. } => relays.clone(),
            _ => return refuse(ErrorCode::BadRequest, "not a group request".into()),
        };
        if !relays.contains(origin) {
            return refuse(ErrorCode::Forbidden, "the asking relay is not in the set".into());
        }
        // Only Raft messages start a group here; a proposal or a signature needs it running.
        let group = match &body {
            FedBody::Raft { .. } => self.get_or_create(&relays, false).await,
            _ => self.get(&relays).await.ok_or_else(|| {
                GroupError::Refused("this relay does not order with that relay set".into())
            }),
        };
        let group = match group {
            Ok(g) => g,
            Err(e) => return refuse(e.code(), e.to_string()),
        };
        match body {
            FedBody::Raft { rpc, payload, .. } => raft_rpc(&group.ordering, rpc, &payload).await,
            FedBody::Propose { command, .. } => {
                let command: RelayCommand = match decode(&command, MAX_RAFT_PAYLOAD) {
                    Ok(c) => c,
                    Err(e) => return refuse(ErrorCode::BadRequest, e.to_string()),
                };
                match group.ordering.submit_at(command).await {
                    Ok(r) => FedResponse::Raft(encode(&r)),
                    Err(e) => refuse(ErrorCode::Unavailable, e.to_string()),
                }
            }
            FedBody::Sign { body, index, .. } => {
                if !group.ordering.wait_applied(index, SIGN_WAIT).await {
                    return refuse(ErrorCode::Unavailable, "the log is not there yet".into());
                }
                match group.ordering.winner(&body.channel, body.epoch).await {
                    Some(w) if w.hash == body.hash => {
                        FedResponse::Signed(CertSignature::sign(&self.key, &body))
                    }
                    Some(_) => refuse(ErrorCode::Forbidden, "another commit won that epoch".into()),
                    None => refuse(ErrorCode::NotFound, "no winner known for that epoch".into()),
                }
            }
            _ => refuse(ErrorCode::BadRequest, "not a group request".into()),
        }
    }

    /// Stops every group.
    pub async fn shutdown(&self) {
        for g in self.all().await {
            g.ordering.shutdown().await;
        }
    }
}

fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Hands one Raft RPC to the local group and encodes its answer.
async fn raft_rpc(ordering: &Ordering, rpc: RaftRpc, payload: &[u8]) -> FedResponse {
    let bad = |e: chitchat_proto::DecodeError| FedResponse::Error {
        code: ErrorCode::BadRequest,
        message: format!("raft payload: {e}"),
    };
    let raft = ordering.raft();
    match rpc {
        RaftRpc::AppendEntries => {
            let req: AppendEntriesRequest<TypeConfig> = match decode(payload, MAX_RAFT_PAYLOAD) {
                Ok(r) => r,
                Err(e) => return bad(e),
            };
            FedResponse::Raft(encode(&raft.append_entries(req).await))
        }
        RaftRpc::Vote => {
            let req: VoteRequest<u64> = match decode(payload, MAX_RAFT_PAYLOAD) {
                Ok(r) => r,
                Err(e) => return bad(e),
            };
            FedResponse::Raft(encode(&raft.vote(req).await))
        }
        RaftRpc::InstallSnapshot => {
            let req: InstallSnapshotRequest<TypeConfig> = match decode(payload, MAX_RAFT_PAYLOAD) {
                Ok(r) => r,
                Err(e) => return bad(e),
            };
            FedResponse::Raft(encode(&raft.install_snapshot(req).await))
        }
    }
}

/// A group's network: Raft messages to the other relays of the set, over federation.
#[derive(Clone, Debug)]
pub struct FedNetwork {
    federation: Arc<Federation>,
    relays: Vec<RelayId>,
}

/// The connection to one other relay of a group.
#[derive(Debug)]
pub struct FedPeer {
    federation: Arc<Federation>,
    relays: Vec<RelayId>,
    host: String,
}

impl RaftNetworkFactory<TypeConfig> for FedNetwork {
    type Network = FedPeer;

    async fn new_client(&mut self, _target: u64, node: &BasicNode) -> Self::Network {
        FedPeer {
            federation: self.federation.clone(),
            relays: self.relays.clone(),
            host: node.addr.clone(),
        }
    }
}

fn unreachable<E: std::error::Error>(e: impl std::fmt::Display) -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e.to_string())))
}

impl FedPeer {
    async fn call<Req, Resp, E>(
        &self,
        rpc: RaftRpc,
        request: &Req,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned + serde::Serialize,
        E: std::error::Error,
        RaftError<u64, E>: serde::de::DeserializeOwned + serde::Serialize,
    {
        let payload = encode(request);
        if payload.len() > MAX_RAFT_PAYLOAD {
            return Err(unreachable(format!("a raft message of {} bytes", payload.len())));
        }
        let body = FedBody::Raft { relays: self.relays.clone(), rpc, payload };
        let bytes = match self.federation.call(&self.host, body).await {
            Ok((_, FedResponse::Raft(bytes))) => bytes,
            Ok((_, other)) => return Err(unreachable(format!("answered {other:?}"))),
            Err(e) => return Err(unreachable(e)),
        };
        let answer: Result<Resp, RaftError<u64, E>> =
            decode(&bytes, MAX_RAFT_PAYLOAD).map_err(|e| {
                RPCError::Network(NetworkError::new(&std::io::Error::other(e.to_string())))
            })?;
        answer.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(0, e)))
    }
}

impl RaftNetwork<TypeConfig> for FedPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        // Entries go in chunks that fit a frame; each chunk is a valid append of its own.
        let budget = MAX_RAFT_PAYLOAD - 8 * 1024;
        if encode(&rpc).len() <= budget || rpc.entries.len() <= 1 {
            return self.call(RaftRpc::AppendEntries, &rpc).await;
        }
        let AppendEntriesRequest { vote, prev_log_id, entries, leader_commit } = rpc;
        let mut prev = prev_log_id;
        let mut chunk = Vec::new();
        let mut size = 0;
        let mut chunks = Vec::new();
        for e in entries {
            let n = chitchat_proto::codec::encoded_len(&e);
            if !chunk.is_empty() && size + n > budget {
                chunks.push(std::mem::take(&mut chunk));
                size = 0;
            }
            size += n;
            chunk.push(e);
        }
        chunks.push(chunk);
        for entries in chunks {
            let last = entries.last().map(|e| e.log_id);
            let commit = match (leader_commit, last) {
                (Some(c), Some(l)) if c.index > l.index => Some(l),
                (c, _) => c,
            };
            let req: AppendEntriesRequest<TypeConfig> =
                AppendEntriesRequest { vote, prev_log_id: prev, entries, leader_commit: commit };
            match self.call(RaftRpc::AppendEntries, &req).await? {
                AppendEntriesResponse::Success => prev = last.or(prev),
                other => return Ok(other),
            }
        }
        Ok(AppendEntriesResponse::Success)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(RaftRpc::InstallSnapshot, &rpc).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(RaftRpc::Vote, &rpc).await
    }
}
