//! Settings: their defaults, and how the config file, `OUTBOXD_*` environment
//! variables and command-line flags are layered into one `Settings`.
//!
//! Flags win over the environment, which wins over the file. A fault in any
//! layer (a file that does not parse, an unknown key, a value out of range) does
//! not stop the daemon. The value falls back to its default and the fault is
//! listed in `Loaded::problems`. The daemon turns those into a `config_error`
//! hold that `outboxd status` shows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::token::TokenConfig;

/// Every setting, all optional, as one layer (file, environment or flags) gives them.
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    /// Folder that producers drop archives into [default: $XDG_DATA_HOME/outboxd/outbox]
    #[arg(long, value_name = "DIR")]
    pub outbox: Option<PathBuf>,
    /// Folder of the queue database, lock and control socket [default: $XDG_STATE_HOME/outboxd]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// URL that each archive is POSTed to
    #[arg(long, value_name = "URL")]
    pub server_url: Option<String>,
    /// File that contains the upload token
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Environment variable that contains the upload token [default: OUTBOXD_TOKEN]
    #[arg(long, value_name = "NAME")]
    pub token_env: Option<String>,
    /// Uploads in flight at once [default: 2]
    #[arg(long, value_name = "N")]
    pub concurrency: Option<u64>,
    /// Action on an uploaded file: delete, or move to sent/ [default: delete]
    #[arg(long, value_name = "ACTION")]
    pub on_success: Option<String>,
    /// Glob on the file name, case-insensitive [default: *.zip]
    #[arg(long, value_name = "GLOB")]
    pub include: Option<String>,
    /// Quiet time in milliseconds before a file whose close was not seen counts as written [default: 1000]
    #[arg(long, value_name = "MS")]
    pub settle_ms: Option<u64>,
    /// Quiet time in milliseconds before an incomplete archive is rejected [default: 60000]
    #[arg(long, value_name = "MS")]
    pub reject_after_ms: Option<u64>,
    /// Interval in milliseconds of the periodic outbox rescan [default: 60000]
    #[arg(long, value_name = "MS")]
    pub rescan_ms: Option<u64>,
    /// First retry delay of an item in milliseconds [default: 2000]
    #[arg(long, value_name = "MS")]
    pub backoff_initial_ms: Option<u64>,
    /// Factor by which an item's retry delay grows [default: 2.0]
    #[arg(long, value_name = "FACTOR")]
    pub backoff_multiplier: Option<f64>,
    /// Maximum retry delay of an item in milliseconds [default: 300000]
    #[arg(long, value_name = "MS")]
    pub backoff_max_ms: Option<u64>,
    /// Maximum retry delay in milliseconds while the server cannot be reached [default: 60000]
    #[arg(long, value_name = "MS")]
    pub unreachable_max_ms: Option<u64>,
    /// Probe interval in milliseconds during an auth or config hold [default: 300000]
    #[arg(long, value_name = "MS")]
    pub auth_probe_ms: Option<u64>,
    /// Maximum pause in milliseconds that a server's Retry-After can ask for [default: 3600000]
    #[arg(long, value_name = "MS")]
    pub retry_after_max_ms: Option<u64>,
    /// Time in milliseconds that uploads in flight get after SIGTERM [default: 5000]
    #[arg(long, value_name = "MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// How long records of uploaded items are kept, in milliseconds [default: 604800000, 7 days]
    #[arg(long, value_name = "MS")]
    pub uploaded_retention_ms: Option<u64>,
    /// Timeout in milliseconds to connect to the server [default: 10000]
    #[arg(long, value_name = "MS")]
    pub connect_timeout_ms: Option<u64>,
    /// Timeout in milliseconds between reads of the response, or for the response after the body was sent [default: 60000]
    #[arg(long, value_name = "MS")]
    pub read_timeout_ms: Option<u64>,
    /// Extra static form fields (config file only)
    #[arg(skip)]
    pub fields: Option<BTreeMap<String, String>>,
    /// Name of the multipart part that carries the archive [default: file]
    #[arg(long, value_name = "NAME")]
    pub file_field: Option<String>,
    /// Name of the form field that carries the session id [default: session_id]
    #[arg(long, value_name = "NAME")]
    pub session_field: Option<String>,
    /// Allow plain http:// to hosts other than loopback (sends the token in clear text)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub allow_insecure_http: Option<bool>,
    /// Extra CA certificates (PEM) for private servers
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// Log format: text or json [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
}

