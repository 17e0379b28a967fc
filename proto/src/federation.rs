//! What relays say to each other (DESIGN sections 4 and 7): frames on a libp2p protocol of their
//! own, [`FEDERATION_PROTOCOL`], beside the device protocol.
//!
//! A relay is named by its host and known by its key, which is also its libp2p identity: Noise
//! authenticates the peer's key, and the host's `.well-known` says which key the host has. So
//! every request names the host it comes from ([`FedRequest::from`]), and the answering relay
//! checks, once per connection, that this host publishes the key of the peer that asks. A
//! relay never acts for a device of its own on another relay's word: what crosses is look-ups
//! (public records), KeyPackage claims (under the answering relay's limits) and sealed
//! payloads for the answering relay's own devices, and posts of channels both relays order.

use serde::{Deserialize, Serialize};

use crate::identity::{DeviceId, Dir, RelayId};
use crate::ordering::{CertSignature, EpochCertBody};
use crate::wire::{
    Envelope, ErrorCode, MAX_DIRS, MAX_KEY_PACKAGE_LEN, MAX_LOOKUP_DEVICES, Validate,
};

/// The libp2p protocol name relays speak to each other.
pub const FEDERATION_PROTOCOL: &str = "/chitchat/federation/1";
/// The most payloads in one [`FedBody::Forward`].
pub const MAX_FORWARD_BATCH: usize = 256;

/// A request from one relay to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FedRequest {
    /// The asking relay's host; the answering relay checks that its `.well-known` publishes
    /// the key of the authenticated peer.
    pub from: String,
    /// What it asks.
    pub body: FedBody,
}

/// What a relay asks another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum FedBody {
    /// The records of a user's devices, by local name.
    Lookup {
        /// `bob` of `bob@answering.host`.
        local_name: String,
    },
    /// The records of devices, by id; unknown ones are left out.
    LookupDevices {
        /// At most [`MAX_LOOKUP_DEVICES`].
        devices: Vec<DeviceId>,
    },
    /// One KeyPackage of a device of the answering relay, for `requester` (a device of the
    /// asking relay, which authenticated it).
    ClaimKeyPackage {
        /// Who asks, for the answering relay's per-requester limit.
        requester: DeviceId,
        /// The device to add.
        device: DeviceId,
    },
    /// Sealed payloads for devices of the answering relay, each with its sequence number in
    /// the asking relay's queue for it: the answering relay stores each at most once.
    Forward {
        /// At most [`MAX_FORWARD_BATCH`].
        items: Vec<Forwarded>,
    },
    /// A Raft message of the ordering group of the relay set `relays` (both relays are in it).
    /// The payload is the group implementation's own encoding of the RPC.
    Raft {
        /// The group's relays, sorted: they name the group.
        relays: Vec<RelayId>,
        /// Which RPC the payload is.
        rpc: RaftRpc,
        /// The RPC, at most [`MAX_RAFT_PAYLOAD`] bytes.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// A command for the group of `relays`, sent to its leader by the relay a device submitted
    /// to (which checked the device and its directory first).
    Propose {
        /// The group's relays, sorted.
        relays: Vec<RelayId>,
        /// The command, in the group implementation's encoding.
        #[serde(with = "serde_bytes")]
        command: Vec<u8>,
    },
    /// Sign the certificate of `body` if, in the asking relay's group, `body.hash` won
    /// `body.epoch`: the answering relay waits (briefly) until it applied the log up to `index`,
    /// and signs only what its own state says won. It never signs two hashes for one epoch.
    Sign {
        /// The group's relays, sorted.
        relays: Vec<RelayId>,
        /// What to certify.
        body: EpochCertBody,
        /// The log index of the winning entry.
        index: u64,
    },
    /// Proof that an orderer signed two commits for one epoch, passed on by a relay that took
    /// it from a member to the other relays it orders with that orderer: each checks it as the
    /// first did and stops counting that orderer's signatures.
    Equivocation {
        /// The proof.
        proof: Box<crate::ordering::Equivocation>,
    },
    /// Is `state` the channel's state as the answering relay ordered it? Asked by a relay of
    /// the relay set the state names, which a member asked to open the channel in the group of
    /// that set, of the other relays of the set: those that ordered the channel's move into the
    /// set hold the very state it must be.
    CheckState {
        /// The channel.
        channel: crate::ordering::ChannelId,
        /// The state the member opens the channel with.
        state: crate::channel::PublicState,
    },
    /// A file's blob the asking relay pinned for a channel both relays order: the answering
    /// relay fetches it from the asking relay's blob endpoint (whose endpoint id is the asking
    /// relay's key) and pins it too, until `expires_ms` at the latest, for its own members.
    /// Answered [`FedResponse::Replicating`] once the fetch is under way (or done).
    ReplicateFile {
        /// The channel the file was sent in.
        channel: crate::ordering::ChannelId,
        /// The blob's BLAKE3 hash.
        hash: [u8; 32],
        /// The blob's length (sealed).
        len: u64,
        /// When the asking relay unpins it (Unix milliseconds).
        expires_ms: u64,
        /// Where the asking relay's blob endpoint listens, at most
        /// [`MAX_BLOB_ADDRS`](crate::wire::MAX_BLOB_ADDRS).
        addrs: Vec<crate::wire::IpPort>,
    },
}

