//! Session parameters: what a server tells one of our own clients beyond the
//! original 20-byte grant (addresses, routes, DNS, default gateway). Sans-IO,
//! beside [`crate::wire`]: this module turns [`SessionParams`] into an
//! extension frame and an extension frame's body back into
//! [`SessionParams`].
//!
//! # Wire format
//!
//! Only between our own peers, and only when TLS negotiated the ALPN
//! protocol "simplevpn/2" (`simplevpn::tls::speaks_extension`). Original-protocol
//! peers, and TLS peers that did not offer the ALPN, never receive
//! extension frames.
//!
//! Extension frame (see [`crate::wire`]):
//!
//! ```text
//! byte 0      0xF1   high nibble 0xF: extension frame (no IP version is 15);
//!                    low nibble 1: extension framing version 1
//! byte 1      type   message type; 1 = SESSION_PARAMS (server to client).
//!                    Receivers ignore types they do not know.
//! bytes 2..4  length total frame length, u16 big-endian, including these
//!                    4 header bytes: at least 4, at most the receiver's
//!                    maximum frame length (default 65535)
//! bytes 4..   body   length - 4 bytes
//! ```
//!
//! SESSION_PARAMS body:
//!
//! ```text
//! byte 0      version = 1 (any other version is an error)
//! then        entries, until the end of the body, each:
//!               tag    u8
//!               length u16 big-endian: the number of value bytes
//!               value  length bytes
//! ```
//!
//! A receiver skips entries whose tag it does not know. A known tag with the
//! wrong length, an entry cut off by the end of the body, or a value that is
//! not valid is an error ([`ParamsError`]). Known tags:
//!
//! ```text
//! 0x01 ADDRESS4    length 5: IPv4 address (4 bytes) + prefix length (1 byte,
//!                  0..=32); the client's IPv4 address and network; at most once
//! 0x02 ADDRESS6    length 17: IPv6 address (16 bytes) + prefix length (1 byte,
//!                  0..=128); the client's IPv6 address and network; at most once
//! 0x03 ROUTE       length 5: prefix length (1 byte, 0..=32) + IPv4 network (4)
//!                  length 17: prefix length (1 byte, 0..=128) + IPv6 network (16)
//!                  a network reachable through the tunnel; host bits must be 0;
//!                  repeatable, at most 1024
//! 0x04 DNS         length 4 or 16: a DNS server's IPv4 or IPv6 address;
//!                  repeatable, at most 16
//! 0x05 DNS_SEARCH  length 1..=253: a search domain, ASCII letters, digits,
//!                  '-' and '.' only; repeatable, at most 16
//! 0x06 FLAGS       length 4: u32 big-endian; bit 0 (value 1) = DEFAULT_ROUTE:
//!                  the server offers itself as the default gateway; other bits
//!                  mean nothing to this version, which carries them (they
//!                  decode into `other_flags` and re-encode as they came) and
//!                  acts on none of them; at most once
//! ```
//!
//! Absent tags mean: no such address, no routes, no DNS, flags 0. Our
//! encoder writes the entries in tag order (ADDRESS4, ADDRESS6, the ROUTEs,
//! DNS, DNS_SEARCH, then FLAGS only when a bit is set); decoders accept any
//! order and keep the order of repeated entries.
//!
//! Decided field rules: every field of a known tag is checked (its length,
//! the prefix range, host bits, the domain's characters, the counts, a
//! single ADDRESS4, ADDRESS6 and FLAGS) or carried (the values, and every
//! FLAGS bit). So whatever [`SessionParams::decode`] accepts re-encodes to
//! a body that decodes to the same value, and is the input itself when the
//! input was canonical (tag order, no empty FLAGS, no unknown tags). An
//! entry of an unknown tag is a parameter of a later version, not a field
//! of this one: it is skipped, and not re-encoded.
//!
//! Example: address 10.0.1.7/16, route 192.168.10.0/24, DNS 10.0.0.1, search
//! domain "vpn.example", default route (49 bytes):
//!
//! ```text
//! f1 01 00 31                            extension, SESSION_PARAMS, 49 bytes
//! 01                                     version 1
//! 01 00 05  0a 00 01 07 10               ADDRESS4 10.0.1.7/16
//! 03 00 05  18 c0 a8 0a 00               ROUTE 192.168.10.0/24
//! 04 00 04  0a 00 00 01                  DNS 10.0.0.1
//! 05 00 0b  76 70 6e 2e 65 78 61 6d 70 6c 65   DNS_SEARCH "vpn.example"
//! 06 00 04  00 00 00 01                  FLAGS DEFAULT_ROUTE
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{BufMut, Bytes, BytesMut};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::wire::{Extension, EXTENSION_HEADER_LEN, SESSION_PARAMS};

