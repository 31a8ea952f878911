//! Tests for the tun: `privsep::netdev` (creation, netlink) and `daemon::tun`
//! (packet I/O). They need root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip`
//! (iproute2). Every test runs in a network namespace of its own,
//! `svnd-<pid>-<n>`, which is deleted afterwards even when the test panics;
//! nothing is ever created in the root namespace. Addresses are from
//! 198.18.0.0/15 only.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

mod common;

use ipnet::Ipv4Net;
use simplevpn::daemon::tun::AsyncTun;
use simplevpn::privsep::netdev::{create_tun, LinkConfig, NetdevError};
use simplevpn::privsep::policy::HostRoute;

const TUN: &str = "svtun-test";
const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Namespace harness
// ---------------------------------------------------------------------------

/// Runs `ip -n NS ARGS...` and returns (success, stdout).
fn ip(ns: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("run ip");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Runs `body(ns_name)` on a current-thread tokio runtime (for the tun's
/// packet I/O; netdev's own calls block), on a thread that has joined a
/// fresh network namespace (deleted afterwards, even on panic).
fn in_netns<F, Fut>(body: F)
where
    F: FnOnce(String) -> Fut + Send,
    Fut: Future<Output = ()>,
{
    if !common::require_root("netdev") {
        return;
    }
    let ns = common::Netns::new("netdev");
    let name = ns.name().to_string();
    ns.enter(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build runtime");
        rt.block_on(body(name));
    });
}

/// The IPv4 addresses (`a.b.c.d/len`) that `ip` shows on `TUN`.
fn ipv4_addrs(ns: &str) -> Vec<String> {
    let (ok, out) = ip(ns, &["-4", "-o", "addr", "show", "dev", TUN]);
    assert!(ok, "ip addr show failed");
    out.lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------
// Packet helpers
// ---------------------------------------------------------------------------

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 ICMP echo request from `src` to `dst`.
fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());

    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ip
}

fn ipv4_src(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[12], p[13], p[14], p[15])
}

fn ipv4_dst(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[16], p[17], p[18], p[19])
}

/// Reads packets until one satisfies `want` (other traffic, e.g. IPv6, is
/// skipped), failing after `TIMEOUT`.
async fn recv_matching(tun: &AsyncTun, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let n = tun.recv(&mut buf).await.expect("recv");
            if n >= 20 && buf[0] >> 4 == 4 && want(&buf[..n]) {
                return buf[..n].to_vec();
            }
        }
    })
    .await
    .expect("timed out waiting for packet")
}

fn assert_send_sync<T: Send + Sync>() {}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn create_tun_is_visible_and_disappears_on_drop() {
    in_netns(|ns| async move {
        let tun = create_tun(TUN).expect("create_tun");
        assert_eq!(tun.name, TUN);
        let (ok, out) = ip(&ns, &["-o", "link", "show", TUN]);
        assert!(ok, "tun not visible in {ns}");
        assert!(out.starts_with(&format!("{}: {TUN}:", tun.index)), "{out}");

        drop(tun);
        // The kernel unregisters the device asynchronously after the last close.
        let gone = common::wait_until(Duration::from_secs(5), || {
            !ip(&ns, &["link", "show", TUN]).0
        });
        assert!(gone, "tun still present after its fd was dropped");
    });
}

#[test]
fn create_tun_rejects_bad_names() {
    in_netns(|_| async move {
        for name in ["", "sixteen-bytes-xx", "a\0b"] {
            assert!(
                matches!(create_tun(name), Err(NetdevError::InvalidName(_))),
                "{name:?} accepted"
            );
        }
        // 15 bytes is the maximum and works.
        let tun = create_tun("fifteen-bytes-x").expect("15-byte name");
        assert_eq!(tun.name, "fifteen-bytes-x");
    });
}

