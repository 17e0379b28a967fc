//! Versioned frames and the request/response types of the relay protocol.
//!
//! A frame is `varint(version) || postcard(body)`, at most [`MAX_FRAME_LEN`] bytes. The node and
//! the relay both speak these types, so they live here. Decoding checks the size before anything
//! else, then the version, then the body (canonically, see [`crate::codec`]), then the body's own
//! limits ([`Validate`]).

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::channel::ChannelMessage;
use crate::codec::{Bytes, Canonical, DecodeError, decode, encode};
use crate::identity::{DeviceId, Dir, RelayId, Sponsorship};
use crate::inbox::SealedEnvelope;
use crate::keys::Signature;
use crate::link::{LinkAnswer, LinkHello, LinkSlot};
use crate::ordering::{ChannelId, CommitHash, CommitRef, EpochCert, EpochReport, Equivocation};

/// The protocol version this implementation speaks.
pub const PROTOCOL_VERSION: u16 = 5;
/// The largest frame accepted, in bytes.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;
/// The largest sealed inbox payload, in bytes.
pub const MAX_INBOX_PAYLOAD_LEN: usize = 256 * 1024;
/// The most KeyPackages in one upload.
pub const MAX_KEY_PACKAGES_PER_UPLOAD: usize = 100;
/// The largest KeyPackage, in bytes.
pub const MAX_KEY_PACKAGE_LEN: usize = 4 * 1024;
/// The most ids in one ack.
pub const MAX_ACK_IDS: usize = 1024;
/// Bytes of a [`Response::Items`] frame besides its items' encodings: the version, the
/// variant, the item count and `more` (5 at most; the test `items_frame_budget_is_exact`
/// checks it).
pub const ITEMS_FRAME_OVERHEAD: usize = 16;
/// Bytes of item encodings ([`InboxItem::encoded_len`]) in one fetch response, at most: with
/// [`ITEMS_FRAME_OVERHEAD`] the response always fits a frame.
pub const MAX_FETCH_BYTES: usize = MAX_FRAME_LEN - ITEMS_FRAME_OVERHEAD;
/// The most inbox items in one fetch.
pub const MAX_FETCH_ITEMS: u32 = 1024;
/// The most devices one accepted commit may fan out to.
pub const MAX_FANOUT: usize = 4096;
/// The largest MLS message (commit or Welcome) carried in a request, in bytes.
pub const MAX_MLS_MESSAGE_LEN: usize = 512 * 1024;

/// Body limits beyond what the encoding itself enforces.
pub trait Validate {
    /// Checks counts and lengths. `Err` names the broken limit.
    fn validate(&self) -> Result<(), &'static str>;
}

/// Encodes a body into a frame of the current version.
pub fn encode_frame<T: Serialize>(body: &T) -> Result<Vec<u8>, DecodeError> {
    let mut out = encode(&PROTOCOL_VERSION);
    out.extend_from_slice(&encode(body));
    if out.len() > MAX_FRAME_LEN {
        return Err(DecodeError::TooLarge { len: out.len(), max: MAX_FRAME_LEN });
    }
    Ok(out)
}

/// Decodes a frame: size, then version, then a canonical body, then the body's limits.
pub fn decode_frame<T>(bytes: &[u8]) -> Result<T, DecodeError>
where
    T: Serialize + DeserializeOwned + Validate,
{
    if bytes.len() > MAX_FRAME_LEN {
        return Err(DecodeError::TooLarge { len: bytes.len(), max: MAX_FRAME_LEN });
    }
    let (version, rest) = postcard::take_from_bytes::<u16>(bytes)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { got: version, supported: PROTOCOL_VERSION });
    }
    if encode(&version).len() != bytes.len() - rest.len() {
        return Err(DecodeError::NonCanonical);
    }
    let body: T = decode(rest, MAX_FRAME_LEN)?;
    body.validate().map_err(DecodeError::Invalid)?;
    Ok(body)
}

