//! The reference receiver behind `outboxd receive`: an HTTP endpoint that
//! accepts the daemon's upload request, checks the bearer token, verifies the
//! archive's SHA-256 and size, and stores each archive atomically in one folder.
//! Tests, the demo and the benchmarks run it in-process through [`start`].
//!
//! Layout of the storage folder: each archive is stored as `<session_id>.zip`
//! beside a JSON sidecar `<session_id>.zip.json` that records its SHA-256, size,
//! client file name and form fields. When a session id arrives again with other
//! content, the new archive gets the first 8 hex digits of its SHA-256 as a
//! suffix (`<session_id>-1a2b3c4d.zip`), so nothing is overwritten. Uploads in
//! progress are written to dot files named `.upload-*.part`, so a listing of
//! `*.zip` shows only stored archives. One receiver owns a folder: at start it
//! deletes the `.upload-*.part` files that a previous receiver left behind.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Default maximum request body: 8 GiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 8 << 30;

/// Maximum session id length in bytes. With the longest suffix (`-` and 64 hex
/// digits) and `.zip.json`, a stored name stays within the 255-byte file name
/// limit of Linux file systems.
pub const MAX_SESSION_ID_BYTES: usize = 180;

/// Maximum size of a text field. Text fields are buffered in memory, unlike
/// the archive part.
const MAX_TEXT_FIELD_BYTES: usize = 64 * 1024;

/// Maximum number of extra form fields kept in the sidecar.
const MAX_EXTRA_FIELDS: usize = 64;

/// Buffer between the multipart stream and the temporary file, so that small
/// chunks do not each cost a blocking write.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// A token file modified less than this long ago is re-read on every request,
/// because file system timestamps are coarse (often a few milliseconds) and two
/// writes of the same length within one tick leave the metadata unchanged.
const TOKEN_RECHECK_WINDOW: Duration = Duration::from_secs(2);

const TEMP_PREFIX: &str = ".upload-";
const TEMP_SUFFIX: &str = ".part";

/// Form fields whose names the upload request fixes.
const SHA256_FIELD: &str = "sha256";
const SIZE_FIELD: &str = "size";
const PROBE_FIELD: &str = "probe";

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Settings of a receiver.
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    /// Folder where archives are stored. Created if missing.
    pub dir: PathBuf,
    /// File that contains the bearer token that clients must send, with
    /// surrounding whitespace trimmed. Re-read when its metadata changes.
    pub token_file: PathBuf,
    /// URL path of the upload route, starting with `/`. Other paths get 404.
    pub path: String,
    /// Maximum request body size in bytes, multipart framing included. Larger
    /// bodies get 413.
    pub max_body_bytes: u64,
    /// Name of the multipart part that contains the archive.
    pub file_field: String,
    /// Name of the form field that contains the session id.
    pub session_field: String,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            dir: PathBuf::new(),
            token_file: PathBuf::new(),
            path: "/upload".to_string(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            file_field: "file".to_string(),
            session_field: "session_id".to_string(),
        }
    }
}

/// Binds a TCP listener with `SO_REUSEADDR`, so that a new receiver can bind
/// the port of a stopped one while the old connections are in TIME_WAIT.
/// Call it inside a Tokio runtime.
pub fn bind_listener(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .with_context(|| format!("creating a TCP socket for {addr} failed"))?;
    socket
        .set_reuseaddr(true)
        .with_context(|| format!("setting SO_REUSEADDR on the socket for {addr} failed"))?;
    socket.bind(addr).with_context(|| {
        format!("binding {addr} failed; choose another address or stop the process that uses it")
    })?;
    socket
        .listen(1024)
        .with_context(|| format!("listening on {addr} failed"))
}

/// Serves uploads on `listener` until `shutdown` completes.
///
/// On shutdown the receiver stops accepting connections, responds with 503 to
/// uploads whose body is still arriving (their temporary files are removed), lets
/// uploads that are already being stored finish, and closes idle connections.
/// Returns an error before serving when the options are invalid, the folder
/// cannot be created or the token file cannot be read.
pub async fn serve(
    listener: TcpListener,
    options: ReceiverOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let receiver = Arc::new(Receiver::open(options)?);
    run_server(listener, receiver, shutdown).await
}

/// Starts a receiver on `addr` (port 0 picks a free port) and returns a handle
/// to it. The receiver runs on the current Tokio runtime.
pub async fn start(addr: SocketAddr, options: ReceiverOptions) -> anyhow::Result<ReceiverHandle> {
    let receiver = Arc::new(Receiver::open(options)?);
    let listener = bind_listener(addr)?;
    let addr = listener
        .local_addr()
        .context("reading the address of the receiver's listener failed")?;
    let url = format!("http://{addr}{}", receiver.path);
    let (shutdown_sender, shutdown_receiver) = oneshot::channel::<()>();
    // A dropped sender also ends the wait, so dropping the handle stops the server.
    let shutdown = async move {
        let _ = shutdown_receiver.await;
    };
    let task = tokio::spawn(run_server(listener, receiver, shutdown));
    Ok(ReceiverHandle {
        addr,
        url,
        shutdown: Some(shutdown_sender),
        task: Some(task),
    })
}

