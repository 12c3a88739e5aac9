//! Benchmark of the limits that outboxd promises, run by
//! `cargo bench --bench limits`. It runs the real `outboxd` binary against the
//! bundled receiver on 127.0.0.1, measures each figure `OUTBOXD_BENCH_RUNS`
//! times next to its baseline, and prints a Markdown table.
//!
//! Sizes come from `OUTBOXD_BENCH_*` environment variables (see
//! `BenchConfig`); tiny values make a smoke run of a few seconds. The process
//! exits non-zero only when a measurement could not be made, never because a
//! figure misses its target.

mod clients;
mod report;
mod scenarios;
mod support;

use std::time::Instant;

use anyhow::Context;

fn main() {
    if let Err(err) = run() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let config = support::BenchConfig::from_env()?;
    eprintln!("outboxd limits benchmark: {config:?}");
    eprintln!("binary: {}", support::binary().display());
    let load_before = load_average();
    let started = Instant::now();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the Tokio runtime")?;
    let root = support::temp_root("outboxd-bench-")?;

    let mut figures = Vec::new();
    let mut notes = Vec::new();
    if config.runs_figure("small") {
        figures.extend(scenarios::small_throughput(&config, &runtime, root.path())?);
    }
    if config.runs_figure("latency") {
        figures.extend(scenarios::latency(&config, &runtime, root.path())?);
    }
    if config.runs_figure("big") {
        figures.extend(scenarios::big_archive(&config, &runtime, root.path())?);
    }
    if config.runs_figure("pending") {
        let (pending, queue_in) = scenarios::pending_queue(&config, root.path())?;
        figures.extend(pending);
        notes.push(format!(
            "queueing the {} pending archives once took {:.1} s (intake, before the runs)",
            config.records,
            queue_in.as_secs_f64()
        ));
    }

    if config.keep {
        eprintln!("kept the temporary folders in {}", root.keep().display());
    }

    println!();
    print!("{}", report::table(&figures));
    println!();
    for note in notes {
        println!("- {note}");
    }
    println!(
        "- machine: {} cores, {}; load average {} before, {} after; {:.0} s in all",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        load_before,
        load_average(),
        started.elapsed().as_secs_f64()
    );
    let failed = figures.iter().filter(|f| f.passes() == Some(false)).count();
    println!("- {failed} figure(s) miss their target");
    Ok(())
}

/// Returns the 1-minute load average from /proc/loadavg, or "?".
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Returns the first "model name" of /proc/cpuinfo, or "unknown CPU".
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
