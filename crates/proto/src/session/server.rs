//! The server's rules for one client connection, without I/O.
//!
//! A [`ServerSession`] starts when a connection has passed the gate (TLS or
//! the original protocol). It is fed each decoded frame and the time, and
//! answers with one [`Action`] for the I/O loop (`daemon/server.rs`) to
//! carry out: reply with a control message, ask the peer table for an
//! address, forward a packet, drop one (and why), or close (and why). The
//! loop asks [`ServerSession::deadline`] when to call
//! [`ServerSession::on_tick`] next; nothing here reads a clock.
//!
//! The rules, in the order a connection meets them:
//! 1. Before a grant, the client must ask for an address before the
//!    handshake deadline; keepalives are echoed, packets are dropped.
//! 2. The first address request goes to the peer table ([`Action::Admit`]);
//!    the loop reports the outcome with [`ServerSession::granted`] or closes
//!    the connection with [`Ending::Refused`].
//! 3. Once granted: a repeated request is answered with the address already
//!    held; a keepalive is echoed; a packet must come from the granted
//!    address, IPv4 or (with `network6`, for an extension client) IPv6, or
//!    from a network behind the client (anti-spoofing), and is forwarded to
//!    its destination; silence longer than the client timeout closes the
//!    connection.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::{IpNet, Ipv4Net};

use crate::params::SessionParams;

use crate::pool::Refusal;
use crate::wire::{
    ip_addresses, Control, ExtensionKind, Features, Frame, Marker, ProtocolError, Request,
    SuperPacket, SUPER_HEADER_LEN,
};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Admitted by the gate; no address yet.
    Handshake { deadline: Instant },
    /// Waiting for the peer table's answer to this request.
    Admitting { deadline: Instant },
    /// Holds `address`; the last frame arrived at `last_frame`.
    Granted {
        address: Ipv4Addr,
        last_frame: Instant,
    },
}

/// The server side of one client session.
#[derive(Debug, Clone)]
pub struct ServerSession {
    state: State,
    client_timeout: Duration,
    /// Pushed in every grant (our extension of the original grant).
    netmask: Ipv4Addr,
    /// The networks behind the client: its packets may come from them too.
    routes: Vec<IpNet>,
    /// Its IPv6 address, once granted one.
    address6: Option<Ipv6Addr>,
    /// Whether its grants carry [`Marker::Accept`]: a plaintext client
    /// that offered our extension.
    marks_grants: bool,
}

/// What the I/O loop is to do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing (the frame only refreshed the silence timer).
    None,
    /// Send this control message to the client.
    Reply(Control),
    /// Ask the peer table for an address for this request, then call
    /// [`ServerSession::granted`] or close with [`Ending::Refused`].
    Admit(Request),
    /// Forward this packet from the client to `destination`: to the client
    /// that holds it, else into the server's tun.
    Forward { destination: IpAddr, packet: Bytes },
    /// Forward this super-packet as [`Action::Forward`] does a packet.
    ForwardSuper {
        destination: IpAddr,
        packet: SuperPacket,
    },
    /// The client announced what it can take (our extension).
    Announced(Features),
    /// Drop a packet, counted under `reason`.
    Drop(DropReason),
    /// Close the connection.
    Close(Ending),
}

/// Why a packet from a client was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// It came before the client held an address.
    Unassigned,
    /// Its source was not the client's address.
    Spoofed(IpAddr),
    /// IPv6 (or no IP at all) from a client that holds no IPv6 address.
    NotIpv4,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The server is stopping.
    Shutdown,
    /// The client closed the connection.
    ClosedByPeer,
    /// The peer table refused the client's request.
    Refused(Request, Refusal),
    /// No address request before the handshake deadline.
    HandshakeTimeout,
    /// Granted, then silent for longer than the client timeout.
    Silent,
    /// Closed through the control API, or taken over by a newer connection
    /// with the same key.
    Kicked,
    /// Closed because the server's memory budget was spent and this client
    /// held the most.
    OverBudget,
    /// A frame broke the protocol.
    Protocol(ProtocolError),
    /// Reading or writing the connection failed.
    Io(String),
}

