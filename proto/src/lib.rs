//! ChitChat protocol core.
//!
//! Everything both ends of the protocol must agree on lives here, and nothing else: identity
//! records and their signatures ([`identity`], [`keys`]), the wire frames of the relay protocol
//! ([`wire`]) and of relays among themselves ([`federation`]) and of nodes among themselves ([`peer`]), sealing to a device's inbox ([`inbox`]), MLS channels over openmls ([`channel`]),
//! the epoch-ordering state machine and its certificates ([`ordering`]), message packs
//! ([`pack`]), hybrid logical clocks ([`hlc`]) and the `text/chitchat` content types ([`chat`]).
//!
//! # Architecture invariants
//!
//! - This crate does no I/O: no sockets, no files, no async runtime.
//! - It never reads the clock or the operating system's randomness itself. Time is passed in as
//!   [`Timestamp`]s and randomness as `rand_core` generators or seeds. (openmls draws its own
//!   randomness from the `OpenMlsProvider` that the caller hands in.)
//! - Every decoder takes bytes from the network or the disk and returns a typed error; none
//!   panics on any input, and every accepted encoding is canonical ([`codec`]).

pub mod channel;
pub mod chat;
pub mod codec;
pub mod federation;
pub mod file;
pub mod gossip;
pub mod hlc;
pub mod identity;
pub mod inbox;
pub mod keys;
pub mod link;
pub mod ordering;
pub mod pack;
pub mod peer;
pub mod wire;

pub use codec::DecodeError;
pub use identity::{Address, DeviceId, Dir, DirBody, RelayId, Sponsorship};
pub use keys::{Label, PublicKey, SecretKey, Signature};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as the caller's clock reads it.
///
/// The protocol core never reads a clock; every function that needs the time takes one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The time `ms` milliseconds later, saturating.
    pub fn plus_ms(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }
}

/// How far a signed timestamp may lie in the future before it is rejected, in milliseconds.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
