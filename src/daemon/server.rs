//! The server role: accepts clients, grants addresses, forwards packets
//! between clients and to and from the server's own tun.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument, Span};

use super::control::{self, KickError, Node};
use super::events::{EventKind, Events, PeerEvent};
use super::gate::{Admitted, Gate, Identity, Rejection};
use super::helper::Helper;
use super::notify;
use super::registry::{Delivery, PeerInfo, PeerLink, PeerStats, Registry};
use super::{ControlOptions, DaemonError};
use crate::config::ServerConfig;
use crate::connection::{write_frames, FrameReader, ReadError};
use crate::daemon::tun::AsyncTun;
use crate::keys::{NodeKey, PublicKey};
use crate::pool::server_address;
use crate::proto;
use crate::wire::{ipv4_addresses, Control, Decoder, Frame, Request};

/// Room kept in the tun reader's buffer: a whole maximum-size packet.
const TUN_READ_ROOM: usize = 65536;
/// How long a closing connection may take to flush what is queued for it.
const FLUSH_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// What every connection task, and the control service, shares.
struct Shared {
    config: ServerConfig,
    registry: Registry,
    /// Packets for destinations no client holds go to the server's tun,
    /// written by the connection task that read them.
    tun: Arc<AsyncTun>,
    dropped_to_tun: AtomicU64,
    events: Events,
    /// Clients refused until the given time (kick --ban).
    bans: Mutex<HashMap<Banned, SystemTime>>,
    started: SystemTime,
    tun_name: String,
    gate: Gate,
    /// Permits for connections that have not been granted an address yet.
    unauthenticated: Arc<Semaphore>,
}

/// Who a ban refuses: a TLS client by its key, an original-protocol client
/// by its remote IP address (it has no other identity).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Banned {
    Key(PublicKey),
    Remote(IpAddr),
}

impl Banned {
    fn of(identity: &Identity, remote: IpAddr) -> Banned {
        match identity.key() {
            Some(key) => Banned::Key(key),
            None => Banned::Remote(remote),
        }
    }
}

impl Shared {
    /// How much longer `who` stays banned, if it is.
    fn ban_remaining(&self, who: &Banned) -> Option<Duration> {
        let mut bans = self.bans.lock().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        bans.retain(|_, until| *until > now);
        bans.get(who)
            .and_then(|until| until.duration_since(now).ok())
    }

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
    let tun_name = tun.name.clone();
    let tun = Arc::new(AsyncTun::new(tun.fd)?);

    let listener = listen(config.listen).map_err(|source| DaemonError::Bind {
        address: config.listen,
        source,
    })?;
    let fixed = config.peers.iter().filter_map(|p| p.address);
    let shared = Arc::new(Shared {
        registry: Registry::new(config.network, fixed),
        tun: tun.clone(),
        dropped_to_tun: AtomicU64::new(0),
        events: Events::default(),
        bans: Mutex::default(),
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
        move || notify::server_status(status.registry.len(), status.config.listen),
        shutdown.clone(),
    ));
    tasks.spawn(tun_reader(tun, shared.clone(), shutdown.clone()));
    loop {
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
                    let Ok(permit) = shared.unauthenticated.clone().try_acquire_owned() else {
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

/// Why a connection ended.
enum Ending {
    Shutdown,
    ClosedByPeer,
    Refused(String),
    HandshakeTimeout,
    Silent,
    Kicked,
    Failed(ReadError),
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::Shutdown => f.write_str("server shutting down"),
            Ending::ClosedByPeer => f.write_str("closed by peer"),
            Ending::Refused(why) => write!(f, "refused: {why}"),
            Ending::HandshakeTimeout => {
                f.write_str("no address request within the handshake timeout")
            }
            Ending::Silent => f.write_str("silent for longer than the client timeout"),
            Ending::Kicked => f.write_str("kicked"),
            Ending::Failed(e) => write!(f, "{e}"),
        }
    }
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
    if let Some(remaining) = shared.ban_remaining(&Banned::of(&identity, remote.ip())) {
        let reason = format!("banned for {}s more", remaining.as_secs() + 1);
        shared.refuse(remote, reason, false);
        return;
    }
    match identity.key() {
        Some(key) => info!(protocol = %identity.protocol(), %key, "connected"),
        None => info!(protocol = %identity.protocol(), "connected"),
    }
    shared
        .events
        .publish(EventKind::Connected, remote, None, identity.protocol().as_str());
    session(
        shared,
        admitted,
        remote,
        permit,
        handshake_deadline,
        shutdown,
    )
    .await;
}

/// An admitted connection: address requests, keepalives and packets until
/// it ends.
async fn session(
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
    } = admitted;
    let (queue, queue_rx) = mpsc::channel(shared.config.queue_len);
    let mut writer = tokio::spawn(write_frames(writer, queue_rx));
    let mut reader = FrameReader::new(reader, Decoder::new(shared.config.max_frame));
    let mut peer = Peer {
        id: shared.registry.next_id(),
        remote,
        address: None,
        queue,
        stats: Arc::default(),
        connected_since: SystemTime::now(),
        kick: CancellationToken::new(),
        identity,
        permit: Some(permit),
    };

