//! The server role: the I/O loops around the session rules
//! ([`crate::session::server`]) and the peer table ([`super::peers`]).
//!
//! Receive path, a client's packet on its way out, stage by stage:
//!   1. `run`: accept the TCP connection, which holds one of its source's
//!      `max_unauthenticated_per_source` slots and either one of
//!      `max_unauthenticated` permits and one of its network's
//!      `max_unauthenticated_per_network` slots, or (a source granted
//!      recently) a place of `unauthenticated_reserve`, until it is granted
//!      ([`super::admission`]); a granted original-protocol session holds
//!      one of its source's `legacy_max_per_source` slots;
//!   2. `serve`: the gate (TLS or the original protocol): its first bytes
//!      within `first_bytes_timeout`, the rest within the handshake
//!      deadline; then the ban check and the key's takeover back-off.
//!      Refusals up to here are logged as a summary per interval;
//!   3. `connection`: read a frame (`FrameReader`), hand it to the
//!      [`ServerSession`], and carry out its [`Action`]: reply, admit through
//!      the peer table (which queues the grant), drop, or forward;
//!   4. `forward`: to the client that holds the destination (its bounded
//!      queue), else into the server's tun (non-blocking; drops counted).
//!
//! Send path, a packet on its way to a client:
//!   1. `tun_reader`: a packet the host routed into the tun, or stage 4 above;
//!   2. `send_to`: the queue of the client that holds the destination
//!      ([`PeerTable::holder`]), in the shape it takes (a super-packet
//!      whole or split, cut to `legacy_mtu` for an original-protocol
//!      client that did not offer the extension, or an ICMP error back);
//!      a full queue drops it (counted);
//!   3. `write_frames`: the client's writer task, batching what is queued
//!      into vectored writes.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use ipnet::{IpNet, Ipv6Net};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument, Span};

use super::activation::{self, Listeners};
use super::admission::{
    Admission, Limits, Pending, RefusalReason, RefusalSummary, SUMMARY_INTERVAL,
};
use super::control::{
    self, AdminError, AdminRequest, InviteRequest, KickError, Node, ReloadReport,
};
use super::events::{EventKind, Events, PeerEvent};
use super::gate::{
    merge_peers, Admitted, AllowedPeer, Gate, Identity, Joining, PeerSource, Rejection,
};
use super::helper::{Helper, HelperError};
use super::links::{LinkDelivery, LinkLimits, Links};
use super::metrics::{self, DropKind, Metrics, Outcome, SuperKind};
use super::notify;
use super::peers::{Banned, Granted, Peer, PeerInfo, PeerTable};
use super::portshare;
use super::{ControlOptions, DaemonError};
use crate::budget::MemoryBudget;
use crate::cluster::invites::InviteStoreError;
use crate::cluster::{Cluster, ClusterHooks};
use crate::config::{
    check_peers, ClientToClient, ConfigError, PeerSection, ServerConfig, ServerSource,
};
use crate::connection::{self, write_frames, FrameReader, ReadError};
use crate::daemon::tun::{AsyncTun, TunHealth, TunOp, TunQueues};
use crate::egress::{egress, from_tun_read, Egress, Outbound, PeerLink};
use crate::join::{
    JoinAccepted, JoinMessage, JoinRefusal, JoinRequest, RandomSecret, Secret, Token,
};
use crate::keys::{NodeKey, PublicKey};
use crate::limits::JOIN_REQUEST_TIMEOUT;
use crate::limits::{MAX_FRAME, MAX_PACKET};
use crate::offload::VNET_HDR_LEN;
use crate::pool::server_address;
use crate::pool6::server_address6;
use crate::privsep::protocol::Forwarding;
use crate::proto;
use crate::session::server::{pushed_params, Action, DropReason, Ending, Offer, ServerSession};
use crate::session::Protocol;
use crate::state::{Ban, Invite, InviteState, Lease, SqliteStore, StateStore, StoreError};
use crate::wire::{ip_addresses, Control, Decoder, Features, Frame, CONTROL_LEN};
use crate::wire::{IPV6_HEADER_LEN, SUPER_HEADER_LEN};
use crate::workers::WorkerPool;

/// How long a closing connection may take to flush what is queued for it.
const FLUSH_GRACE: Duration = Duration::from_secs(1);
/// While every `max_unauthenticated` place is held, how long the next
/// connection waits in the kernel's listen queue for one to free before it
/// is accepted and refused: a reconnect burst is served in turn instead of
/// being sent into its backoff; a flood costs each newcomer this wait once,
/// then newcomers are refused at once until a place frees.
const PLACE_WAIT: Duration = Duration::from_millis(500);

/// What every connection task, and the control service, shares.
struct Shared {
    /// The settings started with: those that need a restart to change.
    config: ServerConfig,
    /// The settings in force: peers and routes change on reload.
    current: RwLock<Arc<ServerConfig>>,
    /// Peers added at run time (kept in `store`).
    live: Mutex<Vec<PeerSection>>,
    store: Box<dyn StateStore>,
    /// Where the settings came from, read again on reload.
    source: Option<ServerSource>,
    /// Changes to the running server, carried out one at a time by `run`.
    admin: mpsc::Sender<AdminRequest>,
    metrics: Metrics,
    peers: PeerTable,
    /// Packets for destinations no client holds go to the server's tun,
    /// written by the connection task that read them, on its worker's queue.
    tun: Arc<TunQueues>,
    events: Events,
    started: SystemTime,
    tun_name: String,
    /// Where it accepts clients: `listen`, or the sockets it inherited.
    listening: String,
    gate: Gate,
    /// The limits on connections that have not been granted an address yet.
    admission: Admission,
    /// Counts the refusals before authentication, for summary lines.
    refusals: std::sync::Mutex<RefusalSummary>,
    /// Whether the tun still works.
    tun_health: TunHealth,
    /// What the helper changed on the host beyond the tun.
    host_changes: Vec<String>,
    /// The cluster this server belongs to, if any (see [`super::cluster`]).
    cluster: Option<Arc<Cluster>>,
    /// Its links to the other servers of the cluster.
    links: Option<Arc<Links>>,
    /// This server's public key, if it serves TLS (for `svpnctl peer new`).
    public_key: Option<PublicKey>,
}

impl Shared {
    /// Logs and publishes a connection refused before it was authenticated
    /// (or, for a ban, right after): the first of each reason after a quiet
    /// spell in full, the others in a summary line per interval.
    fn refuse(&self, remote: SocketAddr, kind: RefusalReason, reason: &str) {
        let emit = self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(kind, remote.ip(), std::time::Instant::now());
        if let Some(summary) = emit.summary {
            warn!(parent: None, "{summary}");
        }
        match emit.full_line {
            true => warn!(%reason, %kind, "refused"),
            false => debug!(%reason, %kind, "refused"),
        }
        self.events
            .publish(EventKind::Refused, remote, None, reason);
    }

    /// Logs the summary of refusals if one is due.
    fn flush_refusals(&self) {
        let due = self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush(std::time::Instant::now());
        if let Some(summary) = due {
            warn!("{summary}");
        }
    }
    /// The settings in force.
    fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The keys a client of this server pins: `own` first, then every
    /// other member of its cluster (a client may fail over to any).
    fn server_keys(&self, own: PublicKey) -> Vec<PublicKey> {
        let mut keys = vec![own];
        if let Some(cluster) = &self.cluster {
            for key in cluster.pinned().values() {
                if !keys.contains(key) {
                    keys.push(*key);
                }
            }
        }
        keys
    }

    /// What extension clients are offered now besides their address and
    /// routes (a reload changes it).
    fn offer(&self) -> Offer {
        let current = self.current();
        Offer {
            dns: current.dns.clone(),
            dns_search: current.dns_search.clone(),
            gateway: current.gateway,
        }
    }

