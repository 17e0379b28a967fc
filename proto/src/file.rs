//! File encryption: what travels as a file's blob (section 8 of the design).
//!
//! A file is sealed under a fresh single-use [`FileKey`] with the STREAM construction
//! (Hoang, Reyhanitabar, Rogaway, Vizár: `aead::stream::StreamBE32`) over ChaCha20-Poly1305:
//! the plaintext is cut into chunks of [`CHUNK_LEN`] bytes (the last one shorter, possibly
//! empty), and chunk `i` is sealed under the nonce `(0⁵⁶, i as u32 big-endian, last)`. Each
//! chunk's tag therefore binds its position and whether it ends the file: chunks swapped,
//! dropped, repeated or cut off, or a blob cut at a chunk boundary, fail to open. The key is
//! never used twice, so the nonce prefix carries nothing.
//!
//! The blob is the sealed chunks back to back, [`sealed_len`] bytes for a file of `size`;
//! iroh-blobs addresses it by its BLAKE3 hash. The chat message that carries the file
//! ([`crate::chat::FileRef`]) names the hash, the key and the plaintext size, so a receiver knows
//! every chunk's place and length before it reads one, and can open any chunk on its own (range
//! reads: [`Opener::open`]).
//!
//! Sans-IO: [`Sealer`] and [`Opener`] work on chunks; [`seal_to`] and [`open_to`] stream a whole
//! file between a reader and a writer, a chunk in memory at a time.

use std::io::{Read, Write};

use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::KeyInit as _;
use chacha20poly1305::aead::stream::{NewStream as _, StreamBE32, StreamPrimitive as _};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Plaintext bytes per chunk (the last chunk holds what is left: 0 to `CHUNK_LEN`).
pub const CHUNK_LEN: usize = 64 * 1024;
/// The authentication tag each chunk adds.
pub const TAG_LEN: usize = 16;
/// A full chunk, sealed.
pub const SEALED_CHUNK_LEN: usize = CHUNK_LEN + TAG_LEN;
/// The largest file: STREAM's counter is 32 bits.
pub const MAX_FILE_LEN: u64 = u32::MAX as u64 * CHUNK_LEN as u64;

/// A file's single-use key.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct FileKey([u8; 32]);

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileKey(..)")
    }
}

impl FileKey {
    /// A fresh key.
    pub fn generate(rng: &mut impl rand_core::CryptoRng) -> Self {
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        Self(key)
    }

    /// The key a [`crate::chat::FileRef`] carries.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key's bytes, for a [`crate::chat::FileRef`].
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    fn stream(&self) -> StreamBE32<ChaCha20Poly1305> {
        let aead = ChaCha20Poly1305::new((&self.0).into());
        StreamBE32::from_aead(aead, &Default::default())
    }
}

/// Why a blob does not open (or a file cannot be sealed).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A chunk's tag does not hold: corrupted, moved, or cut, or the wrong key.
    #[error("chunk {0} of the file does not open (corrupted, reordered or truncated)")]
    Corrupt(u64),
    /// The blob ends before the file does.
    #[error("the blob ends before the file does (at byte {0})")]
    Truncated(u64),
    /// The blob goes on after the file's last chunk.
    #[error("the blob is longer than the file")]
    TrailingData,
    /// A chunk of the wrong length for its place, or past the file's end.
    #[error("chunk {index} has {len} bytes; its place in the file holds {expected}")]
    ChunkLen {
        /// The chunk.
        index: u64,
        /// Its length.
        len: usize,
        /// The length its place needs.
        expected: usize,
    },
    /// Sealing went on after the last chunk, or the file is larger than [`MAX_FILE_LEN`].
    #[error("the file is too large or was sealed past its end")]
    TooLarge,
    /// Reading or writing failed.
    #[error("file I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Chunks in a file of `size` bytes (at least one: an empty file is one empty final chunk).
pub fn chunks(size: u64) -> u64 {
    size.div_ceil(CHUNK_LEN as u64).max(1)
}

