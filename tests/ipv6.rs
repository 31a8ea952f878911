//! IPv6 inside the tunnel (issue #13), end to end: a server with
//! `network6` gives its TLS extension clients an IPv6 address beside the
//! IPv4 one; ping and TCP over IPv6 client to client and to the server's
//! `::1`, IPv4 alongside; a spoofed IPv6 source dropped and counted; both
//! addresses kept across a server restart; and an IPv6 underlay (a `[::]`
//! listener serving both families, a client dialing an IPv6 literal and a
//! name with only an AAAA record).
//!
//! Addresses: IPv6 only from 2001:2::/48 (the tunnel network
//! 2001:2:0:100::/64, the underlay 2001:2:0:1::/64), IPv4 from 198.18.0.0/15.
//! Duplicate address detection is off inside every namespace (and the
//! daemon sets its tun addresses without it), so no address waits.

mod common;

use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use common::vpn::*;
use common::{link, require_root, wait_until, Daemon, Netns};
use serde_json::Value;

const NETWORK6: &str = "2001:2:0:100::/64";
/// The server's IPv6 tunnel address: ::1 of `NETWORK6`.
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x100, 0, 0, 0, 1);
/// The IPv6 address fixed for client B's key.
const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x100, 0, 0, 0, 0xb);
/// The server's and client A's underlay addresses in the IPv6 underlay test.
const UNDERLAY_SERVER: &str = "2001:2:0:1::1";
const UNDERLAY_CLIENT: &str = "2001:2:0:1::2";

