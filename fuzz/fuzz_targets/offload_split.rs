//! The TUN offload code (`simplevpn_proto::offload`) on arbitrary frames: the
//! virtio-net header, GSO splitting, fitting to an MTU (re-segmenting,
//! fragmenting), checksums and the ICMP errors a router sends.
//!
//! Input: byte 0 chooses the super-packet kind for the direct split (0..2:
//! TCP/IPv4, TCP/IPv6, UDP), bytes 1..3 the segment size and bytes 3..5
//! the MTU (u16 big-endian each), bytes 5..15 a virtio-net header; the rest
//! is the packet.
//!
//! Checked, besides "never panics":
//! - `from_tun` with that header: a super-packet it accepts is one that
//!   `to_tun` takes back (or refuses only for too many segments) and that
//!   `split` splits;
//! - every packet `split` makes (from `from_tun`'s metadata, and from the
//!   input's kind and size) is a valid IP packet (version, header length,
//!   total length consistent with its length), with correct checksums, a
//!   payload no longer than the segment size it claims, TCP no longer than
//!   the MTU (when the MTU leaves room for 8 payload bytes), at most
//!   `MAX_GSO_SEGMENTS` of them;
//! - `fit` passes a plain packet that fits as it is; every packet it makes
//!   otherwise is valid and no longer than the MTU (or TCP of at most 8
//!   payload bytes when the MTU leaves no more room);
//! - the ICMP errors are valid packets, within 576 (IPv4) and 1280 (IPv6)
//!   bytes, with correct checksums.

#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use simplevpn_proto::limits::MAX_GSO_SEGMENTS;
use simplevpn_proto::offload::{
    checksums_ok, coalesce, fit, frag_needed_v4, from_tun, packet_too_big_v6, split, to_tun,
    Fitted, Gso, GsoKind, OffloadError, VirtioNetHdr, VNET_HDR_LEN,
};

const HEADER: usize = 5 + VNET_HDR_LEN;

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let kind = match data[0] % 3 {
        0 => GsoKind::TcpV4,
        1 => GsoKind::TcpV6,
        _ => GsoKind::Udp,
    };
    let size = u16::from_be_bytes([data[1], data[2]]);
    let mtu = usize::from(u16::from_be_bytes([data[3], data[4]]));
    let Some(hdr) = VirtioNetHdr::decode(&data[5..HEADER]) else {
        return;
    };
    assert_eq!(VirtioNetHdr::decode(&hdr.encode()), Some(hdr));
    let input = &data[HEADER..];

    // As read from a tun.
    let mut packet = input.to_vec();
    if let Ok(Some(gso)) = from_tun(&hdr, &mut packet) {
        match to_tun(gso, &packet) {
            Ok(_) | Err(OffloadError::TooManySegments(_)) => {}
            Err(e) => panic!("from_tun accepted {gso:?}, to_tun says {e}"),
        }
        check_split(&packet, gso, usize::MAX, true);
        check_split(&packet, gso, mtu, true);
    }

    // As a peer's super-packet of any kind and size.
    check_split(input, Gso { kind, size }, mtu, false);

    // Fitted to a link of `mtu` bytes, as a plain packet and as a
    // super-packet.
    for gso in [None, Some(Gso { kind, size })] {
        let fitted = fit(Bytes::copy_from_slice(input), gso, mtu);
        if gso.is_none() && input.len() <= mtu {
            // What fits passes as it is, unread.
            assert_eq!(
                fitted,
                Ok(Fitted::Packets(vec![Bytes::copy_from_slice(input)]))
            );
            continue;
        }
        if let Ok(Fitted::Packets(pieces)) = fitted {
            for piece in &pieces {
                let (ip, proto) = check_ip(piece);
                let tiny_tcp = proto == TCP && piece.len() <= ip + tcp_header(piece, ip) + 8;
                assert!(
                    piece.len() <= mtu || tiny_tcp,
                    "fit made a {}-byte packet for an MTU of {mtu}",
                    piece.len()
                );
            }
        }
    }

    // The ICMP errors about it.
    if let Some(icmp) = frag_needed_v4(Ipv4Addr::new(198, 18, 0, 1), input, mtu as u16) {
        check_ip(&icmp);
        assert_eq!(icmp[0] >> 4, 4);
        assert!(icmp.len() <= 576, "an ICMP error of {} bytes", icmp.len());
        assert!(checksums_ok(&icmp), "bad ICMP checksum: {icmp:02x?}");
    }
    let router = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
    if let Some(icmp) = packet_too_big_v6(router, input, mtu as u32) {
        check_ip(&icmp);
        assert_eq!(icmp[0] >> 4, 6);
        assert!(
            icmp.len() <= 1280,
            "an ICMPv6 error of {} bytes",
            icmp.len()
        );
        assert!(checksums_ok(&icmp), "bad ICMPv6 checksum: {icmp:02x?}");
    }
});

