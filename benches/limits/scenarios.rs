//! The four measurements behind the product's limits. Each run starts a fresh
//! receiver folder and, for the daemon, a fresh state dir, so that no run
//! finds the records or stored archives of another.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::runtime::Runtime;

use crate::clients;
use crate::report::{median, percentile, Figure, Target};
use crate::support::{
    self, cpu_time, link_into, proc_status_bytes, BenchConfig, Home, SourceArchive,
    WatchedReceiver, CONCURRENCY,
};

const MIB: f64 = 1024.0 * 1024.0;

/// Quiet time before each latency drop, so that the daemon is idle.
const IDLE_BEFORE_DROP: Duration = Duration::from_millis(20);

/// Runs of `outboxd status --json` per reading; the figure is their median.
const STATUS_CALLS: usize = 7;

/// Starts a daemon on `home` against `receiver` and waits until one warm-up
/// archive was stored, so that the measured uploads find `auth.state = ok`
/// and the full concurrency.
fn start_warm_daemon(
    home: &Home,
    receiver: &mut WatchedReceiver,
) -> anyhow::Result<support::DaemonProcess> {
    let daemon = home.start_daemon(&receiver.url())?;
    let warmup = support::write_archive(&home.staging, "warmup", 1024, u64::MAX)?;
    fs::rename(&warmup.path, home.outbox.join(&warmup.name))?;
    receiver.wait_for(&warmup.name, Duration::from_secs(60))?;
    Ok(daemon)
}

/// Renames every staged file into the outbox.
fn drop_all(staged: &[std::path::PathBuf], outbox: &Path) -> anyhow::Result<()> {
    for path in staged {
        let name = path.file_name().context("a staged file has no name")?;
        fs::rename(path, outbox.join(name))
            .with_context(|| format!("renaming {} into the outbox", path.display()))?;
    }
    Ok(())
}

