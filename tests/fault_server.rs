//! Self-tests of the fault-injecting server that the end-to-end tests use:
//! each posts to it with reqwest and checks the record and the response.

mod common;

use std::time::{Duration, Instant};

use common::fault_server::{FaultServer, Reply};
use common::{archive, sha256_hex, wait_until};
use futures_util::StreamExt;
use reqwest::multipart::{Form, Part};

/// Runs `future` on a runtime of its own, apart from the server's runtime.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the client runtime failed")
        .block_on(future)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("building the reqwest client failed")
}

/// Builds the form that the daemon sends for `name`, with the given archive bytes.
fn upload_form(name: &str, bytes: &[u8]) -> Form {
    let session_id = name.trim_end_matches(".zip").to_string();
    let part = Part::bytes(bytes.to_vec())
        .file_name(name.to_string())
        .mime_str("application/zip")
        .expect("application/zip is a valid MIME type");
    Form::new()
        .text("session_id", session_id)
        .text("sha256", sha256_hex(bytes))
        .text("size", bytes.len().to_string())
        .part("file", part)
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    name: &str,
    bytes: &[u8],
) -> reqwest::Result<reqwest::Response> {
    client
        .post(url)
        .bearer_auth(token)
        .header("Idempotency-Key", sha256_hex(bytes))
        .multipart(upload_form(name, bytes))
        .send()
        .await
}

#[test]
fn fault_server_records_upload() {
    let server = FaultServer::start();
    let bytes = archive("record", 5000);
    let status = block_on(async {
        let response = post(&client(), &server.url(), "t0k", "s-1.zip", &bytes)
            .await
            .expect("post failed");
        response.status().as_u16()
    });
    assert_eq!(status, 201, "default reply status");

    let requests = server.requests();
    assert_eq!(
        requests.len(),
        1,
        "requests recorded:\n{}",
        server.summary()
    );
    let request = &requests[0];
    let part = request.file().expect("file part recorded");
    assert_eq!(request.method, "POST", "method");
    assert_eq!(request.path, "/upload", "path");
    assert_eq!(
        request.authorization.as_deref(),
        Some("Bearer t0k"),
        "Authorization"
    );
    assert_eq!(
        request.idempotency_key,
        Some(sha256_hex(&bytes)),
        "Idempotency-Key"
    );
    assert!(request.body_complete, "body not complete: {request}");
    assert_eq!(request.status, Some(201), "recorded status");
    assert_eq!(
        request.fields.get("session_id").map(String::as_str),
        Some("s-1"),
        "session_id field"
    );
    assert_eq!(
        request.fields.get("size"),
        Some(&bytes.len().to_string()),
        "size field"
    );
    assert_eq!(part.field_name, "file", "file part name");
    assert_eq!(part.file_name, "s-1.zip", "file part file name");
    assert_eq!(
        part.content_type.as_deref(),
        Some("application/zip"),
        "file part content type"
    );
    assert_eq!(part.sha256, sha256_hex(&bytes), "file part SHA-256");
    assert_eq!(part.size, bytes.len() as u64, "file part size");
    assert!(
        !request.has_mismatched_hash(),
        "sha256 field disagrees with the part: {request:?}"
    );
    assert_eq!(
        server.delivered(&sha256_hex(&bytes)),
        1,
        "deliveries of the archive"
    );
}

#[test]
fn fault_server_checks_token() {
    let server = FaultServer::with_token("right");
    let bytes = archive("token", 100);
    let (wrong, right) = block_on(async {
        let client = client();
        let wrong = post(&client, &server.url(), "wrong", "a.zip", &bytes)
            .await
            .expect("post failed");
        let right = post(&client, &server.url(), "right", "a.zip", &bytes)
            .await
            .expect("post failed");
        (wrong.status().as_u16(), right.status().as_u16())
    });
    assert_eq!(wrong, 401, "status for the wrong token");
    assert_eq!(right, 201, "status for the right token");
    assert_eq!(
        server.count_status(401),
        1,
        "401s recorded:\n{}",
        server.summary()
    );
    assert_eq!(
        server.delivered(&sha256_hex(&bytes)),
        1,
        "deliveries:\n{}",
        server.summary()
    );
}

#[test]
fn fault_server_plays_sequences() {
    let server = FaultServer::start();
    server.push_for_file("a.zip", [Reply::status(500), Reply::status(500)]);
    server.push_next(Reply::retry_after(503, "3"));
    let a = archive("seq-a", 100);
    let b = archive("seq-b", 100);

    let answers = block_on(async {
        let client = client();
        let mut answers = Vec::new();
        for (name, bytes) in [
            ("a.zip", &a),
            ("b.zip", &b),
            ("a.zip", &a),
            ("a.zip", &a),
            ("b.zip", &b),
        ] {
            let response = post(&client, &server.url(), "t", name, bytes)
                .await
                .expect("post failed");
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|value| value.to_str().unwrap_or_default().to_string());
            answers.push((name, response.status().as_u16(), retry_after));
        }
        answers
    });

    let expected = [
        ("a.zip", 500, None),
        ("b.zip", 503, Some("3".to_string())),
        ("a.zip", 500, None),
        ("a.zip", 201, None),
        ("b.zip", 201, None),
    ];
    assert_eq!(answers, expected, "answers in order");
}