impl Ending {
    /// Whether what is queued for the client should still be flushed to it:
    /// only for a connection that ended in good order.
    pub fn flushes(&self) -> bool {
        matches!(self, Ending::ClosedByPeer | Ending::Shutdown)
    }

    /// Whether the ending points at a misbehaving client (worth a warning).
    pub fn is_misbehaviour(&self) -> bool {
        matches!(self, Ending::Protocol(_))
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Shutdown => f.write_str("server shutting down"),
            Ending::ClosedByPeer => f.write_str("closed by peer"),
            Ending::Refused(request, refusal) => write!(f, "refused: {request:?}: {refusal}"),
            Ending::HandshakeTimeout => {
                f.write_str("no address request within the handshake timeout")
            }
            Ending::Silent => f.write_str("silent for longer than the client timeout"),
            Ending::Kicked => f.write_str("kicked"),
            Ending::OverBudget => {
                f.write_str("closed: the memory budget was spent and this peer held the most")
            }
            Ending::Protocol(e) => write!(f, "protocol error: {e}"),
            Ending::Io(e) => write!(f, "{e}"),
        }
    }
}

impl ServerSession {
    /// A session admitted by the gate, which must ask for an address by
    /// `handshake_deadline`; once granted, it may stay silent for at most
    /// `client_timeout`. Grants push `netmask`. Packets may come from the
    /// granted address and from inside `routes`, the networks behind it.
    pub fn new(
        handshake_deadline: Instant,
        client_timeout: Duration,
        netmask: Ipv4Addr,
        routes: Vec<IpNet>,
    ) -> Self {
        ServerSession {
            state: State::Handshake {
                deadline: handshake_deadline,
            },
            client_timeout,
            netmask,
            routes,
            address6: None,
            marks_grants: false,
        }
    }

    /// This session, for a plaintext client whose request offered our
    /// extension ([`Marker::Offer`]): a repeated request is answered with
    /// the acceptance too, as the first grant was (by the peer table).
    pub fn marking_grants(self) -> Self {
        ServerSession {
            marks_grants: true,
            ..self
        }
    }

    /// The address the client holds, once granted.
    pub fn address(&self) -> Option<Ipv4Addr> {
        match self.state {
            State::Granted { address, .. } => Some(address),
            _ => None,
        }
    }

    /// When [`ServerSession::on_tick`] must be called next.
    pub fn deadline(&self) -> Instant {
        match self.state {
            State::Handshake { deadline } | State::Admitting { deadline } => deadline,
            State::Granted { last_frame, .. } => last_frame + self.client_timeout,
        }
    }

    /// The time has come to `now`: the connection ends if its deadline has
    /// passed (at the deadline exactly, too).
    pub fn on_tick(&self, now: Instant) -> Option<Ending> {
        if now < self.deadline() {
            return None;
        }
        Some(match self.state {
            State::Handshake { .. } | State::Admitting { .. } => Ending::HandshakeTimeout,
            State::Granted { .. } => Ending::Silent,
        })
    }

    /// One frame arrived from the client at `now`.
    pub fn on_frame(&mut self, now: Instant, frame: Frame) -> Action {
        if let State::Granted { last_frame, .. } = &mut self.state {
            *last_frame = now;
        }
        match frame {
            Frame::Control(control) => match control.as_request() {
                Ok(request) => self.on_request(request),
                Err(e) => Action::Close(Ending::Protocol(e)),
            },
            Frame::Packet(packet) => match self.on_packet(&packet) {
                Ok(destination) => Action::Forward {
                    destination,
                    packet,
                },
                Err(drop) => Action::Drop(drop),
            },
            Frame::Super(packet) => match self.on_packet(&packet.frame[SUPER_HEADER_LEN..]) {
                Ok(destination) => Action::ForwardSuper {
                    destination,
                    packet,
                },
                Err(drop) => Action::Drop(drop),
            },
            Frame::Extension(e) => match ExtensionKind::from(e.kind) {
                // The only message a client sends: what it can take.
                ExtensionKind::Features => match Features::decode(&e.body) {
                    Ok(features) => Action::Announced(features),
                    Err(e) => Action::Close(Ending::Protocol(e)),
                },
                ExtensionKind::SessionParams | ExtensionKind::Unknown(_) => Action::None,
            },
        }
    }

