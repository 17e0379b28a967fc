//! `chitchat`: the node's command line. `init` and `daemon` work on the node directory; every
//! other command is a client of the running daemon's local API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use axum::serve::ListenerExt as _;
use chitchat_node::client::{ApiClient, encode_component as enc};
use chitchat_node::config::ApiListen;
use chitchat_node::daemon::Node;
use chitchat_node::engine::Engine;
use chitchat_node::home::{NodeDir, RunInfo};
use chitchat_node::store::{Store, StoreError};
use chitchat_node::{api, cli};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

/// ChitChat: end-to-end encrypted channels between devices, through relays.
#[derive(Debug, Parser)]
#[command(name = "chitchat", version = chitchat_node::VERSION)]
struct Cli {
    /// The node directory (keys, config, database).
    #[arg(long, env = "CHITCHAT_HOME", default_value_os_t = default_home(), global = true)]
    home: PathBuf,
    #[command(subcommand)]
    command: Command,
}

fn default_home() -> PathBuf {
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from(".chitchat"), |h| PathBuf::from(h).join(".chitchat"))
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the device key, the node directory and its config. With `--link`, also link
    /// this device to a user whose other device showed the code (`chitchat devices link`),
    /// and register it as that user at their relay.
    Init {
        /// The code the other device shows.
        #[arg(long)]
        link: Option<String>,
        /// This device's name in the user's device list, like "phone".
        #[arg(long, requires = "link")]
        device_name: Option<String>,
    },
    /// Run the node.
    Daemon {
        /// Talk to the relay alone: dial no peer, listen nowhere, announce no address
        /// (`[network] relay_only`).
        #[arg(long)]
        relay_only: bool,
    },
    /// Register this device with a relay, as NAME@relay.
    Register {
        /// The relay's HTTP address, like http://127.0.0.1:8080.
        #[arg(long)]
        relay: String,
        /// An invite token from the relay's operator (`chitchat-relay invite`).
        #[arg(long)]
        token: Option<String>,
        /// The user name.
        #[arg(long)]
        name: String,
    },
    /// List the peers found on the local network (mDNS): device id, name, whether connected.
    Lan,
    /// Show this device and its address.
    Whoami,
    /// Show the node's state: the relay link, dropped items, and any orderer caught
    /// equivocating or fork found in a channel.
    Status,
    /// List this user's devices (name, last seen), or link, join or name one.
    Devices {
        #[command(subcommand)]
        command: Option<DevicesCommand>,
    },
    /// Look up a user of any relay (bob@other.host) and list the devices whose records verify.
    Lookup {
        /// The user's address.
        address: String,
    },
    /// Channel commands.
    Channel {
        #[command(subcommand)]
        command: ChannelCommand,
    },
    /// List channels.
    Channels,
    /// Add a user (every device of theirs) to a channel.
    Invite {
        /// The channel (name or id).
        channel: String,
        /// The user, alice@relay.
        address: String,
    },
    /// List a channel's members.
    Members {
        /// The channel.
        channel: String,
    },
    /// Remove a member (an address, or a device id) from a channel.
    Remove {
        /// The channel.
        channel: String,
        /// The member.
        member: String,
    },
    /// Leave a channel on this device.
    Leave {
        /// The channel.
        channel: String,
    },
    /// Send a text message.
    Send {
        /// The channel.
        channel: String,
        /// The text.
        text: String,
    },
    /// Send a file, of any size: streamed to the daemon, sealed under a fresh key, and kept
    /// here for the members to fetch.
    SendFile {
        /// The channel.
        channel: String,
        /// The file.
        path: PathBuf,
        /// A caption.
        #[arg(long)]
        caption: Option<String>,
        /// Its MIME type (guessed from its name if not given).
        #[arg(long)]
        mime: Option<String>,
    },
    /// Fetch the file a message carries and write it out.
    Fetch {
        /// The message (an id as `history` shows it).
        message: String,
        /// Where to write it (by default its name, in this directory); an existing file is
        /// never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Ask the channel's members for the file a message carries again, when no one provides it
    /// (its pins at the relays expired and its sender is away); fetch it a little later.
    RequestFile {
        /// The message (an id as `history` shows it).
        message: String,
    },
    /// Reply to a message.
    Reply {
        /// The message (an id as `history` shows it).
        message: String,
        /// The text.
        text: String,
    },
    /// Edit one of your messages.
    Edit {
        /// The message.
        message: String,
        /// The new text.
        text: String,
    },
    /// Delete one of your messages.
    Delete {
        /// The message.
        message: String,
    },
    /// React to a message.
    React {
        /// The message.
        message: String,
        /// The emoji.
        emoji: String,
        /// Take the reaction back.
        #[arg(long)]
        remove: bool,
    },
    /// Mark a channel read up to its latest message (or up to MESSAGE).
    Read {
        /// The channel.
        channel: String,
        /// The message.
        message: Option<String>,
    },
    /// Show a channel's history: ids, edits, deletions, reactions and receipts.
    History {
        /// The channel.
        channel: String,
        /// Only the latest N messages.
        #[arg(long)]
        limit: Option<usize>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow a channel live.
    Tail {
        /// The channel (all channels if omitted).
        channel: Option<String>,
        /// Print JSON events.
        #[arg(long)]
        json: bool,
    },
    /// Export a channel's history.
    Export {
        /// The channel.
        channel: String,
        /// json or text.
        #[arg(long, default_value = "json")]
        format: String,
    },
}

#[derive(Debug, Subcommand)]
enum ChannelCommand {
    /// Create a channel.
    Create {
        /// Its name.
        name: String,
        /// What it carries (default text/chitchat, chat).
        #[arg(long)]
        mime: Option<String>,
        /// Let every member add and remove members (default: only you).
        #[arg(long)]
        open: bool,
        /// Relay-less, for peers met directly (a LAN): this device orders it, and members are
        /// invited by device id (see `chitchat lan`).
        #[arg(long)]
        lan: bool,
    },
    /// Show a channel: its id, epoch, members, and the relays that order it.
    Info {
        /// The channel (name or id).
        channel: String,
    },
    /// Move a relay-less channel you created onto relays (yours and each member's): from the
    /// next epoch on they order it and keep it for members that are away. Every member must be
    /// registered at a relay first.
    Move {
        /// The channel (name or id).
        channel: String,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// Show a one-time code (and its QR code) for a new device of yours, and wait until it is
    /// linked. On the new device: `chitchat init --link CODE`.
    Link,
    /// On a running node registered nowhere: link it with a code another of your devices shows.
    Join {
        /// The code.
        code: String,
        /// This device's name in your device list.
        #[arg(long)]
        name: Option<String>,
    },
    /// Name this device in your device list.
    Name {
        /// The name, like "laptop".
        name: String,
    },
    /// Revoke another device of yours (lost or stolen): its name or id. It is revoked once
    /// more than half of your devices (those a week old or more) ran this, or one did with
    /// your recovery code. Every channel then removes it.
    Revoke {
        /// The device: its name in the list, its id, or the first 8 or more digits of the id.
        device: String,
        /// The recovery code shown when you registered.
        #[arg(long)]
        recovery: Option<String>,
    },
    /// Set a recovery code, if your user has none: only from your only device.
    Recovery,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let dir = NodeDir::new(cli.home.clone());
    if let Command::Init { link, device_name } = cli.command {
        dir.init()?;
        let store = Store::open(&dir.db())?;
        let engine = Engine::open(store)?;
        println!("device {}", engine.device().0.to_hex());
        println!("node directory {}", dir.root().display());
        let Some(code) = link else { return Ok(()) };
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        return runtime.block_on(init_link(&dir, engine, &code, device_name));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Daemon { relay_only } => daemon(dir, relay_only).await,
            command => {
                let client = ApiClient::from_home(&dir)?;
                run(&client, command).await
            }
        }
    })
}

