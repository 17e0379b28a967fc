//! What the local API shows: messages, chat content and folded chat history, as JSON.

use std::collections::BTreeMap;

use base64::Engine as _;
use chitchat_proto::DeviceId;
use chitchat_proto::channel::MessageId;
use chitchat_proto::channel::UserId;
use chitchat_proto::chat::{self, ChatContent, ChatLog};
use chitchat_proto::codec::Canonical as _;
use serde::{Deserialize, Serialize};

use crate::engine::{id_string, short_id};
use crate::store::{MessageStatus, StoredMessage};

/// `text/chitchat` content as the API reads and writes it: message ids are strings
/// (`SENDER:EPOCH.N`, or a short form the node resolves).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Content {
    /// A text message (markdown).
    Text {
        /// The body.
        body: String,
    },
    /// A reply.
    Reply {
        /// The message answered.
        to: String,
        /// The body.
        body: String,
    },
    /// A new body for one of this user's messages.
    Edit {
        /// The edited message.
        target: String,
        /// The new body.
        body: String,
    },
    /// Deletes one of this user's messages.
    Delete {
        /// The deleted message.
        target: String,
    },
    /// Adds (or with `remove`, takes back) a reaction.
    Reaction {
        /// The message reacted to.
        target: String,
        /// The emoji.
        emoji: String,
        /// Whether to remove it.
        #[serde(default)]
        remove: bool,
    },
    /// Everything up to this message was read.
    ReadReceipt {
        /// The latest message read.
        up_to: String,
    },
    /// Typing started or stopped (delivered, never stored).
    Typing {
        /// Whether typing goes on.
        active: bool,
    },
    /// Asks the members for a message's file again (its pins expired, its sender is away):
    /// a member whose device holds it pins it at its relay again. Not shown in the history.
    FileRequest {
        /// The message that carries the file.
        target: String,
    },
    /// A file (sent with `POST /v1/channels/{channel}/files`, not as content).
    Attachment {
        /// The file.
        file: FileView,
        /// Its caption.
        #[serde(default)]
        caption: Option<String>,
    },
    /// Content this version cannot show.
    Other {
        /// What it is.
        kind: String,
    },
}

impl Content {
    /// The wire content, with ids resolved by `resolve`.
    pub fn to_chat(
        &self,
        resolve: impl Fn(&str) -> Result<MessageId, String>,
    ) -> Result<ChatContent, String> {
        let c = match self {
            Self::Text { body } => ChatContent::Text { body: body.clone() },
            Self::Reply { to, body } => ChatContent::Reply { to: resolve(to)?, body: body.clone() },
            Self::Edit { target, body } => {
                ChatContent::Edit { target: resolve(target)?, body: body.clone() }
            }
            Self::Delete { target } => ChatContent::Delete { target: resolve(target)? },
            Self::Reaction { target, emoji, remove } => ChatContent::Reaction {
                target: resolve(target)?,
                emoji: emoji.clone(),
                remove: *remove,
            },
            Self::ReadReceipt { up_to } => ChatContent::ReadReceipt { up_to: resolve(up_to)? },
            Self::Typing { active } => ChatContent::Typing { active: *active },
            Self::FileRequest { target } => ChatContent::FileRequest { target: resolve(target)? },
            Self::Attachment { .. } => {
                return Err("a file is sent with POST /v1/channels/{channel}/files".into());
            }
            Self::Other { kind } => return Err(format!("cannot send content of kind {kind:?}")),
        };
        c.validate().map_err(str::to_owned)?;
        Ok(c)
    }

    /// The API form of wire content.
    pub fn from_chat(c: &ChatContent) -> Self {
        match c {
            ChatContent::Text { body } => Self::Text { body: body.clone() },
            ChatContent::Reply { to, body } => {
                Self::Reply { to: id_string(to), body: body.clone() }
            }
            ChatContent::Edit { target, body } => {
                Self::Edit { target: id_string(target), body: body.clone() }
            }
            ChatContent::Delete { target } => Self::Delete { target: id_string(target) },
            ChatContent::Reaction { target, emoji, remove } => {
                Self::Reaction { target: id_string(target), emoji: emoji.clone(), remove: *remove }
            }
            ChatContent::ReadReceipt { up_to } => Self::ReadReceipt { up_to: id_string(up_to) },
            ChatContent::Typing { active } => Self::Typing { active: *active },
            ChatContent::FileRequest { target } => Self::FileRequest { target: id_string(target) },
            ChatContent::Attachment { file, caption } => {
                Self::Attachment { file: FileView::of(file, false), caption: caption.clone() }
            }
        }
    }
}

/// A file a message carries, as the API shows it (its key never leaves the node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileView {
    /// Its name.
    pub name: String,
    /// Its MIME type.
    pub mime: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its blob's BLAKE3 hash (hex).
    pub hash: String,
    /// A small thumbnail (base64), for an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail_base64: Option<String>,
    /// Whether it is here (fetched, or sent from this device).
    #[serde(default)]
    pub fetched: bool,
}

impl FileView {
    /// The view of `f`.
    pub fn of(f: &chat::FileRef, fetched: bool) -> Self {
        Self {
            name: f.name.clone(),
            mime: f.mime.clone(),
            size: f.size,
            hash: hex::encode(f.hash),
            thumbnail_base64: f
                .thumbnail
                .as_ref()
                .map(|t| base64::engine::general_purpose::STANDARD.encode(&t.0)),
            fetched,
        }
    }

