//! The server role: the I/O loops around the session rules
//! ([`crate::session::server`]) and the peer table ([`super::peers`]).
//!
//! Receive path, a client's packet on its way out, stage by stage:
//!   1. `run`: accept the TCP connection (a permit of `max_unauthenticated`,
//!      waited for up to `PLACE_WAIT` while the connection stays queued);
//!   2. `serve`: the gate (TLS or the original protocol) within the
//!      handshake deadline, then the ban check;
//!   3. `connection`: read a frame (`FrameReader`), hand it to the
//!      [`ServerSession`], and carry out its [`Action`]: reply, admit through
//!      the peer table (which queues the grant), drop, or forward;
//!   4. `forward`: to the client that holds the destination (its bounded
//!      queue), else into the server's tun (non-blocking; drops counted).
//!
//! Send path, a packet on its way to a client:
//!   1. `tun_reader`: a packet the host routed into the tun, or stage 4 above;
//!   2. [`PeerTable::deliver`]: the queue of the client that holds the
//!      destination; a full queue drops it (counted);
//!   3. `write_frames`: the client's writer task, batching what is queued
//!      into vectored writes.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use ipnet::IpNet;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument, Span};

use super::control::{self, KickError, Node};
use super::events::{EventKind, Events, PeerEvent};
use super::gate::{Admitted, Gate, Rejection};
use super::helper::Helper;
use super::notify;
use super::peers::{Banned, Delivery, Peer, PeerInfo, PeerTable};
use super::{ControlOptions, DaemonError};
use crate::budget::MemoryBudget;
use crate::config::ServerConfig;
use crate::connection::{self, write_frames, FrameReader, ReadError};
use crate::daemon::tun::AsyncTun;
use crate::keys::NodeKey;
use crate::pool::server_address;
use crate::proto;
use crate::session::server::{pushed_params, Action, DropReason, Ending, ServerSession};
use crate::wire::{ipv4_addresses, Control, Decoder, Frame};

/// Room kept in the tun reader's buffer: a whole maximum-size packet.
const TUN_READ_ROOM: usize = 65536;
/// How long a closing connection may take to flush what is queued for it.
const FLUSH_GRACE: Duration = Duration::from_secs(1);
/// While all `max_unauthenticated` places are taken, how long the next
/// connection waits in the kernel's listen queue for one to free before it
/// is accepted and closed. A burst (every client reconnecting after a
/// restart) frees places at the handshake rate, so its clients are served
/// in turn instead of being closed and sent into their backoff; connections
/// that hold places without finishing (a flood) cost each newcomer this
/// wait once, then newcomers are closed at once until a place frees.
const PLACE_WAIT: Duration = Duration::from_millis(500);

/// What every connection task, and the control service, shares.
struct Shared {
    config: ServerConfig,
    peers: PeerTable,
    /// Packets for destinations no client holds go to the server's tun,
    /// written by the connection task that read them.
    tun: Arc<AsyncTun>,
    dropped_to_tun: AtomicU64,
    events: Events,
    started: SystemTime,
    tun_name: String,
    gate: Gate,
    /// Permits for connections that have not been granted an address yet.
    unauthenticated: Arc<Semaphore>,
}

impl Shared {
    /// Logs and publishes a connection refused before it got an address.
    fn refuse(&self, remote: SocketAddr, reason: String, serious: bool) {
        match serious {
            true => warn!(%reason, "refused"),
            false => info!(%reason, "refused"),
        }
        self.events
            .publish(EventKind::Refused, remote, None, reason);
    }
}

