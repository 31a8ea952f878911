//! Routes (issue #11), end to end: networks behind the server and behind a
//! client (site to site), pushed to our TLS clients, filtered by the
//! client's `accept_routes`, spoofed sources dropped, overlapping claims
//! refused, and original-protocol clients unaffected.
//!
//! Addresses: 198.18.200.0/24 is a LAN behind the server, 198.18.201.0/24 a
//! LAN behind client A, 198.18.202.0/24 a pushed network a client excludes.

mod common;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::vpn::*;
use common::{require_root, wait_until, Daemon, Netns};
use serde_json::Value;

const SERVER_LAN: &str = "198.18.200.0/24";
const SERVER_LAN_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);
const A_LAN: &str = "198.18.201.0/24";
const A_LAN_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 201, 2);
const EXCLUDED: &str = "198.18.202.0/24";
/// Fixed tunnel addresses the server config gives to A's and B's keys.
const A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 3);
const NOT_INSTALLED: &str = "pushed route not installed";

/// Whether `ip route` in `ns` lists `cidr dev svpn0`.
fn routed_to_tun(ns: &Netns, cidr: &str) -> bool {
    let out = ns.ip(&["-4", "route", "show"]);
    String::from_utf8_lossy(&out.stdout).lines().any(|line| {
        line.split_whitespace().next() == Some(cidr) && line.contains(&format!(" dev {TUN}"))
    })
}

/// `ip route` in `ns`, for failure messages.
fn routes_of(ns: &Netns) -> String {
    String::from_utf8_lossy(&ns.ip(&["-4", "route", "show"]).stdout).into_owned()
}

/// Waits until `ns` routes `cidr` to its tun; panics with the table if not.
fn wait_for_route(ns: &Netns, cidr: &str, daemon: &Daemon) {
    assert!(
        wait_until(STARTUP, || routed_to_tun(ns, cidr)),
        "{cidr} dev {TUN} never appeared in {}:\n{}\nlog:\n{}",
        ns.name(),
        routes_of(ns),
        daemon.log()
    );
}

/// The log lines of `daemon` saying that pushed route `cidr` was not installed.
fn refusals(daemon: &Daemon, cidr: &str) -> Vec<String> {
    daemon
        .log()
        .lines()
        .filter(|l| l.contains(NOT_INSTALLED) && l.contains(cidr))
        .map(str::to_string)
        .collect()
}

/// Waits for the client's WARN line refusing `cidr`, and asserts it is the only one.
fn assert_refused_once(client: &Daemon, cidr: &str) {
    assert!(
        wait_until(STARTUP, || !refusals(client, cidr).is_empty()),
        "no `{NOT_INSTALLED}` line for {cidr}:\n{}",
        client.log()
    );
    let lines = refusals(client, cidr);
    assert_eq!(lines.len(), 1, "logged once: {lines:#?}");
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
}

/// A JSON array of strings, sorted.
fn strings(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect();
    out.sort();
    out
}

/// The peer holding `address` in `svpnctl --json peers` output.
fn peer(peers: &Value, address: Ipv4Addr) -> Value {
    peers
        .as_array()
        .expect("a JSON array")
        .iter()
        .find(|p| p["address"] == address.to_string().as_str())
        .unwrap_or_else(|| panic!("no peer {address} in {peers}"))
        .clone()
}

/// A TOML array of strings.
fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A `[[server.peer]]` table.
fn peer_table(key: &str, name: Option<&str>, address: Option<Ipv4Addr>, routes: &[&str]) -> String {
    let mut t = format!("\n[[server.peer]]\nkey = \"{key}\"\n");
    if let Some(name) = name {
        t.push_str(&format!("name = \"{name}\"\n"));
    }
    if let Some(address) = address {
        t.push_str(&format!("address = \"{address}\"\n"));
    }
    if !routes.is_empty() {
        t.push_str(&format!("routes = {}\n", toml_list(routes)));
    }
    t
}

/// The keys of a server and of clients A and B, and the `[[server.peer]]`
/// tables that give A and B their fixed addresses.
struct Keys {
    tls: Tls,
    peers: String,
}

fn keys_of_a_and_b(bed: &Bed) -> Keys {
    let tls = Tls::new(bed, &["a", "b"]);
    let peers = format!(
        "{}{}",
        peer_table(&tls.clients[0].public, None, Some(A), &[]),
        peer_table(&tls.clients[1].public, None, Some(B), &[])
    );
    Keys { tls, peers }
}

