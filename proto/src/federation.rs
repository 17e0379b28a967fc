//! What relays say to each other (DESIGN sections 4 and 7): frames on a libp2p protocol of their
//! own, [`FEDERATION_PROTOCOL`], beside the device protocol.
//!
//! A relay is named by its host and known by its key, which is also its libp2p identity: Noise
//! authenticates the peer's key, and the host's `.well-known` says which key the host has. So
//! every request names the host it comes from ([`FedRequest::from`]), and the answering relay
//! checks, once per connection, that this host publishes the key of the peer that asks. A
//! relay never acts for a device of its own on another relay's word: what crosses is look-ups
//! (public records), KeyPackage claims (under the answering relay's limits) and sealed
//! payloads for the answering relay's own devices.

use serde::{Deserialize, Serialize};

use crate::identity::{DeviceId, Dir};
use crate::inbox::SealedEnvelope;
use crate::wire::{ErrorCode, MAX_DIRS, MAX_KEY_PACKAGE_LEN, MAX_LOOKUP_DEVICES, Validate};

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
}

/// One forwarded payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Forwarded {
    /// Its number in the sender relay's queue for this relay: the id that makes forwarding
    /// idempotent.
    pub seq: u64,
    /// The device that sent it (authenticated by the sender relay).
    pub sender: DeviceId,
    /// The payload; it names its recipient.
    pub envelope: SealedEnvelope,
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
    /// The request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
    },
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
        }
    }
}

impl Validate for FedResponse {
    fn validate(&self) -> Result<(), &'static str> {
        match self {
            Self::Dirs(d) if d.len() > MAX_DIRS => Err("too many records"),
            Self::KeyPackage(kp) if kp.len() > MAX_KEY_PACKAGE_LEN => Err("key package too long"),
            Self::Forwarded(r) if r.len() > MAX_FORWARD_BATCH => Err("too many results"),
            _ => Ok(()),
        }
    }
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
}