/// The SESSION_PARAMS body version this module reads and writes.
pub const VERSION: u8 = 1;

/// Tag of the client's IPv4 address and prefix.
pub const TAG_ADDRESS4: u8 = 0x01;
/// Tag of the client's IPv6 address and prefix.
pub const TAG_ADDRESS6: u8 = 0x02;
/// Tag of one network routed through the tunnel.
pub const TAG_ROUTE: u8 = 0x03;
/// Tag of one DNS server.
pub const TAG_DNS: u8 = 0x04;
/// Tag of one DNS search domain.
pub const TAG_DNS_SEARCH: u8 = 0x05;
/// Tag of the flags word.
pub const TAG_FLAGS: u8 = 0x06;

/// FLAGS bit 0: the server offers itself as the default gateway.
pub const FLAG_DEFAULT_ROUTE: u32 = 1;

/// The most ROUTE entries in one SESSION_PARAMS.
pub const MAX_ROUTES: usize = 1024;
/// The most DNS entries in one SESSION_PARAMS.
pub const MAX_DNS: usize = 16;
/// The most DNS_SEARCH entries in one SESSION_PARAMS.
pub const MAX_DNS_SEARCH: usize = 16;
/// The longest DNS_SEARCH domain, in bytes.
pub const MAX_DOMAIN_LEN: usize = 253;

/// Length of an entry's tag and length fields.
const ENTRY_HEADER_LEN: usize = 3;

/// The longest SESSION_PARAMS frame the limits allow (every field at its
/// maximum, all routes IPv6): 24920 bytes. A client's decoder must accept
/// frames this long to be sure of receiving any server's parameters.
pub const MAX_ENCODED_LEN: usize = EXTENSION_HEADER_LEN
    + 1
    + (ENTRY_HEADER_LEN + 5)
    + (ENTRY_HEADER_LEN + 17)
    + MAX_ROUTES * (ENTRY_HEADER_LEN + 17)
    + MAX_DNS * (ENTRY_HEADER_LEN + 16)
    + MAX_DNS_SEARCH * (ENTRY_HEADER_LEN + MAX_DOMAIN_LEN)
    + (ENTRY_HEADER_LEN + 4);

/// Why session parameters could not be decoded (or encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    #[error("empty session parameters: no version byte")]
    Empty,
    #[error("unsupported session parameters version {0}")]
    Version(u8),
    #[error("session parameters entry at offset {offset} is cut off")]
    Truncated { offset: usize },
    #[error("session parameters tag {tag:#04x} with length {len}")]
    Length { tag: u8, len: usize },
    #[error("session parameters tag {tag:#04x}: prefix length /{prefix} is out of range")]
    Prefix { tag: u8, prefix: u8 },
    #[error("route {0} has host bits set")]
    HostBits(IpNet),
    #[error("DNS search domain \"{0}\" is not 1 to 253 ASCII letters, digits, '-' and '.'")]
    Domain(String),
    #[error("more than {max} {what} in session parameters")]
    TooMany { what: &'static str, max: usize },
    #[error("session parameters tag {0:#04x} appears more than once")]
    Repeated(u8),
    #[error("session parameters of {0} bytes do not fit in one frame")]
    TooLong(usize),
}

