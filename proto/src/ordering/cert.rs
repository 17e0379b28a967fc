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
    /// A majority only with signatures of orderers convicted of equivocation, which no longer
    /// count.
    #[error("{have} of the {need} signatures needed once convicted orderers are left out")]
    Convicted {
        /// Valid signatures of distinct orderers not convicted.
        have: usize,
        /// A majority of all the orderers.
        need: usize,
    },
}

impl EpochCert {
    /// Checks that a majority of `orderers` signed this body. Signatures of others are ignored;
    /// a bad signature by an orderer is an error (it is evidence of tampering).
    pub fn verify(&self, orderers: &[PublicKey]) -> Result<(), CertError> {
        self.verify_excluding(orderers, &[])
    }

    /// Checks as [`EpochCert::verify`] does, but signatures of the `convicted` orderers (caught
    /// equivocating) do not count. The majority needed stays that of all `orderers`: leaving a
    /// convicted relay out never lowers the bar.
    pub fn verify_excluding(
        &self,
        orderers: &[PublicKey],
        convicted: &[PublicKey],
    ) -> Result<(), CertError> {
        if orderers.is_empty() {
            return Err(CertError::NoOrderers);
        }
        if self.signatures.len() > MAX_CERT_SIGNATURES {
            return Err(CertError::TooManySignatures);
        }
        let need = orderers.len() / 2 + 1;
        let mut counted: Vec<PublicKey> = Vec::with_capacity(self.signatures.len());
        let mut left_out = 0;
        for s in &self.signatures {
            if !orderers.contains(&s.signer) || counted.contains(&s.signer) {
                continue;
            }
            s.verify(&self.body).map_err(|_| CertError::BadSignature)?;
            if convicted.contains(&s.signer) {
                left_out += 1;
                continue;
            }
            counted.push(s.signer);
        }
        if counted.len() < need {
            if counted.len() + left_out >= need {
                return Err(CertError::Convicted { have: counted.len(), need });
            }
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
        self.verify_for_excluding(expected, orderers, &[])
    }

    /// [`EpochCert::verify_for`] without the signatures of `convicted` orderers.
    pub fn verify_for_excluding(
        &self,
        expected: &EpochCertBody,
        orderers: &[PublicKey],
        convicted: &[PublicKey],
    ) -> Result<(), CertError> {
        if self.body != *expected {
            return Err(CertError::Mismatch);
        }
        self.verify_excluding(orderers, convicted)
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

impl Equivocation {
    /// Every proof two certificates give: signers with a valid signature in both, when the
    /// certificates name one `(channel, epoch)` and different hashes. Invalid signatures are
    /// skipped (they prove nothing); each signer is convicted once.
    pub fn find(a: &EpochCert, b: &EpochCert) -> Vec<Self> {
        if a.body.channel != b.body.channel
            || a.body.epoch != b.body.epoch
            || a.body.hash == b.body.hash
        {
            return Vec::new();
        }
        let mut proofs: Vec<Self> = Vec::new();
        for sa in a.signatures.iter().take(MAX_CERT_SIGNATURES) {
            if proofs.iter().any(|p| p.first.1.signer == sa.signer) {
                continue;
            }
            let Some(sb) = b
                .signatures
                .iter()
                .take(MAX_CERT_SIGNATURES)
                .find(|sb| sb.signer == sa.signer && sb.verify(&b.body).is_ok())
            else {
                continue;
            };
            if let Some(proof) = Self::from_pair((a.body, *sa), (b.body, *sb)) {
                proofs.push(proof);
            }
        }
        proofs
    }

    /// The `(channel, epoch)` the orderer signed twice.
    pub fn epoch(&self) -> (ChannelId, u64) {
        (self.first.0.channel, self.first.0.epoch)
    }
}
