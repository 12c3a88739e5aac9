//! The upload request: the HTTP client, the checks on `server_url` made before
//! any connection, and one `POST` per file with the archive streamed from disk
//! and hashed as it goes.

use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::multipart::{Form, Part};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tracing::instrument;

use crate::config::Settings;
use crate::outcome::{self, Outcome};
use crate::token::Token;

/// `User-Agent` of every request.
pub const USER_AGENT: &str = concat!("outboxd/", env!("CARGO_PKG_VERSION"));

/// Bytes read from the archive per chunk of the request body.
const CHUNK_BYTES: usize = 256 * 1024;

/// Maximum bytes of a response body read for a reason or a log line.
const RESPONSE_EXCERPT_BYTES: usize = 4096;

/// Connections idle for longer are closed by the client. Kept short because
/// servers often close idle connections after 5 to 60 s, and a request sent on
/// a connection that the server is closing fails.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Checks `server_url` before any connection is made: it must be set, parse,
/// use http or https, and use https for hosts other than loopback unless
/// `allow_insecure_http` is set, because the token would travel in clear text.
pub fn check_server_url(settings: &Settings) -> Result<reqwest::Url, String> {
    let Some(text) = settings.server_url.as_deref() else {
        return Err(
            "server_url is not set; set it in the config file, OUTBOXD_SERVER_URL or --server-url"
                .into(),
        );
    };
    let url = reqwest::Url::parse(text.trim())
        .map_err(|err| format!("server_url = {text:?} is not a valid URL: {err}; use a full URL such as https://uploads.example.com/upload"))?;
    if !url.username().is_empty() || url.password().is_some() {
        // The value is not repeated, because it contains a credential.
        return Err("server_url contains a user name or password, which would replace the Bearer token and appear in logs and status; remove the user:password@ part".into());
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if settings.allow_insecure_http || is_loopback(&url) => Ok(url),
        "http" => Err(format!(
            "server_url = {text:?} uses plain http:// to a host that is not loopback, so the token would travel in clear text; use https://, or set allow_insecure_http = true if the network is trusted"
        )),
        other => Err(format!("server_url = {text:?} has the scheme {other:?}; use https:// (or http:// to loopback)")),
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// One file to upload, as the queue recorded it.
#[derive(Debug, Clone)]
pub struct UploadJob {
    pub path: PathBuf,
    pub file_name: String,
    pub session_id: String,
    pub size: u64,
    pub sha256: String,
    pub mtime_ns: i128,
    pub inode: u64,
}

/// A problem with the file itself, found before or while it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalFault {
    /// The file is gone from the outbox.
    Vanished,
    /// The file differs from what was recorded; it must be hashed again.
    Changed(String),
    /// The file cannot be opened or read.
    Unreadable(String),
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Done(Outcome),
    Local(LocalFault),
}

/// The HTTP side of uploading: a client and the request's fixed parts.
#[derive(Clone)]
pub struct Uploader {
    client: reqwest::Client,
    /// A client that keeps no idle connections, so that each request opens a
    /// new one: for the one repeat of an upload whose pooled connection was
    /// closed under it.
    fresh_client: reqwest::Client,
    url: reqwest::Url,
    fields: Vec<(String, String)>,
    file_field: String,
    session_field: String,
    retry_after_max: Duration,
}

impl Uploader {
    /// Builds the client. The error is a configuration fault (URL, CA file).
    pub fn new(settings: &Settings) -> Result<Uploader, String> {
        let url = check_server_url(settings)?;
        let client = build_client(settings, usize::MAX)?;
        let fresh_client = build_client(settings, 0)?;
        Ok(Uploader {
            client,
            fresh_client,
            url,
            fields: settings
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            file_field: settings.file_field.clone(),
            session_field: settings.session_field.clone(),
            retry_after_max: settings.retry_after_max,
        })
    }

    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// Sends one file. `progress` receives the count of body bytes of the
    /// archive handed to the connection.
    ///
    /// A pooled keep-alive connection that the server closes just as a request
    /// starts on it fails the request without any fault of the server or the
    /// file. So after a transport error that is neither a connect error nor a
    /// timeout, the upload is sent once more, at once, on a new connection.
    /// Only a second failure counts as the server being unreachable.
    #[instrument(skip_all, fields(file = %crate::intake::escape_for_log(&job.file_name)))]
    pub async fn upload(
        &self,
        job: &UploadJob,
        token: &Token,
        progress: Arc<AtomicU64>,
    ) -> Attempt {
        let error = match self.send_file(&self.client, job, token, &progress).await {
            Sent::Attempt(attempt) => return attempt,
            Sent::ConnectionLost(error) => error,
        };
        tracing::debug!(error = %outcome::error_chain(&error), "the connection failed before a response; sending once more on a new connection");
        progress.store(0, Ordering::Relaxed);
        match self
            .send_file(&self.fresh_client, job, token, &progress)
            .await
        {
            Sent::Attempt(attempt) => attempt,
            Sent::ConnectionLost(error) => Attempt::Done(outcome::classify_error(&error)),
        }
    }

    async fn send_file(
        &self,
        client: &reqwest::Client,
        job: &UploadJob,
        token: &Token,
        progress: &Arc<AtomicU64>,
    ) -> Sent {
        let file = match open_checked(job).await {
            Ok(file) => file,
            Err(fault) => return Sent::Attempt(Attempt::Local(fault)),
        };
        let changed = Arc::new(AtomicBool::new(false));
        let body = verified_body(
            file,
            job.size,
            job.sha256.clone(),
            progress.clone(),
            changed.clone(),
        );
        let part = Part::stream_with_length(body, job.size)
            .file_name(safe_file_name(&job.file_name))
            .mime_str("application/zip")
            .expect("application/zip is a valid MIME type");

        let mut form = Form::new()
            .percent_encode_noop()
            .text(self.session_field.clone(), job.session_id.clone())
            .text("sha256", job.sha256.clone())
            .text("size", job.size.to_string());
        for (name, value) in &self.fields {
            form = form.text(name.clone(), value.clone());
        }
        form = form.part(self.file_field.clone(), part);

        let request = client
            .post(self.url.clone())
            .bearer_auth(token.expose())
            .header("Idempotency-Key", &job.sha256)
            .multipart(form);
        let result = match request.send().await {
            Ok(response) => Ok(self.read_response(response, token).await),
            Err(error) => Err(error),
        };
        if changed.load(Ordering::SeqCst) {
            return Sent::Attempt(Attempt::Local(LocalFault::Changed(
                "the file changed while it was sent; the request was aborted before the body was complete".into(),
            )));
        }
        match result {
            Ok(outcome) => Sent::Attempt(Attempt::Done(outcome)),
            Err(error) if is_lost_connection(&error) => Sent::ConnectionLost(error),
            Err(error) => Sent::Attempt(Attempt::Done(outcome::classify_error(&error))),
        }
    }

    /// Sends the probe of `outboxd check` and of a hold with an empty queue: a
    /// multipart body with `probe=1` and no file. 2xx, 400 and 422 mean that the
    /// server was reached and did not refuse the token.
    #[instrument(skip_all)]
    pub async fn probe(&self, token: &Token) -> Outcome {
        let form = Form::new().text("probe", "1");
        let request = self
            .client
            .post(self.url.clone())
            .bearer_auth(token.expose())
            .multipart(form);
        match self.finish(request, token).await {
            Outcome::Rejected { reason }
                if reason.starts_with("HTTP 400") || reason.starts_with("HTTP 422") =>
            {
                Outcome::Uploaded {
                    status: reason[5..8].parse().unwrap_or(400),
                }
            }
            other => other,
        }
    }

    /// Sends the request and classifies the response.
    async fn finish(&self, request: reqwest::RequestBuilder, token: &Token) -> Outcome {
        match request.send().await {
            Ok(response) => self.read_response(response, token).await,
            Err(err) => outcome::classify_error(&err),
        }
    }

    /// Classifies a response. `token` is removed from the response text, because
    /// a server that echoes the request (a debugging proxy, an error page that
    /// dumps the headers) would otherwise put it into reasons, logs and `status`.
    async fn read_response(&self, mut response: reqwest::Response, token: &Token) -> Outcome {
        let status = response.status();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let retry_after = header("retry-after");
        let location = header("location");
        let mut body = Vec::new();
        while body.len() < RESPONSE_EXCERPT_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        body.truncate(RESPONSE_EXCERPT_BYTES);
        let body = String::from_utf8_lossy(&body);
        let location = location.map(|location| token.redact(&location).into_owned());
        outcome::classify_response(
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            retry_after.as_deref(),
            location.as_deref(),
            &token.redact(&body),
            self.retry_after_max,
            SystemTime::now(),
        )
    }
}

/// Builds an HTTP client for `settings`. The error is a configuration fault
/// (CA file). Idle connections beyond `max_idle` per host are closed at once.
fn build_client(settings: &Settings, max_idle: usize) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(USER_AGENT)
        .connect_timeout(settings.connect_timeout)
        .read_timeout(settings.read_timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(max_idle)
        .tcp_keepalive(Duration::from_secs(30))
        .tcp_nodelay(true);
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path).map_err(|err| {
            format!(
                "ca_file {} cannot be read: {err}; fix the path or remove ca_file",
                path.display()
            )
        })?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|err| {
            format!(
                "ca_file {} is not valid PEM: {err}; give a file of PEM certificates",
                path.display()
            )
        })?;
        if certificates.is_empty() {
            return Err(format!(
                "ca_file {} has no certificates; give a file of PEM certificates",
                path.display()
            ));
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(|err| {
        format!(
            "the HTTP client cannot be built: {}",
            outcome::error_chain(&err)
        )
    })
}

