#![no_main]

// A recovery code's text: read or refused without a panic; what is read writes back to a code
// that reads as the same secret.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    use chitchat_proto::identity::RecoverySecret;
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(secret) = RecoverySecret::parse(text) {
        assert_eq!(RecoverySecret::parse(&secret.code().to_string()), Ok(secret));
    }
});