/// The type of each key, for reading it from an environment variable.
#[derive(Clone, Copy)]
enum Kind {
    Text,
    Integer,
    Float,
    Bool,
}

/// Every key that can be set from the environment (`fields` cannot).
const ENV_KEYS: &[(&str, Kind)] = &[
    ("outbox", Kind::Text),
    ("state_dir", Kind::Text),
    ("server_url", Kind::Text),
    ("token_file", Kind::Text),
    ("token_env", Kind::Text),
    ("concurrency", Kind::Integer),
    ("on_success", Kind::Text),
    ("include", Kind::Text),
    ("settle_ms", Kind::Integer),
    ("reject_after_ms", Kind::Integer),
    ("rescan_ms", Kind::Integer),
    ("backoff_initial_ms", Kind::Integer),
    ("backoff_multiplier", Kind::Float),
    ("backoff_max_ms", Kind::Integer),
    ("unreachable_max_ms", Kind::Integer),
    ("auth_probe_ms", Kind::Integer),
    ("retry_after_max_ms", Kind::Integer),
    ("shutdown_grace_ms", Kind::Integer),
    ("uploaded_retention_ms", Kind::Integer),
    ("connect_timeout_ms", Kind::Integer),
    ("read_timeout_ms", Kind::Integer),
    ("file_field", Kind::Text),
    ("session_field", Kind::Text),
    ("allow_insecure_http", Kind::Bool),
    ("ca_file", Kind::Text),
    ("log_format", Kind::Text),
];

macro_rules! overlay_fields {
    ($low:expr, $high:expr, $($field:ident),+) => {
        RawSettings { $($field: $high.$field.or($low.$field)),+ }
    };
}

impl RawSettings {
    /// Returns `self` with every value that `high` sets replaced by it.
    pub fn overlay(self, high: RawSettings) -> RawSettings {
        overlay_fields!(
            self,
            high,
            outbox,
            state_dir,
            server_url,
            token_file,
            token_env,
            concurrency,
            on_success,
            include,
            settle_ms,
            reject_after_ms,
            rescan_ms,
            backoff_initial_ms,
            backoff_multiplier,
            backoff_max_ms,
            unreachable_max_ms,
            auth_probe_ms,
            retry_after_max_ms,
            shutdown_grace_ms,
            uploaded_retention_ms,
            connect_timeout_ms,
            read_timeout_ms,
            fields,
            file_field,
            session_field,
            allow_insecure_http,
            ca_file,
            log_format
        )
    }

    /// Reads the `OUTBOXD_<KEY>` variables. Unparsable values are reported in
    /// `problems` and left unset.
    pub fn from_env(
        env: impl Fn(&str) -> Option<String>,
        problems: &mut Vec<String>,
    ) -> RawSettings {
        let mut table = toml::Table::new();
        for (key, kind) in ENV_KEYS {
            let name = format!("OUTBOXD_{}", key.to_ascii_uppercase());
            let Some(text) = env(&name) else { continue };
            let value = match kind {
                Kind::Text => Some(toml::Value::String(text.clone())),
                Kind::Integer => text.trim().parse::<i64>().ok().map(toml::Value::Integer),
                Kind::Float => text.trim().parse::<f64>().ok().map(toml::Value::Float),
                Kind::Bool => match text.trim() {
                    "true" | "1" | "yes" => Some(toml::Value::Boolean(true)),
                    "false" | "0" | "no" | "" => Some(toml::Value::Boolean(false)),
                    _ => None,
                },
            };
            match value {
                Some(value) => {
                    // Each variable is checked alone, so that one bad value names
                    // its variable and leaves the others in effect.
                    let mut single = toml::Table::new();
                    single.insert(key.to_string(), value.clone());
                    match RawSettings::deserialize(toml::Value::Table(single)) {
                        Ok(_) => {
                            table.insert(key.to_string(), value);
                        }
                        Err(err) => problems.push(format!(
                            "environment variable {name}={text:?} is invalid: {}",
                            err.to_string().lines().next().unwrap_or_default()
                        )),
                    }
                }
                None => problems.push(format!(
                    "environment variable {name}={text:?} is invalid: expected {}",
                    match kind {
                        Kind::Integer => "a whole number",
                        Kind::Float => "a number",
                        Kind::Bool => "true or false",
                        Kind::Text => "text",
                    }
                )),
            }
        }
        match RawSettings::deserialize(toml::Value::Table(table)) {
            Ok(raw) => raw,
            Err(err) => {
                problems.push(format!(
                    "the OUTBOXD_* environment variables are invalid: {err}"
                ));
                RawSettings::default()
            }
        }
    }
}