/// What the server tells one client about its session (SESSION_PARAMS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionParams {
    /// The client's IPv4 address and network (ADDRESS4).
    pub address4: Option<Ipv4Net>,
    /// The client's IPv6 address and network (ADDRESS6).
    pub address6: Option<Ipv6Net>,
    /// Networks reachable through the tunnel, host bits 0 (ROUTE).
    pub routes: Vec<IpNet>,
    /// DNS servers (DNS).
    pub dns: Vec<IpAddr>,
    /// DNS search domains (DNS_SEARCH).
    pub dns_search: Vec<String>,
    /// The server offers itself as the default gateway (FLAGS bit 0).
    pub default_route: bool,
    /// The FLAGS bits this version does not know (bit 0 excluded: that is
    /// `default_route`), carried as they came; nothing acts on them.
    pub other_flags: u32,
}

impl SessionParams {
    /// The whole extension frame (header included), ready to send. Fails
    /// when the parameters break a rule that the decoder enforces: more
    /// entries than the limits, a route with host bits set, a search domain
    /// that is not 1..=253 letters, digits, '-' and '.'.
    pub fn encode(&self) -> Result<Bytes, ParamsError> {
        let body = self.encode_body()?;
        let len = EXTENSION_HEADER_LEN + body.len();
        Extension {
            kind: SESSION_PARAMS,
            body,
        }
        .encode()
        .map_err(|_| ParamsError::TooLong(len))
    }

    /// The body alone (what [`SessionParams::decode`] reads), checked as by
    /// [`SessionParams::encode`].
    pub fn encode_body(&self) -> Result<Bytes, ParamsError> {
        check_count("routes", self.routes.len(), MAX_ROUTES)?;
        check_count("DNS servers", self.dns.len(), MAX_DNS)?;
        check_count("DNS search domains", self.dns_search.len(), MAX_DNS_SEARCH)?;
        let mut out = BytesMut::with_capacity(256);
        out.put_u8(VERSION);
        if let Some(net) = self.address4 {
            put_entry(
                &mut out,
                TAG_ADDRESS4,
                &[&net.addr().octets(), &[net.prefix_len()]],
            );
        }
        if let Some(net) = self.address6 {
            put_entry(
                &mut out,
                TAG_ADDRESS6,
                &[&net.addr().octets(), &[net.prefix_len()]],
            );
        }
        for route in &self.routes {
            if route.trunc() != *route {
                return Err(ParamsError::HostBits(*route));
            }
            match route {
                IpNet::V4(n) => put_entry(
                    &mut out,
                    TAG_ROUTE,
                    &[&[n.prefix_len()], &n.addr().octets()],
                ),
                IpNet::V6(n) => put_entry(
                    &mut out,
                    TAG_ROUTE,
                    &[&[n.prefix_len()], &n.addr().octets()],
                ),
            }
        }
        for server in &self.dns {
            match server {
                IpAddr::V4(a) => put_entry(&mut out, TAG_DNS, &[&a.octets()]),
                IpAddr::V6(a) => put_entry(&mut out, TAG_DNS, &[&a.octets()]),
            }
        }
        for domain in &self.dns_search {
            if !valid_domain(domain.as_bytes()) {
                return Err(ParamsError::Domain(
                    domain.as_bytes().escape_ascii().to_string(),
                ));
            }
            put_entry(&mut out, TAG_DNS_SEARCH, &[domain.as_bytes()]);
        }
        let flags = match self.default_route {
            true => FLAG_DEFAULT_ROUTE,
            false => 0,
        } | (self.other_flags & !FLAG_DEFAULT_ROUTE);
        if flags != 0 {
            put_entry(&mut out, TAG_FLAGS, &[&flags.to_be_bytes()]);
        }
        Ok(out.freeze())
    }

