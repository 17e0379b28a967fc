//! Epoch reports: how members find out that they do not share one history.
//!
//! Certificates stop one relay from forking a channel of several relays, but not a channel
//! whose only orderer is that relay, nor a Welcome that puts a new member into another state
//! than the commit that added it. So after every epoch a member tells the others which commit
//! took it there (with its certificate) and a digest of the epoch's MLS `epoch_authenticator`.
//! A report is signed by the member's device and travels outside MLS (a forked member could
//! not decrypt it otherwise); the digest reveals nothing of the key schedule.
//!
//! Comparing a report with what this member recorded for the same epoch gives [`Finding`]s:
//! an [`Equivocation`] when an orderer signed both commits, a fork when the commits or the
//! states differ.

use serde::{Deserialize, Serialize};

use super::{ChannelId, CommitHash, EpochCert, Equivocation, MAX_CERT_SIGNATURES};
use crate::codec::{Canonical, encode};
use crate::identity::DeviceId;
use crate::keys::{Label, SecretKey, Signature};

/// The BLAKE3 key-derivation context of [`epoch_digest`].
const DIGEST_CONTEXT: &str = "chitchat/v1 epoch authenticator digest";

/// A digest of an epoch's MLS `epoch_authenticator`, bound to the channel and epoch: equal for
/// members in one state, and of no use to anyone else.
pub fn epoch_digest(channel: &ChannelId, epoch: u64, authenticator: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(DIGEST_CONTEXT);
    hasher.update(&channel.0);
    hasher.update(&epoch.to_be_bytes());
    hasher.update(authenticator);
    *hasher.finalize().as_bytes()
}

/// Members that report an epoch, in expectation, in a channel larger than that (all do in a
/// smaller one): reports cost one inbox item per member each, so a channel of `n` members
/// gets about `16 n` per epoch instead of `n²`.
pub const REPORTERS_PER_EPOCH: usize = 16;

/// Whether `device` reports `epoch` of `channel`, which has `members` members: always in a
/// channel of at most [`REPORTERS_PER_EPOCH`] members; otherwise a draw from a hash of the
/// three, so that about [`REPORTERS_PER_EPOCH`] members report each epoch, a different sample
/// each epoch, which no relay chooses.
pub fn reports_epoch(channel: &ChannelId, epoch: u64, device: &DeviceId, members: usize) -> bool {
    if members <= REPORTERS_PER_EPOCH {
        return true;
    }
    let mut hasher = blake3::Hasher::new_derive_key("chitchat/v1 epoch reporters");
    hasher.update(&channel.0);
    hasher.update(&epoch.to_be_bytes());
    hasher.update(device.as_bytes());
    let mut draw = [0u8; 8];
    draw.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    let threshold = u64::MAX / members as u64 * REPORTERS_PER_EPOCH as u64;
    u64::from_be_bytes(draw) < threshold
}

/// What a member reached: an epoch, the certified commit that led to it, and its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct EpochReportBody {
    /// The channel.
    pub channel: ChannelId,
    /// The epoch reached.
    pub epoch: u64,
    /// [`epoch_digest`] of the epoch's authenticator.
    #[serde(with = "serde_bytes")]
    pub digest: [u8; 32],
    /// The certificate of the commit that ended epoch `epoch - 1`; `None` for an epoch the
    /// member joined by Welcome.
    pub cert: Option<EpochCert>,
    /// The reporting device, whose key signs.
    pub device: DeviceId,
}

/// A member's signed [`EpochReportBody`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct EpochReport {
    /// What it reports.
    pub body: EpochReportBody,
    /// The device's signature under [`Label::EpochReport`].
    pub signature: Signature,
}

impl Canonical for EpochReport {
    const MAX_LEN: usize = EpochCert::MAX_LEN + 256;
}

/// Why a report is not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// The device's signature does not verify.
    #[error("bad signature on the epoch report")]
    BadSignature,
    /// The certificate is of another channel, or of an epoch that does not lead to the one
    /// reported, or carries too many signatures.
    #[error("the certificate does not lead to the reported epoch")]
    CertMismatch,
}

impl EpochReport {
    /// Signs a report with the reporting device's key (`body.device` is set from it).
    pub fn sign(key: &SecretKey, mut body: EpochReportBody) -> Self {
        body.device = DeviceId(key.public());
        let signature = key.sign(Label::EpochReport, &encode(&body));
        Self { body, signature }
    }

    /// Checks the signature and that the certificate (not its signatures: see
    /// [`compare`]) belongs to the reported epoch.
    pub fn verify(&self) -> Result<(), ReportError> {
        if let Some(cert) = &self.body.cert
            && (cert.body.channel != self.body.channel
                || cert.body.epoch.checked_add(1) != Some(self.body.epoch)
                || cert.signatures.len() > MAX_CERT_SIGNATURES)
        {
            return Err(ReportError::CertMismatch);
        }
        self.body
            .device
            .0
            .verify(Label::EpochReport, &encode(&self.body), &self.signature)
            .map_err(|_| ReportError::BadSignature)
    }
}

/// What this member recorded about an epoch it reached (kept for the last epochs of each
/// channel, to compare with others' reports and with late commits).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// [`epoch_digest`] of the epoch's authenticator.
    #[serde(with = "serde_bytes")]
    pub digest: [u8; 32],
    /// The certificate of the commit that led to the epoch, when this member applied one.
    pub cert: Option<EpochCert>,
}

impl Canonical for EpochRecord {
    const MAX_LEN: usize = EpochCert::MAX_LEN + 64;
}

/// How two members' histories part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForkKind {
    /// Different commits, each certified, ended the same epoch.
    OtherCommit {
        /// The commit this member applied.
        ours: CommitHash,
        /// The commit the other member applied.
        theirs: CommitHash,
    },
    /// The same commit (or a Welcome) led to different states: a Welcome that does not match
    /// the commit, or a bug.
    OtherState,
}