/// Waits until the daemon has deleted every archive from the outbox.
fn wait_outbox_empty(home: &Home, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while home.outbox_archives() > 0 {
        if Instant::now() >= deadline {
            bail!(
                "the outbox still had archives after {timeout:?}; see {}",
                home.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn write_sources(
    dir: &Path,
    prefix: &str,
    count: usize,
    bytes: usize,
) -> anyhow::Result<Vec<SourceArchive>> {
    fs::create_dir_all(dir)?;
    (0..count)
        .map(|i| support::write_archive(dir, &format!("{prefix}-{i:06}"), bytes, i as u64))
        .collect()
}

/// Throughput on many small archives: the daemon from the drop of all of them
/// into the outbox until the receiver stored the last, against a reqwest
/// client and a `curl` loop posting the same files with the same concurrency.
pub fn small_throughput(
    config: &BenchConfig,
    runtime: &Runtime,
    root: &Path,
) -> anyhow::Result<Vec<Figure>> {
    let count = config.small_count;
    let sources = write_sources(
        &root.join("small-sources"),
        "small",
        count,
        config.small_bytes,
    )?;
    let timeout = Duration::from_secs(120) + Duration::from_millis(50) * count as u32;
    let (mut daemon_rates, mut reqwest_rates, mut curl_rates) = (vec![], vec![], vec![]);
    let mut daemon_cpus = vec![];
    for run in 1..=config.runs {
        let dir = support::temp_root_in(root, "small-run-", config.keep)?;
        let home = Home::create(&dir.path().join("daemon"))?;

        let mut receiver =
            WatchedReceiver::start(runtime, &dir.path().join("received"), &home.token_file)?;
        let daemon = start_warm_daemon(&home, &mut receiver)?;
        let staged = link_into(&sources, &home.staging)?;
        let cpu_before = cpu_time(daemon.pid)?;
        let started = Instant::now();
        drop_all(&staged, &home.outbox)?;
        let finished = receiver.wait_count(count, timeout)?;
        let daemon_rate = count as f64 / (finished - started).as_secs_f64();
        wait_outbox_empty(&home, timeout)?;
        // CPU per archive, in ms, over intake, upload and removal.
        let daemon_cpu = (cpu_time(daemon.pid)? - cpu_before).as_secs_f64() * 1000.0 / count as f64;
        daemon.stop()?;
        receiver.stop(runtime)?;
        daemon_rates.push(daemon_rate);
        daemon_cpus.push(daemon_cpu);
        if !config.baselines {
            eprintln!(
                "small run {run}: daemon {daemon_rate:.0}/s, CPU {daemon_cpu:.3} ms per archive"
            );
            continue;
        }

        let mut receiver = WatchedReceiver::start(
            runtime,
            &dir.path().join("received-reqwest"),
            &home.token_file,
        )?;
        let started = Instant::now();
        runtime.block_on(clients::post_with_reqwest(
            &receiver.url(),
            &sources,
            CONCURRENCY,
        ))?;
        let finished = receiver.wait_count(count, timeout)?;
        let reqwest_rate = count as f64 / (finished - started).as_secs_f64();
        receiver.stop(runtime)?;

        let mut receiver =
            WatchedReceiver::start(runtime, &dir.path().join("received-curl"), &home.token_file)?;
        let headers = dir.path().join("curl-headers");
        clients::write_curl_headers(&headers)?;
        let started = Instant::now();
        clients::post_with_curl(&receiver.url(), &headers, &sources, CONCURRENCY)?;
        let finished = receiver.wait_count(count, timeout)?;
        let curl_rate = count as f64 / (finished - started).as_secs_f64();
        receiver.stop(runtime)?;

        eprintln!(
            "small run {run}: daemon {daemon_rate:.0}/s, CPU {daemon_cpu:.3} ms per archive, reqwest {reqwest_rate:.0}/s, curl {curl_rate:.0}/s"
        );
        reqwest_rates.push(reqwest_rate);
        curl_rates.push(curl_rate);
    }
    let label = format!(
        "throughput, {count} archives of {} KiB",
        config.small_bytes / 1024
    );
    Ok(vec![
        Figure::new(
            format!("{label}, vs reqwest"),
            "archives/s",
            daemon_rates.clone(),
        )
        .against("reqwest", reqwest_rates)
        .target(Target::RatioAtLeast(0.8)),
        Figure::new(format!("{label}, vs curl"), "archives/s", daemon_rates)
            .against("curl", curl_rates),
        Figure::new(
            format!("{label}, daemon CPU per archive"),
            "ms",
            daemon_cpus,
        ),
    ])
}

/// Drop-to-stored latency of single archives on an idle daemon.
pub fn latency(
    config: &BenchConfig,
    runtime: &Runtime,
    root: &Path,
) -> anyhow::Result<Vec<Figure>> {
    let sources = write_sources(
        &root.join("latency-sources"),
        "drop",
        config.drops,
        config.small_bytes,
    )?;
    let (mut medians, mut p99s) = (vec![], vec![]);
    for run in 1..=config.runs {
        let dir = support::temp_root_in(root, "latency-run-", config.keep)?;
        let home = Home::create(&dir.path().join("daemon"))?;
        let mut receiver =
            WatchedReceiver::start(runtime, &dir.path().join("received"), &home.token_file)?;
        let daemon = start_warm_daemon(&home, &mut receiver)?;
        let staged = link_into(&sources, &home.staging)?;
        let mut latencies_ms = Vec::with_capacity(staged.len());
        for (path, source) in staged.iter().zip(&sources) {
            wait_outbox_empty(&home, Duration::from_secs(60))?;
            std::thread::sleep(IDLE_BEFORE_DROP);
            let started = Instant::now();
            fs::rename(path, home.outbox.join(&source.name))?;
            let stored = receiver.wait_for(&source.name, Duration::from_secs(60))?;
            latencies_ms.push((stored - started).as_secs_f64() * 1000.0);
        }
        daemon.stop()?;
        receiver.stop(runtime)?;
        let (run_median, run_p99) = (median(&latencies_ms), percentile(&latencies_ms, 99.0));
        eprintln!("latency run {run}: median {run_median:.2} ms, p99 {run_p99:.2} ms");
        medians.push(run_median);
        p99s.push(run_p99);
    }
    let label = format!("drop-to-stored latency, {} drops", config.drops);
    Ok(vec![
        Figure::new(format!("{label}, median"), "ms", medians).target(Target::Below(20.0)),
        Figure::new(format!("{label}, p99"), "ms", p99s),
    ])
}

/// Measures one big archive: the daemon's peak RSS and CPU while it queues and
/// uploads it, and its throughput against `curl` posting the same file to the
/// same receiver.
pub fn big_archive(
    config: &BenchConfig,
    runtime: &Runtime,
    root: &Path,
) -> anyhow::Result<Vec<Figure>> {
    let source_dir = root.join("big-source");
    fs::create_dir_all(&source_dir)?;
    let source = support::write_archive(&source_dir, "big", config.big_bytes, 7)?;
    let mib = source.size as f64 / MIB;
    let timeout = Duration::from_secs(300) + Duration::from_secs_f64(mib);
    let (mut daemon_peaks, mut curl_peaks) = (vec![], vec![]);
    let (mut daemon_rates, mut curl_rates) = (vec![], vec![]);
    let (mut daemon_cpus, mut curl_cpus) = (vec![], vec![]);
    for run in 1..=config.runs {
        let dir = support::temp_root_in(root, "big-run-", config.keep)?;
        let home = Home::create(&dir.path().join("daemon"))?;
        let mut receiver =
            WatchedReceiver::start(runtime, &dir.path().join("received"), &home.token_file)?;
        let daemon = start_warm_daemon(&home, &mut receiver)?;
        let staged = link_into(std::slice::from_ref(&source), &home.staging)?;
        let cpu_before = cpu_time(daemon.pid)?;
        let started = Instant::now();
        drop_all(&staged, &home.outbox)?;
        let stored = receiver.wait_for(&source.name, timeout)?;
        wait_outbox_empty(&home, timeout)?;
        let daemon_peak = proc_status_bytes(daemon.pid, "VmHWM")? as f64 / MIB;
        let daemon_cpu = (cpu_time(daemon.pid)? - cpu_before).as_secs_f64();
        let daemon_rate = mib / (stored - started).as_secs_f64();
        daemon.stop()?;
        receiver.stop(runtime)?;
        if !config.keep {
            // A second copy of the big archive would double the disk space needed.
            fs::remove_dir_all(dir.path().join("received"))?;
        }
        daemon_peaks.push(daemon_peak);
        daemon_rates.push(daemon_rate);
        daemon_cpus.push(daemon_cpu);
        if !config.baselines {
            eprintln!(
                "big run {run}: daemon {daemon_rate:.0} MiB/s, CPU {daemon_cpu:.2} s, peak RSS {daemon_peak:.1} MiB"
            );
            continue;
        }

        let mut receiver =
            WatchedReceiver::start(runtime, &dir.path().join("received-curl"), &home.token_file)?;
        let headers = dir.path().join("curl-headers");
        clients::write_curl_headers(&headers)?;
        let started = Instant::now();
        let child = clients::spawn_curl(&receiver.url(), &headers, &source)?;
        let usage = support::wait_with_usage(child)?;
        if usage.exit_code != 0 {
            bail!(
                "curl posting the big archive exited with {}",
                usage.exit_code
            );
        }
        let stored = receiver.wait_for(&source.name, timeout)?;
        let curl_rate = mib / (stored - started).as_secs_f64();
        receiver.stop(runtime)?;
        let curl_peak = usage.peak_rss_bytes as f64 / MIB;
        let curl_cpu = usage.cpu.as_secs_f64();

        eprintln!(
            "big run {run}: daemon {daemon_rate:.0} MiB/s, CPU {daemon_cpu:.2} s, peak RSS {daemon_peak:.1} MiB; curl {curl_rate:.0} MiB/s, CPU {curl_cpu:.2} s, peak RSS {curl_peak:.1} MiB"
        );
        curl_peaks.push(curl_peak);
        curl_rates.push(curl_rate);
        curl_cpus.push(curl_cpu);
    }
    let label = format!("one archive of {mib:.0} MiB");
    Ok(vec![
        Figure::new(format!("{label}, daemon peak RSS"), "MiB", daemon_peaks)
            .against("curl", curl_peaks)
            .target(Target::Below(64.0)),
        Figure::new(format!("{label}, throughput"), "MiB/s", daemon_rates)
            .against("curl", curl_rates)
            .target(Target::RatioAtLeast(0.8)),
        Figure::new(format!("{label}, client CPU"), "s", daemon_cpus).against("curl", curl_cpus),
    ])
}

/// Writes `count` tiny archives straight into `outbox`, fast: no hashing and
/// no fsync, because only the daemon reads them.
fn write_tiny_archives(outbox: &Path, count: usize) -> anyhow::Result<()> {
    for i in 0..count {
        let content = format!("pending record {i}\n");
        let bytes = outboxd::zipfile::stored_archive("recording.txt", content.as_bytes());
        let path = outbox.join(format!("pending-{i:06}.zip"));
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Count of pending and uploading items in a status report.
fn queued(report: &serde_json::Value) -> u64 {
    let count = |pointer: &str| report.pointer(pointer).and_then(|v| v.as_u64());
    count("/queue/pending").unwrap_or(0) + count("/queue/uploading").unwrap_or(0)
}

/// Many pending items with the server down: the daemon's start-up time, RSS,
/// `status --json` time and CPU use while idle.
///
/// The items are real: tiny archives written into the outbox, which a first
/// daemon hashes and queues once. Each run then restarts the daemon on that
/// state dir and outbox.
pub fn pending_queue(config: &BenchConfig, root: &Path) -> anyhow::Result<(Vec<Figure>, Duration)> {
    let records = config.records;
    let home = Home::create(&root.join("pending"))?;
    let url = support::refused_url()?;
    write_tiny_archives(&home.outbox, records)?;

    let mut daemon = home.spawn_daemon(&url)?;
    daemon.wait_ready(Duration::from_secs(1200))?;
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        if daemon
            .request_status()
            .is_some_and(|report| queued(&report) >= records as u64)
        {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "the daemon did not queue {records} archives in time; see {}",
                home.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let queue_in = daemon.started.elapsed();
    eprintln!(
        "pending: the first daemon queued {records} archives in {:.1} s",
        queue_in.as_secs_f64()
    );
    daemon.stop()?;

    let (mut ready_s, mut status_ms, mut idle_cpu_ms, mut peaks, mut rss) =
        (vec![], vec![], vec![], vec![], vec![]);
    for run in 1..=config.runs {
        let mut daemon = home.spawn_daemon(&url)?;
        let ready = daemon.wait_ready(Duration::from_secs(120))?;
        // Let the start-up work (the first connection attempt, the first
        // flush) finish before the readings.
        std::thread::sleep(Duration::from_secs(1));
        if let Some(report) = daemon.request_status() {
            if queued(&report) != records as u64 {
                bail!(
                    "the restarted daemon reports {} queued items instead of {records}",
                    queued(&report)
                );
            }
        }

        let mut calls_ms = Vec::with_capacity(STATUS_CALLS);
        for _ in 0..STATUS_CALLS {
            let started = Instant::now();
            let output = home
                .command("status")
                .arg("--json")
                .arg("--state-dir")
                .arg(&home.state_dir)
                .output()
                .context("running outboxd status --json")?;
            calls_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            let report: serde_json::Value = serde_json::from_slice(&output.stdout)
                .context("outboxd status --json printed no JSON")?;
            if report.pointer("/daemon/running") != Some(&serde_json::Value::Bool(true)) {
                bail!("outboxd status --json did not report a running daemon");
            }
        }

        let before = cpu_time(daemon.pid)?;
        std::thread::sleep(config.idle);
        let after = cpu_time(daemon.pid)?;
        let peak = proc_status_bytes(daemon.pid, "VmHWM")? as f64 / MIB;
        let resident = proc_status_bytes(daemon.pid, "VmRSS")? as f64 / MIB;
        daemon.stop()?;

        let idle_ms = (after - before).as_secs_f64() * 1000.0;
        eprintln!(
            "pending run {run}: ready {:.3} s, status {:.1} ms, idle CPU {idle_ms:.0} ms, peak RSS {peak:.1} MiB, RSS {resident:.1} MiB",
            ready.as_secs_f64(),
            median(&calls_ms)
        );
        ready_s.push(ready.as_secs_f64());
        status_ms.push(median(&calls_ms));
        idle_cpu_ms.push(idle_ms);
        peaks.push(peak);
        rss.push(resident);
    }
    let label = format!("{records} pending, server down");
    let idle_secs = config.idle.as_secs();
    // "No CPU while idle", read as less than 0.2 % of one core.
    let idle_limit_ms = config.idle.as_secs_f64() * 2.0;
    let figures = vec![
        Figure::new(format!("{label}, peak RSS"), "MiB", peaks).target(Target::Below(100.0)),
        Figure::new(format!("{label}, RSS after idle"), "MiB", rss).target(Target::Below(100.0)),
        Figure::new(format!("{label}, start to ready"), "s", ready_s).target(Target::Below(3.0)),
        Figure::new(format!("{label}, status --json"), "ms", status_ms)
            .target(Target::Below(200.0)),
        Figure::new(
            format!("{label}, CPU over {idle_secs} s idle"),
            "ms",
            idle_cpu_ms,
        )
        .target(Target::Below(idle_limit_ms)),
    ];
    Ok((figures, queue_in))
}
