//! The relay's HTTP side: `/.well-known/chitchat/relay`, `/health`, `/metrics`, and the admin
//! API (`/admin/*`, bearer token from `DIR/admin.token`) that the CLI uses while the relay runs.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::admin::{self, AdminError};
use crate::net::Listening;
use crate::service::{Relay, now};

/// What `/.well-known/chitchat/relay` serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WellKnown {
    /// The relay's host name.
    pub host: String,
    /// Its Ed25519 key (hex): the key that signs sponsorships and epoch certificates.
    pub key: String,
    /// Its libp2p peer id (derived from the same key).
    pub peer_id: String,
    /// Addresses to dial (multiaddrs).
    pub addrs: Vec<String>,
    /// Where its blob endpoint (iroh, QUIC) listens, `IP:PORT`; its endpoint id is `key`.
    /// Absent for a relay that keeps no files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
}

/// Shared state of the HTTP handlers.
#[derive(Debug)]
pub struct HttpState {
    /// The relay.
    pub relay: Arc<Relay>,
    /// What `.well-known` serves.
    pub well_known: WellKnown,
    /// The metrics registry.
    pub registry: Registry,
    /// The admin bearer token.
    pub admin_token: String,
}

impl HttpState {
    /// The state for a relay listening at `listening`. The relay's metrics join `registry`.
    pub fn new(
        relay: Arc<Relay>,
        listening: &Listening,
        admin_token: String,
        mut registry: Registry,
    ) -> Self {
        let config = relay.config();
        let addrs = if config.advertise.is_empty() {
            listening.addrs.iter().map(|a| format!("{a}/p2p/{}", listening.peer_id)).collect()
        } else {
            config.advertise.clone()
        };
        let well_known = WellKnown {
            host: relay.id().host.clone(),
            key: relay.id().key.to_hex(),
            peer_id: listening.peer_id.to_string(),
            addrs,
            files: relay
                .files()
                .map(|f| f.addrs())
                .unwrap_or_default()
                .iter()
                .map(ToString::to_string)
                .collect(),
        };
        relay.metrics().register(&mut registry);
        Self { relay, well_known, registry, admin_token }
    }
}

/// The routes.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/.well-known/chitchat/relay", get(well_known))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/admin/invite", post(invite))
        .route("/admin/users", get(users))
        .route("/admin/devices", get(devices))
        .route("/admin/block", post(block))
        .route("/admin/stats", get(stats))
        .with_state(state)
}

async fn well_known(State(s): State<Arc<HttpState>>) -> Json<WellKnown> {
    Json(s.well_known.clone())
}

async fn health(State(s): State<Arc<HttpState>>) -> Response {
    match s.relay.store().stats() {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")).into_response(),
    }
}

async fn metrics(State(s): State<Arc<HttpState>>) -> Response {
    if let Err(e) = s.relay.refresh_gauges().await {
        tracing::warn!(error = %e, "could not refresh gauges");
    }
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
        .into_response()
}

/// An admin API failure, as JSON `{ "error": ... }`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let status = match e {
            AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self(status, e.to_string())
    }
}

fn authorize(s: &HttpState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare in constant time.
    let (a, b) = (given.as_bytes(), s.admin_token.as_bytes());
    // An empty configured token never matches (the relay refuses to start with one anyway).
    let same = !b.is_empty()
        && a.len() == b.len()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if same { Ok(()) } else { Err(ApiError(StatusCode::UNAUTHORIZED, "bad admin token".into())) }
}

/// Body of `POST /admin/invite`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct InviteRequest {
    /// How many tokens (default 1).
    pub count: Option<u32>,
    /// Valid for how many days (default: the config's `token_days`).
    pub days: Option<u64>,
}

async fn invite(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Json(req): Json<InviteRequest>,
) -> Result<Json<Vec<String>>, ApiError> {
    authorize(&s, &headers)?;
    let days = req.days.unwrap_or(s.relay.config().token_days);
    Ok(Json(admin::invite(s.relay.store(), req.count.unwrap_or(1), days, now()).await?))
}

async fn users(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<admin::UserInfo>>, ApiError> {
    authorize(&s, &headers)?;
    Ok(Json(admin::users(s.relay.store())?))
}

/// Query of `GET /admin/devices`.
#[derive(Debug, Deserialize)]
pub struct DevicesQuery {
    /// The local name.
    pub name: String,
}

async fn devices(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Query(q): Query<DevicesQuery>,
) -> Result<Json<Vec<admin::DeviceInfo>>, ApiError> {
    authorize(&s, &headers)?;
    Ok(Json(admin::devices(s.relay.store(), &q.name)?))
}

/// Body of `POST /admin/block`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BlockRequest {
    /// The relay host.
    pub host: String,
    /// `true` blocks, `false` unblocks.
    pub blocked: bool,
}

async fn block(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
    Json(req): Json<BlockRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&s, &headers)?;
    admin::block(s.relay.store(), &req.host, req.blocked, now()).await?;
    Ok(Json(serde_json::json!({ "ok": true })))
}

async fn stats(
    State(s): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Json<crate::store::Stats>, ApiError> {
    authorize(&s, &headers)?;
    Ok(Json(admin::stats(s.relay.store())?))
}