/// Splits `packet` as `gso` says for a link of `mtu` bytes and checks the
/// packets; `must` says that the split must succeed (but for too many
/// segments).
fn check_split(packet: &[u8], gso: Gso, mtu: usize, must: bool) {
    let mut out = Vec::new();
    match split(packet, gso, mtu, &mut out) {
        Ok(()) => {}
        Err(OffloadError::TooManySegments(n)) => {
            assert!(n > MAX_GSO_SEGMENTS);
            return;
        }
        Err(e) if !must => {
            let _ = e.to_string();
            return;
        }
        Err(e) => panic!("from_tun accepted {gso:?}, split says {e}"),
    }
    assert!(!out.is_empty() && out.len() <= MAX_GSO_SEGMENTS);
    for segment in &out {
        let (ip, _) = check_ip(segment);
        let tcp = gso.kind != GsoKind::Udp;
        let headers = ip + if tcp { tcp_header(segment, ip) } else { 8 };
        assert!(headers <= segment.len(), "a segment without its headers");
        let payload = segment.len() - headers;
        assert!(
            payload <= usize::from(gso.size),
            "a segment of {payload} payload bytes from {gso:?}"
        );
        if tcp && mtu >= headers + 8 {
            assert!(
                segment.len() <= mtu,
                "a {}-byte TCP segment for an MTU of {mtu}",
                segment.len()
            );
        }
        assert!(checksums_ok(segment), "bad checksum: {segment:02x?}");
    }
    let _ = coalesce(&out);
}

const TCP: u8 = 6;

/// The TCP header length of `packet`, whose IP header is `ip` bytes long.
fn tcp_header(packet: &[u8], ip: usize) -> usize {
    usize::from(packet.get(ip + 12).copied().unwrap_or(0) >> 4) * 4
}

/// Checks that `packet` is a valid IP packet: version 4 or 6, a header
/// length of at least the fixed header within the packet, a total length
/// that is its length. Returns its IP header length and its protocol.
fn check_ip(packet: &[u8]) -> (usize, u8) {
    let version = packet.first().map(|b| b >> 4);
    let (ip, total, proto) = match version {
        Some(4) => {
            assert!(
                packet.len() >= 20,
                "an IPv4 packet of {} bytes",
                packet.len()
            );
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            assert!(ihl >= 20 && ihl <= packet.len(), "IPv4 header length {ihl}");
            (
                ihl,
                usize::from(u16::from_be_bytes([packet[2], packet[3]])),
                packet[9],
            )
        }
        Some(6) => {
            assert!(
                packet.len() >= 40,
                "an IPv6 packet of {} bytes",
                packet.len()
            );
            (
                40,
                40 + usize::from(u16::from_be_bytes([packet[4], packet[5]])),
                packet[6],
            )
        }
        other => panic!("a packet of version {other:?}: {packet:02x?}"),
    };
    assert_eq!(total, packet.len(), "total length against the packet's");
    (ip, proto)
}
