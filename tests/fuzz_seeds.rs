//! The fuzz targets' seed corpora (fuzz/corpus/<target>/), made from the
//! current types and codecs: each test builds every seed of one target and
//! asserts that the directory holds exactly those files, byte for byte. A
//! change to a message, a frame or a target's input format makes them
//! drift, and the test fails until they are rewritten:
//!
//!     SIMPLEVPN_BLESS=1 cargo test --test fuzz_seeds
//!
//! which writes every seed and removes the files that are no seed any more.
//! New message variants must get a seed: the helper protocol's are named
//! by exhaustive matches, so a new variant does not compile until it has
//! one.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use simplevpn::offload::{
    Gso, GsoKind, VirtioNetHdr, F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4,
};
use simplevpn::params::{SessionParams, TAG_DNS, TAG_FLAGS, VERSION};
use simplevpn::privsep::protocol::{
    encode, Forwarding, HelperRequest, HelperResponse, Offloads, DEFAULTED_FIELDS,
};
use simplevpn::wire::{Control, Extension, Features, Marker, Request, SuperPacket};

/// Seeds by file name.
type Seeds = BTreeMap<String, Vec<u8>>;

/// Asserts that fuzz/corpus/`target`/ holds exactly `seeds` (or, with
/// SIMPLEVPN_BLESS=1, makes it so).
fn compare_or_bless(target: &str, seeds: &Seeds) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let bless = std::env::var("SIMPLEVPN_BLESS").as_deref() == Ok("1");
    let on_disk: Seeds = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().is_file())
                .map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let bytes = std::fs::read(e.path()).expect("read a seed");
                    (name, bytes)
                })
                .collect()
        })
        .unwrap_or_default();
    if bless {
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for name in on_disk.keys().filter(|n| !seeds.contains_key(*n)) {
            std::fs::remove_file(dir.join(name)).expect("remove a stale seed");
        }
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).expect("write a seed");
        }
        return;
    }
    let stale: Vec<&String> = on_disk.keys().filter(|n| !seeds.contains_key(*n)).collect();
    let missing: Vec<&String> = seeds.keys().filter(|n| !on_disk.contains_key(*n)).collect();
    let changed: Vec<&String> = seeds
        .iter()
        .filter(|(n, b)| on_disk.get(*n).is_some_and(|d| d != *b))
        .map(|(n, _)| n)
        .collect();
    assert!(
        stale.is_empty() && missing.is_empty() && changed.is_empty(),
        "fuzz/corpus/{target} drifted from the code: stale {stale:?}, missing {missing:?}, \
         changed {changed:?}; rewrite it with SIMPLEVPN_BLESS=1 cargo test --test fuzz_seeds"
    );
}

fn seeds(list: impl IntoIterator<Item = (String, Vec<u8>)>) -> Seeds {
    let mut out = Seeds::new();
    for (name, bytes) in list {
        assert!(
            out.insert(name.clone(), bytes).is_none(),
            "two seeds {name}"
        );
    }
    out
}

// ---- helper_request: byte 0 even + a whole frame, or odd + the JSON ----

fn request_name(request: &HelperRequest) -> &'static str {
    match request {
        HelperRequest::OpenTun => "open_tun",
        HelperRequest::SetAddress { .. } => "set_address",
        HelperRequest::SetAddress6 { .. } => "set_address6",
        HelperRequest::SetMtu { .. } => "set_mtu",
        HelperRequest::LinkUp { .. } => "link_up",
        HelperRequest::AddRoute { .. } => "add_route",
        HelperRequest::DelRoute { .. } => "del_route",
        HelperRequest::Masquerade { .. } => "masquerade",
        HelperRequest::CheckForwarding => "check_forwarding",
        HelperRequest::CheckForwarding6 => "check_forwarding6",
        HelperRequest::FullTunnel { .. } => "full_tunnel",
        HelperRequest::EndFullTunnel { .. } => "end_full_tunnel",
        HelperRequest::Underlay { .. } => "underlay",
        HelperRequest::SetDns { .. } => "set_dns",
        HelperRequest::RevertDns { .. } => "revert_dns",
    }
}