/// The blob's length for a file of `size` bytes.
pub fn sealed_len(size: u64) -> u64 {
    size.saturating_add(chunks(size).saturating_mul(TAG_LEN as u64))
}

/// Plaintext bytes of chunk `index` of a file of `size` bytes (`None` past its end).
pub fn chunk_len(size: u64, index: u64) -> Option<usize> {
    let n = chunks(size);
    if index >= n {
        return None;
    }
    if index + 1 < n {
        return Some(CHUNK_LEN);
    }
    // The last chunk: what is left (a full chunk when the size is a multiple of it, but for 0).
    Some((size - index * CHUNK_LEN as u64) as usize)
}

/// Seals a file chunk by chunk, in order.
pub struct Sealer {
    stream: StreamBE32<ChaCha20Poly1305>,
    next: u32,
    done: bool,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("next", &self.next).field("done", &self.done).finish()
    }
}

impl Sealer {
    /// Starts sealing a file under `key`.
    pub fn new(key: &FileKey) -> Self {
        Self { stream: key.stream(), next: 0, done: false }
    }

    /// Seals the next chunk: [`CHUNK_LEN`] bytes, or fewer for the `last` one (which ends the
    /// file; nothing is sealed after it).
    pub fn seal(&mut self, chunk: &[u8], last: bool) -> Result<Vec<u8>, FileError> {
        if self.done {
            return Err(FileError::TooLarge);
        }
        if chunk.len() > CHUNK_LEN || (!last && chunk.len() != CHUNK_LEN) {
            let expected = CHUNK_LEN;
            return Err(FileError::ChunkLen {
                index: self.next.into(),
                len: chunk.len(),
                expected,
            });
        }
        if !last && self.next == u32::MAX {
            return Err(FileError::TooLarge);
        }
        let sealed = self
            .stream
            .encrypt(self.next, last, chunk)
            .map_err(|_| FileError::Corrupt(self.next.into()))?;
        self.done = last;
        self.next = self.next.wrapping_add(1);
        Ok(sealed)
    }
}

/// Opens the chunks of a file of known size, in any order (each on its own).
pub struct Opener {
    stream: StreamBE32<ChaCha20Poly1305>,
    size: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").field("size", &self.size).finish()
    }
}