/// A relay's judgement of a channel's public state offered to open the channel in the group of
/// the relay set it names ([`FedBody::CheckState`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum StateCheck {
    /// It is exactly the state this relay's log reached when it ordered the move into the set.
    Matches,
    /// It cannot be the channel's state: older than what this relay ordered, or not the state
    /// its log reached at that epoch, or past an epoch only the group of the set may order.
    Differs,
    /// This relay holds nothing to judge it by.
    Unknown,
    /// The group of the set holds this relay's latest copy of the channel, and it names the
    /// set: the channel is open there already, and opening it again changes nothing (whatever
    /// the state offered).
    Live,
}

/// What the judgements of a state offered to open a channel add up to ([`StateCheck::sum`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vouched {
    /// The state may be proposed.
    Yes,
    /// A relay found that it cannot be the channel's state.
    Stale,
    /// A state past epoch 0 that no relay vouched for: none of the relays that ordered the
    /// channel's move into the set answered (they are away, or have not applied the move yet).
    NotYet,
}

/// A copy of a channel an ordering group of a relay holds: its epoch, and whether its config
/// names the relay set a state is offered for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldCopy {
    /// The epoch of the copy (of its next commit).
    pub epoch: u64,
    /// Whether the copy's relay set is the one the offered state names.
    pub names_set: bool,
}

impl StateCheck {
    /// Judges a state of `epoch` offered to open a channel in the group of the relay set it
    /// names, by the copies one relay holds: `in_group`, the copy of that very group (if it
    /// holds one), and `elsewhere`, the copy of the latest epoch among its other groups;
    /// `matches_elsewhere` says whether the state is exactly that copy.
    ///
    /// - The latest copy is elsewhere and names the set (its group ordered the move into the
    ///   set, the last this relay knows): the state must be exactly it, at its epoch (the next
    ///   epoch is the new group's to order, so no later state can exist yet).
    /// - It is elsewhere and names another set: the channel moved on from there, so the state
    ///   must be later.
    /// - It is the group's own and names another set (the channel left the set from there):
    ///   the state must be later; one naming the set is [`StateCheck::Live`].
    pub fn judge(
        in_group: Option<HeldCopy>,
        elsewhere: Option<HeldCopy>,
        epoch: u64,
        matches_elsewhere: bool,
    ) -> Self {
        match (in_group, elsewhere) {
            (Some(own), latest) if latest.is_none_or(|l| own.epoch >= l.epoch) => {
                if own.names_set {
                    Self::Live
                } else if epoch <= own.epoch {
                    Self::Differs
                } else {
                    Self::Unknown
                }
            }
            (_, Some(l)) if l.names_set => {
                if epoch == l.epoch && matches_elsewhere {
                    Self::Matches
                } else {
                    Self::Differs
                }
            }
            (_, Some(l)) if epoch <= l.epoch => Self::Differs,
            _ => Self::Unknown,
        }
    }

    /// Sums up the judgements of a state of `epoch`, from the relay asked to open the channel
    /// and the other relays of the set it reached.
    ///
    /// One [`StateCheck::Differs`] makes it [`Vouched::Stale`]. A state past epoch 0 also needs
    /// one relay that vouches for it ([`StateCheck::Matches`], or [`StateCheck::Live`]): a
    /// channel reaches a later epoch only by commits its relays ordered, and the relay of the
    /// committer of a move stays in the set (a member never commits its own removal, and a
    /// relay leaves the set only with its last member), so a state no one vouches for is one
    /// whose vouchers are out of reach, not yet caught up, or lost their disk; until one
    /// answers it is [`Vouched::NotYet`]. Without that rule, a member of a relay new to the set
    /// could open the channel with a state of its own making while the relays that ordered the
    /// move were away, and the group would order from it.
    pub fn sum(epoch: u64, checks: impl IntoIterator<Item = StateCheck>) -> Vouched {
        let mut vouched = epoch == 0;
        for check in checks {
            match check {
                Self::Differs => return Vouched::Stale,
                Self::Matches | Self::Live => vouched = true,
                Self::Unknown => {}
            }
        }
        if vouched { Vouched::Yes } else { Vouched::NotYet }
    }
}

/// The kinds of Raft RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum RaftRpc {
    /// Append entries (and heartbeats).
    AppendEntries,
    /// A vote request.
    Vote,
    /// A chunk of a snapshot.
    InstallSnapshot,
}

