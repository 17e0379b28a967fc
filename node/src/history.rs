//! Filling what the inbox missed from the relay's history of a channel.
//!
//! A relay keeps each channel's posts and commits in order (its history) and marks every inbox
//! item with its position there; an item that follows entries the inbox did not get (it was
//! full, or they expired unread) says from which position ([`HistoryMark::missed_from`]). The
//! node then fetches that run ([`Request::History`]) before it processes the item, so that the
//! missed messages are read in the order of their epochs, and checks every answer here: a pack
//! signed by its relay's key, of the channel asked for, starting where it was asked (or later,
//! where the relay no longer keeps the start), holding only that channel's posts and commits.
//! What the entries say is then checked like anything else that arrives (MLS, membership).

use chitchat_proto::PublicKey;
use chitchat_proto::codec::Canonical as _;
use chitchat_proto::ordering::ChannelId;
use chitchat_proto::pack::{Pack, PackError};
use chitchat_proto::wire::{Envelope, HistoryMark, InboxItem};

/// Entries fetched for one gap, at most: a longer gap is filled from its last entries (the
/// earlier ones could not be read anyway: their epochs' keys are gone by then).
pub const MAX_FILL: u64 = 10_000;

/// Why a history answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// The pack's root or envelopes do not verify.
    #[error("pack: {0}")]
    Pack(#[from] PackError),
    /// The pack is signed by another key than the relay's.
    #[error("pack signed by {0}, not by the relay")]
    Signer(PublicKey),
    /// The pack is of another channel.
    #[error("pack of another channel")]
    Channel,
    /// The pack starts before the position asked for, or after the oldest the relay says it
    /// keeps.
    #[error("pack starts at {got}, asked from {asked} (relay keeps from {first})")]
    Position {
        /// Where it starts.
        got: u64,
        /// Where it was asked from.
        asked: u64,
        /// The oldest position the relay says it keeps.
        first: u64,
    },
    /// An entry is no post or commit of the channel.
    #[error("entry {0} is not a post or commit of the channel")]
    Entry(u64),
}

/// The run of history an inbox item asks for before it: `(channel, from, to)`, `to` being
/// the item's own position (excluded), or `None` for a notice of missed entries
/// ([`Envelope::Missed`]: up to the end of the history); or `None`.
pub fn gap(item: &InboxItem) -> Option<(ChannelId, u64, Option<u64>)> {
    let (channel, from, seq) = match (&item.envelope, item.history) {
        (Envelope::Missed { channel, from }, _) => return Some((*channel, *from, None)),
        (Envelope::Post(p), Some(HistoryMark { seq, missed_from: Some(from) })) => {
            (p.channel, from, seq)
        }
        (Envelope::Commit(c), Some(HistoryMark { seq, missed_from: Some(from) })) => {
            (c.channel, from, seq)
        }
        _ => return None,
    };
    (from < seq).then(|| (channel, from.max(seq.saturating_sub(MAX_FILL)), Some(seq)))
}

