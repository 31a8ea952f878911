//! systemd's service notifications (sd_notify(3)) for Type=notify units:
//! READY=1 once the daemon serves, a STATUS= line that says what it does,
//! WATCHDOG=1 pings at half of WatchdogSec, and STOPPING=1 at shutdown.
//! Outside systemd (no NOTIFY_SOCKET) it does nothing at all.

use std::net::Ipv4Addr;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::session::LinkState;

/// How often the status line is looked at for changes.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// Reports READY=1 and `status()` at once, then keeps STATUS= current and
/// pings the watchdog (if the unit has one) from this task of the daemon's
/// runtime, until `shutdown`; then reports STOPPING=1. Spawn it once the role
/// serves. The pings stop when the runtime stalls, so systemd restarts a
/// daemon whose event loop hangs.
pub async fn serve<F>(status: F, shutdown: CancellationToken)
where
    F: Fn() -> String + Send + 'static,
{
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let mut last = status();
    send(&[NotifyState::Ready, NotifyState::Status(&last)]);

    let mut status_ticks = interval(STATUS_EVERY);
    status_ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Without a watchdog this interval is never polled.
    let mut ping_ticks = interval(ping_interval(watchdog.unwrap_or(Duration::MAX)));
    ping_ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ping_ticks.tick(), if watchdog.is_some() => send(&[NotifyState::Watchdog]),
            _ = status_ticks.tick() => {
                let now = status();
                if now != last {
                    send(&[NotifyState::Status(&now)]);
                    last = now;
                }
            }
        }
    }
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The server's status line: "serving 3 peers on 0.0.0.0:2002".
pub fn server_status(peers: usize, listen: impl std::fmt::Display) -> String {
    let s = if peers == 1 { "" } else { "s" };
    format!("serving {peers} peer{s} on {listen}")
}

/// The client's status line for its link `state`: "connected to
/// HOST:PORT as ADDRESS/PREFIX".
pub fn client_status(state: LinkState, server: &str, granted: Option<(Ipv4Addr, u8)>) -> String {
    match (state, granted) {
        (LinkState::Connected, Some((address, prefix))) => {
            format!("connected to {server} as {address}/{prefix}")
        }
        (LinkState::Backoff, _) => format!("reconnecting to {server}"),
        (LinkState::Connected | LinkState::Connecting, _) => format!("connecting to {server}"),
    }
}

/// Half of the watchdog timeout, as sd_watchdog_enabled(3) advises.
fn ping_interval(watchdog: Duration) -> Duration {
    (watchdog / 2).clamp(Duration::from_millis(1), Duration::from_secs(3600))
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        // Only the first failure is worth a warning; the socket rarely heals.
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)"));
        debug!(error = %e, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        let listen: std::net::SocketAddr = "0.0.0.0:2002".parse().expect("address");
        assert_eq!(server_status(3, listen), "serving 3 peers on 0.0.0.0:2002");
        assert_eq!(server_status(1, listen), "serving 1 peer on 0.0.0.0:2002");
        let granted = Some((Ipv4Addr::new(198, 19, 0, 2), 16));
        assert_eq!(
            client_status(LinkState::Connected, "vpn:2002", granted),
            "connected to vpn:2002 as 198.19.0.2/16"
        );
        assert_eq!(
            client_status(LinkState::Backoff, "vpn:2002", granted),
            "reconnecting to vpn:2002"
        );
        assert_eq!(
            client_status(LinkState::Connecting, "vpn:2002", None),
            "connecting to vpn:2002"
        );
    }

    #[test]
    fn pings_at_half_the_watchdog_timeout() {
        assert_eq!(
            ping_interval(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        assert_eq!(
            ping_interval(Duration::from_micros(1)),
            Duration::from_millis(1)
        );
        assert_eq!(ping_interval(Duration::MAX), Duration::from_secs(3600));
    }
}
