//! TUN offloads (issue #16), end to end in network namespaces: an
//! original-protocol peer (1500-byte tun, `legacy_mtu`) receives only
//! packets that fit, a large non-TCP packet with DF to it is answered with
//! ICMP "fragmentation needed", and TCP between our clients and to a host
//! beyond the server arrives intact while riding super-packets, over TLS
//! and between our plaintext peers, which agree on it by a marker in the
//! control message's ignored bytes (crates/proto/src/wire.rs `Marker`); a super-packet
//! of segments below the minimum (an amplifier) closes the connection and
//! reaches nothing.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::vpn::*;
use common::{require_root, wait_until};
use simplevpn::offload::{checksums_ok, Gso, GsoKind};
use simplevpn::wire::SuperPacket;

const A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 3);
const SHORT: Duration = Duration::from_millis(300);

/// A TCP/IPv4 packet from `source` to `destination` with `payload` and
/// correct checksums (IP header and TCP).
fn tcp_packet(source: Ipv4Addr, destination: Ipv4Addr, seq: u32, payload: &[u8]) -> Vec<u8> {
    let total = (40 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 7, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&source.octets());
    p.extend_from_slice(&destination.octets());
    p.extend_from_slice(&[0x9c, 0x40, 0x13, 0x89]);
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    p.extend_from_slice(payload);
    let ip_sum = internet_checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let mut pseudo = 0u64;
    for w in p[12..20].chunks(2) {
        pseudo += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    pseudo += 6 + (p.len() - 20) as u64;
    let tcp_sum = internet_checksum(&p[20..], pseudo);
    p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
    assert!(checksums_ok(&p));
    p
}

fn internet_checksum(bytes: &[u8], initial: u64) -> u16 {
    let mut acc = initial;
    for w in bytes.chunks(2) {
        acc += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The next whole IP packet from a raw peer (framed by its own length).
fn next_packet(peer: &mut RawPeer) -> Vec<u8> {
    let mut packet = peer.recv(4, STARTUP);
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    assert!(total >= 20, "not a packet: {packet:02x?}");
    packet.extend(peer.recv(total - 4, STARTUP));
    packet
}

/// The payload of `len` bytes that a raw peer receives as TCP segments of
/// at most 1500 bytes, each with correct checksums, in sequence from `seq`.
fn segments_to_1500(peer: &mut RawPeer, seq: u32, len: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < len {
        let segment = next_packet(peer);
        assert!(
            segment.len() <= 1500,
            "{} bytes to a 1500-byte peer",
            segment.len()
        );
        assert!(checksums_ok(&segment), "bad checksum: {segment:02x?}");
        let at = u32::from_be_bytes(segment[24..28].try_into().expect("seq"));
        assert_eq!(at as usize, seq as usize + got.len(), "out of sequence");
        got.extend_from_slice(&segment[40..]);
    }
    got
}

#[test]
fn an_original_protocol_peer_gets_only_packets_that_fit() {
    if !require_root("an_original_protocol_peer_gets_only_packets_that_fit") {
        return;
    }
    let bed = Bed::new("offleg", 3);
    let server = bed.start_server(&[]);
    // Our own plaintext client offers the extension in its request's
    // ignored bytes; it changes its tun's offloads as its unprivileged
    // user, and carries TCP to the server's host intact.
    let plain = bed.start_client(2, &["-a", "198.19.0.9"]);
    tcp_round_trip(&bed.clients[2], &bed.server, SERVER_TUNNEL, 5003, 4 << 20);
    assert!(
        !plain.log().contains("tun offloads not changed"),
        "{}",
        plain.log()
    );
    let mut a = bed.raw_peer(0);
    let mut b = bed.raw_peer(1);
    assert_eq!(a.ask(&dynamic_request()), grant_16(A));
    assert_eq!(b.ask(&dynamic_request()), grant_16(B));

    // A 4,000-byte TCP packet (the original protocol takes any size on the
    // wire) reaches B cut into segments of at most 1500 bytes, each with
    // correct checksums, in sequence, carrying the same bytes.
    let payload: Vec<u8> = (0..3960u32).map(|i| (i * 13 % 251) as u8).collect();
    a.send(&tcp_packet(A, B, 1_000_000, &payload));
    assert_eq!(segments_to_1500(&mut b, 1_000_000, payload.len()), payload);

    // A 3,000-byte UDP datagram with DF cannot be cut: A gets ICMP
    // "fragmentation needed" with the next-hop MTU 1500; B gets nothing.
    let udp = udp_packet(A, B, &[0x5a; 2972]);
    assert_eq!(udp.len(), 3000);
    a.send(&udp);
    let icmp = next_packet(&mut a);
    assert_eq!(icmp[9], 1, "not ICMP: {icmp:02x?}");
    assert_eq!(&icmp[12..16], &B.octets(), "from the packet's destination");
    assert_eq!(&icmp[16..20], &A.octets(), "to its source");
    assert_eq!((icmp[20], icmp[21]), (3, 4), "type 3 code 4");
    assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 1500);
    assert!(checksums_ok(&icmp));
    assert_eq!(&icmp[28..48], &udp[..20], "quotes the packet");
    b.expect_silence(SHORT);

    // Without DF it is fragmented as a router would: every piece fits.
    let mut no_df = udp.clone();
    no_df[6] = 0;
    no_df[10..12].fill(0);
    let sum = internet_checksum(&no_df[..20], 0);
    no_df[10..12].copy_from_slice(&sum.to_be_bytes());
    a.send(&no_df);
    let mut data = Vec::new();
    loop {
        let piece = next_packet(&mut b);
        assert!(piece.len() <= 1500);
        assert_eq!(internet_checksum(&piece[..20], 0), 0);
        let word = u16::from_be_bytes([piece[6], piece[7]]);
        assert_eq!(usize::from(word & 0x1fff) * 8, data.len());
        data.extend_from_slice(&piece[20..]);
        if word & 0x2000 == 0 {
            break;
        }
    }
    assert_eq!(data, &udp[20..]);

    // The server's own host learns the path MTU from the error too: a
    // ping with DF too big for B leaves "mtu 1500" in its route cache.
    let ping = bed.server.run(
        "ping",
        &[
            "-c",
            "1",
            "-W",
            "1",
            "-M",
            "do",
            "-s",
            "3000",
            &B.to_string(),
        ],
    );
    assert!(
        !ping.status.success(),
        "a 3,028-byte ping with DF got through"
    );
    assert!(
        wait_until(Duration::from_secs(2), || {
            let route = bed.server.ip(&["route", "get", &B.to_string()]);
            String::from_utf8_lossy(&route.stdout).contains("mtu 1500")
        }),
        "no path MTU learned: {}\n{}",
        String::from_utf8_lossy(&bed.server.ip(&["route", "get", &B.to_string()]).stdout),
        server.log()
    );
    b.expect_silence(SHORT);
}

/// The value of `simplevpn_super_packets_total{way="WAY"}` in `body`.
fn super_packets(body: &str, way: &str) -> u64 {
    let prefix = format!("simplevpn_super_packets_total{{way=\"{way}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{body}"))
}

#[test]
fn tcp_between_our_clients_and_beyond_the_server_rides_super_packets_intact() {
    if !require_root("tcp_between_our_clients_and_beyond_the_server_rides_super_packets_intact") {
        return;
    }
    let bed = Bed::new("offtls", 2);
    let lan = lan_behind(&bed.server, "198.18.200.1/24", "198.18.200.2/24", "offlan");
    let lan_host = Ipv4Addr::new(198, 18, 200, 2);
    let tls = Tls::new(&bed, &["a", "b"]);
    let server_key = &tls.server.path;
    let a_pub = &tls.clients[0].public;
    let b_pub = &tls.clients[1].public;
    let metrics = SocketAddr::from(([198, 18, 1, 1], 9102));
    let server = bed.start_server(&[
        "--key",
        server_key,
        "--peer",
        a_pub,
        "--peer",
        b_pub,
        "--route",
        "198.18.200.0/24",
        "--metrics",
        &metrics.to_string(),
        "--metrics-public",
    ]);
    let a = bed.start_client(0, &tls.client_args(0));
    let _b = bed.start_client(1, &tls.client_args(1));
    let (a_ns, b_ns) = (&bed.clients[0], &bed.clients[1]);
    let a_addr = Ipv4Addr::new(198, 19, 0, 2);
    let b_addr = Ipv4Addr::new(198, 19, 0, 3);
    assert!(
        wait_until(STARTUP, || {
            String::from_utf8_lossy(&a_ns.ip(&["-4", "route", "show"]).stdout)
                .contains("198.18.200.0/24")
        }),
        "route to the LAN not pushed:\n{}",
        a.log()
    );

    // Between two clients, to a host beyond the server on a 1500-byte
    // path, and from it: every byte arrives (tcp_round_trip compares).
    tcp_round_trip(a_ns, b_ns, b_addr, 5000, 8 << 20);
    tcp_round_trip(a_ns, &lan, lan_host, 5001, 8 << 20);
    tcp_round_trip(&lan, a_ns, a_addr, 5002, 8 << 20);
    // The TLS clients turned their tun's offloads on, unprivileged.
    assert!(!a.log().contains("tun offloads not changed"), "{}", a.log());

    // And they rode super-packets: from clients, out of the server's tun,
    // and queued whole for a client.
    let (status, body) = scrape(&bed.server, metrics);
    assert!(status.contains("200"), "{status}");
    for way in ["from_client", "from_tun", "to_client_whole"] {
        assert!(
            super_packets(&body, way) > 0,
            "no super-packets {way}:\n{body}\n{}",
            server.log()
        );
    }
}

/// `request` (20 bytes) with our offer, "sv2?", in bytes 4..8.
fn offered(request: &[u8]) -> Vec<u8> {
    let mut bytes = request.to_vec();
    bytes[4..8].copy_from_slice(b"sv2?");
    bytes
}

#[test]
fn our_plaintext_peers_agree_by_marker_and_original_ones_stay_as_they_were() {
    if !require_root("our_plaintext_peers_agree_by_marker_and_original_ones_stay_as_they_were") {
        return;
    }
    let bed = Bed::new("offmark", 3);
    let metrics = SocketAddr::from(([198, 18, 1, 1], 9103));
    let server = bed.start_server(&["--metrics", &metrics.to_string(), "--metrics-public"]);
    let a = bed.start_client(0, &["-a", "198.19.0.2"]);
    let b = bed.start_client(1, &["-a", "198.19.0.3"]);
    for client in [&a, &b] {
        assert!(
            client.wait_for_log("the plaintext server accepted our extension", STARTUP),
            "{}",
            client.log()
        );
        assert!(
            !client.log().contains("tun offloads not changed"),
            "{}",
            client.log()
        );
    }

    // A large TCP transfer between our two plaintext clients arrives intact,
    // and rode super-packets from A and whole to B (not cut to legacy_mtu).
    tcp_round_trip(&bed.clients[0], &bed.clients[1], B, 5010, 8 << 20);
    let (status, body) = scrape(&bed.server, metrics);
    assert!(status.contains("200"), "{status}");
    for way in ["from_client", "to_client_whole"] {
        assert!(
            super_packets(&body, way) > 0,
            "no super-packets {way}:\n{body}\n{}",
            server.log()
        );
    }

    // A C client's request gets the grant exactly as before, byte for byte.
    let mut c = bed.raw_peer(2);
    let c_addr = Ipv4Addr::new(198, 19, 0, 4);
    assert_eq!(c.ask(&dynamic_request()), grant_16(c_addr));
    c.expect_silence(SHORT);
    // A raw peer that offers: the same grant but for "sv2!" in bytes 4..8,
    // then the server's FEATURES (super-packets), and no session
    // parameters (never over an unauthenticated link).
    let mut m = bed.raw_peer(2);
    let m_addr = Ipv4Addr::new(198, 19, 0, 5);
    let marked = m.ask(&offered(&dynamic_request()));
    let mut want = grant_16(m_addr);
    want[4..8].copy_from_slice(b"sv2!");
    assert_eq!(marked, want);
    assert_eq!(m.recv(8, STARTUP), hex("f1 03 00 08 00 00 00 02"));
    m.expect_silence(SHORT);
    // A 4,000-byte TCP packet from the marked peer reaches the C client
    // cut to at most 1500 bytes, intact and in sequence.
    let payload: Vec<u8> = (0..3960u32).map(|i| (i * 17 % 251) as u8).collect();
    m.send(&tcp_packet(m_addr, c_addr, 7_000, &payload));
    assert_eq!(segments_to_1500(&mut c, 7_000, payload.len()), payload);
    // The other way the marked peer gets it whole, as sent.
    let whole = tcp_packet(c_addr, m_addr, 9_000, &payload);
    c.send(&whole);
    assert_eq!(next_packet(&mut m), whole);
}

#[test]
fn our_plaintext_client_against_an_original_server_that_echoes_the_offer_stays_original() {
    if !require_root(
        "our_plaintext_client_against_an_original_server_that_echoes_the_offer_stays_original",
    ) {
        return;
    }
    let bed = Bed::new("offecho", 1);
    // The original server: its grant is the request echoed, source 0,
    // destination the address (protocol.md part 1).
    let listener = bed
        .server
        .tcp_listen(bed.server_addr(0))
        .expect("listen as the original server");
    let client = bed.spawn_client(0, &[]);
    let (mut conn, _) = listener.accept().expect("our client connects");
    conn.set_read_timeout(Some(STARTUP)).expect("timeout");
    let mut request = [0u8; 20];
    conn.read_exact(&mut request).expect("request");
    assert_eq!(request.to_vec(), offered(&dynamic_request()), "the offer");
    let mut grant = request;
    grant[16..20].copy_from_slice(&[198, 19, 0, 9]);
    conn.write_all(&grant).expect("grant");
    assert!(client.wait_for_log("granted", STARTUP), "{}", client.log());
    // No extension frame follows; packets do, as the original protocol's.
    let ping = bed.clients[0].run("ping", &["-c", "1", "-W", "1", "198.19.0.1"]);
    assert!(!ping.status.success(), "nobody answers the ping");
    let mut first = [0u8; 20];
    conn.read_exact(&mut first).expect("the ping arrives");
    assert_eq!(first[0], 0x45, "not an IPv4 packet: {first:02x?}");
    assert_eq!(&first[12..20], &[198, 19, 0, 9, 198, 19, 0, 1]);
    assert!(
        !client.log().contains("accepted our extension"),
        "{}",
        client.log()
    );
}

/// The packets the server's daemon has written into its tun (the tun's
/// rx_packets, read in the server's namespace).
fn tun_rx_packets(bed: &Bed) -> u64 {
    let links = bed.server.run("ip", &["-o", "link", "show", "type", "tun"]);
    let links = String::from_utf8_lossy(&links.stdout).to_string();
    let tun = links
        .split(": ")
        .nth(1)
        .and_then(|name| name.split('@').next())
        .unwrap_or_else(|| panic!("no tun in the server's namespace: {links}"))
        .to_string();
    let path = format!("/sys/class/net/{tun}/statistics/rx_packets");
    let out = bed.server.run("cat", &[&path]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}: {out:?}"))
}

/// A marked plaintext peer (takes extension frames and super-packets):
/// the peer and its granted address, past the server's FEATURES.
fn super_packet_peer(bed: &Bed) -> (RawPeer, Ipv4Addr) {
    let mut peer = bed.raw_peer(0);
    let grant = peer.ask(&offered(&dynamic_request()));
    assert_eq!(&grant[4..8], b"sv2!", "no accepting grant: {grant:02x?}");
    // FEATURES: super-packets with the minimum segment size (bit 1).
    assert_eq!(peer.recv(8, STARTUP), hex("f1 03 00 08 00 00 00 02"));
    let address = Ipv4Addr::new(grant[16], grant[17], grant[18], grant[19]);
    (peer, address)
}

#[test]
fn a_super_packet_of_tiny_segments_closes_the_connection_and_reaches_nothing() {
    if !require_root("a_super_packet_of_tiny_segments_closes_the_connection_and_reaches_nothing") {
        return;
    }
    let bed = Bed::new("offtiny", 1);
    let metrics = SocketAddr::from(([198, 18, 1, 1], 9104));
    let server = bed.start_server(&["--metrics", &metrics.to_string(), "--metrics-public"]);
    let server_address = Ipv4Addr::new(198, 19, 0, 1);
    let payload = vec![0x5a; 300];

    // A super-packet at the minimum segment size gets through to the
    // server's tun: the counter counts what the daemon writes there.
    let (mut good, good_address) = super_packet_peer(&bed);
    let before = tun_rx_packets(&bed);
    let gso = Gso {
        kind: GsoKind::TcpV4,
        size: 536,
    };
    let packet = tcp_packet(good_address, server_address, 1, &payload);
    good.send(&SuperPacket::new(gso, &packet).frame);
    assert!(
        wait_until(STARTUP, || tun_rx_packets(&bed) > before),
        "the valid super-packet never reached the tun\n{}",
        server.log()
    );

    // One of 1-byte segments (300 packets out of one 348-byte frame)
    // closes its connection, and nothing of it reaches the tun.
    let (mut tiny, tiny_address) = super_packet_peer(&bed);
    let before = tun_rx_packets(&bed);
    let packet = tcp_packet(tiny_address, server_address, 1, &payload);
    tiny.send(&SuperPacket::new(Gso { size: 1, ..gso }, &packet).frame);
    tiny.expect_closed(STARTUP);
    std::thread::sleep(SHORT);
    assert_eq!(
        tun_rx_packets(&bed),
        before,
        "the tiny super-packet got out"
    );
    assert!(
        server.wait_for_log("segment size below the minimum", STARTUP),
        "no logged reason\n{}",
        server.log()
    );
    // Counted as a protocol disconnect, the one disconnect: the other
    // peer stays connected.
    let (_, body) = scrape(&bed.server, metrics);
    assert!(
        body.contains("simplevpn_disconnects_total{reason=\"protocol\"} 1"),
        "{body}"
    );
    drop(good);
}