/// `init --link`: the node runs here only until the link is done (no API, no blob store), and
/// the daemon started next finds the account.
async fn init_link(
    dir: &NodeDir,
    engine: Engine,
    code: &str,
    device_name: Option<String>,
) -> anyhow::Result<()> {
    let config = dir.load_config()?;
    let node = Node::start(engine, config, None).await?;
    println!("linking: waiting for the other device's answer...");
    let linked = node.join_link(code, device_name).await;
    if let Err(e) = node.with(Engine::close).await {
        tracing::warn!(error = %e, "cannot record the clean stop");
    }
    let account = linked.context("link failed")?;
    println!("linked: this device is {}@{}", account.local_name, account.relay.id.host);
    println!("start it with `chitchat daemon`; it joins your channels there");
    Ok(())
}

async fn daemon(dir: NodeDir, relay_only: bool) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if !dir.exists() {
        bail!("{} holds no node; run `chitchat init` first", dir.root().display());
    }
    let mut config = dir.load_config()?;
    config.network.relay_only |= relay_only;
    let token = dir.read_token()?;
    let store = match Store::open(&dir.db()) {
        Ok(s) => s,
        Err(StoreError::Storage(redb::Error::DatabaseAlreadyOpen)) => {
            bail!("another daemon runs on {}", dir.root().display())
        }
        Err(e) => return Err(e.into()),
    };
    let engine = Engine::open(store)?;
    let device = engine.device();
    // A relay-only node opens its blob store with no endpoint: iroh speaks UDP, and such a
    // node uses TCP to its relay alone, over which its files travel in parts.
    let blob_dir = dir.root().join("blobs");
    let blobs = if config.network.relay_only {
        chitchat_blobs::Blobs::open_store(&blob_dir, engine.key()).await
    } else {
        let bind = config.files.bind_addrs()?;
        chitchat_blobs::Blobs::open(&blob_dir, engine.key(), &bind).await
    };
    let blobs =
        Some(blobs.with_context(|| format!("open the blob store in {}", blob_dir.display()))?);
    let node = Node::start(engine, config.clone(), blobs).await?;
    let state = Arc::new(api::ApiState { node: node.clone(), token });
    let app = api::router(state);
    let listen = ApiListen::parse(&config.api.listen).context("api.listen")?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        wait_for_signal().await;
        let _ = tx.send(());
    };
    let pid = std::process::id();
    match listen {
        ApiListen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind the API on {addr}"))?;
            let bound = listener.local_addr()?;
            dir.write_run_info(&RunInfo { api: bound.to_string(), pid })?;
            tracing::info!(device = %device, api = %bound, "node running");
            tokio::spawn(shutdown);
            // Events are small frames; do not let Nagle hold them back.
            let listener = listener.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await?;
        }
        ApiListen::Unix(path) => serve_unix(&dir, path, app, rx, shutdown, pid).await?,
    }
    // A clean stop: the next start need not skip a generation in the channels that sent.
    if let Err(e) = node.with(Engine::close).await {
        tracing::warn!(error = %e, "cannot record the clean stop; the next start skips a generation");
    }
    if let Some(blobs) = node.blobs() {
        blobs.shutdown().await;
    }
    let _ = std::fs::remove_file(dir.run_info());
    Ok(())
}

