//! A test device: its keys and identity records.

use chitchat_proto::identity::{DirBody, Profile};
use chitchat_proto::inbox::InboxSecret;
use chitchat_proto::ordering::ChannelId;
use chitchat_proto::{DeviceId, Dir, SecretKey, Sponsorship, Timestamp};

/// A device's keys.
#[derive(Debug)]
pub struct Device {
    /// Its identity key.
    pub key: SecretKey,
    /// Its inbox key.
    pub inbox: InboxSecret,
}

impl Device {
    /// A device whose keys derive from `n`.
    pub fn new(n: u8) -> Self {
        Self { key: SecretKey::from_seed([n; 32]), inbox: InboxSecret::from_seed(&[n ^ 0x55; 32]) }
    }

    /// A device whose keys derive from `n` (for tests with more than 256 devices).
    pub fn numbered(n: u32) -> Self {
        let mut seed = [0xA5; 32];
        seed[..4].copy_from_slice(&n.to_be_bytes());
        let mut inbox = seed;
        inbox[31] = 0x5A;
        Self { key: SecretKey::from_seed(seed), inbox: InboxSecret::from_seed(&inbox) }
    }

    /// Its id.
    pub fn id(&self) -> DeviceId {
        DeviceId(self.key.public())
    }

    /// The id of this device's channel number `n` (a channel's id names its creator).
    pub fn channel(&self, n: u8) -> ChannelId {
        ChannelId::of_creator(&self.id(), [n; 16])
    }

    /// Its identity record with sequence number `seq` and these sponsorships.
    pub fn dir(&self, seq: u64, sponsorships: Vec<Sponsorship>, now: Timestamp) -> Dir {
        Dir::sign(
            &self.key,
            DirBody {
                device: self.id(),
                seq,
                inbox_key: self.inbox.public(),
                linked: Default::default(),
                sponsorships,
                profile: Profile {
                    display_name: format!("device {}", &self.id().0.to_hex()[..6]),
                    avatar: None,
                },
                revoked: false,
                issued: now,
            },
        )
    }
}