/// Checks the answer to a history request for `channel` from position `asked`, whose relay
/// (key `relay`) keeps positions from `first`: returns each entry with its position.
pub fn check(
    relay: &PublicKey,
    channel: &ChannelId,
    asked: u64,
    first: u64,
    pack: &Pack,
) -> Result<Vec<(u64, Envelope)>, HistoryError> {
    let body = &pack.root.body;
    if body.signer != *relay {
        return Err(HistoryError::Signer(body.signer));
    }
    if body.channel != *channel {
        return Err(HistoryError::Channel);
    }
    // From where it was asked, or from the oldest kept if that is later; nothing else.
    if body.first != asked.max(first) {
        return Err(HistoryError::Position { got: body.first, asked, first });
    }
    pack.verify()?;
    pack.envelopes
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let seq = body.first.saturating_add(i as u64);
            let envelope = Envelope::from_bytes(bytes).map_err(|_| HistoryError::Entry(seq))?;
            let of_channel = match &envelope {
                Envelope::Post(p) => p.channel == *channel,
                Envelope::Commit(c) => c.channel == *channel,
                Envelope::Sealed(_) | Envelope::Report(_) | Envelope::Missed { .. } => false,
            };
            if !of_channel {
                return Err(HistoryError::Entry(seq));
            }
            Ok((seq, envelope))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use chitchat_proto::SecretKey;
    use chitchat_proto::codec::encode;
    use chitchat_proto::wire::ChannelPost;

    use super::*;

    const CHANNEL: ChannelId = ChannelId([4; 32]);

    fn post(n: u8, channel: ChannelId) -> Vec<u8> {
        encode(&Envelope::Post(ChannelPost { channel, message: vec![n; 8] }))
    }

    fn relay() -> SecretKey {
        SecretKey::from_seed([9; 32])
    }

    fn pack(key: &SecretKey, first: u64, envelopes: Vec<Vec<u8>>) -> Pack {
        Pack::seal(key, CHANNEL, first, envelopes).expect("seal")
    }

    #[test]
    fn a_pack_of_the_relay_from_the_position_asked_is_taken() {
        let p = pack(&relay(), 5, vec![post(1, CHANNEL), post(2, CHANNEL)]);
        let got = check(&relay().public(), &CHANNEL, 5, 0, &p).expect("taken");
        assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [5, 6]);
        // Asked from 2 while the relay keeps from 5 on: it starts at 5.
        check(&relay().public(), &CHANNEL, 2, 5, &p).expect("the rest of what was asked");
    }

    /// Every way a relay (or whoever stands in its place) could lie is refused.
    #[test]
    fn a_forged_moved_or_foreign_pack_is_refused() {
        let me = relay().public();
        let other = SecretKey::from_seed([8; 32]);
        let p = pack(&other, 5, vec![post(1, CHANNEL)]);
        assert_eq!(check(&me, &CHANNEL, 5, 0, &p), Err(HistoryError::Signer(other.public())));
        let p = pack(&relay(), 5, vec![post(1, CHANNEL)]);
        assert_eq!(check(&me, &ChannelId([3; 32]), 5, 0, &p), Err(HistoryError::Channel));
        // Later than asked (entries skipped) or earlier than asked.
        assert!(matches!(check(&me, &CHANNEL, 4, 0, &p), Err(HistoryError::Position { .. })));
        assert!(matches!(check(&me, &CHANNEL, 6, 0, &p), Err(HistoryError::Position { .. })));
        // An entry swapped after signing.
        let mut p = pack(&relay(), 5, vec![post(1, CHANNEL), post(2, CHANNEL)]);
        p.envelopes[1] = post(3, CHANNEL).into();
        assert_eq!(
            check(&me, &CHANNEL, 5, 0, &p),
            Err(HistoryError::Pack(PackError::RootMismatch))
        );
        // Signed, but another channel's post, or garbage, inside.
        let p = pack(&relay(), 5, vec![post(1, CHANNEL), post(2, ChannelId([3; 32]))]);
        assert_eq!(check(&me, &CHANNEL, 5, 0, &p), Err(HistoryError::Entry(6)));
        let p = pack(&relay(), 5, vec![vec![0xff; 3]]);
        assert_eq!(check(&me, &CHANNEL, 5, 0, &p), Err(HistoryError::Entry(5)));
    }

    #[test]
    fn only_an_item_that_missed_entries_asks_for_them() {
        let item = |history| InboxItem {
            id: 1,
            envelope: Envelope::Post(ChannelPost { channel: CHANNEL, message: vec![1] }),
            history,
        };
        assert_eq!(gap(&item(None)), None);
        assert_eq!(gap(&item(Some(HistoryMark { seq: 9, missed_from: None }))), None);
        let missed = item(Some(HistoryMark { seq: 9, missed_from: Some(4) }));
        assert_eq!(gap(&missed), Some((CHANNEL, 4, Some(9))));
        let far = item(Some(HistoryMark { seq: MAX_FILL + 50, missed_from: Some(0) }));
        assert_eq!(gap(&far), Some((CHANNEL, 50, Some(MAX_FILL + 50))), "the last entries only");
        let notice = InboxItem {
            id: 2,
            envelope: Envelope::Missed { channel: CHANNEL, from: 3 },
            history: None,
        };
        assert_eq!(gap(&notice), Some((CHANNEL, 3, None)), "to the end of the history");
        // A mark that points forward is nonsense: nothing to fetch.
        assert_eq!(gap(&item(Some(HistoryMark { seq: 9, missed_from: Some(9) }))), None);
    }
}