/// What comparing a report with this member's record found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// An orderer signed both commits: the proof convicts it.
    Equivocation(Equivocation),
    /// The reporting member is in another state of the epoch.
    Fork {
        /// The channel.
        channel: ChannelId,
        /// The epoch.
        epoch: u64,
        /// The member whose report differs.
        device: DeviceId,
        /// How.
        kind: ForkKind,
    },
}

/// Compares a verified report with this member's record of the same epoch.
pub fn compare(own: &EpochRecord, report: &EpochReportBody) -> Vec<Finding> {
    let mut findings = Vec::new();
    let fork = |kind| Finding::Fork {
        channel: report.channel,
        epoch: report.epoch,
        device: report.device,
        kind,
    };
    if let (Some(ours), Some(theirs)) = (&own.cert, &report.cert)
        && ours.body.hash != theirs.body.hash
    {
        findings.extend(Equivocation::find(ours, theirs).into_iter().map(Finding::Equivocation));
        findings
            .push(fork(ForkKind::OtherCommit { ours: ours.body.hash, theirs: theirs.body.hash }));
        return findings;
    }
    if own.digest != report.digest {
        findings.push(fork(ForkKind::OtherState));
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ordering::{CertSignature, EpochCertBody};

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn cert(signers: &[u8], hash: u8) -> EpochCert {
        let body =
            EpochCertBody { channel: ChannelId([7; 32]), epoch: 4, hash: CommitHash([hash; 32]) };
        EpochCert {
            body,
            signatures: signers.iter().map(|s| CertSignature::sign(&key(*s), &body)).collect(),
        }
    }

    fn report(cert: Option<EpochCert>, digest: u8) -> EpochReport {
        EpochReport::sign(
            &key(9),
            EpochReportBody {
                channel: ChannelId([7; 32]),
                epoch: 5,
                digest: [digest; 32],
                cert,
                device: DeviceId(key(1).public()),
            },
        )
    }

    #[test]
    fn a_signer_of_both_hashes_is_convicted_and_no_one_else() {
        let own = EpochRecord { digest: [1; 32], cert: Some(cert(&[1, 2], 0xaa)) };
        let theirs = report(Some(cert(&[1, 3], 0xbb)), 2);
        theirs.verify().expect("valid report");
        let findings = compare(&own, &theirs.body);
        let convicted: Vec<_> = findings
            .iter()
            .filter_map(|f| match f {
                Finding::Equivocation(p) => Some(p.verify().expect("proof holds")),
                Finding::Fork { .. } => None,
            })
            .collect();
        assert_eq!(convicted, vec![key(1).public()]);
        assert!(findings.iter().any(|f| matches!(
            f,
            Finding::Fork { kind: ForkKind::OtherCommit { .. }, epoch: 5, .. }
        )));
    }

    #[test]
    fn every_member_of_a_small_channel_reports_and_about_sixteen_of_a_large_one() {
        let device = |n: u32| {
            let mut seed = [9u8; 32];
            seed[..4].copy_from_slice(&n.to_be_bytes());
            DeviceId(SecretKey::from_seed(seed).public())
        };
        let ch = ChannelId([7; 32]);
        assert!((0..16).all(|n| reports_epoch(&ch, 3, &device(n), 16)));
        let members: Vec<DeviceId> = (0..1000).map(device).collect();
        let mut total = 0;
        for epoch in 0..50 {
            let reporters = members.iter().filter(|d| reports_epoch(&ch, epoch, d, 1000)).count();
            assert!((2..=40).contains(&reporters), "epoch {epoch}: {reporters} reporters");
            total += reporters;
        }
        // 16 a epoch on average (800 over 50 epochs), within a wide margin.
        assert!((600..=1000).contains(&total), "{total}");
    }

    #[test]
    fn a_forged_signature_convicts_no_one() {
        let mut theirs = cert(&[1], 0xbb);
        theirs.signatures[0].signature = cert(&[1], 0xcc).signatures[0].signature;
        assert!(Equivocation::find(&cert(&[1], 0xaa), &theirs).is_empty());
    }

    #[test]
    fn same_commit_other_state_is_a_fork_and_same_state_is_nothing() {
        let own = EpochRecord { digest: [1; 32], cert: Some(cert(&[1], 0xaa)) };
        assert!(compare(&own, &report(Some(cert(&[1], 0xaa)), 1).body).is_empty());
        assert!(compare(&own, &report(None, 1).body).is_empty());
        let findings = compare(&own, &report(None, 2).body);
        assert!(matches!(findings[..], [Finding::Fork { kind: ForkKind::OtherState, .. }]));
    }

    #[test]
    fn a_tampered_report_or_a_cert_of_another_epoch_is_refused() {
        let mut r = report(None, 1);
        r.body.digest = [3; 32];
        assert_eq!(r.verify(), Err(ReportError::BadSignature));
        let mut c = cert(&[1], 0xaa);
        c.body.epoch = 9;
        assert_eq!(report(Some(c), 1).verify(), Err(ReportError::CertMismatch));
    }

    #[test]
    fn convicted_signatures_do_not_count_toward_a_majority() {
        let orderers: Vec<_> = [1, 2, 3].iter().map(|n| key(*n).public()).collect();
        let c = cert(&[1, 2], 0xaa);
        c.verify(&orderers).expect("two of three");
        assert_eq!(
            c.verify_excluding(&orderers, &[key(1).public()]),
            Err(crate::ordering::CertError::Convicted { have: 1, need: 2 })
        );
        cert(&[1, 2, 3], 0xaa)
            .verify_excluding(&orderers, &[key(1).public()])
            .expect("two honest of three");
    }
}
