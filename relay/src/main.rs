//! `chitchat-relay`: the relay's command line.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chitchat_proto::ordering::OrderingLimits;
use chitchat_relay::admin;
use chitchat_relay::config::Config;
use chitchat_relay::fanout::CommitFanout;
use chitchat_relay::federation::Federation;
use chitchat_relay::groups::Groups;
use chitchat_relay::home::{RelayDir, RunInfo};
use chitchat_relay::http::{BlockRequest, HttpState, InviteRequest};
use chitchat_relay::metrics::Metrics;
use chitchat_relay::ordering::{GroupOptions, Ordering};
use chitchat_relay::service::{Peers, Relay, Waiters, now};
use chitchat_relay::store::{InboxQuota, QueueLimits, Store, StoreError};
use clap::{Parser, Subcommand};
use tokio::sync::{mpsc, oneshot, watch};

/// ChitChat relay: inboxes, identity sponsorship and KeyPackages for ChitChat devices.
#[derive(Debug, Parser)]
#[command(name = "chitchat-relay", version = chitchat_relay::VERSION)]
struct Cli {
    /// The relay's directory (key, config, database).
    #[arg(long, env = "CHITCHAT_RELAY_DIR", default_value = "chitchat-relay-data", global = true)]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the relay's key, admin token and a documented config.toml.
    Init {
        /// The host name in users' addresses (alice@HOST).
        #[arg(long)]
        host: String,
        /// Replace an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Run the relay.
    Run {
        /// Loopback only, ephemeral ports, open registration (for development and tests).
        #[arg(long)]
        dev: bool,
    },
    /// Issue registration tokens.
    Invite {
        /// How many.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Valid for how many days (default: `token_days` of the config).
        #[arg(long)]
        days: Option<u64>,
    },
    /// List users and their devices.
    Users,
    /// List one user's devices.
    Devices {
        /// The local name.
        name: String,
    },
    /// Block a relay: devices it sponsors are dropped.
    Block {
        /// The relay's host.
        host: String,
    },
    /// Unblock a relay.
    Unblock {
        /// The relay's host.
        host: String,
    },
    /// Show totals.
    Stats,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let dir = RelayDir::new(&cli.dir);
    match cli.command {
        Command::Init { host, force } => {
            let key = dir.init(&host, force)?;
            let peer = chitchat_relay::net::keypair(&key)?.public().to_peer_id();
            println!("relay {host} initialised in {}", cli.dir.display());
            println!("key     {}", key.public().to_hex());
            println!("peer id {peer}");
            println!(
                "edit {} then run: chitchat-relay --dir {} run",
                dir.config().display(),
                cli.dir.display()
            );
            Ok(())
        }
        Command::Run { dev } => run(&dir, dev).await,
        command => admin_command(&dir, command).await,
    }
}

async fn run(dir: &RelayDir, dev: bool) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut config = Config::load(&dir.config())?;
    if dev {
        config.files.bind = vec!["127.0.0.1:0".into()];
        config.listen = vec![
            "/ip4/127.0.0.1/tcp/0".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "/ip4/127.0.0.1/tcp/0/ws".into(),
        ];
        config.http = "127.0.0.1:0".parse()?;
        config.open_registration = true;
    }
    let key = dir.load_key()?;
    let admin_token = dir.load_admin_token()?;
    let store = match Store::open(&dir.db(), config.max_batch) {
        Err(StoreError::Storage(redb::Error::DatabaseAlreadyOpen)) => {
            bail!("another relay is running on {}", dir.db().display())
        }
        other => other?,
    };
    let listen = config.listen.iter().map(|a| a.parse()).collect::<Result<Vec<_>, _>>()?;
    let http_addr = config.http;
    let metrics = Arc::new(Metrics::default());
    let waiters = Arc::new(Waiters::default());
    let relay_key = chitchat_proto::SecretKey::from_seed(*key.seed());
    let quota = InboxQuota { max_items: config.inbox.max_items, max_bytes: config.inbox.max_bytes };
    let (outbound_tx, outbound) = mpsc::channel(1024);
    let own_id = chitchat_proto::RelayId { host: config.host.clone(), key: relay_key.public() };
    let federation = Arc::new(Federation::new(
        own_id.clone(),
        config.federation.clone(),
        store.clone(),
        metrics.clone(),
        outbound_tx,
        config.inbox.retention_days,
    ));
    let f = &config.federation;
    let onward = QueueLimits {
        max_items: f.max_queue_items,
        max_bytes: f.max_queue_bytes,
        max_total_items: f.max_queued_total,
    };
    let sink = Arc::new(
        CommitFanout::new(
            store.clone(),
            relay_key.clone(),
            metrics.clone(),
            waiters.clone(),
            quota,
        )
        .with_federation(federation.clone(), onward)
        .with_history(config.history.limits()),
    );
    let options = GroupOptions {
        limits: OrderingLimits::default(),
        state_budget: config.ordering.max_state_bytes,
        snapshot_every: config.ordering.snapshot_every,
    };
    let ordering = Ordering::open(&dir.ordering_db(), options, sink.clone()).await?;
    let groups = Arc::new(
        Groups::open(
            own_id.clone(),
            relay_key.clone(),
            dir.ordering_groups(),
            options,
            sink,
            federation.clone(),
        )
        .await?,
    );
    tokio::spawn({
        let groups = groups.clone();
        async move {
            let mut seen = std::collections::BTreeSet::new();
            loop {
                tokio::time::sleep(chitchat_relay::groups::SWEEP_EVERY).await;
                groups.sweep(&mut seen).await;
            }
        }
    });
    let peers = Peers {
        ordering: ordering.clone(),
        groups: groups.clone(),
        federation: federation.clone(),
    };
    let files = chitchat_relay::files::RelayFiles::open(
        &dir.blobs(),
        &relay_key,
        &config.files.bind_addrs()?,
        config.files.advertise_addrs()?,
        store.clone(),
    )
    .await
    .with_context(|| format!("open the blob store in {}", dir.blobs().display()))?;
    let relay =
        Arc::new(Relay::new(config, relay_key, store, metrics, waiters, peers).with_files(files));
    let (shutdown_tx, shutdown) = watch::channel(false);

