//! What two nodes say to each other directly, on `/chitchat/peer/1` (request-response over a
//! libp2p connection). The connection is authenticated by Noise with the device's key (a node's
//! peer id is its device key), so each side knows which device it talks to, and nothing here
//! needs a signature of its own beyond those the items carry.
//!
//! A relay-less channel (a LAN: section 6 of the design, "ordered by its creator's device")
//! needs what relays do for other channels: a device's identity record ([`PeerRequest::Hello`]),
//! a KeyPackage to add it with ([`PeerRequest::ClaimKeyPackage`]), Welcomes and ordered commits
//! handed over ([`PeerRequest::Deliver`]), and the commits a member missed, from the creator
//! ([`PeerRequest::Commits`]). Frames are those of [`crate::wire`] (a version, then the body).

use serde::{Deserialize, Serialize};

use crate::codec::Bytes;
use crate::identity::Dir;
use crate::ordering::ChannelId;
use crate::ordering::EpochCert;
use crate::wire::{
    ChannelPost, Envelope, ErrorCode, IpPort, MAX_BLOB_ADDRS, MAX_DIRS, MAX_KEY_PACKAGE_LEN,
    MAX_MLS_MESSAGE_LEN, OrderedCommit, Validate,
};

/// Envelopes in one [`PeerRequest::Deliver`], at most.
pub const MAX_DELIVER: usize = 64;
/// Commits in one [`PeerResponse::Commits`], at most (the frame's size bounds it too).
pub const MAX_COMMITS: usize = 64;
/// Entries in one [`PeerResponse::History`], at most (the frame's size bounds it too).
pub const MAX_HISTORY: usize = 256;

/// A request from one node to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum PeerRequest {
    /// The answering device's identity record.
    Hello,
    /// A fresh KeyPackage of the answering device, to add it to a channel (each is used once).
    ClaimKeyPackage,
    /// Envelopes for the answering device: a Welcome sealed to it, or commits of a relay-less
    /// channel with their creator's certificate. Each is checked as one from an inbox is.
    Deliver {
        /// At most [`MAX_DELIVER`].
        envelopes: Vec<Envelope>,
        /// Identity records the envelopes may need (a Welcome's: the channel's members, some
        /// of whom may be away), at most [`MAX_DIRS`]; each is checked by its own signature.
        dirs: Vec<Dir>,
    },
    /// The ordered commits of a relay-less channel built on epoch `from` and after, asked of
    /// the channel's creator (which orders it) by a member that missed them.
    Commits {
        /// The channel.
        channel: ChannelId,
        /// The first epoch wanted (a commit built on `from` moves the channel to `from + 1`).
        from: u64,
    },
    /// A member's commit of a relay-less channel, for its creator to order: certified if it is
    /// the first valid commit built on `epoch`, refused with the winner otherwise.
    Submit {
        /// The channel.
        channel: ChannelId,
        /// The epoch it is built on.
        epoch: u64,
        /// The commit (MLS PublicMessage), at most [`MAX_MLS_MESSAGE_LEN`] bytes.
        commit: Bytes,
        /// The identity records of the devices it adds, at most [`MAX_DIRS`].
        dirs: Vec<Dir>,
    },
    /// The messages of a relay-less channel its creator kept, from position `from` on, asked
    /// by a member that may have missed some (they went by gossip alone).
    History {
        /// The channel.
        channel: ChannelId,
        /// The first position wanted (0: the oldest kept).
        from: u64,
    },
    /// Where the answering device's blob endpoint (iroh) listens, to fetch a file it sent. Its
    /// endpoint id is its device key, so the connection proves who answers there.
    Blobs,
}

/// The answer to a [`PeerRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum PeerResponse {
    /// The device's identity record (signed by it; sponsored by its relay if it has one).
    Hello {
        /// The record.
        dir: Box<Dir>,
    },
    /// A KeyPackage, at most [`MAX_KEY_PACKAGE_LEN`] bytes.
    KeyPackage(Bytes),
    /// The envelopes were processed (or dropped, as an inbox drops what does not check).
    Delivered,
    /// Commits in epoch order from the epoch asked for; fewer than [`MAX_COMMITS`] means there
    /// are no more now.
    Commits {
        /// At most [`MAX_COMMITS`].
        commits: Vec<OrderedCommit>,
    },
    /// Kept messages of the channel in order, `(position, post)`: the MLS messages as their
    /// senders gossiped them (each authenticated by MLS itself). `next` is where to ask from
    /// next time; fewer than [`MAX_HISTORY`] entries means there are no more now.
    History {
        /// At most [`MAX_HISTORY`].
        entries: Vec<(u64, ChannelPost)>,
        /// The position after the last one kept now.
        next: u64,
    },
    /// The submitted commit won its epoch: the creator's certificate.
    Accepted {
        /// The certificate.
        cert: EpochCert,
    },
    /// Another commit won the epoch submitted for.
    Conflict {
        /// The winner, with its certificate.
        winner: OrderedCommit,
    },
    /// The request was refused or failed.
    Error {
        /// Why, for the program.
        code: ErrorCode,
        /// Why, for a person (at most 1,024 bytes).
        message: String,
    },
    /// Where this device's blob endpoint listens, at most [`MAX_BLOB_ADDRS`] addresses.
    Blobs {
        /// The addresses.
        addrs: Vec<IpPort>,
    },
}

