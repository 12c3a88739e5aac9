//! A fault-injecting HTTP receiver for the end-to-end tests.
//!
//! It listens on 127.0.0.1, parses each multipart upload, records the request
//! and responds as its policy specifies. Tests change the policy while the
//! daemon runs.
//!
//! Clients connect to a front TCP listener that pipes each connection to an
//! axum server on a private port. axum 0.7's `serve` gives no handle to its
//! connections, and the pipe is what lets this server close a connection in
//! the middle of a body, and drop every open connection on `stop()` so that
//! an outage also cuts the daemon's pooled keep-alive connections.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::header::{self, HeaderMap};
use axum::response::Response;
use axum::Router;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Runtime;
use tokio::task::{AbortHandle, JoinHandle};

/// The response to one request.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Wait after the whole body was read, before the response is sent.
    pub delay: Duration,
    /// Drop the connection after the first chunk of the file part, so the
    /// client gets a reset while it is still sending.
    pub close_mid_body: bool,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: format!("fault server: status {status} from the test policy\n"),
            delay: Duration::ZERO,
            close_mid_body: false,
        }
    }

    pub fn created() -> Reply {
        Reply::status(201)
    }

    /// Builds a response with `Retry-After: <value>`, where the value is seconds
    /// or an HTTP date.
    pub fn retry_after(status: u16, value: &str) -> Reply {
        Reply::status(status).with_header("Retry-After", value)
    }

    /// Builds a `307 Temporary Redirect` to `location`.
    pub fn redirect(location: &str) -> Reply {
        Reply::status(307).with_header("Location", location)
    }

    pub fn close_mid_body() -> Reply {
        Reply {
            close_mid_body: true,
            ..Reply::status(0)
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn with_body(mut self, body: &str) -> Reply {
        self.body = body.to_string();
        self
    }

    pub fn with_delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// The rules that pick a `Reply` for each request.
///
/// A request without `Authorization: Bearer <token>` gets 401 when a token is
/// set. Otherwise the first queued reply for the uploaded file name is used,
/// then the first reply of the queue for any request, then `default`.
#[derive(Clone, Debug)]
pub struct Policy {
    pub token: Option<String>,
    pub default: Reply,
    pub per_file: HashMap<String, VecDeque<Reply>>,
    pub next: VecDeque<Reply>,
}

impl Policy {
    fn choose(&mut self, authorized: bool, file_name: Option<&str>) -> Reply {
        if !authorized {
            return Reply::status(401)
                .with_header("WWW-Authenticate", "Bearer")
                .with_body("fault server: invalid or missing bearer token\n");
        }
        let queued = file_name
            .and_then(|name| self.per_file.get_mut(name))
            .and_then(VecDeque::pop_front);
        queued
            .or_else(|| self.next.pop_front())
            .unwrap_or_else(|| self.default.clone())
    }

    fn is_authorized(&self, authorization: Option<&str>) -> bool {
        match &self.token {
            None => true,
            Some(token) => authorization == Some(format!("Bearer {token}").as_str()),
        }
    }
}

/// One part of the body that carried a file name.
#[derive(Clone, Debug)]
pub struct FilePart {
    pub field_name: String,
    pub file_name: String,
    pub content_type: Option<String>,
    /// SHA-256 hex of the bytes received for this part.
    pub sha256: String,
    pub size: u64,
}

/// Record of one request and of the status that the policy chose for it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Order in which the requests started, from 0.
    pub seq: usize,
    pub started_at: Instant,
    /// When the body was read to its end or failed.
    pub finished_at: Instant,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub authorization: Option<String>,
    pub idempotency_key: Option<String>,
    pub user_agent: Option<String>,
    pub content_type: Option<String>,
    pub content_length: Option<u64>,
    /// Parts without a file name, as text.
    pub fields: BTreeMap<String, String>,
    pub files: Vec<FilePart>,
    /// True when the multipart body was read through its final boundary.
    pub body_complete: bool,
    /// Why the body did not complete, if it did not.
    pub body_error: Option<String>,
    /// Status that the policy chose; `None` when the connection was closed instead.
    pub status: Option<u16>,
}

impl RecordedRequest {
    pub fn file(&self) -> Option<&FilePart> {
        self.files.first()
    }

    pub fn file_name(&self) -> Option<&str> {
        self.file().map(|part| part.file_name.as_str())
    }

    /// Returns true when the server took the upload: a whole body that got 2xx or 409.
    pub fn is_accepted(&self) -> bool {
        let accepted_status = matches!(self.status, Some(200..=299) | Some(409));
        self.body_complete && accepted_status && self.file().is_some()
    }

    /// Returns true when a whole body arrived whose `sha256` field differs from
    /// the hash of its file part, which the daemon must never send.
    pub fn has_mismatched_hash(&self) -> bool {
        match (self.file(), self.fields.get("sha256")) {
            (Some(part), Some(field)) => {
                self.body_complete && !part.sha256.eq_ignore_ascii_case(field)
            }
            _ => false,
        }
    }
}

impl fmt::Display for RecordedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (file, sha, size) = match self.file() {
            Some(part) => (part.file_name.as_str(), &part.sha256[..12], part.size),
            None => ("-", "-", 0),
        };
        write!(
            f,
            "#{} {} {} file={} sha256={}.. size={} auth={} complete={} status={:?}",
            self.seq,
            self.method,
            self.path,
            file,
            sha,
            size,
            if self.authorization.is_some() {
                "present"
            } else {
                "absent"
            },
            self.body_complete,
            self.status,
        )?;
        if let Some(error) = &self.body_error {
            write!(f, " body_error={error:?}")?;
        }
        Ok(())
    }
}

