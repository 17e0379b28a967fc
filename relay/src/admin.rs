//! Operator commands: invite tokens, users, devices, the block list, stats.
//!
//! One set of operations over the [`Store`], used both by the HTTP admin API of a running relay
//! and by the CLI directly on the database when the relay is stopped.

use chitchat_proto::Timestamp;
use rand::RngExt as _;
use serde::{Deserialize, Serialize};

use crate::store::{Stats, Store, StoreError, TokenRecord, Write, WriteError};

/// Most tokens issued by one command.
pub const MAX_TOKENS_PER_INVITE: u32 = 1000;

/// A user and their devices, as listed by `users`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// The local name.
    pub name: String,
    /// Device ids (hex).
    pub devices: Vec<String>,
}

/// A device, as listed by `devices`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device id (hex).
    pub device: String,
    /// Sequence number of its stored record.
    pub seq: u64,
    /// Display name from its record.
    pub display_name: String,
    /// When it registered (ms since the epoch).
    pub registered_ms: u64,
    /// Items waiting in its inbox.
    pub inbox_items: u64,
    /// Unclaimed KeyPackages.
    pub key_packages: u64,
}

/// Why an admin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
}

/// Issues `count` invite tokens valid for `days`.
pub async fn invite(
    store: &Store,
    count: u32,
    days: u64,
    now: Timestamp,
) -> Result<Vec<String>, AdminError> {
    if count == 0 || count > MAX_TOKENS_PER_INVITE {
        return Err(AdminError::Invalid(format!("count must be 1 to {MAX_TOKENS_PER_INVITE}")));
    }
    let expires = now.plus_ms(days.saturating_mul(24 * 3600 * 1000));
    let mut tokens = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let bytes: [u8; 16] = rand::rng().random();
        let token = hex::encode(bytes);
        let record = TokenRecord { created: now, expires, used_by: None };
        store.write(Write::CreateToken { token: token.clone(), record }).await?;
        tokens.push(token);
    }
    Ok(tokens)
}

/// Every user and their devices.
pub fn users(store: &Store) -> Result<Vec<UserInfo>, AdminError> {
    Ok(store
        .users()?
        .into_iter()
        .map(|(name, devices)| UserInfo {
            name,
            devices: devices.iter().map(|d| d.0.to_hex()).collect(),
        })
        .collect())
}

/// The devices of one user.
pub fn devices(store: &Store, name: &str) -> Result<Vec<DeviceInfo>, AdminError> {
    let mut out = Vec::new();
    for dir in store.lookup(name)? {
        let device = dir.device();
        let registered = store.device(&device)?.map_or(0, |r| r.registered.0);
        let c = store.counters(&device)?;
        out.push(DeviceInfo {
            device: device.0.to_hex(),
            seq: dir.body.seq,
            display_name: dir.body.profile.display_name.clone(),
            registered_ms: registered,
            inbox_items: c.inbox_items,
            key_packages: c.key_packages,
        });
    }
    Ok(out)
}

/// Blocks (or unblocks) a relay host.
pub async fn block(
    store: &Store,
    host: &str,
    blocked: bool,
    now: Timestamp,
) -> Result<(), AdminError> {
    chitchat_proto::identity::check_host(host).map_err(|e| AdminError::Invalid(e.to_string()))?;
    store.write(Write::Block { host: host.to_owned(), blocked, now }).await?;
    Ok(())
}

/// Totals.
pub fn stats(store: &Store) -> Result<Stats, AdminError> {
    Ok(store.stats()?)
}
