//! The upload token: where it is read from, what makes it invalid, and the
//! `Token` type that keeps its value out of logs, errors and panics.
//!
//! Sources are tried in a fixed order and the first hit wins: the configured
//! `token_file`, then `$CREDENTIALS_DIRECTORY/outboxd-token` (systemd
//! `LoadCredential=`), then the environment variable named by `token_env`.

use std::borrow::Cow;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// File name of the token under systemd's `$CREDENTIALS_DIRECTORY`.
pub const CREDENTIAL_NAME: &str = "outboxd-token";

/// Largest token file that is read. Bearer tokens, JWTs included, are far
/// smaller, and the limit keeps a wrong path, such as a log file, from being
/// read whole.
const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

/// Text that replaces the token wherever it must not appear.
const REDACTED: &str = "<redacted>";

/// A bearer token. `Debug` and `Display` print a placeholder, so that the value
/// cannot reach a log line or a panic message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Returns the token for the `Authorization` header. Call it only there.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Returns the first 8 hex digits of the SHA-256 of the token, which lets an
    /// operator compare tokens without showing them.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.0.as_bytes());
        hex::encode(&digest[..4])
    }

    /// Replaces every occurrence of the token in `text`, such as a server's
    /// response body that echoes the request headers, with a placeholder.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if text.contains(self.0.as_str()) {
            Cow::Owned(text.replace(self.0.as_str(), REDACTED))
        } else {
            Cow::Borrowed(text)
        }
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The source of a token, for messages that must name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    File(PathBuf),
    Credential(PathBuf),
    Env(String),
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::File(path) => write!(f, "token file {}", path.display()),
            TokenSource::Credential(path) => write!(f, "systemd credential {}", path.display()),
            TokenSource::Env(name) => write!(f, "{}", describe_env_variable(name)),
        }
    }
}

/// Names the environment variable of `token_env` for a message. A name that
/// is not in the usual form of upper-case letters, digits and `_` may be the
/// token itself, pasted into `token_env` by mistake, so it is not shown.
// NOTE: a token made only of upper-case letters, digits and `_` still looks
// like a variable name and is shown.
fn describe_env_variable(name: &str) -> String {
    let usual = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_uppercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if usual {
        format!("environment variable {name}")
    } else {
        "the environment variable named by token_env (its name is not shown because it is not \
         in upper case and could be a token)"
            .to_string()
    }
}

/// True for a name that a shell can export: ASCII letters, digits and `_`,
/// not starting with a digit.
fn is_env_name(name: &str) -> bool {
    name.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The outcome of a token lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenLookup {
    Found {
        token: Token,
        source: TokenSource,
        /// Problems that do not stop the upload, such as a group-readable file.
        warnings: Vec<String>,
    },
    /// No source has a token. The text lists the sources that were tried.
    Missing(String),
    /// A source has a value that cannot be a token. The text names the source and
    /// the problem, never the value.
    Invalid(String),
}

/// Configured token sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    pub token_file: Option<PathBuf>,
    pub token_env: String,
}

