//! MLS channels over openmls.
//!
//! A channel is one MLS group (ciphersuite [`CIPHERSUITE`]). This module adds what ChitChat
//! needs on top of openmls:
//!
//! - the channel's [`ChannelConfig`] (MIME type, name, relay set, admin policy) in a group-context
//!   extension, so every member agrees on it;
//! - a [`CredentialCheck`] of every new member's device identity record and sponsorship, called
//!   by the caller-provided trait before anyone is added, joined or accepted;
//! - commits go **stage → order → merge**: [`Channel::stage`] leaves the group unchanged,
//!   [`Channel::accept_own`] merges only with an [`EpochCert`] from the channel's orderers, and a
//!   member applies others' commits only with such a certificate;
//! - application messages carry a unique [`MessageId`] and a hybrid logical clock in their
//!   authenticated data; a replay is reported once as [`ChannelEvent::Duplicate`], messages of a
//!   future epoch are buffered until that epoch is reached;
//! - commits travel as MLS PublicMessage (so relays can check them), application messages as
//!   PrivateMessage.
//!
//! [`Channel`] is generic over the caller's `OpenMlsProvider`, so its storage is whatever
//! `StorageProvider` the caller plugs in (in memory in tests, redb in the node).

mod check;
mod public;
mod rules;
mod seen;

pub use check::{AcceptAll, CredentialCheck, KnownDirs, claims};
pub use public::{CheckedCommit, PublicChannel, PublicState};
pub use rules::{authorize_commit, check_members, is_admin, same_user};

use std::collections::{BTreeSet, VecDeque};

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::codec::{Canonical, decode, encode};
use crate::hlc::{Hlc, HlcClock};
use crate::identity::{DeviceId, RelayId};
use crate::keys::{PublicKey, SecretKey};
use crate::ordering::{CertError, ChannelId, CommitHash, EpochCert, EpochCertBody};
use crate::wire::commit_hash;
use seen::SeenIds;

/// The MLS ciphersuite of every channel.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// Group-context extension type carrying the [`ChannelConfig`] (private-use range).
pub const CONFIG_EXTENSION_TYPE: u16 = 0xF0C7;
/// Messages of future epochs held per channel.
pub const MAX_BUFFERED: usize = 256;
/// Messages of future epochs held per channel from one sender (as its message claims: a
/// message of a future epoch cannot be authenticated yet), so that a flood from one member
/// leaves room for the others.
pub const MAX_BUFFERED_PER_SENDER: usize = 32;
/// Messages further than this many epochs ahead are refused rather than buffered: they cannot
/// be authenticated yet, and would only take room from real ones.
pub const MAX_EPOCHS_AHEAD: u64 = 64;
/// Past epochs whose application messages can still be decrypted.
pub const MAX_PAST_EPOCHS: usize = 4;
/// How far behind the newest message of a sender a late message may be and still be read
/// (openmls keeps that many past message keys per sender). Deliveries retried after a failure
/// arrive out of order; openmls' default of 5 lost such messages.
pub const OUT_OF_ORDER_TOLERANCE: u32 = 256;
/// How far ahead of the last message read from a sender a message may be (a receiver that
/// missed messages still reads what follows them).
pub const MAX_FORWARD_DISTANCE: u32 = 100_000;

fn ratchet_config() -> SenderRatchetConfiguration {
    SenderRatchetConfiguration::new(OUT_OF_ORDER_TOLERANCE, MAX_FORWARD_DISTANCE)
}
/// A membership's message sequence numbers start at `join epoch << SEQ_EPOCH_SHIFT`.
pub const SEQ_EPOCH_SHIFT: u32 = 32;
/// Largest MLS message accepted, in bytes.
pub const MAX_MESSAGE_LEN: usize = crate::wire::MAX_MLS_MESSAGE_LEN;

/// A message's unique id: its sender device and that device's sequence number for the channel.
///
/// Sequence numbers of one membership start at `join epoch << SEQ_EPOCH_SHIFT` and count up,
/// so they stay unique when a device leaves and is invited again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct MessageId {
    /// The sending device.
    pub sender: DeviceId,
    /// The sender's sequence number in this channel, from 0.
    pub seq: u64,
}

/// Who may add and remove members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum AdminPolicy {
    /// Every member.
    AnyMember,
    /// Only these devices. Anyone may still update their own leaf. (Channels made before users
    /// were named; new ones name users.)
    Admins(BTreeSet<DeviceId>),
    /// Only the devices of these users (by the address their credentials carry). Anyone may
    /// still update their own leaf, and add and remove their own user's devices.
    Users(BTreeSet<crate::identity::Address>),
}

/// A channel's settings, agreed by all members through the MLS group context.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ChannelConfig {
    /// How payloads are to be read, like a MIME type (`text/chitchat` for chat).
    pub mime: String,
    /// Display name.
    pub name: String,
    /// The relays that order the channel's epochs. Empty for a relay-less channel, which its
    /// creator's device orders.
    pub relays: Vec<RelayId>,
    /// Who may change the membership.
    pub admins: AdminPolicy,
    /// The device that created the channel.
    pub creator: DeviceId,
}

impl Canonical for ChannelConfig {
    const MAX_LEN: usize = 8 * 1024;
}

impl ChannelConfig {
    /// The keys whose majority certifies commits: the relay set, or the creator's device.
    pub fn orderers(&self) -> Vec<PublicKey> {
        if self.relays.is_empty() {
            vec![self.creator.0]
        } else {
            self.relays.iter().map(|r| r.key).collect()
        }
    }

    fn validate(&self) -> Result<(), ChannelError> {
        if self.mime.is_empty() || self.mime.len() > 255 || self.name.len() > 255 {
            return Err(ChannelError::BadConfig("mime type or name length"));
        }
        // Names and types reach terminals and UIs: no control characters (escape sequences).
        if self.name.chars().chain(self.mime.chars()).any(char::is_control) {
            return Err(ChannelError::BadConfig("control characters in the name or MIME type"));
        }
        if self.relays.len() > 16 {
            return Err(ChannelError::BadConfig("more than 16 relays"));
        }
        Ok(())
    }
}

