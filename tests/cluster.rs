//! Several servers, one network, their shared state in etcd (issue #17).
//! etcd is Debian's etcd-server, started by each test in a namespace of its
//! own on 198.18.0.0/15 with its data in a temporary directory.

mod common;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use common::etcd::Etcd;
use common::vpn::*;
use common::*;
use simplevpn::cluster::config::{ClusterConfig, EtcdTransport};
use simplevpn::cluster::etcd::Etcd as Client;
use simplevpn::cluster::leases::{Claimant, Family, Leases, Wanted};
use simplevpn::cluster::signed::{Pinned, Records};
use simplevpn::cluster::Cluster;
use simplevpn::keys::{NodeKey, PublicKey};

/// The keys of servers s1 and s2 (in memory), and the pins of both.
fn node_keys() -> ([Arc<NodeKey>; 2], Pinned) {
    let keys = [1, 2].map(|n| Arc::new(NodeKey::from_seed(b"cluster test", n).expect("key")));
    let pinned = [
        ("s1".to_string(), keys[0].public()),
        ("s2".into(), keys[1].public()),
    ]
    .into_iter()
    .collect();
    (keys, pinned)
}

/// Node `node` of a cluster on the plain-HTTP etcd at `url`, pinning
/// `members`, with a lease that outlasts a test.
fn plain_config(url: &str, node: &str, members: &Pinned) -> ClusterConfig {
    ClusterConfig {
        etcd: vec![url.to_string()],
        transport: EtcdTransport::Insecure,
        user: None,
        node: node.into(),
        advertise: "198.18.91.2:2003".parse().expect("addr"),
        lease_ttl: Duration::from_secs(30),
        members: members.clone(),
    }
}

/// A tokio runtime on a thread inside `ns`, so that its sockets are there.
fn in_ns<T: Send>(ns: &Netns, f: impl std::future::Future<Output = T> + Send) -> T {
    ns.enter(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    })
}

#[test]
fn two_servers_granting_at_once_never_hand_out_one_address_twice() {
    if !require_root("two_servers_granting_at_once_never_hand_out_one_address_twice") {
        return;
    }
    let ns = Netns::new("etcdgrant");
    ns.ip(&["addr", "add", "198.18.90.1/32", "dev", "lo"]);
    let etcd = Etcd::start(&ns, Ipv4Addr::new(198, 18, 90, 1));
    let url = etcd.url.clone();
    // A /26: 61 addresses for clients, 80 of them asking at once through
    // two servers, each with its own etcd connection and lease.
    let network = "198.19.0.0/26".parse().expect("net");
    let (keys, pinned) = node_keys();
    let granted = in_ns(&ns, async move {
        let mut tasks = Vec::new();
        for (n, node) in ["s1", "s2"].into_iter().enumerate() {
            let etcd = Client::new(std::slice::from_ref(&url)).expect("client");
            let lease = etcd.grant(Duration::from_secs(30)).await.expect("lease");
            let records = Arc::new(Records::new(node, keys[n].clone(), pinned.clone()));
            let leases = Arc::new(Leases::new(
                etcd,
                "/simplevpn/test/",
                records,
                network,
                None,
            ));
            for i in 0..40u8 {
                let leases = leases.clone();
                let claimant =
                    Claimant::Remote(std::net::IpAddr::from([198, 18, 100 * n as u8 + i, 2]));
                tasks.push(tokio::spawn(async move {
                    leases
                        .claim(&claimant, Wanted::Any(Family::V4), lease, |_| true)
                        .await
                        .ok()
                        .map(|a| (node, a))
                }));
            }
        }
        let mut granted = Vec::new();
        for task in tasks {
            granted.push(task.await.expect("task"));
        }
        granted
    });
    let addresses: Vec<(&str, std::net::IpAddr)> = granted.into_iter().flatten().collect();
    let distinct: HashSet<std::net::IpAddr> = addresses.iter().map(|(_, a)| *a).collect();
    assert_eq!(
        distinct.len(),
        addresses.len(),
        "an address granted twice: {addresses:?}"
    );
    // Every client address of the /26 is granted, and no more.
    assert_eq!(addresses.len(), 61, "{addresses:?}");
    assert!(addresses.iter().any(|(n, _)| *n == "s1") && addresses.iter().any(|(n, _)| *n == "s2"));
    assert!(
        !distinct.contains(&Ipv4Addr::new(198, 19, 0, 1).into()),
        "the servers' own address"
    );
}

#[test]
fn a_key_asking_for_any_address_gets_the_one_it_holds_on_another_server_unless_it_was_taken() {
    if !require_root(
        "a_key_asking_for_any_address_gets_the_one_it_holds_on_another_server_unless_it_was_taken",
    ) {
        return;
    }
    let ns = Netns::new("etcdagain");
    ns.ip(&["addr", "add", "198.18.90.1/32", "dev", "lo"]);
    let etcd = Etcd::start(&ns, Ipv4Addr::new(198, 18, 90, 1));
    let url = etcd.url.clone();
    let ([k1, k2], pinned) = node_keys();
    in_ns(&ns, async move {
        let network = "198.19.0.0/24".parse().expect("net");
        let config = |node: &str| plain_config(&url, node, &pinned);
        let key = |n: u8| Claimant::Key(PublicKey::from_raw(&[n; 32]).expect("key"));
        let any = |_| true;
        // s1 grants before s2 joins; s2 reads who holds what when it joins
        // (its view, which a watch would keep current: none runs here, so
        // it goes stale below).
        let s1 = Cluster::join(config("s1"), network, None, k1)
            .await
            .expect("s1");
        let a = s1
            .claim(&key(1), Wanted::Any(Family::V4), any)
            .await
            .expect("a");
        // Original-protocol clients behind one NAT: an address each.
        let nat = Claimant::Remote([198, 18, 100, 2].into());
        let b = s1
            .claim(&nat, Wanted::Any(Family::V4), any)
            .await
            .expect("b");
        let c = s1
            .claim(&nat, Wanted::Any(Family::V4), any)
            .await
            .expect("c");
        let e = s1
            .claim(&key(3), Wanted::Any(Family::V4), any)
            .await
            .expect("e");
        assert_eq!(HashSet::from([a, b, c, e]).len(), 4, "{a} {b} {c} {e}");

        let s2 = Cluster::join(config("s2"), network, None, k2)
            .await
            .expect("s2");
        // Key 1 asks s2 for any address: it gets the one it holds on s1.
        assert_eq!(
            s2.claim(&key(1), Wanted::Any(Family::V4), any)
                .await
                .expect("again"),
            a
        );
        let d = s2
            .claim(&key(2), Wanted::Any(Family::V4), any)
            .await
            .expect("d");
        assert!(![a, b, c, e].contains(&d), "{d} granted twice");

        // Key 3 leaves s1 and key 4 takes its address there. s2's view
        // still says key 3 holds it: asked by key 3, s2 finds it taken
        // and grants a free one.
        s1.release(&key(3), e).await;
        assert_eq!(
            s1.claim(&key(4), Wanted::Exactly(e), any)
                .await
                .expect("taken over"),
            e
        );
        let f = s2
            .claim(&key(3), Wanted::Any(Family::V4), any)
            .await
            .expect("f");
        assert!(![a, b, c, d, e].contains(&f), "{f} granted twice");
    });
}