    // One timer for the connection, not one per frame: it fires at the
    // deadline it was last set to, and is moved on if a frame came since.
    let mut last_frame = Instant::now();
    let idle = tokio::time::sleep_until(handshake_deadline);
    tokio::pin!(idle);
    let ending = loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break Ending::Shutdown,
            _ = peer.kick.cancelled() => break Ending::Kicked,
            () = &mut idle => {
                let deadline = match peer.address {
                    None => handshake_deadline,
                    Some(_) => last_frame + shared.config.client_timeout,
                };
                if Instant::now() >= deadline {
                    break match peer.address {
                        None => Ending::HandshakeTimeout,
                        Some(_) => Ending::Silent,
                    };
                }
                idle.as_mut().reset(deadline);
                continue;
            }
            read = reader.read_frame() => match read {
                Ok(None) => break Ending::ClosedByPeer,
                Err(e) => break Ending::Failed(e),
                Ok(Some(frame)) => frame,
            },
        };
        last_frame = Instant::now();
        peer.stats.seen();
        let was_granted = peer.address.is_some();
        if let Err(ending) = peer.on_frame(&shared, frame) {
            break ending;
        }
        if !was_granted && peer.address.is_some() {
            // From now on silence counts, not the handshake deadline.
            idle.as_mut()
                .reset(last_frame + shared.config.client_timeout);
        }
    };

    if let Some(address) = peer.address {
        shared.registry.remove(address, peer.id);
    }
    let peers = shared.registry.len();
    let kind = match ending {
        Ending::Refused(_) => EventKind::Refused,
        _ => EventKind::Disconnected,
    };
    shared
        .events
        .publish(kind, remote, peer.address, ending.to_string());
    match &ending {
        Ending::Failed(ReadError::Protocol(_)) => warn!(reason = %ending, peers, "disconnected"),
        _ => info!(reason = %ending, peers, "disconnected"),
    }
    // Let the writer flush what is queued (e.g. a last keepalive echo), but a
    // refused or misbehaving client gets its connection closed right away.
    drop(peer);
    let flush = matches!(ending, Ending::ClosedByPeer | Ending::Shutdown);
    if !flush || timeout(FLUSH_GRACE, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// The state of one connection.
struct Peer {
    id: u64,
    remote: SocketAddr,
    address: Option<Ipv4Addr>,
    queue: mpsc::Sender<Bytes>,
    stats: Arc<PeerStats>,
    connected_since: SystemTime,
    kick: CancellationToken,
    identity: Identity,
    /// Held until an address is granted (max_unauthenticated).
    permit: Option<OwnedSemaphorePermit>,
}

impl Peer {
    /// Acts on one frame from the client; `Err` ends the connection.
    fn on_frame(&mut self, shared: &Shared, frame: Frame) -> Result<(), Ending> {
        match frame {
            Frame::Control(control) => {
                let request = control.as_request().map_err(|e| Ending::Failed(e.into()))?;
                self.on_request(shared, request)
            }
            Frame::Packet(packet) => {
                self.on_packet(shared, packet);
                Ok(())
            }
        }
    }

    fn on_request(&mut self, shared: &Shared, request: Request) -> Result<(), Ending> {
        match (request, self.address) {
            (Request::Keepalive, _) => {
                self.send(Control::KEEPALIVE);
                Ok(())
            }
            // A repeated request is answered with the address already held.
            (_, Some(held)) => {
                self.send(Control::grant(held, Some(shared.registry.netmask())));
                Ok(())
            }
            (request, None) => {
                let link = PeerLink {
                    id: self.id,
                    remote: self.remote,
                    connected_since: self.connected_since,
                    queue: self.queue.clone(),
                    stats: self.stats.clone(),
                    kick: self.kick.clone(),
                    identity: self.identity.clone(),
                };
                match shared.registry.admit(request, link) {
                    Ok(address) => {
                        self.address = Some(address);
                        self.permit = None;
                        Span::current().record("addr", tracing::field::display(address));
                        info!(?request, peers = shared.registry.len(), "granted {address}");
                        shared.events.publish(
                            EventKind::Granted,
                            self.remote,
                            Some(address),
                            format!("{request:?}"),
                        );
                        Ok(())
                    }
                    Err(refusal) => Err(Ending::Refused(format!("{request:?}: {refusal}"))),
                }
            }
        }
    }

    fn on_packet(&self, shared: &Shared, packet: Bytes) {
        self.stats.count_rx(packet.len());
        let Some(address) = self.address else {
            self.stats
                .dropped_unassigned
                .fetch_add(1, Ordering::Relaxed);
            debug!("dropped a packet sent before any address was granted");
            return;
        };
        let destination = match ipv4_addresses(&packet) {
            Some((source, destination)) if source == address => destination,
            Some((source, _)) => {
                self.stats.dropped_spoofed.fetch_add(1, Ordering::Relaxed);
                debug!(%source, "dropped a packet with a spoofed source");
                return;
            }
            None => {
                self.stats.dropped_spoofed.fetch_add(1, Ordering::Relaxed);
                debug!("dropped a non-IPv4 packet: no IPv6 address is assigned");
                return;
            }
        };
        if let Delivery::NoPeer(packet) = shared.registry.deliver(destination, packet) {
            if shared.tun.try_send(&packet).is_err() {
                shared.dropped_to_tun.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queues a control message to this client; dropped if the queue is full.
    fn send(&self, control: Control) {
        if self
            .queue
            .try_send(Bytes::copy_from_slice(&control.encode()))
            .is_err()
        {
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }
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
            shared.registry.deliver(destination, packet);
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
            peer_count: self.registry.len() as u32,
            free_addresses: self.registry.free_count(),
            dropped_to_tun: self.dropped_to_tun.load(Ordering::Relaxed),
            ..Default::default()
        }
    }

    fn peers(&self) -> Vec<PeerInfo> {
        self.registry.peers()
    }

    fn peer(&self, address: Ipv4Addr) -> Option<PeerInfo> {
        self.registry.peer(address)
    }

    fn kick(
        &self,
        address: Ipv4Addr,
        ban: Option<Duration>,
        by: &str,
    ) -> Result<PeerInfo, KickError> {
        let peer = self
            .registry
            .kick(address)
            .ok_or(KickError::NoSuchPeer(address))?;
        let mut reason = format!("kicked by {by}");
        if let Some(ban) = ban {
            let until = SystemTime::now() + ban;
            let who = Banned::of(&peer.identity, peer.remote.ip());
            let mut bans = self.bans.lock().unwrap_or_else(|e| e.into_inner());
            bans.insert(who, until);
            reason.push_str(&format!(", banned for {}", humantime::format_duration(ban)));
        }
        info!(remote = %peer.remote, addr = %address, "{reason}");
        self.events
            .publish(EventKind::Kicked, peer.remote, Some(address), reason);
        Ok(peer)
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }
}
