//! A fault-injecting HTTP receiver for the end-to-end tests.
//!
//! It listens on 127.0.0.1, parses each multipart upload, records the request
//! and responds as its policy specifies. Tests change the policy while the
//! daemon runs.
//!
//! Clients connect to a front TCP listener that pipes each connection to an
//! axum server on a private port. axum 0.7's `serve` gives no handle to its
//! connections, so the pipe is what closes a connection in the middle of a
//! body. It also drops every open connection on `stop()`, so that an outage
//! cuts the daemon's pooled keep-alive connections too. It closes keep-alive
//! connections that stay idle past a timeout, and it lets the server go down
//! and up on a schedule (`start_flapping`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::header::{self, HeaderMap};
use axum::response::Response;
use axum::Router;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
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
    /// Wait after each chunk of the file part, which makes a slow reader:
    /// once the socket buffers are full, the client can send only as fast as
    /// this server reads.
    pub read_delay: Duration,
}

/// Response delay of `Reply::stall`: longer than any test runs.
pub const STALL: Duration = Duration::from_secs(3600);

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: format!("fault server: status {status} from the test policy\n"),
            delay: Duration::ZERO,
            close_mid_body: false,
            read_delay: Duration::ZERO,
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

    /// Builds a 201 that is sent only after `STALL`, so the client's read
    /// timeout ends the request first.
    pub fn stall() -> Reply {
        Reply::created().with_delay(STALL)
    }

    pub fn with_read_delay(mut self, per_chunk: Duration) -> Reply {
        self.read_delay = per_chunk;
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
    /// Number of this request on its connection, from 1; 0 when the
    /// connection was not known.
    pub connection_request: usize,
    /// Time the connection was idle between the previous request's end and
    /// this request's start; `None` for a connection's first request.
    pub idle_before: Option<Duration>,
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
        if let Some(idle) = self.idle_before {
            write!(
                f,
                " conn_req={} idle_before={}ms",
                self.connection_request,
                idle.as_millis()
            )?;
        }
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
    /// Requests recorded as accepted (`RecordedRequest::is_accepted`).
    accepted: AtomicUsize,
    /// Open client connections, keyed by the peer address that the axum server
    /// gets from `ConnectInfo`, which is the pipe's local end.
    connections: Mutex<HashMap<SocketAddr, Connection>>,
    /// The task that accepts connections on the front port; `None` while down.
    front: Mutex<Option<JoinHandle<()>>>,
    port: AtomicU16,
    backend_addr: SocketAddr,
    /// Origin of the millisecond timestamps in `ConnectionState`.
    epoch: Instant,
    /// Idle keep-alive connections are closed after this many milliseconds; 0 never.
    idle_timeout_ms: AtomicU64,
    /// Set while flapping has the server down: the listener is closed, idle
    /// connections are closed, and a request that starts is cut off.
    down: AtomicBool,
    idle_closes: AtomicUsize,
    drain_closes: AtomicUsize,
    down_cuts: AtomicUsize,
    flaps: AtomicUsize,
    /// Wait after each chunk of every file part, in microseconds, on top of
    /// the reply's own `read_delay`. Tests change it while a body streams.
    read_delay_us: AtomicU64,
    /// File parts being received: request seq to (file name, bytes so far).
    receiving: Mutex<HashMap<usize, (String, u64)>>,
}

/// One client connection, as the pipe and the handlers see it.
struct Connection {
    abort: AbortHandle,
    state: Arc<ConnectionState>,
}

#[derive(Default)]
struct ConnectionState {
    /// Milliseconds since `Shared::epoch` of the last byte piped either way,
    /// or of the end of a request's handler.
    last_activity_ms: AtomicU64,
    /// Handlers running for requests on this connection.
    busy: AtomicUsize,
    /// Requests started on this connection.
    requests: AtomicUsize,
    /// Milliseconds since `Shared::epoch` when the last handler ended.
    last_end_ms: AtomicU64,
    /// Set when the server closes the connection: nothing more is forwarded.
    cut: AtomicBool,
}