/// Runs the server until `shutdown` is cancelled; `helper` creates and
/// configures the tun; the control API is served on `control` if given;
/// TLS clients are served with `key` (loaded from `config.key`).
pub async fn run(
    config: ServerConfig,
    helper: &Helper,
    control: Option<ControlOptions>,
    key: Option<NodeKey>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let gate = Gate::new(&config, key.as_ref())?;
    let own_address = server_address(config.network);
    let tun = helper.open_tun().await?;
    helper.set_mtu(tun.index, config.mtu).await?;
    helper
        .set_ipv4(tun.index, own_address, config.network.prefix_len())
        .await?;
    helper.set_up(tun.index).await?;
    // The networks behind clients are reached through the tun: the host
    // routes them here, and the peer table on to the client behind each.
    for route in config.peers.iter().flat_map(|p| p.routes.iter()) {
        if let IpNet::V4(route) = route {
            helper.add_route(tun.index, *route).await?;
        }
    }
    let tun_name = tun.name.clone();
    let tun = Arc::new(AsyncTun::new(tun.fd)?);

    let listener = listen(config.listen).map_err(|source| DaemonError::Bind {
        address: config.listen,
        source,
    })?;
    let fixed = config.peers.iter().filter_map(|p| p.address);
    let shared = Arc::new(Shared {
        peers: PeerTable::new(
            config.network,
            fixed,
            MemoryBudget::new(config.memory_budget),
        ),
        tun: tun.clone(),
        dropped_to_tun: AtomicU64::new(0),
        events: Events::default(),
        started: SystemTime::now(),
        tun_name: tun_name.clone(),
        gate,
        unauthenticated: Arc::new(Semaphore::new(config.max_unauthenticated)),
        config,
    });
    info!(
        listen = %shared.config.listen,
        tun = %tun_name,
        address = %own_address,
        network = %shared.config.network,
        tls = %key.as_ref().map_or("off".to_string(), |k| format!("key {}", k.public())),
        tls_peers = shared.config.peers.len(),
        legacy = ?shared.config.legacy,
        "server ready"
    );

    let tasks = TaskTracker::new();
    if let Some(control) = control {
        let node: Arc<dyn Node> = shared.clone();
        tasks.spawn(control::serve(control, node, shutdown.clone()));
    }
    let status = shared.clone();
    tasks.spawn(notify::serve(
        move || notify::server_status(status.peers.len(), status.config.listen),
        shutdown.clone(),
    ));
    tasks.spawn(tun_reader(tun, shared.clone(), shutdown.clone()));
    let mut wait = PLACE_WAIT;
    loop {
        // A place first: meanwhile new connections wait in the listen queue.
        let place = tokio::select! {
            _ = shutdown.cancelled() => break,
            place = timeout(wait, shared.unauthenticated.clone().acquire_owned()) => place.ok().and_then(Result::ok),
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let span = info_span!(
                        "peer",
                        %remote,
                        name = tracing::field::Empty,
                        addr = tracing::field::Empty
                    );
                    let place = place.or_else(|| shared.unauthenticated.clone().try_acquire_owned().ok());
                    // Waited once in vain: no more waiting until a place frees.
                    wait = if place.is_some() { PLACE_WAIT } else { Duration::ZERO };
                    let Some(permit) = place else {
                        warn!(parent: &span, "refused: too many connections not yet granted an address (max_unauthenticated)");
                        continue;
                    };
                    let serve = serve(shared.clone(), stream, remote, permit, shutdown.clone());
                    tasks.spawn(serve.instrument(span));
                }
                // Out of fds or a connection reset before accept: keep serving.
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
    info!(tun = %tun_name, "server stopped");
    Ok(())
}

/// Connections the kernel may queue before they are accepted: bursts of
/// clients reconnecting at once (after a server restart, say) must not
/// overflow the default of 128 and wait a second for their SYN retry.
const LISTEN_BACKLOG: u32 = 4096;

/// The listening socket, with SO_REUSEADDR (a restart rebinds at once) and a
/// deep backlog.
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// One client connection, from accept to close: through the gate, then a
/// session. `permit` counts it as unauthenticated until it is granted an
/// address.
async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    remote: SocketAddr,
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let handshake_deadline = Instant::now() + shared.config.handshake_timeout;
    crate::connection::tune_tcp(&stream);
    let admitted = tokio::select! {
        _ = shutdown.cancelled() => return,
        admitted = timeout_at(handshake_deadline, shared.gate.admit(stream, remote)) => admitted,
    };
    let admitted = match admitted {
        Ok(Ok(admitted)) => admitted,
        Ok(Err(Rejection::Closed)) => {
            debug!("closed before sending anything");
            return;
        }
        Ok(Err(rejection)) => {
            let serious = matches!(rejection, Rejection::Unknown(_) | Rejection::Handshake(_));
            shared.refuse(remote, rejection.to_string(), serious);
            return;
        }
        Err(_) => {
            let reason = "no handshake within the handshake timeout".to_string();
            shared.refuse(remote, reason, true);
            return;
        }
    };
    let identity = admitted.identity.clone();
    if let Some(name) = identity.name() {
        Span::current().record("name", name);
    }
    let banned = Banned::of(&identity, remote.ip());
    if let Some(remaining) = shared.peers.ban_remaining(&banned, SystemTime::now()) {
        let reason = format!("banned for {}s more", remaining.as_secs() + 1);
        shared.refuse(remote, reason, false);
        return;
    }
    match identity.key() {
        Some(key) => info!(protocol = %identity.protocol(), %key, "connected"),
        None => info!(protocol = %identity.protocol(), "connected"),
    }
    shared.events.publish(
        EventKind::Connected,
        remote,
        None,
        identity.protocol().as_str(),
    );
    connection(
        shared,
        admitted,
        remote,
        permit,
        handshake_deadline,
        shutdown,
    )
    .await;
}