#[test]
fn set_ipv4_is_idempotent_and_replaces() {
    in_netns(|ns| async move {
        let tun = create_tun(TUN).expect("create_tun");
        let link = LinkConfig::connect().expect("connect");

        link.set_ipv4(tun.index, LOCAL, 16).expect("first set_ipv4");
        link.set_ipv4(tun.index, LOCAL, 16)
            .expect("same address again");
        assert_eq!(ipv4_addrs(&ns), ["198.19.0.1/16"]);

        // A second address added behind our back is removed too.
        let (ok, _) = ip(&ns, &["addr", "add", "198.18.7.7/24", "dev", TUN]);
        assert!(ok);
        link.set_ipv4(tun.index, Ipv4Addr::new(198, 19, 0, 5), 16)
            .expect("new address");
        assert_eq!(ipv4_addrs(&ns), ["198.19.0.5/16"]);

        // Same address, new prefix: also a replacement.
        link.set_ipv4(tun.index, Ipv4Addr::new(198, 19, 0, 5), 24)
            .expect("new prefix");
        assert_eq!(ipv4_addrs(&ns), ["198.19.0.5/24"]);
    });
}

#[test]
fn set_mtu_and_up() {
    in_netns(|ns| async move {
        let tun = create_tun(TUN).expect("create_tun");
        let link = LinkConfig::connect().expect("connect");
        link.set_mtu(tun.index, 1400).expect("set_mtu");
        link.set_up(tun.index).expect("set_up");
        link.set_up(tun.index).expect("set_up again");
        let (_, out) = ip(&ns, &["-o", "link", "show", TUN]);
        assert!(out.contains("mtu 1400"), "{out}");
        assert!(out.contains(",UP") || out.contains("<UP"), "{out}");
    });
}

#[test]
fn routes_are_idempotent() {
    in_netns(|ns| async move {
        let tun = create_tun(TUN).expect("create_tun");
        let link = LinkConfig::connect().expect("connect");
        link.set_up(tun.index).expect("set_up");
        // Host bits set on purpose: the network part is what gets routed.
        let dest: Ipv4Net = "198.18.5.9/24".parse().expect("net");
        let routes = || ip(&ns, &["-4", "route", "show", "dev", TUN]).1;

        link.add_route(tun.index, dest).expect("add_route");
        link.add_route(tun.index, dest).expect("add_route again");
        assert!(routes().contains("198.18.5.0/24"), "{}", routes());

        link.del_route(tun.index, dest).expect("del_route");
        link.del_route(tun.index, dest).expect("del_route again");
        assert!(!routes().contains("198.18.5.0/24"), "{}", routes());
    });
}

#[test]
fn set_ipv6_is_idempotent_replaces_and_skips_dad() {
    in_netns(|ns| async move {
        let tun = create_tun(TUN).expect("create_tun");
        let link = LinkConfig::connect().expect("connect");
        link.set_up(tun.index).expect("set_up");
        let first: Ipv6Addr = "2001:2::1".parse().expect("ip");
        let second: Ipv6Addr = "2001:2::2".parse().expect("ip");
        let addrs = || ip(&ns, &["-6", "-o", "addr", "show", "dev", TUN]).1;

        link.set_ipv6(tun.index, first, 64).expect("first set_ipv6");
        link.set_ipv6(tun.index, first, 64)
            .expect("same address again");
        let shown = addrs();
        assert!(shown.contains("2001:2::1/64"), "{shown}");
        // Without DAD the address is usable at once, never "tentative".
        assert!(!shown.contains("tentative"), "{shown}");

        link.set_ipv6(tun.index, second, 64).expect("new address");
        let shown = addrs();
        assert!(shown.contains("2001:2::2/64"), "{shown}");
        assert!(!shown.contains("2001:2::1/"), "{shown}");
    });
}