/// Looks the token up in the order of the module docs. `credentials_dir` and
/// `env` are passed in so that tests can supply them.
pub fn lookup(
    config: &TokenConfig,
    credentials_dir: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
) -> TokenLookup {
    if let Some(path) = &config.token_file {
        // An explicit token file is never skipped in favour of other sources: a
        // missing file is a deployment fault that the operator must see.
        return read_file_source(path, TokenSource::File(path.clone()));
    }
    if let Some(dir) = credentials_dir {
        let path = dir.join(CREDENTIAL_NAME);
        if path.exists() {
            return read_file_source(&path, TokenSource::Credential(path.clone()));
        }
    }
    if !is_env_name(&config.token_env) {
        // The value is not shown: a token pasted into token_env lands here.
        return TokenLookup::Invalid(
            "token_env is not a valid environment variable name (letters, digits and _, not \
             starting with a digit); set it to the name of the variable that holds the token, \
             not to the token itself"
                .to_string(),
        );
    }
    match env(&config.token_env) {
        Some(value) => {
            let source = TokenSource::Env(config.token_env.clone());
            match validate(&value) {
                Ok(token) => TokenLookup::Found {
                    token,
                    source,
                    warnings: Vec::new(),
                },
                Err(problem) => {
                    TokenLookup::Invalid(format!("the token in {source} is invalid: {problem}"))
                }
            }
        }
        None => {
            let credential = match credentials_dir {
                Some(dir) => format!("{} does not exist", dir.join(CREDENTIAL_NAME).display()),
                None => "CREDENTIALS_DIRECTORY is not set".to_string(),
            };
            let variable = describe_env_variable(&config.token_env);
            TokenLookup::Missing(format!(
                "no token configured: token_file is not set, {credential}, and {variable} is not \
                 set; set token_file, or that variable (its name is set by token_env)"
            ))
        }
    }
}

/// Looks the token up with the process environment.
pub fn lookup_from_process(config: &TokenConfig) -> TokenLookup {
    let credentials_dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    lookup(config, credentials_dir.as_deref(), |name| {
        std::env::var(name).ok()
    })
}

fn read_file_source(path: &Path, source: TokenSource) -> TokenLookup {
    let unreadable = |err: std::io::Error| {
        TokenLookup::Invalid(format!(
            "{source} cannot be read: {err}; make it readable by this user (mode 0600)"
        ))
    };
    // O_NONBLOCK keeps a fifo at the path from blocking the daemon, and the
    // fifo is then rejected as not a regular file. Symbolic links are followed,
    // because deployments swap the token through one.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return TokenLookup::Missing(format!(
                "{source} does not exist; create it with the upload token (mode 0600), \
                 uploads start within seconds of it appearing"
            ));
        }
        Err(err) => return unreadable(err),
    };

    match file.metadata() {
        Ok(metadata) if metadata.is_file() => {}
        Ok(_) => {
            return TokenLookup::Invalid(format!(
                "{source} is not a regular file; point it at a file that contains only the token"
            ))
        }
        Err(err) => return unreadable(err),
    }

    let mut bytes = Vec::new();
    if let Err(err) = file.take(MAX_TOKEN_FILE_BYTES + 1).read_to_end(&mut bytes) {
        return unreadable(err);
    }
    if bytes.len() as u64 > MAX_TOKEN_FILE_BYTES {
        return TokenLookup::Invalid(format!(
            "{source} is larger than {MAX_TOKEN_FILE_BYTES} bytes, so it is not a token file; \
             point it at a file that contains only the token"
        ));
    }
    let Ok(text) = String::from_utf8(bytes) else {
        return TokenLookup::Invalid(format!(
            "the token in {source} is invalid: it is not valid UTF-8"
        ));
    };
    match validate(&text) {
        Ok(token) => TokenLookup::Found {
            token,
            warnings: permission_warnings(path),
            source,
        },
        Err(problem) => {
            TokenLookup::Invalid(format!("the token in {source} is invalid: {problem}"))
        }
    }
}

