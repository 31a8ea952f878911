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
    /// The server's key and the client's (`client`, allowed as a peer).
    tls: Tls,
}

impl Gateway {
    fn new(tag: &str) -> Gateway {
        let bed = Bed::new(tag, 1);
        let remote = Netns::new(&format!("{tag}r"));
        link(&bed.server, "198.18.100.1/24", &remote, "198.18.100.2/24");
        bed.server
            .ip(&["addr", "add", &format!("{SERVER_UNDERLAY}/32"), "dev", "lo"]);
        bed.clients[0].ip(&["route", "add", "default", "via", "198.18.1.1"]);
        let tls = Tls::new(&bed, &["client"]);
        Gateway { bed, remote, tls }
    }

    fn client_ns(&self) -> &Netns {
        &self.bed.clients[0]
    }

    /// Starts the server with `--gateway --forwarding`, and `extra`.
    fn server(&self, extra: &[&str]) -> Daemon {
        let mut args = self.tls.server_args();
        args.extend(["--gateway", "--forwarding"]);
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
        ];
        args.extend(self.tls.client_args(0));
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
        self.full_tunnel_client_with(&[])
    }

    /// [`Gateway::full_tunnel_client`] with `extra` flags.
    fn full_tunnel_client_with(&self, extra: &[&str]) -> Daemon {
        let client = self.client(&[&["--full-tunnel"], extra].concat());
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

/// The client's DNS guard (see `privsep::dnsguard`).
const DNS_GUARD: &str = "simplevpn_dns_svpn0";
/// A resolver on the client's LAN side, outside the tunnel.
const LAN_RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 18, 101, 2);