#[cfg(unix)]
async fn serve_unix(
    dir: &NodeDir,
    path: PathBuf,
    app: axum::Router,
    rx: tokio::sync::oneshot::Receiver<()>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    pid: u32,
) -> anyhow::Result<()> {
    let path = if path.is_relative() { dir.root().join(path) } else { path };
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("bind the API on {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    dir.write_run_info(&RunInfo { api: format!("unix:{}", path.display()), pid })?;
    tracing::info!(api = %path.display(), "node running");
    tokio::spawn(shutdown);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = rx.await;
        })
        .await?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

#[cfg(not(unix))]
async fn serve_unix(
    _: &NodeDir,
    path: PathBuf,
    _: axum::Router,
    _: tokio::sync::oneshot::Receiver<()>,
    _: impl std::future::Future<Output = ()> + Send + 'static,
    _: u32,
) -> anyhow::Result<()> {
    bail!("Unix sockets are not supported here ({})", path.display())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Finds which channel a message is in: `(channel, full id)`.
/// A progress bar for `total` bytes on standard error, drawn only on a terminal: bytes, rate,
/// time left.
fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    let style = indicatif::ProgressStyle::with_template(
        "{msg} {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} {eta} left",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}

async fn send_file(
    client: &ApiClient,
    channel: &str,
    path: &std::path::Path,
    caption: Option<String>,
    mime: Option<String>,
) -> anyhow::Result<()> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata().await?.len();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: no file name in UTF-8", path.display()))?;
    let mime = mime.unwrap_or_else(|| {
        mime_guess::from_path(path).first_or_octet_stream().essence_str().to_owned()
    });
    let mut query = format!("name={}", enc(name));
    if let Some(c) = caption {
        query.push_str(&format!("&caption={}", enc(&c)));
    }
    let bar = progress_bar(len, "sending");
    let shown = bar.clone();
    let path = format!("/v1/channels/{}/files?{query}", enc(channel));
    let answer = client.upload(&path, &mime, file, len, move |n| shown.set_position(n)).await;
    bar.finish_and_clear();
    print_sent(&answer?);
    Ok(())
}