fn response_name(response: &HelperResponse) -> &'static str {
    match response {
        HelperResponse::Ok => "response_ok",
        HelperResponse::Tun { .. } => "response_tun",
        HelperResponse::Refused(_) => "response_refused",
        HelperResponse::Failed(_) => "response_failed",
        HelperResponse::Changed(_) => "response_changed",
        HelperResponse::Forwarding(_) => "response_forwarding",
    }
}

fn every_request() -> Vec<HelperRequest> {
    let index = 7;
    vec![
        HelperRequest::OpenTun,
        HelperRequest::SetAddress {
            index,
            address: Ipv4Addr::new(198, 19, 0, 1),
            prefix: 16,
        },
        HelperRequest::SetAddress6 {
            index,
            address: "2001:2:0:100::1".parse().expect("v6"),
            prefix: 64,
        },
        HelperRequest::SetMtu { index, mtu: 1500 },
        HelperRequest::LinkUp { index },
        HelperRequest::AddRoute {
            index,
            destination: "192.168.10.0/24".parse().expect("net"),
        },
        HelperRequest::DelRoute {
            index,
            destination: "2001:2:0:201::/64".parse().expect("net"),
        },
        HelperRequest::Masquerade { index },
        HelperRequest::CheckForwarding,
        HelperRequest::CheckForwarding6,
        HelperRequest::FullTunnel {
            index,
            server: IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1)),
        },
        HelperRequest::EndFullTunnel { index },
        HelperRequest::Underlay {
            index,
            server: IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1)),
        },
        HelperRequest::SetDns {
            index,
            servers: vec![
                IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1)),
                IpAddr::V6("2001:2::53".parse().expect("v6")),
            ],
            domains: vec!["vpn.example".into()],
            default_route: true,
        },
        HelperRequest::RevertDns { index },
    ]
}

fn every_response() -> Vec<HelperResponse> {
    vec![
        HelperResponse::Ok,
        HelperResponse::Tun {
            name: "svpn0".into(),
            index: 7,
            offloads: Offloads::TSO_USO,
        },
        HelperResponse::Refused("route 0.0.0.0/0 is not allowed".into()),
        HelperResponse::Failed("EPERM".into()),
        HelperResponse::Changed(vec!["route 198.18.1.1/32 via 198.18.0.1 dev eth0".into()]),
        HelperResponse::Forwarding(Forwarding::TurnedOn),
    ]
}

/// The frame of a message in the target's frame mode (byte 0 = 0).
fn frame_seed(frame: Vec<u8>) -> Vec<u8> {
    [vec![0], frame].concat()
}

#[test]
fn helper_request_seeds() {
    let mut list = Vec::new();
    for request in every_request() {
        let frame = encode(&request).expect("a request encodes");
        // The JSON alone, behind the correct prefix (byte 0 odd).
        list.push((
            format!("payload_{}", request_name(&request)),
            [vec![1], frame[4..].to_vec()].concat(),
        ));
        list.push((request_name(&request).to_string(), frame_seed(frame)));
    }
    for response in every_response() {
        let frame = encode(&response).expect("a response encodes");
        list.push((response_name(&response).to_string(), frame_seed(frame)));
    }
    // Each message lacking a field it may lack (an older helper's Tun).
    for (variant, field, _) in DEFAULTED_FIELDS {
        let response = every_response()
            .into_iter()
            .find(|r| response_name(r) == format!("response_{}", variant.to_lowercase()))
            .unwrap_or_else(|| panic!("no response {variant}"));
        let mut json = serde_json::to_value(&response).expect("JSON");
        let removed = json
            .get_mut(*variant)
            .and_then(|v| v.as_object_mut())
            .and_then(|fields| fields.remove(*field));
        assert!(removed.is_some(), "{variant} has no {field}");
        let payload = serde_json::to_vec(&json).expect("JSON");
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&payload);
        list.push((
            format!("response_{}_without_{field}", variant.to_lowercase()),
            frame_seed(frame),
        ));
    }
    compare_or_bless("helper_request", &seeds(list));
}

