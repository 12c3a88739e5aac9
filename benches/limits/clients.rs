//! The baselines: a plain reqwest client and a `curl` loop, each sending the
//! daemon's upload request (Bearer token, `Idempotency-Key`, fields
//! `session_id`, `sha256` and `size`, then the archive part) with no queue,
//! no intake and no durable record. Both get each archive's SHA-256 computed
//! beforehand, so their timed work is only reading and sending.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use reqwest::multipart::{Form, Part};

use crate::support::{SourceArchive, TOKEN};

/// Posts every archive with `concurrency` requests in flight: each worker
/// reads the next file into memory and sends it.
pub async fn post_with_reqwest(
    url: &str,
    archives: &[SourceArchive],
    concurrency: usize,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .context("building the reqwest client")?;
    let archives: Arc<[SourceArchive]> = archives.to_vec().into();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let url = url.to_string();
        let archives = archives.clone();
        let next = next.clone();
        workers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(archive) = archives.get(index) else {
                    return Ok::<(), anyhow::Error>(());
                };
                post_one(&client, &url, archive).await?;
            }
        });
    }
    while let Some(result) = workers.join_next().await {
        result.context("a reqwest worker panicked")??;
    }
    Ok(())
}

async fn post_one(
    client: &reqwest::Client,
    url: &str,
    archive: &SourceArchive,
) -> anyhow::Result<()> {
    let bytes = tokio::fs::read(&archive.path)
        .await
        .with_context(|| format!("reading {}", archive.path.display()))?;
    let part = Part::bytes(bytes)
        .file_name(archive.name.clone())
        .mime_str("application/zip")?;
    let form = Form::new()
        .text("session_id", archive.session_id.clone())
        .text("sha256", archive.sha256.clone())
        .text("size", archive.size.to_string())
        .part("file", part);
    let response = client
        .post(url)
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", &archive.sha256)
        .multipart(form)
        .send()
        .await
        .with_context(|| format!("posting {}", archive.name))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        bail!("posting {} got {status}: {body}", archive.name);
    }
    Ok(())
}

/// Writes the `Authorization` header to a file for `curl -H @FILE`, which
/// keeps the token off curl's command line.
pub fn write_curl_headers(path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, format!("Authorization: Bearer {TOKEN}\n"))
        .with_context(|| format!("writing {}", path.display()))
}

/// Starts one `curl` that posts `archive`. `Expect:` turns off curl's
/// `Expect: 100-continue` wait on large bodies.
pub fn spawn_curl(url: &str, headers: &Path, archive: &SourceArchive) -> anyhow::Result<Child> {
    Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--fail",
            "--output",
            "/dev/null",
        ])
        .arg("--header")
        .arg(format!("@{}", headers.display()))
        .arg("--header")
        .arg(format!("Idempotency-Key: {}", archive.sha256))
        .args(["--header", "Expect:"])
        .arg("--form")
        .arg(format!("session_id={}", archive.session_id))
        .arg("--form")
        .arg(format!("sha256={}", archive.sha256))
        .arg("--form")
        .arg(format!("size={}", archive.size))
        .arg("--form")
        .arg(format!(
            "file=@{};type=application/zip;filename={}",
            archive.path.display(),
            archive.name
        ))
        .arg(url)
        .stdin(Stdio::null())
        .spawn()
        .context("starting curl; install Debian's curl package")
}

/// Posts every archive with `concurrency` threads, each running one `curl`
/// process per archive, one after the other.
pub fn post_with_curl(
    url: &str,
    headers: &Path,
    archives: &[SourceArchive],
    concurrency: usize,
) -> anyhow::Result<()> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(archive) = archives.get(index) else {
                            return Ok(());
                        };
                        let status = spawn_curl(url, headers, archive)?.wait()?;
                        if !status.success() {
                            bail!("curl posting {} exited with {status}", archive.name);
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a curl worker panicked"))??;
        }
        Ok(())
    })
}
