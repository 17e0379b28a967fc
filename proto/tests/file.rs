//! Property tests for file encryption (`chitchat_proto::file`): any file round-trips; any
//! change to its blob (a byte flipped, chunks swapped, cut anywhere, bytes added, another key,
//! another size) is refused with a typed error, and nothing but a prefix of the true file is
//! ever written before the error.

use chitchat_proto::file::{
    CHUNK_LEN, FileError, FileKey, Opener, SEALED_CHUNK_LEN, chunks, open_to, seal_to, sealed_len,
};
use proptest::prelude::*;

/// Files of 0 to a little over 3 chunks (sizes near the chunk edges are likelier).
fn file() -> impl Strategy<Value = Vec<u8>> {
    let edge = prop_oneof![
        Just(0usize),
        Just(CHUNK_LEN),
        Just(2 * CHUNK_LEN),
        (CHUNK_LEN - 2..CHUNK_LEN + 2),
        (0..3 * CHUNK_LEN + 100),
    ];
    (edge, any::<u8>()).prop_map(|(len, seed)| (0..len).map(|i| (i as u8) ^ seed).collect())
}

fn sealed(key: &FileKey, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    seal_to(key, data, &mut out).expect("seal");
    out
}

/// Opens `blob` as a file of `size`: the error, and what was written before it.
fn open(key: &FileKey, size: u64, blob: &[u8]) -> (Result<(), FileError>, Vec<u8>) {
    let mut out = Vec::new();
    let r = open_to(key, size, blob, &mut out);
    (r, out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_file_round_trips(data in file(), k in any::<[u8; 32]>()) {
        let key = FileKey::from_bytes(k);
        let blob = sealed(&key, &data);
        prop_assert_eq!(blob.len() as u64, sealed_len(data.len() as u64));
        let (r, out) = open(&key, data.len() as u64, &blob);
        prop_assert!(r.is_ok(), "{:?}", r);
        prop_assert_eq!(out, data);
    }

    #[test]
    fn a_flipped_byte_is_refused(data in file(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let key = FileKey::from_bytes([1; 32]);
        let mut blob = sealed(&key, &data);
        let i = at.index(blob.len());
        blob[i] ^= 1 << bit;
        let (r, out) = open(&key, data.len() as u64, &blob);
        prop_assert!(matches!(r, Err(FileError::Corrupt(c)) if c == (i / SEALED_CHUNK_LEN) as u64), "{:?}", r);
        prop_assert!(data.starts_with(&out), "only the checked start of the file is written");
    }

    #[test]
    fn a_cut_or_extended_blob_is_refused(data in file(), at in any::<prop::sample::Index>(), extra in 1usize..40) {
        let key = FileKey::from_bytes([2; 32]);
        let blob = sealed(&key, &data);
        let cut = at.index(blob.len());
        let (r, out) = open(&key, data.len() as u64, &blob[..cut]);
        prop_assert!(matches!(r, Err(FileError::Truncated(_))), "{:?}", r);
        prop_assert!(data.starts_with(&out));
        let mut longer = blob.clone();
        longer.extend(std::iter::repeat_n(0u8, extra));
        let (r, _) = open(&key, data.len() as u64, &longer);
        prop_assert!(matches!(r, Err(FileError::TrailingData)), "{:?}", r);
    }

    #[test]
    fn another_key_or_size_is_refused(data in file(), delta in 1u64..(2 * CHUNK_LEN as u64)) {
        let key = FileKey::from_bytes([3; 32]);
        let blob = sealed(&key, &data);
        let (r, out) = open(&FileKey::from_bytes([4; 32]), data.len() as u64, &blob);
        prop_assert!(matches!(r, Err(FileError::Corrupt(0))), "{:?}", r);
        prop_assert!(out.is_empty());
        // A size claimed larger or smaller than the file's: the blob's length or its last
        // chunk's flag gives it away.
        for size in [data.len() as u64 + delta, (data.len() as u64).saturating_sub(delta)] {
            if size == data.len() as u64 {
                continue;
            }
            let (r, out) = open(&key, size, &blob);
            prop_assert!(r.is_err(), "size {} accepted for a file of {}", size, data.len());
            prop_assert!(data.starts_with(&out));
        }
    }

    #[test]
    fn chunks_open_alone_but_only_in_their_place(data in file()) {
        let key = FileKey::from_bytes([5; 32]);
        let blob = sealed(&key, &data);
        let size = data.len() as u64;
        let opener = Opener::new(&key, size).expect("opener");
        let pieces: Vec<&[u8]> = blob.chunks(SEALED_CHUNK_LEN).collect();
        prop_assert_eq!(pieces.len() as u64, chunks(size));
        // Any chunk alone, last first (range reads).
        for (i, piece) in pieces.iter().enumerate().rev() {
            let plain = opener.open(i as u64, piece).expect("opens in its place");
            prop_assert_eq!(&plain[..], &data[i * CHUNK_LEN..(i * CHUNK_LEN + plain.len())]);
        }
        // Two chunks swapped: each is refused in the other's place.
        if pieces.len() >= 3 {
            prop_assert!(opener.open(0, pieces[1]).is_err());
            prop_assert!(opener.open(1, pieces[0]).is_err());
        }
    }
}
