//! The local API: HTTP + JSON, and an event stream over WebSocket. Every request carries the
//! token from `api.token` (`Authorization: Bearer TOKEN`, or `?token=TOKEN` for the WebSocket
//! of a browser). The reference is `node/API.md`.
//!
//! Errors are JSON, `{"error": CODE, "message": TEXT}`, with a 4xx status for what the caller
//! can fix (bad JSON, unknown channel, not registered) and 5xx for what it cannot (the disk,
//! the relay).

use std::sync::Arc;

use axum::body::Bytes as Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use chitchat_proto::DeviceId;
use chitchat_proto::channel::MessageId;
use chitchat_proto::chat::{self, ChatContent};
use chitchat_proto::codec::Canonical as _;
use chitchat_proto::ordering::ChannelId;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::daemon::{Node, NodeError};
use crate::engine::{EngineError, Event, id_string, parse_seq, short_device};
use crate::store::StoreError;
use crate::view::{self, Content, MessageView};

/// Largest request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Messages one history or messages request returns, at most.
pub const MAX_LIMIT: usize = 100_000;

/// Shared state of the handlers.
#[derive(Debug)]
pub struct ApiState {
    /// The node.
    pub node: Arc<Node>,
    /// The token every request must carry.
    pub token: String,
}

/// An error as the API reports it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.code, "message": self.message}))).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let message = e.to_string();
        match e {
            NodeError::Engine(e) => e.into(),
            NodeError::Link(_) => Self::new(StatusCode::BAD_GATEWAY, "relay_unreachable", message),
            NodeError::Relay { code, .. } => {
                let status = match code {
                    "bad_request"
                    | "forbidden"
                    | "not_found"
                    | "token_invalid"
                    | "token_used"
                    | "registration_closed"
                    | "name_taken" => StatusCode::CONFLICT,
                    "rate_limited" | "quota_exceeded" => StatusCode::TOO_MANY_REQUESTS,
                    "revoked" => StatusCode::FORBIDDEN,
                    _ => StatusCode::BAD_GATEWAY,
                };
                Self::new(status, code, message)
            }
            NodeError::NotFound(_) => Self::not_found(message),
            NodeError::Invalid(_) => Self::bad(message),
            NodeError::File { code, .. } => {
                let status = match code {
                    "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
                    "quota_exceeded" => StatusCode::INSUFFICIENT_STORAGE,
                    "busy" | "not_fetched" | "fetched" => StatusCode::CONFLICT,
                    "upload" => StatusCode::BAD_REQUEST,
                    "storage" => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => StatusCode::BAD_GATEWAY,
                };
                Self::new(status, code, message)
            }
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::Store(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", message)
            }
            EngineError::Channel(_) => Self::new(StatusCode::CONFLICT, "channel", message),
            EngineError::UnknownChannel(_) => Self::not_found(message),
            EngineError::NotRegistered => {
                Self::new(StatusCode::CONFLICT, "not_registered", message)
            }
            EngineError::AlreadyRegistered(_) => {
                Self::new(StatusCode::CONFLICT, "already_registered", message)
            }
            EngineError::Left => Self::new(StatusCode::CONFLICT, "left", message),
            EngineError::ChannelExists(_) => {
                Self::new(StatusCode::CONFLICT, "channel_exists", message)
            }
            EngineError::Invalid(_) => Self::bad(message),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        EngineError::from(e).into()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body with a clear message when it is not what the route expects.
fn body<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

/// The routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/register", post(register))
        .route("/v1/devices", get(devices))
        .route("/v1/devices/link", post(offer_link))
        .route("/v1/devices/join", post(join_link))
        .route("/v1/devices/name", put(name_device))
        .route("/v1/devices/revoke", post(revoke_device))
        .route("/v1/devices/recovery", post(set_recovery))
        .route("/v1/network", get(network))
        .route("/v1/network/dial", post(dial))
        .route("/v1/network/lan", get(lan))
        .route("/v1/users/{address}", get(user))
        .route("/v1/channels", get(channels).post(create_channel))
        .route("/v1/channels/{channel}", get(channel_info))
        .route("/v1/channels/{channel}/members", get(members))
        .route("/v1/channels/{channel}/invite", post(invite))
        .route("/v1/channels/{channel}/remove", post(remove))
        .route("/v1/channels/{channel}/leave", post(leave))
        .route("/v1/channels/{channel}/move", post(move_onto_relays))
        .route("/v1/channels/{channel}/messages", get(messages).post(send))
        .route("/v1/channels/{channel}/history", get(history))
        .route("/v1/channels/{channel}/export", get(export))
        .route("/v1/channels/{channel}/files", post(send_file))
        .route("/v1/messages/{reference}", get(find_message))
        .route("/v1/messages/{reference}/fetch", post(fetch_file))
        .route("/v1/messages/{reference}/file", get(read_file))
        .route("/v1/messages/{reference}/request", post(request_file))
        .route("/v1/events", get(events))
        .fallback(|| async { ApiError::not_found("no such route; see node/API.md") })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

/// Turns every error answer that is not JSON yet (a method a route does not take, query
/// parameters or a body axum refused before a handler ran) into the API's JSON error.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 16 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => String::new(),
    };
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method_not_allowed", "this route does not take that method; see node/API.md".into())
        }
        StatusCode::PAYLOAD_TOO_LARGE => {
            ("too_large", format!("the body is over {MAX_BODY} bytes"))
        }
        s if s.is_client_error() => ("bad_request", text),
        _ => ("internal", text),
    };
    let mut answer = ApiError::new(status, code, message).into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        answer.headers_mut().insert(header::ALLOW, allow.clone());
    }
    answer
}