/// What a channel carries: a certified commit or an application message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum ChannelMessage {
    /// A commit (MLS PublicMessage) and its certificate.
    Commit {
        /// The MLS message.
        #[serde(with = "serde_bytes")]
        commit: Vec<u8>,
        /// The orderers' certificate.
        cert: EpochCert,
    },
    /// An application message (MLS PrivateMessage).
    Application {
        /// The MLS message.
        #[serde(with = "serde_bytes")]
        message: Vec<u8>,
    },
}

impl Canonical for ChannelMessage {
    const MAX_LEN: usize = MAX_MESSAGE_LEN + EpochCert::MAX_LEN + 16;
}

/// Authenticated data of every application message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
struct AppAad {
    id: MessageId,
    hlc: Hlc,
}

/// A membership change to stage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Change {
    /// KeyPackages (TLS encoding) of devices to add.
    pub add: Vec<crate::codec::Bytes>,
    /// Devices to remove.
    pub remove: Vec<DeviceId>,
    /// Whether to refresh the committer's own leaf key even without other changes.
    pub update: bool,
    /// A new config (name, admins, relay set), in the same commit: inviting the first user of
    /// another relay adds that relay to the relay set.
    pub config: Option<ChannelConfig>,
}

/// A staged commit: the group is unchanged until [`Channel::accept_own`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedCommit {
    /// The epoch it is built on.
    pub epoch: u64,
    /// Its hash, as ordered.
    pub hash: CommitHash,
    /// The commit (MLS PublicMessage).
    pub commit: Vec<u8>,
    /// The Welcome for added devices, if any.
    pub welcome: Option<Vec<u8>>,
    /// The devices it adds.
    pub added: Vec<DeviceId>,
    /// The devices it removes.
    pub removed: Vec<DeviceId>,
}

/// What processing a message did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelEvent {
    /// A new application message.
    Message {
        /// Its id.
        id: MessageId,
        /// The sender's clock.
        hlc: Hlc,
        /// The epoch it was sent in.
        epoch: u64,
        /// The plaintext payload.
        payload: Vec<u8>,
    },
    /// An application message seen before; not shown again.
    Duplicate(MessageId),
    /// A message of a future epoch, held until the channel gets there.
    Buffered {
        /// Its epoch.
        epoch: u64,
    },
    /// A certified commit was applied; the channel is now at `epoch`.
    CommitApplied {
        /// The new epoch.
        epoch: u64,
        /// Devices added.
        added: Vec<DeviceId>,
        /// Devices removed.
        removed: Vec<DeviceId>,
        /// Whether this device was removed (the channel is then inactive).
        self_removed: bool,
        /// What to keep of the new epoch, for epoch reports: the commit's certificate and the
        /// digest of the new epoch's authenticator.
        record: crate::ordering::EpochRecord,
    },
    /// A commit of an epoch already past (a loser's, or a duplicate); ignored.
    StaleCommit {
        /// Its epoch.
        epoch: u64,
    },
}

