//! The server against raw TCP peers that speak the original 2013 protocol
//! byte for byte (shared/protocol.md), in network namespaces of their own.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::vpn::*;
use common::{require_root, wait_until};

const SHORT: Duration = Duration::from_millis(500);

fn addr(last: [u8; 2]) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, last[0], last[1])
}

#[test]
fn grants_byte_for_byte() {
    if !require_root("grants_byte_for_byte") {
        return;
    }
    let bed = Bed::new("grant", 3);
    let server = bed.start_server(&[]);

    // Dynamic: the lowest free address, with the /16 netmask in the source.
    let mut a = bed.raw_peer(0);
    assert_eq!(
        a.ask(&dynamic_request()),
        hex("45 14 00 00 00 00 00 00 40 00 00 00 ff ff 00 00 c6 13 00 02")
    );
    // Static: exactly the address asked for.
    let mut b = bed.raw_peer(1);
    assert_eq!(
        b.ask(&static_request(addr([1, 7]))),
        hex("45 14 00 00 00 00 00 00 40 00 00 00 ff ff 00 00 c6 13 01 07")
    );
    // Each grant is sent exactly once.
    a.expect_silence(SHORT);
    b.expect_silence(Duration::from_millis(50));

    // A repeated request is answered with the address already held.
    assert_eq!(a.ask(&static_request(addr([9, 9]))), grant_16(addr([0, 2])));
    assert_eq!(a.ask(&dynamic_request()), grant_16(addr([0, 2])));

    // A static request for a held address is refused by closing.
    let mut c = bed.raw_peer(2);
    c.send(&static_request(addr([1, 7])));
    c.expect_closed(STARTUP);
    // So is one outside the pool: the server's own address, the network's.
    for reserved in [SERVER_TUNNEL, addr([0, 0]), addr([255, 255])] {
        let mut d = bed.raw_peer(2);
        d.send(&static_request(reserved));
        d.expect_closed(STARTUP);
    }
    assert!(
        server.wait_for_log("is held by another client", STARTUP),
        "refusal not logged:\n{}",
        server.log()
    );

    // The holders are unaffected, and a .0 inside the /16 is a host address.
    let mut e = bed.raw_peer(2);
    assert_eq!(e.ask(&static_request(addr([3, 0]))), grant_16(addr([3, 0])));
    let packet = udp_packet(addr([0, 2]), addr([1, 7]), b"still here");
    a.send(&packet);
    assert_eq!(b.recv(packet.len(), STARTUP), packet);
}

#[test]
fn keepalive_is_echoed_once_to_the_sender_only() {
    if !require_root("keepalive_is_echoed_once_to_the_sender_only") {
        return;
    }
    let bed = Bed::new("kalive", 3);
    let _server = bed.start_server(&[]);
    let mut a = bed.raw_peer(0);
    let mut b = bed.raw_peer(1);
    let mut unassigned = bed.raw_peer(2);
    a.ask(&dynamic_request());
    b.ask(&dynamic_request());

    a.send(&keepalive());
    assert_eq!(a.recv(20, STARTUP), keepalive());
    a.expect_silence(SHORT);
    b.expect_silence(Duration::from_millis(50));
    unassigned.expect_silence(Duration::from_millis(50));

    // An unassigned connection's keepalive is echoed to it alone as well.
    unassigned.send(&keepalive());
    assert_eq!(unassigned.recv(20, STARTUP), keepalive());
    a.expect_silence(Duration::from_millis(100));
}