/// The action on a file once the server has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSuccess {
    Delete,
    Move,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The settings the daemon runs with, every value resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config_path: Option<PathBuf>,
    pub outbox: PathBuf,
    pub state_dir: PathBuf,
    pub server_url: Option<String>,
    pub token: TokenConfig,
    pub concurrency: usize,
    pub on_success: OnSuccess,
    pub include: String,
    pub settle: Duration,
    pub reject_after: Duration,
    pub rescan: Duration,
    pub backoff_initial: Duration,
    pub backoff_multiplier: f64,
    pub backoff_max: Duration,
    pub unreachable_max: Duration,
    pub auth_probe: Duration,
    pub retry_after_max: Duration,
    pub shutdown_grace: Duration,
    pub uploaded_retention: Duration,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub fields: BTreeMap<String, String>,
    pub file_field: String,
    pub session_field: String,
    pub allow_insecure_http: bool,
    pub ca_file: Option<PathBuf>,
    pub log_format: LogFormat,
}

/// Settings with the faults found while loading them.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    /// Configuration faults, each naming the value and the fix. Not empty means a
    /// `config_error` hold.
    pub problems: Vec<String>,
}

/// Returns the config file path: `--config`, else `OUTBOXD_CONFIG`, else the XDG
/// default. The flag is `explicit`: a file named there must exist.
pub fn config_path(flag: Option<&Path>, env: &impl Fn(&str) -> Option<String>) -> (PathBuf, bool) {
    if let Some(path) = flag {
        return (path.to_path_buf(), true);
    }
    if let Some(path) = env("OUTBOXD_CONFIG").filter(|p| !p.is_empty()) {
        return (PathBuf::from(path), true);
    }
    (
        xdg_dir(env, "XDG_CONFIG_HOME", ".config").join("outboxd/config.toml"),
        false,
    )
}

fn xdg_dir(env: &impl Fn(&str) -> Option<String>, variable: &str, fallback: &str) -> PathBuf {
    match env(variable).filter(|v| Path::new(v).is_absolute()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env("HOME").unwrap_or_else(|| "/".to_string())).join(fallback),
    }
}

/// Loads the settings from the file, the environment and `flags`.
pub fn load(
    config_flag: Option<&Path>,
    flags: RawSettings,
    env: impl Fn(&str) -> Option<String>,
) -> Loaded {
    let mut problems = Vec::new();
    let (path, explicit) = config_path(config_flag, &env);
    let file = read_file(&path, explicit, &mut problems);
    let environment = RawSettings::from_env(&env, &mut problems);
    let raw = file.overlay(environment).overlay(flags);
    let settings = resolve(raw, Some(path), &env, &mut problems);
    Loaded { settings, problems }
}

/// Loads the settings with the process environment.
pub fn load_from_process(config_flag: Option<&Path>, flags: RawSettings) -> Loaded {
    load(config_flag, flags, |name| std::env::var(name).ok())
}