/// A request from a device to its relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Request {
    /// Ask for a challenge to prove control of `device`.
    Challenge {
        /// The device that will sign.
        device: DeviceId,
    },
    /// Answer the challenge: the device's signature over [`AuthProof`] under
    /// [`crate::Label::AuthChallenge`].
    Authenticate {
        /// The device that signs.
        device: DeviceId,
        /// The signature.
        signature: Signature,
    },
    /// Register with an invite token (or none, on a relay with open registration), claiming
    /// `local_name`. The DIR is the device's current record.
    Register {
        /// The invite token, if any.
        token: Option<String>,
        /// The name asked for.
        local_name: String,
        /// The device's record.
        dir: Dir,
    },
    /// Publish a newer record of the authenticated device.
    PublishDir {
        /// The record; its sequence number must exceed the stored one.
        dir: Dir,
    },
    /// Look up the current records of a user's devices, by local name.
    Lookup {
        /// `alice` of `alice@relay`.
        local_name: String,
    },
    /// Upload KeyPackages (TLS-encoded MLS KeyPackages) of the authenticated device.
    UploadKeyPackages {
        /// Packages, each claimed at most once.
        packages: Vec<crate::codec::Bytes>,
        /// A package served when the others are used up, kept after being claimed.
        last_resort: Option<crate::codec::Bytes>,
    },
    /// Claim one KeyPackage of a device, to add it to a channel.
    ClaimKeyPackage {
        /// The device to add.
        device: DeviceId,
    },
    /// Put a sealed payload into a device's inbox.
    Enqueue {
        /// The sealed payload; it names its recipient.
        envelope: SealedEnvelope,
    },
    /// Fetch inbox items of the authenticated device after a cursor.
    Fetch {
        /// Items with ids greater than this; `None` from the start.
        after: Option<u64>,
        /// At most this many items, capped at [`MAX_FETCH_ITEMS`].
        max: u32,
    },
    /// Acknowledge inbox items; the relay deletes them.
    Ack {
        /// The ids of the items.
        ids: Vec<u64>,
    },
    /// Submit a staged commit for ordering.
    SubmitCommit(CommitSubmission),
    /// Like [`Request::Fetch`], but when nothing is there yet the relay holds the request until
    /// an item arrives or `timeout_ms` passes: live push over any transport.
    Wait {
        /// Items with ids greater than this; `None` from the start.
        after: Option<u64>,
        /// At most this many items.
        max: u32,
        /// How long to hold the request, capped at [`MAX_WAIT_MS`].
        timeout_ms: u32,
    },
    /// Several enqueues in one request; each is answered on its own, in order.
    EnqueueBatch {
        /// The sealed payloads, at most [`MAX_ENQUEUE_BATCH`].
        envelopes: Vec<SealedEnvelope>,
    },
    /// Start ordering a channel: its public state, exported by a member (the creator, before
    /// the first commit). The relay checks every later commit against it.
    OpenChannel {
        /// The channel.
        channel: ChannelId,
        /// Its GroupInfo and ratchet tree.
        state: crate::channel::PublicState,
    },
    /// Look up the current records of devices by id (a Welcome or a commit names devices, not
    /// users). Unknown devices are left out of the answer. Needs no authentication.
    LookupDevices {
        /// At most [`MAX_LOOKUP_DEVICES`] devices.
        devices: Vec<DeviceId>,
    },
    /// Post application messages of channels the authenticated device is a member of. The
    /// relay puts each one, as it is, into the inbox of every other member device it serves
    /// (DESIGN section 7): one request and one copy from the sender whatever the channel's size,
    /// and no inbox sealing, since an MLS PrivateMessage is already end-to-end encrypted. Each
    /// post is answered on its own, in order.
    Post {
        /// At most [`MAX_POST_BATCH`] posts.
        posts: Vec<ChannelPost>,
    },
    /// Look up a user of any relay (`bob@other.host`): the device's relay asks the user's
    /// relay (federation) and answers with that relay's identity, as it verified it, so the
    /// device can check the sponsorships. Needs a device registered here.
    LookupAt {
        /// The user's relay.
        host: String,
        /// `bob` of `bob@other.host`.
        local_name: String,
    },
    /// [`Request::LookupDevices`] at any relay, through this one.
    LookupDevicesAt {
        /// The devices' relay.
        host: String,
        /// At most [`MAX_LOOKUP_DEVICES`] devices.
        devices: Vec<DeviceId>,
    },
    /// [`Request::ClaimKeyPackage`] for a device of any relay, through this one, under the same
    /// limits as a local claim (here per requester, there per target and per relay).
    ClaimKeyPackageAt {
        /// The device's relay.
        host: String,
        /// The device to add.
        device: DeviceId,
    },
    /// Sealed payloads for devices of another relay. This relay makes them durable in its
    /// queue for `host` before it answers, and forwards them (once per destination relay,
    /// retried while that relay is away, idempotent) until that relay has them in its inboxes.
    Forward {
        /// The recipients' relay.
        host: String,
        /// At most [`MAX_ENQUEUE_BATCH`] payloads, each naming its recipient.
        envelopes: Vec<SealedEnvelope>,
    },
    /// The authenticated device's report of an epoch it reached in a channel it is a member
    /// of: fanned out, like a post, to the channel's other members (on every relay of the
    /// channel). Answered with [`Response::Posted`] (one result).
    Report {
        /// The report, signed by the authenticated device.
        report: EpochReport,
    },
    /// Proof that an orderer signed two commits for one epoch. The relay checks it, keeps it,
    /// reports it (log and metrics) and no longer counts that orderer's signatures.
    Equivocation {
        /// The proof.
        proof: Equivocation,
    },
    /// A run of a channel's history at this relay (the posts and commits it fanned out, in
    /// the order it did), from position `from` on: answered with [`Response::History`]. Only
    /// a current member of the channel may ask.
    History {
        /// The channel.
        channel: ChannelId,
        /// The first position wanted.
        from: u64,
        /// At most this many entries, capped at [`MAX_HISTORY_ENTRIES`].
        max: u32,
    },
    /// Start ordering a relay-less channel that its creator's device moved onto relays: its
    /// public state before the move (relay-less) and the move's commit, certified by the
    /// creator's device, and the state after it. The relay checks the commit against the
    /// state before as a member would, and opens the channel at the state after if the commit
    /// leads to exactly it and its relay set includes this relay. Only the creator's device
    /// asks (its key is the only orderer of the state before).
    OpenMoved {
        /// The channel's GroupInfo and ratchet tree before the move.
        before: crate::channel::PublicState,
        /// The commit that sets the relay set, with the creator's certificate.
        moved: OrderedCommit,
        /// The GroupInfo and ratchet tree after it.
        state: crate::channel::PublicState,
    },
    /// Pin a file's blob here, for the members of `channel` to fetch while the sender is away
    /// (the sender's device, before it sends the file's message). Answered
    /// [`Response::FilePinned`] once the whole blob is here and its pin is durable, or
    /// [`Response::FileWanted`] with where to push it first (an iroh-blobs push, taken from
    /// this device for this hash only). Refused past the relay's size limit or the user's
    /// quota (`QuotaExceeded`).
    PinFile {
        /// The channel the file is sent in (this device must be one of its members here).
        channel: ChannelId,
        /// The blob's BLAKE3 hash.
        hash: [u8; 32],
        /// The blob's length (sealed).
        len: u64,
    },
    /// Where this relay's blob endpoint listens (to fetch the files it pins).
    BlobEndpoint,
    /// Part of a blob pinned here, over this link rather than iroh (for a relay-only device:
    /// iroh needs UDP). Answered [`Response::BlobPart`] with chunks (1 KiB) `first .. first +
    /// chunks` of it, bao-encoded, which the device verifies against the hash.
    BlobPart {
        /// The blob's BLAKE3 hash.
        hash: [u8; 32],
        /// The first chunk: a multiple of [`PART_GROUP_CHUNKS`].
        first: u64,
        /// How many: 1 to [`MAX_PART_CHUNKS`].
        chunks: u32,
    },
    /// Part of a blob this relay asked this device to push ([`Response::FileWanted`]), over
    /// this link rather than iroh, bao-encoded as in [`Response::BlobPart`]; the relay verifies
    /// it against the hash. Answered [`Response::PartTaken`].
    PushPart {
        /// The blob's BLAKE3 hash.
        hash: [u8; 32],
        /// The blob's length (what `PinFile` announced).
        len: u64,
        /// The first chunk: a multiple of [`PART_GROUP_CHUNKS`].
        first: u64,
        /// How many: 1 to [`MAX_PART_CHUNKS`].
        chunks: u32,
        /// The part, at most [`MAX_PART_LEN`] bytes.
        part: Bytes,
    },
    /// Open a slot for a new device of this user to link through ([`crate::link`]), until
    /// `expires` (at most [`crate::link::LINK_TTL_MS`] ahead; the relay cuts it short). A
    /// device holds one slot: a new offer closes its previous one. Answered
    /// [`Response::LinkOffered`].
    OfferLink {
        /// The slot (a hash of the code's secret).
        slot: LinkSlot,
        /// When the slot closes.
        expires: crate::Timestamp,
    },
    /// Put a new device's hello in a slot. The one request besides `Register` that a device not
    /// registered here may send. A slot takes one device's hello (the same device may send a
    /// newer one until the answer): another device's is refused with [`ErrorCode::TokenUsed`],
    /// an unknown or expired slot with
    /// [`ErrorCode::TokenInvalid`]. Answered [`Response::LinkJoined`].
    JoinLink {
        /// The slot.
        slot: LinkSlot,
        /// The new device's record and proof.
        hello: LinkHello,
    },
    /// What a slot holds, asked by its offerer or its joiner. Answered [`Response::LinkState`].
    LinkPoll {
        /// The slot.
        slot: LinkSlot,
    },
    /// The offerer's answer to the hello in its slot. Answered [`Response::LinkAnswered`].
    AnswerLink {
        /// The slot.
        slot: LinkSlot,
        /// The offerer's record and proof.
        answer: LinkAnswer,
    },
    /// The devices registered under this device's name, with their names and when each was
    /// last seen. Answered [`Response::OwnDevices`].
    OwnDevices,
    /// Name this device in its user's device list (at most
    /// [`crate::identity::MAX_DEVICE_NAME_LEN`] bytes, no control characters). Answered
    /// [`Response::DeviceNamed`].
    NameDevice {
        /// The name, like "laptop".
        name: String,
    },
    /// Keep the public half of the user's recovery key (see
    /// [`crate::identity::revocation`]). Taken only while the user has no recovery key and this
    /// is the user's only device (right after registering): a thief holding one of several
    /// devices cannot set one. Answered [`Response::RecoverySet`].
    SetRecovery {
        /// The recovery key's public half.
        key: crate::PublicKey,
    },
    /// Sign the revocation of one of this user's devices: the relay adds the signatures to those
    /// it holds for that device (from the last day) and revokes it once
    /// [`crate::identity::revocation::quorum`] holds. Answered [`Response::Revoking`].
    Revoke {
        /// The revocation with this device's signature (and perhaps the recovery key's).
        revocation: Box<crate::identity::Revocation>,
    },
}

