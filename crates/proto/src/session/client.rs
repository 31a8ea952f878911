//! The client's session rules, without I/O: what to ask the server for, what
//! to do with each frame it sends, when to send a keepalive, when to give up
//! on a silent server, and how long to wait before connecting again.
//!
//! [`ClientSession`] lives as long as the client. The I/O loop
//! (`daemon/client.rs`) dials, feeds it events ([`ClientSession::connected`],
//! [`received`](ClientSession::received), [`tick`](ClientSession::tick), ...)
//! with the current time, and carries out the [`Action`]s it queues, in
//! order, until one is [`Action::Close`]; then it waits the delay the close
//! names and dials again. It sleeps until [`ClientSession::next_tick`]: the
//! rules keep no clock of their own, so every timeout is tested to the
//! millisecond without sleeping.
//!
//! New session parameters (routes pushed by the server, say) enter as one
//! more kind of frame handled in [`ClientSession::received`] and leave as one
//! more [`Action`] for the loop to carry out.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{LinkState, Protocol};
use crate::params::{ParamsError, SessionParams};
use crate::wire::{
    netmask_prefix, Control, ExtensionKind, Features, Frame, Marker, ProtocolError, ReadError,
    Reply, Request, SuperPacket,
};

/// How long connecting, and then waiting for the grant, may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalives are re-sent this often while the server stays silent.
pub const KEEPALIVE_RETRY: Duration = Duration::from_secs(1);
/// The delay before the first reconnect, and after a session that was granted.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// The longest delay between reconnects.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What the rules are configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRules {
    /// The address always asked for (`--address`); `None`: whatever the
    /// server grants, and after that the address held last.
    pub static_address: Option<Ipv4Addr>,
    /// The prefix length used when a grant pushes no netmask (the original
    /// server's grants).
    pub default_prefix: u8,
    /// How the server is spoken to: TLS reports a rejected key differently.
    pub protocol: Protocol,
    /// How long after connecting the grant may take.
    pub handshake_timeout: Duration,
    /// Silence either way after which a keepalive is sent.
    pub keepalive_after: Duration,
    /// Silence from the server after which the connection is given up.
    pub timeout: Duration,
    /// Pushed routes are installed only inside these; `None`: any but a
    /// default route and one covering the server's address.
    pub accept_routes: Option<Vec<IpNet>>,
    /// Accept the server's default route (full tunnel).
    pub full_tunnel: bool,
    /// Full tunnel: drop its routes while the link is down, instead of
    /// keeping them (the kill switch).
    pub fail_open: bool,
    /// Set pushed DNS settings on the tun.
    pub dns: bool,
    /// Apply single-label search domains too (`dns = "pushed-all-domains"`).
    pub dns_all_domains: bool,
}

/// DNS settings pushed by the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    pub servers: Vec<IpAddr>,
    pub domains: Vec<String>,
    /// Pushed search domains of a single label, left out (`dns = "pushed"`).
    pub skipped_domains: Vec<String>,
    /// Resolve every name through the tun ("~."): with a full tunnel.
    pub route_all: bool,
}

/// An address the server granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// Whether the server pushed its netmask (our extension), rather than
    /// leaving the prefix to the configuration.
    pub pushed_netmask: bool,
}

/// What the I/O loop is to do, in the order queued.
#[derive(Debug)]
pub enum Action {
    /// Send this message to the server (encoded by
    /// [`ClientSession::message`]).
    Send(Request),
    /// A plaintext server accepted our extension ([`Marker::Accept`] in its
    /// grant, queued before the grant's other actions): from now on this
    /// connection carries extension frames both ways, as with TLS ALPN
    /// "simplevpn/2".
    SpeakExtension,
    /// Give the tun this address (it does not have it yet).
    ConfigureTun { address: Ipv4Addr, prefix: u8 },
    /// Give the tun this IPv6 address and prefix (granted in the session
    /// parameters; it does not have it yet).
    ConfigureTun6(Ipv6Net),
    /// The session's first grant: the link is up, and packets from the tun
    /// may now go to the server. `asked` is the request it answered.
    LinkUp { grant: Grant, asked: Request },
    /// The server granted another address in the middle of the session.
    Moved(Grant),
    /// Write this packet from the server to the tun.
    WriteTun(Bytes),
    /// Write this super-packet to the tun, with its offload metadata.
    WriteSuper(SuperPacket),
    /// Route this network into the tun (pushed by the server, accepted).
    AddRoute(IpNet),
    /// Remove the route to this network from the tun.
    DelRoute(IpNet),
    /// A pushed route not installed, and why (queued once per session).
    RouteRefused(IpNet, RouteRefusal),
    /// Route everything but the server (at this address) into the tun.
    FullTunnel(IpAddr),
    /// Remove the full tunnel's routes: the host's own routes apply again.
    EndFullTunnel,
    /// Give the tun these DNS settings.
    SetDns(Dns),
    /// Remove the tun's DNS settings.
    RevertDns,
    /// What the server announced it can take (its latest FEATURES frame):
    /// the uplink may send it super-packets if it takes them.
    ServerFeatures(Features),
    /// The session is over: close the connection.
    Close(Closed),
}

/// How a session ended, and what comes next.
#[derive(Debug)]
pub struct Closed {
    pub reason: CloseReason,
    /// The address held when it ended, if the session was granted one.
    pub held: Option<Ipv4Addr>,
    /// How long to wait before connecting again; `None` on shutdown.
    pub reconnect_after: Option<Duration>,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum CloseReason {
    #[error("shutting down")]
    Shutdown,
    /// Dialing failed (the dialer's error).
    #[error("{0}")]
    Dial(Box<dyn std::error::Error + Send + Sync>),
    /// The server closed the connection before a grant: its way of refusing.
    #[error("{0}")]
    Refused(Refusal),
    /// With TLS 1.3 a client learns that its key was rejected only after
    /// its side of the handshake: an alert instead of a grant.
    #[error(
        "the server rejected this client ({0}): is its key listed in the server's [[server.peer]]?"
    )]
    KeyRejected(io::Error),
    #[error("no grant within the handshake timeout")]
    GrantTimeout,
    #[error("sending the request failed: {0}")]
    RequestFailed(io::Error),
    #[error("sending failed: {0}")]
    SendFailed(io::Error),
    #[error("no traffic from the server for {}s", .0.as_secs())]
    Silent(Duration),
    #[error("closed by server")]
    ClosedByServer,
    #[error("{0}")]
    Read(ReadError),
    #[error("protocol error: {0}")]
    Protocol(ProtocolError),
    #[error("bad session parameters: {0}")]
    Params(ParamsError),
}

/// Why a pushed route is not installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteRefusal {
    #[error("a default route is full tunnel, which this client does not do (full_tunnel = true accepts it)")]
    Default,
    #[error("it covers the server's own address {0}: the tunnel would carry itself")]
    CoversServer(IpAddr),
    #[error("outside accept_routes")]
    NotAccepted,
}

/// Whether a pushed `route` is installed: not a default route, not one
/// that covers `server` (the tunnel must never carry itself), and inside
/// `accept` when that list is given.
pub fn judge_route(
    route: IpNet,
    accept: Option<&[IpNet]>,
    server: Option<IpAddr>,
) -> Result<(), RouteRefusal> {
    if route.prefix_len() == 0 {
        return Err(RouteRefusal::Default);
    }
    if let Some(server) = server.filter(|s| route.contains(s)) {
        return Err(RouteRefusal::CoversServer(server));
    }
    match accept {
        Some(accept) if !accept.iter().any(|a| a.contains(&route)) => {
            Err(RouteRefusal::NotAccepted)
        }
        _ => Ok(()),
    }
}