/// Warns about a token file that other users can read or that another user owns.
pub fn permission_warnings(path: &Path) -> Vec<String> {
    let mut warnings = Vec::new();
    let Ok(metadata) = std::fs::metadata(path) else {
        return warnings;
    };
    let mode = metadata.mode() & 0o777;
    if mode & 0o077 != 0 {
        warnings.push(format!(
            "token file {} has mode {mode:04o}, so other users can read it; run chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if metadata.uid() != uid {
        warnings.push(format!(
            "token file {} is owned by uid {}, not by this user (uid {uid}); another user can change the token",
            path.display(),
            metadata.uid()
        ));
    }
    warnings
}

/// Checks the syntax of a token value after trimming surrounding spaces, tabs
/// and newlines. The error names the problem, never the value.
pub fn validate(raw: &str) -> Result<Token, &'static str> {
    let value = raw.trim_matches([' ', '\t', '\n']);
    if value.is_empty() {
        return Err("it is empty");
    }
    if value.contains('\r') {
        return Err(
            "it contains a carriage return (a CRLF line ending); save it with Unix line endings",
        );
    }
    if value.contains('\n') {
        return Err("it has several lines; write only the token, on one line");
    }
    if value.chars().any(char::is_control) {
        return Err("it contains a control character");
    }
    let quotes = ['"', '\''];
    if value.starts_with(quotes) || value.ends_with(quotes) {
        return Err("it is surrounded by quotes; write the bare token without quotes");
    }
    if value.starts_with("export ") || is_assignment(value) {
        return Err("it is a shell assignment (NAME=value); write only the token itself");
    }
    if has_variable_reference(value) {
        return Err("it contains a $NAME or ${NAME} reference, which is not expanded; write the token itself");
    }
    if value.chars().any(char::is_whitespace) {
        return Err("it contains whitespace");
    }
    // Bearer tokens are ASCII (RFC 6750, section 2.1). A byte order mark that
    // an editor put in front of the token is the usual cause.
    if !value.is_ascii() {
        return Err("it contains a non-ASCII character, such as a byte order mark; save the token as plain ASCII text");
    }
    Ok(Token(value.to_string()))
}

/// `NAME=value` where NAME looks like a shell variable name. Tokens from most
/// issuers are base64 or hex and may end in `=` padding, which this does not match.
fn is_assignment(value: &str) -> bool {
    let Some((name, rest)) = value.split_once('=') else {
        return false;
    };
    !rest.is_empty()
        && !name.is_empty()
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.chars().any(|c| c.is_ascii_uppercase() || c == '_')
        && name.chars().all(|c| !c.is_ascii_lowercase())
}

fn has_variable_reference(value: &str) -> bool {
    let bytes = value.as_bytes();
    bytes.iter().enumerate().any(|(i, &b)| {
        b == b'$'
            && bytes
                .get(i + 1)
                .is_some_and(|&next| next == b'{' || next.is_ascii_alphabetic() || next == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_table() {
        let cases: &[(&str, bool)] = &[
            ("abc123", true),
            ("abc123\n", true),
            ("  abc123  \n", true),
            ("dGVzdA==", true),
            ("tok-en_1.2~x", true),
            ("", false),
            ("   \n", false),
            ("\"abc\"", false),
            ("'abc'", false),
            ("\"abc", false),
            ("abc'", false),
            ("export TOKEN=abc", false),
            ("OUTBOXD_TOKEN=abc", false),
            ("$TOKEN", false),
            ("${TOKEN}", false),
            ("abc$HOME", false),
            ("abc\r", false),
            ("abc\r\ndef", false),
            ("abc\ndef", false),
            ("ab\u{7}c", false),
            ("ab c", false),
        ];
        for (input, valid) in cases {
            assert_eq!(validate(input).is_ok(), *valid, "validate({input:?})");
        }
    }

    #[test]
    fn errors_never_contain_value() {
        for input in [
            "\"s3cr3t-value\"",
            "export X=s3cr3t-value",
            "s3cr3t-value$HOME",
            "s3cr3t-value\nx",
        ] {
            let problem = validate(input).unwrap_err();
            assert!(!problem.contains("s3cr3t"), "{problem}");
        }
    }

    #[test]
    fn debug_and_display_are_redacted() {
        let token = validate("s3cr3t-value").unwrap();
        assert!(!format!("{token:?}").contains("s3cr3t"));
        assert!(!format!("{token}").contains("s3cr3t"));
        assert_eq!(token.fingerprint().len(), 8);
    }

    #[test]
    fn configured_missing_file_is_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let config = TokenConfig {
            token_file: Some(dir.path().join("absent")),
            token_env: "T".into(),
        };
        let result = lookup(&config, None, |_| Some("from-env".into()));
        match result {
            TokenLookup::Missing(text) => assert!(text.contains("absent"), "{text}"),
            other => panic!("expected Missing, got {other:?}"),
        }
    }

    #[test]
    fn credential_wins_over_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CREDENTIAL_NAME), "from-credential\n").unwrap();
        let config = TokenConfig {
            token_file: None,
            token_env: "T".into(),
        };
        let result = lookup(&config, Some(dir.path()), |_| Some("from-env".into()));
        match result {
            TokenLookup::Found { token, source, .. } => {
                assert_eq!(token.expose(), "from-credential");
                assert!(matches!(source, TokenSource::Credential(_)));
            }
            other => panic!("expected Found, got {other:?}"),
        }
    }

    #[test]
    fn environment_invalid_names_variable() {
        let config = TokenConfig {
            token_file: None,
            token_env: "RPA_TOKEN_ADMIN".into(),
        };
        match lookup(&config, None, |_| Some("\"quoted\"".into())) {
            TokenLookup::Invalid(text) => {
                assert!(text.contains("RPA_TOKEN_ADMIN"), "{text}");
                assert!(!text.contains("quoted\""), "{text}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// Invalid token values, each with the part of the problem text that its
    /// message must contain. Every value contains `s3cr3t`, which no message may.
    const INVALID_CASES: &[(&str, &str)] = &[
        ("", "empty"),
        (" \t \n", "empty"),
        ("\"s3cr3t\"", "quotes"),
        ("'s3cr3t'", "quotes"),
        ("s3cr3t\"", "quotes"),
        ("export OUTBOXD_TOKEN=s3cr3t", "shell assignment"),
        ("OUTBOXD_TOKEN=s3cr3t", "shell assignment"),
        ("$s3cr3t", "$NAME"),
        ("${s3cr3t}", "$NAME"),
        ("s3cr3t$HOME", "$NAME"),
        ("s3cr3t\r\n", "carriage return"),
        ("s3cr3t\rx", "carriage return"),
        ("s3cr3t\u{1b}[0m", "control character"),
        ("s3cr3t\u{0}", "control character"),
        ("s3cr3t\nsecond-line", "several lines"),
        ("\u{feff}s3cr3t", "non-ASCII"),
        ("s3cr3t value", "whitespace"),
    ];

    fn expect_invalid(lookup: TokenLookup, input: &str) -> String {
        match lookup {
            TokenLookup::Invalid(text) => {
                assert!(!text.contains("s3cr3t"), "message shows the value: {text}");
                text
            }
            other => panic!("{input:?}: expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn invalid_token_file_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let config = TokenConfig {
            token_file: Some(path.clone()),
            token_env: "OUTBOXD_TOKEN".into(),
        };
        for (input, problem) in INVALID_CASES {
            std::fs::write(&path, input).unwrap();
            let text = expect_invalid(lookup(&config, None, |_| None), input);
            assert!(
                text.contains(&format!("token file {}", path.display())),
                "{input:?}: message does not name the file: {text}"
            );
            assert!(text.contains(problem), "{input:?}: {text}");
        }
    }

    #[test]
    fn invalid_credential_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CREDENTIAL_NAME);
        let config = TokenConfig {
            token_file: None,
            token_env: "OUTBOXD_TOKEN".into(),
        };
        for (input, problem) in INVALID_CASES {
            std::fs::write(&path, input).unwrap();
            let lookup = lookup(&config, Some(dir.path()), |_| Some("from-env".into()));
            let text = expect_invalid(lookup, input);
            assert!(
                text.contains(&format!("systemd credential {}", path.display())),
                "{input:?}: message does not name the credential: {text}"
            );
            assert!(text.contains(problem), "{input:?}: {text}");
        }
    }

    #[test]
    fn invalid_environment_table() {
        let config = TokenConfig {
            token_file: None,
            token_env: "RPA_TOKEN_ADMIN".into(),
        };
        for (input, problem) in INVALID_CASES {
            let lookup = lookup(&config, None, |name| {
                (name == "RPA_TOKEN_ADMIN").then(|| input.to_string())
            });
            let text = expect_invalid(lookup, input);
            assert!(
                text.contains("environment variable RPA_TOKEN_ADMIN"),
                "{input:?}: message does not name the variable: {text}"
            );
            assert!(text.contains(problem), "{input:?}: {text}");
        }
    }

    #[test]
    fn non_utf8_token_file_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, b"s3cr3t\xff\xfe").unwrap();
        let config = TokenConfig {
            token_file: Some(path),
            token_env: "OUTBOXD_TOKEN".into(),
        };
        let text = expect_invalid(lookup(&config, None, |_| None), "non-UTF-8");
        assert!(text.contains("UTF-8"), "{text}");
    }

    #[test]
    fn token_env_holding_token_is_not_shown() {
        for name in ["s3cr3t-abc.def", "s3cr3t/abc+def==", ""] {
            let config = TokenConfig {
                token_file: None,
                token_env: name.into(),
            };
            let text = expect_invalid(lookup(&config, None, |_| None), name);
            assert!(text.contains("token_env"), "{name:?}: {text}");
        }
        // A valid name that is not upper case is looked up but never shown.
        let config = TokenConfig {
            token_file: None,
            token_env: "ghp_s3cr3tAbCdEf0123".into(),
        };
        match lookup(&config, None, |_| None) {
            TokenLookup::Missing(text) => assert!(!text.contains("s3cr3t"), "{text}"),
            other => panic!("expected Missing, got {other:?}"),
        }
    }

    #[test]
    fn fifo_token_file_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: c_path is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let config = TokenConfig {
            token_file: Some(path),
            token_env: "OUTBOXD_TOKEN".into(),
        };
        // A blocking read of the fifo would hang this test.
        let text = expect_invalid(lookup(&config, None, |_| None), "fifo");
        assert!(text.contains("not a regular file"), "{text}");
    }

    #[test]
    fn oversized_token_file_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cr3t".repeat(20_000)).unwrap();
        let config = TokenConfig {
            token_file: Some(path),
            token_env: "OUTBOXD_TOKEN".into(),
        };
        let text = expect_invalid(lookup(&config, None, |_| None), "oversized");
        assert!(text.contains("larger than"), "{text}");
    }

    #[test]
    fn permission_warnings_table() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        for (mode, warned) in [(0o600, false), (0o400, false), (0o640, true), (0o604, true)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let warnings = permission_warnings(&path);
            assert_eq!(
                warnings.iter().any(|w| w.contains("chmod 600")),
                warned,
                "mode {mode:o}: {warnings:?}"
            );
        }
    }

    #[test]
    fn foreign_owner_is_warned() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: changing a file's owner needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let config = TokenConfig {
            token_file: Some(path),
            token_env: "OUTBOXD_TOKEN".into(),
        };
        match lookup(&config, None, |_| None) {
            TokenLookup::Found { warnings, .. } => assert!(
                warnings.iter().any(|w| w.contains("owned by uid 65534")),
                "{warnings:?}"
            ),
            other => panic!("expected Found, got {other:?}"),
        }
    }

    #[test]
    fn redact_replaces_every_occurrence() {
        let token = validate("s3cr3t-value").unwrap();
        assert_eq!(
            token.redact("Authorization: Bearer s3cr3t-value, again s3cr3t-value"),
            "Authorization: Bearer <redacted>, again <redacted>"
        );
        assert!(matches!(token.redact("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn missing_everywhere_is_missing() {
        let config = TokenConfig {
            token_file: None,
            token_env: "OUTBOXD_TOKEN".into(),
        };
        assert!(matches!(
            lookup(&config, None, |_| None),
            TokenLookup::Missing(_)
        ));
    }
}