/// Chunks (1 KiB) in one [`Request::BlobPart`] or [`Request::PushPart`], at most.
pub const MAX_PART_CHUNKS: u32 = 512;
/// Parts start at a multiple of this many chunks (iroh-blobs' 16 KiB groups).
pub const PART_GROUP_CHUNKS: u64 = 16;
/// An encoded part's length, at most: its data, the tree's nodes that prove it, and the blob's
/// length.
pub const MAX_PART_LEN: usize = MAX_PART_CHUNKS as usize * 1024 + 64 * 1024;

/// A part's place is within the limits.
fn part_fits(first: u64, chunks: u32) -> Result<(), &'static str> {
    if !first.is_multiple_of(PART_GROUP_CHUNKS) || chunks == 0 || chunks > MAX_PART_CHUNKS {
        return Err("a part starts on a group and has 1 to 512 chunks");
    }
    Ok(())
}

/// The most entries of a channel's history in one [`Response::History`].
pub const MAX_HISTORY_ENTRIES: u32 = 256;
/// Bytes of history entries in one [`Response::History`], at most (the rest of the frame
/// holds the pack's root and the framing).
pub const MAX_HISTORY_BYTES: usize = MAX_FRAME_LEN - 4096;

/// The most posts in one [`Request::Post`].
pub const MAX_POST_BATCH: usize = 256;

