//! The server role: the I/O loops around the session rules
//! ([`crate::session::server`]) and the peer table ([`super::peers`]).
//! This file holds what every part shares ([`Shared`]), the start-up
//! (`run`, with `host` setting up the tun) and the accept loop; each other
//! file is one job, in the order a packet meets it: `listener`,
//! `connection`, `forward`; then `node` (the control API and the cluster's
//! calls in), `admin` (reload, peers added live) and `invites`.
//!
//! Receive path, a client's packet on its way out, stage by stage:
//!   1. `run` (here): accept the TCP connection, which holds one of its source's
//!      `max_unauthenticated_per_source` slots and either one of
//!      `max_unauthenticated` permits and one of its network's
//!      `max_unauthenticated_per_network` slots, or (a source granted
//!      recently) a place of `unauthenticated_reserve`, until it is granted
//!      ([`super::admission`]); a granted original-protocol session holds
//!      one of its source's `legacy_max_per_source` slots;
//!   2. `listener::serve`: the gate (TLS or the original protocol): its first bytes
//!      within `first_bytes_timeout`, the rest within the handshake
//!      deadline; then the ban check and the key's takeover back-off.
//!      Refusals up to here are logged as a summary per interval;
//!   3. `connection::connection`: read a frame (`FrameReader`), hand it to the
//!      [`ServerSession`](crate::session::server::ServerSession), and carry
//!      out its [`Action`](crate::session::server::Action): reply, admit
//!      through the peer table (which queues the grant), drop, or forward;
//!   4. `forward::forward_from`: to the client that holds the destination (its bounded
//!      queue), else into the server's tun (non-blocking; drops counted).
//!
//! Send path, a packet on its way to a client:
//!   1. `forward::tun_reader`: a packet the host routed into the tun, or stage 4 above;
//!   2. `forward::queue_for`: the queue of the client that holds the destination
//!      ([`PeerTable::holder`]), in the shape it takes (a super-packet
//!      whole or split, cut to `legacy_mtu` for an original-protocol
//!      client that did not offer the extension, or an ICMP error back);
//!      a full queue drops it (counted);
//!   3. `write_frames`: the client's writer task, batching what is queued
//!      into vectored writes.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn};

use super::activation::{self, Listeners};
use super::admission::{Admission, Limits, RefusalReason, RefusalSummary, SUMMARY_INTERVAL};
use super::control::{self, AdminRequest, Node};
use super::events::{EventKind, Events};
use super::gate::{merge_peers, AllowedPeer, Gate};
use super::helper::Helper;
use super::links::{LinkDelivery, LinkLimits, Links};
use super::metrics::{self, Metrics};
use super::notify;
use super::peers::PeerTable;
use super::{ControlOptions, DaemonError};
use crate::budget::MemoryBudget;
use crate::cluster::{Cluster, ClusterHooks};
use crate::config::{PeerSection, ServerConfig, ServerSource};
use crate::daemon::tun::{TunHealth, TunQueues};
use crate::keys::{NodeKey, PublicKey};
use crate::pool::server_address;
use crate::session::server::Offer;
use crate::state::{Ban, Lease, SqliteStore, StateStore};
use crate::workers::WorkerPool;

mod admin;
mod connection;
mod forward;
mod host;
mod invites;
mod listener;
mod node;

use self::admin::{administer, log_reload, peers_fit, reload};
use self::forward::tun_reader;
use self::host::set_up_tun;
use self::listener::{hand_off, listen};

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
    let key = key.map(Arc::new);
    let Stored {
        store,
        leases,
        bans,
        cluster,
        live,
    } = load_state(&config, key.as_ref()).await?;
    let gate = Gate::new(&config, key.as_deref(), &live)?;
    let own_address = server_address(config.network);
    let (tun, host_changes) = set_up_tun(&config, &live, helper, own_address).await?;
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
    let (links, link_listener) = cluster_links(&config, cluster.as_ref(), key, &peers, &shutdown)?;
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
    spawn_services(
        &tasks,
        &shared,
        control,
        &tun,
        pool.as_ref(),
        link_listener,
        metrics_listener,
        &shutdown,
    );
    let mut summaries = tokio::time::interval(Duration::from_secs(1));
    summaries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tun_failure = None;
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
                    hand_off(pool.as_ref(), &tasks, &shared, stream, remote, pending, span, &shutdown);
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

/// What a server starts with from before: from the state store, or in a
/// cluster from etcd.
struct Stored {
    store: SqliteStore,
    leases: Vec<Lease>,
    bans: Vec<Ban>,
    cluster: Option<Arc<Cluster>>,
    live: Vec<PeerSection>,
}

/// Opens the state store and, in a cluster, joins it (with `key`); loads
/// the leases, bans and live peers kept across restarts.
async fn load_state(
    config: &ServerConfig,
    key: Option<&Arc<NodeKey>>,
) -> Result<Stored, DaemonError> {
    // What was kept across restarts; a database that cannot be read or
    // written stops the start here, with one line.
    let store = SqliteStore::open_dir(&config.state_dir)?;
    let now = SystemTime::now();
    store.expire(now)?;
    let (mut leases, mut bans) = (store.leases(now)?, store.bans(now)?);
    // In a cluster the address leases and bans are etcd's.
    let cluster = match (&config.cluster, key) {
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
        Some(cluster) => fitting_live(config, cluster.live_peers()),
        None => fitting_live(config, store.peers()?),
    };
    info!(
        path = %store.path().display(),
        leases = leases.len(),
        bans = bans.len(),
        live_peers = live.len(),
        "state loaded"
    );
    Ok(Stored {
        store,
        leases,
        bans,
        cluster,
        live,
    })
}

/// In a cluster, the links to its other servers and the socket they
/// connect to (the cluster's `advertise` address).
fn cluster_links(
    config: &ServerConfig,
    cluster: Option<&Arc<Cluster>>,
    key: Option<Arc<NodeKey>>,
    peers: &PeerTable,
    shutdown: &CancellationToken,
) -> Result<(Option<Arc<Links>>, Option<TcpListener>), DaemonError> {
    let linked = match (cluster, key) {
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
    Ok(linked)
}

/// Starts the tasks beside the accept loop: the control API, sd_notify's
/// status, a reader per tun queue (on its worker), the cluster's upkeep,
/// the links from other servers, and /metrics.
#[allow(clippy::too_many_arguments)]
fn spawn_services(
    tasks: &TaskTracker,
    shared: &Arc<Shared>,
    control: Option<ControlOptions>,
    tun: &TunQueues,
    pool: Option<&WorkerPool>,
    link_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    shutdown: &CancellationToken,
) {
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
        match pool {
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
    if let Some(listener) = metrics_listener {
        let registry = shared.metrics.registry(shared.clone());
        tasks.spawn(metrics::serve(listener, registry, shutdown.clone()));
    }
}
