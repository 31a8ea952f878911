//! Property tests of the sans-IO codec: any stream of valid frames, cut into
//! any pieces, decodes to the same frames; arbitrary bytes never panic. The
//! same for the session-parameters extension (module `extensions`).

use std::net::Ipv4Addr;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use simplevpn::wire::{Control, Decoder, Frame, Marker, DEFAULT_MAX_FRAME};

/// No marker, or either of ours.
fn marker() -> impl Strategy<Value = Option<Marker>> {
    prop_oneof![
        Just(None),
        Just(Some(Marker::Offer)),
        Just(Some(Marker::Accept))
    ]
}

/// A valid frame and its bytes on the wire.
fn frame() -> impl Strategy<Value = (Frame, Vec<u8>)> {
    let control = (any::<u32>(), any::<u32>(), marker()).prop_map(|(s, d, marker)| {
        let c = Control {
            source: Ipv4Addr::from(s),
            destination: Ipv4Addr::from(d),
            marker,
        };
        (Frame::Control(c), c.encode().to_vec())
    });
    let v4 = (prop::collection::vec(any::<u8>(), 20..2000), 0u8..16).prop_map(|(mut p, low)| {
        let len = p.len() as u16;
        p[0] = 0x40 | low;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        (Frame::Packet(Bytes::from(p.clone())), p)
    });
    let v6 = prop::collection::vec(any::<u8>(), 40..2000).prop_map(|mut p| {
        let payload = (p.len() - 40) as u16;
        p[0] = 0x60 | (p[0] & 0x0f);
        p[4..6].copy_from_slice(&payload.to_be_bytes());
        (Frame::Packet(Bytes::from(p.clone())), p)
    });
    prop_oneof![control, v4, v6]
}

/// The frames' bytes as one stream, cut at `cuts` (as TCP may cut it) and
/// fed piece by piece to `decoder`: every frame decoded, and how many bytes
/// were left over.
fn decode_cut(
    decoder: Decoder,
    frames: &[(Frame, Vec<u8>)],
    cuts: &[prop::sample::Index],
) -> (Vec<Frame>, usize) {
    let stream: Vec<u8> = frames.iter().flat_map(|(_, b)| b.clone()).collect();
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
    points.push(stream.len());
    points.sort_unstable();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut from = 0;
    for to in points {
        buf.extend_from_slice(&stream[from..to]);
        from = to;
        while let Some(frame) = decoder.decode(&mut buf).expect("valid stream") {
            got.push(frame);
        }
    }
    (got, buf.len())
}