/// Quiet time after which a connection is closed while the server is down.
/// A response is piped to the client within microseconds of its handler's
/// end on an idle machine; the margin covers a pipe task that the scheduler
/// starves on a busy one, which would otherwise lose an accepted upload's
/// response and cause a repeat that no crash explains.
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// How often a connection's idle watcher looks again while it has nothing to
/// time, so that a changed idle timeout or a flap takes effect soon.
const WATCH_TICK: Duration = Duration::from_millis(20);

/// How long going up again waits for the front port to be free.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);

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
            Some(connection) => {
                // The abort takes effect at the pipe's next await; the flag
                // keeps the pipe from forwarding a byte before that.
                connection.state.cut.store(true, Ordering::SeqCst);
                connection.abort.abort();
                true
            }
            None => false,
        }
    }

    fn connection_state(&self, peer: SocketAddr) -> Option<Arc<ConnectionState>> {
        lock(&self.connections)
            .get(&peer)
            .map(|connection| connection.state.clone())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Binds the front port and starts accepting; retries while the port is
    /// still held by the listener of a previous start.
    async fn go_up(self: &Arc<Self>) -> io::Result<()> {
        let port = self.port.load(Ordering::SeqCst);
        let deadline = Instant::now() + REBIND_TIMEOUT;
        let listener = loop {
            match bind_front(port) {
                Ok(listener) => break listener,
                Err(err) if Instant::now() < deadline => {
                    let _ = err;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(err) => return Err(err),
            }
        };
        self.port
            .store(listener.local_addr()?.port(), Ordering::SeqCst);
        self.down.store(false, Ordering::SeqCst);
        let task = tokio::spawn(accept_loop(listener, self.clone(), self.backend_addr));
        *lock(&self.front) = Some(task);
        Ok(())
    }

    /// Closes the listener and lets open connections drain: each closes once
    /// it is idle, and a request that starts on one is cut off.
    async fn go_down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.flaps.fetch_add(1, Ordering::SeqCst);
        let front = lock(&self.front).take();
        if let Some(front) = front {
            front.abort();
            // Wait for the task to drop its listener, so that the port
            // refuses connections from here on.
            let _ = front.await;
        }
    }
}