impl Opener {
    /// Opens a file of `size` plaintext bytes (as its [`crate::chat::FileRef`] says) sealed
    /// under `key`.
    pub fn new(key: &FileKey, size: u64) -> Result<Self, FileError> {
        if size > MAX_FILE_LEN {
            return Err(FileError::TooLarge);
        }
        Ok(Self { stream: key.stream(), size })
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Opens chunk `index`, which must have the length its place holds (sealed).
    pub fn open(&self, index: u64, sealed: &[u8]) -> Result<Vec<u8>, FileError> {
        let Some(plain) = chunk_len(self.size, index) else {
            return Err(FileError::ChunkLen { index, len: sealed.len(), expected: 0 });
        };
        let expected = plain + TAG_LEN;
        if sealed.len() != expected {
            return Err(FileError::ChunkLen { index, len: sealed.len(), expected });
        }
        let position = u32::try_from(index).map_err(|_| FileError::TooLarge)?;
        let last = index + 1 == chunks(self.size);
        self.stream.decrypt(position, last, sealed).map_err(|_| FileError::Corrupt(index))
    }
}

/// Reads until `buf` is full or the reader ends; the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Seals everything `reader` gives into `writer`, a chunk at a time (two chunks in memory: the
/// next one is read before a chunk is sealed, to know whether it is the last). Returns the
/// file's size.
pub fn seal_to(
    key: &FileKey,
    mut reader: impl Read,
    mut writer: impl Write,
) -> Result<u64, FileError> {
    let mut sealer = Sealer::new(key);
    let mut current = vec![0u8; CHUNK_LEN];
    let mut next = vec![0u8; CHUNK_LEN];
    let mut len = read_full(&mut reader, &mut current)?;
    let mut size: u64 = 0;
    loop {
        // A full chunk may be the last: only the next read tells.
        let next_len = if len == CHUNK_LEN { read_full(&mut reader, &mut next)? } else { 0 };
        let last = next_len == 0;
        size = size.checked_add(len as u64).ok_or(FileError::TooLarge)?;
        if size > MAX_FILE_LEN {
            return Err(FileError::TooLarge);
        }
        writer.write_all(&sealer.seal(&current[..len], last)?)?;
        if last {
            writer.flush()?;
            return Ok(size);
        }
        std::mem::swap(&mut current, &mut next);
        len = next_len;
    }
}

/// Opens a blob read from `reader` (a file of `size` bytes under `key`) into `writer`, a chunk
/// at a time. Fails on the first chunk that does not open, on a blob that ends early or goes
/// on after the file; what was written before the failure is the file's start, checked.
pub fn open_to(
    key: &FileKey,
    size: u64,
    mut reader: impl Read,
    mut writer: impl Write,
) -> Result<(), FileError> {
    let opener = Opener::new(key, size)?;
    let mut buf = vec![0u8; SEALED_CHUNK_LEN];
    let mut offset: u64 = 0;
    for index in 0..chunks(size) {
        let want = chunk_len(size, index).unwrap_or(0) + TAG_LEN;
        let got = read_full(&mut reader, &mut buf[..want])?;
        offset += got as u64;
        if got < want {
            return Err(FileError::Truncated(offset));
        }
        writer.write_all(&opener.open(index, &buf[..want])?)?;
    }
    if read_full(&mut reader, &mut buf[..1])? != 0 {
        return Err(FileError::TrailingData);
    }
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> FileKey {
        FileKey::from_bytes([n; 32])
    }

    fn seal(key: &FileKey, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        assert_eq!(seal_to(key, data, &mut out).expect("seal"), data.len() as u64);
        out
    }

    #[test]
    fn sizes_round_trip_at_the_chunk_edges() {
        for size in
            [0, 1, CHUNK_LEN - 1, CHUNK_LEN, CHUNK_LEN + 1, 3 * CHUNK_LEN, 3 * CHUNK_LEN + 7]
        {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let sealed = seal(&key(1), &data);
            assert_eq!(sealed.len() as u64, sealed_len(size as u64), "size {size}");
            let mut out = Vec::new();
            open_to(&key(1), size as u64, &sealed[..], &mut out).expect("opens");
            assert_eq!(out, data, "size {size}");
        }
    }

    #[test]
    fn the_last_chunk_is_bound_to_the_end() {
        // Two full chunks: cutting the second off leaves a blob that looks like a one-chunk
        // file of CHUNK_LEN bytes, but its chunk was not sealed as the last.
        let data = vec![7u8; 2 * CHUNK_LEN];
        let sealed = seal(&key(2), &data);
        let cut = &sealed[..SEALED_CHUNK_LEN];
        let e = open_to(&key(2), CHUNK_LEN as u64, cut, std::io::sink()).expect_err("cut");
        assert!(matches!(e, FileError::Corrupt(0)), "{e:?}");
        let e = open_to(&key(2), 2 * CHUNK_LEN as u64, cut, std::io::sink()).expect_err("short");
        assert!(matches!(e, FileError::Truncated(_)), "{e:?}");
    }

    #[test]
    fn a_sealer_stops_at_the_last_chunk() {
        let mut s = Sealer::new(&key(3));
        assert!(s.seal(&[1; 10], false).is_err(), "a short chunk that is not the last");
        s.seal(&[1; 10], true).expect("last");
        assert!(matches!(s.seal(&[], true), Err(FileError::TooLarge)), "nothing after the last");
    }

    #[test]
    fn the_key_is_not_printed() {
        assert_eq!(format!("{:?}", key(9)), "FileKey(..)");
    }
}