// ---- session_params: the body of a SESSION_PARAMS frame ----

/// The README's example: an address and a route.
fn readme() -> SessionParams {
    SessionParams {
        address4: Some("198.19.0.7/16".parse().expect("net")),
        routes: vec!["198.18.200.0/24".parse().expect("net")],
        ..SessionParams::default()
    }
}

/// The README's example with every other field set too.
fn full() -> SessionParams {
    let mut full = SessionParams {
        address6: Some("2001:2::2/64".parse().expect("net")),
        dns: vec!["198.19.0.1".parse().expect("ip")],
        dns_search: vec!["vpn.example".into(), "corp-1.example.com.".into()],
        default_route: true,
        other_flags: 0x8000_0000,
        ..readme()
    };
    for route in ["0.0.0.0/0", "2001:2:0:200::/64"] {
        full.routes.push(route.parse().expect("net"));
    }
    full.dns.push("2001:2::53".parse().expect("ip"));
    full
}

/// The body of the example in crates/proto/src/params.rs's documentation, byte for
/// byte as it is written there.
const DOCUMENTED_EXAMPLE: &str = "01 01 00 05 0a 00 01 07 10 03 00 05 18 c0 a8 0a 00 \
    04 00 04 0a 00 00 01 05 00 0b 76 70 6e 2e 65 78 61 6d 70 6c 65 06 00 04 00 00 00 01";

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect()
}

fn body(params: &SessionParams) -> Vec<u8> {
    params.encode_body().expect("valid params").to_vec()
}

#[test]
fn session_params_seeds() {
    let documented = hex(DOCUMENTED_EXAMPLE);
    let decoded = SessionParams::decode(&documented).expect("the documented example decodes");
    assert_eq!(
        body(&decoded),
        documented,
        "the documented example is canonical"
    );
    // A later version's tag, then DNS, then FLAGS with unknown bits.
    let mut unknown = vec![VERSION, 0x7f, 0, 15];
    unknown.extend_from_slice(b"from the future");
    unknown.extend_from_slice(&[TAG_DNS, 0, 4, 1, 1, 1, 1]);
    unknown.extend_from_slice(&[TAG_FLAGS, 0, 4, 0xff, 0xff, 0xff, 0xfe]);
    let list = [
        ("documented_example", documented),
        ("empty", body(&SessionParams::default())),
        ("full", body(&full())),
        ("readme_example", body(&readme())),
        ("unknown_tags", unknown),
    ];
    compare_or_bless(
        "session_params",
        &seeds(list.map(|(n, b)| (n.to_string(), b))),
    );
}

// ---- wire_decoder: byte 0 the split, byte 1 the maximum, then the stream ----

fn v4_packet(len: usize, proto: u8) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&[198, 19, 0, 2]);
    p[16..20].copy_from_slice(&[198, 19, 0, 3]);
    if proto == 6 {
        p[32] = 0x50;
    }
    p
}

fn v6_packet(len: usize, proto: u8) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    p[6] = proto;
    p[7] = 64;
    let a: Ipv6Addr = "2001:2::2".parse().expect("v6");
    let b: Ipv6Addr = "2001:2::3".parse().expect("v6");
    p[8..24].copy_from_slice(&a.octets());
    p[24..40].copy_from_slice(&b.octets());
    if proto == 6 {
        p[52] = 0x50;
    }
    p
}

fn stream(split: u8, max: u8, frames: &[&[u8]]) -> Vec<u8> {
    [vec![split, max], frames.concat()].concat()
}