/// Why a channel operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// Bytes that are not a valid MLS message, KeyPackage or Welcome.
    #[error("malformed MLS data: {0}")]
    Malformed(String),
    /// A commit not sent as PublicMessage, or an application message not as PrivateMessage.
    #[error("wrong wire format for the content")]
    WrongWireFormat,
    /// A message of another channel.
    #[error("message is for another channel")]
    WrongChannel,
    /// The commit's certificate does not hold.
    #[error("certificate: {0}")]
    Cert(#[from] CertError),
    /// A device's identity record or sponsorship did not check out.
    #[error("credential of {device:?} rejected: {reason}")]
    Credential {
        /// The device, when its credential could be read.
        device: Option<DeviceId>,
        /// Why it was rejected.
        reason: String,
    },
    /// A membership or config change by a device the admin policy does not allow.
    #[error("committer is not an admin")]
    NotAdmin,
    /// A leaf whose credential does not name the key that signs it (or a member's update that
    /// changes its device): someone posing as another device.
    #[error("a leaf's credential does not name its signature key ({0:?})")]
    LeafMismatch(Option<DeviceId>),
    /// A commit carrying a proposal of a type ChitChat channels do not allow.
    #[error("proposal not allowed in a channel: {0}")]
    ForbiddenProposal(&'static str),
    /// A config change the rules do not allow.
    #[error("config change not allowed: {0}")]
    ForbiddenConfig(&'static str),
    /// A Welcome to a channel none of whose orderers this device trusts.
    #[error("the channel's orderers are not trusted: {0}")]
    UntrustedOrderers(String),
    /// The id in an application message names another sender than the one that signed it.
    #[error("message id names another sender")]
    ForgedId,
    /// A message of a past epoch from a device that is no longer a member (removed, revoked, or
    /// gone): nothing it sends is taken once the commit that removed it is merged.
    #[error("message of epoch {epoch} from {sender:?}, no longer a member")]
    FormerMember {
        /// The sender.
        sender: DeviceId,
        /// The message's epoch.
        epoch: u64,
    },
    /// The authenticated data of an application message is malformed.
    #[error("bad authenticated data")]
    BadAad,
    /// The channel config extension is missing or malformed.
    #[error("bad channel config: {0}")]
    BadConfig(&'static str),
    /// A commit is already staged; accept or discard it first (caller error).
    #[error("a commit is already pending")]
    PendingCommit,
    /// No commit is staged (caller error).
    #[error("no commit is pending")]
    NoPendingCommit,
    /// The device to remove is not a member.
    #[error("{0:?} is not a member")]
    NotMember(DeviceId),
    /// The device to add is already a member.
    #[error("{0:?} is already a member")]
    AlreadyMember(DeviceId),
    /// The change changes nothing.
    #[error("empty change")]
    EmptyChange,
    /// A message of an epoch too far ahead to be buffered.
    #[error("message of epoch {epoch} is too far ahead of epoch {current}")]
    TooFarAhead {
        /// The message's epoch.
        epoch: u64,
        /// The channel's epoch.
        current: u64,
    },
    /// A message of an epoch whose keys are gone: more than [`MAX_PAST_EPOCHS`] before the
    /// channel's. It can never be read here.
    #[error(
        "message of epoch {epoch} is older than the {MAX_PAST_EPOCHS} epochs kept before {current}"
    )]
    TooOld {
        /// The message's epoch.
        epoch: u64,
        /// The channel's epoch.
        current: u64,
    },
    /// A message of a past epoch that does not open here: its keys are gone (this device read
    /// it, or its generation, already) or this device was not a member then. Expected of
    /// history and of late copies; never readable.
    #[error("message of past epoch {epoch} (channel at {current}) does not open: {reason}")]
    PastEpoch {
        /// The message's epoch.
        epoch: u64,
        /// The channel's epoch.
        current: u64,
        /// Why, as openmls says.
        reason: String,
    },
    /// The future-epoch buffer is full; the message was dropped.
    #[error("buffer full")]
    BufferFull,
    /// This device is no longer a member.
    #[error("channel is inactive: this device was removed")]
    Inactive,
    /// A commit or proposal by someone outside the group (external commits are not used).
    #[error("commit from a non-member")]
    ExternalSender,
    /// A Welcome to a channel this device is already an active member of.
    #[error("already a member of this channel")]
    AlreadyJoined,
    /// openmls rejected the operation or message.
    #[error("MLS: {0}")]
    Mls(String),
}

/// Runs every check, then returns the first failure.
fn first_failure<T>(
    checks: impl Iterator<Item = Result<T, ChannelError>>,
) -> Result<(), ChannelError> {
    let mut first = None;
    for r in checks {
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

fn mls_err(e: impl std::fmt::Display) -> ChannelError {
    ChannelError::Mls(e.to_string())
}

/// The user a channel member belongs to, as its leaf's credential names it: the address its
/// relay sponsors (`alice@relay.example`: every device of the user carries it), or, for a
/// device registered nowhere (and for leaves from before users were named), the device alone.
///
/// The channel rules compare users by this value only, so relays and members reach the same
/// verdict from the commit alone; that the address is the device's is checked with its
/// credential ([`CredentialCheck::check`]: its record's sponsorships must give it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum UserId {
    /// A device on its own.
    Device(DeviceId),
    /// A user at a relay.
    Address(crate::identity::Address),
}

impl UserId {
    /// The address, if the user has one.
    pub fn address(&self) -> Option<&crate::identity::Address> {
        match self {
            Self::Address(a) => Some(a),
            Self::Device(_) => None,
        }
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Device(d) => write!(f, "{d}"),
            Self::Address(a) => write!(f, "{a}"),
        }
    }
}

/// The longest encoding of an address in a credential.
const MAX_CREDENTIAL_ADDRESS_LEN: usize = 512;

/// A credential's identity bytes: the 32 bytes of the device, then, for a user at a relay, the
/// canonical encoding of its address (checked: a well-formed name and host).
fn credential_identity(device: DeviceId, user: Option<&crate::identity::Address>) -> Vec<u8> {
    let mut bytes = device.as_bytes().to_vec();
    if let Some(address) = user {
        bytes.extend_from_slice(&encode(address));
    }
    bytes
}

/// The device and user a credential names; `None` if it is not a BasicCredential of that form.
pub fn credential_member(credential: &Credential) -> Option<(DeviceId, UserId)> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    let bytes = basic.identity();
    let device = DeviceId::from_slice(bytes.get(..32)?)?;
    let rest = &bytes[32..];
    if rest.is_empty() {
        return Some((device, UserId::Device(device)));
    }
    let address: crate::identity::Address =
        crate::codec::decode(rest, MAX_CREDENTIAL_ADDRESS_LEN).ok()?;
    crate::identity::check_local_name(&address.local).ok()?;
    crate::identity::check_host(&address.host).ok()?;
    Some((device, UserId::Address(address)))
}

/// A device's MLS identity: its Ed25519 device key as an MLS signer, and its BasicCredential
/// (whose identity is the 32-byte [`DeviceId`], followed by the user's address once the device
/// is registered: see [`UserId`]).
#[derive(Debug)]
pub struct Identity {
    device: DeviceId,
    user: Option<crate::identity::Address>,
    signer: SignatureKeyPair,
}

impl Identity {
    /// The MLS identity of a device key, of a device registered nowhere.
    pub fn new(key: &SecretKey) -> Self {
        let public = key.public();
        let signer = SignatureKeyPair::from_raw(
            CIPHERSUITE.signature_algorithm(),
            key.seed().to_vec(),
            public.0.to_vec(),
        );
        Self { device: DeviceId(public), user: None, signer }
    }

    /// The same device as the user at `address`: the credentials of its KeyPackages name the
    /// user from now on.
    pub fn with_user(mut self, address: Option<crate::identity::Address>) -> Self {
        self.user = address;
        self
    }

    /// The device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The user its credentials name.
    pub fn user(&self) -> UserId {
        match &self.user {
            Some(a) => UserId::Address(a.clone()),
            None => UserId::Device(self.device),
        }
    }

    /// The openmls signer (for benchmarks and tests that drive openmls directly).
    pub fn signer(&self) -> &SignatureKeyPair {
        &self.signer
    }

    fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(credential_identity(self.device, self.user.as_ref()))
                .into(),
            signature_key: self.signer.to_public_vec().into(),
        }
    }

    /// A fresh KeyPackage (TLS encoding) to upload to a relay. Its private keys go into the
    /// provider's storage, where the Welcome that uses it will find them.
    pub fn key_package<P: OpenMlsProvider>(
        &self,
        provider: &P,
        last_resort: bool,
    ) -> Result<Vec<u8>, ChannelError> {
        let mut builder = KeyPackage::builder().leaf_node_capabilities(capabilities());
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(CIPHERSUITE, provider, &self.signer, self.credential())
            .map_err(mls_err)?;
        bundle.key_package().tls_serialize_detached().map_err(mls_err)
    }
}

