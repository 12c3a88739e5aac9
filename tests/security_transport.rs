//! Security tests of the transport, with the real daemon binary. Plain http://
//! to a host other than loopback is rejected before any connection, no
//! redirect is followed, TLS trusts a private CA only through `ca_file`, and
//! the HTTP/2 frame log does not show the token.
//! Every server here listens on 127.0.0.1 and is started by the test.

mod common;

use std::fs;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::fault_server::{FaultServer, Reply};
use common::{archive, run_args, sha256_hex, wait_until, Daemon, Status, TOKEN};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// Time for the daemon to reach a state that it should enter at once.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time for an archive to reach the server once nothing blocks it.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

/// Time a late, wrong request would need to show up.
const GRACE: Duration = Duration::from_secs(1);

/// Time the TLS server gives a client for the handshake and for each read.
const TLS_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head that the TLS server reads.
const MAX_HEAD_BYTES: usize = 64 * 1024;

fn wait_for_auth(daemon: &Daemon, state: &str, detail_part: &str) -> Status {
    let mut last = daemon.status();
    wait_until(STATE_TIMEOUT, || {
        last = daemon.status();
        last.auth_state().as_deref() == Some(state)
            && last
                .text("/auth/detail")
                .is_some_and(|detail| detail.contains(detail_part))
    });
    assert_eq!(
        last.auth_state().as_deref(),
        Some(state),
        "auth.state: {}",
        last.stdout
    );
    last
}

fn detail_of(status: &Status) -> String {
    status.text("/auth/detail").unwrap_or_default()
}

#[test]
fn insecure_http_rejected_before_connecting() {
    // A name under .invalid never resolves, and the daemon must not try.
    let daemon = Daemon::start(&run_args("http://uploads.example.invalid/upload", &[]));
    let home = daemon.home();

    // The hold is in place at start, before any archive gave a reason to connect.
    let status = daemon.status();
    assert_eq!(
        status.auth_state().as_deref(),
        Some("config_error"),
        "auth.state at start: {}",
        status.stdout
    );
    let detail = detail_of(&status);
    assert!(detail.contains("clear text"), "auth.detail: {detail:?}");
    assert!(
        detail.contains("allow_insecure_http"),
        "auth.detail: {detail:?}"
    );

    home.drop_zip("held.zip", &archive("held", 1024));
    assert!(
        wait_until(STATE_TIMEOUT, || home
            .list_items()
            .unwrap_or_default()
            .iter()
            .any(|item| item["file"] == "held.zip")),
        "held.zip was not queued"
    );
    thread::sleep(GRACE);

    let items = home.list_items().expect("outboxd list failed");
    assert_eq!(items.len(), 1, "items: {items:?}");
    assert_eq!(items[0]["state"], "pending", "item: {:?}", items[0]);
    assert_eq!(items[0]["attempts"], 0, "item: {:?}", items[0]);
    let status = daemon.status();
    assert_eq!(
        status.destination_state().as_deref(),
        Some("unknown"),
        "destination.state: {}",
        status.stdout
    );
    // The harness runs the daemon at RUST_LOG=debug, where reqwest and
    // hyper_util log every lookup and connection.
    let log = daemon.stderr();
    let network: Vec<&str> = log
        .lines()
        .filter(|line| {
            line.contains("starting new connection")
                || line.contains("connecting to")
                || line.contains("resolving")
        })
        .collect();
    assert_eq!(network, Vec::<&str>::new(), "log lines of network activity");
    assert_eq!(home.outbox_files(), vec!["held.zip"], "files in the outbox");
}