#[test]
fn ipv6_leases_sit_beside_the_ipv4_ones_and_follow_their_key_to_another_server() {
    if !require_root("ipv6_leases_sit_beside_the_ipv4_ones_and_follow_their_key_to_another_server")
    {
        return;
    }
    let ns = Netns::new("etcdsix");
    ns.ip(&["addr", "add", "198.18.90.1/32", "dev", "lo"]);
    let etcd = Etcd::start(&ns, Ipv4Addr::new(198, 18, 90, 1));
    let url = etcd.url.clone();
    let ([k1, k2], pinned) = node_keys();
    in_ns(&ns, async move {
        let network = "198.19.0.0/24".parse().expect("net");
        // A /126: two client addresses (::2 and ::3; ::1 is the servers').
        let network6: ipnet::Ipv6Net = "2001:2:0:100::/126".parse().expect("net6");
        let config = |node: &str| plain_config(&url, node, &pinned);
        let key = |n: u8| Claimant::Key(PublicKey::from_raw(&[n; 32]).expect("key"));
        let any = |_| true;
        let v6 = Wanted::Any(Family::V6);
        let s1 = Cluster::join(config("s1"), network, Some(network6), k1)
            .await
            .expect("s1");
        let a4 = s1
            .claim(&key(1), Wanted::Any(Family::V4), any)
            .await
            .expect("a4");
        let a6 = s1.claim(&key(1), v6, any).await.expect("a6");
        assert!(a4.is_ipv4() && a6.is_ipv6(), "{a4} {a6}");
        let std::net::IpAddr::V6(a6_host) = a6 else {
            unreachable!("checked above")
        };
        assert!(network6.contains(&a6_host), "{a6}");
        assert_ne!(
            a6,
            "2001:2:0:100::1".parse::<std::net::IpAddr>().expect("v6")
        );
        let b6 = s1.claim(&key(2), v6, any).await.expect("b6");
        assert_ne!(a6, b6);
        // Both client addresses are held: a third key gets none.
        assert!(
            s1.claim(&key(3), v6, any).await.is_err(),
            "a /126 holds two"
        );

        let s2 = Cluster::join(config("s2"), network, Some(network6), k2)
            .await
            .expect("s2");
        // s2 sees s1's IPv6 leases: where packets for them go.
        assert_eq!(s2.holder(a6).map(|m| m.node.clone()), Some("s1".into()));
        assert!(s2.holds("s1", b6) && !s2.holds("s2", b6));
        // Key 1 fails over to s2: both its addresses follow it.
        assert_eq!(
            s2.claim(&key(1), Wanted::Any(Family::V4), any)
                .await
                .expect("a4 again"),
            a4
        );
        assert_eq!(s2.claim(&key(1), v6, any).await.expect("a6 again"), a6);
        // Another key asking s2 for a6 exactly finds it taken.
        assert!(s2.claim(&key(2), Wanted::Exactly(a6), any).await.is_err());
        // Released on s1 (key 2 left): free for another key on s2.
        s1.release(&key(2), b6).await;
        assert_eq!(
            s2.claim(&key(3), Wanted::Exactly(b6), any)
                .await
                .expect("b6 freed"),
            b6
        );
    });
}

/// Two cluster servers and their etcd, each in a namespace:
/// - etcd on 198.18.90.1 (a /32 on its namespace's lo), reached by s1 over
///   198.18.91.0/24 and by s2 over 198.18.92.0/24; the servers link to each
///   other at 198.18.91.2:2003 and 198.18.92.2:2003, routed by that namespace;
/// - client namespace c1 reaches s1 at 198.18.1.1 and s2 at 198.18.3.1,
///   c2 reaches s2 at 198.18.2.1.
///
/// Each server has its own key, and pins both in `[[cluster.member]]`; a
/// client pins both keys and lists both servers. They allow the client
/// keys `keys`, and also serve the original protocol. etcd is plain
/// http:// (`etcd_insecure`): tests/cluster_trust.rs runs it over mutual TLS.
struct Bed2 {
    // Namespaces first: dropped last, after the daemons.
    etcd_ns: Netns,
    s: [Netns; 2],
    c: [Netns; 2],
    dir: std::path::PathBuf,
    etcd: Etcd,
    server_keys: [(String, String); 2],
    keys: Vec<(String, String)>,
    /// The servers' `lease_ttl` in seconds ([`LEASE_TTL`] unless a test
    /// needs sessions to outlast etcd for longer).
    lease_ttl: u64,
    /// Each server's `network6` (none: IPv4 only).
    network6: [Option<&'static str>; 2],
}

const ETCD_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 90, 1);
const LEASE_TTL: u64 = 6;

impl Bed2 {
    /// etcd over plain http:// (`etcd_insecure`).
    fn new(tag: &str) -> Bed2 {
        Bed2::with_etcd(tag, false)
    }

    /// etcd over TLS, requiring client certificates (mutual TLS).
    fn tls(tag: &str) -> Bed2 {
        Bed2::with_etcd(tag, true)
    }

