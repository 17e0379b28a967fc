//! How the command line shows what the API returns.

use serde_json::Value;

use crate::view::{ChatEntry, FileView};

/// `HH:MM:SS` (UTC) of a time in milliseconds since the Unix epoch.
pub fn format_time(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

/// One line of folded chat history.
pub fn format_entry(m: &ChatEntry) -> String {
    let mut line = format!("{} {} {}: ", format_time(m.time_ms), m.short, m.from);
    if let Some(to) = &m.reply_to {
        line.push_str(&format!("(reply to {to}) "));
    }
    match (&m.body, &m.attachment) {
        _ if m.deleted => line.push_str("[deleted]"),
        (body, Some(f)) => {
            line.push_str(&format_file(f));
            if let Some(b) = body {
                line.push(' ');
                line.push_str(b);
            }
        }
        (Some(b), None) => line.push_str(b),
        (None, None) => line.push_str("[deleted]"),
    }
    if m.edited && !m.deleted {
        line.push_str(" (edited)");
    }
    for (emoji, who) in &m.reactions {
        line.push_str(&format!(" [{emoji} {}]", who.join(", ")));
    }
    if m.status == "sending" {
        line.push_str(" (sending)");
    }
    if m.status == "failed" {
        line.push_str(&format!(" (failed: {})", m.failure.as_deref().unwrap_or("given up")));
    }
    if !m.read_by.is_empty() {
        line.push_str(&format!(" (read by {})", m.read_by.join(", ")));
    }
    line
}

/// A file as a line shows it: `[file NAME, SIZE, TYPE, fetched]`.
pub fn format_file(f: &FileView) -> String {
    let here = if f.fetched { "fetched" } else { "not fetched" };
    format!("[file {}, {}, {}, {here}]", f.name, format_size(f.size), f.mime)
}

/// A size in bytes, for people (`1.5 MiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// One line of folded chat history, from its JSON.
pub fn format_entry_json(v: &Value) -> String {
    match serde_json::from_value::<EntryJson>(v.clone()) {
        Ok(e) => format_entry(&e.into()),
        Err(_) => v.to_string(),
    }
}

#[derive(serde::Deserialize)]
struct EntryJson {
    id: String,
    short: String,
    from: String,
    time_ms: u64,
    #[serde(default)]
    reply_to: Option<String>,
    body: Option<String>,
    edited: bool,
    deleted: bool,
    reactions: std::collections::BTreeMap<String, Vec<String>>,
    status: String,
    #[serde(default)]
    failure: Option<String>,
    read_by: Vec<String>,
    #[serde(default)]
    attachment: Option<FileView>,
}

impl From<EntryJson> for ChatEntry {
    fn from(e: EntryJson) -> Self {
        Self {
            id: e.id,
            short: e.short,
            from: e.from,
            time_ms: e.time_ms,
            reply_to: e.reply_to,
            body: e.body,
            edited: e.edited,
            deleted: e.deleted,
            reactions: e.reactions,
            status: match e.status.as_str() {
                "sending" => "sending",
                "sent" => "sent",
                "failed" => "failed",
                _ => "received",
            },
            failure: e.failure,
            read_by: e.read_by,
            attachment: e.attachment,
        }
    }
}

/// One line for an event of the stream.
pub fn format_event(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    match v.get("type").and_then(Value::as_str) {
        Some("message") => {
            let content = v.get("content");
            let text = match content.and_then(|c| c.get("type")).and_then(Value::as_str) {
                Some("text") => s_of(content, "body"),
                Some("reply") => {
                    format!("(reply to {}) {}", short(&s_of(content, "to")), s_of(content, "body"))
                }
                Some("edit") => format!(
                    "(edit of {}) {}",
                    short(&s_of(content, "target")),
                    s_of(content, "body")
                ),
                Some("delete") => format!("(deleted {})", short(&s_of(content, "target"))),
                Some("reaction") => format!(
                    "(reacted {} to {})",
                    s_of(content, "emoji"),
                    short(&s_of(content, "target"))
                ),
                Some("read_receipt") => format!("(read up to {})", short(&s_of(content, "up_to"))),
                Some("attachment") => {
                    let file = content
                        .and_then(|c| c.get("file"))
                        .and_then(|f| serde_json::from_value::<FileView>(f.clone()).ok());
                    let caption = s_of(content, "caption");
                    match file {
                        Some(f) if caption.is_empty() => format_file(&f),
                        Some(f) => format!("{} {caption}", format_file(&f)),
                        None => "(a file)".to_owned(),
                    }
                }
                Some(other) => format!("({other})"),
                None => format!("({} bytes, base64)", s("payload_base64").len()),
            };
            format!(
                "{} {} {}: {text}",
                format_time(v.get("time_ms").and_then(Value::as_u64).unwrap_or(0)),
                s("short"),
                s("from")
            )
        }
        Some("sent") => format!("   sent {}", short(&s("id"))),
        Some("failed") => format!("   failed {}: {}", short(&s("id")), s("reason")),
        Some("relay") if v.get("connected").and_then(Value::as_bool) == Some(true) => {
            "   connected to the relay".to_owned()
        }
        Some("relay") => format!(
            "   not connected to the relay since {}",
            format_time(v.get("since_ms").and_then(Value::as_u64).unwrap_or(0))
        ),
        Some("typing") => format!("   {} is typing", &s("device")[..12.min(s("device").len())]),
        Some("members") => format!(
            "   membership changed (epoch {})",
            v.get("epoch").and_then(Value::as_u64).unwrap_or(0)
        ),
        Some("joined") => format!("   joined channel {}", s("name")),
        Some("removed") => "   this device was removed from the channel".to_owned(),
        Some("device_linked") => format!("   linked a new device {}", s("device")),
        Some("link_failed") => format!("   a device link failed: {}", s("reason")),
        Some("file") => format!(
            "   file {} {}: {} of {}",
            short(&s("id")),
            s("state"),
            format_size(v.get("bytes").and_then(Value::as_u64).unwrap_or(0)),
            format_size(v.get("total").and_then(Value::as_u64).unwrap_or(0))
        ),
        _ => v.to_string(),
    }
}

/// One device of `chitchat devices`: id, name, and whether it is this one, linked, and when
/// it was last seen.
pub fn device_line(d: &Value, now_ms: u64) -> String {
    let device = d.get("device").and_then(Value::as_str).unwrap_or_default();
    let name = d.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()).unwrap_or("-");
    let state = if d.get("revoked").and_then(Value::as_bool) == Some(true) {
        "REVOKED".to_owned()
    } else if d.get("this_device").and_then(Value::as_bool) == Some(true) {
        "this device".to_owned()
    } else {
        let seen = match d.get("last_seen_ms").and_then(Value::as_u64) {
            Some(ms) => format!("last seen {}", ago(now_ms.saturating_sub(ms))),
            None => "never seen".to_owned(),
        };
        if d.get("linked").and_then(Value::as_bool) == Some(true) {
            seen
        } else {
            format!("{seen}, not linked with this device")
        }
    };
    format!("{device}  {name:<16}  {state}")
}

/// A duration in words: "just now", "5 minutes ago", "3 hours ago", "2 days ago".
pub fn ago(ms: u64) -> String {
    let minutes = ms / 60_000;
    match minutes {
        0..=1 => "just now".to_owned(),
        2..=119 => format!("{minutes} minutes ago"),
        120..=2879 => format!("{} hours ago", minutes / 60),
        _ => format!("{} days ago", minutes / 1440),
    }
}

/// A QR code of `text` for the terminal (two rows of modules a line).
pub fn qr(text: &str) -> anyhow::Result<String> {
    let code = qrcode::QrCode::new(text.as_bytes())?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

fn s_of(v: Option<&Value>, k: &str) -> String {
    v.and_then(|v| v.get(k)).and_then(Value::as_str).unwrap_or_default().to_owned()
}

/// The short form of a full message id.
pub fn short(id: &str) -> String {
    match id.split_once(':') {
        Some((sender, seq)) => format!("{}:{seq}", &sender[..8.min(sender.len())]),
        None => id.to_owned(),
    }
}
