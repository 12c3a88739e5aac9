//! `outboxd retry`: requests that the running daemon clear backoff and probe a
//! hold now, and with `--rejected`, put the files in `rejected/` back in the queue.

use super::Locate;
use crate::control::{self, ClientError, Request};
use crate::daemon::RetryRequest;

/// `outboxd retry`. Returns 0, or 1 when the daemon is not running, an id is
/// unknown, or the request failed.
pub async fn retry(locate: Locate, ids: Vec<u64>, rejected: bool) -> i32 {
    let settings = locate.load_warning();
    let request = Request::Retry(RetryRequest { ids, rejected });
    let result = match control::request(&settings.state_dir, &request).await {
        Ok(reply) => reply.retry.unwrap_or_default(),
        Err(ClientError::NotRunning(path)) => {
            eprintln!(
                "error: the daemon is not running (no control socket answers at {path}), so there is nothing to wake; \
                 start it with `systemctl --user start outboxd` or `outboxd run`, then run `outboxd retry` again"
            );
            return 1;
        }
        Err(err) => {
            eprintln!("error: {err}");
            return 1;
        }
    };
    if result.cleared > 0 || result.unknown_ids.is_empty() {
        println!("cleared the backoff of {} item(s)", result.cleared);
    }
    if rejected {
        println!(
            "moved {} file(s) from rejected/ back into the outbox, where they are queued again",
            result.requeued_rejected
        );
    }
    if result.probing {
        println!("the hold is probed now; see `outboxd status` for the result");
    }
    if !result.unknown_ids.is_empty() {
        let ids: Vec<String> = result.unknown_ids.iter().map(u64::to_string).collect();
        eprintln!(
            "error: no item with id {} in the queue; `outboxd list` shows the ids",
            ids.join(", ")
        );
        return 1;
    }
    0
}