impl Validate for PeerRequest {
    fn validate(&self) -> Result<(), &'static str> {
        match self {
            Self::Deliver { envelopes, dirs } => {
                if envelopes.len() > MAX_DELIVER {
                    return Err("too many envelopes");
                }
                if dirs.len() > MAX_DIRS {
                    return Err("too many identity records");
                }
                envelopes.iter().try_for_each(Envelope::validate)
            }
            Self::Submit { commit, dirs, .. } => {
                if commit.len() > MAX_MLS_MESSAGE_LEN {
                    return Err("commit too long");
                }
                if dirs.len() > MAX_DIRS {
                    return Err("too many identity records");
                }
                Ok(())
            }
            Self::Hello
            | Self::ClaimKeyPackage
            | Self::Commits { .. }
            | Self::History { .. }
            | Self::Blobs => Ok(()),
        }
    }
}

impl Validate for PeerResponse {
    fn validate(&self) -> Result<(), &'static str> {
        match self {
            Self::KeyPackage(kp) if kp.len() > MAX_KEY_PACKAGE_LEN => Err("key package too long"),
            Self::Commits { commits } => {
                if commits.len() > MAX_COMMITS {
                    return Err("too many commits");
                }
                commits.iter().try_for_each(OrderedCommit::validate)
            }
            Self::Conflict { winner } => winner.validate(),
            Self::History { entries, .. } => {
                if entries.len() > MAX_HISTORY {
                    return Err("too many history entries");
                }
                entries.iter().try_for_each(|(_, post)| post.validate())
            }
            Self::Error { message, .. } if message.len() > 1024 => Err("error message too long"),
            Self::Blobs { addrs } if addrs.len() > MAX_BLOB_ADDRS => Err("too many addresses"),
            Self::Hello { dir } => dir.verify_signature().map_err(|_| "bad identity record"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_frame, encode_frame};

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let requests = [
            PeerRequest::Hello,
            PeerRequest::ClaimKeyPackage,
            PeerRequest::Commits { channel: ChannelId([7; 32]), from: 3 },
            PeerRequest::Deliver {
                envelopes: vec![Envelope::Missed { channel: ChannelId([1; 32]), from: 2 }],
                dirs: vec![],
            },
        ];
        for r in requests {
            let frame = encode_frame(&r).expect("fits");
            assert_eq!(decode_frame::<PeerRequest>(&frame).expect("decodes"), r);
        }
        let many = PeerRequest::Deliver {
            envelopes: vec![
                Envelope::Missed { channel: ChannelId([1; 32]), from: 2 };
                MAX_DELIVER + 1
            ],
            dirs: vec![],
        };
        let frame = encode_frame(&many).expect("encodes");
        assert!(decode_frame::<PeerRequest>(&frame).is_err(), "too many envelopes refused");
        let big = PeerResponse::KeyPackage(Bytes(vec![0; MAX_KEY_PACKAGE_LEN + 1]));
        let frame = encode_frame(&big).expect("encodes");
        assert!(decode_frame::<PeerResponse>(&frame).is_err(), "an oversized KeyPackage refused");
        assert!(decode_frame::<PeerRequest>(b"\x01\xff\xff").is_err(), "garbage refused");
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let addr = IpPort::from(addr);
        let many = PeerResponse::Blobs { addrs: vec![addr; MAX_BLOB_ADDRS + 1] };
        let frame = encode_frame(&many).expect("encodes");
        assert!(decode_frame::<PeerResponse>(&frame).is_err(), "too many addresses refused");
        let frame = encode_frame(&PeerRequest::Blobs).expect("encodes");
        assert_eq!(decode_frame::<PeerRequest>(&frame).expect("decodes"), PeerRequest::Blobs);
    }

    #[test]
    fn a_forged_identity_record_is_refused_when_decoded() {
        let key = crate::SecretKey::from_seed([3; 32]);
        let mut dir = Dir::sign(
            &key,
            crate::DirBody {
                device: crate::DeviceId(key.public()),
                seq: 1,
                inbox_key: [0; 32],
                linked: Default::default(),
                sponsorships: vec![],
                profile: Default::default(),
                revoked: false,
                issued: crate::Timestamp(1),
            },
        );
        let good = encode_frame(&PeerResponse::Hello { dir: Box::new(dir.clone()) }).expect("fits");
        assert!(decode_frame::<PeerResponse>(&good).is_ok());
        dir.body.profile.display_name = "mallory".into();
        let forged = encode_frame(&PeerResponse::Hello { dir: Box::new(dir) }).expect("fits");
        assert!(decode_frame::<PeerResponse>(&forged).is_err(), "signature no longer holds");
    }
}
