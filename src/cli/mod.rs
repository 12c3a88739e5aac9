//! Command-line definitions (clap) and the subcommands that are small enough to
//! live here. Exit codes: 0 success, 1 failure, 2 invalid usage or
//! configuration; `status` has its own (see `status::exit_code`).

mod offline;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, LogFormat, RawSettings};
use crate::control::{self, ClientError, Request};

#[derive(Debug, Parser)]
#[command(
    name = "outboxd",
    version,
    about = "Uploads zip archives from an outbox folder to an HTTP API, durably, with an auth hold"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Options that find the same daemon and folders as `run`.
#[derive(Debug, Clone, Args)]
pub struct Locate {
    /// Config file [default: $XDG_CONFIG_HOME/outboxd/config.toml, or OUTBOXD_CONFIG]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// State dir of the daemon [default: from the config, or $XDG_STATE_HOME/outboxd]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl Locate {
    fn load(&self, outbox: Option<PathBuf>) -> config::Loaded {
        let flags = RawSettings {
            state_dir: self.state_dir.clone(),
            outbox,
            ..Default::default()
        };
        config::load_from_process(self.config.as_deref(), flags)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (logs to stderr)
    Run {
        /// Config file [default: $XDG_CONFIG_HOME/outboxd/config.toml, or OUTBOXD_CONFIG]
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<RawSettings>,
    },
    /// Show the daemon's state: auth, destination, queue, uploads
    Status {
        #[command(flatten)]
        locate: Locate,
        /// Print the status as JSON
        #[arg(long)]
        json: bool,
    },
    /// List the queued items
    List {
        #[command(flatten)]
        locate: Locate,
        /// Print the items as JSON
        #[arg(long)]
        json: bool,
        /// Only items in this state: pending, uploading, uploaded or rejected
        #[arg(long, value_name = "STATE")]
        state: Option<String>,
    },
    /// Wake the daemon: clear backoff and probe a hold now
    Retry {
        #[command(flatten)]
        locate: Locate,
        /// Item ids to retry (see `outboxd list`)
        #[arg(value_name = "ID", conflicts_with_all = ["all", "rejected"])]
        ids: Vec<u64>,
        /// Retry every item (the default)
        #[arg(long)]
        all: bool,
        /// Move the files in rejected/ back into the queue
        #[arg(long)]
        rejected: bool,
    },
    /// Show the main job on this machine: a receiver and a daemon on loopback, real
    /// archives, an outage and an auth failure survived
    Demo {
        /// Keep the demo's temporary folder (outbox, state, received files, logs)
        #[arg(long)]
        keep: bool,
    },
    /// Run a reference receiver of the upload request, for tests and demos
    Receive {
        /// Address to listen on, such as 127.0.0.1:8080
        #[arg(long, value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// Folder where received archives are stored
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// File that contains the token that uploads must carry
        #[arg(long, value_name = "PATH")]
        token_file: PathBuf,
        /// URL path of the upload endpoint
        #[arg(long, value_name = "PATH", default_value = "/upload")]
        path: String,
    },
}

/// Runs a parsed command line and returns the exit code.
pub fn main(cli: Cli) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the async runtime failed: {err}");
            return 1;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run { config, settings } => run(config, *settings).await,
            Command::Status { locate, json } => offline::status(&locate, json).await,
            Command::List {
                locate,
                json,
                state,
            } => offline::list(&locate, json, state.as_deref()).await,
            Command::Retry {
                locate,
                ids,
                all: _,
                rejected,
            } => retry(&locate, ids, rejected).await,
            Command::Demo { keep } => match crate::demo::run(keep).await {
                Ok(()) => 0,
                Err(err) => {
                    eprintln!("error: the demo failed: {err:#}");
                    1
                }
            },
            Command::Receive {
                listen,
                dir,
                token_file,
                path,
            } => receive(listen, dir, token_file, path).await,
        }
    })
}

/// Dependencies capped at DEBUG when `RUST_LOG` enables TRACE for every target
/// without naming them. notify logs each inotify event of the watched folders
/// at TRACE, so a log file kept in the token file's folder would log its own
/// writes without end. sled logs hundreds of lines of page cache work per
/// second at TRACE.
const TRACE_CAPPED_TARGETS: &[&str] = &["notify", "sled"];