#[test]
fn packets_cross_between_raw_peers_however_tcp_splits_them() {
    if !require_root("packets_cross_between_raw_peers_however_tcp_splits_them") {
        return;
    }
    let bed = Bed::new("fwd", 2);
    let _server = bed.start_server(&[]);
    let mut a = bed.raw_peer(0);
    let mut b = bed.raw_peer(1);
    assert_eq!(a.ask(&dynamic_request()), grant_16(addr([0, 2])));
    assert_eq!(b.ask(&dynamic_request()), grant_16(addr([0, 3])));

    // One hand-made IPv4 packet, each way.
    let to_b = udp_packet(addr([0, 2]), addr([0, 3]), b"hello b");
    a.send(&to_b);
    assert_eq!(b.recv(to_b.len(), STARTUP), to_b);
    let to_a = udp_packet(addr([0, 3]), addr([0, 2]), b"hello a, from b");
    b.send(&to_a);
    assert_eq!(a.recv(to_a.len(), STARTUP), to_a);

    // Three packets in one write arrive as three packets, in order.
    let three: Vec<Vec<u8>> = (0..3u8)
        .map(|i| {
            udp_packet(
                addr([0, 2]),
                addr([0, 3]),
                &vec![i; 10 + usize::from(i) * 100],
            )
        })
        .collect();
    a.send(&three.concat());
    for packet in &three {
        assert_eq!(&b.recv(packet.len(), STARTUP), packet);
    }

    // One packet over three writes, with pauses so TCP cannot join them.
    let split = udp_packet(addr([0, 2]), addr([0, 3]), &[0xab; 1000]);
    for part in [&split[..3], &split[3..19], &split[19..]] {
        a.send(part);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(b.recv(split.len(), STARTUP), split);
    b.expect_silence(Duration::from_millis(100));
}

#[test]
fn spoofed_sources_are_dropped() {
    if !require_root("spoofed_sources_are_dropped") {
        return;
    }
    let bed = Bed::new("spoof", 3);
    let _server = bed.start_server(&[]);
    let mut a = bed.raw_peer(0);
    let mut b = bed.raw_peer(1);
    let mut c = bed.raw_peer(2);
    a.ask(&dynamic_request());
    b.ask(&dynamic_request());
    c.ask(&dynamic_request());

    // A claims to be C: dropped. Then a true packet from A: delivered first.
    a.send(&udp_packet(addr([0, 4]), addr([0, 3]), b"spoofed"));
    let honest = udp_packet(addr([0, 2]), addr([0, 3]), b"honest");
    a.send(&honest);
    assert_eq!(b.recv(honest.len(), STARTUP), honest);
    // A packet before any grant is dropped too.
    let mut unassigned = bed.raw_peer(2);
    unassigned.send(&udp_packet(addr([0, 9]), addr([0, 3]), b"early"));
    b.expect_silence(SHORT);
    c.expect_silence(Duration::from_millis(50));
}

#[test]
fn garbage_closes_only_that_connection() {
    if !require_root("garbage_closes_only_that_connection") {
        return;
    }
    let bed = Bed::new("garbage", 3);
    let config = bed.path("server.toml");
    std::fs::write(&config, "[server]\nmax_frame = 1500\n").expect("write config");
    let server = bed.start_server(&["--config", &config]);
    let mut a = bed.raw_peer(0);
    let mut b = bed.raw_peer(1);
    a.ask(&dynamic_request());
    b.ask(&dynamic_request());

    let mut total_length_1501 = udp_packet(addr([0, 4]), addr([0, 2]), &[0; 1473]);
    assert_eq!(total_length_1501.len(), 1501);
    total_length_1501.truncate(30);
    let garbage: [(&str, Vec<u8>); 5] = [
        (
            "bad version",
            hex("55 00 00 14 00 00 00 00 40 00 00 00 00 00 00 00 00 00 00 00"),
        ),
        ("zero byte", vec![0; 20]),
        ("total length 7", hex("45 00 00 07 00 00 00 00 40 00 00 00")),
        ("total length above max_frame", total_length_1501),
        ("IPv6 above max_frame", hex("60 00 00 00 ff ff 11 40")),
    ];
    for (what, bytes) in garbage {
        let mut bad = bed.raw_peer(2);
        assert_eq!(
            bad.ask(&dynamic_request()),
            grant_16(addr([0, 4])),
            "{what}"
        );
        bad.send(&bytes);
        bad.expect_closed(STARTUP);
        // Everyone else goes on forwarding.
        let packet = udp_packet(addr([0, 2]), addr([0, 3]), what.as_bytes());
        a.send(&packet);
        assert_eq!(b.recv(packet.len(), STARTUP), packet, "after {what}");
    }
    let log = server.log();
    assert!(log.contains("bad IP version 5"), "{log}");
    assert!(log.contains("IPv4 total length 7"), "{log}");
    assert!(log.contains("exceeds the maximum of 1500"), "{log}");
}

#[test]
fn silent_peers_time_out_and_free_their_address() {
    if !require_root("silent_peers_time_out_and_free_their_address") {
        return;
    }
    let bed = Bed::new("silent", 2);
    let server = bed.start_server(&["--client-timeout", "2", "--handshake-timeout", "1"]);
    let mut a = bed.raw_peer(0);
    assert_eq!(a.ask(&static_request(addr([5, 5]))), grant_16(addr([5, 5])));
    // Taken while A is connected.
    let mut b = bed.raw_peer(1);
    b.send(&static_request(addr([5, 5])));
    b.expect_closed(STARTUP);

    let took = a.expect_closed(Duration::from_secs(10));
    assert!(took >= Duration::from_millis(1500), "closed after {took:?}");
    assert!(server.wait_for_log("silent for longer than the client timeout", STARTUP));
    let mut b = bed.raw_peer(1);
    assert_eq!(b.ask(&static_request(addr([5, 5]))), grant_16(addr([5, 5])));

    // Keepalives keep a peer alive past the timeout.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(1));
        b.send(&keepalive());
        assert_eq!(b.recv(20, STARTUP), keepalive());
    }

    // A connection that sends nothing is dropped after the first-bytes
    // timeout; one that sends keepalives but never asks for an address after
    // the handshake timeout.
    let mut mute = bed.raw_peer(0);
    mute.expect_closed(Duration::from_secs(10));
    assert!(wait_until(STARTUP, || server.log().contains(
        "no ClientHello or address request within the first-bytes timeout"
    )));
    let mut idle = bed.raw_peer(0);
    idle.send(&keepalive());
    assert_eq!(idle.recv(20, STARTUP), keepalive());
    idle.expect_closed(Duration::from_secs(10));
    assert!(wait_until(STARTUP, || server
        .log()
        .contains("no address request within the handshake timeout")));
}

