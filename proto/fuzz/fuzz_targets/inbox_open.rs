#![no_main]

use chitchat_proto::DeviceId;
use chitchat_proto::codec::Canonical;
use chitchat_proto::inbox::{InboxSecret, SealedEnvelope};

// Opening any envelope fails cleanly or yields bytes; it never panics.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let secret = InboxSecret::from_seed(&[7; 32]);
    if let Ok(envelope) = SealedEnvelope::from_bytes(data) {
        let me = envelope.recipient;
        let _ = secret.open(me, &envelope);
        let _ = secret.open(DeviceId(chitchat_proto::SecretKey::from_seed([1; 32]).public()), &envelope);
    }
});
