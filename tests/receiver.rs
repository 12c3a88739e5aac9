//! Tests of the reference receiver through real HTTP requests on loopback.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outboxd::receiver::{self, ReceiverHandle, ReceiverOptions};
use outboxd::zipfile::stored_archive;
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "receiver-test-token";

struct Fixture {
    root: tempfile::TempDir,
    handle: ReceiverHandle,
}

impl Fixture {
    fn store(&self) -> PathBuf {
        self.root.path().join("store")
    }

    fn token_file(&self) -> PathBuf {
        self.root.path().join("token")
    }

    fn url(&self) -> String {
        self.handle.url().to_string()
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start_receiver() -> Fixture {
    start_receiver_with(|_| {}).await
}

async fn start_receiver_with(configure: impl FnOnce(&mut ReceiverOptions)) -> Fixture {
    let root = tempfile::tempdir().unwrap();
    fs::write(root.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let mut options = ReceiverOptions {
        dir: root.path().join("store"),
        token_file: root.path().join("token"),
        ..ReceiverOptions::default()
    };
    configure(&mut options);
    let handle = receiver::start(loopback(), options).await.unwrap();
    Fixture { root, handle }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One upload request as the daemon builds it.
#[derive(Clone)]
struct Upload {
    session_id: String,
    file_name: String,
    archive: Vec<u8>,
    sha256: String,
    size: u64,
}

impl Upload {
    fn new(session_id: &str, content: &[u8]) -> Upload {
        let archive = stored_archive("recording.json", content);
        Upload {
            session_id: session_id.to_string(),
            file_name: format!("{session_id}.zip"),
            sha256: sha256_hex(&archive),
            size: archive.len() as u64,
            archive,
        }
    }

    fn form(&self) -> Form {
        self.form_with_names("file", "session_id")
    }

    fn form_with_names(&self, file_field: &str, session_field: &str) -> Form {
        let part = Part::bytes(self.archive.clone())
            .file_name(self.file_name.clone())
            .mime_str("application/zip")
            .unwrap();
        Form::new()
            .part(file_field.to_string(), part)
            .text(session_field.to_string(), self.session_id.clone())
            .text("sha256", self.sha256.clone())
            .text("size", self.size.to_string())
    }
}

/// Sends `form` with an optional bearer token and returns the status and body.
async fn post(url: &str, token: Option<&str>, form: Form) -> (StatusCode, String) {
    let mut request = reqwest::Client::new().post(url).multipart(form);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

async fn post_upload(url: &str, upload: &Upload) -> (StatusCode, String) {
    let response = reqwest::Client::new()
        .post(url)
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", &upload.sha256)
        .multipart(upload.form())
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

/// Lists all entries of `dir`, dot files included, sorted by name.
fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn zip_names(dir: &Path) -> Vec<String> {
    dir_names(dir)
        .into_iter()
        .filter(|name| name.ends_with(".zip"))
        .collect()
}

fn temp_names(dir: &Path) -> Vec<String> {
    dir_names(dir)
        .into_iter()
        .filter(|name| name.starts_with('.'))
        .collect()
}

/// Polls `condition` every 20 ms for up to 5 s and returns whether it held.
async fn wait_until(mut condition: impl FnMut() -> bool) -> bool {
    for _ in 0..250 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

/// Opens a raw connection and sends the headers and the start of an upload
/// whose body never completes.
async fn start_partial_upload(addr: SocketAddr) -> tokio::net::TcpStream {
    let boundary = "partial-upload-boundary";
    let part_head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.zip\"\r\n\
         Content-Type: application/zip\r\n\r\n"
    );
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 1000000\r\n\r\n\
         {part_head}"
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[0u8; 8192]).await.unwrap();
    stream
}

#[tokio::test]
async fn valid_upload_is_stored() {
    let fixture = start_receiver().await;
    let upload = Upload::new("session-1", b"{\"events\":[1,2,3]}");

    let (status, body) = post_upload(&fixture.url(), &upload).await;

    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(body.contains("session-1.zip"), "{body}");
    let stored = fs::read(fixture.store().join("session-1.zip")).unwrap();
    assert_eq!(stored, upload.archive);
    assert_eq!(zip_names(&fixture.store()), ["session-1.zip"]);
    assert!(temp_names(&fixture.store()).is_empty());
}

#[tokio::test]
async fn sidecar_records_fields() {
    let fixture = start_receiver().await;
    let upload = Upload::new("session-1", b"data");
    let form = upload.form().text("agent", "desk-7");

    let (status, body) = post(&fixture.url(), Some(TOKEN), form).await;

    assert_eq!(status, StatusCode::CREATED, "{body}");
    let sidecar = fs::read(fixture.store().join("session-1.zip.json")).unwrap();
    let sidecar: serde_json::Value = serde_json::from_slice(&sidecar).unwrap();
    assert_eq!(sidecar["session_id"], "session-1");
    assert_eq!(sidecar["sha256"], upload.sha256.as_str());
    assert_eq!(sidecar["size"], upload.size);
    assert_eq!(sidecar["file_name"], "session-1.zip");
    assert_eq!(sidecar["content_type"], "application/zip");
    assert_eq!(sidecar["fields"]["agent"], "desk-7");
}

#[tokio::test]
async fn wrong_token_is_401() {
    let fixture = start_receiver().await;
    let upload = Upload::new("session-1", b"data");

    let (status, _) = post(&fixture.url(), Some("not-the-token"), upload.form()).await;

    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(dir_names(&fixture.store()).is_empty());
}

#[tokio::test]
async fn missing_token_is_401() {
    let fixture = start_receiver().await;
    let upload = Upload::new("session-1", b"data");

    let (status, body) = post(&fixture.url(), None, upload.form()).await;

    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("Bearer"), "{body}");
    assert!(dir_names(&fixture.store()).is_empty());
}

#[tokio::test]
async fn other_auth_scheme_is_401() {
    let fixture = start_receiver().await;
    let upload = Upload::new("session-1", b"data");

    let response = reqwest::Client::new()
        .post(fixture.url())
        .header("Authorization", format!("Basic {TOKEN}"))
        .multipart(upload.form())
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().contains_key("www-authenticate"));
}

#[tokio::test]
async fn sha256_mismatch_is_400() {
    let fixture = start_receiver().await;
    let mut upload = Upload::new("session-1", b"data");
    upload.sha256 = sha256_hex(b"other content");

    let (status, body) = post(&fixture.url(), Some(TOKEN), upload.form()).await;

    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("sha256 mismatch"), "{body}");
    assert_eq!(body.lines().count(), 1, "{body}");
    assert!(
        dir_names(&fixture.store()).is_empty(),
        "{:?}",
        dir_names(&fixture.store())
    );
}

#[tokio::test]
async fn size_mismatch_is_400() {
    let fixture = start_receiver().await;
    let mut upload = Upload::new("session-1", b"data");
    upload.size += 1;

    let (status, body) = post(&fixture.url(), Some(TOKEN), upload.form()).await;

    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("size mismatch"), "{body}");
    assert!(dir_names(&fixture.store()).is_empty());
}

#[tokio::test]
async fn idempotency_key_mismatch_is_400() {
    let fixture = start_receiver().await;
    let upload = Upload::new("session-1", b"data");

    let response = reqwest::Client::new()
        .post(fixture.url())
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", sha256_hex(b"other"))
        .multipart(upload.form())
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(dir_names(&fixture.store()).is_empty());
}

#[tokio::test]
async fn missing_fields_are_400() {
    let fixture = start_receiver().await;
    let upload = Upload::new("session-1", b"data");
    let file_part = || {
        Part::bytes(upload.archive.clone())
            .file_name("session-1.zip")
            .mime_str("application/zip")
            .unwrap()
    };
    let cases = [
        (
            "session_id",
            Form::new()
                .part("file", file_part())
                .text("sha256", upload.sha256.clone())
                .text("size", upload.size.to_string()),
        ),
        (
            "sha256",
            Form::new()
                .part("file", file_part())
                .text("session_id", "session-1")
                .text("size", upload.size.to_string()),
        ),
        (
            "size",
            Form::new()
                .part("file", file_part())
                .text("session_id", "session-1")
                .text("sha256", upload.sha256.clone()),
        ),
        (
            "file",
            Form::new()
                .text("session_id", "session-1")
                .text("sha256", upload.sha256.clone())
                .text("size", upload.size.to_string()),
        ),
    ];

    for (missing, form) in cases {
        let (status, body) = post(&fixture.url(), Some(TOKEN), form).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "missing {missing}: {body}");
        assert!(body.contains(missing), "missing {missing}: {body}");
    }
    assert!(dir_names(&fixture.store()).is_empty());
}