#[test]
fn silence_counts_from_the_grant_even_with_a_longer_handshake_timeout() {
    if !require_root("silence_counts_from_the_grant_even_with_a_longer_handshake_timeout") {
        return;
    }
    let bed = Bed::new("silent2", 1);
    let _server = bed.start_server(&["--client-timeout", "2", "--handshake-timeout", "30"]);
    let mut a = bed.raw_peer(0);
    assert_eq!(a.ask(&dynamic_request()), grant_16(addr([0, 2])));
    let took = a.expect_closed(Duration::from_secs(10));
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "closed after {took:?}"
    );
}

#[test]
fn connections_not_yet_granted_are_capped() {
    if !require_root("connections_not_yet_granted_are_capped") {
        return;
    }
    let bed = Bed::new("cap", 1);
    let config = bed.path("server.toml");
    // Idle connections wait longer than the default 2 s here, so that the
    // first keeps its place while the third is refused.
    std::fs::write(
        &config,
        "[server]\nmax_unauthenticated = 2\nfirst_bytes_timeout = 10\n",
    )
    .expect("config");
    let server = bed.start_server(&["--config", &config]);
    // Two connections that have not asked for an address hold both places.
    let mut first = bed.raw_peer(0);
    let _second = bed.raw_peer(0);
    let mut third = bed.raw_peer(0);
    let took = third.expect_closed(STARTUP);
    assert!(took < Duration::from_secs(2), "closed only after {took:?}");
    assert!(server.wait_for_log("too many connections not yet granted", STARTUP));
    // A grant frees a place.
    assert_eq!(first.ask(&dynamic_request()), grant_16(addr([0, 2])));
    let mut fourth = bed.raw_peer(0);
    assert_eq!(fourth.ask(&dynamic_request()), grant_16(addr([0, 3])));
}

#[test]
fn one_source_holds_at_most_legacy_max_per_source_sessions() {
    if !require_root("one_source_holds_at_most_legacy_max_per_source_sessions") {
        return;
    }
    let bed = Bed::new("legcap", 2);
    let server = bed.start_server(&["--legacy-max-per-source", "16"]);
    // 24 sessions asked for from one address: 16 granted, the rest closed
    // once their request is read.
    let mut granted = Vec::new();
    let mut refused = 0;
    for _ in 0..24 {
        let mut peer = bed.raw_peer(0);
        peer.send(&dynamic_request());
        peer.stream
            .set_read_timeout(Some(STARTUP))
            .expect("set read timeout");
        let mut reply = [0u8; 20];
        match std::io::Read::read_exact(&mut peer.stream, &mut reply) {
            Ok(()) => {
                assert_eq!(&reply[2..4], &[0, 0], "a grant: {reply:02x?}");
                granted.push(peer);
            }
            Err(_) => refused += 1,
        }
    }
    assert_eq!((granted.len(), refused), (16, 8), "{}", server.log());
    let log = server.log();
    assert!(log.contains("kind=legacy_per_source_cap"), "{log}");
    assert!(log.contains("legacy_max_per_source"), "{log}");
    // Another address still gets one.
    let mut other = bed.raw_peer(1);
    assert_eq!(other.ask(&dynamic_request())[2..4], [0, 0]);
    // A session that ends frees its source's slot.
    drop(granted.pop());
    assert!(
        wait_until(STARTUP, || {
            let mut again = bed.raw_peer(0);
            again.send(&dynamic_request());
            let _ = again.stream.set_read_timeout(Some(Duration::from_secs(1)));
            let mut reply = [0u8; 20];
            std::io::Read::read_exact(&mut again.stream, &mut reply).is_ok()
        }),
        "no grant after a session ended:\n{}",
        server.log()
    );
}
