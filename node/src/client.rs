//! A client of the local API, over TCP or a Unix socket (what the CLI uses).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::ApiListen;
use crate::home::NodeDir;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Idle connections kept for reuse, at most.
const MAX_IDLE: usize = 8;

type Connection = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Where the daemon's API is and its token. Clones share a small pool of kept-alive
/// connections.
#[derive(Clone)]
pub struct ApiClient {
    target: ApiListen,
    token: String,
    idle: std::sync::Arc<std::sync::Mutex<Vec<Connection>>>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient").field("target", &self.target).finish_non_exhaustive()
    }
}

impl ApiClient {
    /// The API of the daemon running on `dir` (from its `run.json` and `api.token`).
    pub fn from_home(dir: &NodeDir) -> anyhow::Result<Self> {
        let token = dir.read_token()?;
        let info = dir.load_run_info().with_context(|| {
            format!(
                "no daemon runs on {} (start it with `chitchat --home {} daemon`)",
                dir.root().display(),
                dir.root().display()
            )
        })?;
        let target = ApiListen::parse(&info.api)
            .with_context(|| format!("run.json names a bad API address {:?}", info.api))?;
        let target = match target {
            ApiListen::Unix(p) if p.is_relative() => ApiListen::Unix(dir.root().join(p)),
            t => t,
        };
        Ok(Self::new(target, token))
    }

    /// A client of the API at `target` with `token`.
    pub fn new(target: ApiListen, token: String) -> Self {
        Self { target, token, idle: Default::default() }
    }

    /// A kept-alive connection that is ready, or a new one.
    async fn connection(&self) -> anyhow::Result<Connection> {
        loop {
            let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
            match idle {
                Some(mut c) => {
                    if futures::future::poll_fn(|cx| c.poll_ready(cx)).await.is_ok() {
                        return Ok(c);
                    }
                }
                None => break,
            }
        }
        self.fresh_connection().await
    }

    async fn fresh_connection(&self) -> anyhow::Result<Connection> {
        let io = self.connect().await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Io>> {
        Ok(match &self.target {
            ApiListen::Tcp(addr) => {
                let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| {
                    format!("cannot reach the daemon at {addr}; is it running?")
                })?;
                tcp.set_nodelay(true)?;
                Box::new(tcp)
            }
            ApiListen::Unix(path) => Box::new(connect_unix(path).await?),
        })
    }

