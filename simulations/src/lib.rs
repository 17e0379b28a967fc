//! Seeded simulations of the ChitChat protocol cores.
//!
//! [`channel::run`] drives one MLS channel (real openmls, through `chitchat-proto`) ordered by
//! one relay's [`chitchat_proto::ordering::OrderingState`], with many members committing
//! concurrently, membership churn, reordered and replayed deliveries, and checks after every
//! round that all members agree (same epoch authenticator) and every message was shown exactly
//! once. The schedule (who commits what, in which order, which deliveries are reordered or
//! replayed) comes from the seed, so a failing run is reproduced by its seed. (MLS key material
//! comes from openmls' own randomness and differs between runs; it never changes the schedule.)

pub mod channel;
pub mod federation;