/// Writes `text` to `name` in the bed's directory and returns the path.
fn write_config(bed: &Bed, name: &str, text: &str) -> String {
    let path = bed.path(name);
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn tls_clients_reach_the_lan_behind_the_server() {
    if !require_root("tls_clients_reach_the_lan_behind_the_server") {
        return;
    }
    let bed = Bed::new("rtsrvlan", 1);
    let lan = lan_behind(&bed.server, "198.18.200.1/24", "198.18.200.2/24", "rtlan");
    let tls = Tls::new(&bed, &["a"]);
    let server_key = &tls.server.path;
    let a_pub = &tls.clients[0].public;
    let config = write_config(
        &bed,
        "server.toml",
        &format!(
            "[server]\nroutes = {}\n{}",
            toml_list(&[SERVER_LAN]),
            peer_table(a_pub, None, Some(A), &[])
        ),
    );
    let _server = bed.start_server(&["--config", &config, "--key", server_key]);
    let mut a = bed.start_client(0, &tls.client_args(0));
    let a_ns = &bed.clients[0];

    wait_for_route(a_ns, SERVER_LAN, &a);
    // The client reaches a host on the LAN, and that host reaches the client.
    tcp_round_trip(a_ns, &lan, SERVER_LAN_HOST, 5000, 1 << 20);
    tcp_round_trip(&lan, a_ns, A, 5001, 100_000);

    let status = svpnctl_json(&bed.server_socket(), &["status"]);
    assert_eq!(strings(&status["routes"]), [SERVER_LAN], "{status}");
    let status = svpnctl_json(&bed.client_socket(0), &["status"]);
    assert_eq!(strings(&status["routes"]), [SERVER_LAN], "{status}");
    // A peer without networks of its own lists none.
    let peers = svpnctl_json(&bed.server_socket(), &["peers"]);
    assert_eq!(strings(&peer(&peers, A)["routes"]), Vec::<String>::new());

    // Stopping the client takes its route away.
    assert!(
        a.terminate(Duration::from_secs(5)).is_some(),
        "client did not stop"
    );
    assert!(
        !routed_to_tun(a_ns, SERVER_LAN),
        "route left behind:\n{}",
        routes_of(a_ns)
    );
}

#[test]
fn site_to_site_the_lan_behind_a_client_reaches_and_is_reached() {
    if !require_root("site_to_site_the_lan_behind_a_client_reaches_and_is_reached") {
        return;
    }
    let bed = Bed::new("rtsite", 2);
    let (a_ns, b_ns) = (&bed.clients[0], &bed.clients[1]);
    let lan = lan_behind(a_ns, "198.18.201.1/24", "198.18.201.2/24", "rtalan");
    let tls = Tls::new(&bed, &["a", "b"]);
    let server_key = &tls.server.path;
    let a_pub = &tls.clients[0].public;
    let b_pub = &tls.clients[1].public;
    let config = write_config(
        &bed,
        "server.toml",
        &format!(
            "[server]\n{}{}",
            peer_table(a_pub, Some("site-a"), Some(A), &[A_LAN]),
            peer_table(b_pub, None, Some(B), &[])
        ),
    );
    let server = bed.start_server(&["--config", &config, "--key", server_key]);
    let a = bed.start_client(0, &tls.client_args(0));
    let b = bed.start_client(1, &tls.client_args(1));

    // The server routes A's network to its tun, and pushes it to B.
    wait_for_route(&bed.server, A_LAN, &server);
    wait_for_route(b_ns, A_LAN, &b);

    // B reaches a host on A's LAN, so does the server, and that host reaches B.
    tcp_round_trip(b_ns, &lan, A_LAN_HOST, 5000, 1 << 20);
    tcp_round_trip(&bed.server, &lan, A_LAN_HOST, 5001, 100_000);
    tcp_round_trip(&lan, b_ns, B, 5002, 1 << 20);

    // A's own network is never pushed back to A.
    assert!(
        !routed_to_tun(a_ns, A_LAN),
        "A got its own network pushed:\n{}\nlog:\n{}",
        routes_of(a_ns),
        a.log()
    );

    let socket = bed.server_socket();
    let peers = svpnctl_json(&socket, &["peers"]);
    assert_eq!(strings(&peer(&peers, A)["routes"]), [A_LAN], "{peers}");
    assert_eq!(strings(&peer(&peers, B)["routes"]), Vec::<String>::new());
    let inspect = svpnctl_json(&socket, &["inspect", &A.to_string()]);
    assert_eq!(strings(&inspect["routes"]), [A_LAN], "{inspect}");
    let status = svpnctl_json(&socket, &["status"]);
    assert_eq!(strings(&status["routes"]), [A_LAN], "{status}");
    let b_status = svpnctl_json(&bed.client_socket(1), &["status"]);
    assert_eq!(strings(&b_status["routes"]), [A_LAN], "{b_status}");
    let a_status = svpnctl_json(&bed.client_socket(0), &["status"]);
    assert_eq!(
        strings(&a_status["routes"]),
        Vec::<String>::new(),
        "{a_status}"
    );
}

#[test]
fn a_source_inside_another_clients_network_is_dropped_and_counted() {
    if !require_root("a_source_inside_another_clients_network_is_dropped_and_counted") {
        return;
    }
    let bed = Bed::new("rtspoof", 2);
    let (a_ns, b_ns) = (&bed.clients[0], &bed.clients[1]);
    let tls = Tls::new(&bed, &["a", "b"]);
    let server_key = &tls.server.path;
    let a_pub = &tls.clients[0].public;
    let b_pub = &tls.clients[1].public;
    let config = write_config(
        &bed,
        "server.toml",
        &format!(
            "[server]\n{}{}",
            peer_table(a_pub, Some("site-a"), Some(A), &[A_LAN]),
            peer_table(b_pub, Some("b"), Some(B), &[])
        ),
    );
    let _server = bed.start_server(&["--config", &config, "--key", server_key]);
    let _a = bed.start_client(0, &tls.client_args(0));
    let b = bed.start_client(1, &tls.client_args(1));
    wait_for_route(b_ns, A_LAN, &b);

    let port = 7000;
    let inbox = a_ns
        .udp_bind(SocketAddr::from((A, port)))
        .expect("UDP socket on A's tunnel address");
    inbox
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 64];

    // First, B's own address gets through: the path works.
    let honest = b_ns
        .udp_bind(SocketAddr::from((B, 0)))
        .expect("UDP socket on B's tunnel address");
    let mut delivered = None;
    for _ in 0..10 {
        honest.send_to(b"honest", (A, port)).expect("send");
        match inbox.recv_from(&mut buf) {
            Ok((n, from)) => {
                delivered = Some((buf[..n].to_vec(), from));
                break;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv at A: {e}"),
        }
    }
    let (payload, from) = delivered.expect("B's packet from its own address reached A");
    assert_eq!(payload, b"honest");
    assert_eq!(from.ip(), B);

    // Then B claims an address inside A's network as its source.
    let spoofed = Ipv4Addr::new(198, 18, 201, 77);
    b_ns.ip(&["addr", "add", "198.18.201.77/32", "dev", TUN]);
    let liar = b_ns
        .udp_bind(SocketAddr::from((spoofed, 0)))
        .expect("UDP socket on the spoofed address");
    for _ in 0..3 {
        liar.send_to(b"spoofed", (A, port)).expect("send");
    }
    let socket = bed.server_socket();
    let spoofed_count = || {
        peer(&svpnctl_json(&socket, &["peers"]), B)["dropped_spoofed"]
            .as_u64()
            .expect("dropped_spoofed")
    };
    assert!(
        wait_until(STARTUP, || spoofed_count() >= 1),
        "B's dropped_spoofed stayed 0: {}",
        svpnctl_json(&socket, &["peers"])
    );
    // Nothing from the spoofed source ever reaches A (watch for 2 s).
    inbox
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    match inbox.recv_from(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        Ok((n, from)) => panic!("A received {:?} from {from}", &buf[..n]),
        Err(e) => panic!("recv at A: {e}"),
    }
    // A, whose network it is, is not blamed.
    let a_peer = peer(&svpnctl_json(&socket, &["peers"]), A);
    assert_eq!(a_peer["dropped_spoofed"].as_u64(), Some(0), "{a_peer}");
}

#[test]
fn clients_install_only_the_pushed_routes_they_accept() {
    if !require_root("clients_install_only_the_pushed_routes_they_accept") {
        return;
    }
    let bed = Bed::new("rtaccept", 2);
    let (a_ns, b_ns) = (&bed.clients[0], &bed.clients[1]);
    let Keys { tls, peers } = keys_of_a_and_b(&bed);
    let config = write_config(
        &bed,
        "server.toml",
        &format!(
            "[server]\nroutes = {}\n{peers}",
            toml_list(&[SERVER_LAN, EXCLUDED])
        ),
    );
    let server = bed.start_server(&["--config", &config, "--key", &tls.server.path]);

    // A accepts 198.18.200.0/23 (flag): 200.0/24 is in it, 202.0/24 is not.
    let mut a_args = tls.client_args(0).to_vec();
    a_args.extend_from_slice(&["--accept-route", "198.18.200.0/23"]);
    let a = bed.start_client(0, &a_args);
    // B accepts nothing (config file: an empty list).
    let b_config = write_config(&bed, "b.toml", "[client]\naccept_routes = []\n");
    let mut b_args = tls.client_args(1).to_vec();
    b_args.extend_from_slice(&["--config", &b_config]);
    let b = bed.start_client(1, &b_args);

    wait_for_route(a_ns, SERVER_LAN, &a);
    assert_refused_once(&a, EXCLUDED);
    assert!(!routed_to_tun(a_ns, EXCLUDED), "{}", routes_of(a_ns));
    let status = svpnctl_json(&bed.client_socket(0), &["status"]);
    assert_eq!(strings(&status["routes"]), [SERVER_LAN], "{status}");

    assert_refused_once(&b, SERVER_LAN);
    assert_refused_once(&b, EXCLUDED);
    for cidr in [SERVER_LAN, EXCLUDED] {
        assert!(!routed_to_tun(b_ns, cidr), "{cidr}:\n{}", routes_of(b_ns));
    }
    let status = svpnctl_json(&bed.client_socket(1), &["status"]);
    assert_eq!(strings(&status["routes"]), Vec::<String>::new(), "{status}");
    drop((a, b, server));

    // A pushed route covering the server's own address (198.18.1.1 as A
    // sees it) is refused even without accept_routes, and the tunnel works.
    let covering = "198.18.0.0/16";
    let config = write_config(
        &bed,
        "server2.toml",
        &format!("[server]\nroutes = {}\n{peers}", toml_list(&[covering])),
    );
    let _server = bed.start_server(&["--config", &config, "--key", &tls.server.path]);
    let a = bed.start_client(0, &tls.client_args(0));
    assert_refused_once(&a, covering);
    assert!(!routed_to_tun(a_ns, covering), "{}", routes_of(a_ns));
    tcp_round_trip(a_ns, &bed.server, SERVER_TUNNEL, 5000, 100_000);
}

#[test]
fn a_client_installs_wide_or_lan_routes_only_as_far_as_it_opted_in() {
    if !require_root("a_client_installs_wide_or_lan_routes_only_as_far_as_it_opted_in") {
        return;
    }
    let bed = Bed::new("rtwide", 1);
    let a_ns = &bed.clients[0];
    let tls = Tls::new(&bed, &["a"]);
    let server_key = &tls.server.path;
    let a_pub = &tls.clients[0].public;
    // Two wide routes that take most of the Internet, a route inside the
    // client's own underlay network (198.18.1.0/24, not covering the
    // server's 198.18.1.1), and an ordinary LAN.
    let (half, quarter, underlay) = ("0.0.0.0/1", "128.0.0.0/2", "198.18.1.128/25");
    let config = write_config(
        &bed,
        "server.toml",
        &format!(
            "[server]\nroutes = {}\n{}",
            toml_list(&[half, quarter, underlay, SERVER_LAN]),
            peer_table(a_pub, None, Some(A), &[])
        ),
    );
    let _server = bed.start_server(&["--config", &config, "--key", server_key]);

    // Neither accept_routes nor full_tunnel: the LAN only.
    let mut a = bed.start_client(0, &tls.client_args(0));
    wait_for_route(a_ns, SERVER_LAN, &a);
    for refused in [half, quarter, underlay] {
        assert_refused_once(&a, refused);
        assert!(
            !routed_to_tun(a_ns, refused),
            "{refused}:\n{}",
            routes_of(a_ns)
        );
    }
    let log = a.log();
    assert!(log.contains("wider than /8"), "{log}");
    assert!(log.contains("connected to another interface"), "{log}");
    assert!(
        a.terminate(Duration::from_secs(5)).is_some(),
        "client did not stop"
    );

    // accept_routes = ["0.0.0.0/0"], the explicit opt-in: everything but
    // the route into the client's own network.
    let accept = write_config(
        &bed,
        "a.toml",
        "[client]\naccept_routes = [\"0.0.0.0/0\"]\n",
    );
    let mut args = vec!["--config", accept.as_str()];
    args.extend(tls.client_args(0));
    let a = bed.start_client(0, &args);
    for installed in [half, quarter, SERVER_LAN] {
        wait_for_route(a_ns, installed, &a);
    }
    assert_refused_once(&a, underlay);
    assert!(!routed_to_tun(a_ns, underlay), "{}", routes_of(a_ns));
    // The underlay still works: the tunnel carries traffic.
    tcp_round_trip(a_ns, &bed.server, SERVER_TUNNEL, 5000, 100_000);
}

/// Whether a TCP connection from `from` to `to`:`port` gets through (a
/// listener is there to take it).
fn tcp_passes(from: &Netns, to: &Netns, address: Ipv4Addr, port: u16) -> bool {
    let target = SocketAddr::from((address, port));
    let _listener = to.tcp_listen(target).expect("listen");
    from.tcp_connect(target, Duration::from_secs(2)).is_ok()
}

/// Whether `ping` from `ns` to `address` gets an answer (2 tries, 1 s each).
fn pings(ns: &Netns, address: Ipv4Addr) -> bool {
    let address = address.to_string();
    ns.run("ping", &["-c", "2", "-W", "1", "-q", &address])
        .status
        .success()
}

#[test]
fn client_to_client_deny_isolates_clients_and_kernel_leaves_it_to_the_hosts_firewall() {
    if !require_root(
        "client_to_client_deny_isolates_clients_and_kernel_leaves_it_to_the_hosts_firewall",
    ) {
        return;
    }
    let bed = Bed::new("rtc2c", 2);
    let (a_ns, b_ns) = (&bed.clients[0], &bed.clients[1]);
    // A LAN behind the server (its namespace forwards, as a gateway does).
    let lan = lan_behind(
        &bed.server,
        "198.18.200.1/24",
        "198.18.200.2/24",
        "rtc2clan",
    );
    let Keys { tls, peers } = keys_of_a_and_b(&bed);
    let config = write_config(
        &bed,
        "server.toml",
        &format!("[server]\nroutes = {}\n{peers}", toml_list(&[SERVER_LAN])),
    );
    for policy in ["deny", "kernel"] {
        let server = bed.start_server(&[
            "--config",
            &config,
            "--key",
            &tls.server.path,
            "--client-to-client",
            policy,
        ]);
        let a = bed.start_client(0, &tls.client_args(0));
        let b = bed.start_client(1, &tls.client_args(1));
        wait_for_route(a_ns, SERVER_LAN, &a);
        // The server itself and the LAN behind it stay reachable.
        tcp_round_trip(a_ns, &bed.server, SERVER_TUNNEL, 5000, 100_000);
        tcp_round_trip(a_ns, &lan, SERVER_LAN_HOST, 5001, 100_000);
        match policy {
            "deny" => {
                assert!(!pings(a_ns, B), "deny: A pinged B\n{}", server.log());
                assert!(
                    !tcp_passes(a_ns, b_ns, B, 5002),
                    "deny: A reached B over TCP"
                );
                assert!(!pings(b_ns, A), "deny: B pinged A");
                // Counted per peer, in svpnctl.
                let peers = svpnctl_json(&bed.server_socket(), &["peers"]);
                let dropped = peer(&peers, A)["dropped_client_to_client"]
                    .as_u64()
                    .unwrap_or(0);
                assert!(
                    dropped >= 2,
                    "A's dropped_client_to_client is {dropped}: {peers}"
                );
            }
            _ => {
                // kernel: the server's host decides. A drop rule in its
                // forward chain blocks A to B...
                let nft = |command: &str| {
                    let out = bed.server.run("nft", &[command]);
                    assert!(
                        out.status.success(),
                        "nft {command}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                };
                nft("add table inet svtc2c");
                nft("add chain inet svtc2c isolate { type filter hook forward priority 0; policy accept; }");
                nft(&format!(
                    "add rule inet svtc2c isolate iifname {TUN} oifname {TUN} drop"
                ));
                assert!(!pings(a_ns, B), "kernel + drop rule: A pinged B");
                assert!(
                    !tcp_passes(a_ns, b_ns, B, 5003),
                    "kernel + drop rule: TCP passed"
                );
                // ... and without it, with forwarding on, A reaches B.
                nft("delete table inet svtc2c");
                assert!(
                    pings(a_ns, B),
                    "kernel, no rule: A cannot ping B\n{}",
                    server.log()
                );
                tcp_round_trip(a_ns, b_ns, B, 5004, 100_000);
            }
        }
        drop((a, b, server));
    }
}

#[test]
fn overlapping_peer_networks_stop_the_server_with_exit_2() {
    if !require_root("overlapping_peer_networks_stop_the_server_with_exit_2") {
        return;
    }
    let bed = Bed::new("rtoverlap", 0);
    let tls = Tls::new(&bed, &["a", "b", "c"]);
    let server_key = &tls.server.path;
    let [a_pub, b_pub, c_pub] = [0, 1, 2].map(|i| &tls.clients[i].public);
    let wider = "198.18.201.0/24";
    let narrower = "198.18.201.128/25";
    // A named peer against an unnamed one (named by its key), then two
    // unnamed peers with the same network.
    let cases = [
        (
            format!(
                "{}{}",
                peer_table(a_pub, Some("site-a"), None, &[wider]),
                peer_table(b_pub, None, None, &[narrower])
            ),
            ["site-a", b_pub.as_str(), wider, narrower],
        ),
        (
            format!(
                "{}{}",
                peer_table(b_pub, None, None, &[EXCLUDED]),
                peer_table(c_pub, None, None, &["198.18.203.0/24", EXCLUDED])
            ),
            [b_pub.as_str(), c_pub.as_str(), EXCLUDED, EXCLUDED],
        ),
    ];
    for (i, (peers, named)) in cases.iter().enumerate() {
        let config = write_config(
            &bed,
            &format!("overlap{i}.toml"),
            &format!("[server]\nroutes = {}\n{peers}", toml_list(&[SERVER_LAN])),
        );
        let socket = bed.server_socket();
        let mut server = bed.server.spawn(
            SIMPLEVPND,
            &[
                "server",
                "--network",
                NETWORK,
                "--control",
                &socket,
                "--user",
                USER,
                "--config",
                &config,
                "--key",
                server_key,
                "--state-dir",
                &bed.state_dir(),
            ],
        );
        assert!(
            wait_until(STARTUP, || server.try_status().is_some()),
            "the server started despite overlapping peer networks:\n{}",
            server.log()
        );
        let status = server.try_status().expect("exited");
        assert_eq!(status.code(), Some(2), "{}", server.log());
        let log = server.log();
        let lines: Vec<&str> = log.trim_end().lines().collect();
        assert_eq!(lines.len(), 1, "one line:\n{log}");
        for needle in named {
            assert!(
                lines[0].contains(needle),
                "{needle} not named: {}",
                lines[0]
            );
        }
    }
}

#[test]
fn original_protocol_clients_still_work_on_a_server_with_routes() {
    if !require_root("original_protocol_clients_still_work_on_a_server_with_routes") {
        return;
    }
    let bed = Bed::new("rtlegacy", 2);
    let (a_ns, legacy_ns) = (&bed.clients[0], &bed.clients[1]);
    let tls = Tls::new(&bed, &["a"]);
    let server_key = &tls.server.path;
    let a_pub = &tls.clients[0].public;
    let a_addr = Ipv4Addr::new(198, 19, 0, 10);
    let config = write_config(
        &bed,
        "server.toml",
        &format!(
            "[server]\nlegacy = true\nroutes = {}\n{}",
            toml_list(&[SERVER_LAN]),
            peer_table(a_pub, Some("site-a"), Some(a_addr), &[A_LAN])
        ),
    );
    let _server = bed.start_server(&["--config", &config, "--key", server_key]);
    let a = bed.start_client(0, &tls.client_args(0));
    let _legacy = bed.start_client(1, &[]);
    wait_for_route(a_ns, SERVER_LAN, &a);

    let legacy_addr = match legacy_ns.ipv4_addrs(TUN).first() {
        Some(&(address, 16)) => address,
        other => panic!("the original-protocol client has {other:?} on its tun"),
    };
    tcp_round_trip(legacy_ns, a_ns, a_addr, 5000, 1 << 20);
    tcp_round_trip(a_ns, legacy_ns, legacy_addr, 5001, 1 << 20);
    tcp_round_trip(legacy_ns, &bed.server, SERVER_TUNNEL, 5002, 100_000);

    // The original protocol carries no routes: nothing was pushed to it.
    for cidr in [SERVER_LAN, A_LAN] {
        assert!(
            !routed_to_tun(legacy_ns, cidr),
            "{cidr}:\n{}",
            routes_of(legacy_ns)
        );
    }
    let peers = svpnctl_json(&bed.server_socket(), &["peers"]);
    assert_eq!(
        strings(&peer(&peers, legacy_addr)["routes"]),
        Vec::<String>::new()
    );
}