/// What a relay learns from checking an uploaded KeyPackage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyPackageInfo {
    /// The device it belongs to (its credential's identity).
    pub device: DeviceId,
    /// When it expires; an expired package is never served.
    pub not_after: Timestamp,
    /// Whether it is marked as a last-resort package (kept after being claimed).
    pub last_resort: bool,
}

/// Checks an uploaded KeyPackage (TLS encoding): its signature, ciphersuite, that its leaf
/// supports the channel-config extension, and that its credential names a device. The caller
/// checks that the device is the uploader. `crypto` is the caller's openmls crypto provider.
pub fn validate_key_package(
    crypto: &impl openmls_traits::crypto::OpenMlsCrypto,
    bytes: &[u8],
) -> Result<KeyPackageInfo, ChannelError> {
    if bytes.len() > crate::wire::MAX_KEY_PACKAGE_LEN {
        return Err(ChannelError::Malformed("key package too long".into()));
    }
    let kp = KeyPackageIn::tls_deserialize_exact(bytes)
        .map_err(|e| ChannelError::Malformed(e.to_string()))?
        .validate(crypto, ProtocolVersion::Mls10)
        .map_err(mls_err)?;
    if kp.ciphersuite() != CIPHERSUITE {
        return Err(ChannelError::Malformed("key package of another ciphersuite".into()));
    }
    let config = ExtensionType::Unknown(CONFIG_EXTENSION_TYPE);
    if !kp.leaf_node().capabilities().extensions().contains(&config) {
        return Err(ChannelError::Malformed(
            "key package lacks the channel-config capability".into(),
        ));
    }
    let device = credential_device(kp.leaf_node().credential()).ok_or_else(|| {
        ChannelError::Credential { device: None, reason: "not a device credential".into() }
    })?;
    rules::check_leaf(kp.leaf_node())?;
    Ok(KeyPackageInfo {
        device,
        not_after: Timestamp(kp.life_time().not_after().saturating_mul(1000)),
        last_resort: kp.last_resort(),
    })
}

/// What a relay can read of a commit or an application message without being a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    /// The channel (MLS group id).
    pub channel: ChannelId,
    /// The epoch the commit is built on, or the message encrypted in.
    pub epoch: u64,
}

/// Checks a commit's framing as a relay sees it: an MLS PublicMessage carrying a commit from a
/// member, of a 32-byte group id. Returns its channel and epoch.
pub fn inspect_commit(bytes: &[u8]) -> Result<Framing, ChannelError> {
    let (protocol, framing) = read_framing(bytes)?;
    let ProtocolMessage::PublicMessage(public) = &protocol else {
        return Err(ChannelError::WrongWireFormat);
    };
    if protocol.content_type() != ContentType::Commit {
        return Err(ChannelError::WrongWireFormat);
    }
    if !matches!(public.sender(), Sender::Member(_)) {
        return Err(ChannelError::ExternalSender);
    }
    Ok(framing)
}

/// Checks an application message's framing as a relay sees it: an MLS PrivateMessage of a
/// 32-byte group id. Returns its channel and the epoch it was encrypted in (its content and
/// sender stay encrypted).
pub fn inspect_application(bytes: &[u8]) -> Result<Framing, ChannelError> {
    let (protocol, framing) = read_framing(bytes)?;
    if !matches!(protocol, ProtocolMessage::PrivateMessage(_)) {
        return Err(ChannelError::WrongWireFormat);
    }
    Ok(framing)
}

/// An MLS protocol message and its plaintext framing.
fn read_framing(bytes: &[u8]) -> Result<(ProtocolMessage, Framing), ChannelError> {
    let protocol = decode_mls(bytes)?
        .try_into_protocol_message()
        .map_err(|e| ChannelError::Malformed(e.to_string()))?;
    let framing =
        Framing { channel: channel_id(protocol.group_id())?, epoch: protocol.epoch().as_u64() };
    Ok((protocol, framing))
}

/// The device a credential names.
pub fn credential_device(credential: &Credential) -> Option<DeviceId> {
    credential_member(credential).map(|(device, _)| device)
}

fn capabilities() -> Capabilities {
    Capabilities::builder()
        .extensions(vec![ExtensionType::Unknown(CONFIG_EXTENSION_TYPE), ExtensionType::LastResort])
        .build()
}

/// Durable state of a [`Channel`] beyond what openmls stores: the caller persists it next to
/// the provider's storage, and passes it back to [`Channel::load`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ChannelState {
    /// The channel.
    pub id: ChannelId,
    /// Next sequence number of this device's messages.
    pub next_seq: u64,
    /// This device's clock.
    pub clock: HlcClock,
    seen: SeenIds,
    pending: Option<(u64, CommitHash)>,
}

impl Canonical for ChannelState {
    const MAX_LEN: usize = 16 * 1024 * 1024;
}

/// One MLS channel, as seen by one member device.
#[derive(Debug)]
pub struct Channel {
    group: MlsGroup,
    config: ChannelConfig,
    state: ChannelState,
    /// Messages of future epochs: their epoch, the sender they claim, the message.
    buffered: VecDeque<(u64, Option<DeviceId>, ChannelMessage)>,
    /// Orderers convicted of equivocation, whose signatures no longer count (set by the
    /// caller, which keeps the proofs).
    convicted: Vec<crate::keys::PublicKey>,
}

impl Channel {
    /// Creates a channel with this device as its only member, at epoch 0.
    pub fn create<P: OpenMlsProvider>(
        provider: &P,
        me: &Identity,
        id: ChannelId,
        config: ChannelConfig,
    ) -> Result<Self, ChannelError> {
        config.validate()?;
        if config.creator != me.device {
            return Err(ChannelError::BadConfig("creator must be this device"));
        }
        let extensions = config_extensions(&config)?;
        let group = MlsGroup::builder()
            .with_group_id(GroupId::from_slice(&id.0))
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .with_wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .sender_ratchet_configuration(ratchet_config())
            .with_capabilities(capabilities())
            .with_group_context_extensions(extensions)
            .build(provider, &me.signer, me.credential())
            .map_err(mls_err)?;
        Ok(Self::from_group(group, config, id))
    }

