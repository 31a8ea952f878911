//! The limits that more than one part of simplevpn checks, each defined once.
//!
//! The configuration rejects a value outside these limits with a message
//! naming the field, simplevpn-helper refuses a request outside them (its
//! policy), and the tun code refuses a name the kernel would not take. All
//! of them take the numbers from here, so the three can never disagree.

use std::ops::RangeInclusive;
use std::time::Duration;

/// The kernel's interface name buffer, `IFNAMSIZ` (16 on Linux; written
/// out so that this crate needs no libc; simplevpn-helper's netdev tests
/// check it against libc's).
pub const IFNAMSIZ: usize = 16;

/// Longest interface (tun) name the kernel accepts: `IFNAMSIZ` - 1 bytes,
/// the last byte of the kernel's buffer being the terminating NUL. 15 on
/// Linux.
pub const MAX_IFNAME_LEN: usize = IFNAMSIZ - 1;

/// Smallest MTU of the tun, and smallest frame size: 576, the IPv4 minimum
/// datagram size every host must accept (RFC 791).
pub const MIN_MTU: u32 = 576;

/// Largest MTU of the tun, and its default: 65535, the largest IPv4 packet
/// (its total length is a 16-bit field), which is also the largest frame.
pub const MAX_MTU: u32 = 65535;

/// Every MTU simplevpn sets on a tun ([`MIN_MTU`]..=[`MAX_MTU`]); the
/// configured `max_frame` narrows the upper end.
pub const MTU_RANGE: RangeInclusive<u32> = MIN_MTU..=MAX_MTU;

/// Largest frame on the wire and the default `max_frame`: one packet of
/// [`MAX_MTU`] bytes.
pub const MAX_FRAME: usize = MAX_MTU as usize;

/// The largest packet one tun read can return ([`MAX_MTU`]): the room a
/// tun reader keeps free before each read.
pub const MAX_PACKET: usize = MAX_MTU as usize;

/// The most packets one super-packet may stand for (split by us or by the
/// kernel): a 64 KiB TCP super-packet with the smallest MSS of a
/// 576-byte path is 123; a hostile peer's segment size of 1 byte would make
/// 65,000 out of one frame.
pub const MAX_GSO_SEGMENTS: usize = 256;

/// The smallest segment size of a TCP super-packet from a peer (either
/// kind of IP): 536, the default MSS of RFC 879 (the payload of a 576-byte
/// IPv4 packet). With [`MAX_GSO_SEGMENTS`] it bounds what one frame may make
/// a server send: without it a hostile peer's 300-byte frame of segment
/// size 1 would leave as 256 packets. A smaller one is a malformed frame.
pub const MIN_GSO_SEGMENT_TCP: u16 = 536;

/// The smallest segment size of a UDP super-packet (USO) from a peer: 512,
/// the payload every IPv4 host takes in one datagram (DNS's classic limit).
/// As [`MIN_GSO_SEGMENT_TCP`].
pub const MIN_GSO_SEGMENT_UDP: u16 = 512;

/// Every `max_frame` the configuration accepts: a frame must hold a packet
/// of at least [`MIN_MTU`] bytes, and none is larger than [`MAX_FRAME`].
pub const FRAME_RANGE: RangeInclusive<usize> = MIN_MTU as usize..=MAX_FRAME;

/// Prefix lengths of a tunnel subnet: from /8 (the largest network) to /30
/// (the smallest that holds the server and one client besides the network
/// and broadcast addresses).
pub const TUNNEL_PREFIX: RangeInclusive<u8> = 8..=30;

/// Prefix lengths of an IPv6 tunnel network (`network6`): from /64 (a whole
/// subnet, the usual size) to /120 (256 addresses).
pub const TUNNEL_PREFIX6: RangeInclusive<u8> = 64..=120;

/// Smallest MTU of the tun when it carries IPv6 (`network6`): 1280, the
/// IPv6 minimum link MTU (RFC 8200); the kernel turns IPv6 off on a link
/// with a smaller one.
pub const MIN_MTU6: u32 = 1280;