/// A receiver running in the background, for tests, the demo and benchmarks.
///
/// Dropping the handle starts the shutdown without waiting for it. Call
/// [`ReceiverHandle::stop`] before binding the same port again, because only
/// `stop` waits until the listener is closed.
pub struct ReceiverHandle {
    addr: SocketAddr,
    url: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl ReceiverHandle {
    /// Address the receiver listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Upload URL, for example `http://127.0.0.1:40123/upload`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops the receiver and waits until its listener and connections are
    /// closed. Returns the server's error, if it failed.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(sender) = self.shutdown.take() {
            let _ = sender.send(());
        }
        match self.task.take() {
            Some(task) => task
                .await
                .context("the receiver task panicked or was cancelled")?,
            None => Ok(()),
        }
    }
}

impl Drop for ReceiverHandle {
    fn drop(&mut self) {
        if let Some(sender) = self.shutdown.take() {
            let _ = sender.send(());
        }
    }
}

async fn run_server(
    listener: TcpListener,
    receiver: Arc<Receiver>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("reading the address of the receiver's listener failed")?;
    tracing::info!(
        addr = %addr,
        dir = %receiver.dir.display(),
        path = %receiver.path,
        max_body_bytes = receiver.max_body_bytes,
        "receiver listening"
    );

    let stopping = receiver.stopping.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!(addr = %addr, "receiver stopping");
        stopping.cancel();
    };
    axum::serve(listener, router(receiver))
        .with_graceful_shutdown(signal)
        .tcp_nodelay(true)
        .await
        .with_context(|| format!("serving uploads on {addr} failed"))?;

    tracing::info!(addr = %addr, "receiver stopped");
    Ok(())
}