proptest! {
    #[test]
    fn frames_survive_any_split(
        frames in prop::collection::vec(frame(), 1..20),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
    ) {
        let (got, rest) = decode_cut(Decoder::default(), &frames, &cuts);
        let want: Vec<Frame> = frames.into_iter().map(|(f, _)| f).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(rest, 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096), max in 20usize..=DEFAULT_MAX_FRAME) {
        let decoder = Decoder::new(max);
        let mut buf = BytesMut::from(&bytes[..]);
        let before = buf.len();
        let mut consumed = 0;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Frame::Control(_))) => consumed += 20,
                Ok(Some(Frame::Packet(p))) => {
                    prop_assert!(p.len() <= max);
                    consumed += p.len();
                }
                Ok(Some(Frame::Extension(e))) => {
                    return Err(TestCaseError::fail(format!("extension without with_extensions: {e:?}")));
                }
                Ok(Some(Frame::Super(s))) => {
                    return Err(TestCaseError::fail(format!("super-packet without with_extensions: {s:?}")));
                }
                Ok(None) | Err(_) => break,
            }
            prop_assert_eq!(before - buf.len(), consumed);
        }
    }

    /// A control message with any bytes where the original says they are
    /// ignored (byte 1, bytes 4..12): decoded without a panic, with the
    /// same addresses and whatever request or reply they make; a marker
    /// exactly when bytes 4..8 are one of ours; and a marker round-trips.
    #[test]
    fn ignored_control_bytes_never_matter_but_the_marker_is_read(
        source in any::<u32>(),
        destination in any::<u32>(),
        byte1 in any::<u8>(),
        ignored in any::<[u8; 8]>(),
        marker in marker(),
        marked in any::<bool>(),
    ) {
        let plain = Control {
            source: Ipv4Addr::from(source),
            destination: Ipv4Addr::from(destination),
            marker: None,
        };
        let mut bytes = plain.encode();
        bytes[1] = byte1;
        bytes[4..12].copy_from_slice(&ignored);
        if let (true, Some(m)) = (marked, marker) {
            bytes[4..8].copy_from_slice(&m.bytes());
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let Ok(Some(Frame::Control(got))) = Decoder::default().decode(&mut buf) else {
            return Err(TestCaseError::fail(format!("not a control message: {bytes:02x?}")));
        };
        prop_assert!(buf.is_empty());
        prop_assert_eq!((got.source, got.destination), (plain.source, plain.destination));
        let window: [u8; 4] = bytes[4..8].try_into().expect("4 bytes");
        let want = match window {
            Marker::OFFER => Some(Marker::Offer),
            Marker::ACCEPT => Some(Marker::Accept),
            _ => None,
        };
        prop_assert_eq!(got.marker, want);
        prop_assert_eq!(got.as_request(), plain.as_request());
        prop_assert_eq!(got.as_reply(), plain.as_reply());
        // Re-encoded: the original's bytes, the marker (if any) in 4..8.
        let again = got.encode();
        prop_assert_eq!(&again[..4], &plain.encode()[..4]);
        prop_assert_eq!(&again[8..], &plain.encode()[8..]);
        let with = Control { marker, ..plain };
        let mut buf = BytesMut::from(&with.encode()[..]);
        prop_assert_eq!(Decoder::default().decode(&mut buf), Ok(Some(Frame::Control(with))));
        // Extension framing on or off changes nothing for control messages.
        let mut buf = BytesMut::from(&bytes[..]);
        prop_assert_eq!(
            Decoder::default().with_extensions().decode(&mut buf),
            Ok(Some(Frame::Control(got)))
        );
    }

    /// The addresses the server forwards by (IPv4 or IPv6, read from any
    /// bytes a client sends): never a panic, the IPv4 reading unchanged,
    /// and an IPv6 packet's at bytes 8..24 and 24..40.
    #[test]
    fn packet_addresses_of_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        use std::net::IpAddr;
        use simplevpn::wire::{ip_addresses, ipv4_addresses};
        let both = ip_addresses(&bytes);
        match bytes.first().map(|b| b >> 4) {
            Some(4) => prop_assert_eq!(
                both,
                ipv4_addresses(&bytes).map(|(s, d)| (IpAddr::V4(s), IpAddr::V4(d)))
            ),
            Some(6) if bytes.len() >= 40 => {
                let at = |i: usize| {
                    let octets: [u8; 16] = bytes[i..i + 16].try_into().expect("16 bytes");
                    IpAddr::from(octets)
                };
                prop_assert_eq!(both, Some((at(8), at(24))));
            }
            _ => prop_assert_eq!(both, None),
        }
    }
}

// The session-parameters extension (crates/proto/src/params.rs) on top of the codec.
mod extensions {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use bytes::{Bytes, BytesMut};
    use ipnet::{IpNet, Ipv4Net, Ipv6Net};
    use proptest::prelude::*;
    use simplevpn::offload::{Gso, GsoKind};
    use simplevpn::params::{
        SessionParams, MAX_DNS, MAX_DNS_SEARCH, MAX_DOMAIN_LEN, MAX_ENCODED_LEN, MAX_ROUTES,
    };
    use simplevpn::wire::{
        Decoder, Extension, ExtensionKind, Features, Frame, ProtocolError, SuperPacket,
        DEFAULT_MAX_FRAME, FEATURES, SUPER_HEADER_LEN, SUPER_PACKET,
    };

    use super::{decode_cut, frame};

    fn ipv4_net() -> impl Strategy<Value = Ipv4Net> {
        (any::<u32>(), 0u8..=32)
            .prop_map(|(a, p)| Ipv4Net::new(Ipv4Addr::from(a), p).expect("prefix <= 32"))
    }

    fn ipv6_net() -> impl Strategy<Value = Ipv6Net> {
        (any::<u128>(), 0u8..=128)
            .prop_map(|(a, p)| Ipv6Net::new(Ipv6Addr::from(a), p).expect("prefix <= 128"))
    }