/// `limit` as the API takes it: at least 1; more than [`MAX_LIMIT`] is [`MAX_LIMIT`].
fn limit(given: Option<usize>, default: usize) -> ApiResult<usize> {
    match given {
        Some(0) => Err(ApiError::bad(format!("limit must be 1 to {MAX_LIMIT}"))),
        Some(n) => Ok(n.min(MAX_LIMIT)),
        None => Ok(default),
    }
}

/// Compares in time independent of where the strings differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(State(s): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let header_token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query_token =
        request.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    match header_token.or(query_token) {
        Some(t) if same(t, &s.token) => next.run(request).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong API token")
            .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing API token: send `Authorization: Bearer TOKEN` (the token is in api.token)",
        )
        .into_response(),
    }
}

async fn status(State(s): State<Arc<ApiState>>) -> ApiResult<Json<Value>> {
    let link =
        s.node.link_state().map(|l| json!({"connected": l.connected, "since_ms": l.since.0}));
    let revoked = s.node.is_revoked();
    let v = s
        .node
        .with(move |e| {
            let account = e.account().map(|a| {
                json!({
                    "address": format!("{}@{}", a.local_name, a.relay.id.host),
                    "relay": a.relay.url,
                    "relay_host": a.relay.id.host,
                })
            });
            let forks: Vec<Value> = e
                .forks()
                .unwrap_or_else(|err| {
                    tracing::warn!(error = %err, "cannot read the forks");
                    Vec::new()
                })
                .iter()
                .map(|f| {
                    json!({
                        "channel": f.channel.to_string(),
                        "epoch": f.epoch,
                        "device": f.device.0.to_hex(),
                        "member": e.name_of(&f.device),
                        "kind": format!("{:?}", f.kind),
                        "at_ms": f.at.0,
                    })
                })
                .collect();
            json!({
                "device": e.device().0.to_hex(),
                "account": account,
                "channels": e.channels().count(),
                "dropped": e.dropped(),
                "convicted": e.convictions(),
                "forks": forks,
                "relay_link": link,
                "revoked": revoked,
                "version": crate::VERSION,
            })
        })
        .await;
    Ok(Json(v))
}

/// This node's peer id, the addresses peers can dial it at, and the peers connected now.
async fn network(State(s): State<Arc<ApiState>>) -> ApiResult<Json<Value>> {
    let (peer_id, listening, peers) = s.node.network().await?;
    Ok(Json(json!({ "peer_id": peer_id, "listening": listening, "peers": peers })))
}