    /// The peer table granted `address` at `now` (after [`Action::Admit`]);
    /// the grant itself was queued by the table.
    pub fn granted(&mut self, now: Instant, address: Ipv4Addr) {
        self.state = State::Granted {
            address,
            last_frame: now,
        };
    }

    /// The peer table granted `address6` too (with `network6`, to an
    /// extension client): its IPv6 packets must come from it.
    pub fn granted6(&mut self, address6: Option<Ipv6Addr>) {
        self.address6 = address6;
    }

    fn on_request(&mut self, request: Request) -> Action {
        match (request, self.state) {
            (Request::Keepalive, _) => Action::Reply(Control::KEEPALIVE),
            // A repeated request is answered with the address already held.
            (_, State::Granted { address, .. }) => {
                let grant = Control::grant(address, Some(self.netmask));
                Action::Reply(match self.marks_grants {
                    true => grant.with_marker(Marker::Accept),
                    false => grant,
                })
            }
            // Already asked; the loop answers the first request first.
            (_, State::Admitting { .. }) => Action::None,
            (request, State::Handshake { deadline }) => {
                self.state = State::Admitting { deadline };
                Action::Admit(request)
            }
        }
    }

    /// Where a packet from the client goes, or why it is dropped.
    fn on_packet(&self, packet: &[u8]) -> Result<IpAddr, DropReason> {
        let State::Granted { address, .. } = self.state else {
            return Err(DropReason::Unassigned);
        };
        let Some((source, destination)) = ip_addresses(packet) else {
            return Err(DropReason::NotIpv4);
        };
        let own = match source {
            IpAddr::V4(source) => source == address,
            IpAddr::V6(source) => Some(source) == self.address6,
        };
        match (own || self.routes_hold(source), source) {
            (true, _) => Ok(destination),
            (false, IpAddr::V6(_)) if self.address6.is_none() => Err(DropReason::NotIpv4),
            (false, _) => Err(DropReason::Spoofed(source)),
        }
    }

    /// Whether `source` lies in one of the networks behind the client.
    fn routes_hold(&self, source: IpAddr) -> bool {
        self.routes.iter().any(|net| net.contains(&source))
    }
}

/// The session parameters pushed to an extension client granted `address`
/// in `network`: its address and prefix, every network the server serves
/// (`served`) but its own (`own`), never pushed back to it, and what
/// `offer` adds (DNS, the default route).
pub fn pushed_params(
    address: Ipv4Addr,
    network: Ipv4Net,
    served: impl IntoIterator<Item = IpNet>,
    own: &[IpNet],
    offer: &Offer,
) -> SessionParams {
    SessionParams {
        address4: Ipv4Net::new(address, network.prefix_len()).ok(),
        routes: served.into_iter().filter(|r| !own.contains(r)).collect(),
        dns: offer.dns.clone(),
        dns_search: offer.dns_search.clone(),
        default_route: offer.gateway,
        ..SessionParams::default()
    }
}