    /// Every network the server serves now: its own routes, then those
    /// behind each allowed peer.
    fn served_routes(&self) -> Vec<IpNet> {
        let own = self.current().routes.clone();
        let peers = self.gate.peers();
        own.into_iter()
            .chain(peers.iter().flat_map(|p| p.section.routes.iter().copied()))
            .collect()
    }

    /// Keeps `lease` in the store (the table already holds it); in a
    /// cluster, etcd holds the leases instead.
    fn keep_lease(&self, lease: &Lease) {
        if self.cluster.is_some() {
            return;
        }
        if let Err(e) = self.store.put_lease(lease) {
            warn!(error = %e, address = %lease.address, "lease not kept across restarts");
        }
    }
}

impl metrics::PeerSource for Shared {
    fn table(&self) -> &PeerTable {
        &self.peers
    }

    fn tun_queue_reads(&self) -> Vec<u64> {
        self.tun.all().iter().map(|queue| queue.reads()).collect()
    }

    fn cluster_refusals(&self) -> Option<metrics::ClusterRefusals> {
        let cluster = self.cluster.as_ref()?;
        Some(super::cluster::refusals(cluster, self.links.as_deref()))
    }
}

/// The live peers that still fit beside the config's, in order; each one
/// that does not is skipped with a warning (it stays in the store until
/// `svpnctl peer remove`).
fn fitting_live(config: &ServerConfig, stored: Vec<PeerSection>) -> Vec<PeerSection> {
    let mut live: Vec<PeerSection> = Vec::new();
    for peer in stored {
        let mut candidate = live.clone();
        candidate.push(peer.clone());
        let sections = merge_peers(&config.peers, &candidate)
            .into_iter()
            .map(|p| p.section)
            .collect();
        match peers_fit(config, sections) {
            Ok(()) => live.push(peer),
            Err(e) => warn!(
                key = %peer.key,
                "a peer added live no longer fits beside the config and is not allowed: {e}"
            ),
        }
    }
    live
}

/// The networks behind `peers` (routed into the tun).
fn tun_routes(peers: &[AllowedPeer]) -> HashSet<IpNet> {
    peers
        .iter()
        .flat_map(|p| p.section.routes.iter().copied())
        .collect()
}

/// The IPv6 addresses fixed for `peers`' keys.
fn fixed6(peers: &[AllowedPeer]) -> HashMap<PublicKey, Ipv6Addr> {
    peers
        .iter()
        .filter_map(|p| Some((p.section.key, p.section.address6?)))
        .collect()
}