fn router(receiver: Arc<Receiver>) -> Router {
    // usize is 64 bits on the supported targets, so the cap only matters on
    // 32-bit ones.
    let body_limit = usize::try_from(receiver.max_body_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route(&receiver.path, any(handle_upload_route))
        .fallback(handle_unknown_path)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(receiver)
}

/// The state shared by all requests of one receiver.
struct Receiver {
    dir: PathBuf,
    path: String,
    max_body_bytes: u64,
    file_field: String,
    session_field: String,
    token: TokenFile,
    /// Serializes the choice of a stored name and the renames, so that two
    /// uploads of one session cannot claim the same name.
    commit_lock: Mutex<()>,
    /// Cancelled on shutdown, which ends the uploads whose body is still arriving.
    stopping: CancellationToken,
}

impl Receiver {
    fn open(options: ReceiverOptions) -> anyhow::Result<Receiver> {
        validate_options(&options)?;
        fs::create_dir_all(&options.dir).with_context(|| {
            format!(
                "creating the receiver folder {} failed; choose a writable folder",
                options.dir.display()
            )
        })?;
        remove_leftover_temp_files(&options.dir)?;
        let token = TokenFile::open(options.token_file)?;
        Ok(Receiver {
            dir: options.dir,
            path: options.path,
            max_body_bytes: options.max_body_bytes,
            file_field: options.file_field,
            session_field: options.session_field,
            token,
            commit_lock: Mutex::new(()),
            stopping: CancellationToken::new(),
        })
    }
}

fn validate_options(options: &ReceiverOptions) -> anyhow::Result<()> {
    if options.dir.as_os_str().is_empty() {
        bail!("the receiver folder is not set; pass the folder where archives are stored");
    }
    if options.token_file.as_os_str().is_empty() {
        bail!("the receiver token file is not set; pass the file that contains the bearer token");
    }
    // Axum reads `:` and `*` in a route as parameters and panics on a path
    // without a leading slash.
    if !options.path.starts_with('/') || options.path.contains([':', '*']) {
        bail!(
            "invalid upload path {:?}: it must start with / and contain no : or *",
            options.path
        );
    }
    if options.max_body_bytes == 0 {
        bail!("invalid maximum body size 0; pass a positive number of bytes");
    }
    for (option, value) in [
        ("file field", &options.file_field),
        ("session field", &options.session_field),
    ] {
        if value.is_empty() {
            bail!("the {option} name is empty; pass a form field name");
        }
        if [SHA256_FIELD, SIZE_FIELD, PROBE_FIELD].contains(&value.as_str()) {
            bail!("invalid {option} name {value:?}: the upload request uses that name for another field");
        }
    }
    if options.file_field == options.session_field {
        bail!(
            "the file field and the session field are both named {:?}; give them different names",
            options.file_field
        );
    }
    Ok(())
}

/// Deletes `.upload-*.part` files, which only a receiver that stopped in the
/// middle of an upload leaves behind.
fn remove_leftover_temp_files(dir: &Path) -> anyhow::Result<()> {
    let entries = fs::read_dir(dir)
        .with_context(|| format!("listing the receiver folder {} failed", dir.display()))?;
    for entry in entries {
        let entry = entry
            .with_context(|| format!("listing the receiver folder {} failed", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) {
            let path = entry.path();
            fs::remove_file(&path).with_context(|| {
                format!(
                    "removing the leftover temporary file {} failed",
                    path.display()
                )
            })?;
            tracing::info!(file = %path.display(), "removed a leftover temporary upload file");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Request handling

/// Fields of a request's log line, filled in while the request is read.
#[derive(Debug, Default)]
struct RequestLog {
    session_id: Option<String>,
    size: Option<u64>,
    stored: Option<String>,
}

/// A request that ends in an error response.
#[derive(Debug)]
struct Reject {
    status: StatusCode,
    /// Plain-text response body, one line.
    message: String,
    /// Detail for the log only, such as a server-side I/O error.
    detail: Option<String>,
}

impl Reject {
    fn new(status: StatusCode, message: impl Into<String>) -> Reject {
        Reject {
            status,
            message: message.into(),
            detail: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Reject {
        Reject::new(StatusCode::BAD_REQUEST, message)
    }

    fn storage_failed(detail: String) -> Reject {
        Reject {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "storing the upload failed on the receiver; see the receiver log".to_string(),
            detail: Some(detail),
        }
    }
}

/// A request whose body was read completely and checked.
enum Received {
    Probe,
    Upload(Box<VerifiedUpload>),
}

/// An archive in a temporary file whose SHA-256 and size match the form.
struct VerifiedUpload {
    file: ReceivedFile,
    record: StoredRecord,
}

/// A request that ends in a success response (409 counts as one).
enum Accepted {
    Probe,
    Stored { name: String, record: StoredRecord },
    Duplicate { name: String },
}

async fn handle_upload_route(State(receiver): State<Arc<Receiver>>, request: Request) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let mut log = RequestLog::default();

    let received = tokio::select! {
        received = receiver.receive(request, &mut log) => received,
        () = receiver.stopping.cancelled() => Err(Reject::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the receiver is shutting down; retry the upload later",
        )),
    };
    // Storing is not cancelled on shutdown, because it is short and an upload
    // whose body arrived completely should end up stored.
    let result = match received {
        Ok(Received::Probe) => Ok(Accepted::Probe),
        Ok(Received::Upload(upload)) => Arc::clone(&receiver).store(*upload).await,
        Err(reject) => Err(reject),
    };

    let elapsed_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(accepted) => {
            let response = accepted_response(&accepted);
            if let Accepted::Stored { name, .. } | Accepted::Duplicate { name } = accepted {
                log.stored = Some(name);
            }
            log_request(&method, &path, &log, response.status(), elapsed_ms, None);
            response
        }
        Err(reject) => {
            let reason = match &reject.detail {
                Some(detail) => format!("{}: {detail}", reject.message),
                None => reject.message.clone(),
            };
            log_request(
                &method,
                &path,
                &log,
                reject.status,
                elapsed_ms,
                Some(&reason),
            );
            reject_response(reject)
        }
    }
}

async fn handle_unknown_path(State(receiver): State<Arc<Receiver>>, request: Request) -> Response {
    let reject = Reject::new(
        StatusCode::NOT_FOUND,
        format!(
            "not found; this receiver accepts uploads at {}",
            receiver.path
        ),
    );
    let path = request.uri().path().to_string();
    log_request(
        request.method(),
        &path,
        &RequestLog::default(),
        reject.status,
        0,
        Some(&reject.message),
    );
    reject_response(reject)
}

fn accepted_response(accepted: &Accepted) -> Response {
    match accepted {
        Accepted::Probe => (StatusCode::OK, "probe accepted: the token is valid\n").into_response(),
        Accepted::Stored { name, record } => {
            let body = serde_json::json!({
                "stored": name,
                "session_id": record.session_id,
                "sha256": record.sha256,
                "size": record.size,
            });
            // Axum's `Json` needs the "json" feature, which this crate does not enable.
            let content_type = [(header::CONTENT_TYPE, "application/json")];
            (StatusCode::CREATED, content_type, format!("{body}\n")).into_response()
        }
        Accepted::Duplicate { name } => (
            StatusCode::CONFLICT,
            format!("already stored as {name} with the same sha256\n"),
        )
            .into_response(),
    }
}

fn reject_response(reject: Reject) -> Response {
    let mut response = (reject.status, format!("{}\n", reject.message)).into_response();
    let headers = response.headers_mut();
    if reject.status == StatusCode::UNAUTHORIZED {
        headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"outboxd\""),
        );
    }
    if reject.status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
    }
    response
}

/// Writes the one log line of a request: at info level when it was accepted
/// (`reason` is `None`, 409 included), otherwise at warn or, for 5xx, error
/// level. The session id is logged only after it passed validation, so it
/// contains no control characters.
fn log_request(
    method: &Method,
    path: &str,
    log: &RequestLog,
    status: StatusCode,
    elapsed_ms: u64,
    reason: Option<&str>,
) {
    let status = status.as_u16();
    let session_id = log.session_id.as_deref();
    let stored = log.stored.as_deref();
    match reason {
        None => tracing::info!(
            method = %method,
            path,
            status,
            session_id,
            size = log.size,
            stored,
            elapsed_ms,
            "request handled"
        ),
        Some(reason) if status >= 500 => tracing::error!(
            method = %method,
            path,
            status,
            session_id,
            size = log.size,
            stored,
            elapsed_ms,
            reason,
            "request failed"
        ),
        Some(reason) => tracing::warn!(
            method = %method,
            path,
            status,
            session_id,
            size = log.size,
            stored,
            elapsed_ms,
            reason,
            "request rejected"
        ),
    }
}

impl Receiver {
    /// Checks the request, reads its body and verifies the archive against the
    /// form fields. The archive is then in a temporary file that [`Self::store`]
    /// syncs and renames.
    async fn receive(&self, request: Request, log: &mut RequestLog) -> Result<Received, Reject> {
        if request.method() != Method::POST {
            return Err(Reject::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "method {} is not allowed; send uploads with POST",
                    request.method()
                ),
            ));
        }
        self.authorize(request.headers())?;
        self.check_content_length(request.headers())?;
        let idempotency_key = idempotency_key(request.headers())?;

        let multipart = Multipart::from_request(request, &())
            .await
            .map_err(|rejection| {
                Reject::bad_request(format!(
                    "the request body is not multipart/form-data: {}",
                    rejection.body_text()
                ))
            })?;
        let form = self.read_form(multipart, log).await?;

        let Some(file) = form.file else {
            if form.probe {
                return Ok(Received::Probe);
            }
            return Err(Reject::bad_request(format!(
                "missing part {:?} with the archive",
                self.file_field
            )));
        };
        let session_id = form.session_id.ok_or_else(|| {
            Reject::bad_request(format!("missing field {:?}", self.session_field))
        })?;
        let sha256 = form
            .sha256
            .ok_or_else(|| Reject::bad_request(format!("missing field {SHA256_FIELD:?}")))?;
        let size = form
            .size
            .ok_or_else(|| Reject::bad_request(format!("missing field {SIZE_FIELD:?}")))?;

        if let Some(key) = idempotency_key {
            if !key.eq_ignore_ascii_case(&sha256) {
                return Err(Reject::bad_request(format!(
                    "the Idempotency-Key header {} does not match field sha256 {sha256}; send the SHA-256 of the archive in both",
                    quote_excerpt(&key)
                )));
            }
        }
        if file.size != size {
            return Err(Reject::bad_request(format!(
                "size mismatch: field size is {size} but part {:?} has {} bytes; send the byte count of that part",
                self.file_field, file.size
            )));
        }
        if file.sha256 != sha256 {
            return Err(Reject::bad_request(format!(
                "sha256 mismatch: field sha256 is {sha256} but part {:?} hashes to {}; send the SHA-256 of the bytes in that part",
                self.file_field, file.sha256
            )));
        }

        let record = StoredRecord {
            session_id,
            sha256,
            size,
            file_name: file.file_name.clone(),
            content_type: file.content_type.clone(),
            fields: form.fields,
            received_at: crate::timefmt::rfc3339(crate::timefmt::now_ms()),
        };
        Ok(Received::Upload(Box::new(VerifiedUpload { file, record })))
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), Reject> {
        let Some(presented) = bearer_token(headers) else {
            return Err(Reject::new(
                StatusCode::UNAUTHORIZED,
                "missing Authorization header with a Bearer token",
            ));
        };
        // Comparing digests of fixed length keeps the time independent of
        // where the tokens differ and of their lengths.
        let presented = Sha256::digest(presented.as_bytes());
        match self.token.current_digest() {
            Some(expected) if bool::from(expected.ct_eq(presented.as_slice())) => Ok(()),
            _ => Err(Reject::new(StatusCode::UNAUTHORIZED, "invalid token")),
        }
    }

    /// Rejects a body whose declared length exceeds the limit before reading
    /// it. Bodies without a length are cut off by `DefaultBodyLimit` instead.
    fn check_content_length(&self, headers: &HeaderMap) -> Result<(), Reject> {
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        match length {
            Some(length) if length > self.max_body_bytes => Err(Reject::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body of {length} bytes exceeds the limit of {} bytes",
                    self.max_body_bytes
                ),
            )),
            _ => Ok(()),
        }
    }

    async fn read_form(
        &self,
        mut multipart: Multipart,
        log: &mut RequestLog,
    ) -> Result<UploadForm, Reject> {
        let mut form = UploadForm::default();
        while let Some(mut field) = multipart
            .next_field()
            .await
            .map_err(|err| self.multipart_error(err))?
        {
            let name = match field.name() {
                Some(name) if !name.is_empty() => name.to_string(),
                _ => {
                    return Err(Reject::bad_request(
                        "a multipart part has no name in its Content-Disposition header",
                    ))
                }
            };
            if name == self.file_field {
                if form.file.is_some() {
                    return Err(Reject::bad_request(format!(
                        "the body has more than one part {name:?}; send one archive per request"
                    )));
                }
                let file = self.receive_file(&mut field).await?;
                log.size = Some(file.size);
                form.file = Some(file);
                continue;
            }
            let value = self.read_text_field(&mut field, &name).await?;
            self.set_form_field(&mut form, name, value, log)?;
        }
        Ok(form)
    }

    fn set_form_field(
        &self,
        form: &mut UploadForm,
        name: String,
        value: String,
        log: &mut RequestLog,
    ) -> Result<(), Reject> {
        let duplicate = || {
            Reject::bad_request(format!(
                "field {} appears more than once; send it once",
                quote_excerpt(&name)
            ))
        };
        if name == self.session_field {
            if form.session_id.is_some() {
                return Err(duplicate());
            }
            validate_session_id(&value).map_err(|problem| {
                Reject::bad_request(format!(
                    "invalid {name} {}: {problem}",
                    quote_excerpt(&value)
                ))
            })?;
            log.session_id = Some(value.clone());
            form.session_id = Some(value);
        } else if name == SHA256_FIELD {
            if form.sha256.is_some() {
                return Err(duplicate());
            }
            form.sha256 = Some(parse_sha256(&value).ok_or_else(|| {
                Reject::bad_request(format!(
                    "invalid sha256 {}: expected 64 hex digits",
                    quote_excerpt(&value)
                ))
            })?);
        } else if name == SIZE_FIELD {
            if form.size.is_some() {
                return Err(duplicate());
            }
            form.size = Some(value.trim().parse::<u64>().map_err(|_| {
                Reject::bad_request(format!(
                    "invalid size {}: expected a number of bytes",
                    quote_excerpt(&value)
                ))
            })?);
        } else if name == PROBE_FIELD {
            form.probe = value == "1";
        } else {
            if form.fields.contains_key(&name) {
                return Err(duplicate());
            }
            if form.fields.len() >= MAX_EXTRA_FIELDS {
                return Err(Reject::bad_request(format!(
                    "the body has more than {MAX_EXTRA_FIELDS} extra fields; send fewer"
                )));
            }
            form.fields.insert(name, value);
        }
        Ok(())
    }

    async fn read_text_field(
        &self,
        field: &mut axum::extract::multipart::Field<'_>,
        name: &str,
    ) -> Result<String, Reject> {
        let mut bytes = Vec::new();
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|err| self.multipart_error(err))?
        {
            if bytes.len() + chunk.len() > MAX_TEXT_FIELD_BYTES {
                return Err(Reject::bad_request(format!(
                    "field {} is longer than {MAX_TEXT_FIELD_BYTES} bytes; send the archive in part {:?}",
                    quote_excerpt(name),
                    self.file_field
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        String::from_utf8(bytes).map_err(|_| {
            Reject::bad_request(format!("field {} is not valid UTF-8", quote_excerpt(name)))
        })
    }

    /// Streams the archive part into a new temporary file in the storage
    /// folder, hashing it on the way. The file is removed again when the
    /// returned value, or the future before it completes, is dropped.
    async fn receive_file(
        &self,
        field: &mut axum::extract::multipart::Field<'_>,
    ) -> Result<ReceivedFile, Reject> {
        let file_name = field.file_name().map(str::to_string);
        let content_type = field.content_type().map(str::to_string);
        let (temp, file) = TempFile::create(&self.dir).map_err(|err| {
            Reject::storage_failed(format!(
                "creating a temporary file in {} failed: {err}",
                self.dir.display()
            ))
        })?;
        let write_failed = |err: io::Error| {
            Reject::storage_failed(format!("writing {} failed: {err}", temp.path.display()))
        };

        let mut writer =
            BufWriter::with_capacity(WRITE_BUFFER_BYTES, tokio::fs::File::from_std(file));
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|err| self.multipart_error(err))?
        {
            hasher.update(&chunk);
            size += chunk.len() as u64;
            writer.write_all(&chunk).await.map_err(write_failed)?;
        }
        writer.flush().await.map_err(write_failed)?;
        let file = writer.into_inner().into_std().await;

        Ok(ReceivedFile {
            temp,
            file,
            sha256: hex::encode(hasher.finalize()),
            size,
            file_name,
            content_type,
        })
    }

    fn multipart_error(&self, err: axum::extract::multipart::MultipartError) -> Reject {
        if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Reject::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body exceeds the limit of {} bytes",
                    self.max_body_bytes
                ),
            );
        }
        // Other errors are malformed bodies or clients that went away while
        // sending, and neither is a fault of the receiver.
        Reject::bad_request(format!(
            "reading the multipart body failed: {}",
            err.body_text()
        ))
    }

    /// Syncs the temporary file and moves it to its stored name, or reports a
    /// duplicate. Runs on the blocking pool, so it completes even when the
    /// request is dropped.
    async fn store(self: Arc<Self>, upload: VerifiedUpload) -> Result<Accepted, Reject> {
        let task = tokio::task::spawn_blocking(move || self.commit(upload));
        match task.await {
            Ok(result) => result,
            Err(err) => Err(Reject::storage_failed(format!(
                "the storage task failed: {err}"
            ))),
        }
    }

    fn commit(&self, upload: VerifiedUpload) -> Result<Accepted, Reject> {
        let VerifiedUpload { file, record } = upload;
        let ReceivedFile { temp, file, .. } = file;
        file.sync_all().map_err(|err| {
            Reject::storage_failed(format!("syncing {} failed: {err}", temp.path.display()))
        })?;
        drop(file);

        let _lock = self
            .commit_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for stem in stored_name_candidates(&record.session_id, &record.sha256) {
            let name = format!("{stem}.zip");
            let archive = self.dir.join(&name);
            match read_stored_entry(&archive) {
                None => {
                    self.write_sidecar(&archive, &record)?;
                    temp.persist(&archive).map_err(|err| {
                        Reject::storage_failed(format!(
                            "renaming the upload to {} failed: {err}",
                            archive.display()
                        ))
                    })?;
                    sync_dir(&self.dir).map_err(|err| {
                        Reject::storage_failed(format!(
                            "syncing {} failed: {err}",
                            self.dir.display()
                        ))
                    })?;
                    return Ok(Accepted::Stored { name, record });
                }
                Some(entry) if entry.is_same_upload(&record) => {
                    return Ok(Accepted::Duplicate { name });
                }
                Some(_) => continue,
            }
        }
        Err(Reject::storage_failed(format!(
            "every stored name for session {:?} is taken by other content",
            record.session_id
        )))
    }

    /// Writes `<archive>.json` through a temporary file. It is written before
    /// the archive is renamed, so that every stored archive has its sidecar.
    fn write_sidecar(&self, archive: &Path, record: &StoredRecord) -> Result<(), Reject> {
        let path = sidecar_path(archive);
        let failed = |err: io::Error| {
            Reject::storage_failed(format!("writing {} failed: {err}", path.display()))
        };
        let (temp, mut file) = TempFile::create(&self.dir).map_err(failed)?;
        let mut json =
            serde_json::to_vec_pretty(record).map_err(|err| failed(io::Error::other(err)))?;
        json.push(b'\n');
        io::Write::write_all(&mut file, &json).map_err(failed)?;
        file.sync_all().map_err(failed)?;
        temp.persist(&path).map_err(failed)
    }
}