#[test]
fn redirects_never_followed_table() {
    let target = FaultServer::start();
    let server = FaultServer::start();
    let daemon = Daemon::start(&run_args(&server.url(), &[]));
    let home = daemon.home();
    let held_archive = archive("held", 2048);

    for (index, code) in [301u16, 302, 303, 307, 308].into_iter().enumerate() {
        server.push_next(Reply::status(code).with_header("Location", &target.url()));
        let before = server.request_count();
        if index == 0 {
            home.drop_zip("held.zip", &held_archive);
        } else {
            let output = home
                .command("retry")
                .arg("--state-dir")
                .arg(&home.state_dir)
                .output()
                .expect("running outboxd retry failed");
            assert!(output.status.success(), "outboxd retry: {output:?}");
        }

        let status = wait_for_auth(&daemon, "config_error", &format!("HTTP {code}"));
        let detail = detail_of(&status);
        assert!(
            detail.contains(&format!("HTTP {code}")),
            "{code}: auth.detail: {detail:?}"
        );
        assert!(
            detail.contains("server_url"),
            "{code}: auth.detail: {detail:?}"
        );
        assert_eq!(
            server.request_count(),
            before + 1,
            "{code}: requests:\n{}",
            server.summary()
        );
    }
    thread::sleep(GRACE);
    assert_eq!(
        target.request_count(),
        0,
        "requests at the redirect target:\n{}",
        target.summary()
    );

    // Without a redirect the next probe uploads, so the probes above were real.
    home.command("retry")
        .arg("--state-dir")
        .arg(&home.state_dir)
        .output()
        .expect("running outboxd retry failed");
    assert!(
        wait_until(DELIVERY_TIMEOUT, || server
            .delivered(&sha256_hex(&held_archive))
            == 1),
        "held.zip was not delivered:\n{}",
        server.summary()
    );
    assert_eq!(target.request_count(), 0, "requests at the redirect target");
}

/// A private CA and a server certificate that it signed, made for one test.
struct TestPki {
    ca_pem: String,
    server_certificate: CertificateDer<'static>,
    server_key: PrivateKeyDer<'static>,
}

impl TestPki {
    /// Makes a CA and a server certificate for `names` (DNS names or IP addresses).
    fn generate(names: &[&str]) -> TestPki {
        let ca_key = KeyPair::generate().expect("generating the CA key failed");
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).expect("CA parameters are valid");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "outboxd test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key)
            .expect("self-signing the CA certificate failed");

        let server_key = KeyPair::generate().expect("generating the server key failed");
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let mut server_params = CertificateParams::new(names).expect("server names are valid");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "outboxd test server");
        let server_certificate = server_params
            .signed_by(&server_key, &*ca)
            .expect("signing the server certificate failed");

        TestPki {
            ca_pem: ca.pem(),
            server_certificate: server_certificate.der().clone(),
            server_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        }
    }
}

/// One request that the TLS server received: the head as text and the body.
struct TlsRequest {
    head: String,
    body: Vec<u8>,
}

#[derive(Default)]
struct TlsRecords {
    requests: Mutex<Vec<TlsRequest>>,
    handshake_errors: Mutex<Vec<String>>,
}

/// The HTTP version that a `TlsServer` speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// No ALPN is offered, so clients speak HTTP/1.1.
    Http1,
    /// Only `h2` is offered through ALPN.
    Http2,
}

/// An HTTPS server on 127.0.0.1 that responds to every complete request with
/// 201 and records it.
struct TlsServer {
    runtime: Option<Runtime>,
    addr: SocketAddr,
    records: Arc<TlsRecords>,
}

