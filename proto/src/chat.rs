//! The chat application: content of channels whose MIME type is [`MIME`] (`text/chitchat`).
//!
//! A channel carries bytes; for chat those bytes are a canonical [`ChatContent`]. [`ChatLog`]
//! folds a channel's messages into what a chat view shows, with these rules:
//! - an edit or delete references the target's [`MessageId`]; only the original sender's edits
//!   and deletes count;
//! - the latest valid edit wins (by the edit's `(hlc, id)` order), whatever order they arrive in;
//! - a delete leaves a tombstone (the id stays, the body goes) and beats every edit;
//! - reactions are a set of `(device, emoji)` per message;
//! - read receipts keep the latest read message per device; typing is never stored.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::channel::{MessageId, UserId};
use crate::codec::Canonical;
use crate::hlc::Hlc;

/// The MIME type of chat channels.
pub const MIME: &str = "text/chitchat";
/// Longest text body, in bytes.
pub const MAX_TEXT_LEN: usize = 64 * 1024;
/// Longest reaction, in bytes (an emoji sequence).
pub const MAX_REACTION_LEN: usize = 64;
/// Largest inline thumbnail, in bytes.
pub const MAX_THUMBNAIL_LEN: usize = 8 * 1024;
/// Longest file name and MIME type of an attachment, in bytes.
pub const MAX_FILE_NAME_LEN: usize = 255;
/// Messages kept by a [`ChatLog`] before the oldest are dropped from memory.
pub const MAX_LOG_MESSAGES: usize = 100_000;

/// A reference to an encrypted file blob (see DESIGN section 8).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FileRef {
    /// BLAKE3 hash of the encrypted blob.
    #[serde(with = "serde_bytes")]
    pub hash: [u8; 32],
    /// The blob's single-use key.
    #[serde(with = "serde_bytes")]
    pub key: [u8; 32],
    /// Plaintext size in bytes.
    pub size: u64,
    /// The file's MIME type.
    pub mime: String,
    /// The file name.
    pub name: String,
    /// A small thumbnail, inline.
    pub thumbnail: Option<crate::codec::Bytes>,
}

/// One chat payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum ChatContent {
    /// A text message (markdown).
    Text {
        /// The body.
        body: String,
    },
    /// A text message answering another.
    Reply {
        /// The message answered.
        to: MessageId,
        /// The body.
        body: String,
    },
    /// A new body for one of the sender's earlier messages.
    Edit {
        /// The edited message.
        target: MessageId,
        /// The new body.
        body: String,
    },
    /// Deletes one of the sender's messages, leaving a tombstone.
    Delete {
        /// The deleted message.
        target: MessageId,
    },
    /// Adds or removes a reaction.
    Reaction {
        /// The message reacted to.
        target: MessageId,
        /// The emoji.
        emoji: String,
        /// `true` removes the sender's earlier reaction.
        remove: bool,
    },
    /// A file.
    Attachment {
        /// The blob reference.
        file: FileRef,
        /// Optional caption.
        caption: Option<String>,
    },
    /// The sender has read everything up to this message.
    ReadReceipt {
        /// The latest message read.
        up_to: MessageId,
    },
    /// The sender is typing (or stopped). Never stored.
    Typing {
        /// Whether typing is ongoing.
        active: bool,
    },
    /// Asks the members for the file of one of the channel's messages again: its pins at the
    /// relays expired and its sender's device is away. A member whose device holds the file
    /// whole pins it at its relay again. Not shown in the timeline.
    FileRequest {
        /// The message that carries the file.
        target: MessageId,
    },
}

impl Canonical for ChatContent {
    const MAX_LEN: usize = MAX_TEXT_LEN + MAX_THUMBNAIL_LEN + 1024;
}

