//! The wire codec, sans-IO: bytes in, frames out, no sockets.
//!
//! Every message on the wire is an IP packet sent as-is, with no length prefix
//! (shared/protocol.md). A frame's length comes from its own IP header:
//!
//! - version 4: the 20-byte header's total length; total length 0 marks a bare
//!   20-byte control message;
//! - version 6: 40 bytes of header plus the payload length;
//! - anything else is a protocol error;
//! - except, on a decoder built [`Decoder::with_extensions`], first nibble
//!   0xF: an extension frame (below).
//!
//! [`Decoder::decode`] looks at a buffer and either takes one whole frame off its
//! front, says that more bytes are needed (`Ok(None)`), or reports a
//! [`ProtocolError`]. It copes with any split or coalescing of frames by TCP
//! because it never assumes that one read is one frame.
//!
//! # Extension frames
//!
//! Between our own peers, when TLS negotiated the ALPN protocol
//! "simplevpn/2" ([`crate::tls::speaks_extension`]), either side may send
//! extension frames among the ordinary ones. No IP version is 15, so a first
//! nibble 0xF cannot be mistaken for a packet:
//!
//! ```text
//! byte 0      0xF1: high nibble 0xF = extension frame, low nibble 1 =
//!             extension framing version 1 (any other low nibble is an error)
//! byte 1      message type (1 = SESSION_PARAMS, see crate::params)
//! bytes 2..4  total frame length, u16 big-endian, INCLUDING these 4 bytes:
//!             at least 4, at most the decoder's maximum frame length
//! bytes 4..   the body: total length - 4 bytes
//! ```
//!
//! A receiver ignores message types it does not know, so that new ones can
//! be added. A decoder without extensions (original-protocol peers, TLS
//! peers without the ALPN) treats 0xF like any bad version.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{Buf, Bytes, BytesMut};

/// Length of an IPv4 header without options, and of every control message.
pub const CONTROL_LEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;
/// The largest frame accepted unless configured otherwise
/// ([`crate::limits::MAX_FRAME`]).
pub const DEFAULT_MAX_FRAME: usize = crate::limits::MAX_FRAME;

/// The original client's fixed header bytes for control messages: version/IHL
/// 0x45, byte 1 = 0x14, TTL (byte 8) = 0x40, zeros elsewhere. Receivers ignore
/// everything but the version nibble and the two addresses.
const CONTROL_TEMPLATE: [u8; 12] = [0x45, 0x14, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0];

/// A violation of the framing rules. It closes the one connection it came on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad IP version {0} in first byte {1:#04x}")]
    BadVersion(u8, u8),
    #[error("IPv4 total length {0} is below the 20-byte header")]
    TooShort(usize),
    #[error("frame length {len} exceeds the maximum of {max}")]
    TooLong { len: usize, max: usize },
    #[error("unexpected control message (source {from}, destination {to})")]
    UnexpectedControl { from: Ipv4Addr, to: Ipv4Addr },
    #[error("unknown extension framing version {0} (first byte 0xF{0:X})")]
    ExtensionVersion(u8),
    #[error("extension frame length {0} is below the 4-byte header")]
    ExtensionTooShort(usize),
}

/// A bare 20-byte IPv4 header with total length 0: the protocol's control
/// message. Its meaning lies in the two addresses alone; see [`Request`] and
/// [`Reply`] for what they mean in each direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Control {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
}

/// One message off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A control message.
    Control(Control),
    /// A whole IPv4 or IPv6 packet, exactly as it came.
    Packet(Bytes),
    /// An extension frame; only from a decoder built
    /// [`Decoder::with_extensions`].
    Extension(Extension),
}

/// First byte of every extension frame: marker nibble 0xF, framing version 1.
pub const EXTENSION_FIRST_BYTE: u8 = 0xF1;
/// Length of an extension frame's header (first byte, type, total length).
pub const EXTENSION_HEADER_LEN: usize = 4;
/// Message type of the server's session parameters ([`crate::params`]).
pub const SESSION_PARAMS: u8 = 1;

/// An extension frame: its message type and its body (the bytes after the
/// 4-byte header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u8,
    pub body: Bytes,
}

/// The message types of extension frames that this version knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtensionKind {
    /// [`SESSION_PARAMS`]: server to client, see [`crate::params`].
    SessionParams,
    /// Any other type: the receiver ignores the frame.
    Unknown(u8),
}

