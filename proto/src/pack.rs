//! Packs: a run of a channel's envelopes under one signed Merkle root.
//!
//! The tree is the one of RFC 6962 (Certificate Transparency) over BLAKE3: a leaf hashes as
//! `H(0x00 || envelope)`, an inner node as `H(0x01 || left || right)`, and a tree of `n` leaves
//! splits at the largest power of two below `n`. The prefixes keep a leaf from ever passing as an
//! inner node. Once a pack's root is signed, the envelopes' own signatures may be dropped: an
//! [`InclusionProof`] shows that one envelope is in a signed pack.

use serde::{Deserialize, Serialize};

use crate::codec::{Canonical, encode};
use crate::keys::{Label, PublicKey, SecretKey, Signature, SignatureError};
use crate::ordering::ChannelId;

/// Most envelopes in one pack.
pub const MAX_PACK_ENVELOPES: usize = 4096;
/// Largest encoded pack, in bytes.
pub const MAX_PACK_LEN: usize = 16 * 1024 * 1024;

/// A BLAKE3 digest in the tree.
pub type Digest = [u8; 32];

/// Why a pack or proof was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// The root's signature did not verify.
    #[error("signature: {0}")]
    Signature(#[from] SignatureError),
    /// The envelopes do not hash to the signed root.
    #[error("envelopes do not match the root")]
    RootMismatch,
    /// Empty, or more than [`MAX_PACK_ENVELOPES`] envelopes.
    #[error("pack must hold 1 to {MAX_PACK_ENVELOPES} envelopes")]
    BadSize,
    /// The proof does not lead from the envelope to the root.
    #[error("inclusion proof does not verify")]
    BadProof,
}

/// The signed head of a pack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PackRootBody {
    /// The channel the envelopes belong to.
    pub channel: ChannelId,
    /// The position of the first envelope in the signer's history of the channel (a relay
    /// numbers the envelopes of each channel it keeps from 0).
    pub first: u64,
    /// How many envelopes.
    pub count: u32,
    /// The Merkle root over them.
    #[serde(with = "serde_bytes")]
    pub root: Digest,
    /// The key that made the pack: a relay's (the history it keeps of a channel it serves),
    /// or a device's.
    pub signer: PublicKey,
}

/// A pack root and its signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PackRoot {
    /// What is signed.
    pub body: PackRootBody,
    /// The signer's signature, under [`Label::PackRoot`].
    pub signature: Signature,
}

impl PackRoot {
    /// Checks the signature of the device named in the body.
    pub fn verify(&self) -> Result<(), PackError> {
        Ok(self.body.signer.verify(Label::PackRoot, &encode(&self.body), &self.signature)?)
    }
}

/// A signed run of envelopes (MLS messages, opaque here).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Pack {
    /// The signed root.
    pub root: PackRoot,
    /// The envelopes, in order.
    pub envelopes: Vec<crate::codec::Bytes>,
}

impl Canonical for Pack {
    const MAX_LEN: usize = MAX_PACK_LEN;
}

impl Pack {
    /// Builds and signs a pack of `envelopes`, the first of which is at position `first`.
    pub fn seal(
        key: &SecretKey,
        channel: ChannelId,
        first: u64,
        envelopes: Vec<Vec<u8>>,
    ) -> Result<Self, PackError> {
        if envelopes.is_empty() || envelopes.len() > MAX_PACK_ENVELOPES {
            return Err(PackError::BadSize);
        }
        let leaves: Vec<Digest> = envelopes.iter().map(|e| leaf_hash(e)).collect();
        let body = PackRootBody {
            channel,
            first,
            count: envelopes.len() as u32,
            root: merkle_root(&leaves),
            signer: key.public(),
        };
        let signature = key.sign(Label::PackRoot, &encode(&body));
        let envelopes = envelopes.into_iter().map(crate::codec::Bytes::from).collect();
        Ok(Self { root: PackRoot { body, signature }, envelopes })
    }

    /// Checks the signature, the count and that the envelopes hash to the root.
    pub fn verify(&self) -> Result<(), PackError> {
        self.root.verify()?;
        let n = self.envelopes.len();
        if n == 0 || n > MAX_PACK_ENVELOPES || n != self.root.body.count as usize {
            return Err(PackError::BadSize);
        }
        let leaves: Vec<Digest> = self.envelopes.iter().map(|e| leaf_hash(e)).collect();
        if merkle_root(&leaves) != self.root.body.root {
            return Err(PackError::RootMismatch);
        }
        Ok(())
    }

    /// The proof that envelope `index` is in this pack.
    pub fn prove(&self, index: usize) -> Option<InclusionProof> {
        if index >= self.envelopes.len() {
            return None;
        }
        let leaves: Vec<Digest> = self.envelopes.iter().map(|e| leaf_hash(e)).collect();
        let mut path = Vec::new();
        audit_path(&leaves, index, &mut path);
        Some(InclusionProof { index: index as u32, path })
    }
}