/// An application message of a channel, posted once and fanned out by the relay.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ChannelPost {
    /// The channel; the relay checks that the poster is one of its members.
    pub channel: ChannelId,
    /// The MLS PrivateMessage, at most [`MAX_INBOX_PAYLOAD_LEN`] bytes.
    #[serde(with = "serde_bytes")]
    pub message: Vec<u8>,
}

impl std::fmt::Debug for ChannelPost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelPost")
            .field("channel", &self.channel)
            .field("len", &self.message.len())
            .finish()
    }
}

impl Validate for ChannelPost {
    fn validate(&self) -> Result<(), &'static str> {
        if self.message.len() > MAX_INBOX_PAYLOAD_LEN {
            return Err("posted message too long");
        }
        Ok(())
    }
}

/// A certified commit, as the relay that ordered it fans it out to the channel's members: not
/// sealed to each member's inbox key (the relay validated the commit and knows the membership,
/// so sealing hid nothing from it, and cost one X25519 agreement per member at each end).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct OrderedCommit {
    /// The channel.
    pub channel: ChannelId,
    /// The commit (MLS PublicMessage), at most [`MAX_MLS_MESSAGE_LEN`] bytes.
    #[serde(with = "serde_bytes")]
    pub commit: Vec<u8>,
    /// The orderers' certificate of it.
    pub cert: EpochCert,
}

impl std::fmt::Debug for OrderedCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderedCommit")
            .field("channel", &self.channel)
            .field("epoch", &self.cert.body.epoch)
            .field("len", &self.commit.len())
            .finish()
    }
}

impl Validate for OrderedCommit {
    fn validate(&self) -> Result<(), &'static str> {
        if self.commit.len() > MAX_MLS_MESSAGE_LEN {
            return Err("commit too long");
        }
        if self.cert.signatures.len() > crate::ordering::MAX_CERT_SIGNATURES {
            return Err("too many certificate signatures");
        }
        Ok(())
    }
}

/// The answer to one post of a [`Request::Post`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum PostResult {
    /// Durable in the inboxes of `delivered` member devices. `skipped` devices did not get it:
    /// their inbox was full. (Members of other relays get it from their relay.)
    Posted {
        /// Inboxes it is in.
        delivered: u32,
        /// Inboxes it is not in.
        skipped: u32,
    },
    /// Refused; nothing stored.
    Refused(ErrorCode),
}

/// What an inbox item carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Envelope {
    /// An [`InboxPayload`] sealed to the device's inbox key.
    Sealed(SealedEnvelope),
    /// A channel's application message, fanned out by the relay from a [`Request::Post`].
    Post(ChannelPost),
    /// A commit the relay ordered, fanned out to the channel's members.
    Commit(OrderedCommit),
    /// A member's epoch report, fanned out by the relay from a [`Request::Report`].
    Report(EpochReport),
    /// The relay's notice, past the inbox quota, that the inbox was full when an entry of the
    /// channel's history was fanned out: entries from `from` on are to be fetched from the
    /// history ([`Request::History`]) when this item is reached. One per gap: the next entry
    /// the inbox gets also carries the gap ([`HistoryMark::missed_from`]).
    Missed {
        /// The channel.
        channel: ChannelId,
        /// The first position missed.
        from: u64,
    },
}

impl InboxItem {
    /// The length of its encoding in a [`Response::Items`] (what a fetch's byte budget counts).
    pub fn encoded_len(&self) -> usize {
        crate::codec::encoded_len(self)
    }
}

impl Envelope {
    /// The sealed envelope, if it is one.
    pub fn as_sealed(&self) -> Option<&SealedEnvelope> {
        match self {
            Self::Sealed(e) => Some(e),
            Self::Post(_) | Self::Commit(_) | Self::Report(_) | Self::Missed { .. } => None,
        }
    }
}

impl Canonical for Envelope {
    const MAX_LEN: usize = MAX_MLS_MESSAGE_LEN + EpochCert::MAX_LEN + 128;
}

impl Validate for Envelope {
    fn validate(&self) -> Result<(), &'static str> {
        match self {
            Self::Sealed(e) => e.validate(),
            Self::Post(p) => p.validate(),
            Self::Commit(c) => c.validate(),
            Self::Report(r) => r.verify().map_err(|_| "invalid epoch report"),
            Self::Missed { .. } => Ok(()),
        }
    }
}

/// Most devices in one [`Request::LookupDevices`].
pub const MAX_LOOKUP_DEVICES: usize = 256;
/// Most records in one answer (a look-up of devices answers each once).
pub const MAX_DIRS: usize = MAX_LOOKUP_DEVICES;

/// The longest a [`Request::Wait`] is held, in milliseconds.
pub const MAX_WAIT_MS: u32 = 60_000;
/// The most envelopes in one [`Request::EnqueueBatch`].
pub const MAX_ENQUEUE_BATCH: usize = 256;