/// The largest Raft payload or proposed command, in bytes (a frame holds it with room to spare).
pub const MAX_RAFT_PAYLOAD: usize = 960 * 1024;
/// The most relays in one relay set.
pub const MAX_RELAY_SET: usize = crate::ordering::MAX_CERT_SIGNATURES;

/// One forwarded payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Forwarded {
    /// Its number in the sender relay's queue for this relay: the id that makes forwarding
    /// idempotent.
    pub seq: u64,
    /// The device that sent it (authenticated by the sender relay).
    pub sender: DeviceId,
    /// A payload sealed to one device of the answering relay, or a channel's post for the
    /// answering relay to fan out to its own members of the channel.
    pub envelope: Envelope,
}

/// What happened to one forwarded payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum ForwardResult {
    /// Durable in its recipient's inbox (now, or by an earlier delivery of the same `seq`).
    Stored,
    /// Refused; a retryable code means: try again later.
    Refused(ErrorCode),
}

/// A relay's answer to another relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum FedResponse {
    /// Records of devices.
    Dirs(Vec<Dir>),
    /// A claimed KeyPackage.
    KeyPackage(#[serde(with = "serde_bytes")] Vec<u8>),
    /// One result per forwarded payload, in order.
    Forwarded(Vec<ForwardResult>),
    /// The answer to a Raft RPC or a proposal, in the group implementation's encoding.
    Raft(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The answering relay's signature of a certificate.
    Signed(CertSignature),
    /// The request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
    },
    /// The equivocation proof holds and is kept (`new`: the first against that orderer).
    Noted {
        /// Whether it is the first proof against that orderer.
        new: bool,
    },
    /// The answer to [`FedBody::CheckState`].
    StateChecked(StateCheck),
    /// The answering relay has the blob of a [`FedBody::ReplicateFile`] pinned, or is fetching
    /// it.
    Replicating,
}

impl Validate for FedRequest {
    fn validate(&self) -> Result<(), &'static str> {
        if self.from.len() > crate::identity::MAX_HOST_LEN {
            return Err("host too long");
        }
        match &self.body {
            FedBody::Lookup { .. } | FedBody::ClaimKeyPackage { .. } => Ok(()),
            FedBody::LookupDevices { devices } if devices.len() > MAX_LOOKUP_DEVICES => {
                Err("too many devices to look up")
            }
            FedBody::LookupDevices { .. } => Ok(()),
            FedBody::Forward { items } => {
                if items.len() > MAX_FORWARD_BATCH {
                    return Err("too many forwarded payloads");
                }
                items.iter().try_for_each(|i| i.envelope.validate())
            }
            FedBody::Raft { relays, payload: bytes, .. }
            | FedBody::Propose { relays, command: bytes } => {
                check_relay_set(relays)?;
                if bytes.len() > MAX_RAFT_PAYLOAD {
                    return Err("raft payload too large");
                }
                Ok(())
            }
            FedBody::Sign { relays, .. } => check_relay_set(relays),
            FedBody::Equivocation { .. } => Ok(()),
            FedBody::ReplicateFile { addrs, .. } if addrs.len() > crate::wire::MAX_BLOB_ADDRS => {
                Err("too many blob addresses")
            }
            FedBody::ReplicateFile { .. } => Ok(()),
            FedBody::CheckState { state, .. } => {
                if state.group_info.len().saturating_add(state.ratchet_tree.len())
                    > MAX_RAFT_PAYLOAD
                {
                    return Err("public state too large");
                }
                Ok(())
            }
        }
    }
}

impl Validate for FedResponse {
    fn validate(&self) -> Result<(), &'static str> {
        match self {
            Self::Dirs(d) if d.len() > MAX_DIRS => Err("too many records"),
            Self::KeyPackage(kp) if kp.len() > MAX_KEY_PACKAGE_LEN => Err("key package too long"),
            Self::Forwarded(r) if r.len() > MAX_FORWARD_BATCH => Err("too many results"),
            Self::Raft(b) if b.len() > MAX_RAFT_PAYLOAD => Err("raft payload too large"),
            _ => Ok(()),
        }
    }
}

/// A relay set names a group: 2 to [`MAX_RELAY_SET`] relays, sorted, each once.
pub fn check_relay_set(relays: &[RelayId]) -> Result<(), &'static str> {
    if relays.len() < 2 || relays.len() > MAX_RELAY_SET {
        return Err("a relay set has 2 to 64 relays");
    }
    if !relays.windows(2).all(|w| w[0] < w[1]) {
        return Err("a relay set is sorted, each relay once");
    }
    Ok(())
}

/// The id of the ordering group of a relay set: BLAKE3 of its canonical encoding.
pub fn group_id(relays: &[RelayId]) -> [u8; 32] {
    *blake3::hash(&crate::codec::encode(&relays)).as_bytes()
}

