//! Property tests of the TUN offload pieces (crates/proto/src/offload.rs): the
//! virtio-net header round trip; random TCP (IPv4, IPv6) and UDP
//! super-packets split into packets that fit the link, each with correct
//! checksums, which coalesce back into the same super-packet; fitting to
//! a legacy MTU never yields a packet above it; arbitrary bytes never panic.

use bytes::Bytes;
use proptest::prelude::*;
use simplevpn::offload::{
    checksums_ok, coalesce, complete_checksum, fit, from_tun, split, to_tun, Fitted, Gso, GsoKind,
    VirtioNetHdr, F_NEEDS_CSUM, VNET_HDR_LEN,
};

/// A super-packet as a tun hands it over (before its checksum is made
/// partial, which `coalesce` does): kind, segment size, bytes.
fn super_packet() -> impl Strategy<Value = (Gso, Vec<u8>)> {
    (
        prop_oneof![
            Just(GsoKind::TcpV4),
            Just(GsoKind::TcpV6),
            Just(GsoKind::Udp)
        ],
        any::<bool>(),
        536u16..9000,
        prop::collection::vec(any::<u8>(), 0..20_000),
        any::<[u8; 32]>(),
        any::<u32>(),
        any::<u8>(),
        0usize..=10,
    )
        .prop_map(
            |(kind, udp_v6, size, payload, addrs, seq, flags, tcp_options)| {
                let v6 = match kind {
                    GsoKind::TcpV4 => false,
                    GsoKind::TcpV6 => true,
                    GsoKind::Udp => udp_v6,
                };
                let mut p = match v6 {
                    false => {
                        let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 0, 0, 0];
                        h.extend_from_slice(&addrs[..8]);
                        h
                    }
                    true => {
                        let mut h = vec![0x60, 0, 0, 0, 0, 0, 0, 64];
                        h.extend_from_slice(&addrs);
                        h
                    }
                };
                let ip = p.len();
                let proto = match kind {
                    GsoKind::Udp => 17,
                    _ => 6,
                };
                match v6 {
                    false => p[9] = proto,
                    true => p[6] = proto,
                }
                p.extend_from_slice(&addrs[8..12]); // ports
                if proto == 6 {
                    p.extend_from_slice(&seq.to_be_bytes());
                    p.extend_from_slice(&[0, 0, 0, 0]); // ack
                    p.push(((5 + tcp_options) as u8) << 4);
                    p.push(flags);
                    p.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
                    p.extend(std::iter::repeat_n(1u8, tcp_options * 4)); // NOP options
                } else {
                    p.extend_from_slice(&[0, 0, 0, 0]);
                }
                p.extend_from_slice(&payload);
                let len = p.len();
                match v6 {
                    false => p[2..4].copy_from_slice(&(len as u16).to_be_bytes()),
                    true => p[4..6].copy_from_slice(&((len - ip) as u16).to_be_bytes()),
                }
                if proto == 17 {
                    // A UDP super-packet's length field says the whole (as the kernel's).
                    p[ip + 4..ip + 6].copy_from_slice(&((len - ip) as u16).to_be_bytes());
                }
                (Gso { kind, size }, p)
            },
        )
        .prop_filter("fits in 64 KiB", |(_, p)| p.len() <= 65_535)
}