/// The form of one upload request, as far as it was read.
#[derive(Default)]
struct UploadForm {
    session_id: Option<String>,
    /// Lowercase hex.
    sha256: Option<String>,
    size: Option<u64>,
    probe: bool,
    fields: BTreeMap<String, String>,
    file: Option<ReceivedFile>,
}

/// An archive part written to a temporary file.
struct ReceivedFile {
    temp: TempFile,
    file: File,
    /// Lowercase hex of the received bytes.
    sha256: String,
    size: u64,
    file_name: Option<String>,
    content_type: Option<String>,
}

/// Contents of the JSON sidecar beside a stored archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredRecord {
    session_id: String,
    sha256: String,
    size: u64,
    /// File name that the client sent. Recorded only, never used as a path.
    file_name: Option<String>,
    content_type: Option<String>,
    /// Extra form fields.
    fields: BTreeMap<String, String>,
    /// RFC 3339, UTC.
    received_at: String,
}

/// Session id and SHA-256 of an archive already stored under a name, each
/// `None` when unknown.
struct StoredEntry {
    session_id: Option<String>,
    sha256: Option<String>,
}

impl StoredEntry {
    fn is_same_upload(&self, record: &StoredRecord) -> bool {
        self.sha256.as_deref() == Some(record.sha256.as_str())
            && self
                .session_id
                .as_deref()
                .is_none_or(|session_id| session_id == record.session_id)
    }
}