/// Whether a relay may be reached over plain HTTP to read its `.well-known` without the
/// operator allowing it: a host on loopback (`localhost`, `127.0.0.0/8`, `[::1]`), with any port.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() => name,
        _ => host,
    };
    name == "localhost"
        || name.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
        || name == "[::1]"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_frame, encode_frame};

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "localhost:80", "127.0.0.1", "127.0.0.1:7561", "127.3.4.5:1"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in
            ["relay.example", "relay.example:443", "10.0.0.1:80", "localhost.evil", "128.0.0.1"]
        {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn limits_are_checked_on_decode() {
        let key = crate::SecretKey::from_seed([1; 32]);
        let device = DeviceId(key.public());
        let too_many = FedRequest {
            from: "a.example".into(),
            body: FedBody::LookupDevices { devices: vec![device; MAX_LOOKUP_DEVICES + 1] },
        };
        let frame = encode_frame(&too_many).expect("frame");
        assert!(decode_frame::<FedRequest>(&frame).is_err());
        let long_host = FedRequest {
            from: "a".repeat(300),
            body: FedBody::Lookup { local_name: "bob".into() },
        };
        let frame = encode_frame(&long_host).expect("frame");
        assert!(decode_frame::<FedRequest>(&frame).is_err());
        let ok = FedRequest {
            from: "a.example:1".into(),
            body: FedBody::Lookup { local_name: "b".into() },
        };
        assert_eq!(decode_frame::<FedRequest>(&encode_frame(&ok).expect("frame")), Ok(ok));
    }

    /// The judgement of a state offered to open a moved channel, case by case.
    #[test]
    fn states_are_judged_by_the_latest_copy() {
        use StateCheck::{Differs, Live, Matches, Unknown};
        let copy = |epoch, names_set| Some(HeldCopy { epoch, names_set });
        // Nothing held: nothing to say.
        assert_eq!(StateCheck::judge(None, None, 5, false), Unknown);
        // The move into the set was ordered elsewhere at epoch 5: exactly that state, nothing
        // older, nothing later, nothing else of epoch 5.
        assert_eq!(StateCheck::judge(None, copy(5, true), 5, true), Matches);
        assert_eq!(StateCheck::judge(None, copy(5, true), 5, false), Differs);
        assert_eq!(StateCheck::judge(None, copy(5, true), 4, false), Differs);
        assert_eq!(StateCheck::judge(None, copy(5, true), 6, false), Differs);
        // The latest copy elsewhere moved on to another set: only a later state can be true.
        assert_eq!(StateCheck::judge(None, copy(5, false), 5, false), Differs);
        assert_eq!(StateCheck::judge(None, copy(5, false), 9, false), Unknown);
        // The group's own copy is the latest: live (opening changes nothing), or it left the
        // set at its epoch (only a later state can be true).
        assert_eq!(StateCheck::judge(copy(7, true), copy(5, true), 7, false), Live);
        assert_eq!(StateCheck::judge(copy(7, false), copy(5, true), 7, false), Differs);
        assert_eq!(StateCheck::judge(copy(7, false), copy(5, true), 9, false), Unknown);
        // An older copy of the group's own is passed over for a later one elsewhere.
        assert_eq!(StateCheck::judge(copy(3, false), copy(5, true), 5, true), Matches);
        assert_eq!(StateCheck::judge(copy(3, false), copy(5, true), 8, false), Differs);
    }

    /// A state past epoch 0 opens only when some relay vouches for it; one `Differs` refuses it
    /// whatever the others say.
    #[test]
    fn a_state_past_epoch_0_needs_a_relay_that_vouches_for_it() {
        use StateCheck::{Differs, Live, Matches, Unknown};
        // A new channel: no relay holds it, and none needs to.
        assert_eq!(StateCheck::sum(0, [Unknown, Unknown]), Vouched::Yes);
        assert_eq!(StateCheck::sum(0, []), Vouched::Yes);
        // A moved channel whose movers are all away: not yet (a forger's chance otherwise).
        assert_eq!(StateCheck::sum(1, [Unknown, Unknown, Unknown]), Vouched::NotYet);
        assert_eq!(StateCheck::sum(1, []), Vouched::NotYet);
        // One mover (or a live copy) is enough.
        assert_eq!(StateCheck::sum(4, [Unknown, Matches, Unknown]), Vouched::Yes);
        assert_eq!(StateCheck::sum(4, [Live, Unknown]), Vouched::Yes);
        // One `Differs` refuses, before or after a voucher.
        assert_eq!(StateCheck::sum(4, [Matches, Differs]), Vouched::Stale);
        assert_eq!(StateCheck::sum(0, [Differs, Live]), Vouched::Stale);
    }
}
