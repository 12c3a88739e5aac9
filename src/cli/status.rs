//! `outboxd status`: through the control socket when the daemon runs, or
//! from the state dir when it does not.

use std::time::SystemTime;

use super::offline::offline_report;
use super::Locate;
use crate::control::{self, ClientError, Request};
use crate::status;

/// `outboxd status`. Returns the exit code of `status::exit_code`, or 1.
pub async fn status(locate: Locate, json: bool) -> i32 {
    let loaded = locate.load(None);
    let report = match control::request(&loaded.settings.state_dir, &Request::Status).await {
        Ok(reply) => match reply.status {
            Some(report) => report,
            None => {
                eprintln!("error: the daemon's reply has no status");
                return 1;
            }
        },
        Err(ClientError::NotRunning(_)) => offline_report(&loaded.settings),
        Err(err) => {
            eprintln!("error: {err}");
            return 1;
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("error: encoding the status failed: {err}");
                return 1;
            }
        }
    } else {
        print!("{}", status::render_text(&report, SystemTime::now()));
    }
    status::exit_code(&report, SystemTime::now())
}