/// The result of sending a file once.
enum Sent {
    Attempt(Attempt),
    /// The connection failed after it was made and before a response came.
    ConnectionLost(reqwest::Error),
}

/// True for a transport error on a connection that was made: not a failure
/// to connect, not a timeout, and not a certificate problem. A keep-alive
/// connection closed by the server shows up as one of these ("connection
/// closed before message completed", or a reset).
fn is_lost_connection(error: &reqwest::Error) -> bool {
    if error.is_connect() || error.is_timeout() || error.is_builder() || error.is_redirect() {
        return false;
    }
    matches!(outcome::classify_error(error), Outcome::Unreachable { .. })
}

/// Opens the file without following a symbolic link and checks that it is the
/// regular file that was recorded (inode, size, mtime).
async fn open_checked(job: &UploadJob) -> Result<tokio::fs::File, LocalFault> {
    let path = job.path.clone();
    let opened = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
    })
    .await
    .map_err(|err| LocalFault::Unreadable(err.to_string()))?;
    let file = match opened {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Err(LocalFault::Vanished),
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
            return Err(LocalFault::Changed(
                "the file was replaced by a symbolic link".into(),
            ))
        }
        Err(err) => {
            return Err(LocalFault::Unreadable(format!(
                "opening {} failed: {err}",
                job.path.display()
            )))
        }
    };
    let metadata = file
        .metadata()
        .map_err(|err| LocalFault::Unreadable(err.to_string()))?;
    if !metadata.file_type().is_file() {
        return Err(LocalFault::Changed(
            "the file is no longer a regular file".into(),
        ));
    }
    let mtime_ns = metadata.mtime() as i128 * 1_000_000_000 + metadata.mtime_nsec() as i128;
    if metadata.len() != job.size
        || mtime_ns != job.mtime_ns
        || (job.inode != 0 && metadata.ino() != job.inode)
    {
        return Err(LocalFault::Changed(
            "the file changed since it was hashed".into(),
        ));
    }
    Ok(tokio::fs::File::from_std(file))
}