/// The answer to one envelope of a [`Request::EnqueueBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum EnqueueResult {
    /// Durable in the inbox, with this id.
    Enqueued(u64),
    /// Refused; nothing stored.
    Refused(ErrorCode),
}

/// Everything a relay needs to order a commit and deliver it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct CommitSubmission {
    /// The channel.
    pub channel: ChannelId,
    /// The epoch the commit was built on.
    pub epoch: u64,
    /// The commit, an MLS PublicMessage (its BLAKE3 hash is what gets ordered).
    #[serde(with = "serde_bytes")]
    pub commit: Vec<u8>,
    /// The Welcome for added devices, delivered only once the commit is accepted.
    pub welcome: Option<SealedWelcomes>,
    /// Devices that receive the commit once it is accepted, besides the members the relay knows
    /// from the channel's public state (it delivers to those in any case).
    pub fanout: Vec<DeviceId>,
}

/// A Welcome sealed once for each new device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SealedWelcomes {
    /// One sealed Welcome per added device.
    pub envelopes: Vec<SealedEnvelope>,
}

/// What an inbox item holds once opened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum InboxPayload {
    /// A message of a channel: a certified commit fanned out by the relay, or an application
    /// message.
    Channel {
        /// The channel.
        channel: ChannelId,
        /// The message.
        message: ChannelMessage,
    },
    /// A Welcome (TLS-encoded MLS message), delivered only after the commit adding the device
    /// was ordered.
    Welcome {
        /// The channel.
        channel: ChannelId,
        /// The Welcome.
        welcome: Bytes,
    },
    /// A member asks to be removed (to the channel's admins).
    Leave(LeaveRequest),
    /// A member's epoch report (see [`crate::ordering::EpochReport`]).
    Report(EpochReport),
    /// Part of a channel's history, from another device of the same user to a device of theirs
    /// that joined it later (MLS gives a new member no key of the epochs before it): a pack of
    /// [`HistoryMessage`] encodings, signed by the sending device, sealed to the new device
    /// alone like every inbox payload.
    History(crate::pack::Pack),
}

/// One message of a channel's history, as a device of the user passes it to another
/// ([`InboxPayload::History`]): what the sender's device stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HistoryMessage {
    /// Its id (sender device and sequence number).
    pub id: crate::channel::MessageId,
    /// Its sender's clock.
    pub hlc: crate::hlc::Hlc,
    /// The epoch it was sent in.
    pub epoch: u64,
    /// The plaintext, of the channel's MIME type.
    pub payload: Bytes,
}

impl Canonical for HistoryMessage {
    const MAX_LEN: usize = MAX_INBOX_PAYLOAD_LEN;
}

/// A member's signed request to be removed from a channel (MLS lets no member commit its own
/// removal): sealed to the channel's admins, who commit the removal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct LeaveRequest {
    /// The channel.
    pub channel: ChannelId,
    /// The device leaving (its key signs the request).
    pub device: DeviceId,
    /// When it asked; admins ignore requests older than [`LEAVE_REQUEST_TTL_MS`].
    pub issued: crate::Timestamp,
    /// The device's signature over the fields above, under [`crate::Label::LeaveRequest`].
    pub signature: Signature,
}

/// How long a leave request stays valid, in milliseconds (a week).
pub const LEAVE_REQUEST_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

impl LeaveRequest {
    fn body(channel: ChannelId, device: DeviceId, issued: crate::Timestamp) -> Vec<u8> {
        encode(&(channel, device, issued))
    }

    /// Signs a request for `key`'s device to leave `channel`.
    pub fn sign(key: &crate::SecretKey, channel: ChannelId, issued: crate::Timestamp) -> Self {
        let device = DeviceId(key.public());
        let signature = key.sign(crate::Label::LeaveRequest, &Self::body(channel, device, issued));
        Self { channel, device, issued, signature }
    }

    /// Checks the signature, and that the request is not from the future (beyond the clock
    /// skew) nor older than [`LEAVE_REQUEST_TTL_MS`].
    pub fn verify(&self, now: crate::Timestamp) -> Result<(), &'static str> {
        if self.issued.0 > now.0.saturating_add(crate::MAX_CLOCK_SKEW_MS) {
            return Err("leave request issued in the future");
        }
        if now.0.saturating_sub(self.issued.0) > LEAVE_REQUEST_TTL_MS {
            return Err("leave request expired");
        }
        let body = Self::body(self.channel, self.device, self.issued);
        self.device
            .0
            .verify(crate::Label::LeaveRequest, &body, &self.signature)
            .map_err(|_| "bad leave request signature")
    }
}

impl Canonical for InboxPayload {
    const MAX_LEN: usize = MAX_INBOX_PAYLOAD_LEN;
}

/// The bytes a device signs to authenticate: the relay's challenge bound to both parties.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct AuthProof {
    /// The relay's host name.
    pub relay_host: String,
    /// The device that proves itself.
    pub device: DeviceId,
    /// The relay's random challenge.
    pub nonce: [u8; 32],
}