/// What the server refused, as far as the client can tell: it closes the
/// connection without saying why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The configured address; it is asked for again.
    #[error("the server refused the static address {0}")]
    StaticAddress(Ipv4Addr),
    /// The address held before; the next request is for any.
    #[error("the server refused the previous address {0}")]
    PreviousAddress(Ipv4Addr),
    /// Any address: the pool is exhausted, we are banned, or our protocol is
    /// not allowed.
    #[error("the server closed the connection without a grant")]
    AnyAddress,
}

/// Where the client is.
#[derive(Debug)]
enum Phase {
    /// No connection: dialing, or not yet.
    Dialing,
    /// Connected and asked; waiting for the grant until `deadline`.
    Handshake { asked: Request, deadline: Instant },
    /// Granted: packets flow.
    Up(Up),
    /// The session ended; waiting to reconnect (or shut down).
    Closed,
}

/// A granted session's state.
#[derive(Debug)]
struct Up {
    grant: Grant,
    /// When the server last sent a frame.
    last_received: Instant,
    /// When we last sent anything, as far as we were told.
    last_sent: Instant,
    /// When we last sent a keepalive.
    last_keepalive: Option<Instant>,
}

/// The client's session rules, across all its sessions. See the module
/// documentation for how it is driven.
pub struct ClientSession {
    rules: ClientRules,
    phase: Phase,
    /// The address to ask for next: the static one, else the one held last.
    wanted: Option<Ipv4Addr>,
    /// What the tun is configured with, across sessions.
    tun: Option<(Ipv4Addr, u8)>,
    backoff: Backoff,
    /// Uniform samples in [0, 1) for the backoff's jitter.
    jitter: Box<dyn FnMut() -> f64 + Send>,
    actions: VecDeque<Action>,
    /// The server's address on the current connection.
    server: Option<IpAddr>,
    /// The routes the server pushed last (this session).
    pushed: Vec<IpNet>,
    /// The routes on the tun now.
    installed: Vec<IpNet>,
    /// The IPv6 address and prefix the server granted this session, in
    /// its session parameters.
    pushed6: Option<Ipv6Net>,
    /// What the tun's IPv6 address is configured as, across sessions.
    tun6: Option<Ipv6Net>,
    /// Pushed routes refused this session (each is reported once).
    refused: Vec<IpNet>,
    /// Whether the server offered itself as the default gateway (last push).
    offered_default: bool,
    /// Whether session parameters arrived this session: until they do,
    /// the full tunnel and DNS stay as they are (they follow the grant).
    params_seen: bool,
    /// The server address the full tunnel is set up for, across sessions
    /// (the kill switch keeps it while the link is down).
    full: Option<IpAddr>,
    /// The DNS settings pushed last (this session).
    pushed_dns: Dns,
    /// The DNS settings on the tun now.
    dns: Option<Dns>,
}

