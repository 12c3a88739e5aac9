//! The systemd notify protocol (`sd_notify(3)`): readiness, status lines,
//! reloads, stops and watchdog pings. Every function does nothing unless
//! `NOTIFY_SOCKET` is set, as it is for a `Type=notify` unit.
//!
//! The sd-notify crate formats the messages. Sending is done here, because the
//! crate's `notify` blocks without limit when the service manager stops reading
//! and does not accept abstract socket addresses (`@name`).

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// Maximum time that one notification waits for room in the service manager's
/// socket buffer. A manager that stops reading costs a lost message, not a
/// stuck dispatcher.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Shortest watchdog ping interval, so that a tiny `WATCHDOG_USEC` cannot turn
/// the dispatcher into a busy loop.
const MIN_WATCHDOG_INTERVAL: Duration = Duration::from_millis(100);

/// Set after the first failed send, so that later failures (one per watchdog
/// ping) log at DEBUG instead of WARN.
static SEND_FAILED: AtomicBool = AtomicBool::new(false);

/// Sends READY=1 with a status line. Also ends a reload.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Sends RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC in microseconds),
/// which systemd 253 and later expect in the same message (`sd_notify(3)`).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(err) => {
            tracing::debug!(error = %err, "reading CLOCK_MONOTONIC failed; RELOADING=1 is sent without MONOTONIC_USEC");
            send(&[NotifyState::Reloading]);
        }
    }
}

/// Sends STOPPING=1 with a status line.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Sends a status line for `systemctl --user status`.
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// Sends WATCHDOG=1.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Returns how often to ping the watchdog: half of `WATCHDOG_USEC`, or `None`
/// when the unit has no watchdog or the watchdog belongs to another process
/// (`WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(MIN_WATCHDOG_INTERVAL))
}

fn send(states: &[NotifyState]) {
    let Some(address) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = format_message(states);
    if let Err(err) = send_to(&address, message.as_bytes()) {
        let socket = Path::new(&address).display();
        if SEND_FAILED.swap(true, Ordering::Relaxed) {
            tracing::debug!(socket = %socket, error = %err, "sending a notification to systemd failed");
        } else {
            tracing::warn!(socket = %socket, error = %err, "sending a notification to systemd failed; later failures log at DEBUG");
        }
    }
}

/// Formats one datagram: one `KEY=VALUE` assignment per line.
fn format_message(states: &[NotifyState]) -> String {
    states.iter().map(|state| format!("{state}\n")).collect()
}

/// Sends one datagram to `address`, a socket path or an abstract socket name
/// that starts with `@`.
fn send_to(address: &OsStr, message: &[u8]) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    socket.set_write_timeout(Some(SEND_TIMEOUT))?;
    let sent = match address.as_bytes().strip_prefix(b"@") {
        Some(name) => send_to_abstract(&socket, name, message)?,
        None => socket.send_to(message, Path::new(address))?,
    };
    if sent != message.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the notification was cut short",
        ));
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn send_to_abstract(socket: &UnixDatagram, name: &[u8], message: &[u8]) -> io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(message, &address)
}

#[cfg(not(target_os = "linux"))]
fn send_to_abstract(_socket: &UnixDatagram, _name: &[u8], _message: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket addresses exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(socket: &UnixDatagram) -> String {
        let mut buffer = [0u8; 4096];
        let len = socket.recv(&mut buffer).unwrap();
        String::from_utf8(buffer[..len].to_vec()).unwrap()
    }

    #[test]
    fn message_has_one_line_per_state() {
        let message = format_message(&[NotifyState::Ready, NotifyState::Status("3 pending")]);
        assert_eq!(message, "READY=1\nSTATUS=3 pending\n");
    }

    #[test]
    fn reloading_message_has_monotonic_time() {
        let now = NotifyState::monotonic_usec_now().unwrap();
        let message = format_message(&[NotifyState::Reloading, now]);
        let mut lines = message.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let usec = lines
            .next()
            .and_then(|line| line.strip_prefix("MONOTONIC_USEC="))
            .unwrap();
        assert!(usec.parse::<u64>().unwrap() > 0, "MONOTONIC_USEC={usec}");
    }

    #[test]
    fn send_to_socket_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let manager = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), b"WATCHDOG=1\n").unwrap();
        assert_eq!(received(&manager), "WATCHDOG=1\n");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn send_to_abstract_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("outboxd-test-notify-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let manager = UnixDatagram::bind_addr(&address).unwrap();
        send_to(OsStr::new(&format!("@{name}")), b"READY=1\n").unwrap();
        assert_eq!(received(&manager), "READY=1\n");
    }

    #[test]
    fn send_to_full_socket_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let _manager = UnixDatagram::bind(&path).unwrap();
        let started = std::time::Instant::now();
        // The test never reads `_manager`, so its queue fills and a send must fail
        // after SEND_TIMEOUT instead of blocking.
        let mut failure = None;
        for _ in 0..100_000 {
            if let Err(err) = send_to(path.as_os_str(), b"WATCHDOG=1\n") {
                failure = Some(err);
                break;
            }
        }
        assert!(
            failure.is_some(),
            "100000 sends to an unread socket all succeeded"
        );
        assert!(
            started.elapsed() < SEND_TIMEOUT * 10,
            "sending took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn send_to_missing_socket_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        assert!(send_to(path.as_os_str(), b"READY=1\n").is_err());
    }
}