    /// Reads the body of a SESSION_PARAMS extension frame
    /// ([`crate::wire::Extension::body`]). Skips unknown tags; any other
    /// deviation from the format is an error. Never panics.
    pub fn decode(body: &[u8]) -> Result<SessionParams, ParamsError> {
        let (&version, mut rest) = body.split_first().ok_or(ParamsError::Empty)?;
        if version != VERSION {
            return Err(ParamsError::Version(version));
        }
        let mut params = SessionParams::default();
        let mut flags_seen = false;
        let mut offset = 1;
        while !rest.is_empty() {
            let &[tag, high, low, ref tail @ ..] = rest else {
                return Err(ParamsError::Truncated { offset });
            };
            let len = usize::from(u16::from_be_bytes([high, low]));
            let Some((value, next)) = tail.split_at_checked(len) else {
                return Err(ParamsError::Truncated { offset });
            };
            let wrong_length = || ParamsError::Length { tag, len };
            match tag {
                TAG_ADDRESS4 => {
                    let &[a, b, c, d, prefix] = value else {
                        return Err(wrong_length());
                    };
                    if params.address4.is_some() {
                        return Err(ParamsError::Repeated(tag));
                    }
                    let net = Ipv4Net::new(Ipv4Addr::new(a, b, c, d), prefix)
                        .map_err(|_| ParamsError::Prefix { tag, prefix })?;
                    params.address4 = Some(net);
                }
                TAG_ADDRESS6 => {
                    let Some((&address, &[prefix])) = value.split_first_chunk::<16>() else {
                        return Err(wrong_length());
                    };
                    if params.address6.is_some() {
                        return Err(ParamsError::Repeated(tag));
                    }
                    let net = Ipv6Net::new(Ipv6Addr::from(address), prefix)
                        .map_err(|_| ParamsError::Prefix { tag, prefix })?;
                    params.address6 = Some(net);
                }
                TAG_ROUTE => {
                    let (&prefix, network) = value.split_first().ok_or_else(wrong_length)?;
                    let address = match network.len() {
                        4 => ipv4(network).map(IpAddr::V4),
                        16 => ipv6(network).map(IpAddr::V6),
                        _ => None,
                    }
                    .ok_or_else(wrong_length)?;
                    let net = IpNet::new(address, prefix)
                        .map_err(|_| ParamsError::Prefix { tag, prefix })?;
                    if net.trunc() != net {
                        return Err(ParamsError::HostBits(net));
                    }
                    check_count("routes", params.routes.len() + 1, MAX_ROUTES)?;
                    params.routes.push(net);
                }
                TAG_DNS => {
                    let server = match value.len() {
                        4 => ipv4(value).map(IpAddr::V4),
                        16 => ipv6(value).map(IpAddr::V6),
                        _ => None,
                    }
                    .ok_or_else(wrong_length)?;
                    check_count("DNS servers", params.dns.len() + 1, MAX_DNS)?;
                    params.dns.push(server);
                }
                TAG_DNS_SEARCH => {
                    if !valid_domain(value) {
                        return Err(ParamsError::Domain(value.escape_ascii().to_string()));
                    }
                    let domain = String::from_utf8(value.to_vec())
                        .map_err(|_| ParamsError::Domain(value.escape_ascii().to_string()))?;
                    check_count(
                        "DNS search domains",
                        params.dns_search.len() + 1,
                        MAX_DNS_SEARCH,
                    )?;
                    params.dns_search.push(domain);
                }
                TAG_FLAGS => {
                    let &[a, b, c, d] = value else {
                        return Err(wrong_length());
                    };
                    if flags_seen {
                        return Err(ParamsError::Repeated(tag));
                    }
                    flags_seen = true;
                    let flags = u32::from_be_bytes([a, b, c, d]);
                    params.default_route = flags & FLAG_DEFAULT_ROUTE != 0;
                    params.other_flags = flags & !FLAG_DEFAULT_ROUTE;
                }
                // Unknown tags: skipped, for parameters added later.
                _ => {}
            }
            offset += ENTRY_HEADER_LEN + len;
            rest = next;
        }
        Ok(params)
    }
}

fn check_count(what: &'static str, count: usize, max: usize) -> Result<(), ParamsError> {
    match count <= max {
        true => Ok(()),
        false => Err(ParamsError::TooMany { what, max }),
    }
}