fn read_file(path: &Path, explicit: bool, problems: &mut Vec<String>) -> RawSettings {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return RawSettings::default();
        }
        Err(err) => {
            problems.push(format!(
                "config file {} cannot be read: {err}; fix the path given by --config or OUTBOXD_CONFIG",
                path.display()
            ));
            return RawSettings::default();
        }
    };
    let table = match toml::from_str::<toml::Table>(&text) {
        Ok(table) => table,
        Err(err) => {
            let message = err.message().to_string();
            let line = err
                .span()
                .map(|span| format!(" at line {}", text[..span.start].lines().count().max(1)))
                .unwrap_or_default();
            problems.push(format!(
                "config file {} is invalid{line}: {message}; fix it and restart the daemon",
                path.display()
            ));
            return RawSettings::default();
        }
    };
    // Each key is checked alone, so that one unknown or invalid key is reported
    // and the others (the folders above all) still apply.
    let mut valid = toml::Table::new();
    for (key, value) in table {
        let mut single = toml::Table::new();
        single.insert(key.clone(), value.clone());
        match RawSettings::deserialize(toml::Value::Table(single)) {
            Ok(_) => {
                valid.insert(key, value);
            }
            Err(err) => {
                let message = err.message().lines().next().unwrap_or_default().to_string();
                // serde lists every valid key after "expected one of", which
                // buries the point; the example config documents them.
                let problem = if message.starts_with("unknown field") {
                    "it is not a setting of outboxd (see the example config for the keys)"
                        .to_string()
                } else {
                    message
                };
                problems.push(format!(
                    "config file {}: key {key:?} is invalid: {problem}; fix it and send SIGHUP (or restart)",
                    path.display()
                ));
            }
        }
    }
    RawSettings::deserialize(toml::Value::Table(valid)).unwrap_or_default()
}

/// Makes a configured path absolute: a leading `~/`, `$HOME/` or `${HOME}/` is
/// replaced by the home folder, and a relative path is taken from the current
/// folder. The daemon watches folders by absolute path, and a literal `~` is
/// never what an operator meant.
pub fn absolute_path(path: &Path, env: &impl Fn(&str) -> Option<String>) -> PathBuf {
    let text = path.to_string_lossy();
    let home = env("HOME").filter(|h| !h.is_empty());
    let expanded = match home {
        Some(home) if text == "~" || text == "$HOME" || text == "${HOME}" => PathBuf::from(home),
        Some(home) => ["~/", "$HOME/", "${HOME}/"]
            .iter()
            .find_map(|prefix| text.strip_prefix(prefix))
            .map(|rest| Path::new(&home).join(rest))
            .unwrap_or_else(|| path.to_path_buf()),
        None => path.to_path_buf(),
    };
    if expanded.is_absolute() {
        return expanded;
    }
    match std::env::current_dir() {
        Ok(current) => current.join(expanded),
        Err(_) => expanded,
    }
}

/// Form fields that the upload request sets itself, besides the configured
/// names of the archive part and the session field.
const RESERVED_FIELDS: &[&str] = &["sha256", "size"];

