//! What a packet becomes on its way to one peer, sans-IO: the frame as it
//! is, a super-packet frame kept whole for a peer that takes them, the
//! packets a super-packet stands for, packets cut to the peer's MTU (an
//! original-protocol peer's `legacy_mtu`), or, for a packet that cannot be
//! cut, the ICMP error a router sends back to its source.

use bytes::{Buf, Bytes, BytesMut};

use crate::offload::{self, Fitted, OffloadError, VirtioNetHdr, VNET_HDR_LEN};
use crate::wire::{ipv4_addresses, SuperPacket, SUPER_HEADER_LEN};

/// A packet on its way out: plain, or a super-packet with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    Packet(Bytes),
    Super(SuperPacket),
}

/// What a peer takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLink {
    /// It announced super-packet frames.
    pub super_packets: bool,
    /// The largest packet it takes (`usize::MAX`: no limit of its own).
    pub mtu: usize,
}

impl PeerLink {
    /// A link that takes packets of any size but no super-packets (a
    /// cluster's server-to-server link).
    pub const PLAIN: PeerLink = PeerLink {
        super_packets: false,
        mtu: usize::MAX,
    };
}

/// What to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    /// This one frame.
    One(Bytes),
    /// These frames, in order.
    Many(Vec<Bytes>),
    /// Too big and not to be cut: this ICMP error goes back to the
    /// packet's source (none for IPv6 or an ICMP error itself).
    TooBig { icmp: Option<Bytes> },
    /// A super-packet that cannot be split (malformed): dropped.
    Malformed(OffloadError),
}

/// Takes apart what one read from a tun with `IFF_VNET_HDR` returned (the
/// virtio-net header, then the packet): a plain packet (its partial
/// checksum completed), or a super-packet whose frame header is written in
/// place over the end of the virtio-net header, without a copy.
pub fn from_tun_read(mut read: BytesMut) -> Result<Outbound, OffloadError> {
    let hdr = VirtioNetHdr::decode(&read).ok_or(OffloadError::Malformed)?;
    match offload::from_tun(&hdr, &mut read[VNET_HDR_LEN..])? {
        None => {
            read.advance(VNET_HDR_LEN);
            Ok(Outbound::Packet(read.freeze()))
        }
        Some(gso) => {
            let start = VNET_HDR_LEN - SUPER_HEADER_LEN;
            read[start..VNET_HDR_LEN].copy_from_slice(&SuperPacket::header(gso));
            read.advance(start);
            Ok(Outbound::Super(SuperPacket {
                gso,
                frame: read.freeze(),
            }))
        }
    }
}

impl Outbound {
    /// The IP packet.
    pub fn packet(&self) -> &[u8] {
        match self {
            Outbound::Packet(packet) => packet,
            Outbound::Super(sup) => &sup.frame[SUPER_HEADER_LEN..],
        }
    }
}