/// The DNS guard in `ns`, as `nft` lists it.
fn dns_guard(ns: &Netns) -> Option<String> {
    let out = ns.run("nft", &["list", "table", "inet", DNS_GUARD]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The packets the guard's rule for `what` (e.g. "udp dport 53") dropped.
fn dropped(table: &str, what: &str) -> u64 {
    table
        .lines()
        .find(|line| line.contains(what))
        .and_then(|line| line.split("counter packets ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter for {what} in {table}"))
}

/// A DNS query (ID 0x5356, one question for `example.`, type A).
const QUERY: [u8; 25] = [
    0x53, 0x56, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0,
    0, 1, 0, 1,
];

/// A tiny resolver on `address`:53 in `ns` that answers every query, UDP
/// and TCP, with itself marked as a response (QR set, no answers): enough
/// to tell an answer from silence.
fn answer_dns(ns: &Netns, address: Ipv4Addr) {
    let at = SocketAddr::from((address, 53));
    let udp = ns.udp_bind(at).expect("bind the resolver's UDP port");
    let tcp = ns.tcp_listen(at).expect("bind the resolver's TCP port");
    tcp.set_nonblocking(false).expect("blocking");
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            buf[2] |= 0x80;
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    std::thread::spawn(move || {
        for mut conn in tcp.incoming().flatten() {
            let mut len = [0u8; 2];
            let mut query = [0u8; 512];
            let n = match conn.read_exact(&mut len) {
                Ok(()) => usize::from(u16::from_be_bytes(len)).min(query.len()),
                Err(_) => continue,
            };
            if conn.read_exact(&mut query[..n]).is_ok() {
                query[2] |= 0x80;
                let _ = conn.write_all(&len);
                let _ = conn.write_all(&query[..n]);
            }
        }
    });
}

/// Asks `address`:53 over UDP from `ns`: whether an answer came.
fn udp_answered(ns: &Netns, address: Ipv4Addr) -> bool {
    let socket = ns
        .udp_bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        .expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    // A send the guard drops fails with EPERM: no answer either way.
    if socket.send_to(&QUERY, (address, 53)).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(socket.recv(&mut buf), Ok(n) if n == QUERY.len() && buf[2] & 0x80 != 0 && buf[..2] == QUERY[..2])
}

/// Asks `address`:`port` over TCP from `ns`: whether an answer came.
fn tcp_answered(ns: &Netns, address: Ipv4Addr, port: u16) -> bool {
    let Ok(mut conn) = ns.tcp_connect(SocketAddr::from((address, port)), Duration::from_secs(2))
    else {
        return false;
    };
    conn.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut framed = (QUERY.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&QUERY);
    let mut back = [0u8; 2 + QUERY.len()];
    conn.write_all(&framed).is_ok() && conn.read_exact(&mut back).is_ok() && back[2 + 2] & 0x80 != 0
}

#[test]
fn without_resolved_a_full_tunnel_blocks_dns_outside_the_tunnel_until_the_daemon_dies() {
    if !require_root(
        "without_resolved_a_full_tunnel_blocks_dns_outside_the_tunnel_until_the_daemon_dies",
    ) {
        return;
    }
    let gw = Gateway::new("ftdns");
    let ns = gw.client_ns();
    // The client's LAN, with a resolver that counts what reaches it.
    let lan = Netns::new("ftdnsl");
    link(ns, "198.18.101.1/24", &lan, "198.18.101.2/24");
    let leaked = SocketAddr::from((LAN_RESOLVER, 53));
    let lan_udp = lan.udp_bind(leaked).expect("LAN resolver UDP");
    lan_udp
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let lan_tcp = lan.tcp_listen(leaked).expect("LAN resolver TCP");
    lan_tcp.set_nonblocking(true).expect("nonblocking");
    let lan_dot = lan
        .tcp_listen(SocketAddr::from((LAN_RESOLVER, 853)))
        .expect("LAN resolver DNS over TLS");
    lan_dot.set_nonblocking(true).expect("nonblocking");
    // Before the client: the LAN resolver is reached (what would leak).
    let probe = ns
        .udp_bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        .expect("bind");
    probe
        .send_to(&QUERY, leaked)
        .expect("send before the tunnel");
    let mut buf = [0u8; 512];
    assert_eq!(
        lan_udp.recv(&mut buf).expect("the LAN resolver is reached"),
        QUERY.len()
    );

    let server_tunnel = SERVER_TUNNEL.to_string();
    let _server = gw.server(&["--masquerade", "--dns", &server_tunnel]);
    answer_dns(&gw.bed.server, SERVER_TUNNEL);
    let mut client = gw.full_tunnel_client();
    // No systemd-resolved serves this namespace: the guard stands in.
    assert!(
        wait_until(STARTUP, || dns_guard(ns).is_some()),
        "no DNS guard:\n{}",
        client.log()
    );
    let changes = host_changes(&gw.bed.client_socket(0));
    assert!(changes.iter().any(|c| c.contains(DNS_GUARD)), "{changes:?}");

    // Nothing reaches the LAN's resolver, UDP or TCP, 53 or 853.
    assert!(!udp_answered(ns, LAN_RESOLVER), "UDP 53 leaked");
    assert!(!tcp_answered(ns, LAN_RESOLVER, 53), "TCP 53 leaked");
    assert!(!tcp_answered(ns, LAN_RESOLVER, 853), "TCP 853 leaked");
    assert!(
        lan_udp.recv(&mut buf).is_err(),
        "the LAN resolver got a UDP query"
    );
    assert!(
        lan_tcp.accept().is_err(),
        "the LAN resolver got a TCP connection"
    );
    assert!(
        lan_dot.accept().is_err(),
        "the LAN resolver got a DoT connection"
    );
    let table = dns_guard(ns).expect("the guard");
    assert!(dropped(&table, "udp dport 53") >= 1, "{table}");
    assert!(dropped(&table, "tcp dport 53") >= 1, "{table}");
    assert!(dropped(&table, "tcp dport 853") >= 1, "{table}");
    // The pushed resolver, through the tunnel, answers both ways.
    assert!(udp_answered(ns, SERVER_TUNNEL), "{table}");
    assert!(tcp_answered(ns, SERVER_TUNNEL, 53), "{table}");
    let log = client.log();
    assert_eq!(
        log.matches("blocking DNS outside the tunnel").count(),
        1,
        "said once:\n{log}"
    );

    // SIGKILL of the daemon: the helper removes the guard as it does the
    // routes, and the LAN resolver is reached again.
    client.kill();
    assert!(
        wait_until(CLEANUP, || dns_guard(ns).is_none()),
        "the DNS guard outlived the SIGKILLed client"
    );
    probe.send_to(&QUERY, leaked).expect("send after");
    assert!(
        lan_udp.recv(&mut buf).is_ok(),
        "the LAN resolver not reached after"
    );

    // dns = "off": today's behaviour, no guard.
    let _client = gw.full_tunnel_client_with(&["--dns", "off"]);
    assert!(dns_guard(ns).is_none(), "a guard with dns = \"off\"");
    probe.send_to(&QUERY, leaked).expect("send with dns off");
    assert!(
        lan_udp.recv(&mut buf).is_ok(),
        "dns = \"off\" keeps the host's resolver"
    );
}

#[test]
fn after_the_underlay_changes_the_reconnect_pins_the_server_on_the_new_one() {
    if !require_root("after_the_underlay_changes_the_reconnect_pins_the_server_on_the_new_one") {
        return;
    }
    let gw = Gateway::new("ftmove");
    let ns = gw.client_ns();
    // A second network between the client and the server: the one the
    // laptop moves to.
    let (_, second) = link(&gw.bed.server, "198.18.3.1/24", ns, "198.18.3.2/24");
    let _server = gw.server(&["--masquerade", "--client-timeout", "3"]);
    let client = gw.full_tunnel_client_with(&["--timeout", "3"]);
    assert!(
        route_dev(ns, SERVER_UNDERLAY).contains("via 198.18.1.1"),
        "{}",
        route_dev(ns, SERVER_UNDERLAY)
    );

    // The first network goes away (its routes, the pin among them, go with
    // it) and the default route is now the second network's.
    let first = ns
        .ip(&["-o", "route", "get", "198.18.1.1"])
        .stdout
        .split(|b| *b == b' ')
        .skip_while(|w| *w != b"dev")
        .nth(1)
        .map(|dev| String::from_utf8_lossy(dev).into_owned())
        .expect("the first network's device");
    ns.ip(&[
        "route",
        "replace",
        "default",
        "via",
        "198.18.3.1",
        "dev",
        &second,
    ]);
    ns.ip(&["link", "set", &first, "down"]);

    // The link dies, the client reconnects over the second network.
    assert!(
        wait_until(Duration::from_secs(30), || client
            .log()
            .matches("granted 198.19.")
            .count()
            >= 2),
        "no second grant:\n{}\n{}",
        routes(ns),
        client.log()
    );
    let to_server = route_dev(ns, SERVER_UNDERLAY);
    assert!(
        to_server.contains("via 198.18.3.1") && !to_server.contains(TUN),
        "{to_server}"
    );
    assert_eq!(
        remote_sees(ns, &gw.remote, 6002).expect("through the tunnel again"),
        SERVER_TOWARDS_REMOTE
    );
    let log = client.log();
    assert!(log.contains("re-pinned the route to the server"), "{log}");
}
