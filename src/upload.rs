//! The upload request. Being written.
use crate::config::Settings;

/// Checks `server_url` before any connection is made.
pub fn check_server_url(settings: &Settings) -> Result<(), String> {
    let _ = settings;
    Ok(())
}