/// The fault-injecting server. It runs on its own tokio runtime, so tests can
/// be plain synchronous functions.
pub struct FaultServer {
    runtime: Option<Runtime>,
    shared: Arc<Shared>,
    backend: JoinHandle<()>,
    flapper: Option<JoinHandle<()>>,
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
        let backend_listener = runtime.block_on(async {
            bind_loopback(0).expect("binding the fault server's backend on 127.0.0.1:0 failed")
        });
        let backend_addr = backend_listener.local_addr().expect("backend address");
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
            accepted: AtomicUsize::new(0),
            connections: Mutex::new(HashMap::new()),
            front: Mutex::new(None),
            port: AtomicU16::new(port),
            backend_addr,
            epoch: Instant::now(),
            idle_timeout_ms: AtomicU64::new(0),
            down: AtomicBool::new(false),
            idle_closes: AtomicUsize::new(0),
            drain_closes: AtomicUsize::new(0),
            down_cuts: AtomicUsize::new(0),
            flaps: AtomicUsize::new(0),
            read_delay_us: AtomicU64::new(0),
            receiving: Mutex::new(HashMap::new()),
        });

        let app = Router::new()
            .fallback(handle_request)
            .layer(DefaultBodyLimit::disable())
            .with_state(shared.clone());
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        let backend = runtime.spawn(async move {
            if let Err(err) = axum::serve(backend_listener, service).await {
                eprintln!("fault server: backend stopped: {err}");
            }
        });

        let server = FaultServer {
            runtime: Some(runtime),
            shared,
            backend,
            flapper: None,
        };
        server.listen();
        server
    }

    fn runtime(&self) -> &Runtime {
        self.runtime
            .as_ref()
            .expect("runtime is present until drop")
    }

    fn listen(&self) {
        let shared = self.shared.clone();
        let port = self.port();
        self.runtime()
            .block_on(shared.go_up())
            .unwrap_or_else(|err| panic!("binding 127.0.0.1:{port} failed: {err}"));
    }

    pub fn port(&self) -> u16 {
        self.shared.port.load(Ordering::SeqCst)
    }

    /// Returns the upload URL, `http://127.0.0.1:<port>/upload`.
    pub fn url(&self) -> String {
        self.url_with_path("/upload")
    }

    pub fn url_with_path(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port(), path)
    }

    /// Closes the listening socket and every open connection, so that the port
    /// refuses connections until `restart()`. Stops flapping first.
    pub fn stop(&mut self) {
        self.abort_flapper();
        let front = lock(&self.shared.front).take();
        if let Some(front) = front {
            front.abort();
            // Wait for the task to drop its listener, so the port is free for
            // a restart right after this call.
            let _ = self.runtime().block_on(front);
        }
        let handles: Vec<AbortHandle> = lock(&self.shared.connections)
            .drain()
            .map(|(_, connection)| connection.abort)
            .collect();
        for handle in handles {
            handle.abort();
        }
    }

    /// Listens again on the same port after `stop()`.
    pub fn restart(&mut self) {
        assert!(
            !self.is_running(),
            "restart() on a server that is running on port {}",
            self.port()
        );
        self.listen();
    }

    pub fn is_running(&self) -> bool {
        lock(&self.shared.front).is_some()
    }

    /// Closes each keep-alive connection once it has been idle for `timeout`
    /// (no byte either way and no request being handled), as servers with a
    /// keep-alive timeout do. `None` keeps idle connections open.
    pub fn set_idle_timeout(&self, timeout: Option<Duration>) {
        let ms = timeout.map_or(0, |t| t.as_millis().max(1) as u64);
        self.shared.idle_timeout_ms.store(ms, Ordering::SeqCst);
    }

    /// Waits `per_chunk` after each chunk of every file part, including the
    /// parts being read now, which makes every upload slow until it is set
    /// back to zero.
    pub fn set_read_delay(&self, per_chunk: Duration) {
        let us = per_chunk.as_micros() as u64;
        self.shared.read_delay_us.store(us, Ordering::SeqCst);
    }

    /// Connections closed by the idle timeout so far.
    pub fn idle_closes(&self) -> usize {
        self.shared.idle_closes.load(Ordering::SeqCst)
    }

    /// Goes down for `down` after every `up` of service, until
    /// `stop_flapping` or `stop`. While down, the port refuses connections,
    /// idle connections are closed, requests already being handled get their
    /// response, and a request that starts on an open connection is cut off
    /// before its body is read, so no upload is accepted without its response.
    pub fn start_flapping(&mut self, up: Duration, down: Duration) {
        self.abort_flapper();
        let shared = self.shared.clone();
        self.flapper = Some(self.runtime().spawn(async move {
            loop {
                tokio::time::sleep(up).await;
                shared.go_down().await;
                tokio::time::sleep(down).await;
                if let Err(err) = shared.go_up().await {
                    eprintln!("fault server: going up again failed: {err}");
                    return;
                }
            }
        }));
    }

    /// Stops flapping and leaves the server up.
    pub fn stop_flapping(&mut self) {
        self.abort_flapper();
        if !self.is_running() {
            self.listen();
        }
        self.shared.down.store(false, Ordering::SeqCst);
    }

    fn abort_flapper(&mut self) {
        if let Some(flapper) = self.flapper.take() {
            flapper.abort();
            let _ = self.runtime().block_on(flapper);
        }
    }

    /// Times the server went down while flapping.
    pub fn flaps(&self) -> usize {
        self.shared.flaps.load(Ordering::SeqCst)
    }

    /// Requests cut off because they started while the server was down.
    pub fn down_cuts(&self) -> usize {
        self.shared.down_cuts.load(Ordering::SeqCst)
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

    /// Returns the number of accepted uploads, without copying the records.
    pub fn accepted_count(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Returns the number of requests that have started and have not yet got a
    /// response or been dropped.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Returns the bytes received so far of the file part named `file_name`
    /// in requests still reading it (the largest, if several are).
    pub fn bytes_in_progress(&self, file_name: &str) -> Option<u64> {
        lock(&self.shared.receiving)
            .values()
            .filter(|(name, _)| name == file_name)
            .map(|(_, bytes)| *bytes)
            .max()
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
        let requests = lock(&self.shared.requests);
        for request in requests.iter().filter(|request| request.is_accepted()) {
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
            let lines: Vec<String> = self.requests().iter().map(ToString::to_string).collect();
            let skipped = lines.len().saturating_sub(SUMMARY_TAIL_LINES);
            eprintln!(
                "--- fault server on port {}: {} requests, first {skipped} skipped ---\n{}",
                self.port(),
                lines.len(),
                lines[skipped..].join("\n")
            );
        }
        if let Some(flapper) = self.flapper.take() {
            flapper.abort();
        }
        self.backend.abort();
        if let Some(front) = lock(&self.shared.front).take() {
            front.abort();
        }
        // shutdown_background does not block, so dropping the server inside
        // another runtime's async context does not panic.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Lines of the request summary printed when a test fails.
const SUMMARY_TAIL_LINES: usize = 300;

/// Receive buffer of the server's sockets. A fixed size turns off the
/// kernel's autotuning, which can grow a buffer on loopback to tens of
/// megabytes; then a slow reader would not slow the client down until the
/// client had sent a whole large archive.
const RECEIVE_BUFFER_BYTES: u32 = 128 * 1024;

/// Binds 127.0.0.1:`port` with SO_REUSEADDR, so that a restart can take the
/// same port while the connections of the previous listener are in TIME_WAIT.
fn bind_front(port: u16) -> io::Result<TcpListener> {
    bind_loopback(port)
}

/// Binds 127.0.0.1:`port` with a fixed receive buffer, which accepted
/// sockets inherit.
fn bind_loopback(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_recv_buffer_size(RECEIVE_BUFFER_BYTES)?;
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
        let state = Arc::new(ConnectionState::default());
        state
            .last_activity_ms
            .store(shared.now_ms(), Ordering::SeqCst);

        // The lock is held across the spawn, so the handle is registered
        // before the pipe forwards a byte that a handler could react to, and
        // before the pipe's guard can remove it.
        let mut connections = lock(&shared.connections);
        let task = tokio::spawn(pipe(client, backend, shared.clone(), key, state.clone()));
        connections.insert(
            key,
            Connection {
                abort: task.abort_handle(),
                state,
            },
        );
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

/// Copies bytes both ways until both sides are done, or until the idle
/// watcher closes the connection. Dropping both streams passes the close on
/// to the other side.
async fn pipe(
    client: TcpStream,
    backend: TcpStream,
    shared: Arc<Shared>,
    key: SocketAddr,
    state: Arc<ConnectionState>,
) {
    let _guard = ConnectionGuard {
        shared: shared.clone(),
        key,
    };
    if state.cut.load(Ordering::SeqCst) {
        return;
    }
    let (client_read, client_write) = client.into_split();
    let (backend_read, backend_write) = backend.into_split();
    let both_ways = async {
        tokio::join!(
            copy_noting_activity(client_read, backend_write, &shared, &state),
            copy_noting_activity(backend_read, client_write, &shared, &state),
        )
    };
    tokio::select! {
        // Bytes waiting to be piped go first, before the idle watcher.
        biased;
        _ = both_ways => {}
        closed_because_down = close_when_idle(&shared, &state) => {
            let counter = if closed_because_down { &shared.drain_closes } else { &shared.idle_closes };
            counter.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Copies one direction of a connection and stamps each byte's passage in
/// `state`. Ends at end of stream or on an error, after shutting down the
/// writing side.
async fn copy_noting_activity(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
    state: &ConnectionState,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.cut.load(Ordering::SeqCst) {
            break;
        }
        state
            .last_activity_ms
            .store(shared.now_ms(), Ordering::SeqCst);
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
        state
            .last_activity_ms
            .store(shared.now_ms(), Ordering::SeqCst);
    }
    let _ = to.shutdown().await;
}

/// Returns when the connection should be closed: it has no request being
/// handled and has been idle for the idle timeout, or for `DRAIN_QUIET` while
/// the server is down. Returns true in the second case.
async fn close_when_idle(shared: &Shared, state: &ConnectionState) -> bool {
    loop {
        let down = shared.down.load(Ordering::SeqCst);
        let limit_ms = if down {
            DRAIN_QUIET.as_millis() as u64
        } else {
            shared.idle_timeout_ms.load(Ordering::SeqCst)
        };
        if limit_ms == 0 || state.busy.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(WATCH_TICK).await;
            continue;
        }
        let idle_ms = shared
            .now_ms()
            .saturating_sub(state.last_activity_ms.load(Ordering::SeqCst));
        if idle_ms >= limit_ms {
            return down;
        }
        let wait_ms = (limit_ms - idle_ms).min(WATCH_TICK.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    }
}

/// Decrements the in-flight counts when a handler ends or hyper drops it,
/// and stamps the connection's activity, so that the idle timeout counts from
/// the end of the request rather than from its last body byte.
struct InFlightGuard {
    shared: Arc<Shared>,
    connection: Option<Arc<ConnectionState>>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(state) = &self.connection {
            let now = self.shared.now_ms();
            state.last_end_ms.store(now, Ordering::SeqCst);
            state.last_activity_ms.store(now, Ordering::SeqCst);
            state.busy.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Removes a request's entry from `Shared::receiving` when its handler ends.
struct ReceivingGuard<'a> {
    shared: &'a Shared,
    seq: usize,
}

impl Drop for ReceivingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.receiving).remove(&self.seq);
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
            if record.is_accepted() {
                self.shared.accepted.fetch_add(1, Ordering::SeqCst);
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
    let connection = shared.connection_state(peer);
    let mut idle_before = None;
    let mut connection_request = 0;
    if let Some(state) = &connection {
        state.busy.fetch_add(1, Ordering::SeqCst);
        connection_request = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
        if connection_request > 1 {
            let idle_ms = shared
                .now_ms()
                .saturating_sub(state.last_end_ms.load(Ordering::SeqCst));
            idle_before = Some(Duration::from_millis(idle_ms));
        }
    }
    let _in_flight = InFlightGuard {
        shared: shared.clone(),
        connection,
    };
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
        connection_request,
        idle_before,
    };
    if shared.down.load(Ordering::SeqCst) {
        // A server going down cuts off a request that arrives on a connection
        // it has not closed yet; the body is never read, so nothing is accepted.
        let mut record = record;
        record.body_error = Some("cut off: the server is down (flapping)".to_string());
        shared.down_cuts.fetch_add(1, Ordering::SeqCst);
        lock(&shared.requests).push(record);
        shared.close_connection(peer);
        return plain_response(503, "the server is down");
    }
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
        let chosen_read_delay = chosen.read_delay;
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
        let read_delay = chosen_read_delay;
        let _receiving = ReceivingGuard {
            shared,
            seq: record.seq,
        };
        lock(&shared.receiving).insert(record.seq, (part.file_name.clone(), 0));
        let mut hasher = Sha256::new();
        let error = loop {
            match field.chunk().await {
                Ok(Some(chunk)) => {
                    hasher.update(&chunk);
                    part.size += chunk.len() as u64;
                    if let Some(entry) = lock(&shared.receiving).get_mut(&record.seq) {
                        entry.1 = part.size;
                    }
                    if close_mid_body {
                        break None;
                    }
                    let global_us = shared.read_delay_us.load(Ordering::SeqCst);
                    let delay = read_delay + Duration::from_micros(global_us);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
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
