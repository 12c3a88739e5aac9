//! Classification of an upload's result into the outcome classes that decide
//! what happens next: the whole mapping from HTTP status or transport error to
//! class is in `classify_response` and `classify_error`.

use std::error::Error as StdError;
use std::time::{Duration, SystemTime};

/// The cause of a hold of the whole queue. Names match `auth.state` in `status --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldKind {
    TokenMissing,
    TokenInvalid,
    TokenRejected,
    Forbidden,
    ConfigError,
}

impl HoldKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldKind::TokenMissing => "token_missing",
            HoldKind::TokenInvalid => "token_invalid",
            HoldKind::TokenRejected => "token_rejected",
            HoldKind::Forbidden => "forbidden",
            HoldKind::ConfigError => "config_error",
        }
    }
}

/// The result class of an upload attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server has the file (2xx, or 409 for a duplicate).
    Uploaded { status: u16 },
    /// The whole queue holds; the text names the cause and the fix.
    Hold { kind: HoldKind, detail: String },
    /// The item backs off. `pause` is a server's Retry-After, which pauses the
    /// whole destination.
    Transient {
        detail: String,
        pause: Option<Duration>,
    },
    /// The server could not be reached; the destination backs off and the item
    /// is not charged an attempt.
    Unreachable { detail: String },
    /// The server refused this file; it goes to `rejected/` with this reason.
    Rejected { reason: String },
}

/// Maximum characters of a response body quoted in a reason.
pub const BODY_EXCERPT_CHARS: usize = 200;

/// Classifies an HTTP response. `body` is the start of the response body,
/// `retry_after_max` caps a server's `Retry-After`.
pub fn classify_response(
    status: u16,
    reason: &str,
    retry_after: Option<&str>,
    location: Option<&str>,
    body: &str,
    retry_after_max: Duration,
    now: SystemTime,
) -> Outcome {
    let line = format!("HTTP {status} {reason}");
    let excerpt = excerpt(body);
    match status {
        200..=299 | 409 => Outcome::Uploaded { status },
        401 => Outcome::Hold {
            kind: HoldKind::TokenRejected,
            detail: format!("the server rejected the token ({line}); check that the token is the upload token the server expects"),
        },
        403 => Outcome::Hold {
            kind: HoldKind::Forbidden,
            detail: format!("the server accepted the token but refused the upload ({line}); the token lacks upload permission, so use a token that may write"),
        },
        300..=399 => Outcome::Hold {
            kind: HoldKind::ConfigError,
            detail: format!(
                "the server answered with a redirect ({line}{}), which is not followed so that the token goes nowhere else; set server_url to the final upload URL",
                location.map(|l| format!(" to {l}")).unwrap_or_default()
            ),
        },
        404 | 405 => Outcome::Hold {
            kind: HoldKind::ConfigError,
            detail: format!("the server has no upload endpoint at server_url ({line}); fix server_url"),
        },
        407 => Outcome::Hold {
            kind: HoldKind::ConfigError,
            detail: format!(
                "a proxy between this machine and server_url requires authentication ({line}); \
                 configure the proxy (HTTPS_PROXY, NO_PROXY) or reach server_url without it"
            ),
        },
        408 | 425 | 429 | 500 | 502 | 503 | 504 => {
            let pause = if matches!(status, 429 | 503) {
                retry_after.and_then(|value| parse_retry_after(value, now)).map(|d| d.min(retry_after_max))
            } else {
                None
            };
            let mut detail = line;
            if !excerpt.is_empty() {
                detail = format!("{detail}: {excerpt}");
            }
            Outcome::Transient { detail, pause }
        }
        _ => {
            let mut reason = line;
            if !excerpt.is_empty() {
                reason = format!("{reason}: {excerpt}");
            }
            Outcome::Rejected { reason }
        }
    }
}

/// Classifies a transport error: a certificate problem is a config hold,
/// everything else means the server could not be reached.
pub fn classify_error(error: &(dyn StdError + 'static)) -> Outcome {
    let chain = error_chain(error);
    if is_certificate_error(&chain) {
        return Outcome::Hold {
            kind: HoldKind::ConfigError,
            detail: format!(
                "the server's TLS certificate is not trusted: {chain}; set ca_file to the CA that signed it, or fix the certificate"
            ),
        };
    }
    Outcome::Unreachable { detail: chain }
}

/// Joins an error and its sources into one line, skipping repeats, so that the
/// real cause (often several layers down in reqwest and hyper) is shown.
pub fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(err) = current {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = err.source();
    }
    parts.join(": ")
}