/// Returns a body stream of the first `size` bytes of `file` that holds back
/// the last chunk until the SHA-256 of all bytes equals `expected`. On a
/// mismatch or a short file it ends with an error, which aborts the request, so
/// that no server receives a whole body that disagrees with its `sha256` field.
fn verified_body(
    file: tokio::fs::File,
    size: u64,
    expected: String,
    progress: Arc<AtomicU64>,
    changed: Arc<AtomicBool>,
) -> reqwest::Body {
    struct Reader {
        file: tokio::fs::File,
        hasher: Sha256,
        remaining: u64,
        expected: String,
        progress: Arc<AtomicU64>,
        changed: Arc<AtomicBool>,
    }

    let reader = Reader {
        file,
        hasher: Sha256::new(),
        remaining: size,
        expected,
        progress,
        changed,
    };
    let stream = futures_util::stream::try_unfold(reader, |mut reader| async move {
        if reader.remaining == 0 {
            return Ok(None);
        }
        let want = reader.remaining.min(CHUNK_BYTES as u64) as usize;
        let mut chunk = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            let n = reader.file.read(&mut chunk[filled..]).await?;
            if n == 0 {
                reader.changed.store(true, Ordering::SeqCst);
                return Err(std::io::Error::other(
                    "the file became shorter while it was sent",
                ));
            }
            filled += n;
        }
        reader.hasher.update(&chunk);
        reader.remaining -= want as u64;
        if reader.remaining == 0 {
            let actual = hex::encode(std::mem::take(&mut reader.hasher).finalize());
            if actual != reader.expected {
                reader.changed.store(true, Ordering::SeqCst);
                return Err(std::io::Error::other(
                    "the file's SHA-256 changed while it was sent",
                ));
            }
        }
        reader.progress.fetch_add(want as u64, Ordering::Relaxed);
        Ok::<_, std::io::Error>(Some((Bytes::from(chunk), reader)))
    });
    reqwest::Body::wrap_stream(stream)
}

