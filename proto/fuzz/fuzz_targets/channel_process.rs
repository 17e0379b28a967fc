#![no_main]

use chitchat_proto::channel::{AdminPolicy, Channel, ChannelConfig, ChannelMessage, CredentialCheck, Identity};
use chitchat_proto::codec::Canonical;
use chitchat_proto::ordering::ChannelId;
use chitchat_proto::{DeviceId, SecretKey, Timestamp};
use openmls_rust_crypto::OpenMlsRustCrypto;

struct RejectAll;

impl CredentialCheck for RejectAll {
    fn check(&self, _: DeviceId) -> Result<(), String> {
        Err("fuzzing".into())
    }

    fn check_orderers(&self, _: &ChannelConfig) -> Result<(), String> {
        Err("fuzzing".into())
    }

    fn check_relay(&self, _: &chitchat_proto::RelayId) -> Result<(), String> {
        Err("fuzzing".into())
    }
}

// Any message fed to a live channel is processed or rejected with a typed error; never a panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(message) = ChannelMessage::from_bytes(data) else { return };
    let provider = OpenMlsRustCrypto::default();
    let key = SecretKey::from_seed([1; 32]);
    let me = Identity::new(&key);
    let config = ChannelConfig {
        mime: "application/octet-stream".into(),
        name: "fuzz".into(),
        relays: vec![],
        admins: AdminPolicy::AnyMember,
        creator: me.device(),
    };
    let Ok(mut channel) = Channel::create(&provider, &me, ChannelId([0; 32]), config) else { return };
    let _ = channel.process(&provider, Timestamp(0), message, &RejectAll);
});