/// What a server offers every extension client beyond its address and
/// routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offer {
    /// DNS servers.
    pub dns: Vec<std::net::IpAddr>,
    /// DNS search domains.
    pub dns_search: Vec<String>,
    /// Itself as the default gateway (full tunnel).
    pub gateway: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 0, 0);
    const HANDSHAKE: Duration = Duration::from_secs(10);
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

    fn session(start: Instant) -> ServerSession {
        ServerSession::new(start + HANDSHAKE, CLIENT_TIMEOUT, NETMASK, Vec::new())
    }

    fn request(request: Request) -> Frame {
        Frame::Control(Control::request(request))
    }

    /// A minimal IPv4 packet from `source` to `destination`.
    fn packet(source: Ipv4Addr, destination: Ipv4Addr) -> Bytes {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[12..16].copy_from_slice(&source.octets());
        p[16..20].copy_from_slice(&destination.octets());
        Bytes::from(p)
    }

    fn granted_at(start: Instant, address: Ipv4Addr) -> ServerSession {
        let mut s = session(start);
        assert_eq!(
            s.on_frame(start, request(Request::Dynamic)),
            Action::Admit(Request::Dynamic)
        );
        s.granted(start, address);
        s
    }

    #[test]
    fn a_request_is_admitted_once_and_repeats_get_the_held_address() {
        let t0 = Instant::now();
        let address = Ipv4Addr::new(198, 19, 0, 2);
        let mut s = session(t0);
        assert_eq!(s.address(), None);
        let wanted = Request::Static(Ipv4Addr::new(198, 19, 0, 7));
        assert_eq!(s.on_frame(t0, request(wanted)), Action::Admit(wanted));
        // A second request while the first is with the table: nothing more.
        assert_eq!(s.on_frame(t0, request(Request::Dynamic)), Action::None);
        s.granted(t0, address);
        assert_eq!(s.address(), Some(address));
        assert_eq!(
            s.on_frame(t0, request(Request::Dynamic)),
            Action::Reply(Control::grant(address, Some(NETMASK)))
        );
        assert_eq!(
            s.on_frame(t0, request(wanted)),
            Action::Reply(Control::grant(address, Some(NETMASK)))
        );
    }

    #[test]
    fn repeated_grants_carry_the_acceptance_only_for_a_client_that_offered() {
        let t0 = Instant::now();
        let address = Ipv4Addr::new(198, 19, 0, 2);
        let offer = Frame::Control(Control::request(Request::Dynamic).with_marker(Marker::Offer));
        // A marked request reads as the request it carries.
        let mut marked = session(t0).marking_grants();
        assert_eq!(
            marked.on_frame(t0, offer.clone()),
            Action::Admit(Request::Dynamic)
        );
        marked.granted(t0, address);
        let accepted = Control::grant(address, Some(NETMASK)).with_marker(Marker::Accept);
        assert_eq!(marked.on_frame(t0, offer.clone()), Action::Reply(accepted));
        assert_eq!(
            marked.on_frame(t0, request(Request::Dynamic)),
            Action::Reply(accepted)
        );
        // Keepalive echoes stay the original's.
        assert_eq!(
            marked.on_frame(t0, request(Request::Keepalive)),
            Action::Reply(Control::KEEPALIVE)
        );
        // A session that was not told to (the gate saw no offer, or TLS)
        // never marks, whatever a later request carries.
        let mut plain = granted_at(t0, address);
        let Action::Reply(reply) = plain.on_frame(t0, offer) else {
            panic!("no reply");
        };
        assert_eq!(reply.marker, None);
        assert_eq!(reply, Control::grant(address, Some(NETMASK)));
    }

    #[test]
    fn a_refused_static_request_is_closed_by_the_loop_with_the_reason() {
        // The session asks; the table refuses; the ending names both.
        let t0 = Instant::now();
        let wanted = Ipv4Addr::new(198, 19, 0, 7);
        let mut s = session(t0);
        assert_eq!(
            s.on_frame(t0, request(Request::Static(wanted))),
            Action::Admit(Request::Static(wanted))
        );
        let ending = Ending::Refused(Request::Static(wanted), Refusal::Taken(wanted));
        assert!(ending
            .to_string()
            .starts_with("refused: Static(198.19.0.7)"));
        assert!(!ending.flushes());
        assert_eq!(s.address(), None);
    }

    #[test]
    fn keepalives_are_echoed_once_before_and_after_the_grant() {
        let t0 = Instant::now();
        let mut s = session(t0);
        assert_eq!(
            s.on_frame(t0, request(Request::Keepalive)),
            Action::Reply(Control::KEEPALIVE)
        );
        let mut s2 = granted_at(t0, Ipv4Addr::new(198, 19, 0, 2));
        assert_eq!(
            s2.on_frame(t0, request(Request::Keepalive)),
            Action::Reply(Control::KEEPALIVE)
        );
        // One frame, one echo: the session itself never repeats it.
        assert_eq!(s.deadline(), t0 + HANDSHAKE);
    }

    #[test]
    fn packets_must_come_from_the_granted_address() {
        let t0 = Instant::now();
        let mine = Ipv4Addr::new(198, 19, 0, 2);
        let other = Ipv4Addr::new(198, 19, 0, 3);
        let mut s = session(t0);
        assert_eq!(
            s.on_frame(t0, Frame::Packet(packet(mine, other))),
            Action::Drop(DropReason::Unassigned)
        );
        let mut s = granted_at(t0, mine);
        let p = packet(mine, other);
        assert_eq!(
            s.on_frame(t0, Frame::Packet(p.clone())),
            Action::Forward {
                destination: other.into(),
                packet: p
            }
        );
        assert_eq!(
            s.on_frame(t0, Frame::Packet(packet(other, mine))),
            Action::Drop(DropReason::Spoofed(other.into()))
        );
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        assert_eq!(
            s.on_frame(t0, Frame::Packet(Bytes::from(v6))),
            Action::Drop(DropReason::NotIpv4)
        );
    }

    #[test]
    fn packets_may_come_from_the_networks_behind_the_client_and_nowhere_else() {
        let t0 = Instant::now();
        let mine = Ipv4Addr::new(198, 19, 0, 2);
        let lan: IpNet = "198.18.201.0/24".parse().expect("net");
        let mut s = ServerSession::new(t0 + HANDSHAKE, CLIENT_TIMEOUT, NETMASK, vec![lan]);
        s.on_frame(t0, request(Request::Dynamic));
        s.granted(t0, mine);
        let server = Ipv4Addr::new(198, 19, 0, 1);
        let from_lan = packet(Ipv4Addr::new(198, 18, 201, 9), server);
        assert_eq!(
            s.on_frame(t0, Frame::Packet(from_lan.clone())),
            Action::Forward {
                destination: server.into(),
                packet: from_lan
            }
        );
        let outside = Ipv4Addr::new(198, 18, 202, 9);
        assert_eq!(
            s.on_frame(t0, Frame::Packet(packet(outside, server))),
            Action::Drop(DropReason::Spoofed(outside.into()))
        );
    }

    /// A minimal IPv6 packet from `source` to `destination`.
    fn packet6(source: &str, destination: &str) -> Bytes {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&8u16.to_be_bytes());
        let ip = |s: &str| s.parse::<Ipv6Addr>().expect("v6").octets();
        p[8..24].copy_from_slice(&ip(source));
        p[24..40].copy_from_slice(&ip(destination));
        Bytes::from(p)
    }

    #[test]
    fn ipv6_packets_follow_the_same_rules_as_ipv4() {
        let t0 = Instant::now();
        let lan6: IpNet = "2001:2:0:300::/64".parse().expect("net");
        let mut s = ServerSession::new(t0 + HANDSHAKE, CLIENT_TIMEOUT, NETMASK, vec![lan6]);
        s.on_frame(t0, request(Request::Dynamic));
        s.granted(t0, Ipv4Addr::new(198, 19, 0, 2));
        // Before an IPv6 grant: IPv6 from its own network behind it only.
        let mine = "2001:2:0:100::2";
        assert_eq!(
            s.on_frame(t0, Frame::Packet(packet6(mine, "2001:2:0:100::3"))),
            Action::Drop(DropReason::NotIpv4)
        );
        s.granted6(Some(mine.parse().expect("v6")));
        for (source, destination) in [
            (mine, "2001:2:0:100::3"),
            (mine, "2001:2:0:100::1"),
            ("2001:2:0:300::9", "2001:2:0:100::1"),
        ] {
            let p = packet6(source, destination);
            assert_eq!(
                s.on_frame(t0, Frame::Packet(p.clone())),
                Action::Forward {
                    destination: destination.parse().expect("v6"),
                    packet: p
                },
                "{source} -> {destination}"
            );
        }
        for spoofed in ["2001:2:0:100::3", "2001:2:0:301::9", "fe80::1"] {
            assert_eq!(
                s.on_frame(t0, Frame::Packet(packet6(spoofed, "2001:2:0:100::1"))),
                Action::Drop(DropReason::Spoofed(spoofed.parse().expect("v6"))),
                "{spoofed}"
            );
        }
        // A cut-off IPv6 header is no packet at all.
        assert_eq!(
            s.on_frame(t0, Frame::Packet(packet6(mine, mine).slice(..39))),
            Action::Drop(DropReason::NotIpv4)
        );
    }

    #[test]
    fn a_clients_own_networks_are_never_pushed_back_to_it() {
        let nets: Vec<IpNet> = ["198.18.200.0/24", "198.18.201.0/24", "198.18.202.0/24"]
            .iter()
            .map(|n| n.parse().expect("net"))
            .collect();
        let network = "198.19.0.0/16".parse().expect("net");
        let params = pushed_params(
            Ipv4Addr::new(198, 19, 0, 9),
            network,
            nets.clone(),
            &nets[1..2],
            &Offer::default(),
        );
        assert_eq!(params.address4, Some("198.19.0.9/16".parse().expect("net")));
        assert_eq!(params.routes, vec![nets[0], nets[2]]);
        assert!(!params.default_route);
        assert!(params.dns.is_empty());
    }

    #[test]
    fn a_gateway_offers_the_default_route_and_its_dns() {
        let network = "198.19.0.0/16".parse().expect("net");
        let offer = Offer {
            dns: vec!["198.19.0.1".parse().expect("ip")],
            dns_search: vec!["vpn.example".into()],
            gateway: true,
        };
        let params = pushed_params(Ipv4Addr::new(198, 19, 0, 9), network, [], &[], &offer);
        assert!(params.default_route);
        assert_eq!(params.dns, offer.dns);
        assert_eq!(params.dns_search, offer.dns_search);
        assert!(params.encode().is_ok());
    }

    #[test]
    fn a_bad_control_message_closes_with_a_protocol_error() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let bad = Control {
            source: Ipv4Addr::new(1, 2, 3, 4),
            destination: Ipv4Addr::new(5, 6, 7, 8),
            marker: None,
        };
        let Action::Close(ending) = s.on_frame(t0, Frame::Control(bad)) else {
            panic!("not closed");
        };
        assert!(ending.is_misbehaviour());
        assert!(ending.to_string().contains("unexpected control message"));
    }

    #[test]
    fn the_handshake_timeout_holds_to_the_exact_boundary() {
        let t0 = Instant::now();
        let s = session(t0);
        let just_before = t0 + HANDSHAKE - Duration::from_millis(1);
        assert_eq!(s.on_tick(just_before), None);
        assert_eq!(s.on_tick(t0 + HANDSHAKE), Some(Ending::HandshakeTimeout));
        // Frames that are not requests do not move the handshake deadline.
        let mut s = session(t0);
        s.on_frame(just_before, request(Request::Keepalive));
        assert_eq!(s.deadline(), t0 + HANDSHAKE);
        // Nor does a request the table has not answered yet.
        s.on_frame(just_before, request(Request::Dynamic));
        assert_eq!(s.on_tick(t0 + HANDSHAKE), Some(Ending::HandshakeTimeout));
    }

    #[test]
    fn the_silence_timeout_holds_to_the_exact_boundary_and_frames_move_it() {
        let t0 = Instant::now();
        let mut s = granted_at(t0, Ipv4Addr::new(198, 19, 0, 2));
        assert_eq!(s.deadline(), t0 + CLIENT_TIMEOUT);
        assert_eq!(
            s.on_tick(t0 + CLIENT_TIMEOUT - Duration::from_millis(1)),
            None
        );
        assert_eq!(s.on_tick(t0 + CLIENT_TIMEOUT), Some(Ending::Silent));
        let later = t0 + Duration::from_secs(30);
        s.on_frame(later, request(Request::Keepalive));
        assert_eq!(s.deadline(), later + CLIENT_TIMEOUT);
        assert_eq!(s.on_tick(t0 + CLIENT_TIMEOUT), None);
        assert_eq!(s.on_tick(later + CLIENT_TIMEOUT), Some(Ending::Silent));
    }

    #[test]
    fn a_client_timeout_shorter_than_the_handshake_starts_at_the_grant() {
        let t0 = Instant::now();
        let mut s = ServerSession::new(t0 + HANDSHAKE, Duration::from_secs(2), NETMASK, Vec::new());
        s.on_frame(t0, request(Request::Dynamic));
        let grant_time = t0 + Duration::from_secs(1);
        s.granted(grant_time, Ipv4Addr::new(198, 19, 0, 2));
        assert_eq!(s.deadline(), grant_time + Duration::from_secs(2));
    }
}