#[test]
fn wire_decoder_seeds() {
    let granted = Ipv4Addr::new(198, 19, 0, 2);
    let keepalive = Control::KEEPALIVE.encode();
    let grant = Control::grant(granted, Some(Ipv4Addr::new(255, 255, 0, 0)));
    let params = full().encode().expect("params");
    let tcp4 = SuperPacket::new(
        Gso {
            kind: GsoKind::TcpV4,
            size: 1448,
        },
        &v4_packet(40 + 4000, 6),
    );
    let udp6 = SuperPacket::new(
        Gso {
            kind: GsoKind::Udp,
            size: 1232,
        },
        &v6_packet(48 + 3000, 17),
    );
    let unknown = Extension {
        kind: 0x42,
        body: Default::default(),
    }
    .encode()
    .expect("extension");
    // Max choice (byte 1): 0 -> 0, 1 -> 64, 2 -> 1500, 3 -> default, 4 -> 70000.
    let list = [
        (
            "request_dynamic",
            stream(1, 2, &[&Control::request(Request::Dynamic).encode()]),
        ),
        (
            "request_offer",
            stream(
                1,
                2,
                &[&Control::request(Request::Dynamic)
                    .with_marker(Marker::Offer)
                    .encode()],
            ),
        ),
        (
            "request_static",
            stream(
                3,
                2,
                &[&Control::request(Request::Static(granted)).encode()],
            ),
        ),
        ("grant", stream(0, 2, &[&grant.encode()])),
        (
            "grant_original",
            stream(0, 2, &[&Control::grant(granted, None).encode()]),
        ),
        (
            "grant_accept",
            stream(0, 3, &[&grant.with_marker(Marker::Accept).encode()]),
        ),
        ("keepalive", stream(5, 1, &[&keepalive])),
        ("packet_v4", stream(3, 2, &[&v4_packet(28, 1)])),
        ("packet_v6", stream(7, 2, &[&v6_packet(48, 58)])),
        ("extension_session_params", stream(0, 3, &[&params])),
        ("extension_unknown_empty", stream(2, 3, &[&unknown])),
        (
            "features",
            stream(0, 3, &[&Features::SUPER_PACKETS.encode()]),
        ),
        ("super_tcp4", stream(0, 3, &[&tcp4.frame])),
        ("super_udp6", stream(9, 3, &[&udp6.frame])),
        (
            "stream_mixed",
            stream(
                11,
                3,
                &[
                    &keepalive,
                    &params,
                    &v4_packet(60, 17),
                    &tcp4.frame,
                    &Features::SUPER_PACKETS.encode(),
                    &keepalive,
                ],
            ),
        ),
    ];
    compare_or_bless(
        "wire_decoder",
        &seeds(list.map(|(n, b)| (n.to_string(), b))),
    );
}

// ---- offload_split: kind, segment size, MTU, virtio-net header, packet ----

fn offload_seed(kind: u8, size: u16, mtu: u16, hdr: VirtioNetHdr, packet: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&mtu.to_be_bytes());
    out.extend_from_slice(&hdr.encode());
    out.extend_from_slice(packet);
    out
}

/// The header a tun puts before a super-packet of `gso_type`.
fn gso_header(gso_type: u8, gso_size: u16, ip: u16, tcp: bool) -> VirtioNetHdr {
    VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type,
        hdr_len: ip + if tcp { 20 } else { 8 },
        gso_size,
        csum_start: ip,
        csum_offset: if tcp { 16 } else { 6 },
    }
}