/// `devices link`: the code and its QR code, then the wait for the new device.
async fn link_device(client: &ApiClient) -> anyhow::Result<()> {
    // Listen first, so that a quick new device's link is not missed.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<String, String>>(1);
    let watching = {
        let client = client.clone();
        tokio::spawn(async move {
            let _ = client
                .events(None, |e| {
                    let done = match e["type"].as_str() {
                        Some("device_linked") => {
                            Some(Ok(e["device"].as_str().unwrap_or_default().to_owned()))
                        }
                        Some("link_failed") => {
                            Some(Err(e["reason"].as_str().unwrap_or_default().to_owned()))
                        }
                        _ => None,
                    };
                    match done {
                        Some(d) => {
                            let _ = tx.try_send(d);
                            false
                        }
                        None => true,
                    }
                })
                .await;
        })
    };
    let v = client.json("POST", "/v1/devices/link", None).await?;
    let code = v["code"].as_str().unwrap_or_default();
    let expires_ms = v["expires_ms"].as_u64().unwrap_or(0);
    println!("{}", cli::qr(code)?);
    println!("link code: {code}");
    println!("on the new device: chitchat init --link {code}");
    let left = Duration::from_millis(expires_ms.saturating_sub(chitchat_node::daemon::now().0));
    println!("the code works once, for {} minutes; waiting...", left.as_secs().div_ceil(60));
    let outcome = tokio::time::timeout(left, rx.recv()).await;
    watching.abort();
    match outcome {
        Ok(Some(Ok(device))) => {
            println!("linked device {device}");
            Ok(())
        }
        Ok(Some(Err(reason))) => bail!("link failed: {reason}"),
        Ok(None) => bail!("the event stream closed before the link was done"),
        Err(_) => bail!("the code expired; no device used it"),
    }
}