/// Returns what is stored at `archive`, or `None` when the name is free. The
/// SHA-256 comes from the sidecar, or from hashing the archive when the
/// sidecar is missing or unreadable.
fn read_stored_entry(archive: &Path) -> Option<StoredEntry> {
    fs::symlink_metadata(archive).ok()?;
    let sidecar = fs::read(sidecar_path(archive))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<StoredRecord>(&bytes).ok());
    Some(match sidecar {
        Some(record) => StoredEntry {
            session_id: Some(record.session_id),
            sha256: Some(record.sha256),
        },
        None => StoredEntry {
            session_id: None,
            sha256: hash_file(archive).ok(),
        },
    })
}

fn hash_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn sidecar_path(archive: &Path) -> PathBuf {
    let mut path = archive.as_os_str().to_owned();
    path.push(".json");
    PathBuf::from(path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Stored names to try for an upload, in order: the session id, then the
/// session id with the first 8 and then all 64 hex digits of the SHA-256.
fn stored_name_candidates(session_id: &str, sha256: &str) -> [String; 3] {
    [
        session_id.to_string(),
        format!("{session_id}-{}", &sha256[..8]),
        format!("{session_id}-{sha256}"),
    ]
}

/// Checks that a session id can be used as a file name in the storage folder.
///
/// A name without `/` or `\` that does not start with a dot cannot leave the
/// folder. The dot rule excludes `.` and `..`, and also dot files, which the
/// folder reserves for temporary files. A `..` inside a name, as in `a..b`, is allowed
/// because it is not a path component.
fn validate_session_id(session_id: &str) -> Result<(), String> {
    if session_id.is_empty() {
        return Err("it is empty".to_string());
    }
    if session_id.len() > MAX_SESSION_ID_BYTES {
        return Err(format!(
            "it is {} bytes long, more than the maximum of {MAX_SESSION_ID_BYTES}",
            session_id.len()
        ));
    }
    if session_id.starts_with('.') {
        return Err("it starts with a dot".to_string());
    }
    if session_id.contains(['/', '\\']) {
        return Err("it contains a path separator (/ or \\)".to_string());
    }
    if session_id.chars().any(char::is_control) {
        return Err("it contains a control character".to_string());
    }
    Ok(())
}

/// Returns the SHA-256 in lowercase hex, or `None` unless it is 64 hex digits.
fn parse_sha256(value: &str) -> Option<String> {
    let value = value.trim();
    if value.len() == 64 && value.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        Some(value.to_ascii_lowercase())
    } else {
        None
    }
}

/// Returns the token of an `Authorization: Bearer <token>` header. The scheme
/// is case-insensitive, as HTTP/1.1 defines auth schemes (RFC 2068, section 11).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Reject> {
    match headers.get(IDEMPOTENCY_KEY) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|key| Some(key.trim().to_string()))
            .map_err(|_| Reject::bad_request("the Idempotency-Key header is not visible ASCII")),
    }
}