struct Shared {
    policy: Mutex<Policy>,
    requests: Mutex<Vec<RecordedRequest>>,
    next_seq: AtomicUsize,
    in_flight: AtomicUsize,
    /// Open client connections, keyed by the peer address that the axum server
    /// gets from `ConnectInfo`, which is the pipe's local end.
    connections: Mutex<HashMap<SocketAddr, AbortHandle>>,
}

/// Locks a mutex, ignoring poisoning: a panicking test thread must not hide
/// the requests recorded so far from the failure report.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn close_connection(&self, peer: SocketAddr) -> bool {
        match lock(&self.connections).remove(&peer) {
            Some(handle) => {
                handle.abort();
                true
            }
            None => false,
        }
    }
}

/// The fault-injecting server. It runs on its own tokio runtime, so tests can
/// be plain synchronous functions.
pub struct FaultServer {
    runtime: Option<Runtime>,
    shared: Arc<Shared>,
    port: u16,
    backend_addr: SocketAddr,
    front: Option<JoinHandle<()>>,
    backend: JoinHandle<()>,
}

impl FaultServer {
    /// Starts a server on a free port that accepts any token and responds 201.
    pub fn start() -> FaultServer {
        FaultServer::start_on(0)
    }

    /// Starts a server that responds 401 unless the request carries `token`.
    pub fn with_token(token: &str) -> FaultServer {
        let server = FaultServer::start();
        server.set_token(Some(token));
        server
    }

    /// Starts a server on `port`, or on a free port when `port` is 0.
    pub fn start_on(port: u16) -> FaultServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("building the fault server's tokio runtime failed");
        let shared = Arc::new(Shared {
            policy: Mutex::new(Policy {
                token: None,
                default: Reply::created(),
                per_file: HashMap::new(),
                next: VecDeque::new(),
            }),
            requests: Mutex::new(Vec::new()),
            next_seq: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            connections: Mutex::new(HashMap::new()),
        });

