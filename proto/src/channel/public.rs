//! A channel as a relay sees it: the public group state, without any secret.
//!
//! A relay that orders a channel's commits must order only *valid* ones: signed by a member,
//! with proposals that apply to the current tree, adding only devices whose credentials check
//! out. [`PublicChannel`] tracks the group's public state (openmls `PublicGroup`, in memory) from
//! the creator's [`PublicState`], checks each submitted commit exactly as members will process
//! it, and applies the winners.

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_rust_crypto::MemoryStorage;

use super::{
    ChannelConfig, ChannelError, CredentialCheck, credential_device, decode_mls, mls_err,
    read_config, rules,
};
use crate::identity::DeviceId;
use crate::ordering::ChannelId;

/// What a relay needs to follow a channel: its GroupInfo and ratchet tree (TLS encodings), as
/// exported by a member ([`super::Channel::public_state`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PublicState {
    /// The signed GroupInfo (an MLS message).
    pub group_info: crate::codec::Bytes,
    /// The ratchet tree.
    pub ratchet_tree: crate::codec::Bytes,
}

/// A commit that passed [`PublicChannel::check`]; apply it once it is ordered.
#[derive(Debug)]
pub struct CheckedCommit {
    staged: Box<openmls::group::StagedCommit>,
    /// The epoch it moves the channel to.
    pub next_epoch: u64,
    /// The member that committed it.
    pub committer: DeviceId,
    /// Whether it adds members (the only change that grows the public state by more than a
    /// few bytes).
    pub adds: bool,
}

/// The public state of one channel.
#[derive(Debug)]
pub struct PublicChannel {
    group: PublicGroup,
    storage: MemoryStorage,
}

impl PublicChannel {
    /// Starts following a channel from a member's export. The GroupInfo's signature is verified
    /// against the tree, and the tree against the GroupInfo.
    pub fn from_state(
        crypto: &impl openmls_traits::crypto::OpenMlsCrypto,
        state: &PublicState,
    ) -> Result<Self, ChannelError> {
        let msg = decode_mls(&state.group_info)?;
        let MlsMessageBodyIn::GroupInfo(group_info) = msg.extract() else {
            return Err(ChannelError::Malformed("not a GroupInfo".into()));
        };
        let tree = RatchetTreeIn::tls_deserialize_exact(&state.ratchet_tree[..])
            .map_err(|e| ChannelError::Malformed(e.to_string()))?;
        let storage = MemoryStorage::default();
        let (group, _) =
            PublicGroup::from_external(crypto, &storage, tree, group_info, ProposalStore::new())
                .map_err(mls_err)?;
        if group.group_id().as_slice().len() != 32 {
            return Err(ChannelError::Malformed("group id is not 32 bytes".into()));
        }
        // The channel rules hold for the tree a relay starts from, as for every Welcome.
        rules::check_members(group.members())?;
        read_config(group.group_context().extensions())?;
        Ok(Self { group, storage })
    }

    /// The channel's current config.
    pub fn config(&self) -> Result<ChannelConfig, ChannelError> {
        read_config(self.group.group_context().extensions())
    }

    /// The state to snapshot: openmls' storage of the public group, as key-value pairs.
    pub fn export(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let values = self.storage.values.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut pairs: Vec<_> = values.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        pairs.sort();
        pairs
    }

    /// The bytes [`PublicChannel::export`] holds (keys and values), without exporting.
    pub fn stored_bytes(&self) -> u64 {
        let values = self.storage.values.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        values.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
    }

    /// Restores a channel from [`PublicChannel::export`].
    pub fn import(
        channel: ChannelId,
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Self, ChannelError> {
        let storage = MemoryStorage::default();
        storage.values.write().unwrap_or_else(std::sync::PoisonError::into_inner).extend(pairs);
        let group = PublicGroup::load(&storage, &GroupId::from_slice(&channel.0))
            .map_err(mls_err)?
            .ok_or_else(|| ChannelError::Mls("no public group in the snapshot".into()))?;
        Ok(Self { group, storage })
    }

    /// The channel.
    pub fn id(&self) -> ChannelId {
        let mut id = [0u8; 32];
        id.copy_from_slice(self.group.group_id().as_slice());
        ChannelId(id)
    }

    /// Whether `other` is this very state: same group context (epoch, tree hash, transcript,
    /// config).
    pub fn same_state(&self, other: &Self) -> bool {
        self.group.group_context() == other.group.group_context()
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.group.group_context().epoch().as_u64()
    }

    /// The member devices.
    pub fn members(&self) -> Vec<DeviceId> {
        self.group.members().filter_map(|m| credential_device(&m.credential)).collect()
    }

    /// Checks a submitted commit as the members will: a PublicMessage commit of this channel and
    /// epoch, signed by a member, whose proposals apply, that the channel rules allow
    /// ([`super::authorize_commit`]: proposal types, admin policy, leaves that name their keys,
    /// config changes); and every credential it brings in passes `check`. Nothing changes until
    /// [`PublicChannel::apply`].
    pub fn check(
        &self,
        crypto: &impl openmls_traits::crypto::OpenMlsCrypto,
        commit: &[u8],
        check: &impl CredentialCheck,
    ) -> Result<CheckedCommit, ChannelError> {
        let protocol = decode_mls(commit)?
            .try_into_protocol_message()
            .map_err(|e| ChannelError::Malformed(e.to_string()))?;
        let ProtocolMessage::PublicMessage(public) = &protocol else {
            return Err(ChannelError::WrongWireFormat);
        };
        if !matches!(public.sender(), Sender::Member(_)) {
            return Err(ChannelError::ExternalSender);
        }
        if protocol.content_type() != ContentType::Commit {
            return Err(ChannelError::WrongWireFormat);
        }
        if protocol.group_id() != self.group.group_id() {
            return Err(ChannelError::WrongChannel);
        }
        let config = self.config()?;
        let processed = self.group.process_message(crypto, protocol).map_err(mls_err)?;
        let committer = processed.credential().clone();
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(ChannelError::WrongWireFormat);
        };
        let committer = rules::authorize_commit(&config, &committer, &staged, &self.group, check)?;
        let adds = staged.add_proposals().next().is_some();
        let next_epoch =
            self.epoch().checked_add(1).ok_or(ChannelError::Mls("epoch overflow".into()))?;
        Ok(CheckedCommit { staged, next_epoch, committer, adds })
    }

    /// Applies an ordered commit.
    pub fn apply(&mut self, commit: CheckedCommit) -> Result<(), ChannelError> {
        if Some(commit.next_epoch) != self.epoch().checked_add(1) {
            return Err(ChannelError::Mls("checked against another epoch".into()));
        }
        self.group.merge_commit(&self.storage, *commit.staged).map_err(mls_err)
    }
}

impl super::Channel {
    /// What a relay needs to follow this channel ([`PublicChannel::from_state`]): the GroupInfo
    /// signed by this device, and the ratchet tree.
    pub fn public_state<P: OpenMlsProvider>(
        &self,
        provider: &P,
        me: &super::Identity,
    ) -> Result<PublicState, ChannelError> {
        let group_info = self
            .group
            .export_group_info(provider.crypto(), &me.signer, true)
            .map_err(mls_err)?
            .tls_serialize_detached()
            .map_err(mls_err)?;
        let ratchet_tree =
            self.group.export_ratchet_tree().tls_serialize_detached().map_err(mls_err)?;
        Ok(PublicState { group_info: group_info.into(), ratchet_tree: ratchet_tree.into() })
    }
}
