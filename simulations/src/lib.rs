//! Seeded simulations of the ChitChat protocol cores.
//!
//! [`channel::run`] drives one MLS channel (real openmls, through `chitchat-proto`) ordered by
//! one relay's [`chitchat_proto::ordering::OrderingState`], with many members committing
//! concurrently, membership churn, reordered and replayed deliveries, and checks after every
//! round that all members agree (same epoch authenticator) and every message was shown exactly
//! once. The schedule (who commits what, in which order, which deliveries are reordered or
//! replayed) comes from the seed, so a failing run is reproduced by its seed. (MLS key material
//! comes from openmls' own randomness and differs between runs; it never changes the schedule.)
//!
//! [`federation::run`] drives many relays ordering many channels in Raft groups (the
//! `Orderer` per replica, a modelled Raft log, the relay protocol) with real MLS members, on a
//! virtual clock with latency, loss, partitions and crashes, channels moving between relay
//! sets; it checks one winner and one certified hash per epoch, acknowledged commits kept and
//! convergence after the faults heal, and hashes its trace (one seed, one trace).
//!
//! [`gossip::run`] models gossipsub on one channel's topic (mesh, flood publish, lazy IHAVE /
//! IWANT repair, spam rejected at the first hop) with up to tens of thousands of members, on a
//! virtual clock with latency and loss, and measures delivery latency, duplicates and sends.

pub mod channel;
pub mod federation;
pub mod gossip;
