//! The client role: the I/O around the session rules of
//! [`crate::session::client`], which decide what to ask for, what to do with
//! each frame, when to send keepalives, when to give up and how long to wait
//! before reconnecting. This file dials, reads, writes and sleeps.
//!
//! Receive path (server to tun), in order:
//!  1. [`FrameReader::read_frame`] decodes the next frame off the connection;
//!  2. [`ClientSession::received`] applies the rules to it (a packet before
//!     the grant is dropped; a grant configures the tun);
//!  3. [`Action::WriteTun`]: the packet is counted and written to the tun.
//!
//! Send path (tun to server), in the [`Uplink`] task that owns the writer:
//!  1. control messages the rules queued ([`Action::Send`]: the request,
//!     keepalives) arrive on a small channel and go out first;
//!  2. after the grant, [`AsyncTun::recv`] waits for a packet, and the packets
//!     already waiting in the tun join it, up to [`UPLINK_BATCH`] bytes;
//!  3. [`Batch::take`] keeps IPv4 and [`routable`] IPv6 packets (and counts
//!     them); a super-packet read with its virtio-net header goes whole to a
//!     server that takes super-packets, else split;
//!  4. one `write_all` sends the batch. While the connection is slow this
//!     waits rather than queues, so the tun's own queue drops.
//!
//! Timers: the loop sleeps until [`ClientSession::next_tick`] and then feeds
//! a tick; reconnect delays come with each [`Closed`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument, Span};

use super::control::{self, KickError, Node};
use super::dialer::{Dialed, Dialer};
use super::events::{EventKind, Events, PeerEvent};
use super::gate::Identity;
use super::helper::Helper;
use super::notify;
use super::peers::{PeerInfo, PeerStats};
use super::{ControlOptions, DaemonError};
use crate::config::ClientConfig;
use crate::connection::{FrameReader, Writer};
use crate::daemon::tun::{AsyncTun, TunFailure, TunHealth, TunOp, TunState};
use crate::keys::NodeKey;
use crate::limits::MAX_FRAME;
use crate::limits::MAX_PACKET;
use crate::offload::{self, VirtioNetHdr, VNET_HDR_LEN};
use crate::params::MAX_ENCODED_LEN;
use crate::pool::server_address;
use crate::proto;
use crate::session::client::{
    Action, ClientSession, CloseReason, Closed, Grant, Refusal, HANDSHAKE_TIMEOUT,
};
use crate::session::LinkState;
use crate::wire::{
    ip_addresses, Decoder, Features, Request, SuperPacket, CONTROL_LEN, IPV6_HEADER_LEN,
    SUPER_HEADER_LEN,
};

/// How many bytes of waiting packets the uplink gathers into one write.
const UPLINK_BATCH: usize = 128 * 1024;
/// Control messages waiting for the uplink; a keepalive that finds the
/// queue full is dropped (the uplink is stuck writing anyway).
const UPLINK_QUEUE: usize = 4;

/// The tun device and how to configure it.
struct Tunnel {
    device: Arc<AsyncTun>,
    /// Whether it still works: a tun that fails for good ends the daemon.
    health: Arc<TunHealth>,
    index: u32,
    helper: Helper,
}

impl Tunnel {
    /// Gives the tun `address`/`prefix` and brings it up.
    async fn configure(&self, address: Ipv4Addr, prefix: u8) -> Result<(), DaemonError> {
        self.helper.set_ipv4(self.index, address, prefix).await?;
        self.helper.set_up(self.index).await?;
        Ok(())
    }
}

/// The link to the server as the control service sees it.
struct ClientState {
    /// Who the server is: its pinned key with TLS.
    identity: Identity,
    server: String,
    /// The proxy, as shown (no password).
    proxy: String,
    tun: String,
    tun_health: Arc<TunHealth>,
    started: SystemTime,
    events: Events,
    link: Mutex<Link>,
}

#[derive(Debug, Default, Clone)]
struct Link {
    state: LinkState,
    remote: Option<SocketAddr>,
    connected_since: Option<SystemTime>,
    granted: Option<(Ipv4Addr, u8)>,
    stats: Option<Arc<PeerStats>>,
    /// The IPv6 address and prefix granted in the session parameters.
    granted6: Option<ipnet::Ipv6Net>,
    /// The pushed routes installed on the tun.
    routes: Vec<ipnet::IpNet>,
    /// What the full tunnel changed on the host.
    full_tunnel: Vec<String>,
    /// The DNS settings on the tun.
    dns: Vec<String>,
    /// Why the last connection failed or ended.
    last_error: String,
}