/// The sibling hashes from one leaf up to the root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct InclusionProof {
    /// The leaf's position.
    pub index: u32,
    /// Siblings, from the leaf upwards.
    pub path: Vec<Digest>,
}

impl Canonical for InclusionProof {
    const MAX_LEN: usize = 8 + 16 * 33;
}

impl InclusionProof {
    /// Checks that `envelope` is leaf `index` of the tree under `root` (whose signature the caller
    /// checked with [`PackRoot::verify`]).
    pub fn verify(&self, root: &PackRootBody, envelope: &[u8]) -> Result<(), PackError> {
        let computed = root_from_path(
            leaf_hash(envelope),
            self.index as usize,
            root.count as usize,
            &self.path,
        )
        .ok_or(PackError::BadProof)?;
        if computed != root.root {
            return Err(PackError::BadProof);
        }
        Ok(())
    }
}

/// `H(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(&[0]);
    h.update(data);
    *h.finalize().as_bytes()
}

fn node_hash(left: &Digest, right: &Digest) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(&[1]);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

/// The largest power of two strictly below `n` (for `n >= 2`).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The root of a tree of leaf hashes (`leaves` not empty).
pub fn merkle_root(leaves: &[Digest]) -> Digest {
    match leaves.len() {
        0 => *blake3::hash(b"").as_bytes(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&merkle_root(&leaves[..k]), &merkle_root(&leaves[k..]))
        }
    }
}

fn audit_path(leaves: &[Digest], index: usize, path: &mut Vec<Digest>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if index < k {
        audit_path(&leaves[..k], index, path);
        path.push(merkle_root(&leaves[k..]));
    } else {
        audit_path(&leaves[k..], index - k, path);
        path.push(merkle_root(&leaves[..k]));
    }
}

fn root_from_path(leaf: Digest, index: usize, n: usize, path: &[Digest]) -> Option<Digest> {
    if index >= n {
        return None;
    }
    if n == 1 {
        return path.is_empty().then_some(leaf);
    }
    let (sibling, rest) = path.split_last()?;
    let k = split(n);
    if index < k {
        Some(node_hash(&root_from_path(leaf, index, k, rest)?, sibling))
    } else {
        Some(node_hash(sibling, &root_from_path(leaf, index - k, n - k, rest)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelopes(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("envelope {i}").into_bytes()).collect()
    }

    #[test]
    fn every_leaf_proves_for_every_size() {
        let key = SecretKey::from_seed([4; 32]);
        for n in [1, 2, 3, 4, 5, 7, 8, 9, 31, 100] {
            let pack = Pack::seal(&key, ChannelId([1; 32]), 0, envelopes(n)).expect("seal");
            pack.verify().expect("verify");
            for i in 0..n {
                let proof = pack.prove(i).expect("proof");
                assert_eq!(
                    proof.verify(&pack.root.body, &pack.envelopes[i]),
                    Ok(()),
                    "n={n} i={i}"
                );
                // The proof does not prove another envelope, nor another position.
                if n > 1 {
                    let other = &pack.envelopes[(i + 1) % n];
                    assert_eq!(proof.verify(&pack.root.body, other), Err(PackError::BadProof));
                    let moved = InclusionProof { index: ((i + 1) % n) as u32, ..proof.clone() };
                    assert_eq!(
                        moved.verify(&pack.root.body, &pack.envelopes[i]),
                        Err(PackError::BadProof)
                    );
                }
            }
            assert!(pack.prove(n).is_none());
        }
    }

    #[test]
    fn tampering_is_detected() {
        let key = SecretKey::from_seed([4; 32]);
        let mut pack = Pack::seal(&key, ChannelId([1; 32]), 0, envelopes(5)).expect("seal");
        pack.envelopes[2] = crate::codec::Bytes::from(b"forged".to_vec());
        assert_eq!(pack.verify(), Err(PackError::RootMismatch));
        let mut pack = Pack::seal(&key, ChannelId([1; 32]), 0, envelopes(5)).expect("seal");
        pack.envelopes.pop();
        assert_eq!(pack.verify(), Err(PackError::BadSize));
        let mut pack = Pack::seal(&key, ChannelId([1; 32]), 0, envelopes(5)).expect("seal");
        pack.root.body.channel = ChannelId([2; 32]);
        assert!(matches!(pack.verify(), Err(PackError::Signature(_))));
        // Moved to another place in the history: the signature covers the position.
        let mut pack = Pack::seal(&key, ChannelId([1; 32]), 10, envelopes(5)).expect("seal");
        pack.root.body.first = 9;
        assert!(matches!(pack.verify(), Err(PackError::Signature(_))));
        assert_eq!(Pack::seal(&key, ChannelId([1; 32]), 0, vec![]), Err(PackError::BadSize));
    }

    #[test]
    fn leaf_cannot_pose_as_node() {
        let a = leaf_hash(b"a");
        let b = leaf_hash(b"b");
        let mut inner = a.to_vec();
        inner.extend_from_slice(&b);
        assert_ne!(merkle_root(&[a, b]), leaf_hash(&inner));
    }
}