/// Turns duplicate address detection off in `ns` (for links made later).
fn no_dad(ns: &Netns) {
    for scope in ["all", "default"] {
        let setting = format!("net.ipv6.conf.{scope}.accept_dad=0");
        let out = ns.run("sysctl", &["-w", &setting]);
        assert!(
            out.status.success(),
            "sysctl {setting} in {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A bed of `n` clients with DAD off everywhere.
fn bed(tag: &str, n: u8) -> Bed {
    let bed = Bed::new(tag, n);
    no_dad(&bed.server);
    bed.clients.iter().for_each(no_dad);
    bed
}

/// A `[server]` config with TLS peers A (dynamic) and B (`address6` fixed
/// to [`B6`]); returns its path.
fn config(bed: &Bed, a_public: &str, b_public: &str) -> String {
    let path = bed.path("server.toml");
    let text = format!(
        "[server]\n\n[[server.peer]]\nkey = \"{a_public}\"\nname = \"a\"\n\n\
         [[server.peer]]\nkey = \"{b_public}\"\nname = \"b\"\naddress6 = \"{B6}\"\n"
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// `svpnctl --json status` of client `i`, once it holds an IPv6 address:
/// (its IPv4 address, its IPv6 address).
fn addresses(bed: &Bed, i: usize, client: &Daemon) -> (IpAddr, Ipv6Addr) {
    let mut status = Value::Null;
    let granted6 = wait_until(STARTUP, || {
        status = svpnctl_json(&bed.client_socket(i), &["status"]);
        status["address6"].is_string()
    });
    assert!(
        granted6,
        "client {i} has no IPv6 address: {status}\n{}",
        client.log()
    );
    let host = |field: &str| -> String {
        let cidr = status[field].as_str().expect("an address").to_string();
        cidr.split('/').next().expect("address/prefix").to_string()
    };
    let v4 = host("address").parse().expect("IPv4 address");
    let v6 = host("address6").parse().expect("IPv6 address");
    assert_eq!(
        status["address6"].as_str().map(|a| a.ends_with("/64")),
        Some(true),
        "{status}"
    );
    (v4, v6)
}

/// Pings `to` from `ns` (IPv6), a few tries for the first packet.
fn ping6(ns: &Netns, to: Ipv6Addr) -> bool {
    let to = to.to_string();
    wait_until(Duration::from_secs(5), || {
        ns.run("ping", &["-6", "-c", "1", "-W", "1", &to])
            .status
            .success()
    })
}

/// The server's peer named `name` as JSON, if it is connected.
fn find_peer(bed: &Bed, name: &str) -> Option<Value> {
    let peers = svpnctl_json(&bed.server_socket(), &["peers"]);
    let found = peers.as_array()?.iter().find(|p| p["name"] == name);
    found.cloned()
}

/// The server's connected peer named `name` as JSON.
fn server_peer(bed: &Bed, name: &str) -> Value {
    find_peer(bed, name).unwrap_or_else(|| panic!("no peer {name} connected"))
}

/// A dual-stack TLS setup: the server with `network6` and clients A and B.
struct DualStack {
    bed: Bed,
    server_args: Vec<String>,
    client_args: Vec<Vec<String>>,
}

impl DualStack {
    fn new(tag: &str) -> DualStack {
        let bed = bed(tag, 2);
        let tls = Tls::new(&bed, &["a", "b"]);
        let config = config(&bed, &tls.clients[0].public, &tls.clients[1].public);
        let server_args = [
            "--config",
            &config,
            "--key",
            &tls.server.path,
            "--network6",
            NETWORK6,
        ]
        .map(String::from)
        .to_vec();
        let client_args = (0..2)
            .map(|i| tls.client_args(i).map(String::from).to_vec())
            .collect();
        DualStack {
            bed,
            server_args,
            client_args,
        }
    }

    fn start_server(&self) -> Daemon {
        self.start_server_with(&[])
    }

    fn start_server_with(&self, extra: &[&str]) -> Daemon {
        let mut args: Vec<&str> = self.server_args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        self.bed.start_server(&args)
    }

    fn start_client(&self, i: usize) -> Daemon {
        self.start_client_with(i, &[])
    }

    fn start_client_with(&self, i: usize, extra: &[&str]) -> Daemon {
        let mut args: Vec<&str> = self.client_args[i].iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        self.bed.start_client(i, &args)
    }
}

#[test]
fn ipv6_and_ipv4_between_two_clients_and_the_server() {
    if !require_root("ipv6_and_ipv4_between_two_clients_and_the_server") {
        return;
    }
    let setup = DualStack::new("v6");
    let bed = &setup.bed;
    let server = setup.start_server();
    let a = setup.start_client(0);
    let b = setup.start_client(1);
    let (a4, a6) = addresses(bed, 0, &a);
    let (b4, b6) = addresses(bed, 1, &b);
    assert_eq!(b6, B6, "B's fixed address6");
    assert_eq!(a6, "2001:2:0:100::2".parse::<Ipv6Addr>().expect("v6"));

    // ping -6 and TCP over IPv6: client to client, client to the server.
    assert!(
        ping6(&bed.clients[0], b6),
        "A cannot ping B over IPv6:\n{}",
        server.log()
    );
    assert!(ping6(&bed.clients[1], a6), "B cannot ping A over IPv6");
    assert!(
        ping6(&bed.clients[0], SERVER6),
        "A cannot ping the server's ::1"
    );
    tcp_round_trip(&bed.clients[0], &bed.clients[1], b6, 7001, 200_000);
    tcp_round_trip(&bed.clients[1], &bed.server, SERVER6, 7002, 200_000);
    // IPv4 keeps working alongside.
    tcp_round_trip(&bed.clients[1], &bed.clients[0], a4, 7003, 200_000);
    tcp_round_trip(&bed.clients[0], &bed.clients[1], b4, 7004, 50_000);

    // svpnctl shows both addresses, and the IPv6 pool.
    let peer_a = server_peer(bed, "a");
    assert_eq!(peer_a["address6"], a6.to_string().as_str(), "{peer_a}");
    let status = svpnctl_json(&bed.server_socket(), &["status"]);
    assert_eq!(status["network6"], NETWORK6, "{status}");
    assert_eq!(status["address6"], "2001:2:0:100::1/64", "{status}");
    // 2^64 - 2 client addresses less B's fixed one and A's.
    assert_eq!(
        status["free_addresses6"].as_u64(),
        Some(u64::MAX - 1 - 2),
        "{status}"
    );
    // inspect takes either address.
    let by6 = svpnctl_json(&bed.server_socket(), &["inspect", &a6.to_string()]);
    assert_eq!(by6["address"], a4.to_string().as_str(), "{by6}");
    let table = svpnctl(&bed.server_socket(), &["peers"], None);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("ADDRESS6") && table.contains(&a6.to_string()),
        "{table}"
    );

    // A spoofed IPv6 source from A: dropped by the server and counted.
    let before = peer_a["dropped_spoofed"].as_u64().expect("a counter");
    let spoofed = "2001:2:0:100::99";
    bed.clients[0].ip(&[
        "-6",
        "addr",
        "add",
        &format!("{spoofed}/128"),
        "dev",
        TUN,
        "nodad",
    ]);
    let server6 = SERVER6.to_string();
    let ping = bed.clients[0].run(
        "ping",
        &["-6", "-c", "2", "-W", "1", "-I", spoofed, &server6],
    );
    assert!(!ping.status.success(), "a spoofed source got through");
    assert!(
        wait_until(STARTUP, || {
            server_peer(bed, "a")["dropped_spoofed"].as_u64() >= Some(before + 2)
        }),
        "not counted as spoofed: {}",
        server_peer(bed, "a")
    );
    // A's own address still works.
    bed.clients[0].ip(&["-6", "addr", "del", &format!("{spoofed}/128"), "dev", TUN]);
    assert!(
        ping6(&bed.clients[0], SERVER6),
        "A's own address is refused now"
    );
}

#[test]
fn both_addresses_survive_a_server_restart() {
    if !require_root("both_addresses_survive_a_server_restart") {
        return;
    }
    let setup = DualStack::new("v6r");
    let bed = &setup.bed;
    let mut server = setup.start_server();
    let a = setup.start_client(0);
    let b = setup.start_client(1);
    let before = [addresses(bed, 0, &a), addresses(bed, 1, &b)];
    let held = |name: &str| {
        let peer = server_peer(bed, name);
        (peer["address"].clone(), peer["address6"].clone())
    };
    let held_before = [held("a"), held("b")];

    server
        .terminate(Duration::from_secs(5))
        .expect("server stops");
    let server = setup.start_server();
    assert!(
        server.log().contains("leases=2"),
        "both leases loaded:\n{}",
        server.log()
    );
    let both_back = wait_until(Duration::from_secs(20), || {
        let peers = svpnctl_json(&bed.server_socket(), &["peers"]);
        peers.as_array().map(Vec::len) == Some(2)
    });
    assert!(both_back, "clients not back:\n{}\n{}", a.log(), b.log());
    assert_eq!([held("a"), held("b")], held_before);
    assert_eq!([addresses(bed, 0, &a), addresses(bed, 1, &b)], before);
    // And the tunnel still carries IPv6 on the old addresses.
    assert!(ping6(&bed.clients[0], before[1].1));
}

/// Adds `cidr` (inside 2001:2::/48) to `dev` in `ns`, without DAD.
fn add6(ns: &Netns, dev: &str, cidr: &str) {
    assert!(cidr.starts_with("2001:2:"), "{cidr} is outside 2001:2::/48");
    ns.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"]);
}

/// What a command printed, stdout then stderr.
fn text(out: std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `ip -6 route get ADDRESS` in `ns`, or the error.
fn route_get6(ns: &Netns, address: &str) -> String {
    text(ns.run("ip", &["-6", "route", "get", address]))
}

/// Gives the link between the server and client A IPv6 underlay addresses
/// too ([`UNDERLAY_SERVER`], [`UNDERLAY_CLIENT`]); returns A's device.
fn ipv6_underlay(bed: &Bed) -> String {
    let server_dev = veth_with(&bed.server, "198.18.1.1");
    let client_dev = veth_with(&bed.clients[0], "198.18.1.2");
    add6(&bed.server, &server_dev, &format!("{UNDERLAY_SERVER}/64"));
    add6(
        &bed.clients[0],
        &client_dev,
        &format!("{UNDERLAY_CLIENT}/64"),
    );
    client_dev
}

/// Starts client A dialing `target` (HOST:PORT), with `extra` flags.
fn spawn_client_to(setup: &DualStack, target: &str, extra: &[&str]) -> Daemon {
    let bed = &setup.bed;
    let socket = bed.client_socket(0);
    let mut args = vec!["client", "-s", target, "--control", &socket, "--user", USER];
    args.extend(setup.client_args[0].iter().map(String::as_str));
    args.extend_from_slice(extra);
    bed.clients[0].spawn(SIMPLEVPND, &args)
}

#[test]
fn a_full_tunnel_with_an_ipv6_grant_sends_ipv6_through_the_server_and_its_nat() {
    if !require_root("a_full_tunnel_with_an_ipv6_grant_sends_ipv6_through_the_server_and_its_nat") {
        return;
    }
    let setup = DualStack::new("v6ft");
    let bed = &setup.bed;
    // A host behind the server on 2001:2:0:200::/64, with no route back to
    // the tunnel network: only NAT (masquerade) gets the answers back.
    let lan = Netns::new("v6ftlan");
    no_dad(&lan);
    let (server_dev, lan_dev) = link(&bed.server, "198.18.200.1/24", &lan, "198.18.200.2/24");
    add6(&bed.server, &server_dev, "2001:2:0:200::1/64");
    add6(&lan, &lan_dev, "2001:2:0:200::2/64");

    // --forwarding: the helper turns on IPv4 and IPv6 forwarding in the
    // server's namespace.
    let mut server = setup.start_server_with(&["--gateway", "--masquerade", "--forwarding"]);
    let table = bed
        .server
        .run("nft", &["list", "table", "ip6", "simplevpn_svpn0"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(NETWORK6) && table.contains("masquerade"),
        "no IPv6 NAT table: {table}"
    );
    let a = setup.start_client_with(0, &["--full-tunnel"]);
    let (_, a6) = addresses(bed, 0, &a);
    let ns = &bed.clients[0];
    let through_tun = wait_until(STARTUP, || {
        let route = route_get6(ns, "2001:2:0:200::2");
        route.contains(&format!("dev {TUN}")) && route.contains(&format!("src {a6}"))
    });
    assert!(
        through_tun,
        "IPv6 not routed through the tunnel from {a6}: {}\n{}",
        route_get6(ns, "2001:2:0:200::2"),
        a.log()
    );
    assert!(
        ping6(ns, "2001:2:0:200::2".parse().expect("v6")),
        "the host behind the server is not reached over IPv6:\n{}",
        a.log()
    );
    // The host behind the server sees the server's address (NAT66).
    let target: std::net::SocketAddr = "[2001:2:0:200::2]:7010".parse().expect("addr");
    let listener = lan.tcp_listen(target).expect("listen behind the server");
    let seen = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer.ip()));
    ns.tcp_connect(target, STARTUP)
        .expect("A connects to the host behind the server over IPv6");
    let seen = seen.join().expect("accept thread").expect("accept");
    assert_eq!(seen, "2001:2:0:200::1".parse::<IpAddr>().expect("v6"));
    let status = svpnctl_json(&bed.client_socket(0), &["status"]);
    let changes = status["host_changes"].to_string();
    assert!(changes.contains("IPv6 through the tunnel"), "{changes}");
    let server_changes =
        svpnctl_json(&bed.server_socket(), &["status"])["host_changes"].to_string();
    for change in [
        "table ip6 simplevpn_svpn0",
        "net.ipv6.conf.all.forwarding turned on",
    ] {
        assert!(
            server_changes.contains(change),
            "{change}: {server_changes}"
        );
    }
    // Stopped, the server leaves no NAT table of either family behind.
    server
        .terminate(Duration::from_secs(5))
        .expect("server stops");
    for family in ["ip", "ip6"] {
        let left = bed
            .server
            .run("nft", &["list", "table", family, "simplevpn_svpn0"]);
        assert!(
            !left.status.success(),
            "the {family} NAT table outlived the server"
        );
    }
}

/// `/etc/netns/NAME/hosts` for a namespace: `ip netns exec` mounts it over
/// `/etc/hosts` for what runs there; removed on drop.
struct NetnsHosts(PathBuf);

impl NetnsHosts {
    fn new(ns: &Netns, text: &str) -> NetnsHosts {
        let dir = PathBuf::from("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).expect("create /etc/netns/NAME");
        std::fs::write(dir.join("hosts"), text).expect("write hosts");
        NetnsHosts(dir)
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The veth in `ns` that carries `ipv4` (an underlay address of the bed).
fn veth_with(ns: &Netns, ipv4: &str) -> String {
    let out = ns.ip(&["-br", "-4", "addr", "show"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains(&format!(" {ipv4}/")))
        .unwrap_or_else(|| panic!("no link with {ipv4} in {}:\n{text}", ns.name()));
    let name = line.split_whitespace().next().expect("a link name");
    name.split('@').next().expect("name@peer").to_string()
}

#[test]
fn an_ipv6_underlay_serves_both_families_and_names_with_aaaa_records() {
    if !require_root("an_ipv6_underlay_serves_both_families_and_names_with_aaaa_records") {
        return;
    }
    let setup = DualStack::new("v6u");
    let bed = &setup.bed;
    // Client A's underlay is IPv6 (2001:2:0:1::/64) besides its IPv4 one.
    ipv6_underlay(bed);

    let mut args: Vec<&str> = setup.server_args.iter().map(String::as_str).collect();
    args.extend(["--listen", "[::]:2002"]);
    let server = bed.start_server(&args);
    assert!(server.log().contains("[::]:2002"), "{}", server.log());

    // A dials the IPv6 literal; B dials IPv4 to the same [::] socket.
    let dial = |target: &str| {
        let client = spawn_client_to(&setup, target, &[]);
        assert!(
            client.wait_for_log("granted", STARTUP),
            "no grant over {target}:\n{}\n{}",
            client.log(),
            server.log()
        );
        client
    };
    let literal = format!("[{UNDERLAY_SERVER}]:2002");
    let a = dial(&literal);
    let _b = setup.start_client(1);
    let remote = |name: &str| {
        server_peer(bed, name)["remote"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert!(
        remote("a").starts_with(&format!("[{UNDERLAY_CLIENT}]:")),
        "A over IPv6: {}",
        remote("a")
    );
    // An IPv4 client of the dual-stack socket is seen as IPv4, not ::ffff:.
    assert!(
        remote("b").starts_with("198.18.2.2:"),
        "B over IPv4: {}",
        remote("b")
    );
    let (_, a6) = addresses(bed, 0, &a);
    assert!(
        ping6(&bed.clients[1], a6),
        "no IPv6 in the tunnel over an IPv6 underlay"
    );
    drop(a);

    // A name with only an AAAA record (the namespace's own hosts file).
    let _hosts = NetnsHosts::new(&bed.clients[0], &format!("{UNDERLAY_SERVER} vpn6.test\n"));
    assert!(
        wait_until(STARTUP, || svpnctl_json(&bed.server_socket(), &["peers"])
            .as_array()
            .map(Vec::len)
            == Some(1)),
        "A's first connection is not gone"
    );
    let _a = dial("vpn6.test:2002");
    assert!(
        remote("a").starts_with(&format!("[{UNDERLAY_CLIENT}]:")),
        "A by name over IPv6: {}",
        remote("a")
    );
}

#[test]
fn a_peer_added_live_with_address6_gets_it_and_keeps_it_across_a_restart() {
    if !require_root("a_peer_added_live_with_address6_gets_it_and_keeps_it_across_a_restart") {
        return;
    }
    let bed = bed("v6live", 1);
    let tls = Tls::new(&bed, &["c"]);
    let c_public = &tls.clients[0].public;
    let server_args = ["--key", &tls.server.path, "--network6", NETWORK6];
    let mut server = bed.start_server(&server_args);
    let fixed6 = "2001:2:0:100::c";
    let added = svpnctl_json(
        &bed.server_socket(),
        &["peer", "add", c_public, "--name", "c", "--address6", fixed6],
    );
    assert_eq!(added["added"]["address6"], fixed6, "{added}");
    // Outside network6: refused, naming the field.
    let (_, other_public) = keygen(&bed, "other");
    let refused = svpnctl(
        &bed.server_socket(),
        &[
            "peer",
            "add",
            &other_public,
            "--address6",
            "2001:2:0:999::1",
        ],
        None,
    );
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && why.contains("address6"),
        "{why}"
    );

    let client = bed.start_client(0, &tls.client_args(0));
    assert_eq!(addresses(&bed, 0, &client).1.to_string(), fixed6);
    server
        .terminate(Duration::from_secs(5))
        .expect("server stops");
    let _server = bed.start_server(&server_args);
    let listed = svpnctl_json(&bed.server_socket(), &["peer", "list"]);
    assert!(listed.to_string().contains(fixed6), "not kept: {listed}");
    assert!(
        wait_until(Duration::from_secs(20), || {
            find_peer(&bed, "c").is_some_and(|p| p["address6"] == fixed6)
        }),
        "not back with {fixed6}:\n{}",
        client.log()
    );
}

/// `ip [-6] route show` in `ns`.
fn route_table(ns: &Netns) -> String {
    text(ns.ip(&["route", "show"])) + &text(ns.ip(&["-6", "route", "show"]))
}

#[test]
fn a_full_tunnel_over_an_ipv6_underlay_pins_the_servers_ipv6_address() {
    if !require_root("a_full_tunnel_over_an_ipv6_underlay_pins_the_servers_ipv6_address") {
        return;
    }
    let setup = DualStack::new("v6fu");
    let bed = &setup.bed;
    let client_dev = ipv6_underlay(bed);
    let ns = &bed.clients[0];
    let before = route_table(ns);
    let _server = setup.start_server_with(&["--listen", "[::]:2002", "--gateway"]);

    let socket = bed.client_socket(0);
    let target = format!("[{UNDERLAY_SERVER}]:2002");
    let mut client = spawn_client_to(&setup, &target, &["--full-tunnel"]);
    assert!(
        client.wait_for_log("full tunnel: all traffic", STARTUP),
        "no full tunnel:\n{}",
        client.log()
    );
    // The server stays reached over the underlay, everything else goes
    // through the tun, IPv6 and IPv4.
    let to_server = route_get6(ns, UNDERLAY_SERVER);
    assert!(
        to_server.contains(&format!("dev {client_dev}")) && !to_server.contains(TUN),
        "{to_server}"
    );
    let elsewhere = route_get6(ns, "2001:2:0:9::1");
    assert!(elsewhere.contains(&format!("dev {TUN}")), "{elsewhere}");
    let v4 = ns.run("ip", &["route", "get", "198.18.99.1"]);
    let v4 = String::from_utf8_lossy(&v4.stdout);
    assert!(v4.contains(&format!("dev {TUN}")), "{v4}");
    let changes = svpnctl_json(&socket, &["status"])["host_changes"].to_string();
    assert!(
        changes.contains(&format!("{UNDERLAY_SERVER}/128 dev {client_dev}")),
        "{changes}"
    );
    // The tunnel itself still works, both families inside.
    assert!(
        ping6(ns, SERVER6),
        "no IPv6 through the tunnel:\n{}",
        client.log()
    );
    tcp_round_trip(ns, &bed.server, SERVER_TUNNEL, 7020, 10_000);

    // SIGTERM: the client's routes are as before.
    client
        .terminate(Duration::from_secs(5))
        .expect("client stops");
    assert!(
        wait_until(Duration::from_secs(5), || route_table(ns) == before),
        "routes not as before:\n{before}\nafter:\n{}",
        route_table(ns)
    );
}