fn resolve(
    raw: RawSettings,
    config_path: Option<PathBuf>,
    env: &impl Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Settings {
    let ms = |value: Option<u64>, default: u64| Duration::from_millis(value.unwrap_or(default));

    let on_success = match raw.on_success.as_deref() {
        None | Some("delete") => OnSuccess::Delete,
        Some("move") => OnSuccess::Move,
        Some(other) => {
            problems.push(format!(
                "on_success = {other:?} is invalid: use \"delete\" or \"move\""
            ));
            OnSuccess::Delete
        }
    };
    let log_format = match raw.log_format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            problems.push(format!(
                "log_format = {other:?} is invalid: use \"text\" or \"json\""
            ));
            LogFormat::Text
        }
    };
    let concurrency = match raw.concurrency {
        None => 2,
        Some(n) if (1..=256).contains(&n) => n as usize,
        Some(n) => {
            problems.push(format!(
                "concurrency = {n} is invalid: use a number from 1 to 256"
            ));
            2
        }
    };
    let backoff_multiplier = match raw.backoff_multiplier {
        None => 2.0,
        Some(m) if (1.0..=100.0).contains(&m) => m,
        Some(m) => {
            problems.push(format!(
                "backoff_multiplier = {m} is invalid: use a number from 1.0 to 100.0"
            ));
            2.0
        }
    };
    let include = raw.include.unwrap_or_else(|| "*.zip".to_string());
    if let Err(err) = crate::intake::IncludeMatcher::new(&include) {
        problems.push(format!("include = {include:?} is not a valid glob: {err}"));
    }
    if let Some(fields) = &raw.fields {
        let file_field = raw.file_field.as_deref().unwrap_or("file");
        let session_field = raw.session_field.as_deref().unwrap_or("session_id");
        for name in fields.keys() {
            if RESERVED_FIELDS.contains(&name.as_str())
                || name == file_field
                || name == session_field
            {
                problems.push(format!(
                    "fields.{name} is invalid: the upload request sets the field {name:?} itself; remove it from [fields]"
                ));
            }
        }
    }
    for (key, value) in [
        ("file_field", &raw.file_field),
        ("session_field", &raw.session_field),
    ] {
        if value
            .as_deref()
            .is_some_and(|v| v.is_empty() || v.contains(['"', '\r', '\n']))
        {
            problems.push(format!(
                "{key} is invalid: use a non-empty name without quotes or line breaks"
            ));
        }
    }

    let path = |value: Option<PathBuf>| value.map(|p| absolute_path(&p, env));
    let settings = Settings {
        config_path,
        outbox: path(raw.outbox).unwrap_or_else(|| {
            xdg_dir(env, "XDG_DATA_HOME", ".local/share").join("outboxd/outbox")
        }),
        state_dir: path(raw.state_dir)
            .unwrap_or_else(|| xdg_dir(env, "XDG_STATE_HOME", ".local/state").join("outboxd")),
        server_url: raw.server_url.filter(|url| !url.trim().is_empty()),
        token: TokenConfig {
            token_file: path(raw.token_file),
            token_env: raw.token_env.unwrap_or_else(|| "OUTBOXD_TOKEN".to_string()),
        },
        concurrency,
        on_success,
        include,
        settle: ms(raw.settle_ms, 1000),
        reject_after: ms(raw.reject_after_ms, 60_000),
        rescan: ms(raw.rescan_ms, 60_000).max(Duration::from_millis(100)),
        backoff_initial: ms(raw.backoff_initial_ms, 2000).max(Duration::from_millis(1)),
        backoff_multiplier,
        backoff_max: ms(raw.backoff_max_ms, 300_000).max(Duration::from_millis(1)),
        unreachable_max: ms(raw.unreachable_max_ms, 60_000).max(Duration::from_millis(1)),
        auth_probe: ms(raw.auth_probe_ms, 300_000).max(Duration::from_millis(100)),
        retry_after_max: ms(raw.retry_after_max_ms, 3_600_000),
        shutdown_grace: ms(raw.shutdown_grace_ms, 5000),
        uploaded_retention: ms(raw.uploaded_retention_ms, 7 * 24 * 3_600_000),
        connect_timeout: ms(raw.connect_timeout_ms, 10_000).max(Duration::from_millis(1)),
        read_timeout: ms(raw.read_timeout_ms, 60_000).max(Duration::from_millis(1)),
        fields: raw.fields.unwrap_or_default(),
        file_field: raw.file_field.unwrap_or_else(|| "file".to_string()),
        session_field: raw
            .session_field
            .unwrap_or_else(|| "session_id".to_string()),
        allow_insecure_http: raw.allow_insecure_http.unwrap_or(false),
        ca_file: path(raw.ca_file),
        log_format,
    };
    if let Err(problem) = crate::upload::check_server_url(&settings) {
        problems.push(problem);
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn defaults_follow_xdg() {
        let loaded = load(None, RawSettings::default(), env_of(&[("HOME", "/home/u")]));
        let s = loaded.settings;
        assert_eq!(
            s.outbox,
            PathBuf::from("/home/u/.local/share/outboxd/outbox")
        );
        assert_eq!(s.state_dir, PathBuf::from("/home/u/.local/state/outboxd"));
        assert_eq!(s.concurrency, 2);
        assert_eq!(s.settle, Duration::from_millis(1000));
        assert_eq!(s.token.token_env, "OUTBOXD_TOKEN");
    }

    #[test]
    fn flags_win_over_env_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(
            &file,
            "server_url = \"http://127.0.0.1:1/file\"\nconcurrency = 3\nsettle_ms = 10\n[fields]\nsite = \"lab\"\n",
        )
        .unwrap();
        let env = env_of(&[
            ("HOME", "/h"),
            ("OUTBOXD_CONCURRENCY", "5"),
            ("OUTBOXD_SETTLE_MS", "20"),
        ]);
        let flags = RawSettings {
            settle_ms: Some(30),
            ..Default::default()
        };
        let loaded = load(Some(&file), flags, env);
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        assert_eq!(
            loaded.settings.server_url.as_deref(),
            Some("http://127.0.0.1:1/file")
        );
        assert_eq!(loaded.settings.concurrency, 5);
        assert_eq!(loaded.settings.settle, Duration::from_millis(30));
        assert_eq!(
            loaded.settings.fields.get("site").map(String::as_str),
            Some("lab")
        );
    }

    #[test]
    fn unknown_key_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "server-url = \"http://127.0.0.1/\"\n").unwrap();
        let loaded = load(
            Some(&file),
            RawSettings::default(),
            env_of(&[("HOME", "/h")]),
        );
        assert!(
            loaded.problems.iter().any(|p| p.contains("server-url")),
            "{:?}",
            loaded.problems
        );
    }

    #[test]
    fn bad_env_value_names_variable() {
        let env = env_of(&[("HOME", "/h"), ("OUTBOXD_CONCURRENCY", "two")]);
        let loaded = load(None, RawSettings::default(), env);
        assert!(
            loaded
                .problems
                .iter()
                .any(|p| p.contains("OUTBOXD_CONCURRENCY")),
            "{:?}",
            loaded.problems
        );
    }

    #[test]
    fn missing_explicit_config_is_a_problem() {
        let loaded = load(
            Some(Path::new("/nonexistent/outboxd.toml")),
            RawSettings::default(),
            env_of(&[]),
        );
        assert!(loaded
            .problems
            .iter()
            .any(|p| p.contains("/nonexistent/outboxd.toml")));
    }

    #[test]
    fn paths_expand_home_and_become_absolute() {
        let env = env_of(&[("HOME", "/home/u")]);
        let cwd = std::env::current_dir().unwrap();
        let cases: &[(&str, PathBuf)] = &[
            ("~/outbox", PathBuf::from("/home/u/outbox")),
            ("$HOME/state", PathBuf::from("/home/u/state")),
            ("${HOME}/t", PathBuf::from("/home/u/t")),
            ("~", PathBuf::from("/home/u")),
            ("/abs/path", PathBuf::from("/abs/path")),
            ("rel/dir", cwd.join("rel/dir")),
            ("~user/x", cwd.join("~user/x")),
        ];
        for (input, expected) in cases {
            assert_eq!(&absolute_path(Path::new(input), &env), expected, "{input}");
        }
    }

    #[test]
    fn one_bad_env_value_keeps_others() {
        let env = env_of(&[
            ("HOME", "/h"),
            ("OUTBOXD_SETTLE_MS", "-5"),
            ("OUTBOXD_SERVER_URL", "http://127.0.0.1:9/upload"),
        ]);
        let loaded = load(None, RawSettings::default(), env);
        assert_eq!(
            loaded.settings.server_url.as_deref(),
            Some("http://127.0.0.1:9/upload")
        );
        assert_eq!(loaded.problems.len(), 1, "{:?}", loaded.problems);
        assert!(
            loaded.problems[0].contains("OUTBOXD_SETTLE_MS"),
            "{:?}",
            loaded.problems
        );
    }

    #[test]
    fn reserved_field_names_are_problems() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(
            &file,
            "server_url = \"http://127.0.0.1:1/\"\nsession_field = \"sid\"\n[fields]\nsid = \"x\"\nsha256 = \"y\"\ntenant = \"lab\"\n",
        )
        .unwrap();
        let loaded = load(
            Some(&file),
            RawSettings::default(),
            env_of(&[("HOME", "/h")]),
        );
        for name in ["fields.sid", "fields.sha256"] {
            assert!(
                loaded.problems.iter().any(|p| p.contains(name)),
                "{name}: {:?}",
                loaded.problems
            );
        }
        assert!(
            !loaded.problems.iter().any(|p| p.contains("tenant")),
            "{:?}",
            loaded.problems
        );
    }

    #[test]
    fn unknown_key_keeps_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(
            &file,
            "outbox = \"/srv/outbox\"\nserverurl = \"oops\"\nconcurrency = \"two\"\nsettle_ms = 50\n",
        )
        .unwrap();
        let loaded = load(
            Some(&file),
            RawSettings::default(),
            env_of(&[("HOME", "/h")]),
        );
        assert_eq!(loaded.settings.outbox, PathBuf::from("/srv/outbox"));
        assert_eq!(loaded.settings.settle, Duration::from_millis(50));
        assert!(
            loaded.problems.iter().any(|p| p.contains("\"serverurl\"")),
            "{:?}",
            loaded.problems
        );
        assert!(
            loaded
                .problems
                .iter()
                .any(|p| p.contains("\"concurrency\"")),
            "{:?}",
            loaded.problems
        );
    }
}