impl ClientSession {
    /// The rules, before the first connection; `jitter` returns uniform
    /// samples in [0, 1) (`fastrand::f64`; a constant in tests).
    pub fn new(rules: ClientRules, jitter: impl FnMut() -> f64 + Send + 'static) -> ClientSession {
        ClientSession {
            wanted: rules.static_address,
            rules,
            phase: Phase::Dialing,
            tun: None,
            backoff: Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX),
            jitter: Box::new(jitter),
            actions: VecDeque::new(),
            server: None,
            pushed: Vec::new(),
            installed: Vec::new(),
            pushed6: None,
            tun6: None,
            refused: Vec::new(),
            offered_default: false,
            params_seen: false,
            full: None,
            pushed_dns: Dns::default(),
            dns: None,
        }
    }

    /// Whether the full tunnel's routes are in place.
    pub fn full_tunnel(&self) -> bool {
        self.full.is_some()
    }

    /// The pushed routes installed on the tun now.
    pub fn installed_routes(&self) -> &[IpNet] {
        &self.installed
    }

    /// The tun's IPv6 address and prefix, once granted one.
    pub fn address6(&self) -> Option<Ipv6Net> {
        self.tun6
    }

    /// The link as the control API and systemd see it.
    pub fn link_state(&self) -> LinkState {
        match self.phase {
            Phase::Dialing | Phase::Handshake { .. } => LinkState::Connecting,
            Phase::Up(_) => LinkState::Connected,
            Phase::Closed => LinkState::Backoff,
        }
    }

    /// The next action to carry out, in the order they were decided.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`tick`](Self::tick) must be called next; a tick before then
    /// does nothing. `None` outside a session.
    pub fn next_tick(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Handshake { deadline, .. } => Some(*deadline),
            Phase::Up(up) => {
                let silent = up.last_received.checked_add(self.rules.timeout);
                let keepalive = up.keepalive_due(self.rules.keepalive_after);
                match (silent, keepalive) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            Phase::Dialing | Phase::Closed => None,
        }
    }

    /// A new attempt begins: the I/O loop dials.
    pub fn dialing(&mut self) {
        self.phase = Phase::Dialing;
        self.actions.clear();
    }

    /// Dialing failed with `error`. With no connection there is nothing else
    /// to do, so the close is returned rather than queued.
    pub fn dial_failed(&mut self, error: impl std::error::Error + Send + Sync + 'static) -> Closed {
        self.close(CloseReason::Dial(Box::new(error)));
        self.take_close()
    }

    /// The connection to the server at `server` is up at `now`: queues the
    /// request.
    pub fn connected(&mut self, now: Instant, server: IpAddr) {
        self.server = Some(server);
        self.pushed.clear();
        self.pushed6 = None;
        self.refused.clear();
        self.offered_default = false;
        self.params_seen = false;
        self.pushed_dns = Dns::default();
        let asked = match self.wanted {
            Some(address) => Request::Static(address),
            None => Request::Dynamic,
        };
        let deadline = now.checked_add(self.rules.handshake_timeout).unwrap_or(now);
        self.phase = Phase::Handshake { asked, deadline };
        self.actions.push_back(Action::Send(asked));
    }

    /// The control message that carries `request`: a plaintext client's
    /// address request offers our extension ([`Marker::Offer`] in bytes
    /// 4..8, which the original server ignores); keepalives, and anything
    /// over TLS, are the original's bytes.
    pub fn message(&self, request: Request) -> Control {
        let control = Control::request(request);
        match (self.rules.protocol, request) {
            (Protocol::Original, Request::Dynamic | Request::Static(_)) => {
                control.with_marker(Marker::Offer)
            }
            (Protocol::Original, Request::Keepalive) | (Protocol::Tls, _) => control,
        }
    }

    /// A frame arrived from the server at `now`.
    pub fn received(&mut self, now: Instant, frame: Frame) {
        let granted = match &mut self.phase {
            Phase::Up(up) => {
                up.last_received = now;
                true
            }
            Phase::Handshake { .. } => false,
            Phase::Dialing | Phase::Closed => return,
        };
        match frame {
            Frame::Packet(packet) if granted => self.actions.push_back(Action::WriteTun(packet)),
            Frame::Super(packet) if granted => self.actions.push_back(Action::WriteSuper(packet)),
            // Before the grant nothing is configured to take a packet.
            Frame::Packet(_) | Frame::Super(_) => {}
            Frame::Control(control) => match control.as_reply() {
                Ok(Reply::Grant { address, netmask }) => {
                    // Only the answer to our offer counts: an original
                    // server echoes the offer, and TLS negotiates by ALPN.
                    let accepted = control.marker == Some(Marker::Accept)
                        && self.rules.protocol == Protocol::Original
                        && !granted;
                    if accepted {
                        self.actions.push_back(Action::SpeakExtension);
                    }
                    self.granted(now, address, netmask)
                }
                Ok(Reply::Keepalive) => {}
                Err(e) => self.close(CloseReason::Protocol(e)),
            },
            Frame::Extension(extension) => match ExtensionKind::from(extension.kind) {
                // Never from a plaintext link (our server sends none over
                // one): whoever is on its path must not set our routes.
                ExtensionKind::SessionParams if self.rules.protocol == Protocol::Original => {}
                ExtensionKind::SessionParams => match SessionParams::decode(&extension.body) {
                    Ok(params) => {
                        self.pushed = params.routes;
                        self.pushed6 = params.address6;
                        self.offered_default = params.default_route;
                        self.params_seen = true;
                        let (domains, skipped_domains) = crate::params::split_wide_domains(
                            params.dns_search,
                            self.rules.dns_all_domains,
                        );
                        self.pushed_dns = Dns {
                            servers: params.dns,
                            domains,
                            skipped_domains,
                            route_all: false,
                        };
                        if granted {
                            self.sync_routes();
                        }
                    }
                    Err(e) => self.close(CloseReason::Params(e)),
                },
                // What the server takes concerns the uplink only. A
                // malformed announcement is a broken server.
                ExtensionKind::Features => match Features::decode(&extension.body) {
                    Ok(features) => self.actions.push_back(Action::ServerFeatures(features)),
                    Err(e) => self.close(CloseReason::Protocol(e)),
                },
                // A message of a newer server: ignored (forward compatible).
                ExtensionKind::Unknown(_) => {}
            },
        }
    }

    /// Brings the tun's routes, the full tunnel and DNS in line with what
    /// was pushed and accepted.
    fn sync_routes(&mut self) {
        // The IPv6 address first: the tun's IPv6 routes need it.
        if let Some(granted6) = self.pushed6.filter(|g| self.tun6 != Some(*g)) {
            self.tun6 = Some(granted6);
            self.actions.push_back(Action::ConfigureTun6(granted6));
        }
        let accept = self.rules.accept_routes.as_deref();
        let mut wanted = Vec::new();
        let default = IpNet::V4(Ipv4Net::default());
        // A default route pushed as a route is the same offer as the flag.
        let offered = self.offered_default || self.pushed.contains(&default);
        for route in &self.pushed {
            if *route == default && self.rules.full_tunnel {
                continue;
            }
            match judge_route(*route, accept, self.server) {
                Ok(()) => wanted.push(*route),
                Err(refusal) if !self.refused.contains(route) => {
                    self.refused.push(*route);
                    self.actions
                        .push_back(Action::RouteRefused(*route, refusal));
                }
                Err(_) => {}
            }
        }
        let (keep, gone): (Vec<_>, Vec<_>) =
            self.installed.drain(..).partition(|r| wanted.contains(r));
        self.actions.extend(gone.into_iter().map(Action::DelRoute));
        for route in wanted {
            if !keep.contains(&route) && !self.installed.contains(&route) {
                self.actions.push_back(Action::AddRoute(route));
            }
            if !self.installed.contains(&route) {
                self.installed.push(route);
            }
        }
        if self.params_seen {
            self.sync_full_tunnel(offered, default);
            self.sync_dns();
        }
    }

    /// Sets up or ends the full tunnel, as offered and configured.
    fn sync_full_tunnel(&mut self, offered: bool, default: IpNet) {
        let wanted = match (offered, self.rules.full_tunnel) {
            (false, _) => None,
            // The server of this connection, IPv4 or IPv6: its route is pinned.
            (true, true) => self.server,
            (true, false) => {
                if !self.refused.contains(&default) {
                    self.refused.push(default);
                    self.actions
                        .push_back(Action::RouteRefused(default, RouteRefusal::Default));
                }
                None
            }
        };
        if wanted == self.full {
            return;
        }
        match wanted {
            Some(server) => self.actions.push_back(Action::FullTunnel(server)),
            None => self.actions.push_back(Action::EndFullTunnel),
        }
        self.full = wanted;
    }

    /// Sets or reverts the tun's DNS, as pushed and configured.
    fn sync_dns(&mut self) {
        let pushed = &self.pushed_dns;
        let wanted = (self.rules.dns && !(pushed.servers.is_empty() && pushed.domains.is_empty()))
            .then(|| Dns {
                route_all: self.full.is_some() && !pushed.servers.is_empty(),
                ..pushed.clone()
            });
        if wanted == self.dns {
            return;
        }
        match &wanted {
            Some(dns) => self.actions.push_back(Action::SetDns(dns.clone())),
            None => self.actions.push_back(Action::RevertDns),
        }
        self.dns = wanted;
    }

    /// The server closed the connection cleanly.
    pub fn server_closed(&mut self) {
        match self.phase {
            Phase::Handshake { .. } => {
                let refusal = self.refused();
                self.close(CloseReason::Refused(refusal));
            }
            Phase::Up(_) => self.close(CloseReason::ClosedByServer),
            Phase::Dialing | Phase::Closed => {}
        }
    }

    /// Reading from the server failed.
    pub fn read_failed(&mut self, error: ReadError) {
        match self.phase {
            Phase::Handshake { .. } => match error {
                // A server that rejects the key says so with a TLS alert; one
                // that refuses the address asked for just closes (no
                // close_notify).
                ReadError::Io(e)
                    if self.rules.protocol == Protocol::Tls
                        && e.kind() != io::ErrorKind::UnexpectedEof =>
                {
                    self.close(CloseReason::KeyRejected(e));
                }
                // The original server refuses by closing, at times with a reset.
                ReadError::Io(_) => {
                    let refusal = self.refused();
                    self.close(CloseReason::Refused(refusal));
                }
                error => self.close(CloseReason::Read(error)),
            },
            Phase::Up(_) => self.close(CloseReason::Read(error)),
            Phase::Dialing | Phase::Closed => {}
        }
    }

    /// Writing to the server failed.
    pub fn send_failed(&mut self, error: io::Error) {
        match self.phase {
            Phase::Handshake { .. } => self.close(CloseReason::RequestFailed(error)),
            Phase::Up(_) => self.close(CloseReason::SendFailed(error)),
            Phase::Dialing | Phase::Closed => {}
        }
    }

    /// Something was last sent to the server at `at` (the uplink reports it).
    pub fn sent(&mut self, at: Instant) {
        if let Phase::Up(up) = &mut self.phase {
            up.last_sent = up.last_sent.max(at);
        }
    }

    /// The time is `now`: gives up on a grant or a silent server, or sends a
    /// keepalive, when it is due.
    pub fn tick(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Handshake { deadline, .. } if now >= *deadline => {
                self.close(CloseReason::GrantTimeout);
            }
            Phase::Up(up) => {
                let silent = now.saturating_duration_since(up.last_received);
                if silent >= self.rules.timeout {
                    self.close(CloseReason::Silent(silent));
                } else if up
                    .keepalive_due(self.rules.keepalive_after)
                    .is_some_and(|due| now >= due)
                {
                    up.last_keepalive = Some(now);
                    up.last_sent = up.last_sent.max(now);
                    self.actions.push_back(Action::Send(Request::Keepalive));
                }
            }
            Phase::Handshake { .. } | Phase::Dialing | Phase::Closed => {}
        }
    }

    /// The daemon stops: the session ends and no reconnect follows. The
    /// close is returned, as the loop stops carrying out actions.
    pub fn shutdown(&mut self) -> Closed {
        self.actions.clear();
        self.close(CloseReason::Shutdown);
        self.take_close()
    }

    /// A grant, the session's first or a later one: configures the tun if
    /// its address changes.
    fn granted(&mut self, now: Instant, address: Ipv4Addr, netmask: Option<Ipv4Addr>) {
        let grant = Grant {
            address,
            prefix: netmask
                .and_then(netmask_prefix)
                .unwrap_or(self.rules.default_prefix),
            pushed_netmask: netmask.is_some(),
        };
        let next = match &mut self.phase {
            Phase::Handshake { asked, .. } => Action::LinkUp {
                grant,
                asked: *asked,
            },
            Phase::Up(up) if (up.grant.address, up.grant.prefix) != (address, grant.prefix) => {
                up.grant = grant;
                Action::Moved(grant)
            }
            // The same grant again: nothing changes.
            Phase::Up(_) | Phase::Dialing | Phase::Closed => return,
        };
        if self.tun != Some((address, grant.prefix)) {
            self.tun = Some((address, grant.prefix));
            self.actions.push_back(Action::ConfigureTun {
                address,
                prefix: grant.prefix,
            });
        }
        let link_up = matches!(next, Action::LinkUp { .. });
        if link_up {
            self.phase = Phase::Up(Up {
                grant,
                last_received: now,
                last_sent: now,
                last_keepalive: None,
            });
        }
        self.actions.push_back(next);
        if link_up {
            self.sync_routes();
        }
    }

    /// What the server refused by closing before the grant; after it
    /// refuses the address held before, any will do.
    fn refused(&mut self) -> Refusal {
        match (self.rules.static_address, self.wanted) {
            (Some(address), _) => Refusal::StaticAddress(address),
            (None, Some(previous)) => {
                self.wanted = None;
                Refusal::PreviousAddress(previous)
            }
            (None, None) => Refusal::AnyAddress,
        }
    }

    /// Ends the session for `reason`: queues the close with the delay
    /// before the next attempt.
    fn close(&mut self, reason: CloseReason) {
        // The link is down: its routes go (no silent fallback comes with
        // them: packets for those networks then take the host's other routes).
        let gone: Vec<_> = self.installed.drain(..).map(Action::DelRoute).collect();
        self.actions.extend(gone);
        // A full tunnel stays (the kill switch: nothing falls back to the
        // open network), and its DNS with it, unless it fails open; on
        // shutdown the helper undoes everything as the daemon exits.
        let keep_full = self.full.is_some() && !self.rules.fail_open;
        if !matches!(reason, CloseReason::Shutdown) {
            if self.full.is_some() && !keep_full {
                self.full = None;
                self.actions.push_back(Action::EndFullTunnel);
            }
            if self.dns.is_some() && !keep_full {
                self.dns = None;
                self.actions.push_back(Action::RevertDns);
            }
        }
        let held = match &self.phase {
            Phase::Up(up) => Some(up.grant.address),
            _ => None,
        };
        self.phase = Phase::Closed;
        let reconnect_after = match reason {
            CloseReason::Shutdown => None,
            _ => {
                if held.is_some() {
                    // The session worked: reconnect soon, asking for the
                    // address just held (a static one stays wanted).
                    self.backoff.reset();
                    if self.rules.static_address.is_none() {
                        self.wanted = held;
                    }
                }
                Some(self.backoff.next_delay((self.jitter)()))
            }
        };
        self.actions.push_back(Action::Close(Closed {
            reason,
            held,
            reconnect_after,
        }));
    }

    /// The close just queued, dropping anything queued before it.
    fn take_close(&mut self) -> Closed {
        loop {
            match self.actions.pop_back() {
                Some(Action::Close(closed)) => {
                    self.actions.clear();
                    return closed;
                }
                Some(_) => {}
                // `close` always queues one; this is only for completeness.
                None => {
                    return Closed {
                        reason: CloseReason::Shutdown,
                        held: None,
                        reconnect_after: None,
                    }
                }
            }
        }
    }
}

