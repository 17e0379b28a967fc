//! Which message ids a channel has already shown, with bounded memory.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::MessageId;
use crate::identity::DeviceId;

/// Ids above a sender's contiguous mark that are remembered individually. As many as the
/// generations a member reads late ([`super::OUT_OF_ORDER_TOLERANCE`]): a message later than
/// that could not be decrypted anyway, and a gap (a lost message, or a generation skipped
/// after a crash) costs every commit of the channel state at most this many ids.
pub(crate) const MAX_GAPS_PER_SENDER: usize = super::OUT_OF_ORDER_TOLERANCE as usize;
/// Senders remembered.
pub(crate) const MAX_SENDERS: usize = 65_536;

/// Per sender: every seq below `floor` was seen; `above` holds seen seqs at or above it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
struct SenderSeen {
    floor: u64,
    above: BTreeSet<u64>,
}

/// Seen message ids. A sender's ids compact into a floor as they arrive in order; when too many
/// arrive out of order, the floor jumps forward, and an id below it counts as seen (a very old
/// message that shows up late is then dropped, never shown twice).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub(crate) struct SeenIds {
    senders: BTreeMap<DeviceId, SenderSeen>,
}

impl SeenIds {
    pub(crate) fn contains(&self, id: &MessageId) -> bool {
        self.senders.get(&id.sender).is_some_and(|s| id.seq < s.floor || s.above.contains(&id.seq))
    }

    pub(crate) fn insert(&mut self, id: MessageId) {
        if !self.senders.contains_key(&id.sender) && self.senders.len() >= MAX_SENDERS {
            // Forget the sender with the lowest floor: its messages are the oldest.
            let victim = self.senders.iter().min_by_key(|(_, s)| s.floor).map(|(d, _)| *d);
            if let Some(d) = victim {
                self.senders.remove(&d);
            }
        }
        let s = self.senders.entry(id.sender).or_default();
        if id.seq < s.floor {
            return;
        }
        s.above.insert(id.seq);
        // Sequence numbers come from the network: the floor saturates rather than overflow
        // (a sender at u64::MAX has nothing left to send).
        while s.floor < u64::MAX && s.above.remove(&s.floor) {
            s.floor += 1;
        }
        while s.above.len() > MAX_GAPS_PER_SENDER {
            if let Some(lowest) = s.above.pop_first() {
                s.floor = lowest.saturating_add(1);
            }
            while s.floor < u64::MAX && s.above.remove(&s.floor) {
                s.floor += 1;
            }
        }
        debug_assert!(s.above.iter().all(|q| *q >= s.floor));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    #[test]
    fn compacts_and_bounds() {
        let d = DeviceId(SecretKey::from_seed([1; 32]).public());
        let id = |seq| MessageId { sender: d, seq };
        let mut s = SeenIds::default();
        for q in [0, 2, 1, 5] {
            s.insert(id(q));
        }
        assert!(s.contains(&id(0)) && s.contains(&id(1)) && s.contains(&id(2)));
        assert!(!s.contains(&id(3)) && s.contains(&id(5)));
        assert_eq!(s.senders[&d].floor, 3);
        for q in (10..10 + 2 * MAX_GAPS_PER_SENDER as u64).step_by(2) {
            s.insert(id(q));
        }
        assert!(s.senders[&d].above.len() <= MAX_GAPS_PER_SENDER);
        // Everything inserted is still reported as seen.
        assert!(s.contains(&id(10)) && s.contains(&id(5)));
    }

    #[test]
    fn crafted_sequence_numbers_do_not_overflow() {
        let d = DeviceId(SecretKey::from_seed([2; 32]).public());
        let mut s = SeenIds::default();
        for seq in [u64::MAX, u64::MAX - 1, 0, u64::MAX - 2] {
            s.insert(MessageId { sender: d, seq });
        }
        for q in 0..2 * MAX_GAPS_PER_SENDER as u64 {
            s.insert(MessageId { sender: d, seq: u64::MAX - 300 - 2 * q });
        }
        assert!(s.contains(&MessageId { sender: d, seq: u64::MAX }));
        assert!(s.contains(&MessageId { sender: d, seq: 0 }));
    }
}