/// Runs the server until `shutdown` is cancelled; `helper` creates and
/// configures the tun; the control API is served on `control` if given;
/// TLS clients are served with `key` (loaded from `config.key`).
pub async fn run(
    config: ServerConfig,
    source: Option<ServerSource>,
    helper: &Helper,
    control: Option<ControlOptions>,
    key: Option<NodeKey>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    // Cancelled on shutdown, and when the tun fails.
    let shutdown = shutdown.child_token();
    // What was kept across restarts; a database that cannot be read or
    // written stops the start here, with one line.
    let store = SqliteStore::open_dir(&config.state_dir)?;
    let now = SystemTime::now();
    store.expire(now)?;
    let (mut leases, mut bans) = (store.leases(now)?, store.bans(now)?);
    let key = key.map(Arc::new);
    // In a cluster the address leases and bans are etcd's.
    let cluster = match (&config.cluster, &key) {
        (Some(_), None) => return Err(DaemonError::NoKey),
        (Some(cluster), Some(key)) => {
            let cluster = Cluster::join(
                cluster.clone(),
                config.network,
                config.network6,
                key.clone(),
            )
            .await?;
            leases.clear();
            bans = cluster.bans(now);
            Some(cluster)
        }
        (None, _) => None,
    };
    // In a cluster the peers added live are etcd's too.
    let live = match &cluster {
        Some(cluster) => fitting_live(&config, cluster.live_peers()),
        None => fitting_live(&config, store.peers()?),
    };
    info!(
        path = %store.path().display(),
        leases = leases.len(),
        bans = bans.len(),
        live_peers = live.len(),
        "state loaded"
    );
    let gate = Gate::new(&config, key.as_deref(), &live)?;
    let own_address = server_address(config.network);
    let tun = helper.open_tun().await?;
    helper.set_mtu(tun.index, config.mtu).await?;
    helper
        .set_ipv4(tun.index, own_address, config.network.prefix_len())
        .await?;
    helper.set_up(tun.index).await?;
    if let Some(network6) = config.network6 {
        // After the link is up: the kernel sets up IPv6 on a link when it
        // comes up.
        helper
            .set_ipv6(tun.index, server_address6(network6), network6.prefix_len())
            .await?;
    }
    // The networks behind clients are reached through the tun: the host
    // routes them here, and the peer table on to the client behind each.
    for route in config.peers.iter().flat_map(|p| p.routes.iter()) {
        helper.add_route(tun.index, *route).await?;
    }
    for route in live.iter().flat_map(|p| p.routes.iter()) {
        if let Err(e) = helper.add_route(tun.index, *route).await {
            warn!(%route, error = %e, "a live peer's network is not routed into the tun on this host");
        }
    }
    let host_changes = beyond_the_tun(&config, helper, tun.index, &tun.name).await?;
    let tun_index = tun.index;
    let tun_name = tun.name.clone();
    // More than one worker: a thread each, and each tun queue registered
    // with (and read on) its own worker's runtime.
    let pool = match config.workers {
        n if n > 1 => Some(WorkerPool::start(n)?),
        _ => None,
    };
    let tun = Arc::new(TunQueues::new(
        tun.fd,
        tun.more_queues,
        tun.offloads,
        pool.as_ref(),
    )?);

    // Inherited from systemd (socket activation), else bound here.
    let listener = match activation::inherited()? {
        Some(inherited) => inherited,
        None => Listeners::bound(listen(config.listen).map_err(|source| DaemonError::Bind {
            address: config.listen,
            source,
        })?),
    };
    let metrics_listener = match config.metrics {
        Some(address) => Some(
            metrics::bind(address)
                .await
                .map_err(|source| DaemonError::Metrics { address, source })?,
        ),
        None => None,
    };
    let fixed = gate
        .peers()
        .iter()
        .filter_map(|p| p.section.address)
        .collect::<Vec<_>>();
    let peers = PeerTable::new(
        config.network,
        fixed,
        MemoryBudget::new(config.memory_budget),
    )
    .with_ipv6(config.network6, fixed6(&gate.peers()));
    let lease_time = match &config.cluster {
        Some(cluster) => cluster.lease_ttl,
        None => config.lease_time,
    };
    peers.restore(leases, bans, lease_time);
    let tls_text = key
        .as_ref()
        .map_or("off".to_string(), |k| format!("key {}", k.public()));
    let public_key = key.as_deref().map(NodeKey::public);
    let (links, link_listener) = match (&cluster, key) {
        (Some(cluster), Some(key)) => {
            let advertise = cluster.config().advertise;
            let listener = listen(advertise).map_err(|source| DaemonError::Bind {
                address: advertise,
                source,
            })?;
            let limits = LinkLimits {
                queue_len: config.queue_len,
                queue_bytes: config.queue_bytes,
                max_frame: config.max_frame,
                frame_timeout: config.frame_timeout,
                handshake_timeout: config.handshake_timeout,
            };
            let links = Links::new(
                cluster.clone(),
                key,
                limits,
                peers.budget_handle(),
                shutdown.clone(),
            )?;
            (Some(Arc::new(links)), Some(listener))
        }
        _ => (None, None),
    };
    let (admin, mut admin_requests) = mpsc::channel(8);
    let shared = Arc::new(Shared {
        current: RwLock::new(Arc::new(config.clone())),
        live: Mutex::new(live),
        store: Box::new(store),
        source,
        admin,
        metrics: Metrics::default(),
        peers,
        tun: tun.clone(),
        events: Events::default(),
        started: SystemTime::now(),
        tun_name: tun_name.clone(),
        listening: listener.addresses(),
        gate,
        admission: Admission::new(Limits::from(&config)),
        refusals: std::sync::Mutex::new(RefusalSummary::new(SUMMARY_INTERVAL)),
        tun_health: TunHealth::default(),
        host_changes,
        cluster,
        links,
        public_key,
        config,
    });
    info!(
        listen = %listener,
        tun = %tun_name,
        address = %own_address,
        network = %shared.config.network,
        network6 = %shared.config.network6.map_or("none".to_string(), |n| n.to_string()),
        tls = %tls_text,
        tls_peers = shared.config.peers.len(),
        legacy = ?shared.config.legacy,
        max_unauthenticated = shared.config.max_unauthenticated,
        per_source = shared.config.max_unauthenticated_per_source,
        per_network = shared.config.max_unauthenticated_per_network,
        gateway = shared.config.gateway,
        workers = shared.config.workers,
        tun_queues = tun.all().len(),
        masquerade = shared.config.masquerade,
        "server ready"
    );

    let tasks = TaskTracker::new();
    if let Some(control) = control {
        let node: Arc<dyn Node> = shared.clone();
        tasks.spawn(control::serve(control, node, shutdown.clone()));
    }
    let status = shared.clone();
    tasks.spawn(notify::serve(
        move || notify::server_status(status.peers.len(), &status.listening),
        shutdown.clone(),
    ));
    for (index, queue) in tun.all().iter().enumerate() {
        let reader = tun_reader(queue.clone(), shared.clone(), shutdown.clone());
        match &pool {
            Some(pool) => drop(pool.handle(index).spawn(tasks.track_future(reader))),
            None => drop(tasks.spawn(reader)),
        }
    }
    if let Some(cluster) = shared.cluster.clone() {
        let hooks: Arc<dyn ClusterHooks> = shared.clone();
        tasks.spawn(cluster.maintain(hooks, shutdown.clone()));
    }
    if let (Some(links), Some(listener)) = (shared.links.clone(), link_listener) {
        let delivery: Arc<dyn LinkDelivery> = shared.clone();
        tasks.spawn(links.accept(listener, delivery));
    }
    let mut summaries = tokio::time::interval(Duration::from_secs(1));
    summaries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tun_failure = None;
    if let Some(listener) = metrics_listener {
        let registry = shared.metrics.registry(shared.clone());
        tasks.spawn(metrics::serve(listener, registry, shutdown.clone()));
    }
    // SIGHUP (systemctl reload) reloads; installed before the loop, so the
    // signal never ends the process.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| warn!(error = %e, "no SIGHUP handler: reload with svpnctl reload"))
        .ok();
    // How long the next connection may wait in the listen queue for a
    // place; after one wait in vain, none until a place frees.
    let mut wait = PLACE_WAIT;
    loop {
        let place = tokio::select! {
            _ = shutdown.cancelled() => break,
            place = shared.admission.place(wait) => place,
        };
        wait = match place {
            Some(_) => PLACE_WAIT,
            None => Duration::ZERO,
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            why = shared.tun_health.failed() => {
                tun_failure = Some(why);
                shutdown.cancel();
                break;
            }
            _ = summaries.tick() => shared.flush_refusals(),
            Some(request) = admin_requests.recv() => {
                administer(&shared, helper, tun_index, request).await;
            }
            Some(()) = async {
                match hangup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                info!("SIGHUP received: reloading");
                log_reload(&reload(&shared, helper, tun_index).await);
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    // An IPv4 client of a dual-stack `[::]` socket: as the
                    // IPv4 address it is (limits per source, bans, legacy_allow).
                    let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
                    let span = info_span!(
                        "peer",
                        %remote,
                        name = tracing::field::Empty,
                        addr = tracing::field::Empty
                    );
                    // A place may have freed since the wait ended.
                    let place = match place {
                        Some(place) => Some(place),
                        None => shared.admission.place(Duration::ZERO).await,
                    };
                    // Without a place, or with its network full, a source
                    // granted recently may still take one of the reserve.
                    let admitted = shared.admission.admit_placed(place, remote.ip(), std::time::Instant::now());
                    let pending = match admitted {
                        Ok(pending) => pending,
                        Err(kind) => {
                            span.in_scope(|| shared.refuse(remote, kind, kind.limit_text()));
                            continue;
                        }
                    };
                    match &pool {
                        // The connection moves to its worker: registered with
                        // that runtime, it is read and written there alone.
                        Some(pool) => {
                            let stream = match stream.into_std() {
                                Ok(stream) => stream,
                                Err(e) => {
                                    span.in_scope(|| warn!(error = %e, "dropped an accepted connection"));
                                    continue;
                                }
                            };
                            let (shared, shutdown) = (shared.clone(), shutdown.clone());
                            let serve = async move {
                                match TcpStream::from_std(stream) {
                                    Ok(stream) => serve(shared, stream, remote, pending, shutdown).await,
                                    Err(e) => warn!(error = %e, "dropped an accepted connection"),
                                }
                            };
                            pool.handle(pool.next()).spawn(tasks.track_future(serve.instrument(span)));
                        }
                        None => {
                            let serve = serve(shared.clone(), stream, remote, pending, shutdown.clone());
                            tasks.spawn(serve.instrument(span));
                        }
                    }
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
    // Stops the worker threads, now idle.
    drop(pool);
    shared.flush_refusals();
    if let Some(why) = tun_failure {
        return Err(DaemonError::TunFailed(why));
    }
    info!(tun = %tun_name, "server stopped");
    Ok(())
}

/// Connections the kernel may queue before they are accepted: bursts of
/// clients reconnecting at once (after a server restart, say) must not
/// overflow the default of 128 and wait a second for their SYN retry.
const LISTEN_BACKLOG: u32 = 4096;

/// The listening socket, with SO_REUSEADDR (a restart rebinds at once) and a
/// deep backlog. On `[::]` it serves both families (IPV6_V6ONLY off,
/// whatever net.ipv6.bindv6only says): IPv4 clients arrive as
/// IPv4-mapped addresses, which `run` turns back into IPv4 ones.
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(v6) => {
            let socket = TcpSocket::new_v6()?;
            if v6.ip().is_unspecified() {
                nix::sys::socket::setsockopt(
                    &socket,
                    nix::sys::socket::sockopt::Ipv6V6Only,
                    &false,
                )
                .map_err(std::io::Error::from)?;
            }
            socket
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// One client connection, from accept to close: through the gate, then a
/// session. `pending` counts it as unauthenticated until it is granted an
/// address.
async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    remote: SocketAddr,
    pending: Pending,
    shutdown: CancellationToken,
) {
    let start = Instant::now();
    let handshake_deadline = start + shared.config.handshake_timeout;
    let first_bytes_deadline = start + shared.config.first_bytes_timeout;
    crate::connection::tune_tcp(&stream);
    let admitted = tokio::select! {
        _ = shutdown.cancelled() => return,
        // Boxed, as the etcd calls below: the handshake's future (TLS) is
        // large and lives only until the grant.
        admitted = timeout_at(
            handshake_deadline,
            Box::pin(shared.gate.admit(stream, remote, first_bytes_deadline)),
        ) => admitted,
    };
    let admitted = match admitted {
        Ok(Ok(admitted)) => admitted,
        Ok(Err(Rejection::Closed)) => {
            debug!("closed before sending anything");
            return;
        }
        Ok(Err(Rejection::Join(joining))) => {
            // Still counted as unauthenticated (`pending`) until it is done.
            tokio::select! {
                _ = shutdown.cancelled() => {}
                () = Box::pin(join(&shared, joining, remote)) => {}
            }
            drop(pending);
            return;
        }
        Ok(Err(Rejection::Share(foreign))) => {
            if let Some(share) = &shared.config.port_share {
                portshare::serve(share, foreign, remote, pending, &shared.metrics, &shutdown).await;
            }
            return;
        }
        Ok(Err(rejection)) => {
            shared.refuse(remote, rejection.reason(), &rejection.to_string());
            return;
        }
        Err(_) => {
            let reason = "no handshake within the handshake timeout";
            shared.refuse(remote, RefusalReason::HandshakeTimeout, reason);
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
        shared.refuse(remote, RefusalReason::Banned, &reason);
        return;
    }
    if let Some(key) = identity.key() {
        let backoff = shared
            .peers
            .takeover_backoff(&key, std::time::Instant::now());
        if let Some(remaining) = backoff {
            let reason = format!(
                "its key took over its own session too often (is it used on two hosts at once?): \
                 refused for {}s more",
                remaining.as_secs() + 1
            );
            warn!(%key, %reason, "refused");
            shared
                .events
                .publish(EventKind::Refused, remote, None, reason);
            return;
        }
    }
    // An original-protocol session holds its source's slot for its whole
    // life: one host cannot take the whole pool.
    let _legacy = match identity {
        Identity::Original => match shared.admission.legacy(remote.ip()) {
            Ok(slot) => Some(slot),
            Err(kind) => {
                shared.refuse(remote, kind, kind.limit_text());
                return;
            }
        },
        Identity::Tls { .. } => None,
    };
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
        pending,
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
    pending: Pending,
    handshake_deadline: Instant,
    shutdown: CancellationToken,
) {
    let Admitted {
        reader,
        writer,
        identity,
        routes,
        client_to_client,
        extension,
    } = admitted;
    let config = &shared.config;
    let client_to_client = client_to_client.unwrap_or(config.client_to_client);
    let budget = shared.peers.budget_handle();
    let (queue, queue_rx) =
        connection::queue(config.queue_len, config.queue_bytes, Some(budget.clone()));
    let mut writer = tokio::spawn(write_frames(writer, queue_rx));
    // An extension client may send super-packets and its features.
    let decoder = match extension {
        true => Decoder::new(config.max_frame).with_extensions(),
        false => Decoder::new(config.max_frame),
    };
    // Before its grant an original-protocol client has proved nothing: it
    // may send its 20-byte request and nothing from the shared read budget.
    let before_grant = match identity.protocol() {
        Protocol::Original => Decoder::new(CONTROL_LEN),
        Protocol::Tls => decoder,
    };
    let mut reader =
        FrameReader::new(reader, before_grant).with_limits(budget, config.frame_timeout);
    let peer = shared.peers.new_peer(
        remote,
        identity,
        routes.clone(),
        queue,
        extension,
        SystemTime::now(),
    );
    let accepted = handshake_deadline - shared.config.handshake_timeout;
    let mut session = ServerSession::new(
        handshake_deadline.into_std(),
        shared.config.client_timeout,
        shared.peers.netmask(),
        routes,
    );
    if peer.accepts_offer() {
        session = session.marking_grants();
    }
    // Counts this connection as unauthenticated until it is granted.
    let mut pending = Some(pending);
    // The IPv6 address granted, released in the cluster when it leaves.
    let mut held6 = None;

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
        peer.stats.seen(SystemTime::now());
        match &frame {
            Frame::Packet(packet) => peer.stats.count_rx(packet.len()),
            Frame::Super(packet) => peer.stats.count_rx(packet.frame.len() - SUPER_HEADER_LEN),
            Frame::Control(_) | Frame::Extension(_) => {}
        }
        match session.on_frame(now, frame) {
            Action::None => {}
            Action::Reply(control) => send(&peer, control),
            Action::Admit(request) => match match &shared.cluster {
                // Boxed: an etcd call's future is large, and inline it would
                // make every connection's task that large for its whole life.
                Some(cluster) => {
                    Box::pin(super::cluster::admit(
                        cluster,
                        &shared.peers,
                        request,
                        &peer,
                    ))
                    .await
                }
                None => {
                    shared
                        .peers
                        .admit(request, &peer, std::time::Instant::now(), SystemTime::now())
                }
            } {
                Ok(Granted {
                    address,
                    address6,
                    replaced,
                }) => {
                    session.granted(now, address);
                    session.granted6(address6);
                    held6 = address6;
                    if let Some(pending) = pending.take() {
                        pending.granted(peer.identity.protocol(), now);
                    }
                    reader.set_decoder(decoder);
                    shared.metrics.granted(accepted.elapsed().as_secs_f64());
                    if let Some(lease) = peer.identity.key().and_then(|k| shared.peers.lease_of(&k))
                    {
                        shared.keep_lease(&lease);
                    }
                    Span::current().record("addr", tracing::field::display(address));
                    if let (Some(old), Some(key)) = (replaced, peer.identity.key()) {
                        warn!(
                            %key,
                            old_remote = %old.remote,
                            new_remote = %remote,
                            old_address = %old.address,
                            "key connected from two places: the newer connection takes over, the older is closed"
                        );
                    }
                    match address6 {
                        Some(address6) => info!(
                            ?request,
                            peers = shared.peers.len(),
                            "granted {address} and {address6}"
                        ),
                        None => info!(?request, peers = shared.peers.len(), "granted {address}"),
                    }
                    shared.events.publish(
                        EventKind::Granted,
                        remote,
                        Some(address),
                        format!("{request:?}"),
                    );
                    if extension {
                        // Behind the grant: a plaintext client takes
                        // extension frames only once it has the grant's marker.
                        announce_features(config, &peer);
                    }
                    if peer.takes_params() {
                        push_params(&shared, &peer, address, address6);
                    }
                    // From now on silence counts, not the handshake deadline.
                    idle.as_mut().reset(Instant::from_std(session.deadline()));
                }
                Err(refusal) => break Ending::Refused(request, refusal),
            },
            Action::Forward {
                destination,
                packet,
            } => forward_from(
                &shared,
                &peer,
                client_to_client,
                destination,
                Outbound::Packet(packet),
            ),
            Action::ForwardSuper {
                destination,
                packet,
            } => {
                shared.metrics.supers.count(SuperKind::FromClient);
                forward_from(
                    &shared,
                    &peer,
                    client_to_client,
                    destination,
                    Outbound::Super(packet),
                )
            }
            Action::Announced(features) => {
                let takes = features.contains(Features::SUPER_PACKETS);
                debug!(super_packets = takes, "features announced");
                peer.super_packets.store(takes, Ordering::Relaxed);
            }
            Action::Drop(reason) => count_drop(&shared, &peer, reason),
            Action::Close(ending) => break ending,
        }
    };
    drop(pending);

    let address = session.address();
    if let Some(lease) = address.and_then(|a| shared.peers.remove(a, peer.id, SystemTime::now())) {
        shared.keep_lease(&lease);
    }
    if let (Some(cluster), Some(address)) = (&shared.cluster, address) {
        Box::pin(super::cluster::released(
            cluster,
            &shared.peers,
            &peer,
            IpAddr::V4(address),
            held6,
        ))
        .await;
    }
    shared
        .metrics
        .ended(Outcome::of(&ending, address.is_some()));
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

/// A gateway's setup beyond the tun: the NAT table (`masquerade`) and the
/// forwarding check. Returns what was changed on the host.
async fn beyond_the_tun(
    config: &ServerConfig,
    helper: &Helper,
    index: u32,
    tun: &str,
) -> Result<Vec<String>, DaemonError> {
    let mut changes = Vec::new();
    if config.masquerade {
        changes.extend(helper.masquerade(index).await?);
    }
    let forwards = config.masquerade || config.gateway || !config.routes.is_empty();
    if forwards {
        let checked = helper.check_forwarding().await;
        report_forwarding(checked, "IPv4", "net.ipv4.ip_forward", tun, &mut changes)?;
    }
    if forwards && config.network6.is_some() {
        let checked = helper.check_forwarding6().await;
        let sysctl = "net.ipv6.conf.all.forwarding";
        report_forwarding(checked, "IPv6", sysctl, tun, &mut changes)?;
    }
    Ok(changes)
}

/// Logs what the helper found of `family`'s forwarding (`sysctl`), and
/// adds it to `changes` if it turned it on.
fn report_forwarding(
    checked: Result<Forwarding, HelperError>,
    family: &str,
    sysctl: &str,
    tun: &str,
    changes: &mut Vec<String>,
) -> Result<(), DaemonError> {
    match checked {
        Ok(Forwarding::On) => {}
        // E.g. /proc/sys read-only (the unit's ProtectKernelTunables=).
        Err(HelperError::Failed { reason, .. }) => warn!(
            tun,
            %reason,
            "{family} forwarding could not be checked or turned on: turn it on with \
             `sysctl -w {sysctl}=1` (and in /etc/sysctl.d to keep it)"
        ),
        Err(e) => return Err(e.into()),
        Ok(Forwarding::TurnedOn) => changes.push(format!("{sysctl} turned on (it stays on)")),
        Ok(Forwarding::Off) => warn!(
            tun,
            "{family} forwarding is off, so clients' {family} traffic does not leave this host: \
             turn it on with `sysctl -w {sysctl}=1`, or set forwarding = true"
        ),
    }
    Ok(())
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

/// Queues what the server takes for an extension client: super-packets
/// whatever its tun does (it splits them for a tun without offloads), if
/// its frames may be as large.
fn announce_features(config: &ServerConfig, peer: &Peer) {
    if config.max_frame >= MAX_FRAME {
        let _ = peer.queue.try_push(Features::SUPER_PACKETS.encode());
    }
}

/// Queues the session parameters for an extension client just granted
/// `address` and `address6` (right behind its grant).
fn push_params(shared: &Shared, peer: &Peer, address: Ipv4Addr, address6: Option<Ipv6Addr>) {
    let params = crate::params::SessionParams {
        address6: address6
            .and_then(|a| Ipv6Net::new(a, shared.peers.network6()?.prefix_len()).ok()),
        ..pushed_params(
            address,
            shared.config.network,
            shared.served_routes(),
            &peer.routes,
            &shared.offer(),
        )
    };
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

/// Sends a packet from client `peer` on, as `client_to_client` says:
/// `allow`, to the client that holds `destination` or into the server's
/// tun ([`forward`]); `deny`, into the tun unless a client (here or on
/// another server of the cluster) holds it, which is dropped and counted;
/// `kernel`, into the tun whoever holds it, so the host's routing and
/// firewall decide (the tun reader then brings it to the client).
fn forward_from(
    shared: &Shared,
    peer: &Peer,
    client_to_client: ClientToClient,
    destination: IpAddr,
    out: Outbound,
) {
    match client_to_client {
        ClientToClient::Allow => forward(shared, destination, out),
        ClientToClient::Kernel => to_tun(shared, out),
        ClientToClient::Deny if held_by_a_client(shared, destination) => {
            debug!(%destination, "dropped a packet for another client (client_to_client = deny)");
            shared.metrics.drops.count(DropKind::ClientToClient);
            peer.stats
                .dropped_client_to_client
                .fetch_add(1, Ordering::Relaxed);
        }
        ClientToClient::Deny => to_tun(shared, out),
    }
}

/// Whether a client of this server, or of another server of the cluster,
/// holds `destination` (its address, or a network behind it).
fn held_by_a_client(shared: &Shared, destination: IpAddr) -> bool {
    if shared.peers.holder(destination).is_some() {
        return true;
    }
    shared
        .links
        .as_ref()
        .is_some_and(|links| links.held_elsewhere(destination))
}

/// Sends a packet on: to the client that holds `destination`, else into
/// the server's tun ([`to_tun`]).
fn forward(shared: &Shared, destination: IpAddr, out: Outbound) {
    if let Some(out) = to_client(shared, destination, out) {
        to_tun(shared, out);
    }
}

/// Writes a packet into the server's tun, on the queue of the worker this
/// runs on (the one whose reader gets the answers: see [`crate::workers`]).
fn to_tun(shared: &Shared, out: Outbound) {
    let tun = shared.tun.local();
    let written = match &out {
        Outbound::Packet(packet) => tun.try_send(packet),
        Outbound::Super(packet) => tun.try_send_super(packet),
    };
    if let Err(e) = written {
        // A full tun queue is a drop; a tun gone for good ends the daemon.
        shared.tun_health.check(TunOp::Write, &e);
        let kind = match e.kind() {
            std::io::ErrorKind::InvalidData => DropKind::Offload,
            _ => DropKind::TunFull,
        };
        shared.metrics.drops.count(kind);
    }
}

/// Queues `out` for the client that holds `destination`, on this server or
/// on another of the cluster; hands it back if no client does.
fn to_client(shared: &Shared, destination: IpAddr, out: Outbound) -> Option<Outbound> {
    match shared.peers.holder(destination) {
        Some(peer) => {
            send_to(shared, &peer, out);
            None
        }
        None => to_cluster(shared, destination, out),
    }
}

/// Queues `out` for `peer` in the shape it takes: a super-packet whole or
/// split, anything cut to an original-protocol client's `legacy_mtu`, and
/// what cannot be cut answered with ICMP to its source, as a router would.
fn send_to(shared: &Shared, peer: &Peer, out: Outbound) {
    let link = PeerLink {
        super_packets: peer.super_packets.load(Ordering::Relaxed),
        // An original client's tun is 1500 bytes; ours (TLS, or plaintext
        // that offered the extension) take whatever their frames may carry.
        mtu: match (peer.identity.protocol(), peer.extension) {
            (Protocol::Original, false) => shared.config.legacy_mtu as usize,
            (Protocol::Original, true) | (Protocol::Tls, _) => usize::MAX,
        },
    };
    let is_super = matches!(out, Outbound::Super(_));
    match egress(out, link) {
        Egress::One(frame) => {
            if is_super && link.super_packets {
                shared.metrics.supers.count(SuperKind::Whole);
            }
            shared.peers.push(peer, frame, SystemTime::now());
        }
        Egress::Many(frames) => {
            shared.metrics.supers.count(SuperKind::Split);
            for frame in frames {
                shared.peers.push(peer, frame, SystemTime::now());
            }
        }
        Egress::TooBig { icmp } => {
            shared.metrics.drops.count(DropKind::TooBig);
            if let Some((_, source)) = icmp.as_deref().and_then(ip_addresses) {
                // At most 576 bytes: it fits every link, so this ends here.
                forward(shared, source, Outbound::Packet(icmp.unwrap_or_default()));
            }
        }
        Egress::Malformed(e) => {
            debug!(error = %e, "dropped a super-packet that cannot be split");
            shared.metrics.drops.count(DropKind::Offload);
        }
    }
}

/// Sends `packet` to the server of the cluster whose client holds
/// `destination`; hands it back if none does (or there is no cluster).
fn to_cluster(shared: &Shared, destination: IpAddr, out: Outbound) -> Option<Outbound> {
    let Some(links) = &shared.links else {
        return Some(out);
    };
    // Links carry plain packets: a super-packet goes as its segments.
    let sup = match out {
        // Handed back if no other server's client holds it.
        Outbound::Packet(packet) => {
            return links.forward(destination, packet).map(Outbound::Packet)
        }
        Outbound::Super(sup) if links.held_elsewhere(destination) => sup,
        out => return Some(out),
    };
    // The holder is looked up once for all the segments; it is gone only
    // if it left the cluster since `held_elsewhere`.
    let forwarded = match egress(Outbound::Super(sup), PeerLink::PLAIN) {
        Egress::One(frame) => links.forward_all(destination, [frame]),
        Egress::Many(frames) => links.forward_all(destination, frames),
        Egress::TooBig { .. } | Egress::Malformed(_) => {
            shared.metrics.drops.count(DropKind::Offload);
            return None;
        }
    };
    if !forwarded {
        debug!(%destination, "dropped a packet for a client that just left the cluster");
    }
    None
}

/// Counts a packet the session dropped.
fn count_drop(shared: &Shared, peer: &Peer, reason: DropReason) {
    shared.metrics.drops.count(reason.into());
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
            debug!("dropped an IPv6 packet: no IPv6 address is assigned to this peer");
            &peer.stats.dropped_spoofed
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Reads packets the host routes into the tun and queues each for the client
/// that holds its destination.
async fn tun_reader(tun: Arc<AsyncTun>, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut buf = BytesMut::with_capacity(4 * MAX_PACKET);
    loop {
        // Room for the largest read: a virtio-net header and an IPv6
        // super-packet (40 bytes of header beyond its 16-bit payload length).
        if buf.capacity() < MAX_PACKET + VNET_HDR_LEN + IPV6_HEADER_LEN {
            buf.reserve(4 * MAX_PACKET);
        }
        let len = tokio::select! {
            _ = shutdown.cancelled() => return,
            read = tun.recv_into(&mut buf) => match read {
                Ok(len) => len,
                Err(e) if shared.tun_health.check(TunOp::Read, &e) => return,
                Err(e) => {
                    warn!(error = %e, "tun read failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let read = buf.split_to(len);
        let out = match tun.offloads().vnet_hdr {
            true => match from_tun_read(read) {
                Ok(out) => out,
                Err(e) => {
                    debug!(error = %e, "dropped a tun packet with a bad offload header");
                    shared.metrics.drops.count(DropKind::Offload);
                    continue;
                }
            },
            false => Outbound::Packet(read.freeze()),
        };
        if let Outbound::Super(_) = out {
            shared.metrics.supers.count(SuperKind::FromTun);
        }
        // Only to clients, here or on another server of the cluster:
        // nothing read from the tun goes back into it.
        if let Some((_, destination)) = ip_addresses(out.packet()) {
            // What no client holds is dropped.
            let _ = to_client(&shared, destination, out);
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
            tun_state: self.tun_health.state().to_string(),
            address: format!("{}/{}", server_address(network), network.prefix_len()),
            listen: self.listening.clone(),
            network: network.to_string(),
            peer_count: self.peers.len() as u32,
            free_addresses: self.peers.free_count(),
            dropped_to_tun: self.metrics.drops.get(DropKind::TunFull),
            queued_bytes: self.peers.budget().queued() as u64,
            reading_bytes: self.peers.budget().reading() as u64,
            closed_for_memory: self.peers.budget().closed(),
            routes: self.served_routes().iter().map(|r| r.to_string()).collect(),
            host_changes: self.host_changes.clone(),
            network6: self
                .config
                .network6
                .map(|n| n.to_string())
                .unwrap_or_default(),
            address6: self
                .config
                .network6
                .map(|n| format!("{}/{}", server_address6(n), n.prefix_len()))
                .unwrap_or_default(),
            free_addresses6: self
                .peers
                .free_count6()
                .map_or(0, |n| u64::try_from(n).unwrap_or(u64::MAX)),
            cluster: self
                .cluster
                .as_ref()
                .map(|cluster| super::cluster::status(cluster, self.links.as_deref())),
            public_key: self.public_key.map(|k| k.to_string()).unwrap_or_default(),
            endpoint: self.config.endpoint.clone().unwrap_or_default(),
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
        why: &str,
    ) -> Result<PeerInfo, KickError> {
        // The ban's reason: who, and their words if any.
        let kicked = match why.is_empty() {
            true => format!("kicked by {by}"),
            false => format!("kicked by {by}: {why}"),
        };
        let mut reason = kicked.clone();
        let peer = match ban {
            None => self.peers.kick(address),
            Some(ban) => {
                reason.push_str(&format!(", banned for {}", humantime::format_duration(ban)));
                let until = crate::wallclock::after(SystemTime::now(), ban);
                let peer = self.peers.ban(address, until, &kicked, SystemTime::now());
                if let Some(peer) = &peer {
                    let who = Banned::of(&peer.identity, peer.remote.ip());
                    let ban = Ban {
                        who,
                        until,
                        reason: kicked,
                    };
                    match &self.cluster {
                        Some(cluster) => cluster.share_ban(ban),
                        None => {
                            if let Err(e) = self.store.put_ban(&ban) {
                                warn!(error = %e, "ban not kept across restarts");
                            }
                        }
                    }
                }
                peer
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

    fn bans(&self) -> Result<Vec<Ban>, KickError> {
        Ok(self.peers.bans(SystemTime::now()))
    }

    fn unban(&self, who: &Banned, by: &str) -> Result<bool, KickError> {
        let here = self.peers.unban(who, SystemTime::now());
        let kept = match &self.cluster {
            Some(cluster) => cluster.unshare_ban(who),
            None => match self.store.remove_ban(who) {
                Ok(kept) => kept,
                Err(e) => {
                    warn!(error = %e, "ban lifted until the next restart only: the state store failed");
                    false
                }
            },
        };
        let lifted = here || kept;
        if lifted {
            info!(who = %who, "ban lifted by {by}");
        }
        Ok(lifted)
    }

    fn admin(&self) -> Option<mpsc::Sender<AdminRequest>> {
        Some(self.admin.clone())
    }

    fn allowed(&self) -> Result<Vec<(AllowedPeer, Option<Ipv4Addr>)>, AdminError> {
        let connected: HashMap<PublicKey, Ipv4Addr> = self
            .peers
            .connected()
            .into_iter()
            .filter_map(|(address, peer)| Some((peer.identity.key()?, address)))
            .collect();
        Ok(self
            .gate
            .peers()
            .iter()
            .map(|p| (p.clone(), connected.get(&p.section.key).copied()))
            .collect())
    }
}

impl LinkDelivery for Shared {
    fn deliver(&self, destination: IpAddr, packet: Bytes) -> bool {
        match self.peers.holder(destination) {
            Some(peer) => {
                send_to(self, &peer, Outbound::Packet(packet));
                true
            }
            None => false,
        }
    }

    fn route_owner(&self, source: IpAddr) -> Option<PublicKey> {
        self.gate
            .peers()
            .iter()
            .find(|p| p.section.routes.iter().any(|r| r.contains(&source)))
            .map(|p| p.section.key)
    }
}

impl ClusterHooks for Shared {
    fn lost(&self, address: IpAddr, holder: &crate::cluster::leases::Holder) {
        super::cluster::lost(&self.peers, &self.events, address, holder);
    }

    fn banned(&self, ban: Ban) {
        super::cluster::banned(&self.peers, &self.events, ban);
    }

    fn fenced(&self) {
        super::cluster::fenced(&self.peers, &self.events);
    }

    fn unbanned(&self, who: Banned) {
        if self.peers.unban(&who, SystemTime::now()) {
            info!(who = %who, "ban lifted on another server of the cluster");
        }
    }

    fn peers(&self, live: Vec<PeerSection>) {
        if self
            .admin
            .try_send(AdminRequest::ClusterPeers { live })
            .is_err()
        {
            warn!("the cluster's live peers changed but the server is busy: applied at the next change");
        }
    }
}

/// Carries out one change to the running server and answers it.
async fn administer(shared: &Arc<Shared>, helper: &Helper, tun: u32, request: AdminRequest) {
    match request {
        AdminRequest::Reload { reply } => {
            let result = reload(shared, helper, tun).await;
            log_reload(&result);
            let _ = reply.send(result);
        }
        AdminRequest::AddPeer { peer, reply } => {
            let result = add_peer(shared, helper, tun, peer).await;
            if let Err(e) = &result {
                warn!("peer add refused: {e}");
            }
            let _ = reply.send(result);
        }
        AdminRequest::RemovePeer { which, reply } => {
            let result = remove_peer(shared, helper, tun, &which).await;
            if let Err(e) = &result {
                warn!("peer remove refused: {e}");
            }
            let _ = reply.send(result);
        }
        AdminRequest::CreateInvite { request, reply } => {
            let result = create_invite(shared, request).await;
            if let Err(e) = &result {
                warn!("invitation refused: {e}");
            }
            let _ = reply.send(result);
        }
        AdminRequest::ListInvites { reply } => {
            let _ = reply.send(shared.invites().await);
        }
        AdminRequest::RevokeInvite { name, reply } => {
            let _ = reply.send(revoke_invite(shared, &name).await);
        }
        AdminRequest::ClusterPeers { live } => {
            let live = fitting_live(&shared.current(), live);
            let same = *shared.live.lock().unwrap_or_else(|e| e.into_inner()) == live;
            if !same {
                let config = (*shared.current()).clone();
                match apply(shared, helper, tun, config, live).await {
                    Ok(report) => info!(
                        added = ?report.added,
                        removed = ?report.removed,
                        disconnected = report.disconnected,
                        "live peers changed on a server of the cluster: applied"
                    ),
                    Err(e) => warn!("live peers changed in the cluster, not applied here: {e}"),
                }
            }
        }
    }
}

fn log_reload(result: &Result<ReloadReport, AdminError>) {
    match result {
        Ok(report) => info!(
            added = ?report.added,
            removed = ?report.removed,
            changed = ?report.changed,
            routes_changed = report.routes_changed,
            offer_changed = report.offer_changed,
            disconnected = report.disconnected,
            params_pushed = report.pushed,
            "reloaded"
        ),
        Err(e) => warn!("reload refused: {e}"),
    }
}

/// Reads the config again and applies the difference.
async fn reload(
    shared: &Arc<Shared>,
    helper: &Helper,
    tun: u32,
) -> Result<ReloadReport, AdminError> {
    let new = match &shared.source {
        Some(source) => source.load().map_err(AdminError::Invalid)?,
        None => shared.config.clone(),
    };
    let fields = shared.config.needs_restart(&new);
    if !fields.is_empty() {
        return Err(AdminError::NeedsRestart(fields));
    }
    let live = shared
        .live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    apply(shared, helper, tun, new, live).await
}

/// Allows `peer` now and keeps it in the store.
async fn add_peer(
    shared: &Arc<Shared>,
    helper: &Helper,
    tun: u32,
    peer: PeerSection,
) -> Result<(), AdminError> {
    if shared.gate.peer(&peer.key).is_some() {
        return Err(AdminError::Exists(peer.key));
    }
    let mut live = shared
        .live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    live.push(peer.clone());
    let config = (*shared.current()).clone();
    check(&config, &live)?;
    if let Some(cluster) = &shared.cluster {
        apply(shared, helper, tun, config, live).await?;
        cluster.share_peer(peer);
        return Ok(());
    }
    shared.store.put_peer(&peer)?;
    if let Err(e) = apply(shared, helper, tun, config, live).await {
        // Not allowed after all: not kept either.
        let _ = shared.store.remove_peer(&peer.key);
        return Err(e);
    }
    Ok(())
}

/// Forgets the live peer with key or name `which` and closes its connections.
async fn remove_peer(
    shared: &Arc<Shared>,
    helper: &Helper,
    tun: u32,
    which: &str,
) -> Result<(PeerSection, usize), AdminError> {
    let found = shared
        .gate
        .peers()
        .iter()
        .find(|p| p.section.key.to_string() == which || p.section.name.as_deref() == Some(which))
        .cloned()
        .ok_or_else(|| AdminError::NoSuchPeer(which.to_string()))?;
    if found.source == PeerSource::Config {
        return Err(AdminError::InConfig(found.section.label()));
    }
    let key = found.section.key;
    match &shared.cluster {
        Some(cluster) => cluster.unshare_peer(key),
        None => {
            shared.store.remove_peer(&key)?;
        }
    }
    let mut live = shared
        .live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    live.retain(|p| p.key != key);
    let config = (*shared.current()).clone();
    let report = apply(shared, helper, tun, config, live).await?;
    Ok((found.section, report.disconnected))
}

/// Makes an invitation: checks that its name and address would fit as a
/// peer now, keeps the hash of a new secret, and returns the token.
async fn create_invite(
    shared: &Arc<Shared>,
    request: InviteRequest,
) -> Result<(Invite, String), AdminError> {
    let server_key = shared.public_key.ok_or(AdminError::NoKey)?;
    let invalid =
        |field: &str, problem: String| AdminError::Invalid(ConfigError::new(field, problem));
    if !crate::join::valid_name(&request.name) {
        return Err(invalid(
            "name",
            format!(
                "{:?}: 1 to {} printable characters without spaces",
                request.name,
                crate::limits::MAX_PEER_NAME_LEN
            ),
        ));
    }
    let endpoint = request
        .endpoint
        .clone()
        .or_else(|| shared.current().endpoint.clone())
        .ok_or_else(|| {
            invalid(
                "endpoint",
                "the server has no endpoint: set endpoint = \"HOST:PORT\" in [server] (what \
                 clients dial), or pass --endpoint"
                    .into(),
            )
        })?;
    // The joining host's entry, with a key no host has: it must fit beside
    // the peers allowed now (its name free, its address in the network and
    // not fixed for another).
    let placeholder = PublicKey::from_raw(&[0; 32]).ok_or(AdminError::NoKey)?;
    let mut live = shared
        .live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    live.push(PeerSection {
        client_to_client: None,
        key: placeholder,
        name: Some(request.name.clone()),
        address: request.address,
        address6: None,
        routes: Vec::new(),
    });
    if let Some(taken) = shared
        .gate
        .peers()
        .iter()
        .find(|p| p.section.name.as_deref() == Some(request.name.as_str()))
    {
        return Err(invalid(
            "name",
            format!(
                "{:?} names an allowed peer already ({})",
                request.name, taken.section.key
            ),
        ));
    }
    check(&shared.current(), &live)?;
    let secret = Secret::random().map_err(|e| invalid("secret", e.to_string()))?;
    let token = Token {
        endpoint,
        server_keys: shared.server_keys(server_key),
        name: request.name.clone(),
        secret: secret.clone(),
    }
    .encode()
    .map_err(|e| invalid("endpoint", e.to_string()))?;
    let now = SystemTime::now();
    let invite = Invite {
        hash: secret.hash(),
        name: request.name,
        address: request.address,
        created: now,
        expires: now + request.ttl,
        state: InviteState::Open,
    };
    match &shared.cluster {
        Some(cluster) => cluster
            .put_invite(&invite, now)
            .await
            .map_err(|e| match e {
                InviteStoreError::Exists(name) => StoreError::InviteExists(name).into(),
                InviteStoreError::Etcd(e) => AdminError::Cluster(e),
            })?,
        None => shared.store.put_invite(&invite, now)?,
    }
    Ok((invite, token))
}

/// Revokes the open invitation named `name`.
async fn revoke_invite(shared: &Arc<Shared>, name: &str) -> Result<Invite, AdminError> {
    let revoked = match &shared.cluster {
        Some(cluster) => cluster.revoke_invite(name).await?,
        None => match shared.store.revoke_invite(name)? {
            true => shared
                .store
                .invites()?
                .into_iter()
                .rev()
                .find(|i| i.name == name && i.state == InviteState::Revoked),
            false => None,
        },
    };
    revoked.ok_or_else(|| AdminError::NoSuchInvite(name.to_string()))
}

impl Shared {
    /// Every invitation: in etcd in a cluster, else in the state store.
    async fn invites(&self) -> Result<Vec<Invite>, AdminError> {
        match &self.cluster {
            Some(cluster) => Ok(cluster.invites().await?),
            None => Ok(self.store.invites()?),
        }
    }

    /// See [`StateStore::redeem_invite`]; in etcd in a cluster.
    async fn redeem_invite(
        &self,
        hash: &str,
        name: &str,
    ) -> Result<Result<Invite, JoinRefusal>, AdminError> {
        let now = SystemTime::now();
        match &self.cluster {
            Some(cluster) => Ok(cluster.redeem_invite(hash, name, now).await?),
            None => Ok(self.store.redeem_invite(hash, name, now)?),
        }
    }

    async fn unredeem_invite(&self, hash: &str) -> Result<(), AdminError> {
        match &self.cluster {
            Some(cluster) => Ok(cluster.unredeem_invite(hash).await?),
            None => Ok(self.store.unredeem_invite(hash)?),
        }
    }
}

/// Serves a host joining with an invitation: one request within
/// [`JOIN_REQUEST_TIMEOUT`], one answer, then the connection is closed.
async fn join(shared: &Arc<Shared>, joining: Joining, remote: SocketAddr) {
    let Joining { mut stream, key } = joining;
    let request = match timeout(JOIN_REQUEST_TIMEOUT, super::join::read_message(&mut stream)).await
    {
        Ok(Ok(JoinMessage::Request(request))) => request,
        Ok(Ok(other)) => {
            let reason = format!("join: a {other:?} instead of a request");
            shared.refuse(remote, RefusalReason::JoinRefused, &reason);
            return;
        }
        Ok(Err(e)) => {
            let reason = format!("join: {e}");
            shared.refuse(remote, RefusalReason::JoinRefused, &reason);
            return;
        }
        Err(_) => {
            let reason = "join: no request within the time allowed";
            shared.refuse(remote, RefusalReason::JoinRefused, reason);
            return;
        }
    };
    Span::current().record("name", request.name.as_str());
    let banned = [Banned::Key(key), Banned::Remote(remote.ip())]
        .iter()
        .find_map(|who| shared.peers.ban_remaining(who, SystemTime::now()));
    let outcome = match banned {
        Some(_) => Err(JoinRefusal::Unknown),
        None => redeem(shared, &request, key).await,
    };
    let answer = match &outcome {
        Ok(accepted) => JoinMessage::Accepted(accepted.clone()),
        Err(refusal) => JoinMessage::Refused(*refusal),
    };
    match &outcome {
        Ok(accepted) => info!(
            %key,
            name = %accepted.name,
            "joined with an invitation: its key is allowed now"
        ),
        Err(refusal) => {
            let reason = format!("join as {:?} refused: {refusal}", request.name);
            shared.refuse(remote, RefusalReason::JoinRefused, &reason);
        }
    }
    if let Ok(bytes) = answer.encode() {
        let sent = async {
            stream.write_all(&bytes).await?;
            stream.flush().await?;
            stream.shutdown().await
        };
        if let Err(e) = timeout(JOIN_REQUEST_TIMEOUT, sent)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "timed out",
                ))
            })
        {
            debug!(error = %e, "join: the answer was not delivered");
        }
    }
}

/// Redeems the invitation `request` proves for `key`: marks it used and
/// allows the key under its name, or changes nothing and says why not.
async fn redeem(
    shared: &Arc<Shared>,
    request: &JoinRequest,
    key: PublicKey,
) -> Result<JoinAccepted, JoinRefusal> {
    let hash = request.secret.hash();
    let invite = match shared.redeem_invite(&hash, &request.name).await {
        Ok(result) => result?,
        Err(e) => {
            warn!(error = %e, "join: the state store failed");
            return Err(JoinRefusal::Unavailable);
        }
    };
    let peer = PeerSection {
        client_to_client: None,
        key,
        name: Some(invite.name.clone()),
        address: invite.address,
        address6: None,
        routes: Vec::new(),
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let added = match shared
        .admin
        .send(AdminRequest::AddPeer { peer, reply })
        .await
    {
        Ok(()) => answer.await.unwrap_or(Err(AdminError::Stopping)),
        Err(_) => Err(AdminError::Stopping),
    };
    if let Err(e) = added {
        // Not joined: the invitation stays as it was.
        if let Err(e) = shared.unredeem_invite(&hash).await {
            warn!(error = %e, "join: the invitation could not be opened again");
        }
        return Err(match e {
            AdminError::Exists(_) | AdminError::Invalid(_) => JoinRefusal::DoesNotFit,
            _ => JoinRefusal::Unavailable,
        });
    }
    Ok(JoinAccepted {
        name: invite.name,
        address: invite.address,
        server_keys: shared
            .public_key
            .map(|own| shared.server_keys(own))
            .unwrap_or_default(),
    })
}

/// Checks that the peers of `config` and `live` fit together.
fn check(config: &ServerConfig, live: &[PeerSection]) -> Result<Vec<AllowedPeer>, AdminError> {
    let merged = merge_peers(&config.peers, live);
    let sections = merged.iter().map(|p| p.section.clone()).collect();
    peers_fit(config, sections).map_err(AdminError::Invalid)?;
    Ok(merged)
}

/// Whether `sections` (the config's peers and those added live) fit
/// together and beside `config`'s routes and networks.
fn peers_fit(config: &ServerConfig, sections: Vec<PeerSection>) -> Result<(), ConfigError> {
    let (peers, routes) = check_peers(
        sections,
        config.routes.clone(),
        config.network,
        config.key.is_some(),
    )?;
    crate::config6::network6(config.network6, &peers, &routes, config.mtu)?;
    Ok(())
}

/// Makes `config` (whose fixed settings are those started with) and the
/// `live` peers the ones in force: peers no longer allowed, or whose entry
/// changed, are disconnected; new ones may join; if the served networks
/// changed, connected extension clients get new session parameters.
/// Nothing else is touched.
async fn apply(
    shared: &Arc<Shared>,
    helper: &Helper,
    tun: u32,
    config: ServerConfig,
    live: Vec<PeerSection>,
) -> Result<ReloadReport, AdminError> {
    let merged = check(&config, &live)?;
    let fixed: HashMap<Ipv4Addr, PublicKey> = merged
        .iter()
        .filter_map(|p| Some((p.section.address?, p.section.key)))
        .collect();
    shared
        .peers
        .set_fixed(&fixed)
        .map_err(|refusal| AdminError::Invalid(ConfigError::new("address", refusal.to_string())))?;
    shared
        .peers
        .set_fixed6(fixed6(&merged))
        .map_err(|refusal| {
            AdminError::Invalid(ConfigError::new("address6", refusal.to_string()))
        })?;
    let old = shared.gate.peers();
    let old_served = shared.served_routes();
    let old_offer = shared.offer();
    shared.gate.set_peers(merged.clone());
    *shared.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    *shared.live.lock().unwrap_or_else(|e| e.into_inner()) = live;

    let mut report = ReloadReport::default();
    for before in old.iter() {
        let now = merged.iter().find(|p| p.section.key == before.section.key);
        let why = match now {
            None => {
                report.removed.push(before.section.label());
                "no longer allowed"
            }
            Some(now) if now.section != before.section => {
                report.changed.push(before.section.label());
                "its entry changed: reconnect"
            }
            Some(_) => continue,
        };
        for peer in shared.peers.kick_key(&before.section.key) {
            report.disconnected += 1;
            info!(addr = %peer.address, remote = %peer.remote, key = %before.section.key, "disconnected: {why}");
            shared.events.publish(
                EventKind::Kicked,
                peer.remote,
                Some(peer.address),
                why.to_string(),
            );
        }
    }
    report.added = merged
        .iter()
        .filter(|p| !old.iter().any(|o| o.section.key == p.section.key))
        .map(|p| p.section.label())
        .collect();

    let (before, after) = (tun_routes(&old), tun_routes(&merged));
    for route in after.difference(&before) {
        if let Err(e) = helper.add_route(tun, *route).await {
            warn!(%route, error = %e, "not routed into the tun on this host until a restart; clients still reach it through the server");
        }
    }
    for route in before.difference(&after) {
        if let Err(e) = helper.del_route(tun, *route).await {
            warn!(%route, error = %e, "route not removed from the tun");
        }
    }

    report.routes_changed = shared.served_routes() != old_served;
    report.offer_changed = shared.offer() != old_offer;
    if report.routes_changed || report.offer_changed {
        for (address, peer) in shared.peers.connected() {
            if peer.takes_params() && !peer.kick.is_cancelled() {
                let address6 = shared.peers.peer(address).and_then(|p| p.address6);
                push_params(shared, &peer, address, address6);
                report.pushed += 1;
            }
        }
    }
    Ok(report)
}