/// The bytes of `p` but its checksum fields (IPv4 header, TCP or UDP).
fn without_checksums(p: &[u8]) -> Vec<u8> {
    let mut p = p.to_vec();
    let ip = match p[0] >> 4 {
        4 => {
            p[10..12].fill(0);
            20
        }
        _ => 40,
    };
    let proto = if ip == 20 { p[9] } else { p[6] };
    let field = ip + if proto == 6 { 16 } else { 6 };
    p[field..field + 2].fill(0);
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn virtio_header_round_trip(
        flags: u8, gso_type: u8, hdr_len: u16, gso_size: u16, csum_start: u16, csum_offset: u16,
    ) {
        let hdr = VirtioNetHdr { flags, gso_type, hdr_len, gso_size, csum_start, csum_offset };
        let bytes = hdr.encode();
        prop_assert_eq!(bytes.len(), VNET_HDR_LEN);
        prop_assert_eq!(VirtioNetHdr::decode(&bytes), Some(hdr));
    }

    #[test]
    fn split_then_coalesce_gives_back_the_super_packet(
        (gso, packet) in super_packet(),
        mtu in 1280usize..=9100,
    ) {
        let mut segments = Vec::new();
        split(&packet, gso, mtu, &mut segments).expect("a valid super-packet splits");
        let headers_and_payload: usize = segments.iter().map(|s| s.len()).sum();
        prop_assert!(headers_and_payload >= packet.len());
        for s in &segments {
            prop_assert!(checksums_ok(s), "bad checksum in a segment");
            if gso.kind != GsoKind::Udp {
                prop_assert!(s.len() <= mtu, "{} > {}", s.len(), mtu);
            }
        }
        let (back, joined) = coalesce(&segments).expect("the segments coalesce");
        prop_assert_eq!(back.kind, gso.kind);
        prop_assert_eq!(without_checksums(&joined), without_checksums(&packet));
        // The coalesced checksum is the partial one a tun hands over:
        // completing it gives a valid packet.
        let ip = if joined[0] >> 4 == 4 { 20 } else { 40 };
        let tcp = gso.kind != GsoKind::Udp;
        let mut completed = joined.clone();
        complete_checksum(&mut completed, ip, if tcp { 16 } else { 6 }).expect("in the packet");
        prop_assert!(checksums_ok(&completed));
        // Read from a tun as one packet with that partial checksum, it is
        // a super-packet of one segment.
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: ip as u16,
            csum_offset: if tcp { 16 } else { 6 },
            ..VirtioNetHdr::default()
        };
        let one = from_tun(&hdr, &mut joined.clone()).expect("valid");
        prop_assert_eq!(one.map(|g| g.kind), Some(gso.kind));
        // And the header to write it to a tun describes it.
        let to = to_tun(back, &joined).expect("header");
        prop_assert_eq!(usize::from(to.csum_start), ip);
        let one = segments.len() == 1;
        prop_assert_eq!(to.gso_size, if one { 0 } else { back.size });
        prop_assert_eq!(to.gso_type == 0, one);
    }

    #[test]
    fn fitting_never_exceeds_the_mtu(
        (gso, packet) in super_packet(),
        whole in any::<bool>(),
        mtu in 576usize..=1500,
    ) {
        let gso = whole.then_some(gso);
        match fit(Bytes::from(packet.clone()), gso, mtu).expect("a valid packet fits") {
            Fitted::Packets(pieces) => {
                for p in &pieces {
                    prop_assert!(p.len() <= mtu, "{} > {}", p.len(), mtu);
                }
            }
            // Only UDP with DF or over IPv6 cannot be cut.
            Fitted::TooBig => prop_assert_eq!(gso.map_or(packet[0] >> 4 == 6 || packet[9] == 17, |g| g.kind == GsoKind::Udp), true),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..3000),
        kind in prop_oneof![Just(GsoKind::TcpV4), Just(GsoKind::TcpV6), Just(GsoKind::Udp)],
        size: u16,
        mtu in 0usize..3000,
        hdr: [u8; 10],
    ) {
        let mut out = Vec::new();
        let _ = split(&bytes, Gso { kind, size }, mtu, &mut out);
        let _ = fit(Bytes::from(bytes.clone()), Some(Gso { kind, size }), mtu);
        let _ = fit(Bytes::from(bytes.clone()), None, mtu);
        let _ = coalesce(&[Bytes::from(bytes.clone()), Bytes::from(bytes.clone())]);
        let _ = to_tun(Gso { kind, size }, &bytes);
        if let Some(hdr) = VirtioNetHdr::decode(&hdr) {
            let _ = from_tun(&hdr, &mut bytes.clone());
        }
        let _ = checksums_ok(&bytes);
    }
}