        let (backend, backend_addr) = runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("binding the fault server's backend on 127.0.0.1:0 failed");
            let addr = listener.local_addr().expect("backend address");
            let app = Router::new()
                .fallback(handle_request)
                .layer(DefaultBodyLimit::disable())
                .with_state(shared.clone());
            let service = app.into_make_service_with_connect_info::<SocketAddr>();
            let task = tokio::spawn(async move {
                if let Err(err) = axum::serve(listener, service).await {
                    eprintln!("fault server: backend stopped: {err}");
                }
            });
            (task, addr)
        });

        let mut server = FaultServer {
            runtime: Some(runtime),
            shared,
            port,
            backend_addr,
            front: None,
            backend,
        };
        server.listen();
        server
    }

    fn runtime(&self) -> &Runtime {
        self.runtime
            .as_ref()
            .expect("runtime is present until drop")
    }

    fn listen(&mut self) {
        let port = self.port;
        let listener = self.runtime().block_on(async {
            bind_front(port).unwrap_or_else(|err| panic!("binding 127.0.0.1:{port} failed: {err}"))
        });
        self.port = listener.local_addr().expect("front address").port();
        let shared = self.shared.clone();
        let backend_addr = self.backend_addr;
        self.front = Some(
            self.runtime()
                .spawn(accept_loop(listener, shared, backend_addr)),
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the upload URL, `http://127.0.0.1:<port>/upload`.
    pub fn url(&self) -> String {
        self.url_with_path("/upload")
    }

    pub fn url_with_path(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Closes the listening socket and every open connection, so that the port
    /// refuses connections until `restart()`.
    pub fn stop(&mut self) {
        if let Some(front) = self.front.take() {
            front.abort();
            // Wait for the task to drop its listener, so the port is free for
            // a restart right after this call.
            let _ = self.runtime().block_on(front);
        }
        let handles: Vec<AbortHandle> = lock(&self.shared.connections)
            .drain()
            .map(|(_, h)| h)
            .collect();
        for handle in handles {
            handle.abort();
        }
    }

    /// Listens again on the same port after `stop()`.
    pub fn restart(&mut self) {
        assert!(
            self.front.is_none(),
            "restart() on a server that is running on port {}",
            self.port
        );
        self.listen();
    }

    pub fn is_running(&self) -> bool {
        self.front.is_some()
    }

    pub fn set_token(&self, token: Option<&str>) {
        lock(&self.shared.policy).token = token.map(str::to_string);
    }

    pub fn set_default(&self, reply: Reply) {
        lock(&self.shared.policy).default = reply;
    }

    /// Queues replies for the next requests that upload a file named `file_name`.
    pub fn push_for_file(&self, file_name: &str, replies: impl IntoIterator<Item = Reply>) {
        let mut policy = lock(&self.shared.policy);
        policy
            .per_file
            .entry(file_name.to_string())
            .or_default()
            .extend(replies);
    }

    /// Queues a reply for the next request that no per-file reply matches.
    pub fn push_next(&self, reply: Reply) {
        lock(&self.shared.policy).next.push_back(reply);
    }

    /// Returns every request whose body has ended, failed or been dropped, in
    /// start order. A request still reading its body is not in the list.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        let mut requests = lock(&self.shared.requests).clone();
        requests.sort_by_key(|request| request.seq);
        requests
    }

    pub fn request_count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Returns the number of requests that have started and have not yet got a
    /// response or been dropped.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    pub fn requests_for(&self, file_name: &str) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|request| request.file_name() == Some(file_name))
            .collect()
    }

    pub fn count_status(&self, status: u16) -> usize {
        self.requests()
            .iter()
            .filter(|request| request.status == Some(status))
            .count()
    }

    /// Counts the accepted uploads per SHA-256 of the file part.
    pub fn deliveries(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for request in self
            .requests()
            .iter()
            .filter(|request| request.is_accepted())
        {
            let sha = request
                .file()
                .expect("accepted requests have a file part")
                .sha256
                .clone();
            *counts.entry(sha).or_insert(0) += 1;
        }
        counts
    }

    /// Counts the accepted uploads of the content whose SHA-256 is `sha256`.
    pub fn delivered(&self, sha256: &str) -> usize {
        self.deliveries().get(sha256).copied().unwrap_or(0)
    }

    /// Formats one line per recorded request, for failure messages.
    pub fn summary(&self) -> String {
        let lines: Vec<String> = self.requests().iter().map(ToString::to_string).collect();
        if lines.is_empty() {
            "(no requests)".to_string()
        } else {
            lines.join("\n")
        }
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- fault server on port {}: requests ---\n{}",
                self.port,
                self.summary()
            );
        }
        self.backend.abort();
        if let Some(front) = self.front.take() {
            front.abort();
        }
        // shutdown_background does not block, so dropping the server inside
        // another runtime's async context does not panic.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Binds 127.0.0.1:`port` with SO_REUSEADDR, so that a restart can take the