    /// Joins a channel from a Welcome (TLS-encoded MLS message), after checking every member's
    /// credential.
    pub fn join<P: OpenMlsProvider>(
        provider: &P,
        welcome: &[u8],
        check: &impl CredentialCheck,
    ) -> Result<Self, ChannelError> {
        let msg = decode_mls(welcome)?;
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            return Err(ChannelError::Malformed("not a Welcome".into()));
        };
        let join_config = MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .sender_ratchet_configuration(ratchet_config())
            .build();
        let mut builder =
            StagedWelcome::build_from_welcome(provider, &join_config, welcome).map_err(mls_err)?;
        // A device removed earlier and now invited again still has the old, inactive group
        // under the same id: the Welcome replaces it. An active membership is never replaced.
        let group_id = builder.processed_welcome().unverified_group_info().group_id().clone();
        if let Some(old) = MlsGroup::load(provider.storage(), &group_id).map_err(mls_err)? {
            if old.is_active() {
                return Err(ChannelError::AlreadyJoined);
            }
            builder = builder.replace_old_group();
        }
        let staged = builder.build().map_err(mls_err)?;
        // The orderers first: a checker learns from them which relays sponsor the members.
        let config = read_config(staged.group_context().extensions())?;
        check.check_orderers(&config).map_err(ChannelError::UntrustedOrderers)?;
        // Every credential is checked before the first failure is returned, so a checker that
        // records unknown devices learns all of them at once.
        first_failure(staged.members().map(|m| check_credential(check, &m.credential)))?;
        rules::check_members(staged.members())?;
        let group = staged.into_group(provider).map_err(mls_err)?;
        let id = channel_id(group.group_id())?;
        Ok(Self::from_group(group, config, id))
    }

    /// Loads a channel from the provider's storage and the caller's [`ChannelState`].
    pub fn load<P: OpenMlsProvider>(
        provider: &P,
        state: ChannelState,
    ) -> Result<Self, ChannelError> {
        let group = MlsGroup::load(provider.storage(), &GroupId::from_slice(&state.id.0))
            .map_err(mls_err)?
            .ok_or_else(|| ChannelError::Mls("group not in storage".into()))?;
        let config = read_config(group.extensions())?;
        Ok(Self { group, config, state, buffered: VecDeque::new(), convicted: Vec::new() })
    }

    fn from_group(group: MlsGroup, config: ChannelConfig, id: ChannelId) -> Self {
        // A device removed and invited again must not reuse its earlier message ids, or members
        // that remember them would drop its new messages as replays. Its sequence numbers start
        // at the epoch it joined in, shifted past any count one membership can reach.
        let next_seq = group.epoch().as_u64() << SEQ_EPOCH_SHIFT;
        let state = ChannelState {
            id,
            next_seq,
            clock: HlcClock::default(),
            seen: SeenIds::default(),
            pending: None,
        };
        Self { group, config, state, buffered: VecDeque::new(), convicted: Vec::new() }
    }

    /// The channel's id.
    pub fn id(&self) -> ChannelId {
        self.state.id
    }

    /// The channel's config.
    pub fn config(&self) -> &ChannelConfig {
        &self.config
    }

    /// The state to persist after every operation.
    pub fn state(&self) -> &ChannelState {
        &self.state
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.group.epoch().as_u64()
    }

    /// Whether this device is still a member.
    pub fn is_active(&self) -> bool {
        self.group.is_active()
    }

    /// The member devices, in leaf order.
    pub fn members(&self) -> Vec<DeviceId> {
        self.group.members().filter_map(|m| credential_device(&m.credential)).collect()
    }

    /// Whether `device` is a member in the current epoch.
    pub fn is_member(&self, device: DeviceId) -> bool {
        self.group.members().any(|m| credential_device(&m.credential) == Some(device))
    }

    /// The member devices with the users their credentials name, in leaf order.
    pub fn member_users(&self) -> Vec<(DeviceId, UserId)> {
        self.group.members().filter_map(|m| credential_member(&m.credential)).collect()
    }

    /// Whether `device` may change the membership and the config, as its leaf names it (a
    /// device that is no member counts as itself alone).
    pub fn is_admin_device(&self, device: DeviceId) -> bool {
        let user = self
            .group
            .members()
            .filter_map(|m| credential_member(&m.credential))
            .find(|(d, _)| *d == device)
            .map_or(UserId::Device(device), |(_, user)| user);
        rules::is_admin(&self.config, device, &user)
    }

    /// Whether anyone but this device is in the channel (no credential is parsed).
    pub fn has_other_members(&self) -> bool {
        self.group.members().nth(1).is_some()
    }

    /// The epoch authenticator of the current epoch. Members gossip it, so a fork is detected.
    pub fn epoch_authenticator(&self) -> Vec<u8> {
        self.group.epoch_authenticator().as_slice().to_vec()
    }

    /// The [`crate::ordering::epoch_digest`] of the current epoch, for epoch reports.
    pub fn epoch_digest(&self) -> [u8; 32] {
        crate::ordering::epoch_digest(
            &self.state.id,
            self.epoch(),
            self.group.epoch_authenticator().as_slice(),
        )
    }

    /// Stops counting these orderers' signatures: certificates need a majority of the
    /// orderers without them (see [`EpochCert::verify_excluding`]).
    pub fn set_convicted(&mut self, convicted: Vec<crate::keys::PublicKey>) {
        self.convicted = convicted;
    }

    /// The staged commit waiting for ordering, as `(epoch, hash)`.
    pub fn pending(&self) -> Option<(u64, CommitHash)> {
        self.state.pending
    }

    /// Stages a commit making `change`. The group does not change until the orderers accept
    /// it ([`Channel::accept_own`]).
    pub fn stage<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        me: &Identity,
        change: &Change,
        check: &impl CredentialCheck,
    ) -> Result<StagedCommit, ChannelError> {
        self.ensure_active()?;
        if self.state.pending.is_some() || self.group.pending_commit().is_some() {
            return Err(ChannelError::PendingCommit);
        }
        let new_config = change.config.as_ref().filter(|c| **c != self.config);
        if change.add.is_empty()
            && change.remove.is_empty()
            && !change.update
            && new_config.is_none()
        {
            return Err(ChannelError::EmptyChange);
        }
        // The rules judge the committer by its leaf as the group holds it (a leaf from before
        // this device was registered names the device alone).
        let my_user = self
            .group
            .own_leaf_node()
            .and_then(|l| credential_member(l.credential()))
            .map(|(_, user)| user)
            .ok_or(ChannelError::LeafMismatch(Some(me.device)))?;
        let admin = self.is_admin(me.device, &my_user);
        let own = |credential: &Credential| rules::same_user(&self.config, &my_user, credential);
        if new_config.is_some() && !admin {
            return Err(ChannelError::NotAdmin);
        }
        if let Some(c) = new_config {
            c.validate()?;
        }
        let members = self.members();
        let mut key_packages = Vec::with_capacity(change.add.len());
        let mut added = Vec::with_capacity(change.add.len());
        for bytes in &change.add {
            let kp = KeyPackageIn::tls_deserialize_exact(&bytes.0[..])
                .map_err(|e| ChannelError::Malformed(e.to_string()))?
                .validate(provider.crypto(), ProtocolVersion::Mls10)
                .map_err(mls_err)?;
            rules::check_leaf(kp.leaf_node())?;
            if !admin && !own(kp.leaf_node().credential()) {
                return Err(ChannelError::NotAdmin);
            }
            let device = check_credential(check, kp.leaf_node().credential())?;
            if members.contains(&device) || added.contains(&device) {
                return Err(ChannelError::AlreadyMember(device));
            }
            added.push(device);
            key_packages.push(kp);
        }
        let mut leaves = Vec::with_capacity(change.remove.len());
        for device in &change.remove {
            let leaf = self
                .group
                .members()
                .find(|m| credential_device(&m.credential) == Some(*device))
                .ok_or(ChannelError::NotMember(*device))?;
            if !admin && !own(&leaf.credential) {
                return Err(ChannelError::NotAdmin);
            }
            leaves.push(leaf.index);
        }
        let mut builder = self.group.commit_builder();
        if let Some(c) = new_config {
            builder =
                builder.propose_group_context_extensions(config_extensions(c)?).map_err(mls_err)?;
        }
        let bundle = builder
            .propose_adds(key_packages)
            .propose_removals(leaves)
            .force_self_update(change.update)
            .load_psks(provider.storage())
            .map_err(mls_err)?
            .build(provider.rand(), provider.crypto(), &me.signer, |_| true)
            .map_err(mls_err)?
            .stage_commit(provider)
            .map_err(mls_err)?;
        let welcome = match bundle.to_welcome_msg() {
            Some(w) => Some(w.tls_serialize_detached().map_err(mls_err)?),
            None => None,
        };
        let (commit, _, _) = bundle.into_contents();
        let commit = commit.tls_serialize_detached().map_err(mls_err)?;
        let epoch = self.epoch();
        let hash = commit_hash(&commit);
        self.state.pending = Some((epoch, hash));
        Ok(StagedCommit { epoch, hash, commit, welcome, added, removed: change.remove.clone() })
    }

    /// Merges this device's staged commit, now that the orderers certified it.
    pub fn accept_own<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        cert: &EpochCert,
    ) -> Result<Vec<ChannelEvent>, ChannelError> {
        let (epoch, hash) = self.state.pending.ok_or(ChannelError::NoPendingCommit)?;
        let body = EpochCertBody { channel: self.state.id, epoch, hash };
        cert.verify_for_excluding(&body, &self.config.orderers(), &self.convicted)?;
        let staged = self.group.pending_commit().ok_or(ChannelError::NoPendingCommit)?;
        let delta = self.membership_delta(staged);
        self.group.merge_pending_commit(provider).map_err(mls_err)?;
        self.state.pending = None;
        self.after_merge(delta, cert)
    }

    /// Drops this device's staged commit (another commit won its epoch). Call before processing
    /// the winner, then rebuild the change on the new epoch.
    pub fn discard_own<P: OpenMlsProvider>(&mut self, provider: &P) -> Result<(), ChannelError> {
        self.group.clear_pending_commit(provider.storage()).map_err(mls_err)?;
        self.state.pending = None;
        Ok(())
    }

    /// Encrypts an application payload. The message is durable only once the caller stored the
    /// new [`Channel::state`].
    pub fn send<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        me: &Identity,
        now: Timestamp,
        payload: &[u8],
    ) -> Result<(MessageId, ChannelMessage), ChannelError> {
        self.ensure_active()?;
        let id = MessageId { sender: me.device, seq: self.state.next_seq };
        let hlc = self.state.clock.tick(now);
        self.group.set_aad(encode(&AppAad { id, hlc }));
        let out = self.group.create_message(provider, &me.signer, payload).map_err(mls_err)?;
        self.state.next_seq = self.state.next_seq.saturating_add(1);
        self.state.seen.insert(id);
        let message = out.tls_serialize_detached().map_err(mls_err)?;
        Ok((id, ChannelMessage::Application { message }))
    }

    /// Deletes the channel's MLS state (the group, its keys of every epoch, its pending
    /// commit) from the provider's storage: after leaving or being removed, nothing this
    /// device keeps can decrypt the channel's messages, and a later Welcome joins afresh.
    pub fn delete<P: OpenMlsProvider>(mut self, provider: &P) -> Result<(), ChannelError> {
        self.group.delete(provider.storage()).map_err(mls_err)
    }

    /// Moves this device's sending ratchet and sequence number on by one, without sending
    /// anything: the generation and id that [`Channel::send`] would use next are never used.
    ///
    /// For a caller that lets a message leave before its new state is durable: after a crash
    /// in that window, the state on disk would give the next message the generation and id
    /// of the one that left (a reused AEAD key and nonce, and a message receivers drop as a
    /// duplicate). Skipping once from the state on disk makes that impossible. Receivers see
    /// a gap of one generation, well within [`OUT_OF_ORDER_TOLERANCE`].
    pub fn skip<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        me: &Identity,
        now: Timestamp,
    ) -> Result<(), ChannelError> {
        // openmls moves a sender ratchet only by encrypting: encrypt an empty message with the
        // id the skipped generation would have carried, and drop it.
        self.send(provider, me, now, &[]).map(|_| ())
    }

    /// Processes a message from the channel: a certified commit or an application message.
    /// Returns what happened, including messages released from the future-epoch buffer.
    pub fn process<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        now: Timestamp,
        message: ChannelMessage,
        check: &impl CredentialCheck,
    ) -> Result<Vec<ChannelEvent>, ChannelError> {
        let mut events = Vec::new();
        self.process_one(provider, now, message, check, &mut events)?;
        Ok(events)
    }

    fn process_one<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        now: Timestamp,
        message: ChannelMessage,
        check: &impl CredentialCheck,
        events: &mut Vec<ChannelEvent>,
    ) -> Result<(), ChannelError> {
        let bytes = match &message {
            ChannelMessage::Commit { commit, .. } => commit,
            ChannelMessage::Application { message } => message,
        };
        let protocol = decode_mls(bytes)?
            .try_into_protocol_message()
            .map_err(|e| ChannelError::Malformed(e.to_string()))?;
        if protocol.group_id().as_slice() != self.state.id.0 {
            return Err(ChannelError::WrongChannel);
        }
        let epoch = protocol.epoch().as_u64();
        let is_commit = matches!(message, ChannelMessage::Commit { .. });
        if is_commit && epoch < self.epoch() {
            events.push(ChannelEvent::StaleCommit { epoch });
            return Ok(());
        }
        if epoch > self.epoch().saturating_add(MAX_EPOCHS_AHEAD) {
            return Err(ChannelError::TooFarAhead { epoch, current: self.epoch() });
        }
        if !is_commit && epoch.saturating_add(MAX_PAST_EPOCHS as u64) < self.epoch() {
            return Err(ChannelError::TooOld { epoch, current: self.epoch() });
        }
        if epoch > self.epoch() {
            let sender = claimed_sender(&protocol);
            let from_sender = self.buffered.iter().filter(|(_, s, _)| *s == sender).count();
            if self.buffered.len() >= MAX_BUFFERED || from_sender >= MAX_BUFFERED_PER_SENDER {
                return Err(ChannelError::BufferFull);
            }
            self.buffered.push_back((epoch, sender, message));
            events.push(ChannelEvent::Buffered { epoch });
            return Ok(());
        }
        match message {
            ChannelMessage::Commit { commit, cert } => {
                let applied = self.process_commit(provider, protocol, &commit, &cert, check)?;
                events.extend(applied);
                self.release_buffered(provider, now, check, events);
                Ok(())
            }
            ChannelMessage::Application { .. } => {
                events.push(self.process_application(provider, now, protocol)?);
                Ok(())
            }
        }
    }

    fn process_commit<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        protocol: ProtocolMessage,
        commit: &[u8],
        cert: &EpochCert,
        check: &impl CredentialCheck,
    ) -> Result<Vec<ChannelEvent>, ChannelError> {
        if !matches!(protocol, ProtocolMessage::PublicMessage(_))
            || protocol.content_type() != ContentType::Commit
        {
            return Err(ChannelError::WrongWireFormat);
        }
        let epoch = self.epoch();
        let hash = commit_hash(commit);
        let body = EpochCertBody { channel: self.state.id, epoch, hash };
        cert.verify_for_excluding(&body, &self.config.orderers(), &self.convicted)?;
        if self.state.pending == Some((epoch, hash)) {
            return self.accept_own(provider, cert);
        }
        if self.state.pending.is_some() || self.group.pending_commit().is_some() {
            self.discard_own(provider)?;
        }
        if !matches!(protocol, ProtocolMessage::PublicMessage(ref m) if matches!(m.sender(), Sender::Member(_)))
        {
            // ChitChat has no external commits: members join through ordered Welcomes only.
            return Err(ChannelError::ExternalSender);
        }
        let processed = self.group.process_message(provider, protocol).map_err(mls_err)?;
        let committer = processed.credential().clone();
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(ChannelError::WrongWireFormat);
        };
        rules::authorize_commit(
            &self.config,
            &committer,
            &staged,
            self.group.public_group(),
            check,
        )?;
        let delta = self.membership_delta(&staged);
        self.group.merge_staged_commit(provider, *staged).map_err(mls_err)?;
        self.after_merge(delta, cert)
    }

    /// The devices a staged commit adds and removes, read from its proposals (not from a scan
    /// of the whole member list).
    fn membership_delta(
        &self,
        staged: &openmls::group::StagedCommit,
    ) -> (Vec<DeviceId>, Vec<DeviceId>) {
        let added = staged
            .add_proposals()
            .filter_map(|p| {
                credential_device(p.add_proposal().key_package().leaf_node().credential())
            })
            .collect();
        let removed = staged
            .remove_proposals()
            .filter_map(|p| self.group.member(p.remove_proposal().removed()))
            .filter_map(credential_device)
            .collect();
        (added, removed)
    }

    fn after_merge(
        &mut self,
        (added, removed): (Vec<DeviceId>, Vec<DeviceId>),
        cert: &EpochCert,
    ) -> Result<Vec<ChannelEvent>, ChannelError> {
        self.config = read_config(self.group.extensions())?;
        Ok(vec![ChannelEvent::CommitApplied {
            epoch: self.epoch(),
            added,
            removed,
            self_removed: !self.group.is_active(),
            record: crate::ordering::EpochRecord {
                digest: self.epoch_digest(),
                cert: Some(cert.clone()),
            },
        }])
    }

    fn process_application<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        now: Timestamp,
        protocol: ProtocolMessage,
    ) -> Result<ChannelEvent, ChannelError> {
        let ProtocolMessage::PrivateMessage(private) = &protocol else {
            return Err(ChannelError::WrongWireFormat);
        };
        // A removed device keeps no keys: what still arrives for it cannot be read.
        self.ensure_active()?;
        if protocol.content_type() != ContentType::Application {
            return Err(ChannelError::WrongWireFormat);
        }
        // The authenticated data is readable before decryption; a replay is dropped here,
        // before openmls sees it again. A forged AAD fails decryption below.
        let aad: AppAad = decode(private.aad(), 256).map_err(|_| ChannelError::BadAad)?;
        if self.state.seen.contains(&aad.id) {
            return Ok(ChannelEvent::Duplicate(aad.id));
        }
        let epoch = protocol.epoch().as_u64();
        let current = self.epoch();
        let processed = self.group.process_message(provider, protocol).map_err(|e| {
            let reason = format!("{e} (message {:?})", aad.id);
            match epoch < current {
                true => ChannelError::PastEpoch { epoch, current, reason },
                false => {
                    ChannelError::Mls(format!("{reason} of epoch {epoch}, channel at {current}"))
                }
            }
        })?;
        if credential_device(processed.credential()) != Some(aad.id.sender) {
            return Err(ChannelError::ForgedId);
        }
        // openmls keeps past epochs' keys for late messages; a removed device still holds that
        // epoch's keys, so its messages of a past epoch are read only while it is a member.
        if epoch < current && !self.is_member(aad.id.sender) {
            return Err(ChannelError::FormerMember { sender: aad.id.sender, epoch });
        }
        let ProcessedMessageContent::ApplicationMessage(app) = processed.into_content() else {
            return Err(ChannelError::WrongWireFormat);
        };
        self.state.seen.insert(aad.id);
        self.state.clock.observe(aad.hlc, now);
        Ok(ChannelEvent::Message { id: aad.id, hlc: aad.hlc, epoch, payload: app.into_bytes() })
    }

    fn release_buffered<P: OpenMlsProvider>(
        &mut self,
        provider: &P,
        now: Timestamp,
        check: &impl CredentialCheck,
        events: &mut Vec<ChannelEvent>,
    ) {
        let current = self.epoch();
        let (mut ready, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.buffered).into_iter().partition(|(e, _, _)| *e <= current);
        self.buffered = later.into();
        // Within an epoch, application messages go before the commit that ends the epoch: after
        // that commit their keys may be gone (and if it removes this device, all keys are).
        ready.sort_by_key(|(epoch, _, m)| (*epoch, matches!(m, ChannelMessage::Commit { .. })));
        for (_, _, message) in ready {
            // A buffered message that now fails is dropped, as it would have been on arrival.
            let _ = self.process_one(provider, now, message, check, events);
        }
    }

    fn is_admin(&self, device: DeviceId, user: &UserId) -> bool {
        rules::is_admin(&self.config, device, user)
    }

    fn ensure_active(&self) -> Result<(), ChannelError> {
        if self.group.is_active() { Ok(()) } else { Err(ChannelError::Inactive) }
    }
}

