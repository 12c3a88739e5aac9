//! The daemon's shared state: the queue index, the auth and destination states,
//! the uploads in flight, and every transition between them. Upload results,
//! intake, signals and control requests all change the daemon through here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::Settings;
use crate::outcome::HoldKind;
use crate::queue::Queue;
use crate::retry::Schedule;
use crate::timefmt::now_ms;
use crate::token::{Token, TokenLookup};
use crate::upload::Uploader;

/// Maximum interval between reads of a missing or invalid token source.
const TOKEN_CHECK_MS: u64 = 5000;

/// Auth state, as `auth.state` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// No upload response since start or since the last token or config change.
    Unknown,
    Ok,
    Held(HoldKind),
}

/// Where a hold comes from, which decides what ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOrigin {
    /// The settings are invalid: only a reload ends it.
    Settings,
    /// The token source: a token change or a periodic look ends it.
    TokenSource,
    /// The server's response: a probe ends it.
    Server,
}

#[derive(Debug, Clone)]
pub struct AuthState {
    pub auth: Auth,
    pub origin: HoldOrigin,
    pub since: Option<u64>,
    pub detail: Option<String>,
    pub next_probe_at: Option<u64>,
}

/// Destination state, as `destination.state` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Unknown,
    Ok,
    Unreachable,
    Throttled,
}

impl Reach {
    pub fn as_str(self) -> &'static str {
        match self {
            Reach::Unknown => "unknown",
            Reach::Ok => "ok",
            Reach::Unreachable => "unreachable",
            Reach::Throttled => "throttled",
        }
    }
}

#[derive(Debug, Clone)]
pub struct DestinationState {
    pub reach: Reach,
    pub since: Option<u64>,
    /// No upload starts before this time (ms since the epoch).
    pub next_attempt_at: Option<u64>,
    pub last_error: Option<String>,
    /// Consecutive unreachable results, for the destination backoff.
    pub failures: u32,
}

/// One upload in flight, for `status`.
#[derive(Debug)]
pub struct InFlight {
    pub file: String,
    pub size: u64,
    pub bytes_sent: Arc<AtomicU64>,
}

/// The token as the daemon last read it.
#[derive(Debug, Clone)]
pub enum TokenState {
    Ready {
        token: Token,
        source: String,
        warnings: Vec<String>,
    },
    Missing(String),
    Invalid(String),
}

impl TokenState {
    pub fn from_lookup(lookup: TokenLookup) -> TokenState {
        match lookup {
            TokenLookup::Found {
                token,
                source,
                warnings,
            } => TokenState::Ready {
                token,
                source: source.to_string(),
                warnings,
            },
            TokenLookup::Missing(text) => TokenState::Missing(text),
            TokenLookup::Invalid(text) => TokenState::Invalid(text),
        }
    }

    pub fn token(&self) -> Option<&Token> {
        match self {
            TokenState::Ready { token, .. } => Some(token),
            _ => None,
        }
    }

    /// Returns a comparable summary of the token state, without the token itself.
    pub fn identity(&self) -> String {
        match self {
            TokenState::Ready { token, source, .. } => format!("{source} {}", token.fingerprint()),
            TokenState::Missing(text) | TokenState::Invalid(text) => text.clone(),
        }
    }
}

pub struct Core {
    pub settings: Arc<Settings>,
    pub config_problems: Vec<String>,
    pub uploader: Option<Uploader>,
    pub token: TokenState,
    pub queue: Queue,
    pub auth: AuthState,
    /// The server responded to an upload, without an auth fault, since the auth
    /// state last became unknown. This ends the one-at-a-time probing after a start.
    pub answered: bool,
    pub destination: DestinationState,
    pub uploads: HashMap<u64, InFlight>,
    /// A probe request without a file (the queue was empty) is in flight.
    pub bare_probe_in_flight: bool,
    pub last_success_at: Option<u64>,
    pub last_error: Option<String>,
    /// When `last_error` happened, in ms since the epoch.
    pub last_error_at: Option<u64>,
    /// The last transient failure logged at WARN, so that repeats log at DEBUG.
    pub last_logged_failure: Option<String>,
    pub shutting_down: bool,
}

impl Core {
    /// Milliseconds between reads of the token source while it is missing or
    /// invalid. A read sends nothing, so it runs more often than a server probe;
    /// the watcher usually notices a fix first.
    pub fn token_check_interval(&self) -> u64 {
        (self.settings.auth_probe.as_millis() as u64).min(TOKEN_CHECK_MS)
    }

    pub fn item_schedule(&self) -> Schedule {
        Schedule {
            initial: self.settings.backoff_initial,
            multiplier: self.settings.backoff_multiplier,
            max: self.settings.backoff_max,
        }
    }

    pub fn destination_schedule(&self) -> Schedule {
        Schedule {
            initial: self
                .settings
                .backoff_initial
                .min(self.settings.unreachable_max),
            multiplier: self.settings.backoff_multiplier,
            max: self.settings.unreachable_max,
        }
    }

    /// Sets the hold that the settings and the token source call for, or leaves
    /// a server hold in place. Returns true when the auth state changed.
    pub fn apply_local_holds(&mut self) -> bool {
        let local = if !self.config_problems.is_empty() {
            Some((
                HoldKind::ConfigError,
                HoldOrigin::Settings,
                self.config_problems.join("; "),
            ))
        } else {
            match &self.token {
                TokenState::Missing(text) => Some((
                    HoldKind::TokenMissing,
                    HoldOrigin::TokenSource,
                    text.clone(),
                )),
                TokenState::Invalid(text) => Some((
                    HoldKind::TokenInvalid,
                    HoldOrigin::TokenSource,
                    text.clone(),
                )),
                TokenState::Ready { .. } => None,
            }
        };
        match local {
            Some((kind, origin, detail)) => self.hold(kind, origin, detail),
            None if self.auth.origin != HoldOrigin::Server
                && matches!(self.auth.auth, Auth::Held(_)) =>
            {
                self.set_unknown(
                    "the token and settings are valid again; the next upload probes the server",
                );
                true
            }
            None => false,
        }
    }