impl From<u8> for ExtensionKind {
    fn from(kind: u8) -> ExtensionKind {
        match kind {
            SESSION_PARAMS => ExtensionKind::SessionParams,
            other => ExtensionKind::Unknown(other),
        }
    }
}

impl From<ExtensionKind> for u8 {
    fn from(kind: ExtensionKind) -> u8 {
        match kind {
            ExtensionKind::SessionParams => SESSION_PARAMS,
            ExtensionKind::Unknown(other) => other,
        }
    }
}

impl Extension {
    /// The whole frame on the wire: header and body. Fails with
    /// [`ProtocolError::TooLong`] when it would exceed 65535 bytes, which
    /// the 16-bit length cannot say.
    pub fn encode(&self) -> Result<Bytes, ProtocolError> {
        let len = EXTENSION_HEADER_LEN + self.body.len();
        let Ok(wire_len) = u16::try_from(len) else {
            return Err(ProtocolError::TooLong {
                len,
                max: usize::from(u16::MAX),
            });
        };
        let mut out = BytesMut::with_capacity(len);
        out.extend_from_slice(&[EXTENSION_FIRST_BYTE, self.kind]);
        out.extend_from_slice(&wire_len.to_be_bytes());
        out.extend_from_slice(&self.body);
        Ok(out.freeze())
    }
}

/// What a client asks of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Source 0.0.0.0, destination 0.0.0.0: any free address.
    Dynamic,
    /// Source = the wanted address, destination 0.0.0.0.
    Static(Ipv4Addr),
    /// Both addresses 255.255.255.255: echoed back unchanged.
    Keepalive,
}

/// What a server tells a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Destination = the granted address; source = the network's netmask (our
    /// extension), or 0.0.0.0 from the original server ("not given").
    Grant {
        address: Ipv4Addr,
        netmask: Option<Ipv4Addr>,
    },
    /// The echo of a keepalive.
    Keepalive,
}

impl Control {
    pub const KEEPALIVE: Control = Control {
        source: Ipv4Addr::BROADCAST,
        destination: Ipv4Addr::BROADCAST,
    };

    /// The control message that carries `request`.
    pub fn request(request: Request) -> Control {
        match request {
            Request::Dynamic => Control {
                source: Ipv4Addr::UNSPECIFIED,
                destination: Ipv4Addr::UNSPECIFIED,
            },
            Request::Static(address) => Control {
                source: address,
                destination: Ipv4Addr::UNSPECIFIED,
            },
            Request::Keepalive => Control::KEEPALIVE,
        }
    }

    /// The grant of `address`, with `netmask` pushed in the source field.
    pub fn grant(address: Ipv4Addr, netmask: Option<Ipv4Addr>) -> Control {
        Control {
            source: netmask.unwrap_or(Ipv4Addr::UNSPECIFIED),
            destination: address,
        }
    }

    /// Reads this message as sent by a client to a server.
    pub fn as_request(&self) -> Result<Request, ProtocolError> {
        match (self.source, self.destination) {
            (Ipv4Addr::BROADCAST, Ipv4Addr::BROADCAST) => Ok(Request::Keepalive),
            (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED) => Ok(Request::Dynamic),
            (wanted, Ipv4Addr::UNSPECIFIED) => Ok(Request::Static(wanted)),
            _ => Err(self.unexpected()),
        }
    }

    /// Reads this message as sent by a server to a client. A source field that
    /// is not a valid netmask counts as "not given".
    pub fn as_reply(&self) -> Result<Reply, ProtocolError> {
        match (self.source, self.destination) {
            (Ipv4Addr::BROADCAST, Ipv4Addr::BROADCAST) => Ok(Reply::Keepalive),
            (_, Ipv4Addr::UNSPECIFIED) | (_, Ipv4Addr::BROADCAST) => Err(self.unexpected()),
            (mask, address) => Ok(Reply::Grant {
                address,
                netmask: netmask_prefix(mask).filter(|p| *p > 0).map(|_| mask),
            }),
        }
    }

    /// The 20 bytes of this message on the wire.
    pub fn encode(&self) -> [u8; CONTROL_LEN] {
        let mut out = [0u8; CONTROL_LEN];
        out[..12].copy_from_slice(&CONTROL_TEMPLATE);
        out[12..16].copy_from_slice(&self.source.octets());
        out[16..20].copy_from_slice(&self.destination.octets());
        out
    }