/// A relay's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Response {
    /// A challenge to sign.
    Challenge {
        /// Random bytes chosen by the relay.
        nonce: [u8; 32],
    },
    /// The device is authenticated on this connection.
    Authenticated,
    /// Registration succeeded.
    Registered {
        /// The relay's sponsorship, to put into the device's next record.
        sponsorship: Sponsorship,
    },
    /// The record was stored.
    DirPublished,
    /// The records of a user's devices.
    Dirs(Vec<Dir>),
    /// KeyPackages were stored.
    KeyPackagesStored {
        /// How many unclaimed packages the device now has.
        available: u32,
    },
    /// A claimed KeyPackage.
    KeyPackage(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The payload is durable in the inbox.
    Enqueued {
        /// Its id in the inbox.
        id: u64,
    },
    /// Inbox items.
    Items {
        /// Items in id order.
        items: Vec<InboxItem>,
        /// Whether more items follow the last one.
        more: bool,
    },
    /// The items were deleted.
    Acked,
    /// The commit won its epoch.
    CommitAccepted {
        /// The relays' signatures on it.
        cert: EpochCert,
    },
    /// Another commit already won the epoch.
    CommitConflict {
        /// The winner, to fetch and process before rebuilding.
        winner: CommitRef,
    },
    /// The request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
    },
    /// The answers to an [`Request::EnqueueBatch`], one per envelope, in order.
    EnqueuedBatch(Vec<EnqueueResult>),
    /// The channel is ordered here; its next commit is for `next_epoch`.
    ChannelOpened {
        /// The epoch the next commit must be built on.
        next_epoch: u64,
    },
    /// The answers to a [`Request::Post`], one per post, in order.
    Posted(Vec<PostResult>),
    /// The records of a user's devices at a relay, with that relay's identity (its key, as
    /// the answering relay verified it from the host's `.well-known`).
    RemoteDirs {
        /// The relay that sponsors them.
        relay: RelayId,
        /// The records, unverified: the device checks them against `relay`.
        dirs: Vec<Dir>,
    },
    /// The payloads of a [`Request::Forward`] are durable in this relay's queue for their
    /// relay.
    Forwarded {
        /// How many were queued (all of them).
        queued: u32,
    },
    /// The equivocation proof of a [`Request::Equivocation`] holds and is kept.
    EquivocationNoted {
        /// Whether the relay had no proof against that orderer before.
        new: bool,
    },
    /// A run of a channel's history: the entries from the asked position (or from `first`,
    /// if those before it are gone), as a pack signed by the relay's key whose envelopes are
    /// encoded [`Envelope`]s (posts and commits). No pack when nothing is kept from there on.
    History {
        /// The oldest position still kept (those before it are past the relay's retention).
        first: u64,
        /// The position the next entry will take.
        next: u64,
        /// The entries.
        pack: Option<crate::pack::Pack>,
    },
    /// The blob is pinned here until `expires_ms` (Unix milliseconds).
    FilePinned {
        /// When the relay deletes it.
        expires_ms: u64,
    },
    /// Push the blob to this relay's blob endpoint first (at most [`MAX_BLOB_ADDRS`]
    /// addresses; its endpoint id is the relay's key), then ask again.
    FileWanted {
        /// Where the endpoint listens.
        addrs: Vec<IpPort>,
    },
    /// Where this relay's blob endpoint listens (its endpoint id is the relay's key).
    BlobEndpoint {
        /// At most [`MAX_BLOB_ADDRS`] addresses.
        addrs: Vec<IpPort>,
    },
    /// The part of a blob asked for: the blob's length (8 bytes, little-endian), then the
    /// tree's nodes that prove the part, then its data (BLAKE3 verified streaming, as
    /// iroh-blobs sends a range); at most [`MAX_PART_LEN`] bytes.
    BlobPart {
        /// The encoded part.
        part: Bytes,
    },
    /// The pushed part verified and kept.
    PartTaken,
    /// The link slot is open.
    LinkOffered,
    /// The hello is in the slot.
    LinkJoined,
    /// What a link slot holds.
    LinkState {
        /// The joiner's hello, once it came.
        hello: Option<Box<LinkHello>>,
        /// The offerer's answer, once it came.
        answer: Option<Box<LinkAnswer>>,
    },
    /// The answer is in the slot.
    LinkAnswered,
    /// The devices of the asking device's user.
    OwnDevices(Vec<DeviceEntry>),
    /// The device's name is kept.
    DeviceNamed,
    /// The recovery key is kept.
    RecoverySet,
    /// Where a revocation stands.
    Revoking {
        /// Whether the device is revoked now (or was before).
        revoked: bool,
        /// Signatures of the user's devices that count.
        signed: u32,
        /// How many are needed without the recovery code.
        needed: u32,
    },
}

/// One device of a user, as its relay lists it to the user's devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct DeviceEntry {
    /// Its current record.
    pub dir: Dir,
    /// The name it gave itself (`NameDevice`); empty if none.
    pub name: String,
    /// When it registered here.
    pub registered: crate::Timestamp,
    /// When it last spoke to the relay, to the minute; `None` if never since the relay began
    /// keeping it.
    pub last_seen: Option<crate::Timestamp>,
    /// For a revoked device, the revocation that the relay took (it lists at most
    /// [`MAX_LISTED_REVOKED`] of them, the latest); `None` for a device of the user.
    pub revocation: Option<crate::identity::Revocation>,
}

/// Revoked devices a [`Response::OwnDevices`] lists, at most.
pub const MAX_LISTED_REVOKED: usize = 16;