async fn fetch(client: &ApiClient, message: &str, out: Option<PathBuf>) -> anyhow::Result<()> {
    let (channel, id) = locate(client, message).await?;
    let reference = enc(&format!("{channel}/{id}"));
    // Progress comes as events while the fetch request waits.
    let bar = progress_bar(0, "fetching");
    let watching = {
        let (client, bar, id) = (client.clone(), bar.clone(), id.clone());
        tokio::spawn(async move {
            let _ = client
                .events(Some(&channel), |e| {
                    if e["type"] == "file" && e["id"] == id.as_str() {
                        bar.set_length(e["total"].as_u64().unwrap_or(0));
                        bar.set_position(e["bytes"].as_u64().unwrap_or(0));
                    }
                    true
                })
                .await;
        })
    };
    let fetched = client.json("POST", &format!("/v1/messages/{reference}/fetch"), None).await;
    watching.abort();
    bar.finish_and_clear();
    let fetched = fetched.map_err(|e| {
        // No provider gave it (the node's `unavailable`).
        if e.to_string().ends_with("(HTTP 502)") {
            anyhow::anyhow!(
                "{e}\nno provider has the file now; `chitchat request-file {message}` asks the \
                 channel's members to upload it again"
            )
        } else {
            e
        }
    })?;
    let name = fetched["file"]["name"].as_str().unwrap_or("file").to_owned();
    let size = fetched["file"]["size"].as_u64().unwrap_or(0);
    let out = out.unwrap_or_else(|| PathBuf::from(&name));
    // Written beside its place, then moved there: never a half file under its name.
    let partial = out.with_file_name(format!(
        ".{}.part",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    if out.exists() {
        bail!("{} exists; give another place with --out", out.display());
    }
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("cannot write {}", partial.display()))?;
    let bar = progress_bar(size, "writing");
    let shown = bar.clone();
    let written = client
        .download(&format!("/v1/messages/{reference}/file"), &mut file, |n| shown.set_position(n))
        .await;
    bar.finish_and_clear();
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(e);
    }
    file.sync_all().await?;
    // A link fails where a file is: nothing is overwritten even if one came meanwhile.
    let linked = tokio::fs::hard_link(&partial, &out).await;
    let _ = tokio::fs::remove_file(&partial).await;
    linked.with_context(|| format!("cannot write {}", out.display()))?;
    println!("{} ({} bytes)", out.display(), size);
    Ok(())
}

async fn locate(client: &ApiClient, message: &str) -> anyhow::Result<(String, String)> {
    let v = client.json("GET", &format!("/v1/messages/{}", enc(message)), None).await?;
    let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    match (field("channel"), field("id")) {
        (Some(c), Some(i)) => Ok((c, i)),
        _ => bail!("unexpected answer {v}"),
    }
}

async fn post_content(client: &ApiClient, channel: &str, content: Value) -> anyhow::Result<Value> {
    let path = format!("/v1/channels/{}/messages", enc(channel));
    client.json("POST", &path, Some(json!({ "content": content }))).await
}

fn print_sent(v: &Value) {
    println!(
        "{} ({})",
        v["id"].as_str().map_or_else(String::new, cli::short),
        v["status"].as_str().unwrap_or("")
    );
}

fn print_recovery_code(code: &str) {
    println!("recovery code: {code}");
    println!(
        "write it down and keep it away from your devices: with it, one of your devices can \
         revoke a lost one (`chitchat devices revoke DEVICE --recovery CODE`). It is not shown again."
    );
}

