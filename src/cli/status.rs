//! `outboxd status`: the one-screen summary or the JSON document, once, or
//! refreshed every second with `--watch`.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant, SystemTime};

use super::offline::fetch_report;
use super::{colour_enabled, Locate};
use crate::config::Settings;
use crate::status::{self, RenderOptions, StatusReport, Tone};

/// Weight of the newest sample in the smoothed send rate. Samples are one
/// second apart, so a single slow second does not swing the rate.
const RATE_SMOOTHING: f64 = 0.5;

/// `outboxd status`. Returns the exit code of `status::exit_code`, or 1.
pub async fn status(locate: Locate, json: bool, watch: bool) -> i32 {
    let settings = locate.load_warning();
    if watch {
        return watch_status(&settings, json).await;
    }
    let report = match fetch_report(&settings).await {
        Ok(report) => report,
        Err(message) => {
            eprintln!("error: {message}");
            return 1;
        }
    };
    let now = SystemTime::now();
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("error: encoding the status failed: {err}");
                return 1;
            }
        }
    } else {
        let options = RenderOptions {
            colour: colour_enabled(),
            rates: HashMap::new(),
        };
        print!("{}", status::render_text_with(&report, now, &options));
    }
    status::exit_code(&report, now)
}

/// Send rates of the uploads in flight, measured between two refreshes.
#[derive(Default)]
struct RateMeter {
    /// Bytes sent and sample time of each upload at the previous refresh.
    previous: HashMap<String, (u64, Instant)>,
    rates: HashMap<String, f64>,
}

impl RateMeter {
    fn sample(&mut self, report: &StatusReport, at: Instant) {
        let mut rates = HashMap::new();
        let mut current = HashMap::new();
        for upload in &report.uploads {
            current.insert(upload.id.clone(), (upload.bytes_sent, at));
            let Some(&(bytes_before, before)) = self.previous.get(&upload.id) else {
                continue;
            };
            let seconds = at.duration_since(before).as_secs_f64();
            // A smaller count means the upload started again; wait for a new sample.
            if seconds <= 0.0 || upload.bytes_sent < bytes_before {
                continue;
            }
            let measured = (upload.bytes_sent - bytes_before) as f64 / seconds;
            let rate = match self.rates.get(&upload.id) {
                Some(old) => RATE_SMOOTHING * measured + (1.0 - RATE_SMOOTHING) * old,
                None => measured,
            };
            rates.insert(upload.id.clone(), rate);
        }
        self.previous = current;
        self.rates = rates;
    }
}

/// Redraws the status every second until Ctrl-C and returns the exit code of
/// the last refresh. On a terminal, each refresh replaces the previous one.
/// Into a pipe or file, the refreshes follow each other, and with `--json`
/// each refresh is one compact JSON object on one line.
async fn watch_status(settings: &Settings, json: bool) -> i32 {
    let terminal = std::io::stdout().is_terminal();
    let colour = colour_enabled();
    let mut meter = RateMeter::default();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut code = 1;
    if terminal && !json {
        print!("\x1b[2J");
    }
    loop {
        let refresh = async {
            ticker.tick().await;
            fetch_report(settings).await
        };
        let result = tokio::select! {
            signal = &mut ctrl_c => {
                if let Err(err) = signal {
                    eprintln!("error: waiting for Ctrl-C failed: {err}");
                }
                return code;
            }
            result = refresh => result,
        };
        let now = SystemTime::now();
        let frame = match result {
            Ok(report) => {
                meter.sample(&report, Instant::now());
                code = status::exit_code(&report, now);
                if json {
                    serde_json::to_string(&report).unwrap_or_else(|err| {
                        format!("{{\"error\":\"encoding the status failed: {err}\"}}")
                    })
                } else {
                    let options = RenderOptions {
                        colour,
                        rates: meter.rates.clone(),
                    };
                    status::render_text_with(&report, now, &options)
                }
            }
            Err(message) => {
                code = 1;
                format!("error: {message}\n")
            }
        };
        let mut out = std::io::stdout().lock();
        let written = if json {
            writeln!(out, "{}", frame.trim_end())
        } else if terminal {
            write!(out, "{}", redraw(&frame, colour))
        } else {
            writeln!(out, "{frame}")
        };
        if written.and_then(|_| out.flush()).is_err() {
            // The reader went away (a closed pipe): stop like other tools do.
            return code;
        }
    }
}

/// Moves the cursor home, prints `frame` with each line cleared to its end,
/// and clears the rest of the screen, which redraws without flicker.
fn redraw(frame: &str, colour: bool) -> String {
    let mut out = String::from("\x1b[H");
    for line in frame.lines() {
        out.push_str(line);
        out.push_str("\x1b[K\n");
    }
    let hint = status::paint(
        "refreshing every second; press Ctrl-C to stop",
        Tone::Dim,
        colour,
    );
    out.push_str(&format!("\n{hint}\x1b[K\n\x1b[J"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{AuthStatus, DaemonStatus, DestinationStatus, QueueStatus, UploadStatus};

    fn report(bytes_sent: u64) -> StatusReport {
        StatusReport {
            daemon: DaemonStatus {
                running: true,
                pid: Some(1),
                version: "0".into(),
                started_at: None,
            },
            server_url: String::new(),
            auth: AuthStatus {
                state: "ok".into(),
                since: None,
                detail: None,
                next_probe_at: None,
            },
            destination: DestinationStatus {
                state: "ok".into(),
                since: None,
                next_attempt_at: None,
                last_error: None,
            },
            queue: QueueStatus {
                pending: 0,
                uploading: 1,
                uploaded: 0,
                rejected: 0,
                pending_bytes: 0,
                oldest_pending_at: None,
            },
            uploads: vec![UploadStatus {
                id: "1".into(),
                file: "a.zip".into(),
                bytes_sent,
                size: 10_000_000,
            }],
            last_success_at: None,
            last_error: None,
            last_error_at: None,
            warnings: vec![],
            outbox: String::new(),
            state_dir: String::new(),
            token_fingerprint: None,
        }
    }

    #[test]
    fn rate_needs_two_samples() {
        let start = Instant::now();
        let mut meter = RateMeter::default();
        meter.sample(&report(1000), start);
        assert!(meter.rates.is_empty());
        meter.sample(&report(3000), start + Duration::from_secs(2));
        assert_eq!(meter.rates.get("1"), Some(&1000.0));
    }

    #[test]
    fn rate_is_smoothed_and_reset() {
        let start = Instant::now();
        let mut meter = RateMeter::default();
        meter.sample(&report(0), start);
        meter.sample(&report(1000), start + Duration::from_secs(1));
        meter.sample(&report(4000), start + Duration::from_secs(2));
        assert_eq!(
            meter.rates.get("1"),
            Some(&2000.0),
            "half the new 3000 B/s and half the old 1000 B/s"
        );
        // A smaller count means the upload started again.
        meter.sample(&report(10), start + Duration::from_secs(3));
        assert!(meter.rates.is_empty());
    }
}
