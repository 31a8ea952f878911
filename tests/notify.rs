//! simplevpnd under a fake systemd: with NOTIFY_SOCKET and WATCHDOG_USEC set
//! (as for a Type=notify unit with WatchdogSec), it reports READY=1 and a
//! STATUS= line once it serves, keeps STATUS= current, pings the watchdog at
//! half the timeout, and says STOPPING=1 on SIGTERM.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::vpn::*;
use common::{require_root, Daemon};
use nix::sys::signal::Signal;

/// The fake service manager's end: every datagram the daemon sent.
struct Manager {
    socket: UnixDatagram,
    path: String,
    seen: Vec<String>,
}

impl Manager {
    fn new(path: String) -> Manager {
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        // Like systemd's own: the daemon sends as its unprivileged user.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
            .expect("chmod the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        Manager {
            socket,
            path,
            seen: Vec::new(),
        }
    }

    fn env(&self) -> [(&str, &str); 2] {
        [("NOTIFY_SOCKET", &self.path), ("WATCHDOG_USEC", "400000")]
    }

    /// Waits until a message satisfying `want` arrives; returns it and when.
    fn wait_for(&mut self, want: impl Fn(&str) -> bool, daemon: &Daemon) -> (String, Instant) {
        let deadline = Instant::now() + STARTUP;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(message.clone());
                if want(&message) {
                    return (message, Instant::now());
                }
            }
        }
        panic!(
            "no such notification; got {:?}\ndaemon log:\n{}",
            self.seen,
            daemon.log()
        );
    }
}

#[test]
fn server_and_client_notify_systemd_and_ping_the_watchdog() {
    if !require_root("server_and_client_notify_systemd_and_ping_the_watchdog") {
        return;
    }
    let bed = Bed::new("notify", 1);
    let mut manager = Manager::new(bed.path("server-notify.sock"));
    let socket = bed.server_socket();
    let mut server = bed.server.spawn_env(
        SIMPLEVPND,
        &[
            "server",
            "--network",
            NETWORK,
            "--control",
            &socket,
            "--user",
            USER,
            "--legacy",
            "--state-dir",
            &bed.state_dir(),
        ],
        &manager.env(),
    );
    let (ready, _) = manager.wait_for(|m| m.contains("READY=1"), &server);
    let listen = "0.0.0.0:2002";
    assert!(
        ready.contains(&format!("STATUS=serving 0 peers on {listen}")),
        "{ready:?}"
    );

    // Pings at half of WATCHDOG_USEC (400 ms): two in well under a timeout.
    let (_, first) = manager.wait_for(|m| m == "WATCHDOG=1\n", &server);
    let (_, second) = manager.wait_for(|m| m == "WATCHDOG=1\n", &server);
    let gap = second - first;
    assert!(
        gap >= Duration::from_millis(100) && gap < Duration::from_millis(400),
        "pings {gap:?} apart"
    );

    let mut client_manager = Manager::new(bed.path("client-notify.sock"));
    let server_addr = bed.server_addr(0).to_string();
    let mut client = bed.spawn_client_env(0, &server_addr, &[], &client_manager.env());
    // The client is ready once started, and connects (or keeps trying) after.
    client_manager.wait_for(|m| m.contains("READY=1"), &client);
    client_manager.wait_for(
        |m| {
            m.contains(&format!(
                "STATUS=connected to {server_addr} as 198.19.0.2/16"
            ))
        },
        &client,
    );
    manager.wait_for(
        |m| m.contains(&format!("STATUS=serving 1 peer on {listen}")),
        &server,
    );

    client.signal(Signal::SIGTERM);
    client_manager.wait_for(|m| m.contains("STOPPING=1"), &client);
    server.signal(Signal::SIGTERM);
    manager.wait_for(|m| m.contains("STOPPING=1"), &server);
    assert!(server.terminate(STARTUP).is_some_and(|s| s.success()));
    assert!(client.terminate(STARTUP).is_some_and(|s| s.success()));
}
