//! The relay's Prometheus metrics, served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a request counter: the request kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `register`, `enqueue`, `fetch`, ...
    pub kind: String,
}

/// Every metric of the relay.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests handled, by kind.
    pub requests: Family<KindLabel, Counter>,
    /// Requests answered with an error, by error code.
    pub errors: Family<KindLabel, Counter>,
    /// Items enqueued (durably).
    pub enqueues: Counter,
    /// Sealed bytes enqueued.
    pub enqueue_bytes: Counter,
    /// Items acknowledged and deleted.
    pub acks: Counter,
    /// Channel posts accepted (each fanned out to the channel's members).
    pub posts: Counter,
    /// Post copies not stored: the member's inbox was full or it is not served here.
    pub post_skips: Counter,
    /// Items served by fetches.
    pub fetched: Counter,
    /// Commits that won their epoch.
    pub commits_accepted: Counter,
    /// Commits that lost their epoch to another.
    pub commit_conflicts: Counter,
    /// Open libp2p connections.
    pub connections: Gauge,
    /// Items waiting in all inboxes (refreshed on scrape).
    pub inbox_depth: Gauge,
    /// Registered devices (refreshed on scrape).
    pub devices: Gauge,
    /// Channels this relay orders (refreshed on scrape).
    pub ordered_channels: Gauge,
    /// Bytes of ordering state, counted against `[ordering] max_state_bytes` (refreshed on
    /// scrape).
    pub ordering_state_bytes: Gauge,
    /// Requests from other relays handled, by kind.
    pub federation_requests: Family<KindLabel, Counter>,
    /// Requests to other relays that failed, by reason (`blocked`, `discovery`,
    /// `unreachable`, `refused`, `bad_answer`).
    pub federation_failures: Family<KindLabel, Counter>,
    /// Payloads another relay took from this relay's queues.
    pub forwarded: Counter,
    /// Queued payloads dropped: refused for good by the other relay, or expired.
    pub forward_dropped: Counter,
    /// Payloads waiting in the queues for other relays (refreshed on scrape).
    pub forward_queue: Gauge,
    /// Orderers convicted of equivocation (proofs kept in `convicted-0`).
    pub convicted: Gauge,
    /// Members' epoch reports fanned out.
    pub epoch_reports: Counter,
    /// Gossiped envelopes judged, by verdict (`accept`, `ignore`, `reject`).
    pub gossip: Family<KindLabel, Counter>,
    /// Peers banned for gossiping forgeries.
    pub gossip_bans: Counter,
    /// Files' blobs pinned for this relay's own users.
    pub files_pinned: Counter,
    /// Files' blobs replicated here from another relay of their channel.
    pub files_replicated: Counter,
    /// Replications that failed (the other relay unreachable, the blob not as announced, or
    /// over a limit here).
    pub file_replication_failures: Counter,
}

impl Metrics {
    /// Counts a gossip verdict.
    pub fn gossip(&self, verdict: &chitchat_proto::gossip::Verdict) {
        use chitchat_proto::gossip::Verdict;
        let kind = match verdict {
            Verdict::Accept => "accept",
            Verdict::Ignore(_) => "ignore",
            Verdict::Reject(_) => "reject",
        };
        self.gossip.get_or_create(&KindLabel { kind: kind.into() }).inc();
    }
}

impl Metrics {
    /// Registers every metric under the `chitchat_relay` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("chitchat_relay");
        r.register("requests", "Requests handled, by kind", self.requests.clone());
        r.register("errors", "Requests answered with an error, by code", self.errors.clone());
        r.register("enqueues", "Inbox items enqueued durably", self.enqueues.clone());
        r.register("gossip", "Gossiped envelopes judged, by verdict", self.gossip.clone());
        r.register("gossip_bans", "Peers banned for gossiping forgeries", self.gossip_bans.clone());
        r.register("files_pinned", "Files' blobs pinned for own users", self.files_pinned.clone());
        r.register(
            "files_replicated",
            "Files' blobs replicated from another relay of their channel",
            self.files_replicated.clone(),
        );
        r.register(
            "file_replication_failures",
            "Replications of files' blobs that failed",
            self.file_replication_failures.clone(),
        );
        r.register("enqueue_bytes", "Sealed bytes enqueued", self.enqueue_bytes.clone());
        r.register("acks", "Inbox items acknowledged and deleted", self.acks.clone());
        r.register("posts", "Channel posts accepted and fanned out", self.posts.clone());
        r.register(
            "post_skips",
            "Post copies not stored (inbox full or member not served here)",
            self.post_skips.clone(),
        );
        r.register("fetched", "Inbox items served", self.fetched.clone());
        r.register(
            "commits_accepted",
            "Commits that won their epoch",
            self.commits_accepted.clone(),
        );
        r.register(
            "commit_conflicts",
            "Commits that lost their epoch",
            self.commit_conflicts.clone(),
        );
        r.register("connections", "Open libp2p connections", self.connections.clone());
        r.register("inbox_depth", "Items waiting in all inboxes", self.inbox_depth.clone());
        r.register("devices", "Registered devices", self.devices.clone());
        r.register(
            "ordered_channels",
            "Channels ordered here, in this relay's own group and the groups it shares (a \
             channel that moved between groups may count in each that holds a copy)",
            self.ordered_channels.clone(),
        );
        r.register(
            "ordering_state_bytes",
            "Bytes of ordering state, against the configured budget",
            self.ordering_state_bytes.clone(),
        );
        r.register(
            "federation_requests",
            "Requests from other relays, by kind",
            self.federation_requests.clone(),
        );
        r.register(
            "federation_failures",
            "Requests to other relays that failed, by reason",
            self.federation_failures.clone(),
        );
        r.register("forwarded", "Payloads taken by other relays", self.forwarded.clone());
        r.register(
            "forward_dropped",
            "Queued payloads dropped (refused for good, or expired)",
            self.forward_dropped.clone(),
        );
        r.register(
            "forward_queue",
            "Payloads waiting for other relays",
            self.forward_queue.clone(),
        );
        r.register(
            "convicted",
            "Orderers convicted of equivocation (two signed commits for one epoch)",
            self.convicted.clone(),
        );
        r.register(
            "epoch_reports",
            "Members' epoch reports fanned out",
            self.epoch_reports.clone(),
        );
    }

    pub(crate) fn request(&self, kind: &str) {
        self.requests.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
    }

    pub(crate) fn federation_request(&self, kind: &str) {
        self.federation_requests.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
    }

    pub(crate) fn federation_failure(&self, reason: &str) {
        self.federation_failures.get_or_create(&KindLabel { kind: reason.to_owned() }).inc();
    }

    pub(crate) fn error(&self, code: &str) {
        self.errors.get_or_create(&KindLabel { kind: code.to_owned() }).inc();
    }
}