/// What `out` becomes for a peer with `link`.
///
/// An ICMP error comes from the packet's destination (the peer's side of
/// the tunnel), not from the server's own tunnel address: that address is
/// local to the server's host, whose kernel drops a packet from it arriving
/// on the tun as a martian, so the error would never reach a sender on
/// that host or beyond it.
pub fn egress(out: Outbound, link: PeerLink) -> Egress {
    let (packet, gso) = match out {
        Outbound::Packet(packet) if packet.len() <= link.mtu => return Egress::One(packet),
        // One whose segments are below the minimum a peer's decoder takes
        // is split here instead.
        Outbound::Super(sup) if link.super_packets && sup.gso.fits_wire() => {
            return Egress::One(sup.frame)
        }
        Outbound::Packet(packet) => (packet, None),
        Outbound::Super(sup) => (sup.packet(), Some(sup.gso)),
    };
    let mtu = link.mtu;
    match offload::fit(packet.clone(), gso, mtu) {
        Ok(Fitted::Packets(mut pieces)) if pieces.len() == 1 => match pieces.pop() {
            Some(piece) => Egress::One(piece),
            None => Egress::Many(pieces),
        },
        Ok(Fitted::Packets(pieces)) => Egress::Many(pieces),
        Ok(Fitted::TooBig) => Egress::TooBig {
            icmp: ipv4_addresses(&packet).and_then(|(_, router)| {
                offload::frag_needed_v4(router, &packet, u16::try_from(mtu).unwrap_or(u16::MAX))
            }),
        },
        Err(e) => Egress::Malformed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::{checksums_ok, Gso, GsoKind};

    fn udp4(len: usize, df: bool) -> Bytes {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[6] = if df { 0x40 } else { 0 };
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[198, 18, 9, 2]);
        p[16..20].copy_from_slice(&[198, 19, 0, 9]);
        p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
        Bytes::from(p)
    }

    /// A TCP/IPv4 packet (no options) with `payload` zero bytes.
    fn tcp4(payload: usize) -> Vec<u8> {
        let mut tcp = vec![0u8; 40 + payload];
        tcp[0] = 0x45;
        tcp[2..4].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
        tcp[9] = 6;
        tcp[32] = 0x50;
        tcp
    }

    const CAPABLE: PeerLink = PeerLink {
        super_packets: true,
        mtu: usize::MAX,
    };

    const LEGACY: PeerLink = PeerLink {
        super_packets: false,
        mtu: 1500,
    };

    #[test]
    fn small_packets_and_super_packets_for_capable_peers_pass_whole() {
        let small = udp4(1500, true);
        assert_eq!(
            egress(Outbound::Packet(small.clone()), LEGACY),
            Egress::One(small)
        );
        let gso = Gso {
            kind: GsoKind::TcpV4,
            size: 1448,
        };
        let sup = SuperPacket::new(gso, &tcp4(3000));
        assert_eq!(
            egress(Outbound::Super(sup.clone()), CAPABLE),
            Egress::One(sup.frame.clone())
        );
        let Egress::Many(pieces) = egress(Outbound::Super(sup), LEGACY) else {
            panic!("not split");
        };
        assert_eq!(pieces.len(), 3);
        assert!(pieces.iter().all(|p| p.len() <= 1500 && checksums_ok(p)));
    }

    #[test]
    fn super_packets_of_small_segments_are_split_even_for_capable_peers() {
        // The kernel's segment size for a path of a tiny MSS: below the
        // minimum a peer's decoder takes, so it goes as its packets.
        let tcp = tcp4(1000);
        let small = Gso {
            kind: GsoKind::TcpV4,
            size: 100,
        };
        let Egress::Many(pieces) = egress(Outbound::Super(SuperPacket::new(small, &tcp)), CAPABLE)
        else {
            panic!("not split");
        };
        assert_eq!(pieces.len(), 10);
        assert!(pieces.iter().all(|p| p.len() == 140 && checksums_ok(p)));
        // At the minimum it goes whole.
        let least = Gso {
            size: crate::limits::MIN_GSO_SEGMENT_TCP,
            ..small
        };
        let sup = SuperPacket::new(least, &tcp);
        assert_eq!(
            egress(Outbound::Super(sup.clone()), CAPABLE),
            Egress::One(sup.frame)
        );
    }

    #[test]
    fn too_big_with_df_is_an_icmp_error_and_without_df_fragments() {
        let big = udp4(3000, true);
        let Egress::TooBig { icmp: Some(icmp) } = egress(Outbound::Packet(big.clone()), LEGACY)
        else {
            panic!("not too big");
        };
        // From the packet's destination, to its source.
        assert_eq!(&icmp[12..16], &big[16..20]);
        assert_eq!(&icmp[16..20], &big[12..16]);
        assert_eq!((icmp[20], icmp[21]), (3, 4));
        let Egress::Many(frags) = egress(Outbound::Packet(udp4(3000, false)), LEGACY) else {
            panic!("not fragmented");
        };
        assert!(frags.iter().all(|f| f.len() <= 1500));
        assert_eq!(
            egress(Outbound::Packet(Bytes::from_static(&[0x45; 1600])), LEGACY),
            Egress::Malformed(OffloadError::Malformed)
        );
    }
}