    fn unexpected(&self) -> ProtocolError {
        ProtocolError::UnexpectedControl {
            from: self.source,
            to: self.destination,
        }
    }
}

/// The prefix length of a contiguous netmask (255.255.0.0 -> 16), or None.
pub fn netmask_prefix(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let prefix = bits.leading_ones();
    (bits.checked_shl(prefix).unwrap_or(0) == 0).then_some(prefix as u8)
}

/// Splits a byte stream into frames.
#[derive(Debug, Clone, Copy)]
pub struct Decoder {
    max_frame: usize,
    extensions: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder {
    /// A decoder that refuses frames longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Decoder {
        Decoder {
            max_frame: max_frame.max(CONTROL_LEN),
            extensions: false,
        }
    }

    /// This decoder, also accepting extension frames (first byte 0xF1): for
    /// a connection whose TLS negotiated "simplevpn/2", never for others.
    pub fn with_extensions(self) -> Decoder {
        Decoder {
            extensions: true,
            ..self
        }
    }

    /// Whether this decoder accepts extension frames.
    pub fn extensions(&self) -> bool {
        self.extensions
    }

    /// The length of the frame at the front of `buf`: `Ok(None)` when more
    /// bytes are needed to tell. Errors as soon as the first bytes are wrong.
    pub fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let len = match first >> 4 {
            4 => {
                let Some(total) = buf.get(2..4) else {
                    return Ok(None);
                };
                match usize::from(u16::from_be_bytes([total[0], total[1]])) {
                    0 => CONTROL_LEN,
                    short if short < CONTROL_LEN => return Err(ProtocolError::TooShort(short)),
                    total => total,
                }
            }
            6 => {
                let Some(payload) = buf.get(4..6) else {
                    return Ok(None);
                };
                IPV6_HEADER_LEN + usize::from(u16::from_be_bytes([payload[0], payload[1]]))
            }
            0xF if self.extensions => {
                if first & 0x0F != EXTENSION_FIRST_BYTE & 0x0F {
                    return Err(ProtocolError::ExtensionVersion(first & 0x0F));
                }
                let Some(total) = buf.get(2..4) else {
                    return Ok(None);
                };
                match usize::from(u16::from_be_bytes([total[0], total[1]])) {
                    short if short < EXTENSION_HEADER_LEN => {
                        return Err(ProtocolError::ExtensionTooShort(short))
                    }
                    total => total,
                }
            }
            version => return Err(ProtocolError::BadVersion(version, first)),
        };
        if len > self.max_frame {
            return Err(ProtocolError::TooLong {
                len,
                max: self.max_frame,
            });
        }
        Ok(Some(len))
    }

    /// Takes one whole frame off the front of `buf`, or returns `Ok(None)`
    /// (leaving `buf` untouched) when it does not hold one yet.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        let Some(len) = self.frame_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < len {
            return Ok(None);
        }
        if buf[0] >> 4 == 0xF {
            // frame_len accepted it: extensions are on and len >= 4.
            let kind = buf[1];
            let mut frame = buf.split_to(len);
            frame.advance(EXTENSION_HEADER_LEN);
            return Ok(Some(Frame::Extension(Extension {
                kind,
                body: frame.freeze(),
            })));
        }
        let is_control = buf[0] >> 4 == 4 && buf[2] == 0 && buf[3] == 0;
        if is_control {
            let control = Control {
                source: ipv4_at(buf, 12),
                destination: ipv4_at(buf, 16),
            };
            buf.advance(CONTROL_LEN);
            return Ok(Some(Frame::Control(control)));
        }
        Ok(Some(Frame::Packet(buf.split_to(len).freeze())))
    }
}

/// The source and destination of an IPv4 packet, or None for anything else
/// (IPv6, or fewer than 20 bytes).
pub fn ipv4_addresses(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    (packet.len() >= CONTROL_LEN && packet[0] >> 4 == 4)
        .then(|| (ipv4_at(packet, 12), ipv4_at(packet, 16)))
}

/// The source and destination of an IPv4 or IPv6 packet, or None for
/// anything else (another version, or shorter than its fixed header).
pub fn ip_addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 => ipv4_addresses(packet).map(|(s, d)| (IpAddr::V4(s), IpAddr::V4(d))),
        6 => {
            let header = packet.get(..IPV6_HEADER_LEN)?;
            let at = |offset: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&header[offset..offset + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            Some((at(8), at(24)))
        }
        _ => None,
    }
}