/// same port while the connections of the previous listener are in TIME_WAIT.
fn bind_front(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(1024)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, backend_addr: SocketAddr) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(err) => {
                eprintln!("fault server: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let backend = match TcpStream::connect(backend_addr).await {
            Ok(backend) => backend,
            Err(err) => {
                eprintln!("fault server: connecting to the backend {backend_addr} failed: {err}");
                continue;
            }
        };
        let Ok(key) = backend.local_addr() else {
            continue;
        };

        // The lock is held across the spawn, so the handle is registered
        // before the pipe forwards a byte that a handler could react to, and
        // before the pipe's guard can remove it.
        let mut connections = lock(&shared.connections);
        let task = tokio::spawn(pipe(client, backend, shared.clone(), key));
        connections.insert(key, task.abort_handle());
    }
}

/// Removes a connection's entry when its pipe ends or is aborted.
struct ConnectionGuard {
    shared: Arc<Shared>,
    key: SocketAddr,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        lock(&self.shared.connections).remove(&self.key);
    }
}

async fn pipe(mut client: TcpStream, mut backend: TcpStream, shared: Arc<Shared>, key: SocketAddr) {
    let _guard = ConnectionGuard { shared, key };
    // Either side ending or failing ends the pipe. Dropping both streams
    // passes the close on to the other side.
    let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
}

/// Decrements the in-flight count when a handler ends or hyper drops it.
struct InFlightGuard(Arc<Shared>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Stores the record when the handler finishes, and also when hyper drops the
/// handler because the client went away mid-body.
struct PendingRecord {
    shared: Arc<Shared>,
    record: Option<RecordedRequest>,
}

impl PendingRecord {
    fn get(&mut self) -> &mut RecordedRequest {
        self.record
            .as_mut()
            .expect("record is present until stored")
    }
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            if !record.body_complete && record.body_error.is_none() {
                record.body_error = Some("handler dropped before the body ended".to_string());
                record.finished_at = Instant::now();
            }
            lock(&self.shared.requests).push(record);
        }
    }
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
}

