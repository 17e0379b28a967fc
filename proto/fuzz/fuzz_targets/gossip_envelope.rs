#![no_main]

use chitchat_proto::Timestamp;
use chitchat_proto::codec::Canonical as _;
use chitchat_proto::gossip::{GossipEnvelope, topic};

// An envelope from a gossip peer: decodes canonically, and judging it never panics.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    chitchat_proto_fuzz::canonical::<GossipEnvelope>(data);
    if let Ok(e) = GossipEnvelope::from_bytes(data) {
        let t = topic(&e.body.channel);
        let _ = e.judge(&t, Timestamp(e.body.sent.0), |_, epoch| (epoch % 2 == 0).then_some(true));
        let _ = e.id();
    }
});