/// Returns a multipart file name that needs no quoting or escaping: characters other
/// than ASCII letters, digits, `.`, `_`, `-` and `+` become `_`. The exact name
/// travels in the session field.
pub fn safe_file_name(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe.trim_matches('.').is_empty() {
        "archive.zip".to_string()
    } else {
        safe
    }
}

/// Hashes a file, for intake. Runs on the blocking pool.
pub fn sha256_file(file: &mut std::fs::File) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, RawSettings};

    fn settings(url: &str, insecure: bool) -> Settings {
        let flags = RawSettings {
            server_url: Some(url.to_string()),
            allow_insecure_http: Some(insecure),
            ..Default::default()
        };
        load(None, flags, |name| {
            (name == "HOME").then(|| "/h".to_string())
        })
        .settings
    }

    #[test]
    fn server_url_table() {
        let cases: &[(&str, bool, bool)] = &[
            ("https://uploads.example.com/upload", false, true),
            ("http://127.0.0.1:8080/upload", false, true),
            ("http://127.1.2.3/upload", false, true),
            ("http://localhost/upload", false, true),
            ("http://[::1]:9/upload", false, true),
            ("http://uploads.example.com/upload", false, false),
            ("http://uploads.example.com/upload", true, true),
            ("http://10.0.0.1/upload", false, false),
            ("ftp://127.0.0.1/", false, false),
            ("not a url", false, false),
            ("http://user:pw@127.0.0.1/upload", false, false),
            ("https://user@uploads.example.com/upload", false, false),
        ];
        for (url, insecure, ok) in cases {
            assert_eq!(
                check_server_url(&settings(url, *insecure)).is_ok(),
                *ok,
                "{url} insecure={insecure}"
            );
        }
    }

    #[test]
    fn safe_file_name_table() {
        assert_eq!(safe_file_name("s-1_a.zip"), "s-1_a.zip");
        assert_eq!(safe_file_name("a b\"c\n.zip"), "a_b_c_.zip");
        assert_eq!(safe_file_name("../x.zip"), ".._x.zip");
        assert_eq!(safe_file_name(".."), "archive.zip");
    }
}