/// Appends one entry whose value is the concatenation of `parts`. Every
/// value the encoder writes is far below 65535 bytes.
fn put_entry(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.put_u8(tag);
    out.put_u16(u16::try_from(len).unwrap_or(u16::MAX));
    for part in parts {
        out.put_slice(part);
    }
}

/// A DNS_SEARCH value: 1..=253 ASCII letters, digits, '-' and '.'.
pub fn valid_domain(value: &[u8]) -> bool {
    (1..=MAX_DOMAIN_LEN).contains(&value.len())
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.')
}

/// The IPv4 address in exactly 4 bytes.
fn ipv4(bytes: &[u8]) -> Option<Ipv4Addr> {
    <[u8; 4]>::try_from(bytes).ok().map(Ipv4Addr::from)
}

/// The IPv6 address in exactly 16 bytes.
fn ipv6(bytes: &[u8]) -> Option<Ipv6Addr> {
    <[u8; 16]>::try_from(bytes).ok().map(Ipv6Addr::from)
}

/// Splits pushed search domains into those a client applies and those it
/// leaves out: a domain of a single label (`lan`, `com`) is left out unless
/// `all` says otherwise, since systemd-resolved sends every lookup under a
/// link's domains to that link's servers (a server pushing `com` would
/// answer for every .com name).
pub fn split_wide_domains(domains: Vec<String>, all: bool) -> (Vec<String>, Vec<String>) {
    domains.into_iter().partition(|d| all || !single_label(d))
}