/// Quotes a client-supplied value for a message: escaped, so that it stays on
/// one line, and cut to 64 characters.
fn quote_excerpt(value: &str) -> String {
    const MAX_CHARS: usize = 64;
    if value.chars().count() <= MAX_CHARS {
        format!("{value:?}")
    } else {
        let excerpt: String = value.chars().take(MAX_CHARS).collect();
        format!("{excerpt:?}...")
    }
}

// ---------------------------------------------------------------------------
// Temporary files

/// A temporary file in the storage folder, removed on drop unless persisted.
/// The name is a dot file, so that no listing of `*.zip` shows it.
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    fn create(dir: &Path) -> io::Result<(TempFile, File)> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            let number = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("{TEMP_PREFIX}{}-{number}{TEMP_SUFFIX}", std::process::id());
            let path = dir.join(name);
            match File::options().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    return Ok((
                        TempFile {
                            path,
                            persisted: false,
                        },
                        file,
                    ))
                }
                // The name belongs to an earlier process with the same pid, so take
                // the next number.
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// Renames the file to `target`, replacing any file there.
    fn persist(mut self, target: &Path) -> io::Result<()> {
        fs::rename(&self.path, target)?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.persisted {
            return;
        }
        if let Err(err) = fs::remove_file(&self.path) {
            if err.kind() != io::ErrorKind::NotFound {
                tracing::warn!(
                    file = %self.path.display(),
                    error = %err,
                    "removing a temporary upload file failed"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Token file

/// The token file, re-read when its metadata changes. Holds only the SHA-256
/// of the token, never the token itself.
struct TokenFile {
    path: PathBuf,
    state: Mutex<TokenState>,
}

#[derive(Default)]
struct TokenState {
    /// Metadata at the last read, or `None` when the file was missing.
    stamp: Option<FileStamp>,
    /// SHA-256 of the trimmed token, or `None` when the file is missing or empty.
    digest: Option<[u8; 32]>,
    /// Reason that there is no token, as last logged.
    problem: Option<String>,
}

/// The metadata that changes when a file is rewritten in place, replaced by a
/// rename or swapped through a symbolic link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    inode: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    modified: Option<SystemTime>,
}

impl FileStamp {
    fn of(metadata: &fs::Metadata) -> FileStamp {
        FileStamp {
            dev: metadata.dev(),
            inode: metadata.ino(),
            len: metadata.len(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
            modified: metadata.modified().ok(),
        }
    }

    fn is_recent(&self) -> bool {
        match self.modified {
            // An error means a modification time in the future, which counts as recent.
            Some(modified) => SystemTime::now()
                .duration_since(modified)
                .map_or(true, |age| age < TOKEN_RECHECK_WINDOW),
            None => true,
        }
    }
}

impl TokenFile {
    /// Reads the token file once. Fails when it cannot be read, which catches
    /// a wrong path at start. Later read failures reject every request instead.
    fn open(path: PathBuf) -> anyhow::Result<TokenFile> {
        fs::read(&path).with_context(|| {
            format!(
                "reading the token file {} failed; create it with the bearer token that clients send",
                path.display()
            )
        })?;
        for warning in crate::token::permission_warnings(&path) {
            tracing::warn!(token_file = %path.display(), "{warning}");
        }
        let token = TokenFile {
            path,
            state: Mutex::new(TokenState::default()),
        };
        let mut state = token.state.lock().unwrap_or_else(PoisonError::into_inner);
        let stamp = fs::metadata(&token.path)
            .ok()
            .map(|metadata| FileStamp::of(&metadata));
        token.load(&mut state, stamp);
        drop(state);
        Ok(token)
    }

    /// Returns the SHA-256 of the current token, re-reading the file when its
    /// metadata changed since the last read or it was modified very recently.
    fn current_digest(&self) -> Option<[u8; 32]> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let stamp = fs::metadata(&self.path)
            .ok()
            .map(|metadata| FileStamp::of(&metadata));
        let unchanged = stamp == state.stamp && !stamp.is_some_and(|stamp| stamp.is_recent());
        if !unchanged {
            self.load(&mut state, stamp);
        }
        state.digest
    }

    /// Reads the token into `state`. The stamp was taken before the read, so a
    /// change during the read shows up as a new stamp on the next request.
    fn load(&self, state: &mut TokenState, stamp: Option<FileStamp>) {
        let (digest, problem) = match fs::read_to_string(&self.path) {
            Ok(text) if text.trim().is_empty() => (None, Some("the file is empty".to_string())),
            Ok(text) => (
                Some(<[u8; 32]>::from(Sha256::digest(text.trim().as_bytes()))),
                None,
            ),
            Err(err) => (None, Some(format!("reading it failed: {err}"))),
        };
        if digest != state.digest || problem != state.problem {
            match (&digest, &problem) {
                (Some(digest), _) => tracing::info!(
                    token_file = %self.path.display(),
                    fingerprint = %hex::encode(&digest[..4]),
                    "token loaded"
                ),
                (None, Some(problem)) => tracing::error!(
                    token_file = %self.path.display(),
                    problem = %problem,
                    "token file unusable, so every request gets 401 until it is fixed"
                ),
                (None, None) => {}
            }
        }
        state.stamp = stamp;
        state.digest = digest;
        state.problem = problem;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_accepts_plain_names() {
        for session_id in [
            "session-1",
            "2024-05-01T10:00:00Z",
            "a..b",
            "Aufnahme ä",
            "x.zip",
        ] {
            assert_eq!(validate_session_id(session_id), Ok(()), "{session_id:?}");
        }
    }

    #[test]
    fn session_id_rejects_unsafe_names() {
        let too_long = "a".repeat(MAX_SESSION_ID_BYTES + 1);
        for session_id in [
            "",
            ".",
            "..",
            "../evil",
            ".hidden",
            "a/b",
            "/etc/passwd",
            "a\\b",
            "a\nb",
            "a\0b",
            "a\u{7f}b",
            too_long.as_str(),
        ] {
            assert!(validate_session_id(session_id).is_err(), "{session_id:?}");
        }
    }

    #[test]
    fn session_id_maximum_length_is_accepted() {
        let longest = "a".repeat(MAX_SESSION_ID_BYTES);
        assert_eq!(validate_session_id(&longest), Ok(()));
    }

    #[test]
    fn longest_stored_name_fits_name_max() {
        let longest = "a".repeat(MAX_SESSION_ID_BYTES);
        let sha256 = "f".repeat(64);
        let names = stored_name_candidates(&longest, &sha256);
        let sidecar = format!("{}.zip.json", names[2]);
        assert!(sidecar.len() <= 255, "{} bytes", sidecar.len());
    }

    #[test]
    fn name_candidates_add_sha_suffixes() {
        let sha256 = format!("1a2b3c4d{}", "0".repeat(56));
        let names = stored_name_candidates("s", &sha256);
        assert_eq!(names[0], "s");
        assert_eq!(names[1], "s-1a2b3c4d");
        assert_eq!(names[2], format!("s-{sha256}"));
    }

    #[test]
    fn sha256_parses_hex_only() {
        let upper = "AB".repeat(32);
        assert_eq!(parse_sha256(&upper), Some("ab".repeat(32)));
        assert_eq!(parse_sha256(&"ab".repeat(31)), None);
        assert_eq!(parse_sha256(&"zz".repeat(32)), None);
        assert_eq!(parse_sha256(""), None);
    }

    #[test]
    fn bearer_token_parses_scheme() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);

        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer_token(&headers), Some("abc"));

        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer_token(&headers), Some("abc"));

        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&headers), None);

        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer"));
        assert_eq!(bearer_token(&headers), None);
    }

    #[test]
    fn quote_excerpt_escapes_and_cuts() {
        assert_eq!(quote_excerpt("a\nb"), "\"a\\nb\"");
        let long = "x".repeat(100);
        let quoted = quote_excerpt(&long);
        assert!(quoted.ends_with("\"..."), "{quoted}");
        assert_eq!(quoted.len(), 64 + 2 + 3);
    }

    fn digest_of(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    #[test]
    fn token_file_trims_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        fs::write(&path, "  first\n").unwrap();
        let token = TokenFile::open(path.clone()).unwrap();
        assert_eq!(token.current_digest(), Some(digest_of("first")));

        // Same length, written right away: the mtime may not change.
        fs::write(&path, "  secnd\n").unwrap();
        assert_eq!(token.current_digest(), Some(digest_of("secnd")));
    }

    #[test]
    fn token_file_replaced_by_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        fs::write(&path, "first").unwrap();
        let token = TokenFile::open(path.clone()).unwrap();

        let replacement = dir.path().join("token.new");
        fs::write(&replacement, "other").unwrap();
        fs::rename(&replacement, &path).unwrap();
        assert_eq!(token.current_digest(), Some(digest_of("other")));
    }

    #[test]
    fn token_file_missing_or_empty_has_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        fs::write(&path, "first").unwrap();
        let token = TokenFile::open(path.clone()).unwrap();

        fs::write(&path, " \n").unwrap();
        assert_eq!(token.current_digest(), None);

        fs::remove_file(&path).unwrap();
        assert_eq!(token.current_digest(), None);

        fs::write(&path, "back").unwrap();
        assert_eq!(token.current_digest(), Some(digest_of("back")));
    }

    #[test]
    fn token_file_missing_at_start_fails() {
        let dir = tempfile::tempdir().unwrap();
        let error = TokenFile::open(dir.path().join("absent")).err().unwrap();
        assert!(format!("{error:#}").contains("absent"), "{error:#}");
    }

    #[test]
    fn options_reject_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let valid = ReceiverOptions {
            dir: dir.path().join("store"),
            token_file: dir.path().join("token"),
            ..ReceiverOptions::default()
        };
        assert!(validate_options(&valid).is_ok());

        type Change = fn(&mut ReceiverOptions);
        let cases: [(&str, Change); 7] = [
            ("empty dir", |o| o.dir = PathBuf::new()),
            ("empty token file", |o| o.token_file = PathBuf::new()),
            ("path without slash", |o| o.path = "upload".to_string()),
            ("path with parameter", |o| o.path = "/:id".to_string()),
            ("zero body limit", |o| o.max_body_bytes = 0),
            ("reserved field", |o| o.file_field = "sha256".to_string()),
            ("same field names", |o| o.session_field = "file".to_string()),
        ];
        for (case, change) in cases {
            let mut options = valid.clone();
            change(&mut options);
            assert!(validate_options(&options).is_err(), "{case}");
        }
    }

    #[test]
    fn temp_file_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let (temp, _file) = TempFile::create(dir.path()).unwrap();
        let path = temp.path.clone();
        assert!(path.exists());
        drop(temp);
        assert!(!path.exists());
    }

    #[test]
    fn temp_file_kept_when_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let (temp, _file) = TempFile::create(dir.path()).unwrap();
        let target = dir.path().join("kept.zip");
        temp.persist(&target).unwrap();
        assert!(target.exists());
    }

    #[test]
    fn leftover_temp_files_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let leftover = dir.path().join(".upload-1-1.part");
        let kept = dir.path().join("s.zip");
        fs::write(&leftover, b"partial").unwrap();
        fs::write(&kept, b"stored").unwrap();
        remove_leftover_temp_files(dir.path()).unwrap();
        assert!(!leftover.exists());
        assert!(kept.exists());
    }
}