/// The peers found on the local network (mDNS), with the device and name each gives.
async fn lan(State(s): State<Arc<ApiState>>) -> ApiResult<Json<Value>> {
    let peers: Vec<Value> = s
        .node
        .lan()
        .await?
        .into_iter()
        .map(|(p, dir)| {
            json!({
                "peer_id": p.peer_id,
                "addrs": p.addrs,
                "connected": p.connected,
                "device": dir.as_ref().map(|d| d.device().0.to_hex()),
                "name": dir.as_ref().map(|d| d.body.profile.display_name.clone()),
                "sponsored": dir.as_ref().map(|d| d.body.sponsorships.iter().map(|s| s.address().to_string()).collect::<Vec<_>>()),
            })
        })
        .collect();
    Ok(Json(json!({ "peers": peers })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DialBody {
    addr: String,
}

/// Connects to a peer at a libp2p address ending in `/p2p/PEER_ID`.
async fn dial(State(s): State<Arc<ApiState>>, bytes: Body) -> ApiResult<Json<Value>> {
    let b: DialBody = body(&bytes)?;
    s.node.dial(&b.addr).await?;
    Ok(Json(json!({ "dialling": b.addr })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    relay: String,
    token: Option<String>,
    name: String,
}

async fn register(State(s): State<Arc<ApiState>>, bytes: Body) -> ApiResult<Json<Value>> {
    let b: RegisterBody = body(&bytes)?;
    let account = s.node.register(&b.relay, b.token, &b.name).await?;
    // The first device of a new user sets the recovery code (shown once); registering into a
    // name that has one, or a failure here, leaves it unset: `POST /v1/devices/recovery`.
    let recovery = match s.node.set_recovery().await {
        Ok(code) => Some(code.to_string()),
        Err(e) => {
            tracing::warn!(error = %e, "no recovery code set at registration");
            None
        }
    };
    Ok(Json(json!({
        "address": format!("{}@{}", account.local_name, account.relay.id.host),
        "device": account.dir.device().0.to_hex(),
        "recovery_code": recovery,
    })))
}

/// This user's devices as the relay lists them: each one's name, record, registration, when it
/// was last seen, and whether it and this device list each other.
async fn devices(State(s): State<Arc<ApiState>>) -> ApiResult<Json<Value>> {
    let account = s
        .node
        .with(|e| e.account().cloned())
        .await
        .ok_or(ApiError::from(EngineError::NotRegistered))?;
    let address = format!("{}@{}", account.local_name, account.relay.id.host);
    let me = account.dir.device();
    let entries = s.node.own_devices().await?;
    let list: Vec<Value> = entries
        .iter()
        .map(|d| {
            let device = d.dir.device();
            json!({
                "device": device.0.to_hex(),
                "this_device": device == me,
                "name": d.name,
                "linked": device == me
                    || chitchat_proto::identity::linked(&account.dir, &d.dir).is_ok(),
                "record_seq": d.dir.body.seq,
                "registered_ms": d.registered.0,
                "last_seen_ms": d.last_seen.map(|t| t.0),
                "revoked": d.revocation.is_some(),
                "revoked_by": d.revocation.as_ref().map(|r| {
                    r.signers.iter().map(|(d, _)| d.0.to_hex()).collect::<Vec<_>>()
                }),
                "revoked_with_recovery_code": d.revocation.as_ref().map(|r| r.recovery.is_some()),
            })
        })
        .collect();
    Ok(Json(json!({ "address": address, "devices": list })))
}

/// Opens a link for a new device of this user: the code to show it (and to put in a QR
/// code), and until when it works. The node answers the new device by itself; the event
/// stream says `device_linked` (or `link_failed`).
async fn offer_link(State(s): State<Arc<ApiState>>) -> ApiResult<Json<Value>> {
    let offer = s.node.offer_link().await?;
    Ok(Json(json!({ "code": offer.code.to_string(), "expires_ms": offer.expires.0 })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    code: String,
    name: Option<String>,
}

/// Completes a link on this device (registered nowhere) with the code another device of the
/// user showed; `name` names this device in the user's list.
async fn join_link(State(s): State<Arc<ApiState>>, bytes: Body) -> ApiResult<Json<Value>> {
    let b: JoinBody = body(&bytes)?;
    let account = s.node.join_link(&b.code, b.name).await?;
    Ok(Json(json!({
        "address": format!("{}@{}", account.local_name, account.relay.id.host),
        "device": account.dir.device().0.to_hex(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    device: String,
    recovery_code: Option<String>,
}

/// Signs the revocation of another device of this user (id, id prefix, or name); the relay
/// revokes it once enough of the user's devices signed (or this one with the recovery code).
async fn revoke_device(State(s): State<Arc<ApiState>>, bytes: Body) -> ApiResult<Json<Value>> {
    let b: RevokeBody = body(&bytes)?;
    let r = s.node.revoke_device(&b.device, b.recovery_code.as_deref()).await?;
    Ok(Json(json!({
        "device": r.device.0.to_hex(),
        "revoked": r.revoked,
        "signed": r.signed,
        "needed": r.needed,
    })))
}

/// Sets the user's recovery code, if it has none and this is its only device.
async fn set_recovery(State(s): State<Arc<ApiState>>) -> ApiResult<Json<Value>> {
    let code = s.node.set_recovery().await?;
    Ok(Json(json!({ "recovery_code": code.to_string() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameBody {
    name: String,
}

/// Names this device in the user's list.
async fn name_device(State(s): State<Arc<ApiState>>, bytes: Body) -> ApiResult<Json<Value>> {
    let b: NameBody = body(&bytes)?;
    s.node.name_device(b.name.clone()).await?;
    Ok(Json(json!({ "name": b.name })))
}

/// A user of any relay (`bob@other.host`), with the devices whose records verify.
async fn user(
    State(s): State<Arc<ApiState>>,
    Path(address): Path<String>,
) -> ApiResult<Json<Value>> {
    let dirs = s.node.lookup(&address).await?;
    let host = address.rsplit_once('@').map(|(_, h)| h.to_owned()).unwrap_or_default();
    let relay_key = s
        .node
        .with(move |e| {
            let home = e.account().map(|a| a.relay.id.clone()).filter(|r| r.host == host);
            home.or_else(|| e.relays().find(|r| r.host == host).cloned()).map(|r| r.key.to_hex())
        })
        .await;
    let list: Vec<Value> = dirs
        .iter()
        .map(|d| {
            json!({
                "device": d.device().0.to_hex(),
                "name": d.body.profile.display_name,
                "record_seq": d.body.seq,
            })
        })
        .collect();
    Ok(Json(json!({ "address": address, "relay_key": relay_key, "devices": list })))
}

/// A channel's summary.
#[derive(Serialize)]
struct ChannelSummary {
    id: String,
    name: String,
    mime: String,
    epoch: Option<u64>,
    members: usize,
    left: bool,
}

async fn channels(State(s): State<Arc<ApiState>>) -> ApiResult<Json<Value>> {
    let list: Vec<ChannelSummary> = s
        .node
        .with(|e| {
            e.channels()
                .map(|(id, record, channel)| ChannelSummary {
                    id: id.to_string(),
                    name: record.name.clone(),
                    mime: record.mime.clone(),
                    epoch: channel.map(|c| c.epoch()),
                    members: channel.map_or(0, |c| c.members().len()),
                    left: record.left || channel.is_none_or(|c| !c.is_active()),
                })
                .collect()
        })
        .await;
    Ok(Json(json!({ "channels": list })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    #[serde(default)]
    mime: Option<String>,
    /// Whether every member may add and remove members (default: only the creator).
    #[serde(default)]
    open: bool,
    /// Relay-less: ordered by this device, for peers met directly (a LAN).
    #[serde(default)]
    lan: bool,
}

async fn create_channel(State(s): State<Arc<ApiState>>, bytes: Body) -> ApiResult<Json<Value>> {
    let b: CreateBody = body(&bytes)?;
    let mime = b.mime.unwrap_or_else(|| chat::MIME.to_owned());
    let id = s.node.create_channel(b.name, mime, b.open, b.lan).await?;
    Ok(Json(json!({ "id": id.to_string() })))
}

/// Finds a channel by full id, unique id prefix, or unique name.
async fn resolve_channel(s: &ApiState, reference: &str) -> ApiResult<ChannelId> {
    resolve_channel_mime(s, reference).await.map(|(id, _)| id)
}

/// Like [`resolve_channel`], with the channel's MIME type. A name matching several channels
/// means the active one if only one is (the others were left); otherwise the answer lists their
/// ids.
async fn resolve_channel_mime(s: &ApiState, reference: &str) -> ApiResult<(ChannelId, String)> {
    let reference = reference.to_owned();
    let found: Vec<(ChannelId, String, bool)> = s
        .node
        .with(move |e| {
            let by_id: Vec<(ChannelId, String, bool)> = e
                .channels()
                .filter(|(id, _, _)| reference.len() >= 4 && id.to_string().starts_with(&reference))
                .map(|(id, r, _)| (id, r.mime.clone(), r.left))
                .collect();
            if !by_id.is_empty() {
                return by_id;
            }
            e.channels()
                .filter(|(_, r, _)| r.name == reference)
                .map(|(id, r, _)| (id, r.mime.clone(), r.left))
                .collect()
        })
        .await;
    let active: Vec<(ChannelId, String, bool)> = found.iter().filter(|c| !c.2).cloned().collect();
    match (found.as_slice(), active.as_slice()) {
        ([one], _) | (_, [one]) => Ok((one.0, one.1.clone())),
        ([], _) => Err(ApiError::not_found("no such channel (give its name or id)")),
        (several, _) => {
            let ids: Vec<String> = several.iter().map(|c| c.0.to_string()).collect();
            Err(ApiError::bad(format!(
                "several channels match; give more of the id: {}",
                ids.join(", ")
            )))
        }
    }
}

async fn channel_info(
    State(s): State<Arc<ApiState>>,
    Path(channel): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = resolve_channel(&s, &channel).await?;
    let v = s
        .node
        .with(move |e| -> Result<Value, EngineError> {
            let stored = e.store().count_messages(&id)?;
            let (record, channel) = e.channel(&id)?;
            Ok(json!({
                "messages": stored,
                "id": id.to_string(),
                "name": record.name,
                "mime": record.mime,
                "epoch": channel.map(|c| c.epoch()),
                "relays": channel.map(|c| c.config().relays.iter().map(|r| r.host.clone()).collect::<Vec<_>>()),
                "left": record.left,
                "joined_ms": record.joined.0,
            }))
        })
        .await?;
    Ok(Json(v))
}

async fn members(
    State(s): State<Arc<ApiState>>,
    Path(channel): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = resolve_channel(&s, &channel).await?;
    let v = s
        .node
        .with(move |e| -> Result<Value, EngineError> {
            let me = e.device();
            let list: Vec<Value> = e
                .members(&id)?
                .iter()
                .map(|d| {
                    json!({
                        "device": d.0.to_hex(),
                        "name": e.name_of(d),
                        "this_device": *d == me,
                    })
                })
                .collect();
            Ok(json!({ "channel": id.to_string(), "epoch": e.epoch(&id), "members": list }))
        })
        .await?;
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteBody {
    address: String,
}

async fn invite(
    State(s): State<Arc<ApiState>>,
    Path(channel): Path<String>,
    bytes: Body,
) -> ApiResult<Json<Value>> {
    let b: InviteBody = body(&bytes)?;
    let id = resolve_channel(&s, &channel).await?;
    let added = s.node.invite(id, &b.address).await?;
    let epoch = s.node.with(move |e| e.epoch(&id)).await;
    Ok(Json(json!({
        "added": added.iter().map(|d| d.0.to_hex()).collect::<Vec<_>>(),
        "epoch": epoch,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveBody {
    /// An address (every device of that user) or a device id (or a unique prefix of one).
    member: String,
}

async fn remove(
    State(s): State<Arc<ApiState>>,
    Path(channel): Path<String>,
    bytes: Body,
) -> ApiResult<Json<Value>> {
    let b: RemoveBody = body(&bytes)?;
    let id = resolve_channel(&s, &channel).await?;
    let member = b.member.clone();
    let devices: Vec<DeviceId> = s
        .node
        .with(move |e| -> Result<Vec<DeviceId>, EngineError> {
            Ok(e.members(&id)?
                .into_iter()
                .filter(|d| {
                    e.name_of(d) == member
                        || (member.len() >= 4 && d.0.to_hex().starts_with(&member.to_lowercase()))
                })
                .collect())
        })
        .await?;
    if devices.is_empty() {
        return Err(ApiError::not_found(format!("{} is not a member", b.member)));
    }
    s.node.remove(id, devices.clone()).await?;
    let epoch = s.node.with(move |e| e.epoch(&id)).await;
    Ok(Json(json!({
        "removed": devices.iter().map(|d| d.0.to_hex()).collect::<Vec<_>>(),
        "epoch": epoch,
    })))
}

async fn leave(
    State(s): State<Arc<ApiState>>,
    Path(channel): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = resolve_channel(&s, &channel).await?;
    s.node.leave(id).await?;
    Ok(Json(json!({ "left": id.to_string() })))
}

async fn move_onto_relays(
    State(s): State<Arc<ApiState>>,
    Path(channel): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = resolve_channel(&s, &channel).await?;
    let relays = s.node.move_onto_relays(id).await?;
    let epoch = s.node.with(move |e| e.epoch(&id)).await;
    Ok(Json(json!({ "relays": relays, "epoch": epoch })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    /// `text/chitchat` content.
    #[serde(default)]
    content: Option<Content>,
    /// Shorthand for `{"type": "text", "body": TEXT}`.
    #[serde(default)]
    text: Option<String>,
    /// For channels of other MIME types: the payload, base64.
    #[serde(default)]
    payload_base64: Option<String>,
}

/// Resolves a message reference: `SENDER:EPOCH.N` (full id or a prefix of at least 4 hex
/// digits of the sender), optionally restricted to one channel.
async fn resolve_message(
    s: &ApiState,
    reference: &str,
    channel: Option<ChannelId>,
) -> ApiResult<(ChannelId, MessageId)> {
    let (sender, seq) = reference.split_once(':').ok_or_else(|| {
        ApiError::bad(format!("message id {reference:?}: expected SENDER:EPOCH.N"))
    })?;
    let seq = parse_seq(seq)
        .ok_or_else(|| ApiError::bad(format!("message id {reference:?}: bad sequence number")))?;
    let sender = sender.to_lowercase();
    if sender.len() < 4 || sender.len() > 64 || !sender.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad(format!(
            "message id {reference:?}: the sender is 4 to 64 hex digits"
        )));
    }
    let prefix = hex::decode(&sender[..sender.len() & !1])
        .map_err(|e| ApiError::bad(format!("message id {reference:?}: {e}")))?;
    let found = s
        .node
        .with(move |e| e.store().find_messages(&prefix, seq, 16))
        .await?
        .into_iter()
        .filter(|(c, id)| {
            id.sender.0.to_hex().starts_with(&sender) && channel.is_none_or(|want| want == *c)
        })
        .collect::<Vec<_>>();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(ApiError::not_found(format!("no message {reference}"))),
        _ => Err(ApiError::bad(format!("message id {reference:?} is ambiguous; give more of it"))),
    }
}

async fn send(
    State(s): State<Arc<ApiState>>,
    Path(channel): Path<String>,
    bytes: Body,
) -> ApiResult<Json<Value>> {
    let b: SendBody = body(&bytes)?;
    // One trip to the engine to find the channel; sending is the other.
    let (id, mime) = resolve_channel_mime(&s, &channel).await?;
    let (payload, store) = if mime == chat::MIME {
        let content = match (b.content, b.text, b.payload_base64) {
            (Some(c), None, None) => c,
            (None, Some(body), None) => Content::Text { body },
            _ => {
                return Err(ApiError::bad(
                    "a text/chitchat channel takes exactly one of `content` or `text`",
                ));
            }
        };
        let mut resolved = Vec::new();
        for r in referenced(&content) {
            resolved.push((r.clone(), resolve_message(&s, &r, Some(id)).await?.1));
        }
        let chat = content
            .to_chat(|r| {
                resolved
                    .iter()
                    .find(|(k, _)| k == r)
                    .map(|(_, v)| *v)
                    .ok_or_else(|| format!("unresolved {r}"))
            })
            .map_err(ApiError::bad)?;
        let store = !matches!(chat, ChatContent::Typing { .. });
        (chat.to_bytes(), store)
    } else {
        let Some(p) = b.payload_base64 else {
            return Err(ApiError::bad(format!(
                "a {mime} channel takes `payload_base64` (the payload in base64)"
            )));
        };
        let payload = base64::engine::general_purpose::STANDARD
            .decode(p)
            .map_err(|e| ApiError::bad(format!("payload_base64: {e}")))?;
        if payload.len() > chitchat_proto::wire::MAX_INBOX_PAYLOAD_LEN / 2 {
            return Err(ApiError::bad("payload too large (at most 128 KiB)"));
        }
        (payload, true)
    };
    let msg = s.node.send(id, payload, store).await?;
    Ok(Json(json!({ "id": id_string(&msg), "status": "sending" })))
}

fn referenced(c: &Content) -> Vec<String> {
    match c {
        Content::Reply { to, .. } => vec![to.clone()],
        Content::Edit { target, .. }
        | Content::Delete { target }
        | Content::Reaction { target, .. }
        | Content::FileRequest { target } => vec![target.clone()],
        Content::ReadReceipt { up_to } => vec![up_to.clone()],
        _ => vec![],
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    #[serde(default)]
    limit: Option<usize>,
    /// The API token, when given in the query (read by the middleware).
    #[serde(default, rename = "token")]
    _token: Option<String>,
}

async fn load_messages(
    s: &ApiState,
    id: ChannelId,
    limit: usize,
) -> ApiResult<(String, Vec<crate::store::StoredMessage>, Failures)> {
    let limit = limit.min(MAX_LIMIT);
    let (mime, messages, failures) = s
        .node
        .with(move |e| -> Result<_, EngineError> {
            let mime = e.channel(&id)?.0.mime.clone();
            let messages = e.store().messages(&id, limit)?;
            let mut failures = Failures::new();
            for m in messages.iter().filter(|m| m.status == crate::store::MessageStatus::Failed) {
                if let Some(reason) = e.failure(&id, &m.id)? {
                    failures.insert(id_string(&m.id), reason);
                }
            }
            Ok((mime, messages, failures))
        })
        .await?;
    Ok((mime, messages, failures))
}

/// Why this device's failed messages failed, by message id (string).
type Failures = std::collections::BTreeMap<String, String>;

/// Views of stored messages, with the reasons of failed ones.
fn views(
    stored: &[crate::store::StoredMessage],
    mime: &str,
    failures: &Failures,
    names: &Names,
) -> Vec<MessageView> {
    stored
        .iter()
        .map(|m| {
            let mut v = MessageView::new(m, mime, |d| lookup_name(names, d));
            v.failure = failures.get(&v.id).cloned();
            v
        })
        .collect()
}

/// The folded chat history, with the reasons of failed messages.
fn chat_history(
    stored: &[crate::store::StoredMessage],
    failures: &Failures,
    names: &Names,
) -> view::ChatHistory {
    let mut h = view::fold_chat(stored, |d| lookup_name(names, d), |d| lookup_user(names, d));
    for m in &mut h.messages {
        m.failure = failures.get(&m.id).cloned();
    }
    h
}

async fn messages(
    State(s): State<Arc<ApiState>>,
    Path(channel): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<Value>> {
    let id = resolve_channel(&s, &channel).await?;
    let (mime, stored, failures) = load_messages(&s, id, limit(q.limit, 1000)?).await?;
    let names = names(&s, &stored).await;
    let mut list = views(&stored, &mime, &failures, &names);
    let files: Vec<&mut view::FileView> = list
        .iter_mut()
        .filter_map(|m| match &mut m.content {
            Some(Content::Attachment { file, .. }) => Some(file),
            _ => None,
        })
        .collect();
    mark_fetched(&s, files).await;
    Ok(Json(json!({ "channel": id.to_string(), "mime": mime, "messages": list })))
}

/// Marks each file that is here as fetched.
async fn mark_fetched(s: &ApiState, files: Vec<&mut view::FileView>) {
    if files.is_empty() {
        return;
    }
    let hashes = files.iter().filter_map(|f| {
        let mut h = [0u8; 32];
        hex::decode_to_slice(&f.hash, &mut h).ok().map(|()| h)
    });
    let here = s.node.fetched(hashes.collect::<Vec<_>>()).await;
    for f in files {
        f.mark(&here);
    }
}

/// Each sender's name and user.
type Names = std::collections::BTreeMap<DeviceId, (String, chitchat_proto::channel::UserId)>;

async fn names(s: &ApiState, stored: &[crate::store::StoredMessage]) -> Names {
    let devices: std::collections::BTreeSet<DeviceId> =
        stored.iter().map(|m| m.id.sender).collect();
    s.node
        .with(move |e| devices.into_iter().map(|d| (d, (e.name_of(&d), e.user_of(&d)))).collect())
        .await
}

fn lookup_name(names: &Names, d: &DeviceId) -> String {
    names.get(d).map_or_else(|| short_device(d), |(n, _)| n.clone())
}

fn lookup_user(names: &Names, d: &DeviceId) -> chitchat_proto::channel::UserId {
    names.get(d).map_or(chitchat_proto::channel::UserId::Device(*d), |(_, u)| u.clone())
}

async fn history(
    State(s): State<Arc<ApiState>>,
    Path(channel): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<Value>> {
    let id = resolve_channel(&s, &channel).await?;
    let (mime, stored, failures) = load_messages(&s, id, MAX_LIMIT).await?;
    if mime != chat::MIME {
        return Err(ApiError::bad(format!(
            "history folds text/chitchat channels; this one is {mime} (use /messages)"
        )));
    }
    let names = names(&s, &stored).await;
    let mut h = chat_history(&stored, &failures, &names);
    let skip = h.messages.len().saturating_sub(limit(q.limit, MAX_LIMIT)?);
    h.messages.drain(..skip);
    let files: Vec<&mut view::FileView> =
        h.messages.iter_mut().filter_map(|m| m.attachment.as_mut()).collect();
    mark_fetched(&s, files).await;
    Ok(Json(json!({ "channel": id.to_string(), "history": h })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    #[serde(default)]
    format: Option<String>,
    /// The API token, when given in the query (read by the middleware).
    #[serde(default, rename = "token")]
    _token: Option<String>,
}

async fn export(
    State(s): State<Arc<ApiState>>,
    Path(channel): Path<String>,
    Query(q): Query<ExportQuery>,
) -> ApiResult<Response> {
    let id = resolve_channel(&s, &channel).await?;
    let (mime, stored, failures) = load_messages(&s, id, MAX_LIMIT).await?;
    let names = names(&s, &stored).await;
    let name =
        s.node.with(move |e| e.channel(&id).map(|(r, _)| r.name.clone()).unwrap_or_default()).await;
    match q.format.as_deref().unwrap_or("json") {
        "json" => {
            let messages = views(&stored, &mime, &failures, &names);
            let history = (mime == chat::MIME).then(|| chat_history(&stored, &failures, &names));
            Ok(Json(json!({
                "channel": id.to_string(),
                "name": name,
                "mime": mime,
                "messages": messages,
                "history": history,
            }))
            .into_response())
        }
        "text" => {
            let mut out = format!("# {name} ({id})\n");
            if mime == chat::MIME {
                let h = view::fold_chat(
                    &stored,
                    |d| lookup_name(&names, d),
                    |d| lookup_user(&names, d),
                );
                for m in h.messages {
                    out.push_str(&crate::cli::format_entry(&m));
                    out.push('\n');
                }
            } else {
                for m in &stored {
                    let v = MessageView::new(m, &mime, |d| lookup_name(&names, d));
                    out.push_str(&format!(
                        "{} {} {}: {} bytes\n",
                        crate::cli::format_time(v.time_ms),
                        v.short,
                        v.from,
                        m.payload.len()
                    ));
                }
            }
            Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], out).into_response())
        }
        other => Err(ApiError::bad(format!("format {other:?}: expected json or text"))),
    }
}

/// Resolves `SENDER:EPOCH.N` (or a short form), or `CHANNEL/SENDER:EPOCH.N`.
async fn locate(s: &ApiState, reference: &str) -> ApiResult<(ChannelId, MessageId)> {
    match reference.split_once('/') {
        Some((c, m)) => {
            let c = resolve_channel(s, c).await?;
            resolve_message(s, m, Some(c)).await
        }
        None => resolve_message(s, reference, None).await,
    }
}

async fn find_message(
    State(s): State<Arc<ApiState>>,
    Path(reference): Path<String>,
) -> ApiResult<Json<Value>> {
    let (channel, id) = locate(&s, &reference).await?;
    Ok(Json(json!({ "channel": channel.to_string(), "id": id_string(&id) })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQuery {
    /// The file's name as members see it.
    name: String,
    #[serde(default)]
    caption: Option<String>,
    /// The API token, when given in the query (read by the middleware).
    #[serde(default, rename = "token")]
    _token: Option<String>,
}

/// `POST /v1/channels/{channel}/files?name=NAME[&caption=TEXT]`: the body is the file, of any
/// size up to `[files] max_send_bytes`, streamed (never whole in memory); its `Content-Type`
/// is the file's MIME type.
async fn send_file(
    State(s): State<Arc<ApiState>>,
    Path(channel): Path<String>,
    Query(q): Query<FileQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let (id, mime) = resolve_channel_mime(&s, &channel).await?;
    if mime != chat::MIME {
        return Err(ApiError::bad(format!("a {mime} channel carries no files")));
    }
    let file_mime = match headers.get(header::CONTENT_TYPE) {
        Some(v) => v.to_str().map_err(|_| ApiError::bad("Content-Type: not ASCII"))?.to_owned(),
        None => "application/octet-stream".to_owned(),
    };
    let (msg, file, pinned) =
        s.node.send_file(id, q.name, file_mime, q.caption, body.into_data_stream()).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": id_string(&msg),
            "status": "sending",
            "file": view::FileView::of(&file, true),
            "relay_expires_ms": pinned,
        })),
    ))
}

/// `POST /v1/messages/{reference}/fetch`: fetches the file a message carries, unless it is
/// here; answers once it is here (progress goes out as `file` events).
async fn fetch_file(
    State(s): State<Arc<ApiState>>,
    Path(reference): Path<String>,
) -> ApiResult<Json<Value>> {
    let (channel, id) = locate(&s, &reference).await?;
    let attachment = s.node.attachment(channel, id).await?;
    let moved = s.node.fetch_file(&attachment).await?;
    Ok(Json(json!({
        "channel": channel.to_string(),
        "id": id_string(&id),
        "fetched": true,
        "moved": moved,
        "file": view::FileView::of(&attachment.file, true),
    })))
}

/// `POST /v1/messages/{reference}/request`: asks the channel's members for the file a message
/// carries again (no provider has it: its pins expired and its sender is away). A member whose
/// device holds it pins it at its relay again; fetch it then. `409 fetched` if it is here.
async fn request_file(
    State(s): State<Arc<ApiState>>,
    Path(reference): Path<String>,
) -> ApiResult<Json<Value>> {
    let (channel, id) = locate(&s, &reference).await?;
    let attachment = s.node.attachment(channel, id).await?;
    let request = s.node.request_file(&attachment).await?;
    Ok(Json(json!({
        "channel": channel.to_string(),
        "id": id_string(&request),
        "status": "sending",
        "file": id_string(&id),
    })))
}

/// `GET /v1/messages/{reference}/file`: the file, opened, streamed a chunk at a time.
async fn read_file(
    State(s): State<Arc<ApiState>>,
    Path(reference): Path<String>,
) -> ApiResult<Response> {
    let (channel, id) = locate(&s, &reference).await?;
    let attachment = s.node.attachment(channel, id).await?;
    if s.node.fetched([attachment.file.hash]).await.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_fetched",
            format!("the file is not here; fetch it first (POST /v1/messages/{reference}/fetch)"),
        ));
    }
    s.node.used_file(&attachment).await;
    let chunks = s.node.open_chunks(&attachment, 0)?.map(|c| c.map_err(std::io::Error::other));
    let file = &attachment.file;
    let disposition = format!(
        "attachment; filename*=UTF-8''{}",
        percent_encoding::utf8_percent_encode(&file.name, percent_encoding::NON_ALPHANUMERIC)
    );
    let mime = axum::http::HeaderValue::from_str(&file.mime)
        .unwrap_or(axum::http::HeaderValue::from_static("application/octet-stream"));
    Ok((
        [
            (header::CONTENT_TYPE, mime),
            (header::CONTENT_LENGTH, file.size.into()),
            (
                header::CONTENT_DISPOSITION,
                axum::http::HeaderValue::from_str(&disposition)
                    .map_err(|e| ApiError::bad(e.to_string()))?,
            ),
        ],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    channel: Option<String>,
    /// The API token, when given in the query (read by the middleware).
    #[serde(default, rename = "token")]
    _token: Option<String>,
}

async fn events(
    State(s): State<Arc<ApiState>>,
    Query(q): Query<EventsQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let ws = ws.map_err(|e| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_required",
            format!("/v1/events is a WebSocket: connect with a WebSocket client ({e})"),
        )
    })?;
    let channel = match &q.channel {
        Some(c) => Some(resolve_channel(&s, c).await?.to_string()),
        None => None,
    };
    let rx = s.node.subscribe().await;
    Ok(ws.on_upgrade(move |socket| stream_events(socket, rx, channel)))
}

/// The channel an event is about; `None` for the node's own (every stream gets those).
fn event_channel(e: &Event) -> Option<&str> {
    match e {
        Event::Message { channel, .. }
        | Event::Sent { channel, .. }
        | Event::Gossiped { channel, .. }
        | Event::Failed { channel, .. }
        | Event::Typing { channel, .. }
        | Event::Members { channel, .. }
        | Event::Joined { channel, .. }
        | Event::Removed { channel }
        | Event::Fork { channel, .. }
        | Event::File { channel, .. } => Some(channel),
        // Every stream hears of a convicted orderer: it matters to all its channels.
        Event::Relay { .. }
        | Event::Equivocation { .. }
        | Event::DeviceLinked { .. }
        | Event::LinkFailed { .. } => None,
    }
}

async fn stream_events(
    mut socket: WebSocket,
    mut rx: tokio::sync::broadcast::Receiver<Event>,
    channel: Option<String>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Ok(e) => {
                    if channel.as_deref().is_some_and(|c| event_channel(&e).is_some_and(|e| e != c)) {
                        continue;
                    }
                    let Ok(text) = serde_json::to_string(&e) else { continue };
                    if socket.send(WsMessage::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    let text = json!({"type": "lagged", "missed": n}).to_string();
                    if socket.send(WsMessage::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Closed) => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