impl ClientState {
    fn update(&self, change: impl FnOnce(&mut Link)) {
        change(&mut self.link.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn link(&self) -> Link {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The server as a peer, while a granted connection is up.
    fn server_peer(&self) -> Option<PeerInfo> {
        let link = self.link();
        match (
            link.state,
            link.remote,
            link.connected_since,
            link.granted,
            link.stats,
        ) {
            (
                LinkState::Connected,
                Some(remote),
                Some(since),
                Some((address, prefix)),
                Some(stats),
            ) => {
                // The server's tunnel address: the network's first host address.
                let network = ipnet::Ipv4Net::new(address, prefix).ok()?.trunc();
                Some(PeerInfo::new(
                    server_address(network),
                    remote,
                    since,
                    &stats,
                    &self.identity,
                ))
            }
            _ => None,
        }
    }
}

impl Node for ClientState {
    fn status(&self) -> proto::StatusReply {
        let link = self.link();
        proto::StatusReply {
            role: proto::Role::Client.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            started: Some(self.started.into()),
            tun: self.tun.clone(),
            tun_state: self.tun_health.state().to_string(),
            address: link
                .granted
                .map(|(a, p)| format!("{a}/{p}"))
                .unwrap_or_default(),
            address6: link.granted6.map(|a| a.to_string()).unwrap_or_default(),
            server: self.server.clone(),
            proxy: self.proxy.clone(),
            last_error: link.last_error.clone(),
            link_state: proto::LinkState::of(link.state).into(),
            routes: link.routes.iter().map(ToString::to_string).collect(),
            host_changes: link.full_tunnel.iter().chain(&link.dns).cloned().collect(),
            server_peer: self.server_peer().as_ref().map(proto::Peer::from),
            ..Default::default()
        }
    }

    fn peers(&self) -> Vec<PeerInfo> {
        self.server_peer().into_iter().collect()
    }

    fn kick(
        &self,
        _: Ipv4Addr,
        _: Option<Duration>,
        _: &str,
        _: &str,
    ) -> Result<PeerInfo, KickError> {
        Err(KickError::NotAServer)
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }
}

/// Runs the client until `shutdown` is cancelled; `helper` creates the tun
/// and, only once the server grants one, sets its address; the control API
/// is served on `control` if given.
pub async fn run(
    config: ClientConfig,
    helper: &Helper,
    control: Option<ControlOptions>,
    key: Option<NodeKey>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    // Cancelled on shutdown, and when the tun fails.
    let shutdown = shutdown.child_token();
    let dialer = Dialer::new(&config, key.as_ref(), HANDSHAKE_TIMEOUT)?;
    let tun = helper.open_tun().await?;
    helper.set_mtu(tun.index, config.mtu).await?;
    let health = Arc::new(TunHealth::default());
    let tunnel = Tunnel {
        health: health.clone(),
        device: Arc::new(AsyncTun::with_offloads(tun.fd, tun.offloads)?),
        index: tun.index,
        helper: helper.clone(),
    };
    let identity = dialer.identity();
    let protocol = identity.protocol();
    info!(
        server = %config.server,
        tun = %tun.name,
        %protocol,
        "client starting"
    );
    let state = Arc::new(ClientState {
        identity,
        server: config.server.clone(),
        proxy: config
            .proxy
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        tun: tun.name.clone(),
        tun_health: health.clone(),
        started: SystemTime::now(),
        events: Events::default(),
        link: Mutex::default(),
    });
    let control_task = control.map(|control| {
        let node: Arc<dyn Node> = state.clone();
        tokio::spawn(control::serve(control, node, shutdown.clone()))
    });
    let status = state.clone();
    let notify_task = tokio::spawn(notify::serve(
        move || {
            let link = status.link();
            notify::client_status(link.state, &status.server, link.granted)
        },
        shutdown.clone(),
    ));

    let mut client = Client {
        rules: ClientSession::new(config.rules(protocol), fastrand::f64),
        config,
        dialer,
        tunnel,
        state,
        shutdown: shutdown.clone(),
        dns_warned: false,
        skipped_domains_logged: Vec::new(),
    };
    let device = client.tunnel.device.clone();
    let tun_failure = tokio::select! {
        result = client.reconnect_loop() => {
            result?;
            None
        }
        why = health.failed() => Some(why),
        // Also while no connection reads the tun.
        e = device.broken() => {
            health.check(TunOp::Poll, &e);
            match health.state() {
                TunState::Failed(why) => Some(why),
                // A poll error that is not fatal still ends the device's
                // readiness stream: report it as the failure.
                TunState::Up => Some(TunFailure { op: TunOp::Poll, error: e.to_string() }),
            }
        }
    };
    shutdown.cancel();
    if let Some(task) = control_task {
        let _ = task.await;
    }
    let _ = notify_task.await;
    if let Some(why) = tun_failure {
        return Err(DaemonError::TunFailed(why));
    }
    info!("client stopped");
    Ok(())
}

/// Everything the client keeps across connections.
struct Client {
    config: ClientConfig,
    dialer: Dialer,
    tunnel: Tunnel,
    state: Arc<ClientState>,
    rules: ClientSession,
    shutdown: CancellationToken,
    /// Whether a DNS failure was logged already.
    dns_warned: bool,
    /// The single-label search domains last logged as left out.
    skipped_domains_logged: Vec<String>,
}

/// One connection's I/O, for carrying out actions.
struct Connection {
    remote: SocketAddr,
    stats: Arc<PeerStats>,
    /// Control messages, and the go-ahead for packets, to the uplink.
    to_uplink: mpsc::Sender<ToUplink>,
    /// Whether the server said it takes super-packets (read by the uplink).
    server_takes_super: Arc<AtomicBool>,
}

impl Client {
    /// Connects, runs the session, waits the delay the rules name, and again,
    /// until shutdown.
    async fn reconnect_loop(&mut self) -> Result<(), DaemonError> {
        loop {
            let span =
                info_span!("server", remote = %self.dialer.server(), addr = tracing::field::Empty);
            let closed = self.session().instrument(span.clone()).await?;
            let link_state = self.rules.link_state();
            self.state.update(|link| {
                link.state = link_state;
                link.stats = None;
                if !matches!(closed.reason, CloseReason::Shutdown) {
                    link.last_error = closed.reason.to_string();
                }
            });
            let Some(delay) = closed.reconnect_after else {
                return Ok(());
            };
            // With several servers listed, the next one is tried.
            self.dialer.next_server();
            span.in_scope(|| {
                log_closed(&closed.reason);
                info!("reconnecting in {:.1}s", delay.as_secs_f64());
            });
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection to the server, from dialing to its close.
    async fn session(&mut self) -> Result<Closed, DaemonError> {
        self.rules.dialing();
        let link_state = self.rules.link_state();
        self.state.update(|link| link.state = link_state);
        // A full tunnel held while the link is down routes everything into
        // the tun: the route pinning the server must follow the underlay as
        // it is now (a laptop on another network), or the dial would go into
        // the tunnel it is meant to carry.
        if self.rules.full_tunnel() {
            if let Some(server) = self.dialer.first_address().await {
                if let Err(e) = self.tunnel.helper.underlay(self.tunnel.index, server).await {
                    debug!(%server, error = %e, "the route to the server was not re-pinned before dialing");
                }
            }
        }
        let dialed = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(self.rules.shutdown()),
            dialed = self.dialer.dial() => dialed,
        };
        match dialed {
            Ok(dialed) => self.exchange(dialed).await,
            Err(e) => Ok(self.rules.dial_failed(e)),
        }
    }

    /// Feeds the rules what happens on the connection and carries out their
    /// actions, until they close it.
    async fn exchange(&mut self, dialed: Dialed) -> Result<Closed, DaemonError> {
        let Dialed {
            reader,
            writer,
            remote,
            extension,
        } = dialed;
        let stats = Arc::new(PeerStats::default());
        self.state.update(|link| {
            link.remote = Some(remote);
            link.connected_since = Some(SystemTime::now());
            link.stats = Some(stats.clone());
        });
        info!("connected");
        self.state
            .events
            .publish(EventKind::Connected, remote, None, "");
        // Before any route is pushed: the helper then refuses routes that
        // would take the connection to the server into the tun.
        if let Err(e) = self
            .tunnel
            .helper
            .underlay(self.tunnel.index, remote.ip())
            .await
        {
            warn!(error = %e, "the helper did not take the server's address");
        }

        let last_sent = Arc::new(LastSent::new());
        let (to_uplink, inbox) = mpsc::channel(UPLINK_QUEUE);
        // Super-packets go to the server whole once it says it takes them.
        let server_takes_super = Arc::new(AtomicBool::new(false));
        let announce = self.offloads_for(extension);
        let uplink = Uplink {
            tun: self.tunnel.device.clone(),
            health: self.tunnel.health.clone(),
            writer,
            inbox,
            last_sent: last_sent.clone(),
            stats: stats.clone(),
            announce,
            server_takes_super: server_takes_super.clone(),
        };
        // Aborted when dropped, however this returns.
        let mut uplink = UplinkTask(Some(tokio::spawn(uplink.run().instrument(Span::current()))));
        let connection = Connection {
            remote,
            stats,
            to_uplink,
            server_takes_super,
        };
        let mut reader = FrameReader::new(reader, self.decoder(extension));
        self.rules.connected(Instant::now(), remote.ip());
        let mut wake_at = self.rules.next_tick().unwrap_or_else(far_future);
        let timer = tokio::time::sleep_until(wake_at.into());
        tokio::pin!(timer);

        let closed = 'session: loop {
            // Carry out what the rules decided.
            while let Some(action) = self.rules.poll_action() {
                if let Action::SpeakExtension = action {
                    // Before the next frame is read: the server's extension
                    // frames follow its grant.
                    info!("the plaintext server accepted our extension");
                    reader.set_decoder(self.decoder(true));
                    if let Some(features) = self.offloads_for(true) {
                        let _ = connection
                            .to_uplink
                            .send(ToUplink::Announce(features))
                            .await;
                    }
                    continue;
                }
                if let Some(closed) = self.carry_out(action, &connection).await? {
                    break 'session closed;
                }
            }
            // A deadline only moves later as frames arrive; re-arm the timer
            // (which costs more than a packet) only when it moves earlier.
            if let Some(next) = self.rules.next_tick().filter(|next| *next < wake_at) {
                wake_at = next;
                timer.as_mut().reset(wake_at.into());
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => break self.rules.shutdown(),
                _ = &mut timer => {
                    self.rules.sent(last_sent.get());
                    self.rules.tick(Instant::now());
                    wake_at = self.rules.next_tick().unwrap_or_else(far_future);
                    timer.as_mut().reset(wake_at.into());
                }
                ended = uplink.ended() => {
                    if let Err(e) = ended {
                        self.rules.send_failed(e);
                    }
                }
                read = reader.read_frame() => match read {
                    Ok(Some(frame)) => {
                        connection.stats.seen(SystemTime::now());
                        self.rules.received(Instant::now(), frame);
                    }
                    Ok(None) => self.rules.server_closed(),
                    Err(e) => self.rules.read_failed(e),
                },
            }
        };
        uplink.stop().await;
        if let (Some(address), false) =
            (closed.held, matches!(closed.reason, CloseReason::Shutdown))
        {
            self.state.events.publish(
                EventKind::Disconnected,
                remote,
                Some(address),
                closed.reason.to_string(),
            );
        }
        Ok(closed)
    }

    /// Carries out one action of the rules; a close ends the connection.
    async fn carry_out(
        &mut self,
        action: Action,
        connection: &Connection,
    ) -> Result<Option<Closed>, DaemonError> {
        match action {
            Action::WriteTun(packet) => {
                connection.stats.count_rx(packet.len());
                if let Err(e) = self.tunnel.device.send(&packet).await {
                    // A tun gone for good ends the daemon; anything else
                    // is one packet lost.
                    if !self.tunnel.health.check(TunOp::Write, &e) {
                        debug!(error = %e, "tun write failed");
                    }
                }
            }
            Action::WriteSuper(packet) => {
                connection
                    .stats
                    .count_rx(packet.frame.len() - SUPER_HEADER_LEN);
                if let Err(e) = self.tunnel.device.try_send_super(&packet) {
                    if !self.tunnel.health.check(TunOp::Write, &e) {
                        debug!(error = %e, "tun write of a super-packet failed");
                    }
                }
            }
            Action::Send(request) => {
                if request == Request::Keepalive {
                    debug!("sending keepalive");
                }
                let message = self.rules.message(request).encode();
                // Full only while the uplink is stuck writing: a keepalive
                // would add nothing then.
                let _ = connection.to_uplink.try_send(ToUplink::Message(message));
            }
            Action::ConfigureTun { address, prefix } => {
                self.tunnel.configure(address, prefix).await?;
            }
            Action::ConfigureTun6(granted6) => {
                // Refused by the helper's allow-list (outside network6) or
                // failed: the link still carries IPv4.
                let set = self.tunnel.helper.set_ipv6(
                    self.tunnel.index,
                    granted6.addr(),
                    granted6.prefix_len(),
                );
                match set.await {
                    Ok(()) => {
                        info!("granted {granted6}");
                        self.state.update(|link| link.granted6 = Some(granted6));
                    }
                    Err(e) => warn!(error = %e, "IPv6 address {granted6} not set: IPv4 only"),
                }
            }
            Action::LinkUp { grant, asked } => {
                self.link_up(grant, asked, connection).await;
            }
            Action::Moved(grant) => {
                let Grant {
                    address, prefix, ..
                } = grant;
                info!("server moved us to {address}/{prefix}");
                Span::current().record("addr", tracing::field::display(address));
                self.state
                    .update(|link| link.granted = Some((address, prefix)));
            }
            Action::AddRoute(route) => {
                // A refusal (by the helper's own allow-list) or a failure is
                // this route's problem, not the link's.
                match self.tunnel.helper.add_route(self.tunnel.index, route).await {
                    Ok(()) => info!(%route, "installed a pushed route"),
                    Err(e) => warn!(%route, error = %e, "pushed route not installed"),
                }
                self.publish_routes();
            }
            Action::DelRoute(route) => {
                if let Err(e) = self.tunnel.helper.del_route(self.tunnel.index, route).await {
                    debug!(%route, error = %e, "removing a pushed route failed");
                }
                self.publish_routes();
            }
            Action::RouteRefused(route, reason) => {
                warn!(%route, %reason, "pushed route not installed");
            }
            Action::FullTunnel(server) => {
                match self
                    .tunnel
                    .helper
                    .full_tunnel(self.tunnel.index, server)
                    .await
                {
                    Ok(changes) => {
                        info!(%server, "full tunnel: all traffic but the tunnel's own goes through the server");
                        self.state.update(|link| link.full_tunnel = changes);
                    }
                    // Not fatal: the link still carries the tunnel network.
                    Err(e) => {
                        error!(error = %e, "full tunnel not set up: traffic takes the host's own routes")
                    }
                }
            }
            Action::EndFullTunnel => {
                match self.tunnel.helper.end_full_tunnel(self.tunnel.index).await {
                    Ok(()) => info!("full tunnel ended: the host's own routes apply again"),
                    Err(e) => warn!(error = %e, "ending the full tunnel failed"),
                }
                self.state.update(|link| link.full_tunnel.clear());
            }
            Action::SetDns(dns) => {
                info!(servers = ?dns.servers, domains = ?dns.domains, "the server pushed DNS settings");
                if !dns.skipped_domains.is_empty()
                    && self.skipped_domains_logged != dns.skipped_domains
                {
                    warn!(
                        domains = ?dns.skipped_domains,
                        "pushed search domains of a single label not applied: every lookup under \
                         them would go to the server's resolver (dns = \"pushed-all-domains\" applies them)"
                    );
                    self.skipped_domains_logged = dns.skipped_domains.clone();
                }
                let request = self.tunnel.helper.set_dns(
                    self.tunnel.index,
                    dns.servers,
                    dns.domains,
                    dns.route_all,
                );
                match request.await {
                    Ok(changes) => self.state.update(|link| link.dns = changes),
                    // Logged once: without systemd-resolved every session
                    // would say the same.
                    Err(e) if !self.dns_warned => {
                        self.dns_warned = true;
                        warn!(error = %e, "pushed DNS settings not applied; going on without them");
                    }
                    Err(e) => debug!(error = %e, "pushed DNS settings not applied"),
                }
            }
            Action::RevertDns => {
                if let Err(e) = self.tunnel.helper.revert_dns(self.tunnel.index).await {
                    debug!(error = %e, "reverting the tun's DNS settings failed");
                }
                self.state.update(|link| link.dns.clear());
            }
            Action::Close(closed) => return Ok(Some(closed)),
            // Carried out by `exchange`, which owns the reader.
            Action::SpeakExtension => {}
            Action::ServerFeatures(features) => {
                let takes = features.contains(Features::SUPER_PACKETS);
                debug!(super_packets = takes, "server features");
                connection
                    .server_takes_super
                    .store(takes, Ordering::Relaxed);
            }
        }
        Ok(None)
    }

    /// The decoder for a connection that does (`extension`) or does not
    /// speak our extension: a server that does may send session
    /// parameters, which may be longer than the largest packet allowed.
    fn decoder(&self, extension: bool) -> Decoder {
        match extension {
            true => Decoder::new(self.config.max_frame.max(MAX_ENCODED_LEN)).with_extensions(),
            false => Decoder::new(self.config.max_frame),
        }
    }

    /// Has the tun hand over super-packets for a server that speaks our
    /// extension (`extension`), if frames may be as large; for any other,
    /// the kernel segments and checksums (faster than splitting here).
    /// Returns what to announce to the server.
    fn offloads_for(&self, extension: bool) -> Option<Features> {
        let may_take_super = extension && self.config.max_frame >= MAX_FRAME;
        match self.tunnel.device.hand_over_offloads(may_take_super) {
            Ok(()) => debug!(on = may_take_super, "tun offloads"),
            // Not fatal: super-packets are then split here.
            Err(e) => warn!(error = %e, "tun offloads not changed"),
        }
        (may_take_super && self.tunnel.device.offloads().tso).then_some(Features::SUPER_PACKETS)
    }

    /// Shows the routes installed now to the control API.
    fn publish_routes(&self) {
        let routes = self.rules.installed_routes().to_vec();
        self.state.update(|link| link.routes = routes);
    }

    /// The session's first grant: the tun is configured, packets may flow.
    async fn link_up(&mut self, grant: Grant, asked: Request, connection: &Connection) {
        let Grant {
            address,
            prefix,
            pushed_netmask,
        } = grant;
        Span::current().record("addr", tracing::field::display(address));
        info!(pushed_netmask, "granted {address}/{prefix}");
        let link_state = self.rules.link_state();
        self.state.update(|link| {
            link.state = link_state;
            link.granted = Some((address, prefix));
        });
        self.state.events.publish(
            EventKind::Granted,
            connection.remote,
            Some(address),
            format!("{asked:?}"),
        );
        // Behind the request in the queue; if the uplink is gone, the
        // session learns it from `UplinkTask::ended`.
        let _ = connection.to_uplink.send(ToUplink::ReadTun).await;
    }
}

/// Logs why a session ended (before the "reconnecting" line).
fn log_closed(reason: &CloseReason) {
    match reason {
        CloseReason::Shutdown => {}
        CloseReason::Refused(Refusal::StaticAddress(address)) => {
            warn!(%address, "the server refused the static address; retrying");
        }
        CloseReason::Refused(Refusal::PreviousAddress(previous)) => {
            info!(%previous, "the server refused the previous address; asking for any");
        }
        CloseReason::Refused(Refusal::AnyAddress) => warn!(
            "the server closed the connection without a grant (addresses exhausted, \
             banned, or protocol not allowed)"
        ),
        reason => warn!(%reason, "disconnected"),
    }
}

/// A deadline for when the rules name none (never, in a session).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

/// What the session tells the uplink.
enum ToUplink {
    /// A control message to send.
    Message([u8; CONTROL_LEN]),
    /// What this client takes, to a plaintext server that accepted our
    /// extension (before the grant lets the tun be read).
    Announce(Features),
    /// The grant is in: read the tun from now on.
    ReadTun,
}

/// When the uplink last wrote, in milliseconds since the connection
/// started: an atomic, so the send path takes no lock.
struct LastSent {
    start: Instant,
    millis: AtomicU64,
}

impl LastSent {
    fn new() -> LastSent {
        LastSent {
            start: Instant::now(),
            millis: AtomicU64::new(0),
        }
    }

    fn now(&self) {
        let millis = self.start.elapsed().as_millis() as u64;
        self.millis.store(millis, Ordering::Relaxed);
    }

    fn get(&self) -> Instant {
        self.start + Duration::from_millis(self.millis.load(Ordering::Relaxed))
    }
}

/// The send path of one connection; it owns the writer.
struct Uplink {
    tun: Arc<AsyncTun>,
    health: Arc<TunHealth>,
    writer: Writer,
    inbox: mpsc::Receiver<ToUplink>,
    last_sent: Arc<LastSent>,
    stats: Arc<PeerStats>,
    /// Sent first: what this client takes (to an extension server).
    announce: Option<Features>,
    /// Whether the server announced it takes super-packets.
    server_takes_super: Arc<AtomicBool>,
}

impl Uplink {
    /// Sends the control messages from `inbox`, and once told to, the tun's
    /// IPv4 packets. A burst of packets waiting in the tun goes out in one
    /// write. Ends with the error when a write fails.
    async fn run(mut self) -> io::Result<()> {
        if let Some(features) = self.announce {
            self.write(&features.encode()).await?;
        }
        // Until the grant, nothing from the tun: the request must go first.
        loop {
            match self.inbox.recv().await {
                Some(ToUplink::Message(message)) => self.write(&message).await?,
                Some(ToUplink::Announce(features)) => self.write(&features.encode()).await?,
                Some(ToUplink::ReadTun) => break,
                None => return Ok(()),
            }
        }
        let mut batch = Batch::new(self.tun.offloads().vnet_hdr);
        loop {
            let read = tokio::select! {
                biased;
                message = self.inbox.recv() => match message {
                    Some(ToUplink::Message(message)) => {
                        self.write(&message).await?;
                        continue;
                    }
                    Some(ToUplink::Announce(features)) => {
                        self.write(&features.encode()).await?;
                        continue;
                    }
                    Some(ToUplink::ReadTun) => continue,
                    None => return Ok(()),
                },
                read = self.tun.recv(batch.spare()) => read,
            };
            let whole = self.server_takes_super.load(Ordering::Relaxed);
            match read {
                Ok(len) => batch.take(len, whole, &self.stats),
                // Gone for good: the daemon stops (see `run`).
                Err(e) if self.health.check(TunOp::Read, &e) => return Ok(()),
                Err(e) => {
                    warn!(error = %e, "tun read failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // More packets already waiting join this write.
            while batch.len() < UPLINK_BATCH && batch.spill.is_empty() {
                match self.tun.try_recv(batch.spare()) {
                    Ok(more) => batch.take(more, whole, &self.stats),
                    Err(_) => break,
                }
            }
            if batch.len() > 0 {
                self.writer.write_all(batch.bytes()).await?;
            }
            if !batch.spill.is_empty() {
                let spill = std::mem::take(&mut batch.spill);
                self.writer.write_all(&spill).await?;
            }
            self.last_sent.now();
            batch.clear();
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes).await?;
        self.last_sent.now();
        Ok(())
    }
}

/// The uplink's task, aborted when dropped.
struct UplinkTask(Option<JoinHandle<io::Result<()>>>);

impl UplinkTask {
    /// Waits for the uplink to end, with its write error if one ended it;
    /// after that, never returns.
    async fn ended(&mut self) -> io::Result<()> {
        let Some(task) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        let result = task.await;
        self.0 = None;
        match result {
            Ok(result) => result,
            // Only an abort or a panic: neither says anything about the link.
            Err(_) => std::future::pending().await,
        }
    }
}

impl UplinkTask {
    /// Stops the uplink and waits until it has let go of the writer and tun.
    async fn stop(mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for UplinkTask {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// The uplink's buffer: packets read from the tun, one after another as
/// they go on the wire.
///
/// On a tun with offloads every read starts with a 10-byte virtio-net
/// header. Each read lands so that the packet starts 8 bytes past the end
/// of the batch (the header's first 2 bytes overwrite, for the time of the
/// read, the batch's last 2, which are saved and put back): a super-packet
/// then gets its 8-byte frame header written in front of it in place, and a
/// plain packet moves 8 bytes back. A super-packet for a server that does
/// not take them is split into `spill`, written after the batch.
struct Batch {
    buf: Vec<u8>,
    /// Where the batch starts: room for the 2 header bytes before it.
    start: usize,
    /// Where it ends.
    end: usize,
    vnet: bool,
    /// The 2 bytes under the header of the read in progress.
    saved: [u8; 2],
    /// Split super-packets, sent after the batch.
    spill: Vec<u8>,
}

/// How far before the packet a read lands: the virtio-net header minus
/// the super-packet frame header it makes room for.
const READ_BACK: usize = VNET_HDR_LEN - SUPER_HEADER_LEN;

impl Batch {
    fn new(vnet: bool) -> Batch {
        let start = if vnet { READ_BACK } else { 0 };
        // A read may be a header and an IPv6 super-packet.
        let room = UPLINK_BATCH + VNET_HDR_LEN + MAX_PACKET + IPV6_HEADER_LEN;
        Batch {
            buf: vec![0u8; start + room],
            start,
            end: start,
            vnet,
            saved: [0; 2],
            spill: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn clear(&mut self) {
        self.end = self.start;
    }

    /// Where the next read goes.
    fn spare(&mut self) -> &mut [u8] {
        match self.vnet {
            false => &mut self.buf[self.end..],
            true => {
                let at = self.end - READ_BACK;
                self.saved.copy_from_slice(&self.buf[at..self.end]);
                &mut self.buf[at..]
            }
        }
    }

    /// Takes in the `len` bytes just read into [`Batch::spare`]: the
    /// packets worth sending only ([`routable`]), counted as sent; a
    /// super-packet whole (`whole`) or split.
    fn take(&mut self, len: usize, whole: bool, stats: &PeerStats) {
        if !self.vnet {
            if routable(&self.buf[self.end..self.end + len]) {
                stats.count_tx(len);
                self.end += len;
            }
            return;
        }
        let at = self.end - READ_BACK;
        let hdr = VirtioNetHdr::decode(&self.buf[at..at + len]);
        self.buf[at..self.end].copy_from_slice(&self.saved);
        let (Some(hdr), Some(packet_len)) = (hdr, len.checked_sub(VNET_HDR_LEN)) else {
            return;
        };
        let packet = self.end + SUPER_HEADER_LEN;
        let packet_end = packet + packet_len;
        if !routable(&self.buf[packet..packet_end]) {
            return;
        }
        match offload::from_tun(&hdr, &mut self.buf[packet..packet_end]) {
            Ok(None) => {
                self.buf.copy_within(packet..packet_end, self.end);
                self.end += packet_len;
            }
            Ok(Some(gso)) if whole && gso.fits_wire() => {
                self.buf[self.end..packet].copy_from_slice(&SuperPacket::header(gso));
                self.end = packet_end;
            }
            Ok(Some(gso)) => {
                let mut pieces = Vec::new();
                if let Err(e) =
                    offload::split(&self.buf[packet..packet_end], gso, usize::MAX, &mut pieces)
                {
                    debug!(error = %e, "dropped a tun super-packet that cannot be split");
                    return;
                }
                pieces.iter().for_each(|p| self.spill.extend_from_slice(p));
            }
            Err(e) => {
                debug!(error = %e, "dropped a tun packet with a bad offload header");
                return;
            }
        }
        stats.count_tx(packet_len);
    }
}

/// Whether `packet` is worth sending: IPv4, and IPv6 but the link's own
/// chatter (from a link-local or the unspecified address, or to a multicast
/// group: neighbour discovery, MLD), which the server would only drop as
/// not from our address.
fn routable(packet: &[u8]) -> bool {
    match ip_addresses(packet) {
        Some((IpAddr::V4(_), _)) => true,
        Some((IpAddr::V6(source), IpAddr::V6(destination))) => {
            !(source.is_unicast_link_local()
                || source.is_unspecified()
                || destination.is_multicast())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uplink_keeps_ipv4_and_routable_ipv6_only() {
        let v6 = |source: &str, destination: &str| {
            let mut p = vec![0u8; 40];
            p[0] = 0x60;
            let ip = |s: &str| s.parse::<std::net::Ipv6Addr>().expect("v6").octets();
            p[8..24].copy_from_slice(&ip(source));
            p[24..40].copy_from_slice(&ip(destination));
            p
        };
        let mut v4 = vec![0u8; 20];
        v4[0] = 0x45;
        assert!(routable(&v4));
        assert!(routable(&v6("2001:2:0:100::2", "2001:2:0:100::3")));
        for (source, destination) in [
            ("fe80::1", "2001:2:0:100::3"),
            ("::", "ff02::16"),
            ("2001:2:0:100::2", "ff02::1"),
        ] {
            assert!(!routable(&v6(source, destination)), "{source}");
        }
        assert!(!routable(&[0x50; 40]));
    }
}
