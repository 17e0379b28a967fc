#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chitchat_proto_fuzz::frame::<chitchat_proto::peer::PeerRequest>(data));