/// rustls reports certificate verification failures as "invalid peer
/// certificate: ..." (rustls 0.23); webpki's and rustls's other texts name the
/// certificate too. Handshake failures unrelated to the certificate do not.
fn is_certificate_error(chain: &str) -> bool {
    let lower = chain.to_ascii_lowercase();
    lower.contains("invalid peer certificate")
        || lower.contains("unknownissuer")
        || lower.contains("certificate expired")
        || lower.contains("certnotvalidforname")
        || lower.contains("notvalidforname")
        || lower.contains("self-signed")
        || lower.contains("certificate verify failed")
}

/// Parses `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Returns the start of a response body on one line, for reasons and logs.
pub fn excerpt(body: &str) -> String {
    let flat: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(BODY_EXCERPT_CHARS)
        .collect();
    let flat = flat.split_whitespace().collect::<Vec<_>>().join(" ");
    if body.chars().count() > BODY_EXCERPT_CHARS {
        format!("{flat}...")
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn classify(status: u16, retry_after: Option<&str>) -> Outcome {
        classify_response(
            status,
            "Reason",
            retry_after,
            None,
            "body text",
            HOUR,
            SystemTime::UNIX_EPOCH,
        )
    }

    fn class(outcome: &Outcome) -> &'static str {
        match outcome {
            Outcome::Uploaded { .. } => "uploaded",
            Outcome::Hold { kind, .. } => kind.as_str(),
            Outcome::Transient { .. } => "transient",
            Outcome::Unreachable { .. } => "unreachable",
            Outcome::Rejected { .. } => "rejected",
        }
    }

    #[test]
    fn status_table() {
        let cases: &[(u16, &str)] = &[
            (200, "uploaded"),
            (201, "uploaded"),
            (204, "uploaded"),
            (409, "uploaded"),
            (401, "token_rejected"),
            (403, "forbidden"),
            (301, "config_error"),
            (302, "config_error"),
            (307, "config_error"),
            (308, "config_error"),
            (404, "config_error"),
            (405, "config_error"),
            (407, "config_error"),
            (408, "transient"),
            (425, "transient"),
            (429, "transient"),
            (500, "transient"),
            (502, "transient"),
            (503, "transient"),
            (504, "transient"),
            (400, "rejected"),
            (413, "rejected"),
            (415, "rejected"),
            (422, "rejected"),
            (501, "rejected"),
        ];
        for (status, expected) in cases {
            assert_eq!(
                class(&classify(*status, None)),
                *expected,
                "status {status}"
            );
        }
    }

    #[test]
    fn retry_after_seconds_pauses() {
        match classify(503, Some("3")) {
            Outcome::Transient { pause, .. } => assert_eq!(pause, Some(Duration::from_secs(3))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_date_pauses() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let date = httpdate::fmt_http_date(now + Duration::from_secs(120));
        let outcome = classify_response(429, "Too Many Requests", Some(&date), None, "", HOUR, now);
        match outcome {
            Outcome::Transient { pause, .. } => assert_eq!(pause, Some(Duration::from_secs(120))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_is_capped() {
        match classify(429, Some("999999")) {
            Outcome::Transient { pause, .. } => assert_eq!(pause, Some(HOUR)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_ignored_on_500() {
        match classify(500, Some("3")) {
            Outcome::Transient { pause, .. } => assert_eq!(pause, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejected_reason_quotes_body() {
        let outcome = classify_response(
            400,
            "Bad Request",
            None,
            None,
            "missing\nfield",
            HOUR,
            SystemTime::now(),
        );
        assert_eq!(
            outcome,
            Outcome::Rejected {
                reason: "HTTP 400 Bad Request: missing field".into()
            }
        );
    }

    #[test]
    fn certificate_error_is_config_hold() {
        let inner = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        let outer = std::io::Error::other(inner);
        assert_eq!(class(&classify_error(&outer)), "config_error");
    }

    #[test]
    fn connection_refused_is_unreachable() {
        let err = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(class(&classify_error(&err)), "unreachable");
    }

    #[test]
    fn excerpt_is_bounded() {
        let long = "x".repeat(1000);
        assert!(excerpt(&long).chars().count() <= BODY_EXCERPT_CHARS + 3);
    }
}
