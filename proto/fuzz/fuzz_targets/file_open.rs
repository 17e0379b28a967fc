#![no_main]

use chitchat_proto::file::{FileKey, open_to};

// Opening any blob, at any claimed size, fails with a typed error or yields the file; it never
// panics and never allocates more than a chunk.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((size, blob)) = data.split_first_chunk::<4>() else { return };
    let size = u64::from(u32::from_le_bytes(*size) % (4 * 65_536));
    let _ = open_to(&FileKey::from_bytes([7; 32]), size, blob, std::io::sink());
});