#[test]
fn offload_split_seeds() {
    let mut udp4 = v4_packet(28 + 3000, 17);
    udp4[24..26].copy_from_slice(&3008u16.to_be_bytes());
    let mut udp6 = v6_packet(48 + 3000, 17);
    udp6[44..46].copy_from_slice(&3008u16.to_be_bytes());
    let mut udp4_no_df = v4_packet(28 + 3000, 17);
    udp4_no_df[6] = 0;
    let mut one_segment = gso_header(GSO_NONE, 0, 20, true);
    one_segment.hdr_len = 0;
    // Super-packets as a tun reads them: (name, kind byte, GSO type,
    // segment size, MTU, IP header length, TCP, packet).
    let supers = [
        (
            "tso_v4",
            0,
            GSO_TCPV4,
            1448,
            1500,
            20,
            true,
            v4_packet(40 + 4000, 6),
        ),
        (
            "tso_v6",
            1,
            GSO_TCPV6,
            1428,
            1500,
            40,
            true,
            v6_packet(60 + 4000, 6),
        ),
        ("uso_v4", 2, GSO_UDP_L4, 1200, 1280, 20, false, udp4),
        ("uso_v6", 2, GSO_UDP_L4, 1232, 1280, 40, false, udp6),
    ];
    // Plain packets (no offload): (name, kind byte, size, MTU, packet).
    let plain = [
        ("plain_too_big_df", 2, 512, 576, v4_packet(28 + 1400, 17)),
        ("plain_fragment", 2, 512, 576, udp4_no_df),
        ("plain_v6_too_big", 1, 1220, 1280, v6_packet(40 + 1400, 17)),
    ];
    let mut list: Vec<(String, Vec<u8>)> = supers
        .into_iter()
        .map(|(name, kind, gso_type, size, mtu, ip, tcp, packet)| {
            let hdr = gso_header(gso_type, size, ip, tcp);
            (
                name.to_string(),
                offload_seed(kind, size, mtu, hdr, &packet),
            )
        })
        .collect();
    list.extend(plain.into_iter().map(|(name, kind, size, mtu, packet)| {
        let hdr = VirtioNetHdr::default();
        (
            name.to_string(),
            offload_seed(kind, size, mtu, hdr, &packet),
        )
    }));
    list.push((
        "partial_checksum_one_segment".into(),
        offload_seed(0, 536, 1500, one_segment, &v4_packet(40 + 100, 6)),
    ));
    compare_or_bless("offload_split", &seeds(list));
}

#[test]
fn join_message_seeds() {
    use simplevpn::join::{
        JoinAccepted, JoinMessage, JoinRefusal, JoinRequest, Secret, Token, SECRET_LEN,
    };
    use simplevpn::keys::PublicKey;
    let key = |n: u8| PublicKey::from_raw(&[n; 32]).expect("key");
    let message = |m: JoinMessage| [vec![0], m.encode().expect("encode")].concat();
    let request = JoinMessage::Request(JoinRequest {
        secret: Secret([0x5a; SECRET_LEN]),
        name: "laptop".into(),
    });
    let accepted = JoinMessage::Accepted(JoinAccepted {
        name: "laptop".into(),
        address: Some(Ipv4Addr::new(198, 19, 0, 50)),
        server_keys: vec![key(1), key(2)],
    });
    let bare = JoinMessage::Accepted(JoinAccepted {
        name: "phone".into(),
        address: None,
        server_keys: Vec::new(),
    });
    let token = Token {
        endpoint: "198.18.1.1:2002".into(),
        server_keys: vec![key(1)],
        name: "laptop".into(),
        secret: Secret([0x5a; SECRET_LEN]),
    }
    .encode()
    .expect("token");
    let all = seeds([
        ("request".to_string(), message(request)),
        ("accepted".to_string(), message(accepted)),
        ("accepted_bare".to_string(), message(bare)),
        (
            "refused_used".to_string(),
            message(JoinMessage::Refused(JoinRefusal::Used)),
        ),
        (
            "refused_unavailable".to_string(),
            message(JoinMessage::Refused(JoinRefusal::Unavailable)),
        ),
        (
            "token".to_string(),
            [b"\x01".as_slice(), token.as_bytes()].concat(),
        ),
    ]);
    compare_or_bless("join_message", &all);
}
