#![no_main]

// A link code's text: read or refused without a panic; what is read writes back the same.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(code) = chitchat_proto::link::LinkCode::parse(text) {
        assert_eq!(chitchat_proto::link::LinkCode::parse(&code.to_string()), Ok(code));
    }
});