    /// Marks it fetched if its blob is among `here`.
    pub fn mark(&mut self, here: &std::collections::BTreeSet<[u8; 32]>) {
        let mut hash = [0u8; 32];
        if hex::decode_to_slice(&self.hash, &mut hash).is_ok() {
            self.fetched = here.contains(&hash);
        }
    }
}

/// One stored message, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MessageView {
    /// Its id (`SENDER:EPOCH.N`).
    pub id: String,
    /// Its short id (first 8 hex digits of the sender).
    pub short: String,
    /// The sender's device (hex).
    pub sender: String,
    /// The sender's address, or its short device id.
    pub from: String,
    /// The sender's clock, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The epoch it was sent in.
    pub epoch: u64,
    /// `sending`, `gossiped` (to peers online, not yet in the relay's hands), `sent` (in the
    /// relay's hands), `received` or `failed`.
    pub status: &'static str,
    /// For `text/chitchat` channels, the content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    /// For other channels, the payload in base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// Why it failed, if its status is `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// The status as the API writes it.
pub fn status_str(s: MessageStatus) -> &'static str {
    match s {
        MessageStatus::Sending => "sending",
        MessageStatus::Sent => "sent",
        MessageStatus::Received => "received",
        MessageStatus::Failed => "failed",
        MessageStatus::Gossiped => "gossiped",
    }
}

impl MessageView {
    /// The view of `m` in a channel of type `mime`; `name` names devices.
    pub fn new(m: &StoredMessage, mime: &str, name: impl Fn(&DeviceId) -> String) -> Self {
        let (content, payload_base64) = if mime == chat::MIME {
            match ChatContent::from_bytes(&m.payload) {
                Ok(c) => (Some(Content::from_chat(&c)), None),
                Err(_) => (Some(Content::Other { kind: "undecodable".into() }), None),
            }
        } else {
            (None, Some(base64::engine::general_purpose::STANDARD.encode(&m.payload)))
        };
        Self {
            id: id_string(&m.id),
            short: short_id(&m.id),
            sender: m.id.sender.0.to_hex(),
            from: name(&m.id.sender),
            time_ms: m.hlc.wall_ms,
            epoch: m.epoch,
            status: status_str(m.status),
            content,
            payload_base64,
            failure: None,
        }
    }
}

/// One line of a chat channel's folded history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatEntry {
    /// Its id.
    pub id: String,
    /// Its short id.
    pub short: String,
    /// The sender's address or short id.
    pub from: String,
    /// The sender's clock (ms since the Unix epoch).
    pub time_ms: u64,
    /// The message answered, if a reply (short id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// The body; `None` once deleted.
    pub body: Option<String>,
    /// Whether it was edited.
    pub edited: bool,
    /// Whether it was deleted (a tombstone).
    pub deleted: bool,
    /// Reactions: emoji to who reacted.
    pub reactions: BTreeMap<String, Vec<String>>,
    /// `sending`, `gossiped` (to peers online, not yet in the relay's hands), `sent` (in the
    /// relay's hands), `received` or `failed`.
    pub status: &'static str,
    /// Why it failed, if its status is `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Who has read up to here or further (receipts that point exactly here).
    pub read_by: Vec<String>,
    /// The file it carries (the body is its caption).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment: Option<FileView>,
}

/// A chat channel's history, folded: edits, deletions, reactions and receipts applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatHistory {
    /// The timeline.
    pub messages: Vec<ChatEntry>,
    /// Per member (address or short id): the latest message they said they read (short id).
    pub receipts: BTreeMap<String, String>,
}

/// Folds a chat channel's stored messages.
/// `user` gives each sender's user: edits and deletes count only from the author's user,
/// reactions and receipts are one per user.
pub fn fold_chat(
    messages: &[StoredMessage],
    name: impl Fn(&DeviceId) -> String,
    user: impl Fn(&DeviceId) -> UserId,
) -> ChatHistory {
    let mut log = ChatLog::default();
    let mut status = BTreeMap::new();
    for m in messages {
        if let Ok(c) = ChatContent::from_bytes(&m.payload) {
            log.apply_by(m.id, user(&m.id.sender), m.hlc, c);
        }
        status.insert(m.id, m.status);
    }
    let user_name = |u: &UserId| match u {
        UserId::Address(a) => a.to_string(),
        UserId::Device(d) => name(d),
    };
    let receipts = log.receipts();
    let mut read_by: BTreeMap<MessageId, Vec<String>> = BTreeMap::new();
    for (who, up_to) in &receipts {
        read_by.entry(*up_to).or_default().push(user_name(who));
    }
    let entries = log
        .timeline()
        .into_iter()
        .map(|m| ChatEntry {
            id: id_string(&m.id),
            short: short_id(&m.id),
            from: name(&m.id.sender),
            time_ms: m.hlc.wall_ms,
            reply_to: m.reply_to.as_ref().map(short_id),
            body: m.body.clone(),
            edited: m.edited.is_some(),
            deleted: m.deleted,
            reactions: m
                .reactions
                .iter()
                .map(|(emoji, who)| (emoji.clone(), who.iter().map(&user_name).collect()))
                .collect(),
            status: status_str(status.get(&m.id).copied().unwrap_or(MessageStatus::Received)),
            failure: None,
            read_by: read_by.remove(&m.id).unwrap_or_default(),
            attachment: m.attachment.as_ref().map(|f| FileView::of(f, false)),
        })
        .collect();
    ChatHistory {
        messages: entries,
        receipts: receipts.iter().map(|(u, id)| (user_name(u), short_id(id))).collect(),
    }
}
