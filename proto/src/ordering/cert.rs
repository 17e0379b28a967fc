//! Epoch certificates and equivocation proofs.

use serde::{Deserialize, Serialize};

use super::{ChannelId, CommitHash};
use crate::codec::{Canonical, encode};
use crate::keys::{Label, PublicKey, SecretKey, Signature, SignatureError};

/// Most signatures one certificate may carry.
pub const MAX_CERT_SIGNATURES: usize = 64;

/// What an orderer signs: this hash won this epoch of this channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct EpochCertBody {
    /// The channel.
    pub channel: ChannelId,
    /// The epoch the commit was built on.
    pub epoch: u64,
    /// The winning commit.
    pub hash: CommitHash,
}

/// One orderer's signature on an [`EpochCertBody`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct CertSignature {
    /// The orderer (a relay's key, or the creator device's key for a relay-less channel).
    pub signer: PublicKey,
    /// Its signature under [`Label::EpochCert`].
    pub signature: Signature,
}

impl CertSignature {
    /// Signs `body` with an orderer's key.
    ///
    /// An orderer must never sign two hashes for one `(channel, epoch)`; the relay signs only
    /// after its replicated state accepted the hash, which never happens twice.
    pub fn sign(key: &SecretKey, body: &EpochCertBody) -> Self {
        Self { signer: key.public(), signature: key.sign(Label::EpochCert, &encode(body)) }
    }

    /// Checks the signature over `body`.
    pub fn verify(&self, body: &EpochCertBody) -> Result<(), SignatureError> {
        self.signer.verify(Label::EpochCert, &encode(body), &self.signature)
    }
}

/// A commit's certificate: signatures of a majority of the orderers of epoch `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct EpochCert {
    /// What was certified.
    pub body: EpochCertBody,
    /// The orderers' signatures.
    pub signatures: Vec<CertSignature>,
}

impl Canonical for EpochCert {
    const MAX_LEN: usize = 128 + MAX_CERT_SIGNATURES * 110;
}

/// Why a certificate does not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// Fewer valid signatures of distinct orderers than a majority.
    #[error("{have} of the {need} signatures needed")]
    NoQuorum {
        /// Valid signatures of distinct orderers.
        have: usize,
        /// A majority of the orderers.
        need: usize,
    },
    /// An orderer's signature did not verify.
    #[error("bad signature by an orderer")]
    BadSignature,
    /// The certificate is for another channel, epoch or commit than expected.
    #[error("certificate is for another commit")]
    Mismatch,
    /// There are no orderers to check against.
    #[error("no orderers")]
    NoOrderers,
    /// More signatures than any certificate needs.
    #[error("too many signatures")]
    TooManySignatures,
}

impl EpochCert {
    /// Checks that a majority of `orderers` signed this body. Signatures of others are ignored;
    /// a bad signature by an orderer is an error (it is evidence of tampering).
    pub fn verify(&self, orderers: &[PublicKey]) -> Result<(), CertError> {
        if orderers.is_empty() {
            return Err(CertError::NoOrderers);
        }
        if self.signatures.len() > MAX_CERT_SIGNATURES {
            return Err(CertError::TooManySignatures);
        }
        let need = orderers.len() / 2 + 1;
        let mut counted: Vec<PublicKey> = Vec::with_capacity(self.signatures.len());
        for s in &self.signatures {
            if !orderers.contains(&s.signer) || counted.contains(&s.signer) {
                continue;
            }
            s.verify(&self.body).map_err(|_| CertError::BadSignature)?;
            counted.push(s.signer);
        }
        if counted.len() < need {
            return Err(CertError::NoQuorum { have: counted.len(), need });
        }
        Ok(())
    }

    /// Checks the certificate as [`EpochCert::verify`] does, and that it is for exactly this
    /// channel, epoch and hash.
    pub fn verify_for(
        &self,
        expected: &EpochCertBody,
        orderers: &[PublicKey],
    ) -> Result<(), CertError> {
        if self.body != *expected {
            return Err(CertError::Mismatch);
        }
        self.verify(orderers)
    }
}

/// Proof that an orderer signed two different hashes for one `(channel, epoch)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Equivocation {
    /// One signed body.
    pub first: (EpochCertBody, CertSignature),
    /// Another signed body of the same signer, channel and epoch, with another hash.
    pub second: (EpochCertBody, CertSignature),
}

impl Canonical for Equivocation {
    const MAX_LEN: usize = 512;
}

impl Equivocation {
    /// Builds a proof from two signatures, if they do prove equivocation.
    pub fn from_pair(
        first: (EpochCertBody, CertSignature),
        second: (EpochCertBody, CertSignature),
    ) -> Option<Self> {
        let proof = Self { first, second };
        proof.verify().ok().map(|_| proof)
    }

    /// The orderer it convicts, if the proof holds.
    pub fn verify(&self) -> Result<PublicKey, CertError> {
        let (a, sa) = &self.first;
        let (b, sb) = &self.second;
        if sa.signer != sb.signer
            || a.channel != b.channel
            || a.epoch != b.epoch
            || a.hash == b.hash
        {
            return Err(CertError::Mismatch);
        }
        sa.verify(a).map_err(|_| CertError::BadSignature)?;
        sb.verify(b).map_err(|_| CertError::BadSignature)?;
        Ok(sa.signer)
    }
}
