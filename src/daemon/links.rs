//! Server-to-server links of a cluster: a packet for an address that
//! another server's client holds (etcd says which: [`Cluster::holder`]) goes
//! to that server over a TLS 1.3 link, both ends authenticated by the keys
//! the servers published in etcd, and is delivered to its client there.
//!
//! Each server dials its own link to another on demand, the first time it
//! has a packet for it, and sends over it only; what arrives on a link it
//! accepted is delivered to its own clients, never sent on (so a packet
//! crosses at most one link). A pair that sends both ways so has two TCP
//! connections, one per direction. A link has the framing of a client
//! connection (whole IP packets, cut by their own headers), its bounded
//! queue counted in the memory budget, and its drop counters.
//!
//! Receive path: `accept` (admission limits, TLS with the keys pinned in
//! `[[cluster.member]]`, never keys from etcd, and only from the IP address
//! the member with that key advertises in its signed `members/` record) ->
//! `receive` (frames; each
//! packet's source must be an address the sending member holds a signed
//! lease for, or in the routes of a client it holds one for) ->
//! [`LinkDelivery::deliver`]. Send path: [`Links::forward`] -> the link's
//! queue -> `write_frames` on the dialed connection.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::admission::{Slots, Source};
use crate::budget::MemoryBudget;
use crate::cluster::membership::Member;
use crate::cluster::Cluster;
use crate::connection::{self, write_frames, FrameReader, QueueTx};
use crate::keys::{NodeKey, PublicKey};
use crate::limits::{MAX_LINK_PENDING, MAX_LINK_PENDING_PER_SOURCE};
use crate::tls::{self, AllowedKeys, TlsError};
use crate::wire::{ip_addresses, Decoder, Frame, ReadError};

/// How long dialing a link (TCP and TLS) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// After a failed dial, packets for that server are dropped this long
/// before it is dialed again.
const REDIAL_AFTER: Duration = Duration::from_secs(1);

/// Why a link ended (logged with the member or the remote address).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("not a pinned member")]
    NotPinned,
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("dial failed: {0}")]
    Dial(std::io::Error),
    #[error("dial timed out")]
    DialTimeout,
    #[error("write failed: {0}")]
    Write(std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("no pinned member's key")]
    NoMemberKey,
    #[error(
        "member {node}'s key from {remote}, not from the address it advertises ({advertised})"
    )]
    NotAdvertised {
        node: String,
        remote: IpAddr,
        /// None: no signed record of the member seen yet.
        advertised: Advertised,
    },
    #[error("a frame that is not a packet")]
    NotAPacket,
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// The address a member advertises, as a refused link's log line shows it.
#[derive(Debug)]
pub struct Advertised(Option<IpAddr>);

impl std::fmt::Display for Advertised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => write!(f, "{ip}"),
            None => f.write_str("none seen in etcd yet"),
        }
    }
}

/// The limits of a link: those of a client connection (the server's
/// `queue_len`, `queue_bytes`, `max_frame`, `frame_timeout`).
#[derive(Debug, Clone, Copy)]
pub struct LinkLimits {
    pub queue_len: usize,
    pub queue_bytes: usize,
    pub max_frame: usize,
    pub frame_timeout: Duration,
    /// How long an incoming link has for its TLS handshake (the server's
    /// `handshake_timeout`).
    pub handshake_timeout: Duration,
}

/// One link this server dialed, as `svpnctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub node: String,
    pub remote: SocketAddr,
    pub up: bool,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub dropped_queue_full: u64,
}

struct Link {
    remote: SocketAddr,
    queue: QueueTx,
    up: AtomicBool,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    dropped_queue_full: AtomicU64,
    /// Set when the connection ends: the next packet dials again.
    closed: CancellationToken,
}