#[tokio::test]
async fn invalid_field_values_are_400() {
    let fixture = start_receiver().await;
    let upload = Upload::new("session-1", b"data");
    let size = upload.size.to_string();
    let cases = [
        ("not-hex", size.as_str()),
        (upload.sha256.as_str(), "-1"),
        (upload.sha256.as_str(), "12 bytes"),
    ];

    for (sha256, size) in cases {
        let form = Form::new()
            .part(
                "file",
                Part::bytes(upload.archive.clone()).file_name("s.zip"),
            )
            .text("session_id", "session-1")
            .text("sha256", sha256.to_string())
            .text("size", size.to_string());
        let (status, body) = post(&fixture.url(), Some(TOKEN), form).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "sha256={sha256} size={size}: {body}"
        );
    }
    assert!(dir_names(&fixture.store()).is_empty());
}

#[tokio::test]
async fn not_multipart_is_400() {
    let fixture = start_receiver().await;

    let response = reqwest::Client::new()
        .post(fixture.url())
        .bearer_auth(TOKEN)
        .body("plain body")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn duplicate_upload_is_409() {
    let fixture = start_receiver().await;
    let upload = Upload::new("session-1", b"data");

    let (first, _) = post_upload(&fixture.url(), &upload).await;
    let (second, body) = post_upload(&fixture.url(), &upload).await;

    assert_eq!(first, StatusCode::CREATED);
    assert_eq!(second, StatusCode::CONFLICT, "{body}");
    assert_eq!(zip_names(&fixture.store()), ["session-1.zip"]);
    assert!(temp_names(&fixture.store()).is_empty());
}

#[tokio::test]
async fn same_session_other_content_keeps_both() {
    let fixture = start_receiver().await;
    let first = Upload::new("session-1", b"first take");
    let second = Upload::new("session-1", b"second take");

    let (first_status, _) = post_upload(&fixture.url(), &first).await;
    let (second_status, body) = post_upload(&fixture.url(), &second).await;

    assert_eq!(first_status, StatusCode::CREATED);
    assert_eq!(second_status, StatusCode::CREATED, "{body}");
    let suffixed = format!("session-1-{}.zip", &second.sha256[..8]);
    // Sorted by name: '-' sorts before '.'.
    assert_eq!(
        zip_names(&fixture.store()),
        [suffixed.as_str(), "session-1.zip"]
    );
    assert_eq!(
        fs::read(fixture.store().join("session-1.zip")).unwrap(),
        first.archive
    );
    assert_eq!(
        fs::read(fixture.store().join(&suffixed)).unwrap(),
        second.archive
    );

    let (again, _) = post_upload(&fixture.url(), &second).await;
    assert_eq!(again, StatusCode::CONFLICT);
}

#[tokio::test]
async fn probe_with_valid_token_is_200() {
    let fixture = start_receiver().await;

    let (status, body) = post(&fixture.url(), Some(TOKEN), Form::new().text("probe", "1")).await;

    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(dir_names(&fixture.store()).is_empty());
}

#[tokio::test]
async fn probe_with_wrong_token_is_401() {
    let fixture = start_receiver().await;

    let (status, _) = post(
        &fixture.url(),
        Some("wrong"),
        Form::new().text("probe", "1"),
    )
    .await;

    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn session_traversal_is_400() {
    let fixture = start_receiver().await;
    let sessions = [
        "../escaped",
        "../../escaped",
        "..",
        ".",
        ".hidden",
        "sub/escaped",
        "/tmp/escaped",
        "..\\escaped",
        "line\nbreak",
        "nul\0byte",
    ];

    for session_id in sessions {
        let upload = Upload::new(session_id, b"data");
        let (status, body) = post(&fixture.url(), Some(TOKEN), upload.form()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{session_id:?}: {body}");
    }
    assert!(
        dir_names(&fixture.store()).is_empty(),
        "{:?}",
        dir_names(&fixture.store())
    );
    assert_eq!(dir_names(fixture.root.path()), ["store", "token"]);
}

#[tokio::test]
async fn long_session_id_is_400() {
    let fixture = start_receiver().await;
    let upload = Upload::new(&"a".repeat(receiver::MAX_SESSION_ID_BYTES + 1), b"data");

    let (status, body) = post(&fixture.url(), Some(TOKEN), upload.form()).await;

    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("maximum"), "{body}");
}

#[tokio::test]
async fn client_file_name_is_not_a_path() {
    let fixture = start_receiver().await;
    let mut upload = Upload::new("safe", b"data");
    upload.file_name = "../../escaped.zip".to_string();

    let (status, body) = post_upload(&fixture.url(), &upload).await;

    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(zip_names(&fixture.store()), ["safe.zip"]);
    assert_eq!(dir_names(fixture.root.path()), ["store", "token"]);
    let parent = fixture.root.path().parent().unwrap();
    assert!(!parent.join("escaped.zip").exists());
}

#[tokio::test]
async fn token_file_change_is_picked_up() {
    let fixture = start_receiver().await;
    let probe = || Form::new().text("probe", "1");

    fs::write(fixture.token_file(), "new-token\n").unwrap();
    let (old_status, _) = post(&fixture.url(), Some(TOKEN), probe()).await;
    let (new_status, _) = post(&fixture.url(), Some("new-token"), probe()).await;

    assert_eq!(old_status, StatusCode::UNAUTHORIZED);
    assert_eq!(new_status, StatusCode::OK);
}

#[tokio::test]
async fn token_file_replaced_by_rename_is_picked_up() {
    let fixture = start_receiver().await;
    let replacement = fixture.root.path().join("token.new");
    fs::write(&replacement, "renamed-token").unwrap();
    fs::rename(&replacement, fixture.token_file()).unwrap();

    let (status, _) = post(
        &fixture.url(),
        Some("renamed-token"),
        Form::new().text("probe", "1"),
    )
    .await;

    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn deleted_token_file_rejects_all() {
    let fixture = start_receiver().await;
    fs::remove_file(fixture.token_file()).unwrap();

    let (status, _) = post(&fixture.url(), Some(TOKEN), Form::new().text("probe", "1")).await;

    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn missing_token_file_fails_start() {
    let root = tempfile::tempdir().unwrap();
    let options = ReceiverOptions {
        dir: root.path().join("store"),
        token_file: root.path().join("absent-token"),
        ..ReceiverOptions::default()
    };

    let error = receiver::start(loopback(), options).await.err().unwrap();

    assert!(format!("{error:#}").contains("absent-token"), "{error:#}");
}

#[tokio::test]
async fn body_over_limit_is_413() {
    let fixture = start_receiver_with(|options| options.max_body_bytes = 4096).await;
    let upload = Upload::new("big", &vec![7u8; 16 * 1024]);

    let (status, body) = post_upload(&fixture.url(), &upload).await;

    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(dir_names(&fixture.store()).is_empty());
}

#[tokio::test]
async fn chunked_over_limit_removes_temp() {
    let fixture = start_receiver_with(|options| options.max_body_bytes = 64 * 1024).await;
    let upload = Upload::new("big", &vec![7u8; 256 * 1024]);
    // A stream part has no length, so the body is sent chunked without a
    // Content-Length and the limit is hit while the temporary file is open.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = upload
        .archive
        .chunks(8 * 1024)
        .map(|chunk| Ok(chunk.to_vec()))
        .collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let form = Form::new()
        .text("session_id", "big")
        .text("sha256", upload.sha256.clone())
        .text("size", upload.size.to_string())
        .part("file", Part::stream(body).file_name("big.zip"));

    let (status, body) = post(&fixture.url(), Some(TOKEN), form).await;

    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        dir_names(&fixture.store()).is_empty(),
        "{:?}",
        dir_names(&fixture.store())
    );
}

#[tokio::test]
async fn other_path_is_404() {
    let fixture = start_receiver().await;
    let url = format!("http://{}/elsewhere", fixture.handle.addr());

    let (status, _) = post(&url, Some(TOKEN), Form::new().text("probe", "1")).await;

    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn get_on_upload_path_is_405() {
    let fixture = start_receiver().await;

    let response = reqwest::get(fixture.url()).await.unwrap();

    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()["allow"], "POST");
}

#[tokio::test]
async fn custom_path_and_field_names() {
    let fixture = start_receiver_with(|options| {
        options.path = "/api/sessions".to_string();
        options.file_field = "archive".to_string();
        options.session_field = "session".to_string();
    })
    .await;
    let upload = Upload::new("session-1", b"data");
    let base = format!("http://{}", fixture.handle.addr());

    let form = upload.form_with_names("archive", "session");
    let (status, body) = post(&fixture.url(), Some(TOKEN), form).await;
    let (default_path, _) = post(&format!("{base}/upload"), Some(TOKEN), upload.form()).await;

    assert_eq!(fixture.url(), format!("{base}/api/sessions"));
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(zip_names(&fixture.store()), ["session-1.zip"]);
    assert_eq!(default_path, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn client_disconnect_removes_temp() {
    let fixture = start_receiver().await;
    let store = fixture.store();

    let stream = start_partial_upload(fixture.handle.addr()).await;
    let temp_created = wait_until(|| !temp_names(&store).is_empty()).await;
    drop(stream);
    let temp_removed = wait_until(|| dir_names(&store).is_empty()).await;

    assert!(temp_created, "no temporary file appeared");
    assert!(temp_removed, "left behind: {:?}", dir_names(&store));
}

#[tokio::test]
async fn stop_ends_upload_in_progress() {
    let fixture = start_receiver().await;
    let store = fixture.store();
    let mut stream = start_partial_upload(fixture.handle.addr()).await;
    assert!(wait_until(|| !temp_names(&store).is_empty()).await);

    let stopped = tokio::time::timeout(Duration::from_secs(5), fixture.handle.stop()).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response);

    assert!(matches!(stopped, Ok(Ok(()))), "stop failed or timed out");
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(dir_names(&store).is_empty(), "{:?}", dir_names(&store));
}

#[tokio::test]
async fn restart_on_same_port() {
    let root = tempfile::tempdir().unwrap();
    fs::write(root.path().join("token"), TOKEN).unwrap();
    let options = ReceiverOptions {
        dir: root.path().join("store"),
        token_file: root.path().join("token"),
        ..ReceiverOptions::default()
    };
    let first = receiver::start(loopback(), options.clone()).await.unwrap();
    let addr = first.addr();
    let url = first.url().to_string();
    let (before, _) = post_upload(&url, &Upload::new("before", b"1")).await;

    first.stop().await.unwrap();
    let refused = reqwest::Client::new()
        .post(&url)
        .bearer_auth(TOKEN)
        .multipart(Form::new().text("probe", "1"))
        .send()
        .await;
    let second = receiver::start(addr, options).await.unwrap();
    let (after, _) = post_upload(second.url(), &Upload::new("after", b"2")).await;

    assert_eq!(before, StatusCode::CREATED);
    assert!(refused.is_err(), "the stopped receiver still answered");
    assert_eq!(second.addr(), addr);
    assert_eq!(after, StatusCode::CREATED);
    assert_eq!(
        zip_names(&root.path().join("store")),
        ["after.zip", "before.zip"]
    );
}