    /// Puts the queue on hold. Logs once per change of kind or detail.
    pub fn hold(&mut self, kind: HoldKind, origin: HoldOrigin, detail: String) -> bool {
        let now = now_ms();
        let changed =
            self.auth.auth != Auth::Held(kind) || self.auth.detail.as_deref() != Some(&detail);
        let next_probe_at = match origin {
            HoldOrigin::Settings => None,
            HoldOrigin::TokenSource => Some(now + self.token_check_interval()),
            HoldOrigin::Server => Some(now + self.settings.auth_probe.as_millis() as u64),
        };
        if changed {
            tracing::error!(state = kind.as_str(), "uploads are on hold: {detail}");
            if self.auth.auth != Auth::Held(kind) {
                self.auth.since = Some(now);
            }
            self.last_error = Some(detail.clone());
            self.last_error_at = Some(now);
        }
        self.auth.auth = Auth::Held(kind);
        self.auth.origin = origin;
        self.auth.detail = Some(detail);
        self.auth.next_probe_at = next_probe_at;
        self.answered = false;
        changed
    }

    /// Ends a hold: the next upload is a probe.
    pub fn set_unknown(&mut self, why: &str) {
        if let Auth::Held(kind) = self.auth.auth {
            tracing::info!(previous = kind.as_str(), "hold lifted: {why}");
        }
        self.auth = AuthState {
            auth: Auth::Unknown,
            origin: HoldOrigin::Server,
            since: Some(now_ms()),
            detail: None,
            next_probe_at: None,
        };
        self.answered = false;
    }

    /// Records a server response that was not an auth fault.
    pub fn note_answer(&mut self, uploaded: bool) {
        self.answered = true;
        self.note_reached();
        if uploaded {
            if self.auth.auth != Auth::Ok {
                match self.auth.auth {
                    Auth::Held(kind) => tracing::info!(
                        previous = kind.as_str(),
                        "the probe upload succeeded; the hold is over and the queue drains"
                    ),
                    _ => tracing::info!("the server accepted an upload; auth ok"),
                }
                self.auth = AuthState {
                    auth: Auth::Ok,
                    origin: HoldOrigin::Server,
                    since: Some(now_ms()),
                    detail: None,
                    next_probe_at: None,
                };
            }
            self.last_success_at = Some(now_ms());
        }
    }

    /// Records that the server responded at all.
    pub fn note_reached(&mut self) {
        let now = now_ms();
        match self.destination.reach {
            Reach::Ok => {}
            Reach::Throttled if self.destination.next_attempt_at.is_some_and(|at| at > now) => {}
            previous => {
                if previous == Reach::Unreachable {
                    tracing::info!("the server is reachable again");
                }
                self.destination = DestinationState {
                    reach: Reach::Ok,
                    since: Some(now),
                    next_attempt_at: None,
                    last_error: None,
                    failures: 0,
                };
            }
        }
    }

    /// Backs the whole destination off after a failure to reach the server.
    pub fn note_unreachable(&mut self, detail: &str) {
        let now = now_ms();
        self.destination.failures = self.destination.failures.saturating_add(1);
        let delay = self.destination_schedule().delay(self.destination.failures);
        if self.destination.reach != Reach::Unreachable {
            tracing::warn!(delay_ms = delay.as_millis() as u64, error = %detail, "the server cannot be reached; all uploads wait");
            self.destination.since = Some(now);
        } else {
            tracing::debug!(delay_ms = delay.as_millis() as u64, error = %detail, "the server is still unreachable");
        }
        self.destination.reach = Reach::Unreachable;
        self.destination.next_attempt_at = Some(now + delay.as_millis() as u64);
        self.destination.last_error = Some(detail.to_string());
        self.last_error = Some(format!("server unreachable: {detail}"));
        self.last_error_at = Some(now);
    }

    /// Pauses the whole destination for a server's `Retry-After`.
    pub fn note_throttled(&mut self, pause: std::time::Duration, detail: &str) {
        let now = now_ms();
        let until = now + pause.as_millis() as u64;
        if self.destination.reach != Reach::Throttled
            || self.destination.next_attempt_at.is_none_or(|at| at < until)
        {
            tracing::warn!(delay_ms = pause.as_millis() as u64, error = %detail, "the server asked to wait (Retry-After); all uploads pause");
        }
        if self.destination.reach != Reach::Throttled {
            self.destination.since = Some(now);
        }
        self.destination.reach = Reach::Throttled;
        self.destination.next_attempt_at =
            Some(self.destination.next_attempt_at.unwrap_or(0).max(until));
        self.destination.last_error = Some(detail.to_string());
    }

    /// Bytes sent so far of each upload in flight.
    pub fn upload_progress(&self) -> Vec<(u64, String, u64, u64)> {
        let mut rows: Vec<_> = self
            .uploads
            .iter()
            .map(|(id, f)| {
                (
                    *id,
                    f.file.clone(),
                    f.bytes_sent.load(Ordering::Relaxed),
                    f.size,
                )
            })
            .collect();
        rows.sort();
        rows
    }
}