impl Up {
    /// When a keepalive is due: after `keepalive_after` of silence either
    /// way, and not within [`KEEPALIVE_RETRY`] of the last one.
    fn keepalive_due(&self, keepalive_after: Duration) -> Option<Instant> {
        let silence = self
            .last_received
            .min(self.last_sent)
            .checked_add(keepalive_after)?;
        Some(match self.last_keepalive {
            Some(last) => silence.max(last.checked_add(KEEPALIVE_RETRY)?),
            None => silence,
        })
    }
}

/// Reconnect delays: `initial` doubling up to `max`, each with +-20% jitter.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay to wait before reconnecting; `jitter` is a uniform
    /// sample in [0, 1) (0.5: none).
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let factor = 0.8 + jitter.clamp(0.0, 1.0) * 0.4;
        base.mul_f64(factor).min(self.max)
    }

    /// Back to the initial delay, after a connection that worked.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
    const OTHER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 3);
    const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 0, 0);
    const MS: Duration = Duration::from_millis(1);
    const SERVER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1));

    fn rules() -> ClientRules {
        ClientRules {
            static_address: None,
            default_prefix: 24,
            protocol: Protocol::Tls,
            handshake_timeout: Duration::from_secs(10),
            keepalive_after: Duration::from_secs(15),
            timeout: Duration::from_secs(30),
            accept_routes: None,
            full_tunnel: false,
            fail_open: false,
            dns: true,
            dns_all_domains: false,
        }
    }

    /// [`rules`] for a plaintext client (the original protocol).
    fn plaintext() -> ClientRules {
        ClientRules {
            protocol: Protocol::Original,
            ..rules()
        }
    }

    /// Rules with no jitter (the sample 0.5 is the middle of the range).
    fn session(rules: ClientRules) -> ClientSession {
        ClientSession::new(rules, || 0.5)
    }

    fn actions(session: &mut ClientSession) -> Vec<Action> {
        std::iter::from_fn(|| session.poll_action()).collect()
    }

    fn grant(address: Ipv4Addr) -> Frame {
        Frame::Control(Control::grant(address, Some(NETMASK)))
    }

    fn keepalive_echo() -> Frame {
        Frame::Control(Control::KEEPALIVE)
    }

    /// Connects at `t0` and takes the grant of `address` at once.
    fn granted_session(address: Ipv4Addr, t0: Instant) -> ClientSession {
        let mut session = session(rules());
        session.connected(t0, SERVER_IP);
        session.received(t0, grant(address));
        actions(&mut session);
        session
    }

    fn closed(session: &mut ClientSession) -> Option<Closed> {
        actions(session)
            .into_iter()
            .find_map(|action| match action {
                Action::Close(closed) => Some(closed),
                _ => None,
            })
    }

    fn asked(session: &mut ClientSession, now: Instant) -> Request {
        session.dialing();
        session.connected(now, SERVER_IP);
        match actions(session).as_slice() {
            [Action::Send(request)] => *request,
            other => panic!("expected one request, got {other:?}"),
        }
    }

    fn net(text: &str) -> IpNet {
        text.parse().expect("net")
    }

    /// `params` as the frame a server sends, decoded as the client would.
    fn params_frame(params: SessionParams) -> Frame {
        let frame = params.encode().expect("encodes");
        let mut buf = bytes::BytesMut::from(&frame[..]);
        crate::wire::Decoder::default()
            .with_extensions()
            .decode(&mut buf)
            .expect("decodes")
            .expect("whole")
    }

    fn params(routes: &[&str]) -> Frame {
        params_frame(SessionParams {
            routes: routes.iter().map(|r| net(r)).collect(),
            ..SessionParams::default()
        })
    }

    fn route_actions(session: &mut ClientSession) -> Vec<String> {
        actions(session)
            .into_iter()
            .filter_map(|a| match a {
                Action::AddRoute(r) => Some(format!("add {r}")),
                Action::DelRoute(r) => Some(format!("del {r}")),
                Action::RouteRefused(r, why) => Some(format!("refuse {r}: {why:?}")),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn pushed_routes_are_installed_filtered_and_removed_with_the_link() {
        let t0 = Instant::now();
        let mut session = granted_session(ADDRESS, t0);
        session.received(
            t0,
            params(&[
                "198.18.200.0/24",
                "0.0.0.0/0",
                "198.18.0.0/16",
                "2001:2::/48",
            ]),
        );
        assert_eq!(
            route_actions(&mut session),
            [
                "refuse 0.0.0.0/0: Default",
                "refuse 198.18.0.0/16: CoversServer(198.18.1.1)",
                "add 198.18.200.0/24",
                "add 2001:2::/48",
            ]
        );
        assert_eq!(
            session.installed_routes(),
            [net("198.18.200.0/24"), net("2001:2::/48")]
        );
        // The same push again: nothing to do, and no refusal repeated.
        session.received(t0, params(&["198.18.200.0/24", "0.0.0.0/0", "2001:2::/48"]));
        assert!(route_actions(&mut session).is_empty());
        // A changed push: the gone route is removed, the new one added.
        session.received(t0, params(&["198.18.202.0/24"]));
        assert_eq!(
            route_actions(&mut session),
            [
                "del 198.18.200.0/24",
                "del 2001:2::/48",
                "add 198.18.202.0/24"
            ]
        );
        // The link goes down: its routes go with it, before the close.
        session.server_closed();
        let all = actions(&mut session);
        assert!(matches!(all.first(), Some(Action::DelRoute(_))), "{all:?}");
        assert!(matches!(all.last(), Some(Action::Close(_))), "{all:?}");
        assert!(session.installed_routes().is_empty());
    }

    #[test]
    fn a_granted_ipv6_address_is_set_before_the_ipv6_routes_and_kept_across_sessions() {
        let t0 = Instant::now();
        let mut session = granted_session(ADDRESS, t0);
        let granted6: Ipv6Net = "2001:2:0:100::2/64".parse().expect("net");
        let push = || {
            params_frame(SessionParams {
                address6: Some(granted6),
                routes: vec![net("2001:2:0:201::/64")],
                ..SessionParams::default()
            })
        };
        session.received(t0, push());
        let done: Vec<String> = actions(&mut session)
            .into_iter()
            .map(|a| match a {
                Action::ConfigureTun6(net) => format!("address6 {net}"),
                Action::AddRoute(r) => format!("add {r}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            done,
            ["address6 2001:2:0:100::2/64", "add 2001:2:0:201::/64"]
        );
        assert_eq!(session.address6(), Some(granted6));
        // The same again, in this session or the next: the tun has it.
        session.received(t0, push());
        assert!(actions(&mut session).is_empty());
        session.server_closed();
        actions(&mut session);
        session.dialing();
        session.connected(t0, "198.18.1.1".parse().expect("ip"));
        session.received(t0, Frame::Control(Control::grant(ADDRESS, None)));
        session.received(t0, push());
        assert!(
            !actions(&mut session)
                .iter()
                .any(|a| matches!(a, Action::ConfigureTun6(_))),
            "configured again"
        );
        assert_eq!(session.address6(), Some(granted6));
    }

    #[test]
    fn accept_routes_limits_what_is_installed_and_empty_means_none() {
        let t0 = Instant::now();
        for (accept, expected) in [
            (
                vec![net("198.18.200.0/23")],
                vec!["refuse 198.18.202.0/24: NotAccepted", "add 198.18.200.0/24"],
            ),
            (
                vec![],
                vec![
                    "refuse 198.18.200.0/24: NotAccepted",
                    "refuse 198.18.202.0/24: NotAccepted",
                ],
            ),
        ] {
            let mut session = session(ClientRules {
                accept_routes: Some(accept),
                ..rules()
            });
            session.connected(t0, SERVER_IP);
            // Parameters may come before the grant: applied once granted.
            session.received(t0, params(&["198.18.200.0/24", "198.18.202.0/24"]));
            assert!(route_actions(&mut session).is_empty());
            session.received(t0, grant(ADDRESS));
            assert_eq!(route_actions(&mut session), expected);
        }
    }

    #[test]
    fn malformed_session_parameters_close_the_connection() {
        let t0 = Instant::now();
        let mut session = granted_session(ADDRESS, t0);
        let bad = Frame::Extension(crate::wire::Extension {
            kind: crate::wire::SESSION_PARAMS,
            body: Bytes::from_static(&[9]),
        });
        session.received(t0, bad);
        let closed = closed(&mut session).expect("closed");
        assert!(
            matches!(closed.reason, CloseReason::Params(_)),
            "{:?}",
            closed.reason
        );
        // An unknown message type is ignored.
        let mut session = granted_session(ADDRESS, t0);
        let unknown = Frame::Extension(crate::wire::Extension {
            kind: 200,
            body: Bytes::from_static(&[1, 2, 3]),
        });
        session.received(t0, unknown);
        assert!(actions(&mut session).is_empty());
    }

    #[test]
    fn the_servers_features_reach_the_uplink_and_a_truncated_announcement_closes() {
        let t0 = Instant::now();
        let mut session = granted_session(ADDRESS, t0);
        let announced = crate::wire::Features::SUPER_PACKETS.encode();
        let frame = crate::wire::Decoder::new(crate::wire::DEFAULT_MAX_FRAME)
            .with_extensions()
            .decode(&mut bytes::BytesMut::from(&announced[..]))
            .expect("decodes")
            .expect("whole");
        session.received(t0, frame);
        match actions(&mut session).as_slice() {
            [Action::ServerFeatures(f)] => {
                assert!(f.contains(crate::wire::Features::SUPER_PACKETS))
            }
            other => panic!("{other:?}"),
        }
        let truncated = Frame::Extension(crate::wire::Extension {
            kind: crate::wire::FEATURES,
            body: Bytes::from_static(&[0, 1]),
        });
        session.received(t0, truncated);
        let closed = closed(&mut session).expect("closed");
        assert!(
            matches!(closed.reason, CloseReason::Protocol(_)),
            "{:?}",
            closed.reason
        );
    }

    #[test]
    fn a_plaintext_client_offers_the_extension_and_speaks_it_once_accepted() {
        let t0 = Instant::now();
        let mut session = session(plaintext());
        session.connected(t0, SERVER_IP);
        // The request carries the offer; keepalives stay the original's.
        let offer = session.message(Request::Dynamic);
        assert_eq!(offer.marker, Some(Marker::Offer));
        assert_eq!(offer.as_request(), Ok(Request::Dynamic));
        assert_eq!(
            session.message(Request::Static(ADDRESS)).marker,
            Some(Marker::Offer)
        );
        assert_eq!(session.message(Request::Keepalive), Control::KEEPALIVE);
        actions(&mut session);
        // The acceptance comes first, before the tun is configured.
        let accepted = Control::grant(ADDRESS, Some(NETMASK)).with_marker(Marker::Accept);
        session.received(t0, Frame::Control(accepted));
        assert!(matches!(
            actions(&mut session).as_slice(),
            [
                Action::SpeakExtension,
                Action::ConfigureTun { .. },
                Action::LinkUp { .. }
            ]
        ));
        // A repeated marked grant changes nothing.
        session.received(t0, Frame::Control(accepted));
        assert!(actions(&mut session).is_empty());
        // Session parameters over a plaintext link are ignored: no route.
        session.received(t0, params(&["198.18.50.0/24"]));
        assert!(route_actions(&mut session).is_empty());
        assert!(session.installed_routes().is_empty());
    }

    #[test]
    fn an_original_server_echoing_the_offer_or_an_unmarked_grant_leaves_the_original_protocol() {
        let t0 = Instant::now();
        // The original server's grant is the request echoed: the offer.
        for marker in [None, Some(Marker::Offer)] {
            let mut session = session(plaintext());
            session.connected(t0, SERVER_IP);
            actions(&mut session);
            let grant = Control {
                marker,
                ..Control::grant(ADDRESS, None)
            };
            session.received(t0, Frame::Control(grant));
            let got = actions(&mut session);
            assert!(
                !got.iter().any(|a| matches!(a, Action::SpeakExtension)),
                "{marker:?}: {got:?}"
            );
            assert!(got.iter().any(|a| matches!(a, Action::LinkUp { .. })));
        }
        // Over TLS nothing is offered, and an acceptance is ignored.
        let mut tls = session(rules());
        tls.connected(t0, SERVER_IP);
        actions(&mut tls);
        assert_eq!(
            tls.message(Request::Dynamic),
            Control::request(Request::Dynamic)
        );
        let accepted = Control::grant(ADDRESS, Some(NETMASK)).with_marker(Marker::Accept);
        tls.received(t0, Frame::Control(accepted));
        assert!(!actions(&mut tls)
            .iter()
            .any(|a| matches!(a, Action::SpeakExtension)));
    }

    #[test]
    fn a_grant_configures_the_tun_once_and_brings_the_link_up() {
        let t0 = Instant::now();
        let mut session = session(rules());
        assert_eq!(session.link_state(), LinkState::Connecting);
        session.connected(t0, SERVER_IP);
        assert!(matches!(
            actions(&mut session).as_slice(),
            [Action::Send(Request::Dynamic)]
        ));
        session.received(t0, grant(ADDRESS));
        let expected = Grant {
            address: ADDRESS,
            prefix: 16,
            pushed_netmask: true,
        };
        match actions(&mut session).as_slice() {
            [Action::ConfigureTun {
                address: ADDRESS,
                prefix: 16,
            }, Action::LinkUp {
                grant,
                asked: Request::Dynamic,
            }] => assert_eq!(*grant, expected),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(session.link_state(), LinkState::Connected);
    }

    #[test]
    fn a_grant_without_netmask_takes_the_configured_prefix() {
        let t0 = Instant::now();
        let mut session = session(rules());
        session.connected(t0, SERVER_IP);
        session.received(t0, Frame::Control(Control::grant(ADDRESS, None)));
        assert!(matches!(
            actions(&mut session).as_slice(),
            [
                Action::Send(_),
                Action::ConfigureTun {
                    address: ADDRESS,
                    prefix: 24
                },
                Action::LinkUp {
                    grant: Grant {
                        pushed_netmask: false,
                        ..
                    },
                    ..
                }
            ]
        ));
    }

    #[test]
    fn a_repeated_identical_grant_does_nothing() {
        let t0 = Instant::now();
        let mut session = granted_session(ADDRESS, t0);
        session.received(t0 + MS, grant(ADDRESS));
        assert!(actions(&mut session).is_empty());
        assert_eq!(session.link_state(), LinkState::Connected);
    }

    #[test]
    fn a_different_grant_reconfigures_the_tun() {
        let t0 = Instant::now();
        let mut session = granted_session(ADDRESS, t0);
        session.received(t0 + MS, grant(OTHER));
        match actions(&mut session).as_slice() {
            [Action::ConfigureTun {
                address: OTHER,
                prefix: 16,
            }, Action::Moved(grant)] => assert_eq!(grant.address, OTHER),
            other => panic!("unexpected {other:?}"),
        }
        // A session that ends now held the new address, and asks for it.
        session.server_closed();
        assert_eq!(closed(&mut session).and_then(|c| c.held), Some(OTHER));
        assert_eq!(asked(&mut session, t0), Request::Static(OTHER));
    }

    #[test]
    fn the_same_address_in_the_next_session_does_not_reconfigure_the_tun() {
        let t0 = Instant::now();
        let mut session = granted_session(ADDRESS, t0);
        session.server_closed();
        closed(&mut session);
        session.dialing();
        session.connected(t0, SERVER_IP);
        session.received(t0, grant(ADDRESS));
        assert!(matches!(
            actions(&mut session).as_slice(),
            [Action::Send(_), Action::LinkUp { .. }]
        ));
    }

    #[test]
    fn packets_reach_the_tun_only_after_the_grant() {
        let t0 = Instant::now();
        let mut session = session(rules());
        session.connected(t0, SERVER_IP);
        actions(&mut session);
        let packet = Bytes::from_static(&[0x45; 20]);
        session.received(t0, Frame::Packet(packet.clone()));
        session.received(t0, keepalive_echo());
        assert!(actions(&mut session).is_empty());
        session.received(t0, grant(ADDRESS));
        actions(&mut session);
        session.received(t0, Frame::Packet(packet.clone()));
        assert!(matches!(
            actions(&mut session).as_slice(),
            [Action::WriteTun(p)] if *p == packet
        ));
    }

    #[test]
    fn a_keepalive_is_sent_after_silence_and_not_twice_within_the_retry() {
        let t0 = Instant::now();
        let mut session = granted_session(ADDRESS, t0);
        let after = rules().keepalive_after;
        assert_eq!(session.next_tick(), Some(t0 + after));
        session.tick(t0 + after - MS);
        assert!(actions(&mut session).is_empty());
        session.tick(t0 + after);
        assert!(matches!(
            actions(&mut session).as_slice(),
            [Action::Send(Request::Keepalive)]
        ));
        session.tick(t0 + after + KEEPALIVE_RETRY - MS);
        assert!(actions(&mut session).is_empty());
        assert_eq!(session.next_tick(), Some(t0 + after + KEEPALIVE_RETRY));
        // The server stays silent: again after the retry interval.
        session.tick(t0 + after + KEEPALIVE_RETRY);
        assert!(matches!(
            actions(&mut session).as_slice(),
            [Action::Send(Request::Keepalive)]
        ));
    }

    #[test]
    fn a_keepalive_is_sent_when_only_we_are_silent() {
        let t0 = Instant::now();
        let mut session = granted_session(ADDRESS, t0);
        let after = rules().keepalive_after;
        // The server keeps talking; we do not.
        session.received(t0 + after - MS, keepalive_echo());
        session.tick(t0 + after);
        assert!(matches!(
            actions(&mut session).as_slice(),
            [Action::Send(Request::Keepalive)]
        ));
    }

    #[test]
    fn no_keepalive_while_traffic_flows_both_ways() {
        let t0 = Instant::now();
        let mut session = granted_session(ADDRESS, t0);
        let after = rules().keepalive_after;
        let now = t0 + after;
        session.received(now - MS, keepalive_echo());
        session.sent(now - MS);
        session.tick(now);
        assert!(actions(&mut session).is_empty());
        assert_eq!(session.next_tick(), Some(now - MS + after));
    }

    #[test]
    fn the_silence_timeout_is_exact() {
        let t0 = Instant::now();
        let mut session = granted_session(ADDRESS, t0);
        let timeout = rules().timeout;
        session.received(t0 + MS, keepalive_echo());
        session.tick(t0 + MS + timeout - MS);
        assert!(closed(&mut session).is_none());
        assert_eq!(session.link_state(), LinkState::Connected);
        session.tick(t0 + MS + timeout);
        let closed = closed(&mut session).expect("closed at the timeout");
        assert!(matches!(closed.reason, CloseReason::Silent(t) if t == timeout));
        assert_eq!(
            closed.reason.to_string(),
            "no traffic from the server for 30s"
        );
        assert_eq!(closed.held, Some(ADDRESS));
        assert_eq!(session.link_state(), LinkState::Backoff);
    }

    #[test]
    fn the_grant_timeout_is_exact() {
        let t0 = Instant::now();
        let mut session = session(rules());
        session.connected(t0, SERVER_IP);
        actions(&mut session);
        let deadline = t0 + rules().handshake_timeout;
        assert_eq!(session.next_tick(), Some(deadline));
        // Keepalive echoes do not count as a grant.
        session.received(deadline - MS, keepalive_echo());
        session.tick(deadline - MS);
        assert!(actions(&mut session).is_empty());
        session.tick(deadline);
        let closed = closed(&mut session).expect("closed at the deadline");
        assert!(matches!(closed.reason, CloseReason::GrantTimeout));
        assert_eq!(closed.held, None);
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let t0 = Instant::now();
        let mut session = session(rules());
        let mut delays = Vec::new();
        for _ in 0..7 {
            session.dialing();
            session.connected(t0, SERVER_IP);
            session.tick(t0 + rules().handshake_timeout);
            let closed = closed(&mut session).expect("grant timeout");
            delays.push(closed.reconnect_after.expect("reconnects").as_secs());
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn backoff_jitter_is_plus_minus_twenty_percent() {
        let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
        assert_eq!(backoff.next_delay(0.0), Duration::from_millis(800));
        assert_eq!(backoff.next_delay(1.0), Duration::from_millis(2400));
        assert_eq!(backoff.next_delay(0.5), Duration::from_secs(4));
        // Never above the cap, whatever the jitter.
        for _ in 0..4 {
            backoff.next_delay(0.5);
        }
        assert_eq!(backoff.next_delay(1.0), BACKOFF_MAX);
    }

    #[test]
    fn a_failed_dial_backs_off_with_the_injected_jitter() {
        let mut samples = [0.0, 1.0].into_iter();
        let mut session = ClientSession::new(rules(), move || samples.next().unwrap_or(0.5));
        let error = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        let first = session.dial_failed(error);
        assert_eq!(first.reconnect_after, Some(Duration::from_millis(800)));
        assert_eq!(first.reason.to_string(), "refused");
        assert_eq!(session.link_state(), LinkState::Backoff);
        session.dialing();
        let error = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        let second = session.dial_failed(error);
        assert_eq!(second.reconnect_after, Some(Duration::from_millis(2400)));
    }

    #[test]
    fn backoff_resets_after_a_granted_session() {
        let t0 = Instant::now();
        let mut session = session(rules());
        for _ in 0..3 {
            session.dialing();
            session.connected(t0, SERVER_IP);
            session.server_closed();
            closed(&mut session);
        }
        session.dialing();
        session.connected(t0, SERVER_IP);
        session.received(t0, grant(ADDRESS));
        session.server_closed();
        let closed = closed(&mut session).expect("closed");
        assert!(matches!(closed.reason, CloseReason::ClosedByServer));
        assert_eq!(closed.reconnect_after, Some(BACKOFF_INITIAL));
    }

    #[test]
    fn asks_for_the_address_held_then_for_any_once_refused() {
        let t0 = Instant::now();
        let mut session = session(rules());
        assert_eq!(asked(&mut session, t0), Request::Dynamic);
        session.received(t0, grant(ADDRESS));
        session.server_closed();
        closed(&mut session);
        assert_eq!(asked(&mut session, t0), Request::Static(ADDRESS));
        // The server closes without a grant: the address is taken.
        session.server_closed();
        let closed = closed(&mut session).expect("closed");
        assert!(matches!(
            closed.reason,
            CloseReason::Refused(Refusal::PreviousAddress(ADDRESS))
        ));
        assert_eq!(asked(&mut session, t0), Request::Dynamic);
        session.server_closed();
        let closed = self::closed(&mut session).expect("closed");
        assert!(matches!(
            closed.reason,
            CloseReason::Refused(Refusal::AnyAddress)
        ));
        assert_eq!(asked(&mut session, t0), Request::Dynamic);
    }

    #[test]
    fn a_static_address_is_always_asked_for() {
        let t0 = Instant::now();
        let mut session = session(ClientRules {
            static_address: Some(ADDRESS),
            ..rules()
        });
        assert_eq!(asked(&mut session, t0), Request::Static(ADDRESS));
        session.server_closed();
        let closed = closed(&mut session).expect("closed");
        assert!(matches!(
            closed.reason,
            CloseReason::Refused(Refusal::StaticAddress(ADDRESS))
        ));
        assert_eq!(asked(&mut session, t0), Request::Static(ADDRESS));
        // Even after the server moved us elsewhere.
        session.received(t0, grant(ADDRESS));
        session.received(t0, grant(OTHER));
        session.server_closed();
        self::closed(&mut session);
        assert_eq!(asked(&mut session, t0), Request::Static(ADDRESS));
    }

    #[test]
    fn a_read_error_before_the_grant_is_a_refusal_or_with_tls_a_rejected_key() {
        let t0 = Instant::now();
        let reset = || ReadError::Io(io::Error::from(io::ErrorKind::ConnectionReset));
        let mut original = session(plaintext());
        original.connected(t0, SERVER_IP);
        original.read_failed(reset());
        let closed = closed(&mut original).expect("closed");
        assert!(matches!(
            closed.reason,
            CloseReason::Refused(Refusal::AnyAddress)
        ));

        let mut tls = session(rules());
        tls.connected(t0, SERVER_IP);
        tls.read_failed(reset());
        let closed = self::closed(&mut tls).expect("closed");
        assert!(matches!(closed.reason, CloseReason::KeyRejected(_)));
        assert!(closed
            .reason
            .to_string()
            .starts_with("the server rejected this client"));

        // A TLS server that refuses the address held before closes without
        // close_notify: a refusal, and the next request is for any address.
        let mut tls = session(ClientRules {
            protocol: Protocol::Tls,
            ..rules()
        });
        assert_eq!(asked(&mut tls, t0), Request::Dynamic);
        tls.received(t0, grant(ADDRESS));
        tls.server_closed();
        self::closed(&mut tls);
        assert_eq!(asked(&mut tls, t0), Request::Static(ADDRESS));
        let eof = ReadError::Io(io::Error::from(io::ErrorKind::UnexpectedEof));
        tls.read_failed(eof);
        let closed = self::closed(&mut tls).expect("closed");
        assert!(matches!(
            closed.reason,
            CloseReason::Refused(Refusal::PreviousAddress(ADDRESS))
        ));
        assert_eq!(asked(&mut tls, t0), Request::Dynamic);
    }

    #[test]
    fn an_unexpected_control_message_closes_with_a_protocol_error() {
        let t0 = Instant::now();
        let mut session = granted_session(ADDRESS, t0);
        let bogus = Control {
            source: ADDRESS,
            destination: Ipv4Addr::UNSPECIFIED,
            marker: None,
        };
        session.received(t0, Frame::Control(bogus));
        let closed = closed(&mut session).expect("closed");
        assert!(matches!(closed.reason, CloseReason::Protocol(_)));
        assert!(closed.reason.to_string().starts_with("protocol error: "));
    }

    #[test]
    fn a_failed_send_closes_the_session() {
        let t0 = Instant::now();
        let mut session = session(rules());
        session.connected(t0, SERVER_IP);
        session.send_failed(io::Error::from(io::ErrorKind::BrokenPipe));
        let closed = closed(&mut session).expect("closed");
        assert!(matches!(closed.reason, CloseReason::RequestFailed(_)));
    }

    #[test]
    fn shutdown_ends_without_a_reconnect() {
        let t0 = Instant::now();
        let mut session = granted_session(ADDRESS, t0);
        session.tick(t0 + rules().keepalive_after);
        let closed = session.shutdown();
        assert!(matches!(closed.reason, CloseReason::Shutdown));
        assert_eq!(closed.reconnect_after, None);
        assert_eq!(closed.held, Some(ADDRESS));
        assert!(session.poll_action().is_none());
        assert_eq!(session.next_tick(), None);
    }

    fn gateway_params(dns: &[&str]) -> Frame {
        params_frame(SessionParams {
            default_route: true,
            dns: dns.iter().map(|d| d.parse().expect("ip")).collect(),
            dns_search: vec!["vpn.example".into()],
            ..SessionParams::default()
        })
    }

    fn full_actions(session: &mut ClientSession) -> Vec<String> {
        actions(session)
            .into_iter()
            .filter_map(|a| match a {
                Action::FullTunnel(server) => Some(format!("full {server}")),
                Action::EndFullTunnel => Some("end full".into()),
                Action::SetDns(dns) => Some(format!(
                    "dns {:?} {:?} all={}",
                    dns.servers, dns.domains, dns.route_all
                )),
                Action::RevertDns => Some("revert dns".into()),
                Action::RouteRefused(r, why) => Some(format!("refuse {r}: {why:?}")),
                Action::Close(_) => Some("close".into()),
                _ => None,
            })
            .collect()
    }

    fn full_session(rules: ClientRules, t0: Instant) -> ClientSession {
        let mut session = session(rules);
        session.connected(t0, SERVER_IP);
        session.received(t0, grant(ADDRESS));
        actions(&mut session);
        session
    }

    #[test]
    fn single_label_search_domains_are_left_out_unless_all_are_wanted() {
        let t0 = Instant::now();
        let pushed = || {
            params_frame(SessionParams {
                dns: vec!["198.19.0.1".parse().expect("ip")],
                dns_search: vec!["com".into(), "corp.example".into(), "lan.".into()],
                ..SessionParams::default()
            })
        };
        let set_dns = |session: &mut ClientSession| {
            std::iter::from_fn(|| session.poll_action())
                .find_map(|a| match a {
                    Action::SetDns(dns) => Some(dns),
                    _ => None,
                })
                .expect("DNS set")
        };
        let mut session = full_session(rules(), t0);
        session.received(t0, pushed());
        let dns = set_dns(&mut session);
        assert_eq!(dns.domains, ["corp.example"]);
        assert_eq!(dns.skipped_domains, ["com", "lan."]);
        let all = ClientRules {
            dns_all_domains: true,
            ..rules()
        };
        let mut session = full_session(all, t0);
        session.received(t0, pushed());
        let dns = set_dns(&mut session);
        assert_eq!(dns.domains, ["com", "corp.example", "lan."]);
        assert!(dns.skipped_domains.is_empty());
    }

    #[test]
    fn a_default_route_offered_is_refused_without_full_tunnel() {
        let t0 = Instant::now();
        let mut session = full_session(rules(), t0);
        session.received(t0, gateway_params(&["198.19.0.1"]));
        assert_eq!(
            full_actions(&mut session),
            [
                "refuse 0.0.0.0/0: Default",
                "dns [198.19.0.1] [\"vpn.example\"] all=false"
            ]
        );
        assert!(!session.full_tunnel());
    }

    #[test]
    fn full_tunnel_takes_the_default_route_and_keeps_it_while_the_link_is_down() {
        let t0 = Instant::now();
        let rules = ClientRules {
            full_tunnel: true,
            ..rules()
        };
        let mut session = full_session(rules, t0);
        session.received(t0, gateway_params(&["198.19.0.1"]));
        assert_eq!(
            full_actions(&mut session),
            [
                "full 198.18.1.1",
                "dns [198.19.0.1] [\"vpn.example\"] all=true"
            ]
        );
        assert!(session.full_tunnel());
        // The same push again changes nothing.
        session.received(t0, gateway_params(&["198.19.0.1"]));
        assert!(full_actions(&mut session).is_empty());
        // Link loss: the kill switch keeps the routes and DNS.
        session.server_closed();
        assert_eq!(full_actions(&mut session), ["close"]);
        assert!(session.full_tunnel());
        // The next session offers it again: nothing to redo.
        session.dialing();
        session.connected(t0, SERVER_IP);
        session.received(t0, grant(ADDRESS));
        session.received(t0, gateway_params(&["198.19.0.1"]));
        assert!(full_actions(&mut session).is_empty());
        // A server that stops offering it: the full tunnel ends, and DNS
        // routes only its own domains.
        session.received(t0, params(&[]));
        assert_eq!(full_actions(&mut session), ["end full", "revert dns"]);
    }

    #[test]
    fn fail_open_drops_the_full_tunnel_with_the_link() {
        let t0 = Instant::now();
        let rules = ClientRules {
            full_tunnel: true,
            fail_open: true,
            ..rules()
        };
        let mut session = full_session(rules, t0);
        session.received(t0, gateway_params(&[]));
        assert_eq!(
            full_actions(&mut session),
            ["full 198.18.1.1", "dns [] [\"vpn.example\"] all=false"]
        );
        session.server_closed();
        assert_eq!(
            full_actions(&mut session),
            ["end full", "revert dns", "close"]
        );
        assert!(!session.full_tunnel());
    }

    #[test]
    fn dns_off_ignores_pushed_dns_and_an_ipv6_server_gets_a_full_tunnel_too() {
        let t0 = Instant::now();
        let rules = ClientRules {
            full_tunnel: true,
            dns: false,
            ..rules()
        };
        let mut session = session(rules);
        session.connected(t0, "2001:2::1".parse().expect("ip"));
        session.received(t0, grant(ADDRESS));
        session.received(t0, gateway_params(&["198.19.0.1"]));
        assert_eq!(full_actions(&mut session), ["full 2001:2::1"]);
    }
}
