//! Files' blobs pinned here (section 8 of the design): a member's device pushes the sealed blob
//! of a file it is about to send (`PinFile`, then an iroh-blobs push, then `PinFile` again),
//! and the relay keeps it for the channel's members until it expires (`[files] expiry_days`),
//! within a per-user quota and a size limit. The relay cannot open a blob: it holds
//! ciphertext, addressed by its hash.
//!
//! A push is taken only when asked for: `PinFile` records which device may push which hash
//! (for an hour, at most [`MAX_WANTED`] at once), and the blob store's push hook checks the
//! endpoint id the connection proved against it. The pin itself is written (fsync'd) only once
//! the whole blob is here with the length announced, and only then is the device told.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitchat_blobs::{BlobError, Blobs};
use chitchat_proto::{DeviceId, SecretKey};
use iroh_blobs::Hash;

/// Pushes asked for and not yet pinned, at most.
pub const MAX_WANTED: usize = 4096;
/// How long a device may push a blob it asked to pin.
pub const WANTED_FOR: Duration = Duration::from_secs(3600);

/// The relay's blob store and the pushes it waits for.
#[derive(Debug)]
pub struct RelayFiles {
    blobs: Blobs,
    wanted: Arc<Mutex<HashMap<(DeviceId, Hash), Instant>>>,
}

impl RelayFiles {
    /// Opens the store in `dir`, its endpoint under the relay's key, bound to `bind`.
    pub async fn open(
        dir: &Path,
        key: &SecretKey,
        bind: &[std::net::SocketAddr],
    ) -> Result<Self, BlobError> {
        let wanted: Arc<Mutex<HashMap<(DeviceId, Hash), Instant>>> = Arc::default();
        let accept = {
            let wanted = wanted.clone();
            move |pusher: iroh::EndpointId, hash: Hash| {
                let device = DeviceId(chitchat_proto::PublicKey(*pusher.as_bytes()));
                wanted.lock().is_ok_and(|w| {
                    w.get(&(device, hash)).is_some_and(|until| *until > Instant::now())
                })
            }
        };
        let blobs = Blobs::open_accepting(dir, key, bind, accept).await?;
        Ok(Self { blobs, wanted })
    }

    /// The blob store.
    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// Lets `device` push `hash` for the next hour; `false` if too many pushes are waiting.
    pub fn want(&self, device: DeviceId, hash: Hash) -> bool {
        let Ok(mut wanted) = self.wanted.lock() else { return false };
        let now = Instant::now();
        wanted.retain(|_, until| *until > now);
        if wanted.len() >= MAX_WANTED && !wanted.contains_key(&(device, hash)) {
            return false;
        }
        wanted.insert((device, hash), now + WANTED_FOR);
        true
    }

    /// The push of `hash` by `device` is done with (pinned, or refused).
    pub fn done(&self, device: DeviceId, hash: Hash) {
        if let Ok(mut wanted) = self.wanted.lock() {
            wanted.remove(&(device, hash));
        }
    }

    /// Whether any device may still push `hash`.
    pub fn is_wanted(&self, hash: Hash) -> bool {
        let now = Instant::now();
        self.wanted.lock().is_ok_and(|w| w.iter().any(|((_, h), until)| *h == hash && *until > now))
    }
}
