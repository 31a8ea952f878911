//! Full tunnel (issue #12), end to end: a gateway server with NAT, a
//! full-tunnel client, a remote host behind the server that has no route
//! back to the client's networks, and the clean-up of everything the
//! helpers add, after SIGTERM and after SIGKILL.
//!
//! Addresses: the client reaches the server at 198.18.99.1 (on the server's
//! loopback) through its default route via 198.18.1.1, so the pinned route
//! has a gateway to keep; 198.18.100.0/24 is the remote host's network
//! behind the server. nftables only inside the server's namespace.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::vpn::*;
use common::{link, require_root, wait_until, Daemon, Netns};
use serde_json::Value;

/// The server's underlay address the client dials (on the server's lo).
const SERVER_UNDERLAY: &str = "198.18.99.1";
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
/// The server's address on the remote host's network: the NAT source.
const SERVER_TOWARDS_REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const TABLE: &str = "simplevpn_svpn0";
/// How long a helper may take to clean up after its daemon is gone.
const CLEANUP: Duration = Duration::from_secs(5);

/// A server namespace, one client namespace, and a remote host behind the
/// server; the server's namespace forwards (the helper turns it on).
struct Gateway {
    bed: Bed,
    remote: Netns,
    server_key: String,
    server_pub: String,
    client_key: String,
    client_pub: String,
}

impl Gateway {
    fn new(tag: &str) -> Gateway {
        let bed = Bed::new(tag, 1);
        let remote = Netns::new(&format!("{tag}r"));
        link(&bed.server, "198.18.100.1/24", &remote, "198.18.100.2/24");
        bed.server
            .ip(&["addr", "add", &format!("{SERVER_UNDERLAY}/32"), "dev", "lo"]);
        bed.clients[0].ip(&["route", "add", "default", "via", "198.18.1.1"]);
        let (server_key, server_pub) = keygen(&bed, "server");
        let (client_key, client_pub) = keygen(&bed, "client");
        Gateway {
            bed,
            remote,
            server_key,
            server_pub,
            client_key,
            client_pub,
        }
    }

    fn client_ns(&self) -> &Netns {
        &self.bed.clients[0]
    }

    /// Starts the server with `--gateway --forwarding`, and `extra`.
    fn server(&self, extra: &[&str]) -> Daemon {
        let mut args = vec![
            "--key",
            &self.server_key,
            "--peer",
            &self.client_pub,
            "--gateway",
            "--forwarding",
        ];
        args.extend_from_slice(extra);
        self.bed.start_server(&args)
    }

    /// Starts the client (TLS, dialing [`SERVER_UNDERLAY`]) with `extra`
    /// and waits for its grant.
    fn client(&self, extra: &[&str]) -> Daemon {
        let socket = self.bed.client_socket(0);
        let mut args = vec![
            "client",
            "-s",
            SERVER_UNDERLAY,
            "--control",
            &socket,
            "--user",
            USER,
            "--key",
            &self.client_key,
            "--server-key",
            &self.server_pub,
        ];
        args.extend_from_slice(extra);
        let client = self.client_ns().spawn(SIMPLEVPND, &args);
        assert!(
            client.wait_for_log("granted", STARTUP),
            "no grant:\n{}",
            client.log()
        );
        client
    }

    /// Starts a full-tunnel client and waits until its routes are in place.
    fn full_tunnel_client(&self) -> Daemon {
        let client = self.client(&["--full-tunnel"]);
        assert!(
            wait_until(STARTUP, || route_dev(self.client_ns(), "198.18.100.2")
                .contains(&format!("dev {TUN}"))),
            "the full tunnel never came up:\n{}\n{}",
            routes(self.client_ns()),
            client.log()
        );
        client
    }
}

/// `ip route` and `ip -6 route` of `ns`.
fn routes(ns: &Netns) -> String {
    let v4 = ns.ip(&["-4", "route", "show"]);
    let v6 = ns.ip(&["-6", "route", "show"]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&v4.stdout),
        String::from_utf8_lossy(&v6.stdout)
    )
}

/// `ip route get ADDRESS` in `ns` (IPv4 or IPv6), or the error.
fn route_dev(ns: &Netns, address: &str) -> String {
    let out = ns.run("ip", &["route", "get", address]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether the server's namespace has the NAT table (listed with `nft`).
fn nat_table(ns: &Netns) -> Option<String> {
    let out = ns.run("nft", &["list", "table", "ip", TABLE]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Connects from `from` to the remote host over TCP and returns the source
/// address the remote host saw, or the connect error.
fn remote_sees(from: &Netns, remote: &Netns, port: u16) -> std::io::Result<Ipv4Addr> {
    let target = SocketAddr::from((REMOTE, port));
    let listener = remote
        .tcp_listen(target)
        .expect("listen on the remote host");
    listener.set_nonblocking(false).expect("blocking");
    let accepted = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().expect("accept");
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).expect("read");
        conn.write_all(&buf).expect("echo");
        peer
    });
    let mut conn = from.tcp_connect(target, Duration::from_secs(3))?;
    conn.set_read_timeout(Some(STARTUP)).expect("timeout");
    conn.write_all(b"hello").expect("send");
    let mut back = [0u8; 5];
    conn.read_exact(&mut back).expect("echo back");
    assert_eq!(&back, b"hello");
    match accepted.join().expect("accept thread") {
        SocketAddr::V4(peer) => Ok(*peer.ip()),
        other => panic!("IPv6 peer {other}"),
    }
}

fn host_changes(socket: &str) -> Vec<String> {
    let status: Value = svpnctl_json(socket, &["status"]);
    status["host_changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no host_changes in {status}"))
        .iter()
        .map(|c| c.as_str().expect("a string").to_string())
        .collect()
}