impl ChatContent {
    /// Checks the content's limits.
    pub fn validate(&self) -> Result<(), &'static str> {
        let text_ok = |s: &str| s.len() <= MAX_TEXT_LEN;
        match self {
            Self::Text { body } | Self::Reply { body, .. } | Self::Edit { body, .. }
                if !text_ok(body) =>
            {
                Err("text too long")
            }
            Self::Reaction { emoji, .. } if emoji.is_empty() || emoji.len() > MAX_REACTION_LEN => {
                Err("bad reaction")
            }
            Self::Attachment { file, caption } => {
                if file.thumbnail.as_ref().is_some_and(|t| t.len() > MAX_THUMBNAIL_LEN) {
                    return Err("thumbnail too large");
                }
                if file.size > crate::file::MAX_FILE_LEN {
                    return Err("file too large");
                }
                // A name is shown and may become a file name: no path in it.
                let bad_name = |c: char| c == '/' || c == '\\' || c.is_control();
                if file.name.is_empty()
                    || file.name.len() > MAX_FILE_NAME_LEN
                    || file.name.contains(bad_name)
                    || file.name == "."
                    || file.name == ".."
                {
                    return Err("bad file name");
                }
                if file.mime.len() > MAX_FILE_NAME_LEN || file.mime.contains(char::is_control) {
                    return Err("bad MIME type");
                }
                if caption.as_deref().is_some_and(|c| !text_ok(c)) {
                    return Err("caption too long");
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// What a chat view shows of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// Its id.
    pub id: MessageId,
    /// Its sender's clock.
    pub hlc: Hlc,
    /// The message answered, if it is a reply.
    pub reply_to: Option<MessageId>,
    /// Current body; `None` once deleted (a tombstone).
    pub body: Option<String>,
    /// The attachment, if any (cleared by a delete).
    pub attachment: Option<FileRef>,
    /// `(hlc, id)` of the edit in force, if edited.
    pub edited: Option<(Hlc, MessageId)>,
    /// Whether it was deleted.
    pub deleted: bool,
    /// Reactions: emoji to the users that reacted with it.
    pub reactions: BTreeMap<String, BTreeSet<UserId>>,
    /// Its author: the user of the device that sent it. Only the author edits or deletes it.
    pub author: UserId,
}

/// What applying one message did, for events and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A new message is shown.
    New,
    /// A message's body changed.
    Edited,
    /// A message became a tombstone.
    Deleted,
    /// Reactions changed.
    Reacted,
    /// A receipt was recorded.
    Receipt,
    /// Typing notice, not stored.
    Typing,
    /// A request for a file again: acted on by the node, not shown.
    Request,
    /// Ignored: an edit or delete by someone other than the sender, an older edit, or an
    /// already seen message.
    Ignored,
    /// Held until its target arrives.
    Pending,
}

/// The folded state of a chat channel.
#[derive(Clone, Debug, Default)]
pub struct ChatLog {
    messages: BTreeMap<MessageId, ChatMessage>,
    /// Edits, deletes and reactions whose target has not arrived yet, by target.
    pending: BTreeMap<MessageId, Vec<(MessageId, UserId, Hlc, ChatContent)>>,
    pending_len: usize,
    /// Per user: the receipt in force, as `(receipt's hlc, receipt's id, message read)`.
    receipts: BTreeMap<UserId, (Hlc, MessageId, MessageId)>,
}

/// Most early edits, deletes and reactions held for targets not seen yet.
pub const MAX_PENDING: usize = 10_000;

impl ChatLog {
    /// Applies message `id` with clock `hlc`, its sending device taken as its own user.
    pub fn apply(&mut self, id: MessageId, hlc: Hlc, content: ChatContent) -> Applied {
        self.apply_by(id, UserId::Device(id.sender), hlc, content)
    }

    /// Applies message `id` with clock `hlc`, sent by a device of `author`: edits, deletes,
    /// reactions and receipts belong to the user, whichever of its devices sent them.
    pub fn apply_by(
        &mut self,
        id: MessageId,
        author: UserId,
        hlc: Hlc,
        content: ChatContent,
    ) -> Applied {
        match content {
            ChatContent::Text { body } => self.insert(id, author, hlc, None, Some(body), None),
            ChatContent::Reply { to, body } => {
                self.insert(id, author, hlc, Some(to), Some(body), None)
            }
            ChatContent::Attachment { file, caption } => {
                self.insert(id, author, hlc, None, caption, Some(file))
            }
            ChatContent::Edit { target, .. }
            | ChatContent::Delete { target }
            | ChatContent::Reaction { target, .. } => {
                let Some(msg) = self.messages.get_mut(&target) else {
                    if self.pending_len >= MAX_PENDING {
                        return Applied::Ignored;
                    }
                    self.pending.entry(target).or_default().push((id, author, hlc, content));
                    self.pending_len += 1;
                    return Applied::Pending;
                };
                modify(msg, id, author, hlc, content)
            }
            ChatContent::ReadReceipt { up_to } => {
                // The user's latest receipt (by its devices' clocks) wins.
                let newer = self.receipts.get(&author).is_none_or(|(h, i, _)| (hlc, id) > (*h, *i));
                if !newer {
                    return Applied::Ignored;
                }
                self.receipts.insert(author, (hlc, id, up_to));
                Applied::Receipt
            }
            ChatContent::Typing { .. } => Applied::Typing,
            ChatContent::FileRequest { .. } => Applied::Request,
        }
    }

    /// A message, if shown.
    pub fn message(&self, id: &MessageId) -> Option<&ChatMessage> {
        self.messages.get(id)
    }

    /// All shown messages, sorted by `(hlc, id)`.
    pub fn timeline(&self) -> Vec<&ChatMessage> {
        let mut v: Vec<&ChatMessage> = self.messages.values().collect();
        v.sort_by_key(|m| (m.hlc, m.id));
        v
    }

    /// The latest message each user said it has read.
    pub fn receipts(&self) -> BTreeMap<UserId, MessageId> {
        self.receipts.iter().map(|(u, (_, _, read))| (u.clone(), *read)).collect()
    }

    fn insert(
        &mut self,
        id: MessageId,
        author: UserId,
        hlc: Hlc,
        reply_to: Option<MessageId>,
        body: Option<String>,
        attachment: Option<FileRef>,
    ) -> Applied {
        if self.messages.contains_key(&id) {
            return Applied::Ignored;
        }
        if self.messages.len() >= MAX_LOG_MESSAGES {
            let oldest = self.messages.iter().min_by_key(|(_, m)| (m.hlc, m.id)).map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.messages.remove(&k);
            }
        }
        let mut msg = ChatMessage {
            id,
            hlc,
            reply_to,
            body,
            attachment,
            edited: None,
            deleted: false,
            reactions: BTreeMap::new(),
            author,
        };
        if let Some(early) = self.pending.remove(&id) {
            self.pending_len -= early.len();
            for (mid, mauthor, mhlc, content) in early {
                modify(&mut msg, mid, mauthor, mhlc, content);
            }
        }
        self.messages.insert(id, msg);
        Applied::New
    }
}

fn modify(
    msg: &mut ChatMessage,
    id: MessageId,
    author: UserId,
    hlc: Hlc,
    content: ChatContent,
) -> Applied {
    match content {
        ChatContent::Edit { body, .. } => {
            if author != msg.author || msg.deleted {
                return Applied::Ignored;
            }
            if msg.edited.is_some_and(|current| current >= (hlc, id)) {
                return Applied::Ignored;
            }
            msg.edited = Some((hlc, id));
            msg.body = Some(body);
            Applied::Edited
        }
        ChatContent::Delete { .. } => {
            if author != msg.author {
                return Applied::Ignored;
            }
            msg.deleted = true;
            msg.body = None;
            msg.attachment = None;
            msg.reactions.clear();
            Applied::Deleted
        }
        ChatContent::Reaction { emoji, remove, .. } => {
            if msg.deleted {
                return Applied::Ignored;
            }
            if remove {
                if let Some(set) = msg.reactions.get_mut(&emoji) {
                    set.remove(&author);
                    if set.is_empty() {
                        msg.reactions.remove(&emoji);
                    }
                }
            } else {
                msg.reactions.entry(emoji).or_default().insert(author);
            }
            Applied::Reacted
        }
        _ => Applied::Ignored,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::DeviceId;
    use crate::keys::SecretKey;

    fn dev(n: u8) -> DeviceId {
        DeviceId(SecretKey::from_seed([n; 32]).public())
    }
    fn id(n: u8, seq: u64) -> MessageId {
        MessageId { sender: dev(n), seq }
    }
    fn t(ms: u64) -> Hlc {
        Hlc { wall_ms: ms, counter: 0 }
    }
    fn text(s: &str) -> ChatContent {
        ChatContent::Text { body: s.into() }
    }

    /// An attachment's limits: thumbnail, size, a name that is no path, a MIME type.
    #[test]
    fn an_attachment_is_checked() {
        let file = FileRef {
            hash: [1; 32],
            key: [2; 32],
            size: 10,
            mime: "image/png".into(),
            name: "cat.png".into(),
            thumbnail: Some(crate::codec::Bytes(vec![0; MAX_THUMBNAIL_LEN])),
        };
        let with = |f: FileRef| ChatContent::Attachment { file: f, caption: None }.validate();
        assert!(with(file.clone()).is_ok());
        let big = Some(crate::codec::Bytes(vec![0; MAX_THUMBNAIL_LEN + 1]));
        assert!(with(FileRef { thumbnail: big, ..file.clone() }).is_err(), "thumbnail");
        let size = crate::file::MAX_FILE_LEN + 1;
        assert!(with(FileRef { size, ..file.clone() }).is_err(), "size");
        for name in ["", ".", "..", "../etc/passwd", "a/b", "a\\b", "a\nb", &"x".repeat(256)] {
            let bad = FileRef { name: name.into(), ..file.clone() };
            assert!(with(bad).is_err(), "name {name:?}");
        }
        assert!(with(FileRef { mime: "a\0b".into(), ..file }).is_err(), "mime");
    }

    #[test]
    fn latest_edit_by_sender_wins_in_any_order() {
        let m = id(1, 1);
        let e1 = (id(1, 2), t(20), ChatContent::Edit { target: m, body: "v2".into() });
        let e2 = (id(1, 3), t(30), ChatContent::Edit { target: m, body: "v3".into() });
        let forged = (id(2, 1), t(40), ChatContent::Edit { target: m, body: "evil".into() });
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2]] {
            let mut log = ChatLog::default();
            // The original may even arrive after its edits.
            let edits = [e1.clone(), e2.clone(), forged.clone()];
            for i in order {
                let (eid, h, c) = edits[i].clone();
                log.apply(eid, h, c);
            }
            log.apply(m, t(10), text("v1"));
            let shown = log.message(&m).expect("shown");
            assert_eq!(shown.body.as_deref(), Some("v3"), "order {order:?}");
        }
    }