fn ipv4_at(buf: &[u8], offset: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        buf[offset],
        buf[offset + 1],
        buf[offset + 2],
        buf[offset + 3],
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bytes from hex pairs separated by white space ("45 14 00 ...").
    pub(crate) fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("test hex"))
            .collect()
    }

    fn decode_all(decoder: &Decoder, bytes: &[u8]) -> Vec<Frame> {
        let mut buf = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = decoder.decode(&mut buf).expect("valid stream") {
            frames.push(frame);
        }
        assert!(buf.is_empty(), "bytes left over: {buf:?}");
        frames
    }

    #[test]
    fn protocol_md_examples_encode_byte_for_byte() {
        let dynamic = hex("45 14 00 00 00 00 00 00 40 00 00 00 00 00 00 00 00 00 00 00");
        let static_req = hex("45 14 00 00 00 00 00 00 40 00 00 00 0a 00 01 07 00 00 00 00");
        let grant = hex("45 14 00 00 00 00 00 00 40 00 00 00 00 00 00 00 0a 00 01 07");
        let keepalive = hex("45 14 00 00 00 00 00 00 40 00 00 00 ff ff ff ff ff ff ff ff");
        let addr = Ipv4Addr::new(10, 0, 1, 7);
        assert_eq!(
            Control::request(Request::Dynamic).encode().to_vec(),
            dynamic
        );
        assert_eq!(
            Control::request(Request::Static(addr)).encode().to_vec(),
            static_req
        );
        assert_eq!(Control::grant(addr, None).encode().to_vec(), grant);
        assert_eq!(Control::KEEPALIVE.encode().to_vec(), keepalive);
    }

    #[test]
    fn protocol_md_examples_decode() {
        let d = Decoder::default();
        let stream = [
            hex("45 14 00 00 00 00 00 00 40 00 00 00 00 00 00 00 00 00 00 00"),
            hex("45 14 00 00 00 00 00 00 40 00 00 00 0a 00 01 07 00 00 00 00"),
            hex("45 14 00 00 00 00 00 00 40 00 00 00 ff ff ff ff ff ff ff ff"),
        ]
        .concat();
        let requests: Vec<Request> = decode_all(&d, &stream)
            .into_iter()
            .map(|f| match f {
                Frame::Control(c) => c.as_request().expect("request"),
                other => panic!("not control: {other:?}"),
            })
            .collect();
        assert_eq!(
            requests,
            vec![
                Request::Dynamic,
                Request::Static(Ipv4Addr::new(10, 0, 1, 7)),
                Request::Keepalive
            ]
        );
    }

    #[test]
    fn control_ignores_meaningless_bytes() {
        let mut bytes = Control::grant(Ipv4Addr::new(10, 0, 1, 7), None).encode();
        bytes[1] = 0x99;
        bytes[8] = 0x01;
        bytes[10] = 0xab;
        let frames = decode_all(&Decoder::default(), &bytes);
        assert_eq!(
            frames,
            vec![Frame::Control(Control::grant(
                Ipv4Addr::new(10, 0, 1, 7),
                None
            ))]
        );
    }

    #[test]
    fn grant_carries_the_netmask() {
        let mask = Ipv4Addr::new(255, 255, 0, 0);
        let grant = Control::grant(Ipv4Addr::new(198, 19, 0, 2), Some(mask));
        assert_eq!(&grant.encode()[12..16], &[0xff, 0xff, 0, 0]);
        assert_eq!(
            grant.as_reply(),
            Ok(Reply::Grant {
                address: Ipv4Addr::new(198, 19, 0, 2),
                netmask: Some(mask)
            })
        );
        // The original server leaves the source 0: "not given".
        let original = Control::grant(Ipv4Addr::new(10, 0, 1, 7), None);
        assert_eq!(
            original.as_reply(),
            Ok(Reply::Grant {
                address: Ipv4Addr::new(10, 0, 1, 7),
                netmask: None
            })
        );
        // A source that is no netmask is "not given" too.
        let odd = Control {
            source: Ipv4Addr::new(255, 0, 255, 0),
            destination: Ipv4Addr::new(10, 0, 1, 7),
        };
        assert!(matches!(
            odd.as_reply(),
            Ok(Reply::Grant { netmask: None, .. })
        ));
    }

    #[test]
    fn unexpected_controls_are_errors() {
        let to_server = Control {
            source: Ipv4Addr::new(1, 2, 3, 4),
            destination: Ipv4Addr::new(5, 6, 7, 8),
        };
        assert!(to_server.as_request().is_err());
        assert!(Control::request(Request::Dynamic).as_reply().is_err());
    }

    #[test]
    fn netmask_prefixes() {
        assert_eq!(netmask_prefix(Ipv4Addr::new(255, 255, 0, 0)), Some(16));
        assert_eq!(netmask_prefix(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(netmask_prefix(Ipv4Addr::new(0, 0, 0, 0)), Some(0));
        assert_eq!(netmask_prefix(Ipv4Addr::new(255, 255, 255, 252)), Some(30));
        assert_eq!(netmask_prefix(Ipv4Addr::new(255, 0, 255, 0)), None);
    }

    #[test]
    fn packets_are_framed_by_their_own_length() {
        let mut v4 = vec![0u8; 28];
        v4[0] = 0x45;
        v4[3] = 28;
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[5] = 8;
        let stream = [v4.clone(), v6.clone(), v4.clone()].concat();
        let frames = decode_all(&Decoder::default(), &stream);
        assert_eq!(
            frames,
            vec![
                Frame::Packet(Bytes::from(v4.clone())),
                Frame::Packet(Bytes::from(v6)),
                Frame::Packet(Bytes::from(v4)),
            ]
        );
    }

    #[test]
    fn incomplete_frames_wait_for_more() {
        let d = Decoder::default();
        let keepalive = Control::KEEPALIVE.encode();
        for cut in 0..CONTROL_LEN {
            let mut buf = BytesMut::from(&keepalive[..cut]);
            assert_eq!(d.decode(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed");
        }
    }

    #[test]
    fn framing_errors() {
        let d = Decoder::new(1500);
        assert_eq!(
            d.frame_len(&[0x50]),
            Err(ProtocolError::BadVersion(5, 0x50))
        );
        assert_eq!(d.frame_len(&[0x00]), Err(ProtocolError::BadVersion(0, 0)));
        assert_eq!(
            d.frame_len(&[0x45, 0, 0, 7]),
            Err(ProtocolError::TooShort(7))
        );
        assert_eq!(
            d.frame_len(&[0x45, 0, 0x05, 0xdd]),
            Err(ProtocolError::TooLong {
                len: 1501,
                max: 1500
            })
        );
        assert_eq!(
            d.frame_len(&[0x60, 0, 0, 0, 0x05, 0xdd]),
            Err(ProtocolError::TooLong {
                len: 1541,
                max: 1500
            })
        );
        assert_eq!(d.frame_len(&[0x45, 0, 0x05, 0xdc]), Ok(Some(1500)));
    }

    fn extension(kind: u8, body: &[u8]) -> Vec<u8> {
        Extension {
            kind,
            body: Bytes::copy_from_slice(body),
        }
        .encode()
        .expect("small extension")
        .to_vec()
    }

    #[test]
    fn extension_frames_encode_byte_for_byte() {
        assert_eq!(extension(1, &[]), hex("f1 01 00 04"));
        assert_eq!(extension(7, &[0xaa, 0xbb]), hex("f1 07 00 06 aa bb"));
        let too_long = Extension {
            kind: 1,
            body: Bytes::from(vec![0u8; 65532]),
        };
        assert_eq!(
            too_long.encode(),
            Err(ProtocolError::TooLong {
                len: 65536,
                max: 65535
            })
        );
        let longest = Extension {
            kind: 1,
            body: Bytes::from(vec![0u8; 65531]),
        };
        assert_eq!(longest.encode().map(|b| b.len()), Ok(65535));
    }

    #[test]
    fn extension_frames_only_when_enabled() {
        let frame = extension(1, b"body");
        // Today's decoders: 0xF is a bad version, as before.
        assert_eq!(
            Decoder::default().decode(&mut BytesMut::from(&frame[..])),
            Err(ProtocolError::BadVersion(15, 0xf1))
        );
        let d = Decoder::default().with_extensions();
        assert!(d.extensions());
        assert!(!Decoder::default().extensions());
        assert_eq!(
            decode_all(&d, &frame),
            vec![Frame::Extension(Extension {
                kind: 1,
                body: Bytes::from_static(b"body")
            })]
        );
    }

    #[test]
    fn extension_frames_mix_with_ordinary_ones() {
        let d = Decoder::default().with_extensions();
        let keepalive = Control::KEEPALIVE.encode().to_vec();
        let mut v4 = vec![0u8; 24];
        v4[0] = 0x45;
        v4[3] = 24;
        let stream = [
            keepalive.clone(),
            extension(1, &[1, 2, 3]),
            v4.clone(),
            // An unknown type is still framed; the receiver ignores it.
            extension(0x42, &[]),
            keepalive,
        ]
        .concat();
        let frames = decode_all(&d, &stream);
        assert_eq!(
            frames,
            vec![
                Frame::Control(Control::KEEPALIVE),
                Frame::Extension(Extension {
                    kind: 1,
                    body: Bytes::from_static(&[1, 2, 3])
                }),
                Frame::Packet(Bytes::from(v4)),
                Frame::Extension(Extension {
                    kind: 0x42,
                    body: Bytes::new()
                }),
                Frame::Control(Control::KEEPALIVE),
            ]
        );
        let kinds: Vec<ExtensionKind> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Extension(e) => Some(ExtensionKind::from(e.kind)),
                _ => None,
            })
            .collect();
        assert_eq!(
            kinds,
            vec![ExtensionKind::SessionParams, ExtensionKind::Unknown(0x42)]
        );
        assert_eq!(u8::from(ExtensionKind::Unknown(0x42)), 0x42);
        assert_eq!(u8::from(ExtensionKind::SessionParams), SESSION_PARAMS);
    }

    #[test]
    fn extension_framing_errors() {
        let d = Decoder::new(1500).with_extensions();
        assert_eq!(
            d.frame_len(&[0xf2]),
            Err(ProtocolError::ExtensionVersion(2))
        );
        assert_eq!(
            d.frame_len(&[0xf0, 1, 0, 4]),
            Err(ProtocolError::ExtensionVersion(0))
        );
        assert_eq!(d.frame_len(&[0xf1]), Ok(None));
        assert_eq!(d.frame_len(&[0xf1, 1, 0]), Ok(None));
        for short in 0..4u8 {
            assert_eq!(
                d.frame_len(&[0xf1, 1, 0, short]),
                Err(ProtocolError::ExtensionTooShort(usize::from(short)))
            );
        }
        assert_eq!(d.frame_len(&[0xf1, 1, 0, 4]), Ok(Some(4)));
        assert_eq!(d.frame_len(&[0xf1, 1, 0x05, 0xdc]), Ok(Some(1500)));
        assert_eq!(
            d.frame_len(&[0xf1, 1, 0x05, 0xdd]),
            Err(ProtocolError::TooLong {
                len: 1501,
                max: 1500
            })
        );
        // Other bad versions stay bad with extensions on.
        assert_eq!(
            d.frame_len(&[0x50]),
            Err(ProtocolError::BadVersion(5, 0x50))
        );
        // Incomplete extension frames wait for more, consuming nothing.
        let frame = extension(9, &[1, 2, 3, 4, 5]);
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            assert_eq!(d.decode(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut);
        }
    }

    #[test]
    fn ip_addresses_of_both_families() {
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[8..24].copy_from_slice(&"2001:2::2".parse::<Ipv6Addr>().expect("v6").octets());
        v6[24..40].copy_from_slice(&"2001:2::3".parse::<Ipv6Addr>().expect("v6").octets());
        assert_eq!(
            ip_addresses(&v6),
            Some((
                "2001:2::2".parse().expect("v6"),
                "2001:2::3".parse().expect("v6")
            ))
        );
        assert_eq!(ip_addresses(&v6[..39]), None);
        let v4 = hex("45 00 00 14 00 00 00 00 40 00 00 00 c6 12 00 02 c6 12 00 03");
        assert_eq!(
            ip_addresses(&v4),
            Some((
                "198.18.0.2".parse().expect("v4"),
                "198.18.0.3".parse().expect("v4")
            ))
        );
        assert_eq!(ip_addresses(&[0x50; 40]), None);
        assert_eq!(ip_addresses(&[]), None);
    }

    #[test]
    fn ipv4_addresses_of_packets() {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&[198, 19, 0, 2]);
        p[16..20].copy_from_slice(&[198, 19, 0, 3]);
        assert_eq!(
            ipv4_addresses(&p),
            Some((Ipv4Addr::new(198, 19, 0, 2), Ipv4Addr::new(198, 19, 0, 3)))
        );
        assert_eq!(ipv4_addresses(&p[..19]), None);
        p[0] = 0x60;
        assert_eq!(ipv4_addresses(&p), None);
    }
}