    // `/metrics`: gossipsub's own metrics (prefix `gossipsub_`) beside the relay's.
    let mut registry = prometheus_client::registry::Registry::default();
    let gossip =
        chitchat_net::gossip::Gossip::with_metrics(registry.sub_registry_with_prefix("gossipsub"))?;
    let (ready_tx, ready) = oneshot::channel();
    let net = tokio::spawn({
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        async move {
            chitchat_relay::net::run(relay, &key, gossip, listen, ready_tx, outbound, shutdown)
                .await
        }
    });
    let listening = tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .context("listen addresses not bound in 30 s")?
        .context("network failed to start")?;
    // Payloads queued for other relays before a stop go on their way again.
    federation.resume()?;

    let listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("http {http_addr}"))?;
    let http_bound = listener.local_addr()?;
    let state = Arc::new(HttpState::new(relay.clone(), &listening, admin_token, registry));
    let http = tokio::spawn({
        let mut shutdown = shutdown.clone();
        async move {
            axum::serve(listener, chitchat_relay::http::router(state))
                .with_graceful_shutdown(async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                })
                .await
        }
    });

    let retention = tokio::spawn({
        let (relay, mut shutdown) = (relay.clone(), shutdown.clone());
        async move {
            // Hourly; every second under the test switch that makes pins short.
            let every = if chitchat_relay::service::short_file_expiry() {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(3600)
            };
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => break,
                }
                relay.forget_idle_limits();
                match relay.expire(now()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(expired = n, "retention clean-up"),
                    Err(e) => tracing::warn!(error = %e, "retention clean-up failed"),
                }
                match relay.expire_files(now()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(unpinned = n, "expired files unpinned"),
                    Err(e) => tracing::warn!(error = %e, "file clean-up failed"),
                }
                match relay.federation().expire(now()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(dropped = n, "payloads for other relays expired"),
                    Err(e) => tracing::warn!(error = %e, "federation clean-up failed"),
                }
            }
        }
    });

    // When devices were last seen, written once a minute (and once more at shutdown).
    let seen = tokio::spawn({
        let (relay, mut shutdown) = (relay.clone(), shutdown.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => break,
                }
                if let Err(e) = relay.flush_seen().await {
                    tracing::warn!(error = %e, "last-seen times not written");
                }
            }
            if let Err(e) = relay.flush_seen().await {
                tracing::warn!(error = %e, "last-seen times not written");
            }
        }
    });

    let info = RunInfo {
        peer_id: listening.peer_id.to_string(),
        addrs: listening.addrs.iter().map(ToString::to_string).collect(),
        http: http_bound.to_string(),
        pid: std::process::id(),
    };
    dir.write_run_info(&info)?;
    tracing::info!(host = %relay.id().host, peer_id = %info.peer_id, http = %info.http, "relay running");

    wait_for_signal().await;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = net.await;
        let _ = http.await;
        let _ = retention.await;
        let _ = seen.await;
    })
    .await;
    groups.shutdown().await;
    ordering.shutdown().await;
    if let Some(files) = relay.files() {
        files.blobs().shutdown().await;
    }
    let _ = std::fs::remove_file(dir.run_info());
    Ok(())
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