impl TlsServer {
    fn start(pki: &TestPki, protocol: Protocol) -> TlsServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("building the TLS server's runtime failed");
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![pki.server_certificate.clone()],
                pki.server_key.clone_key(),
            )
            .expect("the server certificate and key do not match");
        if protocol == Protocol::Http2 {
            config.alpn_protocols = vec![b"h2".to_vec()];
        }
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let records = Arc::new(TlsRecords::default());

        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("binding 127.0.0.1:0 failed");
        let addr = listener.local_addr().expect("the listener has an address");
        let task_records = records.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve_tls(acceptor.clone(), stream, task_records.clone()));
            }
        });
        TlsServer {
            runtime: Some(runtime),
            addr,
            records,
        }
    }

    fn url(&self) -> String {
        format!("https://{}/upload", self.addr)
    }

    fn request_count(&self) -> usize {
        self.records.requests.lock().unwrap().len()
    }

    fn handshake_errors(&self) -> Vec<String> {
        self.records.handshake_errors.lock().unwrap().clone()
    }

    /// Returns the head of the first request whose body contains `bytes`.
    fn head_of_request_with(&self, bytes: &[u8]) -> Option<String> {
        let requests = self.records.requests.lock().unwrap();
        requests
            .iter()
            .find(|request| {
                request
                    .body
                    .windows(bytes.len())
                    .any(|window| window == bytes)
            })
            .map(|request| request.head.clone())
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn serve_tls(acceptor: TlsAcceptor, stream: TcpStream, records: Arc<TlsRecords>) {
    let mut tls = match tokio::time::timeout(TLS_IO_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            records
                .handshake_errors
                .lock()
                .unwrap()
                .push(err.to_string());
            return;
        }
        Err(_) => return,
    };
    let negotiated_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    if negotiated_h2 {
        serve_h2(tls, records).await;
        return;
    }

    let mut buffer = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut head_end = None;
    let mut body_end = usize::MAX;
    while buffer.len() < body_end {
        let read = tokio::time::timeout(TLS_IO_TIMEOUT, tls.read(&mut chunk)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => buffer.extend_from_slice(&chunk[..n]),
        }
        if head_end.is_none() {
            head_end = buffer
                .windows(4)
                .position(|window| window == b"\r\n\r\n")
                .map(|at| at + 4);
            match head_end {
                Some(end) => {
                    let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                    body_end = end + content_length(&head);
                }
                None if buffer.len() > MAX_HEAD_BYTES => return,
                None => {}
            }
        }
    }

    let Some(head_end) = head_end else { return };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    records.requests.lock().unwrap().push(TlsRequest {
        head,
        body: buffer[head_end..].to_vec(),
    });
    let response = b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let _ = tls.write_all(response).await;
    let _ = tls.shutdown().await;
}

/// Serves one HTTP/2 connection, each request in its own task, because the
/// connection must be polled while a request body is read.
async fn serve_h2(tls: tokio_rustls::server::TlsStream<TcpStream>, records: Arc<TlsRecords>) {
    let Ok(Ok(mut connection)) =
        tokio::time::timeout(TLS_IO_TIMEOUT, h2::server::handshake(tls)).await
    else {
        return;
    };
    while let Some(Ok((request, respond))) = connection.accept().await {
        tokio::spawn(serve_h2_request(request, respond, records.clone()));
    }
}

async fn serve_h2_request(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
    records: Arc<TlsRecords>,
) {
    let (parts, mut body) = request.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let mut head = format!("{} {} {:?}\r\n", parts.method, parts.uri, parts.version);
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    records
        .requests
        .lock()
        .unwrap()
        .push(TlsRequest { head, body: data });
    let response = http::Response::builder()
        .status(201)
        .body(())
        .expect("a 201 response without headers is valid");
    let _ = respond.send_response(response, true);
}

/// Returns the `Content-Length` of a lower-cased request head, 0 when absent.
fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn tls_private_ca_needs_ca_file() {
    let pki = TestPki::generate(&["127.0.0.1", "localhost"]);
    let server = TlsServer::start(&pki, Protocol::Http1);
    let daemon = Daemon::start(&run_args(&server.url(), &[]));
    let home = daemon.home();
    let bytes = archive("sent over tls", 4096);
    home.drop_zip("tls.zip", &bytes);

    // Without ca_file the certificate is not trusted: a configuration hold
    // that shows the whole error chain and names the fix.
    let status = wait_for_auth(&daemon, "config_error", "certificate");
    let detail = detail_of(&status);
    assert!(
        detail.contains("invalid peer certificate: UnknownIssuer"),
        "auth.detail does not show the certificate error: {detail:?}"
    );
    assert!(
        detail.contains(&server.url()),
        "auth.detail does not show the outer error: {detail:?}"
    );
    assert!(
        detail.contains("ca_file"),
        "auth.detail does not name ca_file: {detail:?}"
    );
    assert_eq!(server.request_count(), 0, "requests over an untrusted TLS");
    assert!(
        !server.handshake_errors().is_empty(),
        "the daemon never reached the TLS server"
    );
    assert_eq!(home.outbox_files(), vec!["tls.zip"], "files in the outbox");
    assert_eq!(
        home.rejected_files(),
        Vec::<String>::new(),
        "rejected files"
    );

    // With the CA in ca_file, a reload lifts the hold and the archive goes.
    let ca_path = home.path.join("ca.pem");
    fs::write(&ca_path, &pki.ca_pem).expect("writing the CA file failed");
    let config_dir = home.path.join("config").join("outboxd");
    fs::create_dir_all(&config_dir).expect("creating the config folder failed");
    fs::write(
        config_dir.join("config.toml"),
        format!("ca_file = \"{}\"\n", ca_path.display()),
    )
    .expect("writing the config file failed");
    daemon.sighup();

    let mut head = None;
    wait_until(DELIVERY_TIMEOUT, || {
        head = server.head_of_request_with(&bytes);
        head.is_some()
    });
    let head = head.unwrap_or_else(|| {
        panic!(
            "tls.zip did not arrive over TLS; handshake errors: {:?}",
            server.handshake_errors()
        )
    });
    assert!(
        head.lines()
            .any(|line| line.eq_ignore_ascii_case(&format!("authorization: Bearer {TOKEN}"))),
        "the request carried no bearer token: {head}"
    );
    assert!(
        wait_until(STATE_TIMEOUT, || daemon.status().auth_state().as_deref()
            == Some("ok")),
        "auth.state did not become ok: {}",
        daemon.status().stdout
    );
    assert!(
        wait_until(STATE_TIMEOUT, || home.outbox_files().is_empty()),
        "tls.zip is still in the outbox"
    );
}