/// The sender a message of a future epoch claims: the id in an application message's
/// authenticated data (readable, not yet verifiable), none for a commit (its sender is a leaf
/// of a tree this device does not have yet).
fn claimed_sender(protocol: &ProtocolMessage) -> Option<DeviceId> {
    let ProtocolMessage::PrivateMessage(private) = protocol else { return None };
    decode::<AppAad>(private.aad(), 256).ok().map(|aad| aad.id.sender)
}

fn decode_mls(bytes: &[u8]) -> Result<MlsMessageIn, ChannelError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(ChannelError::Malformed("message too long".into()));
    }
    MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| ChannelError::Malformed(e.to_string()))
}

fn read_config(extensions: &Extensions<GroupContext>) -> Result<ChannelConfig, ChannelError> {
    let ext = extensions
        .unknown(CONFIG_EXTENSION_TYPE)
        .ok_or(ChannelError::BadConfig("config extension missing"))?;
    let config = ChannelConfig::from_bytes(&ext.0)
        .map_err(|_| ChannelError::BadConfig("config extension malformed"))?;
    config.validate()?;
    Ok(config)
}

fn channel_id(group_id: &GroupId) -> Result<ChannelId, ChannelError> {
    let bytes: [u8; 32] = group_id
        .as_slice()
        .try_into()
        .map_err(|_| ChannelError::Malformed("group id is not 32 bytes".into()))?;
    Ok(ChannelId(bytes))
}

/// The group-context extensions that carry a config: the required capability and the config.
fn config_extensions(config: &ChannelConfig) -> Result<Extensions<GroupContext>, ChannelError> {
    let required = Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
        &[ExtensionType::Unknown(CONFIG_EXTENSION_TYPE)],
        &[],
        &[],
    ));
    let config_ext = Extension::Unknown(CONFIG_EXTENSION_TYPE, UnknownExtension(encode(config)));
    Extensions::from_vec(vec![required, config_ext]).map_err(mls_err)
}

fn check_credential(
    check: &impl CredentialCheck,
    credential: &Credential,
) -> Result<DeviceId, ChannelError> {
    let (device, user) = credential_member(credential).ok_or_else(|| ChannelError::Credential {
        device: None,
        reason: "not a BasicCredential holding a device id and its user".into(),
    })?;
    check
        .check(device, &user)
        .map_err(|reason| ChannelError::Credential { device: Some(device), reason })?;
    Ok(device)
}

#[cfg(test)]
mod tests;
