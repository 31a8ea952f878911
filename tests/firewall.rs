//! Through any firewall: the server on port 443 by socket activation (no
//! capability of its own), sharing its port with a web server, and clients
//! behind HTTP and SOCKS5 proxies. Real daemons, real tools (systemd-socket-
//! activate, python3, openssl, squid, microsocks), all in namespaces.

mod common;

use std::net::Ipv4Addr;

use common::vpn::*;
use common::{require_root, Daemon, Netns};

const CLIENT_A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);

/// Whether `program` is on PATH; under CI a missing one fails the test
/// (scripts/deps installs it), elsewhere the test is skipped with a notice.
fn have(test: &str, program: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: needs {program} (scripts/deps installs it)");
        }
        eprintln!("skipping {test}: {program} is not installed (scripts/deps installs it)");
    }
    found
}

/// `simplevpnd server` started by `systemd-socket-activate -l ADDRESS`,
/// which binds ADDRESS as root, waits for the first connection and then
/// execs the daemon with the socket as fd 3 (the PID stays the same).
fn socket_activated_server(bed: &Bed, address: &str, extra: &[&str]) -> Daemon {
    let server = bed.spawn_server_under(&["systemd-socket-activate", "-l", address], extra);
    assert!(
        server.wait_for_log("Listening on", STARTUP),
        "systemd-socket-activate did not listen:\n{}",
        server.log()
    );
    server
}

/// The effective capability set of process `pid` (hex, from /proc).
fn cap_eff(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff line")
        .trim()
        .to_string()
}

fn tun_address(ns: &Netns) -> Option<(Ipv4Addr, u8)> {
    ns.ipv4_addrs(TUN).first().copied()
}

#[test]
fn a_socket_activated_server_serves_port_443_without_capabilities() {
    let test = "a_socket_activated_server_serves_port_443_without_capabilities";
    if !require_root(test) || !have(test, "systemd-socket-activate") {
        return;
    }
    let bed = Bed::new("sockact", 1);
    let server = socket_activated_server(&bed, "198.18.1.1:443", &[]);
    // The first connection starts the daemon.
    let _client = bed.spawn_client_to(0, "198.18.1.1:443", &[]);
    assert!(
        server.wait_for_log("server ready", STARTUP),
        "the daemon did not start:\n{}",
        server.log()
    );
    assert!(
        server
            .log()
            .contains("socket-activated fd 3 (198.18.1.1:443)"),
        "the ready line does not name the inherited socket:\n{}",
        server.log()
    );
    assert!(
        common::wait_until(STARTUP, || tun_address(&bed.clients[0]).is_some()),
        "no address through the activated socket:\n{}",
        server.log()
    );
    assert_eq!(tun_address(&bed.clients[0]), Some((CLIENT_A, 16)));
    tcp_round_trip(&bed.clients[0], &bed.server, SERVER_TUNNEL, 5000, 1 << 20);
    // The daemon (systemd-socket-activate exec'd it: same PID) holds no
    // capability: the port came bound.
    assert_eq!(
        cap_eff(server.pid()),
        "0000000000000000",
        "{}",
        server.log()
    );
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", server.pid())).expect("comm");
    assert_eq!(comm.trim(), "simplevpnd");
}