/// An admitted connection, from its first frame to its end: the session
/// rules decide, this loop reads, writes, and keeps the one timer.
async fn connection(
    shared: Arc<Shared>,
    admitted: Admitted,
    remote: SocketAddr,
    permit: OwnedSemaphorePermit,
    handshake_deadline: Instant,
    shutdown: CancellationToken,
) {
    let Admitted {
        reader,
        writer,
        identity,
        routes,
        extension,
    } = admitted;
    let config = &shared.config;
    let budget = shared.peers.budget_handle();
    let (queue, queue_rx) =
        connection::queue(config.queue_len, config.queue_bytes, Some(budget.clone()));
    let mut writer = tokio::spawn(write_frames(writer, queue_rx));
    let mut reader = FrameReader::new(reader, Decoder::new(config.max_frame))
        .with_limits(budget, config.frame_timeout);
    let peer = shared
        .peers
        .new_peer(remote, identity, routes.clone(), queue);
    let mut session = ServerSession::new(
        handshake_deadline.into_std(),
        shared.config.client_timeout,
        shared.peers.netmask(),
        routes,
    );
    // Counts this connection as unauthenticated until it is granted.
    let mut permit = Some(permit);

    // One timer for the connection, not one per frame: it fires at the
    // deadline it was last set to, and is moved on if a frame came since.
    let idle = tokio::time::sleep_until(Instant::from_std(session.deadline()));
    tokio::pin!(idle);
    let ending = loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break Ending::Shutdown,
            _ = peer.kick.cancelled() => break match peer.shed.load(Ordering::Relaxed) {
                true => Ending::OverBudget,
                false => Ending::Kicked,
            },
            () = &mut idle => {
                if let Some(ending) = session.on_tick(std::time::Instant::now()) {
                    break ending;
                }
                idle.as_mut().reset(Instant::from_std(session.deadline()));
                continue;
            }
            read = reader.read_frame() => match read {
                Ok(Some(frame)) => frame,
                Ok(None) => break Ending::ClosedByPeer,
                Err(ReadError::Protocol(e)) => break Ending::Protocol(e),
                Err(e) => break Ending::Io(e.to_string()),
            },
        };
        let now = std::time::Instant::now();
        peer.stats.seen();
        if let Frame::Packet(packet) = &frame {
            peer.stats.count_rx(packet.len());
        }
        match session.on_frame(now, frame) {
            Action::None => {}
            Action::Reply(control) => send(&peer, control),
            Action::Admit(request) => match shared.peers.admit(request, &peer) {
                Ok(address) => {
                    session.granted(now, address);
                    permit = None;
                    Span::current().record("addr", tracing::field::display(address));
                    info!(?request, peers = shared.peers.len(), "granted {address}");
                    shared.events.publish(
                        EventKind::Granted,
                        remote,
                        Some(address),
                        format!("{request:?}"),
                    );
                    if extension {
                        push_params(&shared, &peer, address);
                    }
                    // From now on silence counts, not the handshake deadline.
                    idle.as_mut().reset(Instant::from_std(session.deadline()));
                }
                Err(refusal) => break Ending::Refused(request, refusal),
            },
            Action::Forward {
                destination,
                packet,
            } => forward(&shared, destination, packet),
            Action::Drop(reason) => count_drop(&peer, reason),
            Action::Close(ending) => break ending,
        }
    };
    drop(permit);

    let address = session.address();
    if let Some(address) = address {
        shared.peers.remove(address, peer.id);
    }
    let peers = shared.peers.len();
    let kind = match ending {
        Ending::Refused(..) => EventKind::Refused,
        _ => EventKind::Disconnected,
    };
    shared
        .events
        .publish(kind, remote, address, ending.to_string());
    match ending.is_misbehaviour() {
        true => warn!(reason = %ending, peers, "disconnected"),
        false => info!(reason = %ending, peers, "disconnected"),
    }
    // Let the writer flush what is queued (e.g. a last keepalive echo), but a
    // refused or misbehaving client gets its connection closed right away.
    // The writer ends when the last sender of its queue (the peer record)
    // is gone.
    drop(peer);
    if !ending.flushes() || timeout(FLUSH_GRACE, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// Queues a control message to a client; dropped if its queue is full.
fn send(peer: &Peer, control: Control) {
    if peer
        .queue
        .try_push(Bytes::copy_from_slice(&control.encode()))
        .is_err()
    {
        peer.stats
            .dropped_queue_full
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// Queues the session parameters for an extension client just granted
/// `address` (right behind its grant).
fn push_params(shared: &Shared, peer: &Peer, address: Ipv4Addr) {
    let config = &shared.config;
    let params = pushed_params(
        address,
        config.network,
        config.served_routes(),
        &peer.routes,
    );
    match params.encode() {
        Ok(frame) => {
            debug!(routes = params.routes.len(), "pushing session parameters");
            if peer.queue.try_push(frame).is_err() {
                peer.stats
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        // The config's limits keep this from happening.
        Err(e) => warn!(error = %e, "session parameters not sent"),
    }
}

/// Sends a client's packet on: to the client that holds `destination`, else
/// into the server's tun.
fn forward(shared: &Shared, destination: Ipv4Addr, packet: Bytes) {
    if let Delivery::NoPeer(packet) = shared.peers.deliver(destination, packet) {
        if shared.tun.try_send(&packet).is_err() {
            shared.dropped_to_tun.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts a packet the session dropped.
fn count_drop(peer: &Peer, reason: DropReason) {
    let counter = match reason {
        DropReason::Unassigned => {
            debug!("dropped a packet sent before any address was granted");
            &peer.stats.dropped_unassigned
        }
        DropReason::Spoofed(source) => {
            debug!(%source, "dropped a packet with a spoofed source");
            &peer.stats.dropped_spoofed
        }
        DropReason::NotIpv4 => {
            debug!("dropped a non-IPv4 packet: no IPv6 address is assigned");
            &peer.stats.dropped_spoofed
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Reads packets the host routes into the tun and queues each for the client
/// that holds its destination.
async fn tun_reader(tun: Arc<AsyncTun>, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut buf = BytesMut::with_capacity(4 * TUN_READ_ROOM);
    loop {
        if buf.capacity() < TUN_READ_ROOM {
            buf.reserve(4 * TUN_READ_ROOM);
        }
        let len = tokio::select! {
            _ = shutdown.cancelled() => return,
            read = tun.recv_into(&mut buf) => match read {
                Ok(len) => len,
                Err(e) => {
                    warn!(error = %e, "tun read failed; the server stops forwarding from the host");
                    return;
                }
            },
        };
        let packet = buf.split_to(len).freeze();
        if let Some((_, destination)) = ipv4_addresses(&packet) {
            shared.peers.deliver(destination, packet);
        }
    }
}

impl Node for Shared {
    fn status(&self) -> proto::StatusReply {
        let network = self.config.network;
        proto::StatusReply {
            role: proto::Role::Server.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            started: Some(self.started.into()),
            tun: self.tun_name.clone(),
            address: format!("{}/{}", server_address(network), network.prefix_len()),
            listen: self.config.listen.to_string(),
            network: network.to_string(),
            peer_count: self.peers.len() as u32,
            free_addresses: self.peers.free_count(),
            dropped_to_tun: self.dropped_to_tun.load(Ordering::Relaxed),
            queued_bytes: self.peers.budget().queued() as u64,
            reading_bytes: self.peers.budget().reading() as u64,
            closed_for_memory: self.peers.budget().closed(),
            routes: self.config.served_routes().map(|r| r.to_string()).collect(),
            ..Default::default()
        }
    }

    fn peers(&self) -> Vec<PeerInfo> {
        self.peers.peers()
    }

    fn peer(&self, address: Ipv4Addr) -> Option<PeerInfo> {
        self.peers.peer(address)
    }

    fn kick(
        &self,
        address: Ipv4Addr,
        ban: Option<Duration>,
        by: &str,
    ) -> Result<PeerInfo, KickError> {
        let mut reason = format!("kicked by {by}");
        let peer = match ban {
            None => self.peers.kick(address),
            Some(ban) => {
                reason.push_str(&format!(", banned for {}", humantime::format_duration(ban)));
                self.peers.ban(address, SystemTime::now() + ban)
            }
        }
        .ok_or(KickError::NoSuchPeer(address))?;
        info!(remote = %peer.remote, addr = %address, "{reason}");
        self.events
            .publish(EventKind::Kicked, peer.remote, Some(address), reason);
        Ok(peer)
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }
}