    #[test]
    fn delete_leaves_tombstone_and_beats_edits() {
        let mut log = ChatLog::default();
        let m = id(1, 1);
        log.apply(m, t(10), text("hi"));
        log.apply(
            id(2, 1),
            t(11),
            ChatContent::Reaction { target: m, emoji: "👍".into(), remove: false },
        );
        assert_eq!(log.apply(id(2, 2), t(12), ChatContent::Delete { target: m }), Applied::Ignored);
        assert_eq!(log.apply(id(1, 2), t(13), ChatContent::Delete { target: m }), Applied::Deleted);
        assert_eq!(
            log.apply(id(1, 3), t(14), ChatContent::Edit { target: m, body: "back".into() }),
            Applied::Ignored
        );
        let shown = log.message(&m).expect("tombstone stays");
        assert!(shown.deleted && shown.body.is_none() && shown.reactions.is_empty());
    }

    /// A user's devices are one author: either edits, deletes, reacts and reads for the user;
    /// another user's device does none of it, even with the same device id's sequence.
    #[test]
    fn edits_deletes_reactions_and_receipts_belong_to_the_user() {
        let alice = UserId::Address(crate::identity::Address {
            local: "alice".into(),
            host: "relay.example".into(),
        });
        let bob = UserId::Address(crate::identity::Address {
            local: "bob".into(),
            host: "relay.example".into(),
        });
        let mut log = ChatLog::default();
        let m = id(1, 1);
        log.apply_by(m, alice.clone(), t(10), text("from the laptop"));
        // The phone (device 2) edits the laptop's message: the same user.
        let edit = ChatContent::Edit { target: m, body: "fixed on the phone".into() };
        assert_eq!(log.apply_by(id(2, 1), alice.clone(), t(20), edit), Applied::Edited);
        // Bob's device may not, nor delete it.
        let edit = ChatContent::Edit { target: m, body: "bob's".into() };
        assert_eq!(log.apply_by(id(3, 1), bob.clone(), t(30), edit), Applied::Ignored);
        let delete = ChatContent::Delete { target: m };
        assert_eq!(log.apply_by(id(3, 2), bob.clone(), t(31), delete), Applied::Ignored);
        assert_eq!(log.message(&m).and_then(|m| m.body.as_deref()), Some("fixed on the phone"));
        // One reaction per user, whichever device: the phone takes back the laptop's.
        let react = |remove| ChatContent::Reaction { target: m, emoji: "👍".into(), remove };
        log.apply_by(id(1, 2), alice.clone(), t(40), react(false));
        log.apply_by(id(3, 3), bob.clone(), t(41), react(false));
        log.apply_by(id(2, 2), alice.clone(), t(42), react(true));
        let r = &log.message(&m).expect("shown").reactions;
        assert_eq!(r.get("👍"), Some(&BTreeSet::from([bob.clone()])));
        // A receipt is the user's latest, from either device.
        let n = id(3, 4);
        log.apply_by(n, bob, t(50), text("later"));
        log.apply_by(id(1, 3), alice.clone(), t(60), ChatContent::ReadReceipt { up_to: n });
        log.apply_by(id(2, 3), alice.clone(), t(55), ChatContent::ReadReceipt { up_to: m });
        assert_eq!(log.receipts().get(&alice), Some(&n), "the later receipt, by clock");
        // And the phone deletes the laptop's message.
        let delete = ChatContent::Delete { target: m };
        assert_eq!(log.apply_by(id(2, 4), alice, t(70), delete), Applied::Deleted);
    }

    #[test]
    fn reactions_add_and_remove() {
        let mut log = ChatLog::default();
        let m = id(1, 1);
        log.apply(m, t(10), text("hi"));
        let react = |remove| ChatContent::Reaction { target: m, emoji: "🎉".into(), remove };
        log.apply(id(2, 1), t(11), react(false));
        log.apply(id(3, 1), t(12), react(false));
        log.apply(id(2, 2), t(13), react(true));
        let r = &log.message(&m).expect("shown").reactions;
        assert_eq!(r.get("🎉").map(|s| s.len()), Some(1));
        assert!(r["🎉"].contains(&UserId::Device(dev(3))));
        // Typing is not stored; duplicates are ignored.
        assert_eq!(
            log.apply(id(2, 3), t(14), ChatContent::Typing { active: true }),
            Applied::Typing
        );
        assert_eq!(log.apply(m, t(10), text("hi")), Applied::Ignored);
        // A request for a file again is acted on, never shown.
        assert_eq!(
            log.apply(id(2, 4), t(15), ChatContent::FileRequest { target: m }),
            Applied::Request
        );
        assert_eq!(log.timeline().len(), 1);
    }
}