#[test]
fn tls_wrong_name_holds_with_ca_file() {
    let pki = TestPki::generate(&["uploads.example.invalid"]);
    let server = TlsServer::start(&pki, Protocol::Http1);
    let home = common::Home::new();
    let ca_path = home.path.join("ca.pem");
    fs::write(&ca_path, &pki.ca_pem).expect("writing the CA file failed");
    let ca_arg = ca_path.display().to_string();
    let daemon = Daemon::start_in(home, &run_args(&server.url(), &["--ca-file", &ca_arg]));
    daemon
        .home()
        .drop_zip("tls.zip", &archive("wrong name", 1024));

    // The CA is trusted, but the certificate is for another name.
    let status = wait_for_auth(&daemon, "config_error", "certificate");
    let detail = detail_of(&status);
    assert!(
        detail.contains("certificate not valid for name \"127.0.0.1\""),
        "auth.detail does not show the name mismatch: {detail:?}"
    );
    assert!(detail.contains("ca_file"), "auth.detail: {detail:?}");
    assert_eq!(server.request_count(), 0, "requests to the wrong name");
}

#[test]
fn h2_upload_keeps_token_out_of_log() {
    let pki = TestPki::generate(&["127.0.0.1"]);
    let server = TlsServer::start(&pki, Protocol::Http2);
    let home = common::Home::new();
    let ca_path = home.path.join("ca.pem");
    fs::write(&ca_path, &pki.ca_pem).expect("writing the CA file failed");
    let ca_arg = ca_path.display().to_string();
    let daemon = Daemon::start_in(home, &run_args(&server.url(), &["--ca-file", &ca_arg]));
    let bytes = archive("sent over h2", 4096);
    daemon.home().drop_zip("h2.zip", &bytes);

    let mut head = None;
    wait_until(DELIVERY_TIMEOUT, || {
        head = server.head_of_request_with(&bytes);
        head.is_some()
    });
    let head = head.unwrap_or_else(|| {
        panic!(
            "h2.zip did not arrive over HTTP/2; handshake errors: {:?}",
            server.handshake_errors()
        )
    });
    assert!(head.contains("HTTP/2.0"), "request head: {head}");
    assert!(
        head.contains(&format!("authorization: Bearer {TOKEN}")),
        "the request carried no bearer token: {head}"
    );

    // The harness runs the daemon at RUST_LOG=debug, where h2 logs every frame
    // that it sends, the HEADERS frame with the token among them.
    let log = daemon.stderr();
    let frames = log
        .lines()
        .filter(|line| line.contains("h2::codec::framed_write") && line.contains("Headers"))
        .count();
    assert!(frames > 0, "no HEADERS frame in the log");
    let leaks: Vec<&str> = log.lines().filter(|line| line.contains(TOKEN)).collect();
    assert_eq!(
        leaks,
        Vec::<&str>::new(),
        "log lines that contain the token"
    );
}