    fn with_etcd(tag: &str, tls: bool) -> Bed2 {
        let etcd_ns = Netns::new(&format!("{tag}e"));
        let s = [
            Netns::new(&format!("{tag}s1")),
            Netns::new(&format!("{tag}s2")),
        ];
        let c = [
            Netns::new(&format!("{tag}c1")),
            Netns::new(&format!("{tag}c2")),
        ];
        etcd_ns.ip(&["addr", "add", "198.18.90.1/32", "dev", "lo"]);
        // The etcd namespace also routes between the servers (their links).
        let forwarding = etcd_ns.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        assert!(forwarding.status.success(), "{forwarding:?}");
        for (i, server) in s.iter().enumerate() {
            let n = 91 + i;
            link(
                &etcd_ns,
                &format!("198.18.{n}.1/24"),
                server,
                &format!("198.18.{n}.2/24"),
            );
            server.ip(&[
                "route",
                "add",
                "198.18.88.0/21",
                "via",
                &format!("198.18.{n}.1"),
            ]);
        }
        link(&s[0], "198.18.1.1/24", &c[0], "198.18.1.2/24");
        link(&s[1], "198.18.3.1/24", &c[0], "198.18.3.2/24");
        link(&s[1], "198.18.2.1/24", &c[1], "198.18.2.2/24");
        // etcd first: if it fails to start, no directory is left behind.
        let etcd = match tls {
            true => Etcd::start_tls(&etcd_ns, ETCD_ADDRESS),
            false => Etcd::start(&etcd_ns, ETCD_ADDRESS),
        };
        let dir = std::env::temp_dir().join(format!("{}-dir", etcd_ns.name()));
        std::fs::create_dir_all(&dir).expect("bed directory");
        let keygen = |name: &str| {
            keygen_at(
                dir.join(format!("{name}.key"))
                    .to_str()
                    .expect("utf-8")
                    .to_string(),
            )
        };
        let server_keys = [keygen("s1"), keygen("s2")];
        // The last key is not in the servers' command lines: added live.
        let keys = (0..4).map(|i| keygen(&format!("client{i}"))).collect();
        Bed2 {
            etcd_ns,
            s,
            c,
            dir,
            etcd,
            server_keys,
            keys,
            lease_ttl: LEASE_TTL,
            network6: [None; 2],
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().expect("utf-8").to_string()
    }

    fn socket(&self, server: usize) -> String {
        self.path(&format!("s{}.sock", server + 1))
    }

    /// Starts server `i` (0 or 1) and waits until it has joined and serves.
    fn server(&self, i: usize) -> Daemon {
        let server = self.spawn_server(i);
        self.wait_ready(i, &server);
        server
    }

    /// Starts server `i` (0 or 1) without waiting for it.
    fn spawn_server(&self, i: usize) -> Daemon {
        let config = self.path(&format!("s{}.toml", i + 1));
        let advertise = ["198.18.91.2:2003", "198.18.92.2:2003"][i];
        let transport = match &self.etcd.tls {
            Some(tls) => tls.config_lines(),
            None => "etcd_insecure = true\n".into(),
        };
        std::fs::write(
            &config,
            format!(
                "[cluster]\netcd = [\"{}\"]\n{transport}node = \"s{}\"\nadvertise = \"{advertise}\"\nlease_ttl = {}\n{}",
                self.etcd.url,
                i + 1,
                self.lease_ttl,
                members(&self.server_keys),
            ),
        )
        .expect("config");
        let (socket, state) = (self.socket(i), self.path(&format!("state{}", i + 1)));
        let mut args = vec![
            "server",
            "--config",
            &config,
            "--network",
            NETWORK,
            "--control",
            &socket,
            "--state-dir",
            &state,
            "--user",
            "nobody",
            "--key",
            &self.server_keys[i].0,
            "--legacy",
            // The load generators hold many original-protocol sessions from
            // one address each (as behind a NAT).
            "--legacy-max-per-source",
            "1024",
        ];
        for (_, public) in &self.keys[..3] {
            args.extend_from_slice(&["--peer", public]);
        }
        if let Some(network6) = self.network6[i] {
            args.extend_from_slice(&["--network6", network6]);
        }
        self.s[i].spawn_env(SIMPLEVPND, &args, &[("RUST_LOG", "info")])
    }

    /// Waits until server `i` has joined and serves.
    fn wait_ready(&self, i: usize, server: &Daemon) {
        assert!(
            server.wait_for_log("server ready", STARTUP),
            "server {i} did not start:\n{}",
            server.log()
        );
        assert!(
            server.log().contains("joined the cluster"),
            "{}",
            server.log()
        );
    }

    /// Starts a TLS client with key `key` in namespace `ns`, listing
    /// `servers`, and waits for its grant; returns it and its address.
    fn client(&self, ns: usize, key: usize, servers: &[&str]) -> (Daemon, Ipv4Addr) {
        let client = self.spawn_client(ns, &self.keys[key].0, servers);
        assert!(
            client.wait_for_log("granted", STARTUP),
            "client {key} got no grant:\n{}",
            client.log()
        );
        let address = tun_address(&self.c[ns]).expect("the tun has the granted address");
        (client, address)
    }

    /// Starts a TLS client with the key file `key` in namespace `ns`,
    /// listing `servers` and pinning both servers' keys.
    fn spawn_client(&self, ns: usize, key: &str, servers: &[&str]) -> Daemon {
        let name = std::path::Path::new(key)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("client");
        let socket = self.path(&format!("{name}.sock"));
        let mut args = vec!["client", "--control", &socket, "--user", "nobody"];
        for server in servers {
            args.extend_from_slice(&["-s", server]);
        }
        args.extend_from_slice(&[
            "--key",
            key,
            "--server-key",
            &self.server_keys[0].1,
            "--server-key",
            &self.server_keys[1].1,
        ]);
        self.c[ns].spawn(SIMPLEVPND, &args)
    }
}

impl Drop for Bed2 {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `[[cluster.member]]` tables of servers s1, s2... with these keys
/// (path, public).
fn members(keys: &[(String, String)]) -> String {
    keys.iter()
        .enumerate()
        .map(|(i, (_, public))| {
            format!(
                "[[cluster.member]]\nnode = \"s{}\"\nkey = \"{public}\"\n",
                i + 1
            )
        })
        .collect()
}

/// The tunnel address of the tun in `ns`, once it has one.
fn tun_address(ns: &Netns) -> Option<Ipv4Addr> {
    let mut found = None;
    wait_until(STARTUP, || {
        found = ns.ipv4_addrs(TUN).first().map(|(a, _)| *a);
        found.is_some()
    });
    found
}

/// How many times `needle` is in the daemon's log.
fn count(daemon: &Daemon, needle: &str) -> usize {
    daemon.log().matches(needle).count()
}

/// The addresses `svpnctl --json peers` lists on a server.
fn listed(socket: &str) -> Vec<Ipv4Addr> {
    svpnctl_json(socket, &["peers"])
        .as_array()
        .map(|peers| {
            peers
                .iter()
                .filter_map(|p| p["address"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_servers_serve_one_network_and_a_client_fails_over_keeping_its_address() {
    if !require_root("two_servers_serve_one_network_and_a_client_fails_over_keeping_its_address") {
        return;
    }
    let bed = Bed2::new("clfail");
    let mut s1 = bed.server(0);
    let s2 = bed.server(1);
    // a in c1 lists both servers (s1 first), b in c2 only s2.
    let (a, a_address) = bed.client(0, 0, &["198.18.1.1", "198.18.3.1"]);
    let (_b, b_address) = bed.client(1, 1, &["198.18.2.1"]);
    assert_ne!(a_address, b_address, "one network, distinct addresses");
    assert_eq!(listed(&bed.socket(0)), [a_address]);
    assert_eq!(listed(&bed.socket(1)), [b_address]);
    // Across servers: over their link, both ways, TCP and ping.
    tcp_round_trip(&bed.c[0], &bed.c[1], b_address, 7000, 200_000);
    tcp_round_trip(&bed.c[1], &bed.c[0], a_address, 7005, 200_000);
    ping(&bed.c[0], b_address);

    // svpnctl status lists the members and the link s1 dialed to s2.
    let status = svpnctl_json(&bed.socket(0), &["status"]);
    let cluster = &status["cluster"];
    assert_eq!(cluster["node"], "s1", "{status}");
    assert_eq!(cluster["health"], "reachable", "{status}");
    let members: Vec<&str> = cluster["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["node"].as_str())
        .collect();
    assert_eq!(members, ["s1", "s2"], "{status}");
    let link = &cluster["links"][0];
    assert_eq!(link["node"], "s2", "{status}");
    assert_eq!(link["remote"], "198.18.92.2:2003", "{status}");
    assert_eq!(link["up"], true, "{status}");
    assert!(link["tx_packets"].as_u64() > Some(3), "{status}");
    let text = svpnctl(&bed.socket(0), &["status"], None);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("link") && text.contains("s2 at 198.18.92.2:2003 up"),
        "{text}"
    );

    // s1 dies without a word: a goes on to s2 and gets its address back
    // (the lease moves: it has not expired yet).
    let killed = std::time::Instant::now();
    s1.kill();
    assert!(
        wait_until(Duration::from_secs(30), || count(&a, "granted") >= 2),
        "a was not granted again within 30 s:\n{}",
        a.log()
    );
    let took = killed.elapsed();
    assert!(
        s2.log().contains(&format!("granted {a_address}")),
        "s2 granted a its old address:\n{}",
        s2.log()
    );
    assert_eq!(tun_address(&bed.c[0]), Some(a_address));
    let mut now_on_s2 = listed(&bed.socket(1));
    now_on_s2.sort();
    let mut both = vec![a_address, b_address];
    both.sort();
    assert_eq!(now_on_s2, both);
    eprintln!("failover took {took:?}");
    // s1's membership ends with its etcd lease.
    expect_log(
        &s2,
        "a server left the cluster",
        Duration::from_secs(LEASE_TTL + 5),
    );
    let status = svpnctl_json(&bed.socket(1), &["status"]);
    assert_eq!(
        status["cluster"]["members"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    // Traffic between a and b, both on s2 now.
    tcp_round_trip(&bed.c[0], &bed.c[1], b_address, 7001, 100_000);
    tcp_round_trip(&bed.c[1], &bed.c[0], a_address, 7002, 100_000);
}

#[test]
fn a_ban_made_on_one_server_holds_on_the_other_within_two_seconds() {
    if !require_root("a_ban_made_on_one_server_holds_on_the_other_within_two_seconds") {
        return;
    }
    let bed = Bed2::new("clban");
    let _s1 = bed.server(0);
    let s2 = bed.server(1);
    let (a, a_address) = bed.client(0, 0, &["198.18.1.1", "198.18.3.1"]);
    let out = svpnctl(
        &bed.socket(0),
        &[
            "kick",
            "--ban",
            "60s",
            "--reason",
            "abuse",
            &a_address.to_string(),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let banned = std::time::Instant::now();
    // a tries s2 next (a second later): s2 refuses it as banned.
    assert!(
        wait_until(Duration::from_secs(5), || s2.log().contains("banned for")),
        "s2 did not refuse a as banned:\n{}\n{}",
        s2.log(),
        a.log()
    );
    assert!(
        banned.elapsed() < Duration::from_secs(3),
        "{:?}",
        banned.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        listed(&bed.socket(1)).is_empty(),
        "a was granted on s2:\n{}",
        s2.log()
    );
    assert_eq!(count(&a, "granted"), 1, "{}", a.log());
    // s2 lists the ban with the reason given on s1 (carried in the record).
    let bans = svpnctl_json(&bed.socket(1), &["bans"]);
    assert_eq!(bans[0]["reason"], "kicked by uid 0: abuse", "{bans}");
}

#[test]
fn without_etcd_sessions_go_on_and_new_grants_are_refused_until_it_is_back() {
    if !require_root("without_etcd_sessions_go_on_and_new_grants_are_refused_until_it_is_back") {
        return;
    }
    let mut bed = Bed2::new("cletcd");
    // Sessions go on without etcd for lease_ttl (then the server is
    // fenced): long enough for everything below.
    bed.lease_ttl = 30;
    let s2 = bed.server(1);
    // Both clients on s2 (a through its second link).
    let (_a, a_address) = bed.client(0, 0, &["198.18.3.1"]);
    let (_b, b_address) = bed.client(1, 1, &["198.18.2.1"]);
    bed.etcd.stop();
    expect_log(
        &s2,
        "etcd unreachable",
        Duration::from_secs(bed.lease_ttl / 3 + 5),
    );
    // An address outside the network is refused as such: checked before
    // etcd is asked (which would fail now).
    let outside = Ipv4Addr::new(198, 18, 77, 7);
    assert!(
        ask_s2(&bed, &static_request(outside)).1.is_err(),
        "granted {outside}"
    );
    expect_log(
        &s2,
        &format!("{outside} is not in the pool"),
        Duration::from_secs(5),
    );
    // Established sessions and forwarding go on.
    tcp_round_trip(&bed.c[0], &bed.c[1], b_address, 7003, 50_000);
    tcp_round_trip(&bed.c[1], &bed.c[0], a_address, 7004, 50_000);
    // A new client is refused, and the log says why.
    let ask = |bed: &Bed2| ask_s2(bed, &dynamic_request()).1;
    assert!(ask(&bed).is_err(), "granted without etcd");
    expect_log(&s2, "etcd) is unreachable", Duration::from_secs(5));
    // etcd back: grants again.
    bed.etcd.resume(&bed.etcd_ns);
    expect_log(&s2, "etcd reachable again", Duration::from_secs(10));
    let reply = ask(&bed).expect("a grant once etcd is back");
    assert_eq!(&reply[12..16], &[255, 255, 0, 0], "a grant: {reply:02x?}");
    let granted = Ipv4Addr::new(reply[16], reply[17], reply[18], reply[19]);
    assert!(granted != a_address && granted != b_address, "{granted}");
    assert!(!s2.log().contains("fenced:"), "{}", s2.log());
}

/// Whether `svpnctl --json peer list` on `socket` lists `key`.
fn allows(socket: &str, key: &str) -> bool {
    svpnctl_json(socket, &["peer", "list"])
        .as_array()
        .is_some_and(|list| list.iter().any(|p| p["key"] == key))
}

#[test]
fn a_peer_added_or_removed_on_one_server_is_on_the_other_within_two_seconds() {
    if !require_root("a_peer_added_or_removed_on_one_server_is_on_the_other_within_two_seconds") {
        return;
    }
    let bed = Bed2::new("clpeer");
    let _s1 = bed.server(0);
    let _s2 = bed.server(1);
    let late = bed.keys[3].1.clone();
    assert!(!allows(&bed.socket(1), &late));
    let out = svpnctl(
        &bed.socket(0),
        &["peer", "add", &late, "--name", "late"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(2), || allows(&bed.socket(1), &late)),
        "s2 does not allow the peer added on s1"
    );
    // It may join through s2.
    let (_client, _address) = bed.client(0, 3, &["198.18.3.1"]);
    // Removed through s2: s1 forgets it too.
    let out = svpnctl(&bed.socket(1), &["peer", "remove", "late"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(2), || !allows(&bed.socket(0), &late)),
        "s1 still allows the peer removed on s2"
    );
}

#[test]
fn many_clients_granted_at_once_through_both_servers_get_distinct_addresses() {
    if !require_root("many_clients_granted_at_once_through_both_servers_get_distinct_addresses") {
        return;
    }
    let bed = Bed2::new("clmany");
    let _s1 = bed.server(0);
    let _s2 = bed.server(1);
    const EACH: usize = 150;
    // Original-protocol peers, all from one source address per namespace
    // (as behind a NAT): each must get an address of its own.
    let load = |ns: &Netns, server: &str| {
        ns.spawn(
            env!("CARGO_BIN_EXE_simplevpn-loadgen"),
            &[
                "--server",
                server,
                "--connections",
                &EACH.to_string(),
                // Held until the test ends (the drop stops it): the check
                // needs every peer of both at once, and one may finish
                // granting well before the other.
                "--hold",
                "300",
                // At most max_unauthenticated_per_source (8) in flight.
                "--concurrency",
                "8",
            ],
        )
    };
    let one = load(&bed.c[0], "198.18.1.1:2002");
    let two = load(&bed.c[1], "198.18.2.1:2002");
    // A bound on liveness, not a speed check: on a loaded 2-core machine a
    // grant through etcd can take a second.
    assert!(
        wait_until(Duration::from_secs(90), || {
            listed(&bed.socket(0)).len() + listed(&bed.socket(1)).len() == 2 * EACH
        }),
        "not all granted:\n{}\n{}",
        one.log(),
        two.log()
    );
    let on_s1 = listed(&bed.socket(0));
    let on_s2 = listed(&bed.socket(1));
    let all: HashSet<Ipv4Addr> = on_s1.iter().chain(&on_s2).copied().collect();
    assert_eq!(all.len(), 2 * EACH, "an address granted twice");
    for (gen, name) in [(&one, "c1"), (&two, "c2")] {
        let log = gen.log();
        assert!(
            log.contains(&format!("\"granted\":{EACH}")) && log.contains("\"failed\":0"),
            "loadgen {name}:\n{log}"
        );
    }
}

#[test]
fn a_fenced_server_closes_its_clients_and_they_keep_their_addresses_on_the_other() {
    if !require_root(
        "a_fenced_server_closes_its_clients_and_they_keep_their_addresses_on_the_other",
    ) {
        return;
    }
    let bed = Bed2::new("clfence");
    let s1 = bed.server(0);
    let s2 = bed.server(1);
    // a lists s1 then s2; b (on s2) stays where it is.
    let (a, a_address) = bed.client(0, 0, &["198.18.1.1", "198.18.3.1"]);
    let (_b, b_address) = bed.client(1, 1, &["198.18.2.1"]);
    assert_eq!(listed(&bed.socket(0)), [a_address]);
    // Both servers' peer lists, every 100 ms while it happens: no address
    // is ever on both.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, sockets) = (stop.clone(), [bed.socket(0), bed.socket(1)]);
        std::thread::spawn(move || {
            let mut samples = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let on_s1: HashSet<Ipv4Addr> = listed(&sockets[0]).into_iter().collect();
                let on_s2: HashSet<Ipv4Addr> = listed(&sockets[1]).into_iter().collect();
                let both: Vec<&Ipv4Addr> = on_s1.intersection(&on_s2).collect();
                if !both.is_empty() {
                    return Err(format!("held on both servers at once: {both:?}"));
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(samples)
        })
    };
    // s1 loses etcd (etcd and the link between the servers go on).
    let cut = std::time::Instant::now();
    bed.s[0].ip(&["route", "add", "blackhole", "198.18.90.1/32"]);
    expect_log(&s1, "fenced:", Duration::from_secs(LEASE_TTL + 5));
    let fenced_after = cut.elapsed();
    assert!(
        fenced_after <= Duration::from_secs(LEASE_TTL + 1),
        "fenced only after {fenced_after:?}"
    );
    let status = svpnctl_json(&bed.socket(0), &["status"]);
    assert_eq!(status["cluster"]["health"], "fenced", "{status}");
    assert_eq!(status["cluster"]["fenced"], true, "{status}");
    let text = svpnctl(&bed.socket(0), &["status"], None);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("etcd fenced"), "{text}");
    // a is closed on s1 and comes back on s2 with its address.
    expect_log(
        &s1,
        "disconnected: this server is fenced",
        Duration::from_secs(5),
    );
    assert!(
        wait_until(Duration::from_secs(20), || count(&a, "granted") >= 2),
        "a was not granted again:\n{}",
        a.log()
    );
    assert_eq!(tun_address(&bed.c[0]), Some(a_address));
    assert!(
        wait_until(Duration::from_secs(5), || listed(&bed.socket(1))
            .contains(&a_address)),
        "a is not on s2:\n{}",
        s2.log()
    );
    assert!(listed(&bed.socket(0)).is_empty());
    // s1 grants nothing while fenced.
    let refused = {
        use std::io::{Read, Write};
        let mut stream = bed.c[0]
            .tcp_connect("198.18.1.1:2002".parse().expect("addr"), STARTUP)
            .expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        stream.write_all(&dynamic_request()).expect("ask");
        let mut reply = [0u8; 20];
        stream.read_exact(&mut reply).is_err()
    };
    assert!(refused, "s1 granted while fenced");
    // a and b talk on s2.
    tcp_round_trip(&bed.c[0], &bed.c[1], b_address, 7006, 50_000);
    // etcd back for s1: no longer fenced.
    bed.s[0].ip(&["route", "del", "blackhole", "198.18.90.1/32"]);
    expect_log(&s1, "no longer fenced", Duration::from_secs(15));
    let status = svpnctl_json(&bed.socket(0), &["status"]);
    assert_eq!(status["cluster"]["health"], "reachable", "{status}");
    assert_eq!(status["cluster"]["fenced"], false, "{status}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = watcher
        .join()
        .expect("watcher")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(samples > 20, "only {samples} samples of the peer lists");
    // Both clients are on s2, a with its own address.
    let mut on_s2 = listed(&bed.socket(1));
    on_s2.sort();
    let mut both = vec![a_address, b_address];
    both.sort();
    assert_eq!(on_s2, both);
}

#[test]
fn a_server_cut_off_from_etcd_past_its_lease_gives_up_an_address_granted_elsewhere() {
    if !require_root(
        "a_server_cut_off_from_etcd_past_its_lease_gives_up_an_address_granted_elsewhere",
    ) {
        return;
    }
    let bed = Bed2::new("clsplit");
    let s1 = bed.server(0);
    let s2 = bed.server(1);
    // a lists s1 only.
    let (a, a_address) = bed.client(0, 0, &["198.18.1.1"]);
    // s1 loses etcd (and etcd keeps running): past the TTL its lease, and
    // with it a's address, is gone from etcd; s1 is fenced and closes a.
    bed.s[0].ip(&["route", "add", "blackhole", "198.18.90.1/32"]);
    expect_log(&s1, "fenced:", Duration::from_secs(LEASE_TTL + 5));
    expect_log(
        &s2,
        "a server left the cluster",
        Duration::from_secs(LEASE_TTL + 5),
    );
    // s2 grants a's address to a new client that asks for it.
    let (_holder, reply) = ask_s2(&bed, &static_request(a_address));
    let reply = reply.expect("a grant");
    assert_eq!(&reply[16..20], &a_address.octets(), "{reply:02x?}");
    // s1 reaches etcd again: its lease ran out, it takes a new one and
    // grants again; a, which only knows s1, gets another address there.
    bed.s[0].ip(&["route", "del", "blackhole", "198.18.90.1/32"]);
    expect_log(&s1, "lease ran out", Duration::from_secs(15));
    assert!(
        wait_until(Duration::from_secs(15), || {
            tun_address(&bed.c[0]).is_some_and(|address| address != a_address)
                && count(&a, "granted") >= 2
        }),
        "a was not moved to another address:\n{}",
        a.log()
    );
    assert_eq!(listed(&bed.socket(1)), [a_address]);
    assert!(!listed(&bed.socket(0)).contains(&a_address));
}

/// Waits up to `within` for `needle` in the daemon's log; fails with the log.
fn expect_log(daemon: &Daemon, needle: &str, within: Duration) {
    assert!(
        daemon.wait_for_log(needle, within),
        "{needle:?} not logged within {within:?}:\n{}",
        daemon.log()
    );
}

/// An original-protocol request from c2 to s2: the connection (kept open,
/// it holds what was granted) and the 20-byte reply, if one came.
fn ask_s2(bed: &Bed2, request: &[u8]) -> (std::net::TcpStream, std::io::Result<[u8; 20]>) {
    use std::io::{Read, Write};
    let mut stream = bed.c[1]
        .tcp_connect("198.18.2.1:2002".parse().expect("addr"), STARTUP)
        .expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(request).expect("ask");
    let mut reply = [0u8; 20];
    let reply = stream.read_exact(&mut reply).map(|()| reply);
    (stream, reply)
}

const NETWORK6: &str = "2001:2:0:100::/64";

/// The IPv6 address the client with key `key` holds, as its `svpnctl
/// status` shows it, once it holds one (and, if given, once it is not
/// `other`: the grant after a failover).
fn address6(bed: &Bed2, key: usize, client: &Daemon) -> std::net::Ipv6Addr {
    let name = std::path::Path::new(&bed.keys[key].0)
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("a key file name")
        .to_string();
    let socket = bed.path(&format!("{name}.sock"));
    let mut status = serde_json::Value::Null;
    let granted6 = wait_until(STARTUP, || {
        status = svpnctl_json(&socket, &["status"]);
        status["address6"].is_string()
    });
    assert!(
        granted6,
        "client {key} has no IPv6 address: {status}\n{}",
        client.log()
    );
    let cidr = status["address6"].as_str().unwrap_or_default();
    assert!(cidr.ends_with("/64"), "{status}");
    cidr.split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("an IPv6 address")
}

/// Pings `to` over IPv6 from `ns`, as [`ping`] does over IPv4.
fn ping6(from: &Netns, to: std::net::Ipv6Addr) {
    let mut last = None;
    let answered = wait_until(Duration::from_secs(10), || {
        let ping = from.run("ping", &["-6", "-c", "1", "-W", "1", &to.to_string()]);
        let ok = ping.status.success();
        last = Some(ping);
        ok
    });
    assert!(
        answered,
        "no answer from {to}: {}",
        last.map_or(String::new(), |p| String::from_utf8_lossy(&p.stdout)
            .into_owned())
    );
}

/// Turns duplicate address detection off in `ns`, so that a tun's IPv6
/// address is usable at once.
fn no_dad(ns: &Netns) {
    for scope in ["all", "default"] {
        let setting = format!("net.ipv6.conf.{scope}.accept_dad=0");
        let out = ns.run("sysctl", &["-qw", &setting]);
        assert!(out.status.success(), "{setting}: {out:?}");
    }
}

/// With `network6` the servers share the IPv6 leases as they share the
/// IPv4 ones: each client gets an IPv6 address no other holds, IPv6 and
/// IPv4 cross the link between the servers, and a client that fails over
/// keeps its IPv6 address too.
#[test]
fn two_servers_with_network6_link_both_families_and_a_client_fails_over_keeping_its_ipv6_address() {
    if !require_root(
        "two_servers_with_network6_link_both_families_and_a_client_fails_over_keeping_its_ipv6_address",
    ) {
        return;
    }
    let mut bed = Bed2::new("cl6");
    bed.network6 = [Some(NETWORK6); 2];
    bed.c.iter().for_each(no_dad);
    let mut s1 = bed.server(0);
    let s2 = bed.server(1);
    let (a, a_address) = bed.client(0, 0, &["198.18.1.1", "198.18.3.1"]);
    let (b, b_address) = bed.client(1, 1, &["198.18.2.1"]);
    let (a6, b6) = (address6(&bed, 0, &a), address6(&bed, 1, &b));
    assert_ne!(a6, b6, "one IPv6 network, distinct addresses");
    let network6: ipnet::Ipv6Net = NETWORK6.parse().expect("net6");
    assert!(
        network6.contains(&a6) && network6.contains(&b6),
        "{a6} {b6}"
    );
    // Both families, both ways, over the link; TCP too (whole segments
    // from the offloads, cut into packets for the link).
    ping6(&bed.c[0], b6);
    ping6(&bed.c[1], a6);
    ping(&bed.c[0], b_address);
    ping(&bed.c[1], a_address);
    tcp_round_trip(&bed.c[0], &bed.c[1], b6, 7010, 200_000);
    tcp_round_trip(&bed.c[1], &bed.c[0], a6, 7011, 200_000);
    let status = svpnctl_json(&bed.socket(1), &["status"]);
    assert_eq!(status["cluster"]["dropped_spoofed"], 0, "{status}");

    // s1 dies: a goes on to s2 with both its addresses.
    s1.kill();
    assert!(
        wait_until(Duration::from_secs(30), || count(&a, "granted") >= 2),
        "a was not granted again within 30 s:\n{}",
        a.log()
    );
    assert_eq!(tun_address(&bed.c[0]), Some(a_address));
    assert_eq!(address6(&bed, 0, &a), a6, "a's IPv6 address after failover");
    // s2 holds it for a: it is in s2's peer list, beside b's.
    let mut on_s2 = Vec::new();
    let listed6 = wait_until(STARTUP, || {
        on_s2 = svpnctl_json(&bed.socket(1), &["peers"])
            .as_array()
            .map(|peers| {
                peers
                    .iter()
                    .filter_map(|p| p["address6"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        on_s2.len() == 2
    });
    assert!(listed6, "{on_s2:?}");
    assert!(
        on_s2
            .iter()
            .any(|a| a.split('/').next() == Some(a6.to_string().as_str())),
        "{on_s2:?} {a6}"
    );
    ping6(&bed.c[1], a6);
    ping6(&bed.c[0], b6);
    ping(&bed.c[1], a_address);
    tcp_round_trip(&bed.c[1], &bed.c[0], a6, 7012, 100_000);
    drop(s2);
}

/// A member's key alone does not make a link: the listener admits it only
/// from the address the member advertises in its signed record, refusing
/// it (counted, logged once) from any other.
#[test]
fn a_link_with_a_members_key_from_an_address_it_does_not_advertise_is_refused() {
    if !require_root("a_link_with_a_members_key_from_an_address_it_does_not_advertise_is_refused") {
        return;
    }
    let bed = Bed2::new("cladv");
    let _s1 = bed.server(0);
    let s2 = bed.server(1);
    // s1's namespace has a second address, routed like its advertised one.
    bed.s[0].ip(&["addr", "add", "198.18.91.3/32", "dev", "lo"]);
    let s1_key = &bed.server_keys[0].0;
    let s2_key: PublicKey = bed.server_keys[1].1.parse().expect("s2's key");
    let refused = |from: &str| {
        let member = NodeKey::load(std::path::Path::new(s1_key)).expect("s1's key");
        link_refused(&bed.s[0], member, s2_key, Some(from.parse().expect("addr")))
    };
    assert!(
        refused("198.18.91.3"),
        "s1's key from 198.18.91.3 opened a link"
    );
    assert!(
        refused("198.18.91.3"),
        "s1's key from 198.18.91.3 opened a link"
    );
    assert!(
        !refused("198.18.91.2"),
        "s1's key from its advertised address was refused"
    );
    let status = svpnctl_json(&bed.socket(1), &["status"]);
    assert_eq!(status["cluster"]["links_refused"], 2, "{status}");
    assert_eq!(
        count(&s2, "not from the address it advertises (198.18.91.2)"),
        1,
        "logged once:\n{}",
        s2.log()
    );
}

/// A hand-made IPv6/UDP packet to port 12345, its checksum right (IPv6
/// requires one).
fn udp6_packet(
    source: std::net::Ipv6Addr,
    destination: std::net::Ipv6Addr,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&12345u16.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&source.octets());
    pseudo.extend_from_slice(&destination.octets());
    pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    pseudo.extend_from_slice(&udp);
    if pseudo.len() % 2 == 1 {
        pseudo.push(0);
    }
    let mut sum: u32 = pseudo
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = match !(sum as u16) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend_from_slice(&(udp_len as u16).to_be_bytes());
    packet.extend_from_slice(&[17, 64]);
    packet.extend_from_slice(&source.octets());
    packet.extend_from_slice(&destination.octets());
    packet.extend_from_slice(&udp);
    packet
}

/// The link's source check covers IPv6: a member may send only from IPv6
/// addresses its clients hold.
#[test]
fn an_ipv6_packet_over_a_link_from_a_source_its_member_holds_no_lease_for_is_dropped() {
    if !require_root(
        "an_ipv6_packet_over_a_link_from_a_source_its_member_holds_no_lease_for_is_dropped",
    ) {
        return;
    }
    let mut bed = Bed2::new("cl6spoof");
    bed.network6 = [Some(NETWORK6); 2];
    bed.c.iter().for_each(no_dad);
    let _s1 = bed.server(0);
    let _s2 = bed.server(1);
    let (a, _) = bed.client(0, 0, &["198.18.1.1"]);
    let (b, _) = bed.client(1, 1, &["198.18.2.1"]);
    let (a6, b6) = (address6(&bed, 0, &a), address6(&bed, 1, &b));
    let socket = bed.c[1].udp_bind((b6, 12345).into()).expect("udp socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let spoofed = udp6_packet("2001:2:0:100::dead".parse().expect("v6"), b6, b"spoofed");
    let real = udp6_packet(a6, b6, b"real");
    only_the_real_packet_crosses(&bed, &socket, spoofed, real);
}

/// Every server of a cluster must have the same `network6`: one that sees
/// a member with another (or none) says so.
#[test]
fn a_member_with_another_network6_is_warned_about() {
    if !require_root("a_member_with_another_network6_is_warned_about") {
        return;
    }
    let mut bed = Bed2::new("cl6mix");
    bed.network6 = [Some(NETWORK6), None];
    let s1 = bed.server(0);
    let s2 = bed.server(1);
    let warning = "a member has another network6 than this server";
    // s2 reads s1's record when it joins; s1 sees s2's through its watch.
    assert!(s2.log().contains(warning), "{}", s2.log());
    expect_log(&s1, warning, Duration::from_secs(5));
    assert!(
        s1.log().contains("theirs=none ours=2001:2:0:100::/64"),
        "{}",
        s1.log()
    );
}

/// An original-protocol session from client namespace `ns` to `server`
/// (HOST:PORT) asking for any address: the connection and its address.
fn raw_session(bed: &Bed2, ns: usize, server: &str) -> (std::net::TcpStream, Ipv4Addr) {
    use std::io::{Read, Write};
    let mut stream = bed.c[ns]
        .tcp_connect(server.parse().expect("addr"), STARTUP)
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream
        .set_read_timeout(Some(STARTUP))
        .expect("read timeout");
    stream.write_all(&dynamic_request()).expect("ask");
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply).expect("a grant");
    (
        stream,
        Ipv4Addr::new(reply[16], reply[17], reply[18], reply[19]),
    )
}

/// Whether `marker` arrives on `stream` within `within` (whatever else
/// arrives with it).
fn arrives(stream: &mut std::net::TcpStream, marker: &[u8], within: Duration) -> bool {
    use std::io::Read;
    let deadline = std::time::Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        if seen.windows(marker.len()).any(|w| w == marker) {
            return true;
        }
    }
    false
}

/// The links between two servers form every time: the pair started twenty
/// times on one etcd (both at once, so that each registers while the other
/// reads the cluster's state and starts watching), a session on each, and a
/// packet from each side arriving at the other within a few seconds. Before
/// the fix a server sometimes never learned of the other: its watch began
/// after it had read the members, and a member registered in between was
/// missed.
#[test]
fn two_servers_started_twenty_times_link_every_time() {
    if !require_root("two_servers_started_twenty_times_link_every_time") {
        return;
    }
    let bed = Bed2::new("clflake");
    let started = std::time::Instant::now();
    for round in 0..20 {
        let mut servers = [bed.spawn_server(0), bed.spawn_server(1)];
        for (i, server) in servers.iter().enumerate() {
            bed.wait_ready(i, server);
        }
        let mut sessions = [
            raw_session(&bed, 0, "198.18.1.1:2002"),
            raw_session(&bed, 1, "198.18.2.1:2002"),
        ];
        for (from, to) in [(0, 1), (1, 0)] {
            let (a, b) = (sessions[from].1, sessions[to].1);
            let marker = format!("round {round} from {a} to {b}");
            let packet = udp_packet(a, b, marker.as_bytes());
            // The link is dialed on the first packet for the other server
            // (dropped meanwhile): send until one arrives.
            let mut crossed = false;
            for _ in 0..20 {
                use std::io::Write;
                sessions[from].0.write_all(&packet).expect("send");
                if arrives(
                    &mut sessions[to].0,
                    marker.as_bytes(),
                    Duration::from_millis(250),
                ) {
                    crossed = true;
                    break;
                }
            }
            let status = svpnctl_json(&bed.socket(from), &["status"]);
            assert!(
                crossed,
                "round {round}: no packet from s{}'s client reached s{}'s within 5 s; its status:\n{status}\n{}",
                from + 1,
                to + 1,
                servers[from].log()
            );
            let members: Vec<&str> = status["cluster"]["members"]
                .as_array()
                .expect("members")
                .iter()
                .filter_map(|m| m["node"].as_str())
                .collect();
            assert_eq!(members, ["s1", "s2"], "round {round}: {status}");
            assert_eq!(
                status["cluster"]["links"][0]["up"], true,
                "round {round}: {status}"
            );
        }
        drop(sessions);
        // Stopped (their leases revoked) before the next round.
        for (i, server) in servers.iter_mut().enumerate() {
            assert!(
                server.terminate(Duration::from_secs(10)).is_some(),
                "round {round}: s{} did not stop",
                i + 1
            );
        }
    }
    eprintln!("twenty rounds took {:?}", started.elapsed());
}

#[test]
fn an_invitation_made_on_one_server_is_redeemed_on_the_other_once() {
    if !require_root("an_invitation_made_on_one_server_is_redeemed_on_the_other_once") {
        return;
    }
    let bed = Bed2::new("clinv");
    let _s1 = bed.server(0);
    let _s2 = bed.server(1);
    // Made on s1, dialing s2 (client namespace 1 reaches s2 at 198.18.3.1).
    let out = svpnctl(
        &bed.socket(0),
        &["invite", "joiner", "--endpoint", "198.18.3.1:2002"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let token = line
        .trim()
        .strip_prefix("simplevpnd join ")
        .expect("a join line")
        .to_string();
    let (config, key) = (bed.path("joiner.toml"), bed.path("joiner.key"));
    let join = |token: &str, key: &str| {
        bed.c[0].run(
            SIMPLEVPND,
            &[
                "join",
                token,
                "--config-out",
                &config,
                "--key",
                key,
                "--force",
            ],
        )
    };
    let out = join(&token, &key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = pubkey(&key);
    // Allowed on both servers, and used as far as either is concerned.
    for server in [0, 1] {
        assert!(
            wait_until(Duration::from_secs(2), || allows(
                &bed.socket(server),
                &public
            )),
            "server {server} does not allow the joined key"
        );
        let list = svpnctl_json(&bed.socket(server), &["invite", "list"]);
        assert_eq!(list[0]["state"], "used", "{list}");
    }
    // The same secret through s1: refused, nothing added.
    let through_s1 = simplevpn::join::Token {
        endpoint: "198.18.1.1:2002".into(),
        ..simplevpn::join::Token::decode(&token).expect("token")
    }
    .encode()
    .expect("encode");
    let before = svpnctl_json(&bed.socket(0), &["peer", "list"]);
    let out = join(&through_s1, &bed.path("second.key"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("used already"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(svpnctl_json(&bed.socket(0), &["peer", "list"]), before);
}

// etcd is storage, not authority: etcd over mutual TLS, a key per server
// pinned by every server and by the clients, every record signed.

const PREFIX: &str = "/simplevpn/198.19.0.0_16/";

fn ping(from: &Netns, to: Ipv4Addr) {
    // Within 10 s: a link that broke (a server restarted) is dialed again
    // a second after its first failed write.
    let mut last = None;
    let answered = wait_until(Duration::from_secs(10), || {
        let ping = from.run("ping", &["-c", "1", "-W", "1", &to.to_string()]);
        let ok = ping.status.success();
        last = Some(ping);
        ok
    });
    assert!(
        answered,
        "{}",
        last.map_or(String::new(), |p| String::from_utf8_lossy(&p.stdout)
            .into_owned())
    );
}

fn member_names(socket: &str) -> Vec<String> {
    let status = svpnctl_json(socket, &["status"]);
    status["cluster"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["node"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn two_servers_with_their_own_keys_on_mutual_tls_etcd_trust_no_forged_record() {
    if !require_root("two_servers_with_their_own_keys_on_mutual_tls_etcd_trust_no_forged_record") {
        return;
    }
    let bed = Bed2::tls("trust");
    let s1 = bed.server(0);
    let mut s2 = bed.server(1);
    // Clients pinning both keys get addresses on both servers, and traffic
    // crosses the servers' link.
    let (_a, a_address) = bed.client(0, 0, &["198.18.1.1"]);
    let (b, b_address) = bed.client(1, 1, &["198.18.2.1"]);
    assert_ne!(a_address, b_address);
    ping(&bed.c[0], b_address);
    tcp_round_trip(&bed.c[1], &bed.c[0], a_address, 7100, 100_000);
    assert_eq!(member_names(&bed.socket(0)), ["s1", "s2"]);

    // A peer added live on s1 is signed by s1 and allowed on s2.
    let late = bed.keys[3].1.clone();
    let out = svpnctl(
        &bed.socket(0),
        &["peer", "add", &late, "--name", "late"],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        wait_until(Duration::from_secs(3), || allows(&bed.socket(1), &late)),
        "the live peer did not reach s2"
    );

    // The neighbour, holding etcd's client certificate, forges records with
    // etcdctl, as anyone with etcd access would.
    let (forger_file, forger) = keygen_at(bed.path("forger.key"));
    let b_key = bed.keys[1].1.clone();
    let tls = bed.etcd.tls.as_ref().expect("etcd over TLS");
    let etcdctl = |args: &[&str]| {
        let mut all = vec![
            "--endpoints".to_string(),
            bed.etcd.url.clone(),
            "--cacert".into(),
            tls.ca.display().to_string(),
            "--cert".into(),
            tls.cert.display().to_string(),
            "--key".into(),
            tls.key.display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = bed.etcd_ns.run("etcdctl", &all);
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let put = |key: String, value: String| {
        etcdctl(&["put", &key, "--", &value]);
    };
    let real = etcdctl(&[
        "get",
        "--print-value-only",
        &format!("{PREFIX}peers/{late}"),
    ]);
    let real = real.trim_end().to_string();
    assert!(real.contains("\"signature\""), "{real}");
    let forged_at = format!("{PREFIX}peers/{forger}");
    // A copy of the real record under the forger's key, then the same with
    // the key inside swapped too.
    put(forged_at.clone(), real.clone());
    put(forged_at, real.replace(&late, &forger));
    // An unsigned membership of the forger's own server.
    put(
        format!("{PREFIX}members/evil"),
        format!("{{\"node\":\"evil\",\"advertise\":\"198.18.90.1:2003\",\"key\":\"{forger}\"}}"),
    );
    // b's address claimed by a fake node.
    put(
        format!("{PREFIX}leases/{b_address}"),
        format!("evil key:{b_key}"),
    );
    // Bans at 2^63 and u64::MAX seconds: unsigned, and in an envelope of a
    // node that is not a member.
    put(format!("{PREFIX}bans/key:{b_key}"), u64::MAX.to_string());
    put(
        format!("{PREFIX}bans/key:{late}"),
        format!(
            "{{\"node\":\"evil\",\"signature\":\"AAAA\",\"value\":\"{}\"}}",
            1u64 << 63
        ),
    );

    // No server trusts any of it: the forged peer is not allowed, the
    // fake member is not listed, b is neither moved nor banned.
    std::thread::sleep(Duration::from_secs(2));
    for server in 0..2 {
        assert!(
            !allows(&bed.socket(server), &forger),
            "s{} allows the forger",
            server + 1
        );
        assert_eq!(member_names(&bed.socket(server)), ["s1", "s2"]);
    }
    assert_eq!(b.log().matches("granted").count(), 1, "{}", b.log());
    ping(&bed.c[0], b_address);
    let status = svpnctl_json(&bed.socket(0), &["status"]);
    assert!(
        status["cluster"]["records_refused"].as_u64() >= Some(4),
        "{status}"
    );
    assert!(
        s1.log().contains("not signed by a pinned member"),
        "{}",
        s1.log()
    );

    // The forger's key cannot connect to either server.
    let forged = bed.spawn_client(0, &forger_file, &["198.18.1.1"]);
    assert!(
        !forged.wait_for_log("granted", Duration::from_secs(4)),
        "the forged peer got in:\n{}",
        forged.log()
    );
    drop(forged);

    // s2 restarts over the forged records (a ban at 2^63 used to panic a
    // server at join): it joins, and b gets its address back there.
    s2.kill();
    let s2 = bed.server(1);
    assert!(
        wait_until(Duration::from_secs(20), || b
            .log()
            .matches("granted")
            .count()
            >= 2),
        "b was not granted again:\n{}\n{}",
        b.log(),
        s2.log()
    );
    assert_eq!(tun_address(&bed.c[1]), Some(b_address));
    ping(&bed.c[0], b_address);
}

/// Only pinned members may open a link: a TLS client with another key is
/// refused by the link listener, one with a member's key is not.
#[test]
fn the_link_listener_admits_only_pinned_members() {
    if !require_root("the_link_listener_admits_only_pinned_members") {
        return;
    }
    let bed = Bed2::tls("trlink");
    // s1 runs: links are admitted only from the address a member's own
    // record advertises.
    let _s1 = bed.server(0);
    let _s2 = bed.server(1);
    let member = NodeKey::load(std::path::Path::new(&bed.server_keys[0].0)).expect("s1's key");
    let stranger = NodeKey::load(std::path::Path::new(&bed.keys[0].0)).expect("a client key");
    let s2_key = bed.server_keys[1].1.parse().expect("s2's key");
    let refused = |key: NodeKey| link_refused(&bed.s[0], key, s2_key, None);
    assert!(refused(stranger), "a key that is no member's opened a link");
    assert!(!refused(member), "s1's pinned key was refused");
}

/// `http://` without `etcd_insecure` stops the start with one line naming
/// the field, exit code 2, before anything is touched; so does a server
/// whose own `[[cluster.member]]` pins another key.
#[test]
fn plain_http_etcd_and_a_wrong_own_key_are_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("svpn-cltrust-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = |name: &str| dir.join(name).to_str().expect("utf-8").to_string();
    let (key, config) = (path("server.key"), path("s.toml"));
    let (_, public) = keygen_at(key.clone());
    let (_, other) = keygen_at(path("other.key"));
    let run = |text: String| {
        std::fs::write(&config, text).expect("config");
        std::process::Command::new(SIMPLEVPND)
            .args([
                "server",
                "--config",
                &config,
                "--network",
                NETWORK,
                "--key",
                &key,
                "--user",
                "nobody",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run simplevpnd")
    };
    let cluster = |etcd: &str, pinned: &str| {
        format!(
            "[cluster]\n{etcd}node = \"s1\"\nadvertise = \"198.18.91.2:2003\"\n\
             [[cluster.member]]\nnode = \"s1\"\nkey = \"{pinned}\"\n"
        )
    };
    let http = run(cluster("etcd = [\"http://198.18.90.1:2379\"]\n", &public));
    // The own key is checked once the key file is read, as root.
    let root = require_root("plain_http_etcd_and_a_wrong_own_key_are_refused_at_start (own key)");
    let wrong = root.then(|| {
        run(cluster(
            "etcd = [\"http://198.18.90.1:2379\"]\netcd_insecure = true\n",
            &other,
        ))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&http.stderr);
    assert_eq!(http.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("simplevpnd: cluster.etcd: \"http://198.18.90.1:2379\""),
        "{stderr}"
    );
    let Some(wrong) = wrong else {
        return;
    };
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("simplevpnd: cluster.member:") && stderr.contains(&public),
        "{stderr}"
    );
}

/// etcd's own user authentication: a server logs in with `etcd_user` and
/// `etcd_password_file`, and logs in again when etcd lets its token expire
/// (etcd's simple tokens here live 2 s unused).
#[test]
fn a_server_logs_in_to_etcd_and_again_when_its_token_expires() {
    use simplevpn::cluster::config::EtcdUser;
    use simplevpn::cluster::etcd::pb::authpb::{permission, Permission};
    use simplevpn::cluster::etcd::pb::etcdserverpb::{
        auth_client::AuthClient, AuthEnableRequest, AuthRoleAddRequest,
        AuthRoleGrantPermissionRequest, AuthUserAddRequest, AuthUserGrantRoleRequest,
    };
    if !require_root("a_server_logs_in_to_etcd_and_again_when_its_token_expires") {
        return;
    }
    let ns = Netns::new("etcdauth");
    ns.ip(&["addr", "add", "198.18.90.1/32", "dev", "lo"]);
    let etcd = Etcd::start_flags(
        &ns,
        ETCD_ADDRESS,
        &["--auth-token", "simple", "--auth-token-ttl", "2"],
    );
    let password_file = std::env::temp_dir().join(format!("{}-password", ns.name()));
    std::fs::write(&password_file, "s3cret\n").expect("password file");
    let url = etcd.url.clone();
    let ([k1, _], pinned) = node_keys();
    let config = ClusterConfig {
        etcd: vec![url.clone()],
        transport: EtcdTransport::Insecure,
        user: Some(EtcdUser {
            user: "svpn".into(),
            password_file: password_file.clone(),
        }),
        node: "s1".into(),
        advertise: "198.18.91.2:2003".parse().expect("addr"),
        lease_ttl: Duration::from_secs(30),
        members: pinned,
    };
    in_ns(&ns, async move {
        let channel = tonic::transport::Channel::from_shared(url.clone())
            .expect("url")
            .connect()
            .await
            .expect("etcd");
        let mut auth = AuthClient::new(channel);
        let user = |name: &str, password: &str| AuthUserAddRequest {
            name: name.into(),
            password: password.into(),
            ..Default::default()
        };
        let grant = |user: &str, role: &str| AuthUserGrantRoleRequest {
            user: user.into(),
            role: role.into(),
        };
        auth.user_add(user("root", "rootpw")).await.expect("root");
        auth.user_grant_role(grant("root", "root"))
            .await
            .expect("root role");
        auth.role_add(AuthRoleAddRequest {
            name: "simplevpn".into(),
        })
        .await
        .expect("role");
        auth.role_grant_permission(AuthRoleGrantPermissionRequest {
            name: "simplevpn".into(),
            perm: Some(Permission {
                perm_type: permission::Type::Readwrite as i32,
                key: b"/simplevpn/".to_vec(),
                range_end: b"/simplevpn0".to_vec(),
            }),
        })
        .await
        .expect("permission");
        auth.user_add(user("svpn", "s3cret")).await.expect("user");
        auth.user_grant_role(grant("svpn", "simplevpn"))
            .await
            .expect("grant");
        auth.auth_enable(AuthEnableRequest {})
            .await
            .expect("auth on");

        // Without credentials etcd refuses; with them the server joins.
        let anonymous = Client::new(std::slice::from_ref(&url)).expect("client");
        assert!(anonymous.get("/simplevpn/x").await.is_err());
        let network = "198.19.0.0/24".parse().expect("net");
        let s1 = Cluster::join(config, network, None, k1)
            .await
            .expect("joins");
        let key = |n: u8| Claimant::Key(PublicKey::from_raw(&[n; 32]).expect("key"));
        s1.claim(&key(1), Wanted::Any(Family::V4), |_| true)
            .await
            .expect("a grant");
        // Its token expires unused; the next call logs in again.
        tokio::time::sleep(Duration::from_secs(4)).await;
        s1.claim(&key(2), Wanted::Any(Family::V4), |_| true)
            .await
            .expect("a grant after the token expired");
    });
    let _ = std::fs::remove_file(&password_file);
}

/// A member may send over its link only packets from addresses its own
/// clients hold (or their routes): one from another source is dropped and
/// counted, one from its client's address is delivered.
#[test]
fn a_packet_over_a_link_from_a_source_its_member_holds_no_lease_for_is_dropped() {
    if !require_root("a_packet_over_a_link_from_a_source_its_member_holds_no_lease_for_is_dropped")
    {
        return;
    }
    let bed = Bed2::new("clspoof");
    let _s1 = bed.server(0);
    let _s2 = bed.server(1);
    let (_a, a_address) = bed.client(0, 0, &["198.18.1.1"]);
    let (_b, b_address) = bed.client(1, 1, &["198.18.2.1"]);
    // b listens on the port udp_packet sends to.
    let socket = bed.c[1]
        .udp_bind((b_address, 12345).into())
        .expect("udp socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let with_checksum = |mut packet: Vec<u8>| {
        let sum = packet[..20]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum::<u32>();
        let folded = (sum & 0xffff) + (sum >> 16);
        let folded = (folded & 0xffff) + (folded >> 16);
        packet[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
        packet
    };
    let spoofed = with_checksum(udp_packet(
        Ipv4Addr::new(198, 19, 250, 250),
        b_address,
        b"spoofed",
    ));
    let real = with_checksum(udp_packet(a_address, b_address, b"real"));
    only_the_real_packet_crosses(&bed, &socket, spoofed, real);
}

/// Sends `spoofed`, then `real` (whose payload is `real`), to s2 over a link
/// dialed with s1's key, as a compromised s1 (or anyone holding its key)
/// would: only `real` reaches `socket`, and s2 counts one spoofed packet.
fn only_the_real_packet_crosses(
    bed: &Bed2,
    socket: &std::net::UdpSocket,
    spoofed: Vec<u8>,
    real: Vec<u8>,
) {
    let member = NodeKey::load(std::path::Path::new(&bed.server_keys[0].0)).expect("s1's key");
    let s2_key = bed.server_keys[1].1.parse().expect("s2's key");
    in_ns(&bed.s[0], async move {
        use tokio::io::AsyncWriteExt;
        let config = simplevpn::tls::client_config(&member, s2_key).expect("tls config");
        let tcp = tokio::net::TcpStream::connect("198.18.92.2:2003")
            .await
            .expect("connect");
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(simplevpn::tls::server_name(), tcp)
            .await
            .expect("a member's link");
        tls.write_all(&spoofed).await.expect("write");
        tls.write_all(&real).await.expect("write");
        tls.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    let mut buffer = [0u8; 64];
    let (n, _) = socket.recv_from(&mut buffer).expect("the real packet");
    assert_eq!(&buffer[..n], b"real");
    assert!(
        socket.recv_from(&mut buffer).is_err(),
        "a second packet arrived: {:?}",
        &buffer
    );
    let status = svpnctl_json(&bed.socket(1), &["status"]);
    assert_eq!(status["cluster"]["dropped_spoofed"], 1, "{status}");
}

/// Whether s2's link listener refuses a link dialed from `ns` with `key`
/// (from the address `from` when given): the TLS handshake fails, or the
/// link is closed at once. TLS 1.3 shows a refused client certificate on
/// the first read; nothing comes on an open link, so one still open after
/// 2 s was admitted.
fn link_refused(ns: &Netns, key: NodeKey, s2_key: PublicKey, from: Option<Ipv4Addr>) -> bool {
    in_ns(ns, async move {
        use tokio::io::AsyncReadExt;
        let config = simplevpn::tls::client_config(&key, s2_key).expect("tls config");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        if let Some(from) = from {
            socket.bind((from, 0).into()).expect("bind");
        }
        let tcp = socket
            .connect("198.18.92.2:2003".parse().expect("addr"))
            .await
            .expect("connect");
        let connector = tokio_rustls::TlsConnector::from(config);
        let Ok(mut tls) = connector.connect(simplevpn::tls::server_name(), tcp).await else {
            return true;
        };
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(2), tls.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    })
}