#[test]
fn fault_server_redirects() {
    let server = FaultServer::start();
    let other = FaultServer::start();
    server.set_default(Reply::redirect(&other.url()));
    let bytes = archive("redirect", 100);
    let (status, location) = block_on(async {
        let response = post(&client(), &server.url(), "t", "r.zip", &bytes)
            .await
            .expect("post failed");
        let location = response
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_string());
        (response.status().as_u16(), location)
    });
    assert_eq!(status, 307, "redirect status");
    assert_eq!(location, Some(other.url()), "Location header");
    assert_eq!(
        other.request_count(),
        0,
        "the redirect target got requests:\n{}",
        other.summary()
    );
}

#[test]
fn fault_server_closes_mid_body() {
    let server = FaultServer::start();
    server.set_default(Reply::close_mid_body());
    // Large enough that the client is still writing when the server closes.
    let bytes = archive("close", 16 << 20);
    let result = block_on(async {
        post(&client(), &server.url(), "t", "c.zip", &bytes)
            .await
            .map(|r| r.status())
    });
    assert!(
        result.is_err(),
        "client got a response instead of a closed connection: {result:?}"
    );

    let recorded = wait_until(Duration::from_secs(5), || server.request_count() == 1);
    assert!(recorded, "requests recorded:\n{}", server.summary());
    let request = &server.requests()[0];
    assert!(!request.body_complete, "body marked complete: {request}");
    assert_eq!(
        request.status, None,
        "status of a closed connection: {request}"
    );
    assert!(
        request
            .file()
            .is_some_and(|part| part.size < bytes.len() as u64),
        "whole file part read: {request}"
    );
    assert!(
        server.deliveries().is_empty(),
        "deliveries: {:?}",
        server.deliveries()
    );
}

#[test]
fn fault_server_delays_reply() {
    let server = FaultServer::start();
    server.set_default(Reply::created().with_delay(Duration::from_millis(600)));
    let bytes = archive("delay", 100);
    let started = Instant::now();
    let client = client();
    let url = server.url();
    let (status, in_flight_seen) = block_on(async {
        let request = post(&client, &url, "t", "d.zip", &bytes);
        let watcher = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.in_flight()
        };
        let (response, in_flight) = tokio::join!(request, watcher);
        (response.expect("post failed").status().as_u16(), in_flight)
    });
    let elapsed = started.elapsed();
    assert_eq!(status, 201, "status after the delay");
    assert!(
        elapsed >= Duration::from_millis(600),
        "answered after {elapsed:?}, before the 600 ms delay"
    );
    assert_eq!(in_flight_seen, 1, "requests in flight during the delay");
    assert_eq!(server.in_flight(), 0, "requests in flight after the answer");
    assert_eq!(
        server.delivered(&sha256_hex(&bytes)),
        1,
        "deliveries:\n{}",
        server.summary()
    );
}

#[test]
fn fault_server_restarts_on_port() {
    let mut server = FaultServer::start();
    let port = server.port();
    let bytes = archive("restart", 100);
    let client = client();

    let before = block_on(post(&client, &server.url(), "t", "r.zip", &bytes));
    assert!(before.is_ok(), "post before the stop failed: {before:?}");
    server.stop();
    // The same client reuses its pooled connection if it is still open, so
    // this also checks that stop() cut it.
    let during = block_on(post(&client, &server.url(), "t", "r.zip", &bytes));
    assert!(
        during.is_err(),
        "post during the outage got an answer: {during:?}"
    );

    server.restart();
    assert_eq!(server.port(), port, "port after restart");
    let after =
        block_on(post(&client, &server.url(), "t", "r.zip", &bytes)).map(|r| r.status().as_u16());
    assert_eq!(after.ok(), Some(201), "status after restart");
    assert_eq!(
        server.delivered(&sha256_hex(&bytes)),
        2,
        "deliveries:\n{}",
        server.summary()
    );
}

#[test]
fn fault_server_records_abandoned_body() {
    let server = FaultServer::start();
    let bytes = archive("abandoned", 1000);
    // The file part sends its first half and then stalls, until the client
    // timeout drops the connection, as a killed daemon would.
    let first_half = bytes[..500].to_vec();
    let stalled = futures_util::stream::once(async move { Ok::<_, std::io::Error>(first_half) })
        .chain(futures_util::stream::pending());
    let part = Part::stream_with_length(reqwest::Body::wrap_stream(stalled), bytes.len() as u64)
        .file_name("a.zip")
        .mime_str("application/zip")
        .expect("application/zip is a valid MIME type");
    let form = Form::new()
        .text("sha256", sha256_hex(&bytes))
        .part("file", part);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("building the reqwest client failed");
    let result = block_on(async { client.post(server.url()).multipart(form).send().await });
    assert!(result.is_err(), "stalled upload got an answer: {result:?}");

    let recorded = wait_until(Duration::from_secs(5), || {
        server.request_count() == 1 && server.in_flight() == 0
    });
    assert!(
        recorded,
        "in flight {}, requests recorded:\n{}",
        server.in_flight(),
        server.summary()
    );
    let request = &server.requests()[0];
    assert!(!request.body_complete, "body marked complete: {request}");
    assert!(!request.is_accepted(), "abandoned body accepted: {request}");
    assert!(
        !request.has_mismatched_hash(),
        "an incomplete body counts as a hash mismatch: {request}"
    );
}