/// This server's links to the others.
pub struct Links {
    cluster: Arc<Cluster>,
    key: Arc<NodeKey>,
    /// The other members by their pinned keys: the only keys accepted on
    /// incoming links.
    members: HashMap<PublicKey, String>,
    acceptor: TlsAcceptor,
    /// Incoming links not yet authenticated: at most [`MAX_LINK_PENDING`]
    /// at once, [`MAX_LINK_PENDING_PER_SOURCE`] from one address.
    pending: Arc<Semaphore>,
    pending_by_source: Arc<Slots<Source>>,
    /// Incoming links refused by those limits, or with a member's key
    /// from another address than the one it advertises.
    pub refused_admission: AtomicU64,
    /// The members whose key came from an address they do not advertise
    /// (logged the first time only; at most one entry per pinned member).
    refused_from: Mutex<HashSet<String>>,
    /// Packets that arrived on a link from a source the sending member
    /// holds no lease (nor route) for.
    pub dropped_spoofed: AtomicU64,
    dialed: Mutex<HashMap<String, Arc<Link>>>,
    /// When dialing each server last failed.
    failed: Mutex<HashMap<String, Instant>>,
    limits: LinkLimits,
    budget: Arc<MemoryBudget>,
    /// Packets that arrived on a link for an address no client here holds.
    pub dropped_no_peer: AtomicU64,
    /// Packets for another server dropped while its link could not be dialed.
    pub dropped_link_down: AtomicU64,
    shutdown: CancellationToken,
}

impl Links {
    pub fn new(
        cluster: Arc<Cluster>,
        key: Arc<NodeKey>,
        limits: LinkLimits,
        budget: Arc<MemoryBudget>,
        shutdown: CancellationToken,
    ) -> Result<Links, TlsError> {
        let own = key.public();
        let members: HashMap<PublicKey, String> = cluster
            .pinned()
            .iter()
            .filter(|(_, key)| **key != own)
            .map(|(node, key)| (*key, node.clone()))
            .collect();
        let allowed = AllowedKeys::new(members.keys().copied().collect());
        let acceptor = TlsAcceptor::from(tls::server_config(&key, allowed)?);
        Ok(Links {
            cluster,
            key,
            members,
            acceptor,
            pending: Arc::new(Semaphore::new(MAX_LINK_PENDING)),
            pending_by_source: Slots::new(MAX_LINK_PENDING_PER_SOURCE),
            refused_admission: AtomicU64::new(0),
            refused_from: Mutex::new(HashSet::new()),
            dropped_spoofed: AtomicU64::new(0),
            dialed: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            limits,
            budget,
            dropped_no_peer: AtomicU64::new(0),
            dropped_link_down: AtomicU64::new(0),
            shutdown,
        })
    }

    /// Whether a client of another server holds `destination`.
    pub fn held_elsewhere(&self, destination: IpAddr) -> bool {
        self.cluster.holder(destination).is_some()
    }

    /// Sends `packet` to the server whose client holds `destination`, if
    /// another server's does; else hands it back.
    pub fn forward(self: &Arc<Self>, destination: IpAddr, packet: Bytes) -> Option<Bytes> {
        let Some(member) = self.cluster.holder(destination) else {
            return Some(packet);
        };
        self.send(&member, [packet]);
        None
    }

    /// Sends `packets` (the segments of one super-packet, say) to the
    /// server whose client holds `destination`, finding it and its link
    /// once for all of them; false if no other server's client holds it.
    pub fn forward_all(
        self: &Arc<Self>,
        destination: IpAddr,
        packets: impl IntoIterator<Item = Bytes>,
    ) -> bool {
        let Some(member) = self.cluster.holder(destination) else {
            return false;
        };
        self.send(&member, packets);
        true
    }