#[test]
fn host_routes_are_listed_and_pinned_routes_are_idempotent() {
    in_netns(|_| async move {
        let tun = create_tun(TUN).expect("create_tun");
        let link = LinkConfig::connect().expect("connect");
        link.set_ipv4(tun.index, LOCAL, 16).expect("set_ipv4");
        link.set_up(tun.index).expect("set_up");
        let connected = "198.19.0.0/16".parse().expect("net");
        let routes = link.host_routes().expect("host_routes");
        assert!(
            routes
                .iter()
                .any(|r| r.destination == connected && r.gateway.is_none() && r.index == tun.index),
            "{routes:?}"
        );

        let pin = HostRoute {
            destination: "198.18.9.9/32".parse().expect("net"),
            gateway: Some(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 254))),
            index: tun.index,
            metric: 0,
        };
        assert!(link.add_host_route(pin).expect("add pin"), "not added");
        // The second time the route is there already: not this call's.
        assert!(
            !link.add_host_route(pin).expect("add pin again"),
            "added twice"
        );
        let routes = link.host_routes().expect("host_routes");
        assert!(
            routes.iter().any(|r| (r.destination, r.gateway, r.index)
                == (pin.destination, pin.gateway, pin.index)),
            "{routes:?}"
        );
        link.del_host_route(pin).expect("delete pin");
        link.del_host_route(pin).expect("delete pin again");
        let routes = link.host_routes().expect("host_routes");
        assert!(
            !routes.iter().any(|r| r.destination == pin.destination),
            "{routes:?}"
        );
    });
}

#[test]
fn errors_name_the_operation_and_interface() {
    in_netns(|_| async move {
        let link = LinkConfig::connect().expect("connect");
        let err = link.set_ipv4(9999, LOCAL, 16).expect_err("no such link");
        let msg = err.to_string();
        assert!(
            msg.starts_with("set address 198.19.0.1/16 on ifindex 9999: No such device"),
            "{msg}"
        );
        let err = link.set_mtu(9999, 1400).expect_err("no such link");
        assert!(
            err.to_string()
                .starts_with("set mtu 1400 on ifindex 9999: "),
            "{err}"
        );
    });
}

#[test]
fn packet_io() {
    assert_send_sync::<AsyncTun>();
    assert_send_sync::<LinkConfig>();
    in_netns(|ns| async move {
        let created = create_tun(TUN).expect("create_tun");
        let link = LinkConfig::connect().expect("connect");
        link.set_ipv4(created.index, LOCAL, 16).expect("set_ipv4");
        link.set_up(created.index).expect("set_up");
        let tun = Arc::new(AsyncTun::new(created.fd).expect("AsyncTun::new"));

        // Kernel -> tun: a UDP datagram to the peer comes out of the tun.
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.send_to(b"hello", (PEER, 9)).expect("send_to");
        let pkt = recv_matching(&tun, |p| p[9] == 17 && ipv4_dst(p) == PEER).await;
        assert_eq!(ipv4_src(&pkt), LOCAL);
        assert!(pkt.ends_with(b"hello"));

        // tun -> kernel: an echo request from the peer gets a reply. Write
        // from another task, as the daemon's writer task would.
        let request = echo_request(PEER, LOCAL, 0x5356, 1, b"simplevpn-ping");
        let writer = Arc::clone(&tun);
        let sent = tokio::spawn(async move { writer.send(&request).await })
            .await
            .expect("join")
            .expect("send");
        assert_eq!(sent, 20 + 8 + 14);
        let reply = recv_matching(&tun, |p| p[9] == 1 && p[20] == 0).await;
        assert_eq!((ipv4_src(&reply), ipv4_dst(&reply)), (LOCAL, PEER));
        assert_eq!(&reply[24..26], &0x5356u16.to_be_bytes());
        assert_eq!(&reply[28..], b"simplevpn-ping");
        assert_eq!(checksum(&reply[20..]), 0, "reply ICMP checksum");

        // Dropping the last handle removes the device.
        drop(tun);
        let gone = common::wait_until(Duration::from_secs(5), || {
            !ip(&ns, &["link", "show", TUN]).0
        });
        assert!(gone, "tun still present after AsyncTun was dropped");
    });
}