/// An IP address and a port, as frames carry them: a [`std::net::SocketAddr`] without an IPv6
/// flow label or scope, which its encoding would drop (so a decoded address is always the one
/// encoded). Encoded as a `SocketAddr` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct IpPort {
    /// The address.
    pub ip: std::net::IpAddr,
    /// The port.
    pub port: u16,
}

impl From<std::net::SocketAddr> for IpPort {
    fn from(a: std::net::SocketAddr) -> Self {
        Self { ip: a.ip(), port: a.port() }
    }
}

impl From<IpPort> for std::net::SocketAddr {
    fn from(a: IpPort) -> Self {
        Self::new(a.ip, a.port)
    }
}

/// Addresses in a [`Response::FileWanted`] or [`Response::BlobEndpoint`], at most.
pub const MAX_BLOB_ADDRS: usize = 16;

/// One stored inbox item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct InboxItem {
    /// Its id, increasing per inbox.
    pub id: u64,
    /// What it carries.
    pub envelope: Envelope,
    /// For a post or commit: where it is in its channel's history at the relay, and what of
    /// that history this inbox did not get before it.
    pub history: Option<HistoryMark>,
}

/// Where an inbox item's post or commit sits in its channel's history at the relay
/// ([`Request::History`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HistoryMark {
    /// Its position.
    pub seq: u64,
    /// When the inbox missed entries of the channel before this one (it was full, or they
    /// expired before they were read): the first position missed. Every entry from there to
    /// `seq` that is not the device's own is to be fetched from the history before this one.
    pub missed_from: Option<u64>,
}

/// The kind of a failed request, so a client knows whether to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum ErrorCode {
    /// The request was malformed or broke a limit; retrying it will not help.
    BadRequest,
    /// The device must authenticate first.
    Unauthenticated,
    /// The device may not do this.
    Forbidden,
    /// No such user, device or item.
    NotFound,
    /// The registration token is unknown or expired.
    TokenInvalid,
    /// The registration token was already used.
    TokenUsed,
    /// Registration is closed and no token was given.
    RegistrationClosed,
    /// The name is taken.
    NameTaken,
    /// A record's sequence number is not higher than the stored one.
    StaleSequence,
    /// A quota is full; retry after the given time.
    QuotaExceeded {
        /// How long to wait, in milliseconds.
        retry_after_ms: u64,
    },
    /// Too many requests; retry after the given time.
    RateLimited {
        /// How long to wait, in milliseconds.
        retry_after_ms: u64,
    },
    /// The relay failed; retrying later may help.
    Unavailable,
    /// This device was revoked by its user's other devices: no request of it will succeed
    /// again, at this relay or any other of the user's.
    Revoked,
}

impl ErrorCode {
    /// A short, stable name (for logs and metrics labels).
    pub fn name(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::TokenInvalid => "token_invalid",
            Self::TokenUsed => "token_used",
            Self::RegistrationClosed => "registration_closed",
            Self::NameTaken => "name_taken",
            Self::StaleSequence => "stale_sequence",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Revoked => "revoked",
        }
    }

    /// Whether the same request may succeed later.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::QuotaExceeded { .. } | Self::RateLimited { .. } | Self::Unavailable)
    }
}