/// How long a write to the state store waits for another writer (another
/// connection to the same SQLite file) before it fails.
pub const STORE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest reason a ban keeps (`svpnctl kick --ban --reason`), in bytes.
pub const MAX_BAN_REASON: usize = 200;

/// Longest peer name (`[[server.peer]] name`, `svpnctl peer add --name`):
/// it labels logs and metrics.
pub const MAX_PEER_NAME_LEN: usize = 64;

/// The most runtime worker threads a server may be given (`workers`): far
/// above any core count simplevpn is meant for, low enough that a typo
/// (workers = 100000) is refused rather than spawning that many threads.
pub const MAX_WORKERS: usize = 1024;

/// The most queues a server's tun is opened with (one per worker, up to
/// this): each is an fd the helper passes in one message, and the kernel
/// takes at most 256 (`MAX_TAP_QUEUES`).
pub const MAX_TUN_QUEUES: usize = 64;

/// Routes a helper installs through its tun at most: more than a server
/// pushes (a session's parameters carry at most 1,024) or routes to its
/// peers, so that a daemon (or a server through it) cannot fill the host's
/// routing table.
pub const MAX_HELPER_ROUTES: usize = 4096;

/// Without `accept_routes`, a client's helper refuses pushed IPv4 routes
/// shorter than this prefix (wider than a /8), unless it was granted the
/// full tunnel: taking that much of a host's traffic is the user's choice.
pub const MIN_PUSHED_PREFIX4: u8 = 8;

/// The same for IPv6 routes (wider than a /16).
pub const MIN_PUSHED_PREFIX6: u8 = 16;

/// Largest message of a joining connection (`simplevpnd join`, the
/// [`crate::join`] codec): a request is under 100 bytes, an acceptance
/// with eight server keys under 350.
pub const MAX_JOIN_MESSAGE: usize = 512;

/// How long a joining connection may take from its TLS handshake to its
/// request: it is unauthenticated until the request is checked.
pub const JOIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The most incoming cluster links (server to server) that may wait for
/// their TLS handshake at once: only pinned members pass it, so more than
/// a few is someone else knocking.
pub const MAX_LINK_PENDING: usize = 64;

/// The most incoming cluster links one address may have waiting for their
/// handshake at once.
pub const MAX_LINK_PENDING_PER_SOURCE: usize = 4;

/// Unsent bytes a tunnel connection's kernel send buffer may hold before
/// the socket stops being writable (`TCP_NOTSENT_LOWAT`): enough to keep
/// the link busy between two writes, small enough that a packet never waits
/// behind megabytes of bulk data (the buffer otherwise grows to 4 MiB).
pub const NOTSENT_LOWAT: u32 = 128 * 1024;

/// CoDel's target on a peer's send queue ([`crate::codel`]): time in queue
/// that may stand. 1 ms, below fq_codel's 5 ms: the tunnel's queue is one
/// of several on the way (the outer TCP's buffers come after it), and the
/// whole tunnel should add at most about a millisecond under load.
pub const CODEL_TARGET: Duration = Duration::from_millis(1);

/// CoDel's interval: how long the time in queue must stand above the
/// target before the first drop, and the first gap between drops. 100 ms,
/// fq_codel's, the round trip of a peer far away: the inner TCP has that
/// long to react before the next drop.
pub const CODEL_INTERVAL: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limits_are_the_documented_numbers() {
        assert_eq!(MAX_IFNAME_LEN, 15);
        assert_eq!(MTU_RANGE, 576..=65535);
        assert_eq!(FRAME_RANGE, 576..=65535);
        assert_eq!(TUNNEL_PREFIX, 8..=30);
        assert_eq!(TUNNEL_PREFIX6, 64..=120);
        assert_eq!(MIN_MTU6, 1280);
        assert_eq!((MIN_GSO_SEGMENT_TCP, MIN_GSO_SEGMENT_UDP), (536, 512));
    }
}