/// Waits until `ns` has exactly the routes `before`; panics with both.
fn assert_routes_back(ns: &Netns, before: &str, what: &str) {
    assert!(
        wait_until(CLEANUP, || routes(ns) == before),
        "{what}: routes not as before.\nbefore:\n{before}\nafter:\n{}",
        routes(ns)
    );
}

#[test]
fn a_full_tunnel_client_reaches_a_remote_host_through_nat_and_sigterm_undoes_it() {
    if !require_root("a_full_tunnel_client_reaches_a_remote_host_through_nat_and_sigterm_undoes_it")
    {
        return;
    }
    let gw = Gateway::new("ftnat");
    let ns = gw.client_ns();
    let before = routes(ns);
    let mut server = gw.server(&["--masquerade"]);
    let table = nat_table(&gw.bed.server).expect("the NAT table is installed");
    assert!(
        table.contains("198.19.0.0/16") && table.contains("masquerade"),
        "{table}"
    );
    let mut client = gw.full_tunnel_client();

    // The server stays reached through the underlay (the pinned route), the
    // remote host through the tun, and IPv6 goes nowhere but the tun.
    let to_server = route_dev(ns, SERVER_UNDERLAY);
    assert!(
        to_server.contains("via 198.18.1.1") && !to_server.contains(TUN),
        "{to_server}"
    );
    assert!(
        route_dev(ns, "2001:2::1").contains(&format!("dev {TUN}")),
        "{}",
        route_dev(ns, "2001:2::1")
    );
    // NAT: the remote host sees the server's address.
    assert_eq!(
        remote_sees(ns, &gw.remote, 6000).expect("connect to the remote host"),
        SERVER_TOWARDS_REMOTE
    );

    let server_changes = host_changes(&gw.bed.server_socket());
    assert!(
        server_changes
            .iter()
            .any(|c| c.contains(TABLE) && c.contains("masquerade 198.19.0.0/16")),
        "{server_changes:?}"
    );
    let client_changes = host_changes(&gw.bed.client_socket(0));
    for needle in [
        "198.18.99.1/32 via 198.18.1.1",
        "0.0.0.0/1, 128.0.0.0/1",
        "::/1",
    ] {
        assert!(
            client_changes.iter().any(|c| c.contains(needle)),
            "{needle} not in {client_changes:?}"
        );
    }

    // SIGTERM: the host's routes are as before, the NAT table is gone.
    assert!(client.terminate(CLEANUP).is_some(), "client did not stop");
    assert_routes_back(ns, &before, "after SIGTERM of the client");
    assert!(server.terminate(CLEANUP).is_some(), "server did not stop");
    assert!(
        wait_until(CLEANUP, || nat_table(&gw.bed.server).is_none()),
        "the NAT table outlived the server"
    );
}

#[test]
fn sigkill_of_either_daemon_leaves_nothing_behind() {
    if !require_root("sigkill_of_either_daemon_leaves_nothing_behind") {
        return;
    }
    let gw = Gateway::new("ftkill");
    let ns = gw.client_ns();
    let before = routes(ns);
    let mut server = gw.server(&["--masquerade"]);
    let mut client = gw.full_tunnel_client();
    assert_ne!(routes(ns), before);

    client.kill();
    assert_routes_back(ns, &before, "after SIGKILL of the client");
    assert!(nat_table(&gw.bed.server).is_some());
    server.kill();
    assert!(
        wait_until(CLEANUP, || nat_table(&gw.bed.server).is_none()),
        "the NAT table outlived the SIGKILLed server"
    );
}

#[test]
fn without_masquerade_the_remote_host_cannot_answer() {
    if !require_root("without_masquerade_the_remote_host_cannot_answer") {
        return;
    }
    let gw = Gateway::new("ftnonat");
    let _server = gw.server(&[]);
    assert!(nat_table(&gw.bed.server).is_none());
    let _client = gw.full_tunnel_client();
    // The remote host gets the SYN from 198.19.0.2 but has no route back.
    assert!(remote_sees(gw.client_ns(), &gw.remote, 6001).is_err());
}

#[test]
fn a_client_without_full_tunnel_refuses_the_default_route() {
    if !require_root("a_client_without_full_tunnel_refuses_the_default_route") {
        return;
    }
    let gw = Gateway::new("ftplain");
    let ns = gw.client_ns();
    let _server = gw.server(&["--masquerade"]);
    let client = gw.client(&[]);
    assert!(
        client.wait_for_log("pushed route not installed", STARTUP),
        "{}",
        client.log()
    );
    let log = client.log();
    assert!(
        log.contains("0.0.0.0/0") && log.contains("full_tunnel"),
        "{log}"
    );
    let table = routes(ns);
    assert!(!table.contains("0.0.0.0/1"), "{table}");
    assert!(
        !route_dev(ns, "198.18.100.2").contains(TUN),
        "{}",
        route_dev(ns, "198.18.100.2")
    );
    assert_eq!(host_changes(&gw.bed.client_socket(0)), Vec::<String>::new());
}