impl Validate for Request {
    fn validate(&self) -> Result<(), &'static str> {
        match self {
            Self::UploadKeyPackages { packages, last_resort } => {
                if packages.len() > MAX_KEY_PACKAGES_PER_UPLOAD {
                    return Err("too many key packages");
                }
                let too_long = |p: &crate::codec::Bytes| p.len() > MAX_KEY_PACKAGE_LEN;
                if packages.iter().chain(last_resort).any(too_long) {
                    return Err("key package too long");
                }
                Ok(())
            }
            Self::Enqueue { envelope } => envelope.validate(),
            Self::Fetch { max, .. } if *max > MAX_FETCH_ITEMS => Err("fetch max too large"),
            Self::Ack { ids } if ids.len() > MAX_ACK_IDS => Err("too many ack ids"),
            Self::Wait { max, .. } if *max > MAX_FETCH_ITEMS => Err("fetch max too large"),
            Self::History { max, .. } if *max > MAX_HISTORY_ENTRIES => Err("history max too large"),
            Self::EnqueueBatch { envelopes } => {
                if envelopes.len() > MAX_ENQUEUE_BATCH {
                    return Err("too many envelopes in one batch");
                }
                envelopes.iter().try_for_each(SealedEnvelope::validate)
            }
            Self::SubmitCommit(s) => s.validate(),
            Self::LookupDevices { devices } | Self::LookupDevicesAt { devices, .. }
                if devices.len() > MAX_LOOKUP_DEVICES =>
            {
                Err("too many devices to look up")
            }
            Self::Forward { envelopes, .. } => {
                if envelopes.len() > MAX_ENQUEUE_BATCH {
                    return Err("too many envelopes in one batch");
                }
                envelopes.iter().try_for_each(SealedEnvelope::validate)
            }
            Self::Post { posts } => {
                if posts.len() > MAX_POST_BATCH {
                    return Err("too many posts in one request");
                }
                posts.iter().try_for_each(ChannelPost::validate)
            }
            Self::Report { report } if report.verify().is_err() => Err("invalid epoch report"),
            Self::OpenChannel { state, .. } => state_fits(state),
            Self::OpenMoved { before, moved, state } => {
                state_fits(before)?;
                state_fits(state)?;
                moved.validate()
            }
            Self::BlobPart { first, chunks, .. } => part_fits(*first, *chunks),
            Self::NameDevice { name } => check_device_name(name),
            Self::Revoke { revocation }
                if revocation.signers.len() > crate::identity::MAX_LINKED_DEVICES =>
            {
                Err("too many signers")
            }
            Self::PushPart { first, chunks, part, .. } => {
                part_fits(*first, *chunks)?;
                if part.len() > MAX_PART_LEN {
                    return Err("part too long");
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A device's name: at most [`crate::identity::MAX_DEVICE_NAME_LEN`] bytes, no control
/// characters (it reaches terminals).
pub fn check_device_name(name: &str) -> Result<(), &'static str> {
    if name.len() > crate::identity::MAX_DEVICE_NAME_LEN {
        return Err("device name too long");
    }
    if name.chars().any(char::is_control) {
        return Err("control characters in a device name");
    }
    Ok(())
}

/// A channel's public state is within the frame's limits.
fn state_fits(state: &crate::channel::PublicState) -> Result<(), &'static str> {
    if state.group_info.len() > MAX_MLS_MESSAGE_LEN
        || state.ratchet_tree.len() > MAX_MLS_MESSAGE_LEN
    {
        return Err("public state too large");
    }
    Ok(())
}

impl Validate for CommitSubmission {
    fn validate(&self) -> Result<(), &'static str> {
        if self.commit.len() > MAX_MLS_MESSAGE_LEN {
            return Err("commit too long");
        }
        if self.fanout.len() > MAX_FANOUT {
            return Err("fanout too large");
        }
        if let Some(w) = &self.welcome {
            if w.envelopes.len() > MAX_FANOUT {
                return Err("too many welcomes");
            }
            for e in &w.envelopes {
                e.validate()?;
            }
        }
        Ok(())
    }
}

impl Validate for Response {
    fn validate(&self) -> Result<(), &'static str> {
        match self {
            Self::Items { items, .. } => {
                if items.len() > MAX_FETCH_ITEMS as usize {
                    return Err("too many items");
                }
                items.iter().try_for_each(|i| i.envelope.validate())
            }
            Self::KeyPackage(kp) if kp.len() > MAX_KEY_PACKAGE_LEN => Err("key package too long"),
            Self::EnqueuedBatch(r) if r.len() > MAX_ENQUEUE_BATCH => Err("too many results"),
            Self::Posted(r) if r.len() > MAX_POST_BATCH => Err("too many results"),
            Self::Dirs(d) | Self::RemoteDirs { dirs: d, .. } if d.len() > MAX_DIRS => {
                Err("too many records")
            }
            Self::FileWanted { addrs } | Self::BlobEndpoint { addrs }
                if addrs.len() > MAX_BLOB_ADDRS =>
            {
                Err("too many blob addresses")
            }
            Self::History { pack: Some(p), .. }
                if p.envelopes.len() > MAX_HISTORY_ENTRIES as usize =>
            {
                Err("too many history entries")
            }
            Self::BlobPart { part } if part.len() > MAX_PART_LEN => Err("part too long"),
            Self::OwnDevices(devices) => {
                if devices.len() > crate::identity::MAX_LINKED_DEVICES + 1 + MAX_LISTED_REVOKED {
                    return Err("too many devices");
                }
                devices.iter().try_for_each(|d| check_device_name(&d.name))
            }
            _ => Ok(()),
        }
    }
}

/// The commit hash of submitted commit bytes.
pub fn commit_hash(commit: &[u8]) -> CommitHash {
    CommitHash(*blake3::hash(commit).as_bytes())
}

impl AuthProof {
    /// The device's answer to a challenge.
    pub fn sign(key: &crate::keys::SecretKey, relay_host: &str, nonce: [u8; 32]) -> Signature {
        let proof =
            Self { relay_host: relay_host.to_owned(), device: DeviceId(key.public()), nonce };
        key.sign(crate::keys::Label::AuthChallenge, &encode(&proof))
    }

    /// Checks a device's answer to the challenge `nonce` of relay `relay_host`.
    pub fn verify(
        relay_host: &str,
        device: DeviceId,
        nonce: [u8; 32],
        signature: &Signature,
    ) -> Result<(), crate::keys::SignatureError> {
        let proof = Self { relay_host: relay_host.to_owned(), device, nonce };
        device.0.verify(crate::keys::Label::AuthChallenge, &encode(&proof), signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SecretKey, Timestamp};

    #[test]
    fn leave_requests_verify_and_expire() {
        let key = SecretKey::from_seed([3; 32]);
        let now = Timestamp(1_800_000_000_000);
        let r = LeaveRequest::sign(&key, ChannelId([1; 32]), now);
        assert_eq!(r.verify(now), Ok(()));
        assert_eq!(r.verify(now.plus_ms(LEAVE_REQUEST_TTL_MS + 1)), Err("leave request expired"));
        assert!(r.verify(Timestamp(now.0 - crate::MAX_CLOCK_SKEW_MS - 1)).is_err());
        let other_channel = LeaveRequest { channel: ChannelId([2; 32]), ..r.clone() };
        assert_eq!(other_channel.verify(now), Err("bad leave request signature"));
        let other_device =
            LeaveRequest { device: DeviceId(SecretKey::from_seed([4; 32]).public()), ..r };
        assert_eq!(other_device.verify(now), Err("bad leave request signature"));
    }
}
