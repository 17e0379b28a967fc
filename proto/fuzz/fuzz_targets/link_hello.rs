#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chitchat_proto_fuzz::canonical::<chitchat_proto::link::LinkHello>(data));