/// Builds the log filter from `RUST_LOG` (default `info`).
fn log_filter(spec: Option<&str>) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let Some(spec) = spec else {
        return EnvFilter::new("info");
    };
    let Ok(mut filter) = EnvFilter::try_new(spec) else {
        return EnvFilter::new("info");
    };
    let global_trace = spec
        .split(',')
        .any(|directive| directive.trim().eq_ignore_ascii_case("trace"));
    if global_trace {
        for target in TRACE_CAPPED_TARGETS {
            if !spec.contains(target) {
                let directive = format!("{target}=debug")
                    .parse()
                    .expect("a target and a level form a valid directive");
                filter = filter.add_directive(directive);
            }
        }
    }
    filter
}

/// Sets up tracing: `RUST_LOG` filters (default `info`), text or JSON to stderr.
pub fn init_logging(format: LogFormat) {
    let spec = std::env::var(tracing_subscriber::EnvFilter::DEFAULT_ENV).ok();
    let filter = log_filter(spec.as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
    if let Err(err) = result {
        eprintln!("warning: setting up logging failed: {err}");
    }
}

async fn run(config_flag: Option<PathBuf>, flags: RawSettings) -> i32 {
    let launch = crate::daemon::Launch {
        config_flag: config_flag.clone(),
        flags: flags.clone(),
    };
    let loaded = config::load_from_process(config_flag.as_deref(), flags);
    init_logging(loaded.settings.log_format);
    for problem in &loaded.problems {
        tracing::error!("configuration fault: {problem}");
    }
    match crate::daemon::run(launch, loaded).await {
        Ok(()) => 0,
        Err(err) => {
            tracing::error!("{}", err.message);
            eprintln!("error: {}", err.message);
            err.code
        }
    }
}

async fn retry(locate: &Locate, ids: Vec<u64>, rejected: bool) -> i32 {
    let loaded = locate.load(None);
    let request = Request::Retry(crate::daemon::RetryRequest { ids, rejected });
    match control::request(&loaded.settings.state_dir, &request).await {
        Ok(reply) => {
            let result = reply.retry.unwrap_or_default();
            println!("cleared the backoff of {} item(s)", result.cleared);
            if rejected {
                println!(
                    "moved {} rejected file(s) back into the outbox",
                    result.requeued_rejected
                );
            }
            if result.probing {
                println!("the hold is probed now; see `outboxd status`");
            }
            if !result.unknown_ids.is_empty() {
                let ids: Vec<String> = result.unknown_ids.iter().map(u64::to_string).collect();
                eprintln!(
                    "error: no item with id {} (see `outboxd list`)",
                    ids.join(", ")
                );
                return 1;
            }
            0
        }
        Err(ClientError::NotRunning(path)) => {
            eprintln!("error: the daemon is not running (no control socket at {path}); start it with `outboxd run` or `systemctl --user start outboxd`");
            1
        }
        Err(err) => {
            eprintln!("error: {err}");
            1
        }
    }
}

async fn receive(
    listen: std::net::SocketAddr,
    dir: PathBuf,
    token_file: PathBuf,
    path: String,
) -> i32 {
    init_logging(LogFormat::Text);
    let options = crate::receiver::ReceiverOptions {
        dir,
        token_file,
        path,
        ..Default::default()
    };
    let listener = match bind_receiver(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("error: listening on {listen} failed: {err}; choose another address or port");
            return 1;
        }
    };
    tracing::info!(listen = %listen, "receiver listening");
    match crate::receiver::serve(listener, options, shutdown_signal()).await {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: {err:#}");
            1
        }
    }
}

async fn bind_receiver(listen: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filter_caps_noisy_targets() {
        let cases: &[(Option<&str>, &str)] = &[
            (None, "info"),
            (Some("not a [valid filter"), "info"),
            (Some("debug"), "debug"),
            (Some("outboxd=trace"), "outboxd=trace"),
            (Some("trace"), "notify=debug,sled=debug,trace"),
            (Some("TRACE,notify=trace"), "sled=debug,notify=trace,trace"),
        ];
        for (spec, expected) in cases {
            let mut directives: Vec<String> = log_filter(*spec)
                .to_string()
                .split(',')
                .map(str::to_string)
                .collect();
            directives.sort();
            let mut wanted: Vec<String> = expected.split(',').map(str::to_string).collect();
            wanted.sort();
            assert_eq!(directives, wanted, "RUST_LOG={spec:?}");
        }
    }
}