    /// Queues `packets` on the link to `member` (each counted as sent, or
    /// as dropped: the link down or its queue full).
    fn send(self: &Arc<Self>, member: &Member, packets: impl IntoIterator<Item = Bytes>) {
        let Some(link) = self.link(member) else {
            let dropped = packets.into_iter().count() as u64;
            self.dropped_link_down.fetch_add(dropped, Ordering::Relaxed);
            return;
        };
        for packet in packets {
            let len = packet.len();
            match link.queue.try_push(packet) {
                Ok(()) => {
                    link.tx_packets.fetch_add(1, Ordering::Relaxed);
                    link.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    link.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The link to `member`, dialed now if there is none (None while a
    /// recent dial has failed).
    fn link(self: &Arc<Self>, member: &Member) -> Option<Arc<Link>> {
        let mut dialed = self.dialed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(link) = dialed.get(&member.node) {
            if !link.closed.is_cancelled() && link.remote == member.advertise {
                return Some(link.clone());
            }
        }
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed
            .get(&member.node)
            .is_some_and(|at| at.elapsed() < REDIAL_AFTER)
        {
            return None;
        }
        drop(failed);
        let (queue, queue_rx) = connection::queue(
            self.limits.queue_len,
            self.limits.queue_bytes,
            Some(self.budget.clone()),
        );
        let link = Arc::new(Link {
            remote: member.advertise,
            queue,
            up: AtomicBool::new(false),
            tx_packets: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
            closed: CancellationToken::new(),
        });
        dialed.insert(member.node.clone(), link.clone());
        let links = self.clone();
        let member = member.clone();
        let for_task = link.clone();
        tokio::spawn(async move {
            let why = links.run_link(&member, &for_task, queue_rx).await;
            for_task.closed.cancel();
            for_task.up.store(false, Ordering::Relaxed);
            if let Err(why) = why {
                warn!(node = %member.node, remote = %member.advertise, "cluster link down: {why}");
                links
                    .failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(member.node.clone(), Instant::now());
            }
        });
        Some(link)
    }

    /// Dials `member` and writes what is queued until the link fails.
    async fn run_link(
        &self,
        member: &Member,
        link: &Link,
        queue: connection::QueueRx,
    ) -> Result<(), LinkError> {
        // The key this server's configuration pins for it, never one read
        // from etcd.
        let key = *self
            .cluster
            .pinned()
            .get(&member.node)
            .ok_or(LinkError::NotPinned)?;
        let config = tls::client_config(&self.key, key)?;
        let from = self.cluster.config().advertise.ip();
        let dial = async {
            let stream = dial_from(from, member.advertise).await?;
            connection::tune_tcp(&stream);
            TlsConnector::from(config)
                .connect(tls::server_name(), stream)
                .await
        };
        let stream = match timeout(DIAL_TIMEOUT, dial).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(LinkError::Dial(e)),
            Err(_) => return Err(LinkError::DialTimeout),
        };
        link.up.store(true, Ordering::Relaxed);
        info!(node = %member.node, remote = %member.advertise, "cluster link up");
        let (_reader, writer) = tokio::io::split(stream);
        tokio::select! {
            _ = self.shutdown.cancelled() => Ok(()),
            written = write_frames(writer, queue) => written.map_err(LinkError::Write),
        }
    }

    /// Accepts links from the other servers on `listener` and delivers what
    /// arrives to this server's clients, until shutdown.
    pub async fn accept(self: Arc<Self>, listener: TcpListener, peers: Arc<dyn LinkDelivery>) {
        loop {
            let (stream, remote) = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "cluster link accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Admission: a place while unauthenticated, or closed at once.
            let place = self.pending.clone().try_acquire_owned().ok();
            let slot = self.pending_by_source.try_acquire(remote.ip());
            let (Some(place), Some(slot)) = (place, slot) else {
                let refused = self.refused_admission.fetch_add(1, Ordering::Relaxed);
                // The first refusal, then one line per thousand.
                if refused % 1000 == 0 {
                    warn!(%remote, refused = refused + 1, "cluster link refused: too many unauthenticated link connections");
                }
                continue;
            };
            let links = self.clone();
            let peers = peers.clone();
            tokio::spawn(async move {
                match links.receive(stream, remote, peers, (place, slot)).await {
                    Ok(()) => debug!(%remote, "cluster link closed"),
                    // Logged (the first time) and counted where refused.
                    Err(why @ LinkError::NotAdvertised { .. }) => {
                        debug!(%remote, "cluster link closed: {why}")
                    }
                    Err(why) => warn!(%remote, "cluster link closed: {why}"),
                }
            });
        }
    }

    async fn receive<P>(
        &self,
        stream: TcpStream,
        remote: SocketAddr,
        peers: Arc<dyn LinkDelivery>,
        pending: P,
    ) -> Result<(), LinkError> {
        connection::tune_tcp(&stream);
        let handshake = self.acceptor.accept(stream);
        let stream = match timeout(self.limits.handshake_timeout, handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(LinkError::Handshake(e)),
            Err(_) => return Err(LinkError::HandshakeTimeout),
        };
        drop(pending);
        // Only pinned members pass the handshake: this names which one.
        let node = tls::peer_key(stream.get_ref().1)
            .and_then(|key| self.members.get(&key))
            .ok_or(LinkError::NoMemberKey)?
            .clone();
        self.check_advertised(&node, remote)?;
        debug!(%remote, %node, "cluster link accepted");
        let (reader, _writer) = tokio::io::split(stream);
        // Frames count against the memory budget and must arrive in time, as
        // a client's do.
        let mut reader = FrameReader::new(reader, Decoder::new(self.limits.max_frame))
            .with_limits(self.budget.clone(), self.limits.frame_timeout);
        loop {
            let frame = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                frame = reader.read_frame() => frame,
            };
            match frame {
                Ok(Some(Frame::Packet(packet))) => {
                    let Some((source, destination)) = ip_addresses(&packet) else {
                        continue;
                    };
                    if !self.sent_by(&node, source, peers.as_ref()) {
                        self.dropped_spoofed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if !peers.deliver(destination, packet) {
                        self.dropped_no_peer.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Some(_)) => return Err(LinkError::NotAPacket),
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether member `node` may send a packet from `source`: one of its
    /// clients holds that address (a signed lease), or `source` is in the
    /// routes of a client whose key holds an address on it.
    fn sent_by(&self, node: &str, source: IpAddr, peers: &dyn LinkDelivery) -> bool {
        self.cluster.holds(node, source)
            || peers
                .route_owner(source)
                .is_some_and(|key| self.cluster.holds_for(node, &key))
    }

    /// Refuses (counted; logged the first time for each member) a link of
    /// member `node` that does not come from the IP address its signed
    /// `members/` record advertises: its key alone, copied to another
    /// host, does not make a link.
    fn check_advertised(&self, node: &str, remote: SocketAddr) -> Result<(), LinkError> {
        let remote = remote.ip().to_canonical();
        let advertised = self
            .cluster
            .member(node)
            .map(|m| m.advertise.ip().to_canonical());
        if advertised == Some(remote) {
            return Ok(());
        }
        let refused = self.refused_admission.fetch_add(1, Ordering::Relaxed) + 1;
        let why = LinkError::NotAdvertised {
            node: node.to_string(),
            remote,
            advertised: Advertised(advertised),
        };
        let first = self
            .refused_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_string());
        match first {
            true => warn!(%node, %remote, refused, "cluster link refused: {why}"),
            false => debug!(%node, %remote, refused, "cluster link refused: {why}"),
        }
        Err(why)
    }

    /// The links this server dialed.
    pub fn links(&self) -> Vec<LinkInfo> {
        let dialed = self.dialed.lock().unwrap_or_else(|e| e.into_inner());
        let mut links: Vec<LinkInfo> = dialed
            .iter()
            .map(|(node, link)| LinkInfo {
                node: node.clone(),
                remote: link.remote,
                up: link.up.load(Ordering::Relaxed) && !link.closed.is_cancelled(),
                tx_packets: link.tx_packets.load(Ordering::Relaxed),
                tx_bytes: link.tx_bytes.load(Ordering::Relaxed),
                dropped_queue_full: link.dropped_queue_full.load(Ordering::Relaxed),
            })
            .collect();
        links.sort_by(|a, b| a.node.cmp(&b.node));
        links
    }
}

/// A TCP connection to `to` from this server's advertised address `from`,
/// so that the other end, which admits a member only from the address it
/// advertises, sees that one whatever the routes would choose. An address
/// that is not this host's (advertised through NAT or a port forward) is
/// dialed from whichever address the routes choose.
async fn dial_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match to {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    let bindable = match (from.to_canonical(), to) {
        (IpAddr::V4(ip), SocketAddr::V4(_)) => Some(IpAddr::V4(ip)),
        (IpAddr::V6(ip), SocketAddr::V6(_)) => Some(IpAddr::V6(ip)),
        _ => None,
    };
    if let Some(ip) = bindable.filter(|ip| !ip.is_unspecified()) {
        match socket.bind(SocketAddr::new(ip, 0)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                debug!(%ip, "the advertised address is not this host's: the link is dialed from the one the routes choose");
            }
            Err(e) => return Err(e),
        }
    }
    socket.connect(to).await
}

/// Where packets that arrive on a link go: to the server's own clients.
pub trait LinkDelivery: Send + Sync {
    /// Queues `packet` for the client here that holds `destination`
    /// (shaped for it as any packet is); false if none does.
    fn deliver(&self, destination: IpAddr, packet: Bytes) -> bool;
    /// The key of the client whose routes hold `source` (the networks
    /// behind it), if one's do.
    fn route_owner(&self, source: IpAddr) -> Option<PublicKey>;
}
