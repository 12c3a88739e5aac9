//! `outboxd retry`: wakes the running daemon through the control socket.

use super::Locate;
use crate::control::{self, ClientError, Request};

pub async fn retry(locate: Locate, ids: Vec<u64>, rejected: bool) -> i32 {
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