/// Whether `domain` has one label (a trailing dot does not count).
pub fn single_label(domain: &str) -> bool {
    !domain.trim_end_matches('.').contains('.')
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::wire::tests::hex;
    use crate::wire::{Decoder, ExtensionKind, Frame};

    fn example() -> SessionParams {
        SessionParams {
            address4: Some("10.0.1.7/16".parse().expect("net")),
            routes: vec!["192.168.10.0/24".parse().expect("net")],
            dns: vec!["10.0.0.1".parse().expect("ip")],
            dns_search: vec!["vpn.example".into()],
            default_route: true,
            ..SessionParams::default()
        }
    }

    fn full() -> SessionParams {
        SessionParams {
            address4: Some("198.19.0.2/16".parse().expect("net")),
            address6: Some("fd00:5::2/64".parse().expect("net")),
            routes: vec![
                "192.168.10.0/24".parse().expect("net"),
                "0.0.0.0/0".parse().expect("net"),
                "10.9.8.7/32".parse().expect("net"),
                "fd00:1::/48".parse().expect("net"),
                "::/0".parse().expect("net"),
            ],
            dns: vec![
                "10.0.0.1".parse().expect("ip"),
                "fd00::53".parse().expect("ip"),
            ],
            dns_search: vec!["vpn.example".into(), "corp-1.example.com.".into()],
            default_route: true,
            other_flags: 0,
        }
    }

    /// A body: version 1 and the given raw entries.
    fn body(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut out = vec![VERSION];
        for (tag, value) in entries {
            out.push(*tag);
            out.extend_from_slice(&(value.len() as u16).to_be_bytes());
            out.extend_from_slice(value);
        }
        out
    }

    #[test]
    fn the_documented_example_byte_for_byte() {
        let want = hex("f1 01 00 31 01 \
             01 00 05 0a 00 01 07 10 \
             03 00 05 18 c0 a8 0a 00 \
             04 00 04 0a 00 00 01 \
             05 00 0b 76 70 6e 2e 65 78 61 6d 70 6c 65 \
             06 00 04 00 00 00 01");
        let frame = example().encode().expect("encode");
        assert_eq!(frame.to_vec(), want);
        assert_eq!(SessionParams::decode(&want[4..]), Ok(example()));
    }

    #[test]
    fn the_readmes_example_byte_for_byte() {
        let want = hex("f1 01 00 15 01 01 00 05 c6 13 00 07 10 03 00 05 18 c6 12 c8 00");
        let params = SessionParams {
            address4: Some("198.19.0.7/16".parse().expect("net")),
            routes: vec!["198.18.200.0/24".parse().expect("net")],
            ..SessionParams::default()
        };
        assert_eq!(params.encode().expect("encode").to_vec(), want);
    }

    #[test]
    fn round_trip_through_the_decoder() {
        for params in [SessionParams::default(), example(), full()] {
            let frame = params.encode().expect("encode");
            let mut buf = BytesMut::from(&frame[..]);
            let decoded = Decoder::default().with_extensions().decode(&mut buf);
            let Ok(Some(Frame::Extension(ext))) = decoded else {
                panic!("not an extension frame: {decoded:?}");
            };
            assert!(buf.is_empty());
            assert_eq!(ExtensionKind::from(ext.kind), ExtensionKind::SessionParams);
            assert_eq!(SessionParams::decode(&ext.body), Ok(params));
        }
        // Empty parameters: just the version.
        assert_eq!(
            SessionParams::default().encode().expect("encode").to_vec(),
            hex("f1 01 00 05 01")
        );
    }

    #[test]
    fn the_largest_parameters_fit_in_a_frame() {
        let largest = SessionParams {
            address4: Some("10.0.0.2/8".parse().expect("net")),
            address6: Some("fd00::2/64".parse().expect("net")),
            routes: (0..MAX_ROUTES as u128)
                .map(|i| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(i), 128).expect("net")))
                .collect(),
            dns: vec![IpAddr::V6(Ipv6Addr::LOCALHOST); MAX_DNS],
            dns_search: vec!["a".repeat(MAX_DOMAIN_LEN); MAX_DNS_SEARCH],
            default_route: true,
            other_flags: !FLAG_DEFAULT_ROUTE,
        };
        let frame = largest.encode().expect("encode");
        assert_eq!(frame.len(), MAX_ENCODED_LEN);
        assert!(MAX_ENCODED_LEN <= usize::from(u16::MAX));
        assert_eq!(SessionParams::decode(&frame[4..]), Ok(largest));
    }

    #[test]
    fn unknown_tags_are_skipped() {
        let raw = body(&[
            (0x7f, b"from the future"),
            (TAG_DNS, &[1, 1, 1, 1]),
            (0x00, &[]),
            (0xff, &[0; 300]),
        ]);
        assert_eq!(
            SessionParams::decode(&raw),
            Ok(SessionParams {
                dns: vec!["1.1.1.1".parse().expect("ip")],
                ..SessionParams::default()
            })
        );
    }

    #[test]
    fn unknown_flags_mean_nothing_and_are_carried() {
        let raw = body(&[(TAG_FLAGS, &[0xff, 0xff, 0xff, 0xfe])]);
        let params = SessionParams::decode(&raw).expect("decodes");
        assert_eq!(
            (params.default_route, params.other_flags),
            (false, 0xffff_fffe)
        );
        assert_eq!(params.encode_body().as_deref(), Ok(&raw[..]));
        let raw = body(&[(TAG_FLAGS, &[0x80, 0, 0, 0x01])]);
        let params = SessionParams::decode(&raw).expect("decodes");
        assert_eq!(
            (params.default_route, params.other_flags),
            (true, 0x8000_0000)
        );
        assert_eq!(params.encode_body().as_deref(), Ok(&raw[..]));
        // Bit 0 is default_route's alone: other_flags cannot set it.
        let odd = SessionParams {
            other_flags: FLAG_DEFAULT_ROUTE | 4,
            ..SessionParams::default()
        };
        assert_eq!(
            odd.encode_body().as_deref(),
            Ok(&body(&[(TAG_FLAGS, &[0, 0, 0, 4])])[..])
        );
        // An empty FLAGS entry is flags 0, which the encoder leaves out.
        let empty = body(&[(TAG_FLAGS, &[0; 4])]);
        let params = SessionParams::decode(&empty).expect("decodes");
        assert_eq!(params, SessionParams::default());
        assert_eq!(params.encode_body().as_deref(), Ok(&body(&[])[..]));
    }

    #[test]
    fn unknown_message_types_are_framed_and_told_apart() {
        // Type 9 with a body that is no SESSION_PARAMS: the decoder frames
        // it, the receiver sees Unknown(9) and ignores it. (Types 2 and 3
        // are the super-packet and features frames, see crate::wire.)
        let frame = Extension {
            kind: 9,
            body: Bytes::from_static(b"\xff\xff"),
        }
        .encode()
        .expect("encode");
        let mut buf = BytesMut::from(&frame[..]);
        buf.extend_from_slice(&example().encode().expect("encode"));
        let d = Decoder::default().with_extensions();
        let mut seen = Vec::new();
        while let Some(Frame::Extension(ext)) = d.decode(&mut buf).expect("valid") {
            match ExtensionKind::from(ext.kind) {
                ExtensionKind::SessionParams => {
                    seen.push(SessionParams::decode(&ext.body).expect("params"))
                }
                ExtensionKind::Features | ExtensionKind::Unknown(_) => {}
            }
        }
        assert_eq!(seen, vec![example()]);
    }

    #[test]
    fn malformed_bodies() {
        let cases: Vec<(Vec<u8>, ParamsError)> = vec![
            (vec![], ParamsError::Empty),
            (vec![2], ParamsError::Version(2)),
            (vec![0], ParamsError::Version(0)),
            // Entry headers and values cut off.
            (vec![1, TAG_DNS], ParamsError::Truncated { offset: 1 }),
            (vec![1, TAG_DNS, 0], ParamsError::Truncated { offset: 1 }),
            (
                vec![1, TAG_DNS, 0, 4, 1, 1, 1],
                ParamsError::Truncated { offset: 1 },
            ),
            (
                [body(&[(TAG_DNS, &[1, 1, 1, 1])]), vec![0x7f, 0, 9, 1]].concat(),
                ParamsError::Truncated { offset: 8 },
            ),
            // Wrong lengths of known tags.
            (
                body(&[(TAG_ADDRESS4, &[10, 0, 0, 1])]),
                ParamsError::Length {
                    tag: TAG_ADDRESS4,
                    len: 4,
                },
            ),
            (
                body(&[(TAG_ADDRESS6, &[0; 16])]),
                ParamsError::Length {
                    tag: TAG_ADDRESS6,
                    len: 16,
                },
            ),
            (
                body(&[(TAG_ADDRESS6, &[0; 18])]),
                ParamsError::Length {
                    tag: TAG_ADDRESS6,
                    len: 18,
                },
            ),
            (
                body(&[(TAG_ROUTE, &[8, 10, 0, 0])]),
                ParamsError::Length {
                    tag: TAG_ROUTE,
                    len: 4,
                },
            ),
            (
                body(&[(TAG_ROUTE, &[])]),
                ParamsError::Length {
                    tag: TAG_ROUTE,
                    len: 0,
                },
            ),
            (
                body(&[(TAG_DNS, &[0; 5])]),
                ParamsError::Length {
                    tag: TAG_DNS,
                    len: 5,
                },
            ),
            (
                body(&[(TAG_FLAGS, &[0, 1])]),
                ParamsError::Length {
                    tag: TAG_FLAGS,
                    len: 2,
                },
            ),
            // Invalid content.
            (
                body(&[(TAG_ADDRESS4, &[10, 0, 0, 1, 33])]),
                ParamsError::Prefix {
                    tag: TAG_ADDRESS4,
                    prefix: 33,
                },
            ),
            (
                body(&[(TAG_ADDRESS6, &[[0u8; 16].as_slice(), &[129]].concat())]),
                ParamsError::Prefix {
                    tag: TAG_ADDRESS6,
                    prefix: 129,
                },
            ),
            (
                body(&[(TAG_ROUTE, &[33, 10, 0, 0, 0])]),
                ParamsError::Prefix {
                    tag: TAG_ROUTE,
                    prefix: 33,
                },
            ),
            (
                body(&[(TAG_ROUTE, &[[129u8].as_slice(), &[0; 16]].concat())]),
                ParamsError::Prefix {
                    tag: TAG_ROUTE,
                    prefix: 129,
                },
            ),
            (
                body(&[(TAG_ROUTE, &[8, 10, 0, 0, 1])]),
                ParamsError::HostBits("10.0.0.1/8".parse().expect("net")),
            ),
            (
                body(&[(TAG_DNS_SEARCH, b"")]),
                ParamsError::Domain(String::new()),
            ),
            (
                body(&[(TAG_DNS_SEARCH, b"bad domain")]),
                ParamsError::Domain("bad domain".into()),
            ),
            (
                body(&[(TAG_DNS_SEARCH, "b\u{e4}d.example".as_bytes())]),
                ParamsError::Domain("b\\xc3\\xa4d.example".into()),
            ),
            (
                body(&[(TAG_DNS_SEARCH, &[b'a'; 254])]),
                ParamsError::Domain("a".repeat(254)),
            ),
            // Singletons repeated.
            (
                body(&[
                    (TAG_ADDRESS4, &[10, 0, 0, 1, 8]),
                    (TAG_ADDRESS4, &[10, 0, 0, 2, 8]),
                ]),
                ParamsError::Repeated(TAG_ADDRESS4),
            ),
            (
                body(&[(TAG_FLAGS, &[0; 4]), (TAG_FLAGS, &[0; 4])]),
                ParamsError::Repeated(TAG_FLAGS),
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(SessionParams::decode(&raw), Err(want), "body {raw:02x?}");
        }
    }

    #[test]
    fn limits_on_repeated_entries() {
        let route = [32u8, 10, 0, 0, 1];
        let routes: Vec<(u8, &[u8])> = vec![(TAG_ROUTE, &route); MAX_ROUTES];
        assert_eq!(
            SessionParams::decode(&body(&routes)).map(|p| p.routes.len()),
            Ok(MAX_ROUTES)
        );
        let routes: Vec<(u8, &[u8])> = vec![(TAG_ROUTE, &route); MAX_ROUTES + 1];
        assert_eq!(
            SessionParams::decode(&body(&routes)),
            Err(ParamsError::TooMany {
                what: "routes",
                max: MAX_ROUTES
            })
        );
        let dns: Vec<(u8, &[u8])> = vec![(TAG_DNS, &[9, 9, 9, 9]); MAX_DNS + 1];
        assert!(matches!(
            SessionParams::decode(&body(&dns)),
            Err(ParamsError::TooMany { max: MAX_DNS, .. })
        ));
        let search: Vec<(u8, &[u8])> = vec![(TAG_DNS_SEARCH, b"x"); MAX_DNS_SEARCH + 1];
        assert!(matches!(
            SessionParams::decode(&body(&search)),
            Err(ParamsError::TooMany {
                max: MAX_DNS_SEARCH,
                ..
            })
        ));
    }

    #[test]
    fn encode_refuses_what_decode_would() {
        let too_many = SessionParams {
            dns: vec![IpAddr::V4(Ipv4Addr::LOCALHOST); MAX_DNS + 1],
            ..SessionParams::default()
        };
        assert!(matches!(
            too_many.encode(),
            Err(ParamsError::TooMany { max: MAX_DNS, .. })
        ));
        let host_bits = SessionParams {
            routes: vec!["10.1.2.3/16".parse().expect("net")],
            ..SessionParams::default()
        };
        assert_eq!(
            host_bits.encode(),
            Err(ParamsError::HostBits("10.1.2.3/16".parse().expect("net")))
        );
        let bad_domain = SessionParams {
            dns_search: vec!["under_score.example".into()],
            ..SessionParams::default()
        };
        assert!(matches!(bad_domain.encode(), Err(ParamsError::Domain(_))));
        let many_routes = SessionParams {
            routes: vec!["10.0.0.0/8".parse().expect("net"); MAX_ROUTES + 1],
            ..SessionParams::default()
        };
        assert!(matches!(
            many_routes.encode(),
            Err(ParamsError::TooMany {
                max: MAX_ROUTES,
                ..
            })
        ));
    }
}