async fn run(client: &ApiClient, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init { .. } | Command::Daemon { .. } => unreachable!("handled before"),
        Command::Register { relay, token, name } => {
            let v = client
                .json(
                    "POST",
                    "/v1/register",
                    Some(json!({"relay": relay, "token": token, "name": name})),
                )
                .await?;
            println!("registered as {}", v["address"].as_str().unwrap_or_default());
            match v["recovery_code"].as_str() {
                Some(code) => print_recovery_code(code),
                None => println!("no recovery code set (`chitchat devices recovery` sets one)"),
            }
        }
        Command::Lan => {
            let v = client.json("GET", "/v1/network/lan", None).await?;
            let peers = v["peers"].as_array().cloned().unwrap_or_default();
            if peers.is_empty() {
                println!("no peer found on the local network");
            }
            for p in peers {
                let device = p["device"].as_str().unwrap_or("(no answer)");
                let name = p["name"].as_str().filter(|n| !n.is_empty()).unwrap_or("-");
                let sponsored = p["sponsored"].as_array().and_then(|a| a.first().cloned());
                let name = match sponsored.as_ref().and_then(Value::as_str) {
                    Some(address) => address.to_owned(),
                    None => format!("{name} (unverified)"),
                };
                let state =
                    if p["connected"].as_bool() == Some(true) { "connected" } else { "seen" };
                println!("{device}  {name}  {state}");
            }
        }
        Command::Whoami => {
            let v = client.json("GET", "/v1/status", None).await?;
            match v["account"]["address"].as_str() {
                Some(a) => println!("{a}"),
                None => println!("not registered (run `chitchat register`)"),
            }
            println!("device {}", v["device"].as_str().unwrap_or_default());
        }
        Command::Status => {
            let v = client.json("GET", "/v1/status", None).await?;
            println!("{}", v["account"]["address"].as_str().unwrap_or("not registered"));
            if v["revoked"].as_bool() == Some(true) {
                println!(
                    "THIS DEVICE WAS REVOKED by your other devices: its relay refuses it \
                     everything. Start over with a new node directory (`chitchat --home DIR init`)."
                );
            }
            let link = &v["relay_link"];
            match link["connected"].as_bool() {
                Some(true) => println!("relay: connected"),
                Some(false) => println!("relay: unreachable"),
                None => println!("relay: none"),
            }
            println!("channels: {}", v["channels"]);
            println!("dropped: {}", v["dropped"]);
            let convicted = v["convicted"].as_array().cloned().unwrap_or_default();
            let forks = v["forks"].as_array().cloned().unwrap_or_default();
            if convicted.is_empty() && forks.is_empty() {
                println!("no equivocation, no fork");
            }
            for c in &convicted {
                println!(
                    "EQUIVOCATION: orderer {} ({}) signed two commits for epoch {} of channel {}; \
                     its signatures no longer count",
                    c["orderer"].as_str().unwrap_or_default(),
                    c["relay"].as_str().unwrap_or("unknown relay"),
                    c["epoch"],
                    c["channel"].as_str().unwrap_or_default(),
                );
            }
            for f in &forks {
                println!(
                    "FORK: {} is in another state ({}) at epoch {} of channel {}",
                    f["member"].as_str().unwrap_or_default(),
                    f["kind"].as_str().unwrap_or_default(),
                    f["epoch"],
                    f["channel"].as_str().unwrap_or_default(),
                );
            }
        }
        Command::Devices { command: None } => {
            let v = client.json("GET", "/v1/devices", None).await?;
            println!("{}", v["address"].as_str().unwrap_or_default());
            let now_ms = chitchat_node::daemon::now().0;
            for d in v["devices"].as_array().into_iter().flatten() {
                println!("{}", cli::device_line(d, now_ms));
            }
        }
        Command::Devices { command: Some(DevicesCommand::Link) } => link_device(client).await?,
        Command::Devices { command: Some(DevicesCommand::Join { code, name }) } => {
            let body = json!({"code": code, "name": name});
            let v = client.json("POST", "/v1/devices/join", Some(body)).await?;
            println!("linked: this device is {}", v["address"].as_str().unwrap_or_default());
        }
        Command::Devices { command: Some(DevicesCommand::Revoke { device, recovery }) } => {
            let body = json!({"device": device, "recovery_code": recovery});
            let v = client.json("POST", "/v1/devices/revoke", Some(body)).await?;
            let id = v["device"].as_str().map_or_else(String::new, cli::short);
            if v["revoked"].as_bool() == Some(true) {
                println!("revoked {id}: it is being removed from every channel");
            } else {
                println!(
                    "signed the revocation of {id}: {} of the {} signatures needed (of your devices \
                     registered a week or more ago); run this on another of them within a day, or \
                     here with --recovery CODE",
                    v["signed"], v["needed"]
                );
            }
        }
        Command::Devices { command: Some(DevicesCommand::Recovery) } => {
            let v = client.json("POST", "/v1/devices/recovery", None).await?;
            print_recovery_code(v["recovery_code"].as_str().unwrap_or_default());
        }
        Command::Devices { command: Some(DevicesCommand::Name { name }) } => {
            client.json("PUT", "/v1/devices/name", Some(json!({"name": name}))).await?;
            println!("this device is now named {name:?}");
        }
        Command::Lookup { address } => {
            let path = format!("/v1/users/{address}");
            let v = client.json("GET", &path, None).await?;
            println!("{} (relay key {})", address, v["relay_key"].as_str().unwrap_or("unknown"));
            for d in v["devices"].as_array().into_iter().flatten() {
                println!(
                    "{}  {}",
                    d["device"].as_str().unwrap_or_default(),
                    d["name"].as_str().unwrap_or_default()
                );
            }
        }
        Command::Channel { command: ChannelCommand::Create { name, mime, open, lan } } => {
            let v = client
                .json(
                    "POST",
                    "/v1/channels",
                    Some(json!({"name": name, "mime": mime, "open": open, "lan": lan})),
                )
                .await?;
            println!("{}", v["id"].as_str().unwrap_or_default());
        }
        Command::Channel { command: ChannelCommand::Move { channel } } => {
            let v =
                client.json("POST", &format!("/v1/channels/{}/move", enc(&channel)), None).await?;
            let relays: Vec<&str> =
                v["relays"].as_array().into_iter().flatten().filter_map(|r| r.as_str()).collect();
            println!("{channel} is ordered by {} from epoch {}", relays.join(", "), v["epoch"]);
        }
        Command::Channel { command: ChannelCommand::Info { channel } } => {
            let v = client.json("GET", &format!("/v1/channels/{}", enc(&channel)), None).await?;
            println!(
                "{} ({})",
                v["name"].as_str().unwrap_or_default(),
                v["id"].as_str().unwrap_or_default()
            );
            println!("type      {}", v["mime"].as_str().unwrap_or_default());
            println!("epoch     {}", v["epoch"]);
            println!("messages  {}", v["messages"]);
            let relays: Vec<&str> =
                v["relays"].as_array().into_iter().flatten().filter_map(|r| r.as_str()).collect();
            println!("ordered by {}", relays.join(", "));
        }
        Command::Channels => {
            let v = client.json("GET", "/v1/channels", None).await?;
            for c in v["channels"].as_array().into_iter().flatten() {
                let left = if c["left"].as_bool() == Some(true) { " (left)" } else { "" };
                println!(
                    "{}  {}  {}  {} members{left}",
                    &c["id"].as_str().unwrap_or_default()
                        [..16.min(c["id"].as_str().unwrap_or_default().len())],
                    c["name"].as_str().unwrap_or_default(),
                    c["mime"].as_str().unwrap_or_default(),
                    c["members"].as_u64().unwrap_or(0),
                );
            }
        }
        Command::Invite { channel, address } => {
            let path = format!("/v1/channels/{}/invite", enc(&channel));
            let v = client.json("POST", &path, Some(json!({"address": address}))).await?;
            let n = v["added"].as_array().map_or(0, Vec::len);
            println!("added {address} ({n} device{})", if n == 1 { "" } else { "s" });
        }
        Command::Members { channel } => {
            let v = client
                .json("GET", &format!("/v1/channels/{}/members", enc(&channel)), None)
                .await?;
            for m in v["members"].as_array().into_iter().flatten() {
                let this =
                    if m["this_device"].as_bool() == Some(true) { " (this device)" } else { "" };
                println!(
                    "{}  {}{this}",
                    m["name"].as_str().unwrap_or_default(),
                    m["device"].as_str().unwrap_or_default()
                );
            }
        }
        Command::Remove { channel, member } => {
            let path = format!("/v1/channels/{}/remove", enc(&channel));
            client.json("POST", &path, Some(json!({"member": member}))).await?;
            println!("removed {member}");
        }
        Command::Leave { channel } => {
            client.json("POST", &format!("/v1/channels/{}/leave", enc(&channel)), None).await?;
            println!("left {channel}");
        }
        Command::Send { channel, text } => {
            print_sent(
                &post_content(client, &channel, json!({"type": "text", "body": text})).await?,
            );
        }
        Command::SendFile { channel, path, caption, mime } => {
            send_file(client, &channel, &path, caption, mime).await?;
        }
        Command::Fetch { message, out } => fetch(client, &message, out).await?,
        Command::RequestFile { message } => {
            let (channel, id) = locate(client, &message).await?;
            let reference = enc(&format!("{channel}/{id}"));
            client.json("POST", &format!("/v1/messages/{reference}/request"), None).await?;
            println!(
                "asked the channel's members for the file; a member whose device has it will \
                 upload it to their relay again: `chitchat fetch {message}` in a while"
            );
        }
        Command::Reply { message, text } => {
            let (channel, id) = locate(client, &message).await?;
            print_sent(
                &post_content(client, &channel, json!({"type": "reply", "to": id, "body": text}))
                    .await?,
            );
        }
        Command::Edit { message, text } => {
            let (channel, id) = locate(client, &message).await?;
            print_sent(
                &post_content(
                    client,
                    &channel,
                    json!({"type": "edit", "target": id, "body": text}),
                )
                .await?,
            );
        }
        Command::Delete { message } => {
            let (channel, id) = locate(client, &message).await?;
            print_sent(
                &post_content(client, &channel, json!({"type": "delete", "target": id})).await?,
            );
        }
        Command::React { message, emoji, remove } => {
            let (channel, id) = locate(client, &message).await?;
            let content =
                json!({"type": "reaction", "target": id, "emoji": emoji, "remove": remove});
            print_sent(&post_content(client, &channel, content).await?);
        }
        Command::Read { channel, message } => {
            let up_to = match message {
                Some(m) => {
                    let path = format!("/v1/messages/{}", enc(&format!("{channel}/{m}")));
                    client.json("GET", &path, None).await?["id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                }
                None => {
                    let path = format!("/v1/channels/{}/history?limit=1", enc(&channel));
                    let v = client.json("GET", &path, None).await?;
                    match v["history"]["messages"].as_array().and_then(|m| m.last()) {
                        Some(m) => m["id"].as_str().unwrap_or_default().to_owned(),
                        None => bail!("the channel has no messages yet"),
                    }
                }
            };
            print_sent(
                &post_content(client, &channel, json!({"type": "read_receipt", "up_to": up_to}))
                    .await?,
            );
        }
        Command::History { channel, limit, json } => {
            let mut path = format!("/v1/channels/{}/history", enc(&channel));
            if let Some(l) = limit {
                path.push_str(&format!("?limit={l}"));
            }
            let v = client.json("GET", &path, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for m in v["history"]["messages"].as_array().into_iter().flatten() {
                    println!("{}", cli::format_entry_json(m));
                }
            }
        }
        Command::Tail { channel, json } => {
            client
                .events(channel.as_deref(), |event| {
                    if json {
                        println!("{event}");
                    } else {
                        println!("{}", cli::format_event(&event));
                    }
                    true
                })
                .await?;
        }
        Command::Export { channel, format } => {
            let path = format!("/v1/channels/{}/export?format={}", enc(&channel), enc(&format));
            if format == "text" {
                print!("{}", client.text(&path).await?);
            } else {
                let v = client.json("GET", &path, None).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
    }
    Ok(())
}
