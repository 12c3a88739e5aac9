//! Command-line definitions (clap) and the dispatch to one module per
//! subcommand. Exit codes: 0 success, 1 failure, 2 invalid usage or
//! configuration; `status` has its own (see `status::exit_code`) and `check`
//! documents its own in its help.

mod check;
mod enqueue;
mod generate;
mod list;
mod offline;
mod retry;
mod status;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, LogFormat, RawSettings};

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

    /// Loads the settings for `status`, `list` and `retry`, and warns on stderr
    /// about each config fault, because a fault can make them look at other
    /// folders than the daemon's.
    fn load_warning(&self) -> config::Settings {
        let loaded = self.load(None);
        // Only faults in the file or the environment can move the folders;
        // server_url and token problems are the daemon's to report.
        let faults: Vec<&String> = loaded
            .problems
            .iter()
            .filter(|p| p.starts_with("config file") || p.starts_with("environment variable"))
            .collect();
        for problem in &faults {
            eprintln!("warning: {problem}");
        }
        if !faults.is_empty() {
            eprintln!(
                "warning: using the state dir {}; pass --state-dir if the daemon uses another",
                loaded.settings.state_dir.display()
            );
        }
        loaded.settings
    }
}

/// Item states that `list --state` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateFilter {
    Pending,
    Uploading,
    Uploaded,
    Rejected,
}

impl StateFilter {
    fn as_str(self) -> &'static str {
        match self {
            StateFilter::Pending => "pending",
            StateFilter::Uploading => "uploading",
            StateFilter::Uploaded => "uploaded",
            StateFilter::Rejected => "rejected",
        }
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
        settings: RawSettings,
    },
    /// Show the daemon's state: auth, destination, queue, uploads
    #[command(
        after_help = "Exit status: 0 healthy or idle; 2 attention needed (an auth or config hold, \
rejected files, or the server unreachable for more than 10 minutes); 3 the daemon is not running; \
1 the command itself failed."
    )]
    Status {
        #[command(flatten)]
        locate: Locate,
        /// Print the status as JSON (one compact object per refresh with --watch)
        #[arg(long)]
        json: bool,
        /// Refresh every second until Ctrl-C; shows the send rate of each upload
        #[arg(long)]
        watch: bool,
    },
    /// List the queued items and the rejected files, oldest first
    List {
        #[command(flatten)]
        locate: Locate,
        /// Print the items as JSON
        #[arg(long)]
        json: bool,
        /// Only items in this state
        #[arg(long, value_name = "STATE", value_enum)]
        state: Option<StateFilter>,
    },
    /// Wake the daemon: clear backoff and probe a hold now
    #[command(
        after_help = "Exit status: 0 done; 1 the daemon is not running, an ID is unknown, \
or the request failed; 2 invalid usage."
    )]
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
    /// Place zip archives into the outbox atomically (copy, fsync, rename)
    #[command(
        after_help = "Each FILE must be a complete zip archive whose name matches `include`. \
It is written into the outbox under a temporary dot name, flushed to disk, and renamed into place; \
a file of the same name already in the outbox is never replaced.\n\n\
Exit status: 0 every file was placed; 1 at least one file was not; 2 invalid usage or configuration."
    )]
    Enqueue {
        #[command(flatten)]
        locate: Locate,
        /// Outbox folder [default: from the config, or $XDG_DATA_HOME/outboxd/outbox]
        #[arg(long, value_name = "DIR")]
        outbox: Option<PathBuf>,
        /// Move each file instead of copying it (the source is removed once the copy is in place)
        #[arg(long = "move")]
        move_files: bool,
        /// Zip archives to enqueue
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Check the configuration, token, folders and daemon, and probe the server
    #[command(
        after_help = "Prints one line per check: OK, WARN (works, but should be fixed), \
FAIL (uploads cannot work; the line says what to do) or SKIP (not tried because an earlier check failed). \
The token is never printed, only its fingerprint: the first 8 hex digits of its SHA-256. \
The probe is one POST to server_url with the token and the form field probe=1, without a file.\n\n\
Exit status: 0 no check failed (warnings allowed); 1 at least one check failed, \
including configuration faults; 2 invalid command-line usage."
    )]
    Check {
        /// Config file [default: $XDG_CONFIG_HOME/outboxd/config.toml, or OUTBOXD_CONFIG]
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: RawSettings,
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
    /// Print a shell completion script to stdout
    #[command(
        after_help = "Example: outboxd completions bash > ~/.local/share/bash-completion/completions/outboxd"
    )]
    Completions {
        /// Shell to generate the script for
        #[arg(value_name = "SHELL", value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a man page (roff) to stdout
    #[command(
        after_help = "Example: outboxd man > ~/.local/share/man/man1/outboxd.1; \
outboxd man status > ~/.local/share/man/man1/outboxd-status.1"
    )]
    Man {
        /// Subcommand whose page to print [default: the page of outboxd itself]
        #[arg(value_name = "COMMAND")]
        command: Option<String>,
    },
}

/// Runs a parsed command line and returns the exit code.
pub fn main(cli: Cli) -> i32 {
    match cli.command {
        // Commands that only touch local files run without the async runtime.
        Command::Enqueue {
            locate,
            outbox,
            move_files,
            files,
        } => enqueue::enqueue(&locate, outbox, move_files, &files),
        Command::Completions { shell } => generate::completions(shell),
        Command::Man { command } => generate::man(command.as_deref()),
        Command::Run { config, settings } => block_on(run(config, settings)),
        Command::Status {
            locate,
            json,
            watch,
        } => block_on(status::status(locate, json, watch)),
        Command::List {
            locate,
            json,
            state,
        } => block_on(list::list(locate, json, state)),
        Command::Retry {
            locate,
            ids,
            all: _,
            rejected,
        } => block_on(retry::retry(locate, ids, rejected)),
        Command::Check { config, settings } => block_on(check::check(config, settings)),
        Command::Demo { keep } => block_on(demo(keep)),
        Command::Receive {
            listen,
            dir,
            token_file,
            path,
        } => block_on(receive(listen, dir, token_file, path)),
    }
}

/// Runs `command` on a new multi-threaded runtime and returns its exit code.
fn block_on(command: impl std::future::Future<Output = i32>) -> i32 {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(command),
        Err(err) => {
            eprintln!("error: starting the async runtime failed: {err}");
            1
        }
    }
}

/// True when output to stdout may use ANSI colours: stdout is a terminal,
/// `NO_COLOR` is unset or empty (see no-color.org), and `TERM` is not `dumb`.
fn colour_enabled() -> bool {
    use std::io::IsTerminal;
    let no_colour = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
    let dumb = std::env::var_os("TERM").is_some_and(|term| term == "dumb");
    std::io::stdout().is_terminal() && !no_colour && !dumb
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
            // The message goes to stderr once, as a log line, so that it reaches
            // the journal under systemd in the same format as the other lines.
            tracing::error!("{}", err.message);
            err.code
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

async fn demo(keep: bool) -> i32 {
    match crate::demo::run(keep).await {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: the demo failed: {err:#}");
            1
        }
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