/// Runs an admin command on the database if the relay is stopped, or through the running
/// relay's admin API if it holds the database.
async fn admin_command(dir: &RelayDir, command: Command) -> anyhow::Result<()> {
    let config = Config::load(&dir.config())?;
    match Store::open(&dir.db(), 1) {
        Ok(store) => offline(&store, &config, command).await,
        Err(StoreError::Storage(redb::Error::DatabaseAlreadyOpen)) => online(dir, &config, command),
        Err(e) => Err(e.into()),
    }
}

async fn offline(store: &Store, config: &Config, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Invite { count, days } => {
            for t in admin::invite(store, count, days.unwrap_or(config.token_days), now()).await? {
                println!("{t}");
            }
        }
        Command::Users => print_json(&admin::users(store)?)?,
        Command::Devices { name } => print_json(&admin::devices(store, &name)?)?,
        Command::Block { host } => admin::block(store, &host, true, now()).await?,
        Command::Unblock { host } => admin::block(store, &host, false, now()).await?,
        Command::Stats => print_json(&admin::stats(store)?)?,
        Command::Init { .. } | Command::Run { .. } => unreachable!("handled in main"),
    }
    Ok(())
}

fn online(dir: &RelayDir, config: &Config, command: Command) -> anyhow::Result<()> {
    let http = dir.load_run_info().map_or_else(|| config.http.to_string(), |r| r.http);
    let token = dir.load_admin_token()?;
    let auth = format!("Bearer {token}");
    let url = |path: &str| format!("http://{http}{path}");
    let fail = |e: ureq::Error| anyhow::anyhow!("admin API at {http}: {e}");
    match command {
        Command::Invite { count, days } => {
            let body = InviteRequest { count: Some(count), days };
            let tokens: Vec<String> = ureq::post(&url("/admin/invite"))
                .header("Authorization", &auth)
                .send_json(&body)
                .map_err(fail)?
                .body_mut()
                .read_json()
                .map_err(fail)?;
            for t in tokens {
                println!("{t}");
            }
        }
        Command::Users | Command::Stats | Command::Devices { .. } => {
            let path = match &command {
                Command::Users => "/admin/users".to_owned(),
                Command::Stats => "/admin/stats".to_owned(),
                Command::Devices { name } => format!("/admin/devices?name={name}"),
                _ => unreachable!("matched above"),
            };
            let value: serde_json::Value = ureq::get(&url(&path))
                .header("Authorization", &auth)
                .call()
                .map_err(fail)?
                .body_mut()
                .read_json()
                .map_err(fail)?;
            print_json(&value)?;
        }
        Command::Block { ref host } | Command::Unblock { ref host } => {
            let (host, blocked) = (host.clone(), matches!(command, Command::Block { .. }));
            ureq::post(&url("/admin/block"))
                .header("Authorization", &auth)
                .send_json(&BlockRequest { host, blocked })
                .map_err(fail)?;
        }
        Command::Init { .. } | Command::Run { .. } => unreachable!("handled in main"),
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