async fn handle_request(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlightGuard(shared.clone());
    let now = Instant::now();
    let headers = request.headers();
    let record = RecordedRequest {
        seq: shared.next_seq.fetch_add(1, Ordering::SeqCst),
        started_at: now,
        finished_at: now,
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
        headers: headers
            .iter()
            .map(|(name, value)| {
                (
                    name.to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        authorization: header_text(headers, header::AUTHORIZATION),
        idempotency_key: header_text(headers, header::HeaderName::from_static("idempotency-key")),
        user_agent: header_text(headers, header::USER_AGENT),
        content_type: header_text(headers, header::CONTENT_TYPE),
        content_length: header_text(headers, header::CONTENT_LENGTH)
            .and_then(|text| text.parse().ok()),
        fields: BTreeMap::new(),
        files: Vec::new(),
        body_complete: false,
        body_error: None,
        status: None,
    };
    let authorized = lock(&shared.policy).is_authorized(record.authorization.as_deref());
    let mut pending = PendingRecord {
        shared: shared.clone(),
        record: Some(record),
    };

    let reply = match read_body(&shared, peer, request, authorized, pending.get()).await {
        BodyOutcome::Closed => return plain_response(500, "connection closed by the test policy"),
        BodyOutcome::Read(reply) => reply,
    };
    let reply = match reply {
        Some(reply) => reply,
        None => lock(&shared.policy).choose(authorized, None),
    };

    let record = pending.get();
    record.finished_at = Instant::now();
    if !record.body_complete {
        // A body that cannot be parsed gets the response of a real receiver.
        // A client that went away will not read it.
        record.status = Some(400);
        let text = format!(
            "malformed multipart body: {}",
            record.body_error.clone().unwrap_or_default()
        );
        drop(pending);
        return plain_response(400, &text);
    }
    record.status = Some(reply.status);
    // The record is stored before the delay, so a body that arrived whole
    // counts as received even if the client dies before the response.
    drop(pending);

    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    build_response(&reply)
}

enum BodyOutcome {
    /// The body was read to its end or failed. The reply is present if a file
    /// part arrived.
    Read(Option<Reply>),
    /// The policy closed the connection mid-body.
    Closed,
}

async fn read_body(
    shared: &Shared,
    peer: SocketAddr,
    request: Request,
    authorized: bool,
    record: &mut RecordedRequest,
) -> BodyOutcome {
    let mut multipart = match Multipart::from_request(request, &()).await {
        Ok(multipart) => multipart,
        Err(rejection) => {
            record.body_error = Some(format!("not a multipart body: {}", rejection.body_text()));
            return BodyOutcome::Read(None);
        }
    };
    let mut reply = None;
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => {
                record.body_complete = true;
                return BodyOutcome::Read(reply);
            }
            Err(err) => {
                record.body_error = Some(err.body_text());
                return BodyOutcome::Read(reply);
            }
        };
        let field_name = field.name().unwrap_or_default().to_string();
        let Some(file_name) = field.file_name().map(str::to_string) else {
            match field.text().await {
                Ok(text) => {
                    record.fields.insert(field_name, text);
                }
                Err(err) => {
                    record.body_error = Some(err.body_text());
                    return BodyOutcome::Read(reply);
                }
            }
            continue;
        };

        // The reply is chosen as soon as the file name is known, because a
        // close in the middle of the body must happen while the file streams.
        let chosen = lock(&shared.policy).choose(authorized, Some(&file_name));
        let close_mid_body = chosen.close_mid_body;
        if reply.is_none() {
            reply = Some(chosen);
        }
        let mut part = FilePart {
            field_name,
            file_name,
            content_type: field.content_type().map(str::to_string),
            sha256: String::new(),
            size: 0,
        };
        let mut hasher = Sha256::new();
        let error = loop {
            match field.chunk().await {
                Ok(Some(chunk)) => {
                    hasher.update(&chunk);
                    part.size += chunk.len() as u64;
                    if close_mid_body {
                        break None;
                    }
                }
                Ok(None) => break None,
                Err(err) => break Some(err.body_text()),
            }
        };
        part.sha256 = hex::encode(hasher.finalize());
        record.files.push(part);
        if error.is_some() {
            record.body_error = error;
            return BodyOutcome::Read(reply);
        }
        // An empty file part is closed at its end, because it has no chunk.
        if close_mid_body {
            record.body_error = Some("connection closed mid-body by the test policy".to_string());
            shared.close_connection(peer);
            return BodyOutcome::Closed;
        }
    }
}

fn plain_response(status: u16, text: &str) -> Response {
    build_response(&Reply::status(status).with_body(text))
}

fn build_response(reply: &Reply) -> Response {
    let mut builder = Response::builder()
        .status(reply.status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8");
    for (name, value) in &reply.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder
        .body(Body::from(reply.body.clone()))
        .unwrap_or_else(|err| panic!("building a response for {reply:?} failed: {err}"))
}