    fn route() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            ipv4_net().prop_map(|n| IpNet::V4(n.trunc())),
            ipv6_net().prop_map(|n| IpNet::V6(n.trunc())),
        ]
    }

    fn domain() -> impl Strategy<Value = String> {
        proptest::string::string_regex(&format!("[a-zA-Z0-9.-]{{1,{MAX_DOMAIN_LEN}}}"))
            .expect("regex")
    }

    /// Any valid parameters; route counts up to the limit now and then.
    fn params() -> impl Strategy<Value = SessionParams> {
        (
            prop::option::of(ipv4_net()),
            prop::option::of(ipv6_net()),
            prop_oneof![
                9 => prop::collection::vec(route(), 0..20),
                1 => prop::collection::vec(route(), 0..=MAX_ROUTES),
            ],
            prop::collection::vec(any::<IpAddr>(), 0..=MAX_DNS),
            prop::collection::vec(domain(), 0..=MAX_DNS_SEARCH),
            any::<bool>(),
            // FLAGS bits this version does not know are carried (bit 0 is
            // default_route).
            prop_oneof![3 => Just(0u32), 1 => any::<u32>().prop_map(|f| f & !1)],
        )
            .prop_map(
                |(address4, address6, routes, dns, dns_search, default_route, other_flags)| {
                    SessionParams {
                        address4,
                        address6,
                        routes,
                        dns,
                        dns_search,
                        default_route,
                        other_flags,
                    }
                },
            )
    }

    /// A frame on an extension-enabled connection: an ordinary one, session
    /// parameters, or an extension of a type unknown to this version.
    fn mixed_frame() -> impl Strategy<Value = (Frame, Vec<u8>)> {
        let session = params().prop_map(|p| {
            let bytes = p.encode().expect("valid params encode");
            let ext = Extension {
                kind: bytes[1],
                body: Bytes::copy_from_slice(&bytes[4..]),
            };
            (Frame::Extension(ext), bytes.to_vec())
        });
        // Type 2 is the super-packet frame (below), 3 the features.
        let unknown = (4u8..=255, prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(k, b)| {
            let ext = Extension {
                kind: k,
                body: Bytes::from(b),
            };
            let bytes = ext.encode().expect("small extension").to_vec();
            (Frame::Extension(ext), bytes)
        });
        let features = any::<u32>().prop_map(|f| {
            let bytes = Features(f).encode();
            let ext = Extension {
                kind: FEATURES,
                body: bytes.slice(4..),
            };
            (Frame::Extension(ext), bytes.to_vec())
        });
        let super_packet = (
            prop_oneof![
                Just(GsoKind::TcpV4),
                Just(GsoKind::TcpV6),
                Just(GsoKind::Udp)
            ],
            any::<u16>(),
            frame(),
        )
            .prop_filter_map(
                "a packet, not a control message",
                |(kind, size, (f, bytes))| {
                    let Frame::Packet(_) = f else { return None };
                    // Any segment size from the kind's minimum up.
                    let min = kind.min_segment();
                    let size = min + size % (u16::MAX - min + 1);
                    let sup = SuperPacket::new(Gso { kind, size }, &bytes);
                    Some((Frame::Super(sup.clone()), sup.frame.to_vec()))
                },
            );
        prop_oneof![4 => frame(), 1 => session, 1 => unknown, 1 => features, 2 => super_packet]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn session_params_round_trip(p in params()) {
            let bytes = p.encode().expect("valid params encode");
            prop_assert!(bytes.len() <= MAX_ENCODED_LEN);
            let mut buf = BytesMut::from(&bytes[..]);
            let frame = Decoder::default().with_extensions().decode(&mut buf);
            prop_assert!(buf.is_empty());
            let Ok(Some(Frame::Extension(ext))) = frame else {
                return Err(TestCaseError::fail(format!("not an extension: {frame:?}")));
            };
            prop_assert_eq!(ExtensionKind::from(ext.kind), ExtensionKind::SessionParams);
            prop_assert_eq!(SessionParams::decode(&ext.body), Ok(p));
        }

        #[test]
        fn mixed_streams_survive_any_split(
            frames in prop::collection::vec(mixed_frame(), 1..12),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
        ) {
            let (got, rest) = decode_cut(Decoder::default().with_extensions(), &frames, &cuts);
            let want: Vec<Frame> = frames.into_iter().map(|(f, _)| f).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(rest, 0);
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = SessionParams::decode(&body);
        }

        /// Bodies that look like SESSION_PARAMS (version 1, entries with
        /// known tags and plausible lengths) reach deeper than random bytes.
        #[test]
        fn plausible_bodies_never_panic(
            entries in prop::collection::vec(
                (0u8..8, prop::collection::vec(any::<u8>(), 0..20), any::<bool>()),
                0..40,
            ),
        ) {
            let mut body = vec![1u8];
            for (tag, value, honest) in entries {
                body.push(tag);
                let len = if honest { value.len() as u16 } else { value.len() as u16 + 3 };
                body.extend_from_slice(&len.to_be_bytes());
                body.extend_from_slice(&value);
            }
            if let Ok(p) = SessionParams::decode(&body) {
                // Whatever decodes, encodes, and decodes the same again.
                let again = p.encode().expect("decoded params re-encode");
                prop_assert_eq!(SessionParams::decode(&again[4..]), Ok(p));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_with_extensions(
            bytes in prop::collection::vec(any::<u8>(), 0..4096),
            max in 20usize..=DEFAULT_MAX_FRAME,
            marks in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        ) {
            // Some first bytes forced to 0xF1 so that extension headers occur.
            let mut bytes = bytes;
            for m in &marks {
                if !bytes.is_empty() {
                    let i = m.index(bytes.len());
                    bytes[i] = 0xF1;
                }
            }
            if let Some(first) = bytes.first_mut() {
                if marks.len() % 2 == 1 {
                    *first = 0xF1;
                }
            }
            let decoder = Decoder::new(max).with_extensions();
            let mut buf = BytesMut::from(&bytes[..]);
            let before = buf.len();
            let mut consumed = 0;
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(Frame::Control(_))) => consumed += 20,
                    Ok(Some(Frame::Packet(p))) => {
                        prop_assert!(p.len() <= max);
                        consumed += p.len();
                    }
                    Ok(Some(Frame::Extension(e))) => {
                        prop_assert!(e.body.len() + 4 <= max);
                        consumed += e.body.len() + 4;
                        if ExtensionKind::from(e.kind) == ExtensionKind::SessionParams {
                            let _ = SessionParams::decode(&e.body);
                        }
                    }
                    Ok(Some(Frame::Super(s))) => {
                        prop_assert!(s.frame.len() <= max + SUPER_HEADER_LEN);
                        consumed += s.frame.len();
                    }
                    Ok(None) | Err(_) => break,
                }
                prop_assert_eq!(before - buf.len(), consumed);
            }
        }

        /// Decided field rules of the super-packet header: the length (8),
        /// the kind (1..=3), the flags (0) and the segment size (at least
        /// the kind's minimum) are checked; a header that passes is exactly
        /// what `SuperPacket::header` writes for its metadata, so nothing
        /// the decoder accepts is dropped on the way back out.
        #[test]
        fn super_packet_headers_are_checked_or_carried(
            header in prop::array::uniform8(any::<u8>()),
            pick in 0u8..4,
            (f, bytes) in frame(),
        ) {
            let Frame::Packet(_) = f else { return Ok(()) };
            let mut header = header;
            header[..2].copy_from_slice(&[0xF1, SUPER_PACKET]);
            // Valid fields more often than chance would make them.
            if pick & 1 == 1 {
                header[2..4].copy_from_slice(&[0, 8]);
                header[4] = 1 + header[4] % 3;
            }
            if pick & 2 == 2 {
                header[5] = 0;
            }
            let stream = [&header[..], &bytes[..]].concat();
            let decoder = Decoder::default().with_extensions();
            let len = decoder.frame_len(&stream);
            let decoded = decoder.decode(&mut BytesMut::from(&stream[..]));
            let kind = match header[4] {
                1 => Some(GsoKind::TcpV4),
                2 => Some(GsoKind::TcpV6),
                3 => Some(GsoKind::Udp),
                _ => None,
            };
            let size = u16::from_be_bytes([header[6], header[7]]);
            let valid = header[2..4] == [0, 8]
                && header[5] == 0
                && kind.is_some_and(|k| size >= k.min_segment());
            match &decoded {
                Ok(Some(Frame::Super(sup))) => {
                    prop_assert!(valid, "accepted {header:02x?}");
                    prop_assert_eq!(len, Ok(Some(stream.len())));
                    prop_assert_eq!(&SuperPacket::header(sup.gso)[..], &header[..]);
                    prop_assert_eq!(&sup.frame[..], &stream[..]);
                }
                // Refused, and frame_len says so too (a length below 4 is
                // ExtensionTooShort, the rest BadSuperPacket).
                Err(e) => {
                    prop_assert!(!valid, "refused {header:02x?}: {e}");
                    prop_assert!(
                        matches!(e, ProtocolError::BadSuperPacket(_) | ProtocolError::ExtensionTooShort(_)),
                        "{e:?}"
                    );
                    prop_assert_eq!(len, Err(e.clone()));
                }
                other => {
                    return Err(TestCaseError::fail(format!("{header:02x?}: {other:?}")));
                }
            }
        }

        /// Without extensions, a first nibble 0xF is an error as ever.
        #[test]
        fn extensions_are_refused_unless_enabled(p in params()) {
            let bytes = p.encode().expect("valid params encode");
            let mut buf = BytesMut::from(&bytes[..]);
            prop_assert!(Decoder::default().decode(&mut buf).is_err());
        }
    }
}