    /// Sends a request; returns the status and body.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let has_body = body.is_some();
        let body = Bytes::from(body.unwrap_or_default());
        let make = || {
            let mut request = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, "localhost")
                .header(hyper::header::AUTHORIZATION, format!("Bearer {}", self.token));
            if has_body {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            request.body(Full::new(body.clone()))
        };
        // A kept-alive connection the daemon closed in the meantime gives the request back
        // unsent: then it goes on a new connection (once). A GET that the closing connection
        // took but never answered goes again too (it changes nothing).
        let mut sender = self.connection().await?;
        let response = match sender.try_send_request(make()?).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                Some(unsent) => {
                    sender = self.fresh_connection().await?;
                    sender.send_request(unsent).await?
                }
                None if method == "GET" && e.error().is_incomplete_message() => {
                    sender = self.fresh_connection().await?;
                    sender.send_request(make()?).await?
                }
                None => return Err(e.into_error().into()),
            },
        };
        let status = response.status().as_u16();
        // A connection the daemon says it closes is not kept.
        let closing = response
            .headers()
            .get(hyper::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let bytes = response.into_body().collect().await?.to_bytes().to_vec();
        if !closing
            && let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push(sender);
        }
        Ok((status, bytes))
    }

    /// Sends a request and returns the JSON answer; an error status becomes an error with the
    /// API's message.
    pub async fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let body = body.map(|b| serde_json::to_vec(&b)).transpose()?;
        let (status, bytes) = self.raw(method, path, body).await?;
        answer(status, &bytes)
    }

    /// Sends a request and returns the text answer.
    pub async fn text(&self, path: &str) -> anyhow::Result<String> {
        let (status, bytes) = self.raw("GET", path, None).await?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if !(200..300).contains(&status) {
            bail!("{text} (HTTP {status})");
        }
        Ok(text)
    }

    /// Sends `file` (of `len` bytes) as the body of a POST to `path` with `content_type`,
    /// streamed (never whole in memory); `progress` hears the bytes sent so far. Returns the
    /// JSON answer, or an error with the API's message.
    pub async fn upload(
        &self,
        path: &str,
        content_type: &str,
        file: tokio::fs::File,
        len: u64,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> anyhow::Result<Value> {
        use futures::StreamExt as _;
        let mut sent = 0u64;
        let frames = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024).map(move |r| {
            r.map(|bytes| {
                sent += bytes.len() as u64;
                progress(sent);
                hyper::body::Frame::data(bytes)
            })
        });
        let request = hyper::Request::builder()
            .method("POST")
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(hyper::header::CONTENT_TYPE, content_type)
            .header(hyper::header::CONTENT_LENGTH, len)
            .body(http_body_util::StreamBody::new(frames))?;
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        answer(status, &bytes)
    }

    /// GETs `path` and streams the answer's body into `out`; `progress` hears the bytes
    /// written so far. Returns the bytes written; an error status is an error with the API's
    /// message.
    pub async fn download(
        &self,
        path: &str,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
        mut progress: impl FnMut(u64),
    ) -> anyhow::Result<u64> {
        use tokio::io::AsyncWriteExt as _;
        let request = hyper::Request::builder()
            .method("GET")
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Full::new(Bytes::new()))?;
        let mut sender = self.fresh_connection().await?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let expected = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let mut body = response.into_body();
        if !(200..300).contains(&status) {
            let bytes = body.collect().await?.to_bytes();
            answer(status, &bytes)?;
            bail!("HTTP {status}");
        }
        let mut written = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the daemon stopped sending the file")?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data).await?;
                written += data.len() as u64;
                progress(written);
            }
        }
        out.flush().await?;
        if expected.is_some_and(|e| e != written) {
            bail!("the file came cut short ({written} of {} bytes)", expected.unwrap_or(0));
        }
        Ok(written)
    }

    /// Opens the event stream (`/v1/events`), optionally for one channel, and calls `on_event`
    /// for each event until it returns `false` or the stream ends.
    pub async fn events(
        &self,
        channel: Option<&str>,
        mut on_event: impl FnMut(Value) -> bool,
    ) -> anyhow::Result<()> {
        use futures::StreamExt as _;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let io = self.connect().await?;
        let path = match channel {
            Some(c) => format!("ws://localhost/v1/events?channel={}", encode_component(c)),
            None => "ws://localhost/v1/events".to_owned(),
        };
        let mut request = path.into_client_request()?;
        request
            .headers_mut()
            .insert(hyper::header::AUTHORIZATION, format!("Bearer {}", self.token).parse()?);
        let (mut ws, _) = tokio_tungstenite::client_async(request, io)
            .await
            .context("cannot open the event stream")?;
        while let Some(message) = ws.next().await {
            let message = message?;
            if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                let value: Value = serde_json::from_str(&text)?;
                if !on_event(value) {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// A JSON answer, or an error with the API's message for an error status.
fn answer(status: u16, bytes: &[u8]) -> anyhow::Result<Value> {
    let value: Value = serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()));
    if !(200..300).contains(&status) {
        let message = value
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| value.to_string(), str::to_owned);
        bail!("{message} (HTTP {status})");
    }
    Ok(value)
}

#[cfg(unix)]
async fn connect_unix(path: &PathBuf) -> anyhow::Result<tokio::net::UnixStream> {
    tokio::net::UnixStream::connect(path)
        .await
        .with_context(|| format!("cannot reach the daemon at {}; is it running?", path.display()))
}

#[cfg(not(unix))]
async fn connect_unix(path: &PathBuf) -> anyhow::Result<tokio::net::TcpStream> {
    bail!("Unix sockets are not supported here ({})", path.display())
}

/// Percent-encodes a path segment or query value.
pub fn encode_component(s: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b':');
    percent_encoding::utf8_percent_encode(s, KEEP).to_string()
}
