//! The server's peer table: who holds which tunnel address, and the queue that
//! reaches each of them. One lock guards the table and the pool together; it
//! is held only for map operations and non-blocking queue pushes, never across
//! I/O, so a stuck client cannot stall anyone else.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio_util::sync::CancellationToken;

use super::gate::Identity;
use super::peers6::Six;
use super::takeover::{Takeovers, Verdict};
use crate::budget::MemoryBudget;
use crate::connection::{PushError, QueueTx};
use crate::keys::PublicKey;
use crate::pool::{AddressPool, Refusal};
use crate::routes::RouteTable;
pub use crate::state::Banned;
use crate::state::{Ban, Lease};
use crate::wire::{Control, Marker, Request};

/// Per-peer counters: atomics, so the packet path takes no lock for them.
#[derive(Debug, Default)]
pub struct PeerStats {
    pub rx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    /// Packets from this peer whose source was not its address.
    pub dropped_spoofed: AtomicU64,
    /// Packets from this peer before it held an address.
    pub dropped_unassigned: AtomicU64,
    /// Packets for this peer dropped because its send queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Packets from this peer for another client, dropped by
    /// `client_to_client = "deny"`.
    pub dropped_client_to_client: AtomicU64,
    /// When the last frame arrived from this peer, in ms since the epoch.
    pub last_seen_ms: AtomicU64,
}

impl PeerStats {
    /// Marks that a frame arrived at `now`.
    pub fn seen(&self, now: SystemTime) {
        self.last_seen_ms.store(unix_ms(now), Ordering::Relaxed);
    }

    pub fn count_rx(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn count_tx(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// One connected client: the one record of it, shared (by `Arc`) between its
/// connection task and, once it holds an address, the table.
#[derive(Debug)]
pub struct Peer {
    /// Tells one connection from the next that holds the same address.
    pub id: u64,
    pub remote: SocketAddr,
    pub connected_since: SystemTime,
    /// Frames for this client, drained by its writer task.
    pub queue: QueueTx,
    /// Set when the table closes it because the memory budget was spent.
    pub shed: AtomicBool,
    pub stats: PeerStats,
    /// Cancelled to close the connection (a kick, or a takeover by a newer
    /// connection with the same key).
    pub kick: CancellationToken,
    /// The transport, and the key and name of a TLS peer.
    pub identity: Identity,
    /// The networks behind this client (site-to-site): forwarded to it, and
    /// allowed as its packets' sources.
    pub routes: Vec<IpNet>,
    /// Whether it speaks our extension: takes extension frames (and, over
    /// TLS, is sent session parameters: [`Peer::takes_params`]).
    pub extension: bool,
    /// Whether it announced that it takes super-packet frames.
    pub super_packets: AtomicBool,
}

impl Peer {
    /// Whether it is a plaintext client that offered our extension in its
    /// request ([`Marker::Offer`]): its grant then carries the acceptance.
    pub fn accepts_offer(&self) -> bool {
        self.extension && matches!(self.identity, Identity::Original)
    }

    /// Whether it is sent session parameters (and so given an IPv6
    /// address): an extension client over TLS only. A plaintext link is
    /// unauthenticated: whoever sits on its path must not gain a say over
    /// the client's routes or DNS beyond what the tunnel already carries.
    pub fn takes_params(&self) -> bool {
        self.extension && !matches!(self.identity, Identity::Original)
    }
}

/// A snapshot of one peer, for the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub address: Ipv4Addr,
    /// Its IPv6 address, on a server with `network6`.
    pub address6: Option<Ipv6Addr>,
    pub remote: SocketAddr,
    pub connected_since: SystemTime,
    pub last_seen: SystemTime,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub dropped_spoofed: u64,
    pub dropped_queue_full: u64,
    pub dropped_unassigned: u64,
    pub dropped_client_to_client: u64,
    /// The transport, and the key and name of a TLS peer.
    pub identity: Identity,
    /// The networks behind it.
    pub routes: Vec<IpNet>,
}

impl PeerInfo {
    /// A snapshot of the peer at `address` with these counters.
    pub fn new(
        address: Ipv4Addr,
        remote: SocketAddr,
        connected_since: SystemTime,
        stats: &PeerStats,
        identity: &Identity,
    ) -> PeerInfo {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PeerInfo {
            address,
            address6: None,
            remote,
            connected_since,
            last_seen: crate::wallclock::from_unix_millis(load(&stats.last_seen_ms)),
            rx_bytes: load(&stats.rx_bytes),
            rx_packets: load(&stats.rx_packets),
            tx_bytes: load(&stats.tx_bytes),
            tx_packets: load(&stats.tx_packets),
            dropped_spoofed: load(&stats.dropped_spoofed),
            dropped_queue_full: load(&stats.dropped_queue_full),
            dropped_unassigned: load(&stats.dropped_unassigned),
            dropped_client_to_client: load(&stats.dropped_client_to_client),
            identity: identity.clone(),
            routes: Vec::new(),
        }
    }
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Peer {
    /// A snapshot of this peer as the holder of `address`.
    pub fn info(&self, address: Ipv4Addr) -> PeerInfo {
        PeerInfo {
            routes: self.routes.clone(),
            ..PeerInfo::new(
                address,
                self.remote,
                self.connected_since,
                &self.stats,
                &self.identity,
            )
        }
    }
}

/// Where a packet went.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the peer that holds the destination address.
    Queued,
    /// That peer's queue was full: dropped and counted.
    QueueFull,
}

impl Banned {
    /// Who a ban of this peer refuses.
    pub fn of(identity: &Identity, remote: IpAddr) -> Banned {
        match identity.key() {
            Some(key) => Banned::Key(key),
            None => Banned::Remote(remote),
        }
    }
}

/// An address granted, and the older session of the same key it replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub address: Ipv4Addr,
    /// The IPv6 address granted with it (extension clients, `network6`).
    pub address6: Option<Ipv6Addr>,
    pub replaced: Option<Replaced>,
}

/// The older session of a key, closed because a newer one took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replaced {
    pub remote: SocketAddr,
    /// The address it held (now freed, unless the newer one holds it).
    pub address: Ipv4Addr,
}

struct Table {
    pool: AddressPool,
    peers: HashMap<Ipv4Addr, Arc<Peer>>,
    /// The address each connected key holds: one per key.
    by_key: HashMap<PublicKey, Ipv4Addr>,
    /// Takeovers of a session by a newer connection of its key.
    takeovers: Takeovers<PublicKey>,
    /// Addresses fixed for a key: reserved in the pool for good.
    fixed: HashSet<Ipv4Addr>,
    /// Refused until the given time (kick --ban), and why.
    bans: HashMap<Banned, (SystemTime, String)>,
    /// The networks behind connected clients, to the client behind each.
    routes: RouteTable<Arc<Peer>>,
    /// Addresses leased to TLS keys (without a fixed address): kept for the
    /// key while it is away, until the lease expires.
    leases: HashMap<PublicKey, Lease>,
    leased: HashMap<Ipv4Addr, PublicKey>,
    /// How long a lease lasts after its key was last granted or left.
    lease_time: Duration,
    /// The earliest expiry among the leases: nothing to sweep before it.
    next_expiry: Option<SystemTime>,
    /// The IPv6 addresses (`network6`).
    six: Six,
}

impl Table {
    /// Whether a connection of `key` holds `address`.
    fn held_by(&self, address: Ipv4Addr, key: PublicKey) -> bool {
        self.peers
            .get(&address)
            .is_some_and(|p| p.identity.key() == Some(key))
    }

    /// Records `key`'s lease of `address` until `expires`, ending any older
    /// lease of the key (its address goes back to the pool if no one holds
    /// it) or of the address.
    fn lease(
        &mut self,
        key: PublicKey,
        address: Ipv4Addr,
        address6: Option<Ipv6Addr>,
        expires: SystemTime,
    ) -> Lease {
        if let Some(old6) = self.leases.get(&key).and_then(|l| l.address6) {
            if Some(old6) != address6 {
                self.six.release(old6);
            }
        }
        if let Some(old) = self.leases.get(&key).map(|l| l.address) {
            if old != address {
                self.leased.remove(&old);
                if !self.peers.contains_key(&old) && !self.fixed.contains(&old) {
                    self.pool.release(old);
                }
            }
        }
        if let Some(other) = self.leased.insert(address, key) {
            if other != key {
                self.leases.remove(&other);
            }
        }
        let lease = Lease {
            key,
            address,
            address6,
            expires,
        };
        self.leases.insert(key, lease.clone());
        self.next_expiry = Some(self.next_expiry.map_or(expires, |t| t.min(expires)));
        lease
    }

    /// Ends the leases expired at `now` and frees their addresses; a lease
    /// whose key is connected on it is renewed instead.
    fn sweep(&mut self, now: SystemTime) {
        if self.next_expiry.is_none_or(|t| now < t) {
            return;
        }
        let expired: Vec<Lease> = self
            .leases
            .values()
            .filter(|l| l.expires <= now)
            .cloned()
            .collect();
        for lease in expired {
            if self.held_by(lease.address, lease.key) {
                if let Some(l) = self.leases.get_mut(&lease.key) {
                    l.expires = crate::wallclock::after(now, self.lease_time);
                }
                continue;
            }
            self.leases.remove(&lease.key);
            self.leased.remove(&lease.address);
            if !self.peers.contains_key(&lease.address) && !self.fixed.contains(&lease.address) {
                self.pool.release(lease.address);
            }
            if let Some(address6) = lease.address6 {
                self.six.release(address6);
            }
        }
        self.next_expiry = self.leases.values().map(|l| l.expires).min();
    }
}

/// Shed at most one peer this often while the budget stays spent: closing
/// one takes a moment to give its memory back.
const SHED_INTERVAL_MS: u64 = 50;
impl Table {
    /// Takes connection `id` out of `address`, its networks and its key's
    /// entry, without freeing the address; None if another holds it.
    fn unlink(&mut self, address: Ipv4Addr, id: u64) -> Option<Arc<Peer>> {
        let peer = self.peers.get(&address).filter(|p| p.id == id)?.clone();
        self.peers.remove(&address);
        for route in &peer.routes {
            if self.routes.get(route).is_some_and(|p| p.id == id) {
                self.routes.remove(route);
            }
        }
        if let Some(key) = peer.identity.key() {
            if self.by_key.get(&key) == Some(&address) {
                self.by_key.remove(&key);
            }
        }
        Some(peer)
    }

    /// The connection that holds `address`, with its IPv4 address.
    fn holding(&self, address: IpAddr) -> Option<(Ipv4Addr, &Arc<Peer>)> {
        match address {
            IpAddr::V4(address) => Some((address, self.peers.get(&address)?)),
            IpAddr::V6(address) => {
                let id = self.six.holder(address)?.id;
                self.peers
                    .iter()
                    .find(|(_, p)| p.id == id)
                    .map(|(a, p)| (*a, p))
            }
        }
    }

    /// A snapshot of `peer`, the holder of `address`.
    fn info(&self, address: Ipv4Addr, peer: &Peer) -> PeerInfo {
        PeerInfo {
            address6: self.six.of(peer.id),
            ..peer.info(address)
        }
    }
}

/// The peer table of one server: who holds which address, the queue that
/// reaches each of them, and who is banned.
pub struct PeerTable {
    /// What every queue counts its bytes against.
    budget: Arc<MemoryBudget>,
    /// When a peer was last shed for the budget (ms since the epoch).
    last_shed_ms: AtomicU64,
    table: RwLock<Table>,
    next_id: AtomicU64,
    /// Packets dropped because a peer's queue was full, all peers together
    /// (each peer's own count is in its [`PeerStats`]).
    pub queue_full: AtomicU64,
}

impl PeerTable {
    /// A table over `network`, with `fixed` addresses kept for the keys
    /// they are configured for (each must be a client address of `network`).
    pub fn new(
        network: Ipv4Net,
        fixed: impl IntoIterator<Item = Ipv4Addr>,
        budget: Arc<MemoryBudget>,
    ) -> PeerTable {
        let mut pool = AddressPool::new(network);
        let fixed: HashSet<Ipv4Addr> = fixed
            .into_iter()
            .filter(|a| pool.reserve(*a).is_ok())
            .collect();
        PeerTable {
            budget,
            last_shed_ms: AtomicU64::new(0),
            table: RwLock::new(Table {
                pool,
                peers: HashMap::new(),
                fixed,
                by_key: HashMap::new(),
                takeovers: Takeovers::default(),
                bans: HashMap::new(),
                routes: RouteTable::new(),
                leases: HashMap::new(),
                leased: HashMap::new(),
                lease_time: Duration::from_secs(crate::config::DEFAULT_LEASE_TIME_SECS),
                next_expiry: None,
                six: Six::default(),
            }),
            next_id: AtomicU64::new(1),
            queue_full: AtomicU64::new(0),
        }
    }

    /// This table, with IPv6 addresses from `network6` for extension
    /// clients, and `fixed` ones for these keys.
    pub fn with_ipv6(
        self,
        network6: Option<Ipv6Net>,
        fixed: HashMap<PublicKey, Ipv6Addr>,
    ) -> PeerTable {
        self.write().six = Six::new(network6, fixed);
        self
    }

    /// Makes `fixed` the fixed IPv6 addresses (see [`PeerTable::set_fixed`]).
    pub fn set_fixed6(
        &self,
        fixed: HashMap<PublicKey, Ipv6Addr>,
    ) -> Result<(), crate::pool6::Refusal6> {
        self.write().six.set_fixed(fixed)
    }

    /// The IPv6 tunnel network, if the server has one.
    pub fn network6(&self) -> Option<Ipv6Net> {
        self.read().six.network()
    }

    /// How many IPv6 addresses are free (`None` without `network6`).
    pub fn free_count6(&self) -> Option<u128> {
        self.read().six.free_count()
    }

    /// Takes over what the state store kept: the leases (each address is
    /// reserved for its key, unless the address is fixed for a key now or
    /// outside the network) and the bans; leases last `lease_time`.
    pub fn restore(&self, leases: Vec<Lease>, bans: Vec<Ban>, lease_time: Duration) {
        let mut table = self.write();
        table.lease_time = lease_time;
        for lease in leases {
            if table.fixed.contains(&lease.address) || table.pool.reserve(lease.address).is_err() {
                continue;
            }
            let address6 = lease.address6.filter(|a| table.six.reserve(*a));
            table.lease(lease.key, lease.address, address6, lease.expires);
        }
        for ban in bans {
            table.bans.insert(ban.who, (ban.until, ban.reason));
        }
    }

    /// The record of a new connection from `remote`, made at `now`, not yet
    /// in the table; `extension`: it speaks our extension.
    pub fn new_peer(
        &self,
        remote: SocketAddr,
        identity: Identity,
        routes: Vec<IpNet>,
        queue: QueueTx,
        extension: bool,
        now: SystemTime,
    ) -> Arc<Peer> {
        Arc::new(Peer {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            remote,
            connected_since: now,
            queue,
            shed: AtomicBool::new(false),
            stats: PeerStats::default(),
            kick: CancellationToken::new(),
            identity,
            routes,
            extension,
            super_packets: AtomicBool::new(false),
        })
    }

    /// The lease `key` holds, if any.
    pub fn lease_of(&self, key: &PublicKey) -> Option<Lease> {
        self.read().leases.get(key).cloned()
    }

    /// Makes `fixed` (address to key) the fixed addresses: new ones are
    /// reserved, those no longer fixed go back to the pool once free.
    /// Refused, changing nothing, if a new one is held or leased by
    /// another key.
    pub fn set_fixed(&self, fixed: &HashMap<Ipv4Addr, PublicKey>) -> Result<(), Refusal> {
        let mut table = self.write();
        for (&address, &key) in fixed {
            if table.fixed.contains(&address) {
                continue;
            }
            if !table.pool.contains(address) {
                return Err(Refusal::NotInPool(address));
            }
            let held_by_other = table
                .peers
                .get(&address)
                .is_some_and(|p| p.identity.key() != Some(key));
            let leased_to_other = table.leased.get(&address).is_some_and(|k| *k != key);
            let used_by_nobody_known = !table.peers.contains_key(&address)
                && !table.leased.contains_key(&address)
                && !table.pool.is_free(address);
            if held_by_other || leased_to_other || used_by_nobody_known {
                return Err(Refusal::Taken(address));
            }
        }
        let old: Vec<Ipv4Addr> = table.fixed.iter().copied().collect();
        for address in old {
            if !fixed.contains_key(&address) {
                table.fixed.remove(&address);
                if !table.peers.contains_key(&address) {
                    table.pool.release(address);
                }
            }
        }
        for (&address, &key) in fixed {
            if table.fixed.insert(address) {
                let ended = [
                    table
                        .leased
                        .remove(&address)
                        .and_then(|old| table.leases.remove(&old)),
                    table.leases.remove(&key),
                ];
                for lease in ended.into_iter().flatten() {
                    // Its IPv6 address goes back too, unless held.
                    if let Some(address6) = lease.address6 {
                        table.six.release(address6);
                    }
                    if lease.key != key {
                        continue;
                    }
                    table.leased.remove(&lease.address);
                    if !table.peers.contains_key(&lease.address) {
                        table.pool.release(lease.address);
                    }
                }
                if !table.peers.contains_key(&address) {
                    let _ = table.pool.reserve(address);
                }
            }
        }
        Ok(())
    }

    /// The network's netmask, pushed in every grant.
    pub fn netmask(&self) -> Ipv4Addr {
        self.read().pool.network().netmask()
    }

    /// Grants an address for `request` (Dynamic or Static) to `peer`, enters
    /// it in the table and queues the grant to it, all under one lock, so
    /// that the grant goes out before any packet for the new address can.
    ///
    /// One key, one session: a client with a fixed address gets it whatever
    /// it asks for; a newer connection with the same key takes the session
    /// over from an older one (which is closed and loses its address at
    /// once, so a key never holds two), so a client that reconnects before
    /// the server noticed the old connection die is not locked out. A TLS
    /// key without a fixed address gets the address it holds or leases
    /// whatever it asks for (unless it asks for another one by a static
    /// request), and its lease is renewed. A key that takes over too often
    /// is refused for a while ([`Refusal::KeyFlapping`], see
    /// [`super::takeover`]).
    ///
    /// `now` times the takeovers and `wall` the leases (which are stored
    /// and outlive the process, so they are wall-clock times); the caller
    /// reads both clocks, so tests pass them.
    pub fn admit(
        &self,
        request: Request,
        peer: &Arc<Peer>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Granted, Refusal> {
        self.grant(request, peer, now, wall, None)
    }

    /// [`PeerTable::admit`], with the IPv6 address the cluster claimed for
    /// `peer` (None: it gets none) instead of one from this server's pool.
    pub fn admit_claimed(
        &self,
        request: Request,
        address6: Option<Ipv6Addr>,
        peer: &Arc<Peer>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Granted, Refusal> {
        self.grant(request, peer, now, wall, Some(address6))
    }

    /// Admits `peer` at `now`; its IPv6 address is `claimed` if given (by
    /// the cluster), else one of this server's pool.
    fn grant(
        &self,
        request: Request,
        peer: &Arc<Peer>,
        now: Instant,
        wall: SystemTime,
        claimed: Option<Option<Ipv6Addr>>,
    ) -> Result<Granted, Refusal> {
        let mut table = self.write();
        table.sweep(wall);
        let remote = peer.remote.ip();
        let key = peer.identity.key();
        // The older session of the same key, if any.
        let old: Option<(Ipv4Addr, Arc<Peer>)> = key
            .and_then(|k| table.by_key.get(&k).copied())
            .and_then(|a| Some((a, table.peers.get(&a)?.clone())))
            .filter(|(_, old)| old.id != peer.id);
        if let (Some(key), Some(_)) = (key, &old) {
            if let Verdict::Refuse {
                remaining,
                takeovers,
            } = table.takeovers.takeover(key, now)
            {
                return Err(Refusal::KeyFlapping {
                    takeovers,
                    retry_after_secs: remaining.as_secs() + u64::from(remaining.subsec_nanos() > 0),
                });
            }
        }
        let old_address = old.as_ref().map(|(a, _)| *a);
        // The addresses the key holds now, else the ones it leases.
        let (leased, leased6) = match (peer.identity.fixed(), key) {
            (None, Some(key)) => table
                .leases
                .get(&key)
                .map_or((None, None), |l| (Some(l.address), l.address6)),
            _ => (None, None),
        };
        let held = old_address.or(leased);
        let had6 = old
            .as_ref()
            .and_then(|(_, old)| table.six.of(old.id))
            .or(leased6);
        let address = match (peer.identity.fixed(), request) {
            (Some(fixed), _) => match table.peers.get(&fixed) {
                Some(_) if old_address == Some(fixed) => Ok(fixed),
                Some(_) => Err(Refusal::Taken(fixed)),
                None => Ok(fixed),
            },
            (None, Request::Static(wanted)) if held == Some(wanted) => Ok(wanted),
            (None, Request::Static(wanted)) => table.pool.claim(wanted, remote).map(|()| wanted),
            (None, Request::Dynamic | Request::Keepalive) => match held {
                Some(held) => Ok(held),
                None => table.pool.allocate(remote),
            },
        }?;
        let kept6 = match claimed {
            Some(claimed) => {
                // The cluster gave it to this client: reserved here, unless
                // it is already (the key's own).
                if let Some(address6) = claimed {
                    table.six.reserve(address6);
                }
                claimed
            }
            None => had6,
        };
        let replaced = old.map(|(old_address, old)| {
            old.kick.cancel();
            table.unlink(old_address, old.id);
            if let Some(old6) = table.six.unlink(old.id).filter(|a| Some(*a) != kept6) {
                table.six.release(old6);
            }
            let still_leased = table.leased.contains_key(&old_address);
            if old_address != address && !table.fixed.contains(&old_address) && !still_leased {
                table.pool.release(old_address);
            }
            Replaced {
                remote: old.remote,
                address: old_address,
            }
        });
        let address6 = match claimed {
            Some(None) => None,
            _ => table.six.assign(peer, kept6),
        };
        if let (None, Some(key)) = (peer.identity.fixed(), key) {
            let expires = wall + table.lease_time;
            table.lease(key, address, address6, expires);
        }
        // Kept for the key, but not given to it (it no longer speaks the
        // extension, say): free unless held or fixed.
        for kept6 in [kept6, had6].into_iter().flatten() {
            if address6 != Some(kept6) {
                table.six.release(kept6);
            }
        }
        let mut grant = Control::grant(address, Some(table.pool.network().netmask()));
        if peer.accepts_offer() {
            grant = grant.with_marker(Marker::Accept);
        }
        // The queue is new and empty: this push cannot fail for lack of room.
        let _ = peer.queue.try_push(Bytes::copy_from_slice(&grant.encode()));
        table.peers.insert(address, peer.clone());
        if let Some(key) = key {
            table.by_key.insert(key, address);
        }
        // Its networks are its alone (the config refuses overlaps); a
        // newer connection of the same key takes them over.
        for route in &peer.routes {
            table.routes.insert(*route, peer.clone());
        }
        Ok(Granted {
            address,
            address6,
            replaced,
        })
    }

    /// How much longer connections of `key` are refused for taking over
    /// their session too often, if they are.
    pub fn takeover_backoff(&self, key: &PublicKey, now: Instant) -> Option<Duration> {
        self.read().takeovers.backing_off(key, now)
    }

    /// Removes connection `id` from `address` at `now` and frees the
    /// address, unless it is fixed or leased: then the lease runs from `now`,
    /// and is returned (to be kept). Does nothing if another connection
    /// holds it by then.
    pub fn remove(&self, address: Ipv4Addr, id: u64, now: SystemTime) -> Option<Lease> {
        let mut table = self.write();
        let peer = table.unlink(address, id)?;
        let address6 = table.six.unlink(id);
        let lease_time = table.lease_time;
        let lease = peer
            .identity
            .key()
            .and_then(|key| table.leases.get_mut(&key))
            .filter(|l| l.address == address)
            .map(|l| {
                l.expires = crate::wallclock::after(now, lease_time);
                l.clone()
            });
        if let Some(lease) = &lease {
            table.next_expiry = Some(
                table
                    .next_expiry
                    .map_or(lease.expires, |t| t.min(lease.expires)),
            );
        } else if !table.fixed.contains(&address) {
            table.pool.release(address);
        }
        let leased6 = lease.as_ref().and_then(|l| l.address6);
        if let Some(address6) = address6.filter(|a| leased6 != Some(*a)) {
            table.six.release(address6);
        }
        lease
    }

    /// Every connected peer that holds an address, with it.
    pub fn connected(&self) -> Vec<(Ipv4Addr, Arc<Peer>)> {
        self.read()
            .peers
            .iter()
            .map(|(address, peer)| (*address, peer.clone()))
            .collect()
    }

    /// Closes every connection of `key` that holds an address; returns them.
    pub fn kick_key(&self, key: &PublicKey) -> Vec<PeerInfo> {
        let table = self.read();
        table
            .peers
            .iter()
            .filter(|(_, p)| p.identity.key() == Some(*key))
            .map(|(address, peer)| {
                peer.kick.cancel();
                table.info(*address, peer)
            })
            .collect()
    }

    /// The client that holds `destination` (IPv4 or IPv6), or whose
    /// networks hold it (longest prefix); [`PeerTable::push`] queues a frame
    /// for it.
    pub fn holder(&self, destination: impl Into<IpAddr>) -> Option<Arc<Peer>> {
        let destination = destination.into();
        let table = self.read();
        let holder = match destination {
            IpAddr::V4(address) => table.peers.get(&address),
            IpAddr::V6(address) => table.six.holder(address),
        };
        holder
            .or_else(|| table.routes.lookup(destination).map(|(_, p)| p))
            .cloned()
    }

    /// Queues `frame` for `peer` (counted), or drops it if the queue is
    /// full (counted; over the memory budget, the largest queue is shed,
    /// paced by the time `now` reads: only then, not for every frame).
    pub fn push(&self, peer: &Peer, frame: Bytes, now: impl FnOnce() -> SystemTime) -> Delivery {
        let len = frame.len();
        match peer.queue.try_push(frame) {
            Ok(()) => {
                peer.stats.count_tx(len);
                Delivery::Queued
            }
            Err(full) => {
                peer.stats
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                self.queue_full.fetch_add(1, Ordering::Relaxed);
                if full == PushError::OverBudget {
                    self.shed_largest(&self.read(), now());
                }
                Delivery::QueueFull
            }
        }
    }

    /// The memory budget is spent at `now`: closes the peer whose queue
    /// holds the most (at most one per [`SHED_INTERVAL_MS`]).
    fn shed_largest(&self, table: &Table, now: SystemTime) {
        let now = unix_ms(now);
        let last = self.last_shed_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < SHED_INTERVAL_MS
            || self
                .last_shed_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let largest = table
            .peers
            .iter()
            .filter(|(_, p)| !p.kick.is_cancelled())
            .max_by_key(|(_, p)| p.queue.queued_bytes());
        if let Some((address, peer)) = largest {
            peer.shed.store(true, Ordering::Relaxed);
            peer.kick.cancel();
            self.budget.count_closed();
            tracing::warn!(
                addr = %address,
                remote = %peer.remote,
                queued = peer.queue.queued_bytes(),
                "memory budget spent: closing the peer that holds the most"
            );
        }
    }

    /// The server's memory budget.
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// The server's memory budget, to share with a connection.
    pub fn budget_handle(&self) -> Arc<MemoryBudget> {
        self.budget.clone()
    }

    /// How many clients hold an address.
    pub fn len(&self) -> usize {
        self.read().peers.len()
    }

    /// How many addresses are free.
    pub fn free_count(&self) -> u32 {
        self.read().pool.free_count()
    }

    /// Every peer that holds an address, ordered by address.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let table = self.read();
        let mut peers: Vec<PeerInfo> = table
            .peers
            .iter()
            .map(|(address, peer)| table.info(*address, peer))
            .collect();
        peers.sort_by_key(|p| p.address);
        peers
    }

    /// The peer that holds `address` (its IPv4 or its IPv6 one).
    pub fn peer(&self, address: impl Into<IpAddr>) -> Option<PeerInfo> {
        let table = self.read();
        let (address, peer) = table.holding(address.into())?;
        Some(table.info(address, peer))
    }

    /// Closes the connection that holds `address` (IPv4 or IPv6); its task
    /// then frees its addresses. Returns the peer as it was.
    pub fn kick(&self, address: impl Into<IpAddr>) -> Option<PeerInfo> {
        let table = self.read();
        let (address, peer) = table.holding(address.into())?;
        peer.kick.cancel();
        Some(table.info(address, peer))
    }

    /// Closes the connection that holds `address` and refuses it (by key, or
    /// by remote address for an original-protocol client) until `until`.
    /// `reason` says why, for `svpnctl bans`. Returns the peer as it was
    /// (its identity and remote say who is banned: [`Banned::of`]). Bans
    /// ended at `now` are dropped.
    pub fn ban(
        &self,
        address: Ipv4Addr,
        until: SystemTime,
        reason: &str,
        now: SystemTime,
    ) -> Option<PeerInfo> {
        let mut table = self.write();
        let peer = table.peers.get(&address)?.clone();
        peer.kick.cancel();
        table.bans.retain(|_, (until, _)| *until > now);
        table.bans.insert(
            Banned::of(&peer.identity, peer.remote.ip()),
            (until, reason.to_string()),
        );
        Some(table.info(address, &peer))
    }

    /// Applies `ban` (one made on another server of the cluster) and
    /// closes the banned client's connections here; returns them.
    pub fn ban_who(&self, ban: Ban) -> Vec<PeerInfo> {
        let Ban { who, until, reason } = ban;
        let mut table = self.write();
        let closed = table
            .peers
            .iter()
            .filter(|(_, p)| Banned::of(&p.identity, p.remote.ip()) == who)
            .map(|(address, peer)| {
                peer.kick.cancel();
                peer.info(*address)
            })
            .collect();
        table.bans.insert(who, (until, reason));
        closed
    }

    /// Whether `address` is a client address of the network (free or not).
    pub fn in_pool(&self, address: Ipv4Addr) -> bool {
        self.read().pool.contains(address)
    }

    /// Whether `address` is free in this server's pool (IPv4) or its IPv6
    /// one.
    pub fn is_free(&self, address: impl Into<IpAddr>) -> bool {
        let table = self.read();
        match address.into() {
            IpAddr::V4(address) => table.pool.is_free(address),
            IpAddr::V6(address) => table.six.is_free(address),
        }
    }

    /// The IPv6 address fixed for `key` (`[[server.peer]] address6`).
    pub fn fixed_address6(&self, key: &PublicKey) -> Option<Ipv6Addr> {
        self.read().six.fixed_of(key)
    }

    /// The bans in force at `now`, soonest to end first.
    pub fn bans(&self, now: SystemTime) -> Vec<Ban> {
        let mut bans: Vec<Ban> = self
            .read()
            .bans
            .iter()
            .filter(|(_, (until, _))| *until > now)
            .map(|(who, (until, reason))| Ban {
                who: who.clone(),
                until: *until,
                reason: reason.clone(),
            })
            .collect();
        bans.sort_by_key(|b| b.until);
        bans
    }

    /// Lifts the ban on `who`; false if there was none in force at `now`.
    pub fn unban(&self, who: &Banned, now: SystemTime) -> bool {
        self.write()
            .bans
            .remove(who)
            .is_some_and(|(until, _)| until > now)
    }

    /// How much longer `who` stays banned at `now`, if it is.
    pub fn ban_remaining(&self, who: &Banned, now: SystemTime) -> Option<Duration> {
        let table = self.read();
        let (until, _) = table.bans.get(who)?;
        until.duration_since(now).ok().filter(|d| !d.is_zero())
    }

    fn read(&self) -> RwLockReadGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table half-changed
        // (every change is one map or pool call), so a poisoned lock is safe.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The monotonic time the tests start at: every other is an offset from
    /// it, so no test waits.
    fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    /// The wall-clock time the tests start at: a fixed date, so no test
    /// depends on today's or back-dates anything.
    fn wall0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    /// A table over `network` with these fixed addresses and room to spare.
    fn table_of(network: &str, fixed: &[Ipv4Addr]) -> PeerTable {
        let network = network.parse().expect("net");
        PeerTable::new(network, fixed.iter().copied(), MemoryBudget::new(1 << 20))
    }

    /// A table over 198.19.0.0/16.
    fn new_table() -> PeerTable {
        table_of("198.19.0.0/16", &[])
    }

    fn peer_with(
        table: &PeerTable,
        port: u16,
        identity: Identity,
    ) -> (Arc<Peer>, crate::connection::QueueRx) {
        let (queue, rx) = crate::connection::queue(2, 1 << 20, None);
        let remote = SocketAddr::from(([198, 18, 0, 2], port));
        (
            table.new_peer(remote, identity, Vec::new(), queue, false, wall0()),
            rx,
        )
    }

    fn link(table: &PeerTable, port: u16) -> (Arc<Peer>, crate::connection::QueueRx) {
        peer_with(table, port, Identity::Original)
    }

    /// Queues `packet` for whoever holds `destination`, as the server does.
    fn deliver(
        table: &PeerTable,
        destination: impl Into<IpAddr>,
        packet: Bytes,
    ) -> Option<Delivery> {
        let peer = table.holder(destination)?;
        Some(table.push(&peer, packet, wall0))
    }

    #[test]
    fn only_a_plaintext_peer_that_offered_gets_the_acceptance_in_its_grant() {
        let table = new_table();
        let grant_of = |peer: &Arc<Peer>, rx: &mut crate::connection::QueueRx| {
            table
                .admit(Request::Dynamic, peer, t0(), wall0())
                .expect("grant");
            rx.try_recv().expect("grant queued")
        };
        // An original client: the grant it always got.
        let (plain, mut rx) = link(&table, 1000);
        let grant = grant_of(&plain, &mut rx);
        assert_eq!(&grant[..12], &[0x45, 0x14, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0]);
        // Our plaintext client that offered: "sv2!" in bytes 4..8, nothing else changed.
        let (offered, mut rx) = peer_with_extension(&table, 1001, Identity::Original);
        assert!(offered.accepts_offer());
        let marked = grant_of(&offered, &mut rx);
        assert_eq!(&marked[4..8], b"sv2!");
        assert_eq!((&marked[..4], &marked[8..16]), (&grant[..4], &grant[8..16]));
        // A TLS extension peer: negotiated by ALPN, its grant unmarked.
        let (tls_peer, mut rx) =
            extension_peer(&table, 1002, PublicKey::from_raw(&[9; 32]).expect("key"));
        assert!(!tls_peer.accepts_offer());
        assert_eq!(&grant_of(&tls_peer, &mut rx)[4..8], &[0, 0, 0, 0]);
        // The plaintext one is sent no session parameters, so it gets no
        // IPv6 address either; the TLS one does.
        assert!(!offered.takes_params() && tls_peer.takes_params());
        let six = dual_stack(&[]);
        let (offered6, _rx) = peer_with_extension(&six, 1003, Identity::Original);
        let granted = six
            .admit(Request::Dynamic, &offered6, t0(), wall0())
            .expect("grant");
        assert_eq!(granted.address6, None);
    }

    #[test]
    fn grant_goes_out_first_and_packets_follow() {
        let table = new_table();
        let (a, mut rx) = link(&table, 1000);
        let address = table
            .admit(Request::Dynamic, &a, t0(), wall0())
            .expect("grant")
            .address;
        let stats = &a.stats;
        assert_eq!(address, Ipv4Addr::new(198, 19, 0, 2));
        let grant = rx.try_recv().expect("grant queued");
        assert_eq!(&grant[12..16], &[255, 255, 0, 0]);
        assert_eq!(&grant[16..20], &[198, 19, 0, 2]);
        assert_eq!(
            deliver(&table, address, Bytes::from_static(b"one")),
            Some(Delivery::Queued)
        );
        assert_eq!(
            deliver(&table, address, Bytes::from_static(b"two")),
            Some(Delivery::Queued)
        );
        assert_eq!(
            deliver(&table, address, Bytes::from_static(b"three")),
            Some(Delivery::QueueFull)
        );
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 1);
        assert_eq!(stats.tx_packets.load(Ordering::Relaxed), 2);
        assert_eq!(
            deliver(&table, Ipv4Addr::new(198, 19, 0, 9), Bytes::new()),
            None
        );
    }

    #[test]
    fn remove_frees_only_its_own_address() {
        let table = new_table();
        let (a, _rx_a) = link(&table, 1000);
        let a_id = a.id;
        let address = table
            .admit(
                Request::Static(Ipv4Addr::new(198, 19, 0, 7)),
                &a,
                t0(),
                wall0(),
            )
            .expect("grant")
            .address;
        let (b, _rx_b) = link(&table, 1001);
        assert_eq!(
            table
                .admit(Request::Static(address), &b, t0(), wall0())
                .map(|g| g.address),
            Err(Refusal::Taken(address))
        );
        table.remove(address, a_id + 100, wall0());
        assert_eq!(table.len(), 1);
        table.remove(address, a_id, wall0());
        assert_eq!(table.len(), 0);
        let (c, _rx_c) = link(&table, 1002);
        assert_eq!(
            table
                .admit(Request::Static(address), &c, t0(), wall0())
                .map(|g| g.address),
            Ok(address)
        );
    }

    #[test]
    fn fixed_addresses_belong_to_their_key() {
        let fixed = Ipv4Addr::new(198, 19, 0, 2);
        let table = table_of("198.19.0.0/16", &[fixed]);
        let key: crate::keys::PublicKey = "ScFYNjnPxvAxr6GGa07nJpY3Y6mxoP6KgSTp3vU//xo="
            .parse()
            .expect("key");
        let with_key = |table: &PeerTable, port| {
            let identity = Identity::Tls {
                key,
                name: Some("laptop".into()),
                fixed: Some(fixed),
            };
            peer_with(table, port, identity)
        };
        // Nobody else gets it, by static or dynamic request.
        let (other, _rx) = link(&table, 1000);
        assert_eq!(
            table
                .admit(Request::Static(fixed), &other, t0(), wall0())
                .map(|g| g.address),
            Err(Refusal::Taken(fixed))
        );
        let (other, _rx) = link(&table, 1001);
        assert_eq!(
            table
                .admit(Request::Dynamic, &other, t0(), wall0())
                .map(|g| g.address),
            Ok(Ipv4Addr::new(198, 19, 0, 3))
        );
        // Its key gets it whatever it asks for; a second connection of the
        // same key takes over and the first is kicked.
        let (first, _rx1) = with_key(&table, 1002);
        let (first_id, first_kick) = (first.id, first.kick.clone());
        assert_eq!(
            table
                .admit(Request::Dynamic, &first, t0(), wall0())
                .map(|g| g.address),
            Ok(fixed)
        );
        let (second, _rx2) = with_key(&table, 1003);
        assert_eq!(
            table
                .admit(
                    Request::Static(Ipv4Addr::new(198, 19, 9, 9)),
                    &second,
                    t0(),
                    wall0()
                )
                .map(|g| g.address),
            Ok(fixed)
        );
        assert!(first_kick.is_cancelled());
        let info = table.peer(fixed).expect("held");
        assert_eq!(info.remote.port(), 1003);
        assert_eq!(info.identity.name(), Some("laptop"));
        assert_eq!(info.identity.protocol(), crate::session::Protocol::Tls);
        // The old connection's cleanup does not free it from the new one.
        table.remove(fixed, first_id, wall0());
        assert!(table.peer(fixed).is_some());
    }

    #[test]
    fn peers_are_listed_by_address_and_kicked_by_token() {
        let table = new_table();
        let (a, _rx_a) = link(&table, 1000);
        let (b, _rx_b) = link(&table, 1001);
        let kick_a = a.kick.clone();
        a.stats.count_rx(100);
        let seen = wall0() + Duration::from_millis(1500);
        a.stats.seen(seen);
        table
            .admit(
                Request::Static(Ipv4Addr::new(198, 19, 0, 9)),
                &a,
                t0(),
                wall0(),
            )
            .expect("a");
        table.admit(Request::Dynamic, &b, t0(), wall0()).expect("b");
        let peers = table.peers();
        let addresses: Vec<_> = peers.iter().map(|p| p.address).collect();
        assert_eq!(
            addresses,
            [Ipv4Addr::new(198, 19, 0, 2), Ipv4Addr::new(198, 19, 0, 9)]
        );
        let a_info = table.peer(Ipv4Addr::new(198, 19, 0, 9)).expect("a listed");
        assert_eq!((a_info.rx_bytes, a_info.rx_packets), (100, 1));
        assert_eq!((a_info.connected_since, a_info.last_seen), (wall0(), seen));
        assert_eq!(table.kick(Ipv4Addr::new(198, 19, 0, 9)), Some(a_info));
        assert!(kick_a.is_cancelled());
        assert_eq!(table.kick(Ipv4Addr::new(198, 19, 0, 77)), None);
    }

    #[test]
    fn packets_for_a_clients_networks_go_to_it_until_it_leaves() {
        let table = new_table();
        let (queue, mut rx) = crate::connection::queue(4, 1 << 20, None);
        let remote = SocketAddr::from(([198, 18, 0, 2], 1000));
        let lan: IpNet = "198.18.201.0/24".parse().expect("net");
        let a = table.new_peer(remote, Identity::Original, vec![lan], queue, false, wall0());
        let address = table
            .admit(Request::Dynamic, &a, t0(), wall0())
            .expect("grant")
            .address;
        rx.try_recv().expect("the grant");
        let host = Ipv4Addr::new(198, 18, 201, 7);
        assert_eq!(
            deliver(&table, host, Bytes::from_static(b"x")),
            Some(Delivery::Queued)
        );
        assert_eq!(rx.try_recv().expect("forwarded"), Bytes::from_static(b"x"));
        assert_eq!(table.peer(address).expect("listed").routes, vec![lan]);
        assert_eq!(
            deliver(&table, Ipv4Addr::new(198, 18, 202, 7), Bytes::new()),
            None
        );
        table.remove(address, a.id, wall0());
        assert_eq!(deliver(&table, host, Bytes::new()), None);
    }

    #[test]
    fn bans_refuse_by_key_or_remote_until_they_expire() {
        let table = new_table();
        let (a, _rx) = link(&table, 1000);
        let address = table
            .admit(Request::Dynamic, &a, t0(), wall0())
            .expect("grant")
            .address;
        let now = wall0();
        let who = Banned::of(&a.identity, a.remote.ip());
        assert_eq!(who, Banned::Remote(a.remote.ip()));
        assert_eq!(table.ban_remaining(&who, now), None);
        let info = table
            .ban(
                address,
                now + Duration::from_secs(60),
                "kicked by uid 0",
                now,
            )
            .expect("banned");
        assert_eq!(info.address, address);
        assert!(a.kick.is_cancelled());
        assert_eq!(
            table.ban_remaining(&who, now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            table.ban_remaining(&who, now + Duration::from_secs(60)),
            None
        );
        assert_eq!(table.bans(now)[0].reason, "kicked by uid 0");
        assert_eq!(table.ban(Ipv4Addr::new(198, 19, 9, 9), now, "", now), None);
    }

    fn tls_peer(table: &PeerTable, port: u16) -> (Arc<Peer>, crate::connection::QueueRx) {
        let key: PublicKey = "ScFYNjnPxvAxr6GGa07nJpY3Y6mxoP6KgSTp3vU//xo="
            .parse()
            .expect("key");
        let identity = Identity::Tls {
            key,
            name: None,
            fixed: None,
        };
        let (queue, rx) = crate::connection::queue(2, 1 << 20, None);
        let remote = SocketAddr::from(([198, 18, (port % 250) as u8, 2], port));
        (
            table.new_peer(remote, identity, Vec::new(), queue, false, wall0()),
            rx,
        )
    }

    #[test]
    fn a_key_without_a_fixed_address_never_holds_two() {
        let table = new_table();
        let (first, _rx1) = tls_peer(&table, 1);
        let held = table
            .admit(Request::Dynamic, &first, t0(), wall0())
            .expect("first");
        assert_eq!(held.replaced, None);
        // Another host, same key: it takes the session over, and the address
        // with it; the first connection is closed.
        let (second, _rx2) = tls_peer(&table, 2);
        let taken = table
            .admit(Request::Dynamic, &second, t0(), wall0())
            .expect("second");
        assert_eq!(taken.address, held.address);
        assert_eq!(
            taken.replaced,
            Some(Replaced {
                remote: first.remote,
                address: held.address
            })
        );
        assert!(first.kick.is_cancelled());
        assert_eq!(table.len(), 1);
        // Asking for another address moves it: the old one is freed.
        let (third, _rx3) = tls_peer(&table, 3);
        let wanted = Ipv4Addr::new(198, 19, 0, 50);
        let moved = table
            .admit(Request::Static(wanted), &third, t0(), wall0())
            .expect("third");
        assert_eq!(moved.address, wanted);
        assert_eq!(moved.replaced.map(|r| r.address), Some(held.address));
        assert_eq!(table.len(), 1);
        assert!(table.peer(held.address).is_none());
        // The older connections' cleanup changes nothing.
        table.remove(held.address, first.id, wall0());
        table.remove(held.address, second.id, wall0());
        assert_eq!(table.peer(wanted).map(|p| p.remote), Some(third.remote));
        // The freed address goes to the next dynamic request.
        let (other, _rx) = link(&table, 4);
        assert_eq!(
            table
                .admit(Request::Dynamic, &other, t0(), wall0())
                .map(|g| g.address),
            Ok(held.address)
        );
    }

    #[test]
    fn a_key_that_keeps_taking_over_is_refused_and_the_holder_stays() {
        let table = new_table();
        let t0 = t0();
        let mut holder = None;
        for i in 0..=crate::daemon::takeover::MAX_TAKEOVERS as u16 {
            let (peer, rx) = tls_peer(&table, 10 + i);
            let at = t0 + Duration::from_secs(u64::from(i));
            table
                .admit(Request::Dynamic, &peer, at, wall0())
                .expect("taken over");
            holder = Some((peer, rx));
        }
        let (peer, _rx) = tls_peer(&table, 99);
        let at = t0 + Duration::from_secs(5);
        let refused = table.admit(Request::Dynamic, &peer, at, wall0());
        assert!(
            matches!(
                refused,
                Err(Refusal::KeyFlapping {
                    takeovers: 4,
                    retry_after_secs: 5
                })
            ),
            "{refused:?}"
        );
        let (holder, _rx) = holder.expect("a holder");
        assert!(!holder.kick.is_cancelled(), "the holder keeps its session");
        assert_eq!(table.len(), 1);
        let key = holder.identity.key().expect("key");
        assert_eq!(
            table.takeover_backoff(&key, at + Duration::from_secs(1)),
            Some(Duration::from_secs(4))
        );
    }

    fn tls(key: PublicKey) -> Identity {
        Identity::Tls {
            key,
            name: None,
            fixed: None,
        }
    }

    #[test]
    fn a_key_keeps_its_leased_address_while_away_until_the_lease_expires() {
        let table = table_of("198.19.0.0/29", &[]);
        let key = PublicKey::from_raw(&[1; 32]).expect("key");
        table.restore(Vec::new(), Vec::new(), Duration::from_secs(3600));
        let (first, _rx) = peer_with(&table, 1000, tls(key));
        let address = table
            .admit(Request::Dynamic, &first, t0(), wall0())
            .map(|g| g.address)
            .expect("grant");
        let lease = table
            .remove(address, first.id, wall0())
            .expect("a lease is kept");
        assert_eq!(lease.address, address);
        // Away: nobody else gets it, not even by asking for it.
        let (other, _rx) = link(&table, 1001);
        assert_eq!(
            table
                .admit(Request::Static(address), &other, t0(), wall0())
                .map(|g| g.address),
            Err(Refusal::Taken(address))
        );
        let (other, _rx) = link(&table, 1002);
        assert_ne!(
            table
                .admit(Request::Dynamic, &other, t0(), wall0())
                .map(|g| g.address),
            Ok(address)
        );
        // Back, from elsewhere, asking for anything: its address again.
        let (again, _rx) = peer_with(&table, 2000, tls(key));
        assert_eq!(
            table
                .admit(Request::Dynamic, &again, t0(), wall0())
                .map(|g| g.address),
            Ok(address)
        );
        table.remove(address, again.id, wall0());

        // After a restart with an expired lease, the address is free again.
        let restarted = table_of("198.19.0.0/29", &[]);
        let expired = Lease {
            expires: wall0() - Duration::from_secs(1),
            ..lease.clone()
        };
        restarted.restore(vec![expired], Vec::new(), Duration::from_secs(3600));
        let (other, _rx) = link(&restarted, 1003);
        assert_eq!(
            restarted
                .admit(Request::Static(address), &other, t0(), wall0())
                .map(|g| g.address),
            Ok(address)
        );
        // A live one is honoured after a restart.
        let restarted = table_of("198.19.0.0/29", &[]);
        restarted.restore(vec![lease], Vec::new(), Duration::from_secs(3600));
        let free_before = restarted.free_count();
        let (back, _rx) = peer_with(&restarted, 2001, tls(key));
        assert_eq!(
            restarted
                .admit(Request::Dynamic, &back, t0(), wall0())
                .map(|g| g.address),
            Ok(address)
        );
        assert_eq!(restarted.free_count(), free_before);
    }

    /// An extension (ALPN simplevpn/2) TLS peer of `key`.
    fn extension_peer(
        table: &PeerTable,
        port: u16,
        key: PublicKey,
    ) -> (Arc<Peer>, crate::connection::QueueRx) {
        peer_with_extension(table, port, tls(key))
    }

    /// A peer with `identity` that speaks the extension.
    fn peer_with_extension(
        table: &PeerTable,
        port: u16,
        identity: Identity,
    ) -> (Arc<Peer>, crate::connection::QueueRx) {
        let (queue, rx) = crate::connection::queue(4, 1 << 20, None);
        let remote = SocketAddr::from(([198, 18, 0, 2], port));
        (
            table.new_peer(remote, identity, Vec::new(), queue, true, wall0()),
            rx,
        )
    }

    fn dual_stack(fixed6: &[(PublicKey, &str)]) -> PeerTable {
        let fixed6 = fixed6
            .iter()
            .map(|(k, a)| (*k, a.parse().expect("v6")))
            .collect();
        table_of("198.19.0.0/24", &[])
            .with_ipv6(Some("2001:2:0:100::/64".parse().expect("net")), fixed6)
    }

    #[test]
    fn in_a_cluster_the_ipv6_address_is_the_claimed_one_and_the_pool_only_marks_it_used() {
        let v6 = |s: &str| -> Ipv6Addr { s.parse().expect("v6") };
        let (k1, k2) = (
            PublicKey::from_raw(&[1; 32]).expect("key"),
            PublicKey::from_raw(&[2; 32]).expect("key"),
        );
        let table = dual_stack(&[]);
        let (a, _rx) = extension_peer(&table, 1001, k1);
        let claimed = v6("2001:2:0:100::77");
        let grant = table
            .admit_claimed(
                Request::Static(Ipv4Addr::new(198, 19, 0, 9)),
                Some(claimed),
                &a,
                t0(),
                wall0(),
            )
            .expect("grant");
        assert_eq!(grant.address6, Some(claimed));
        assert!(!table.is_free(claimed), "reserved here");
        assert_eq!(table.peer(claimed).map(|p| p.address), Some(grant.address));
        // Claimed none (every IPv6 address held in the cluster): IPv4 only,
        // nothing taken from this server's pool.
        let (b, _rx) = extension_peer(&table, 1002, k2);
        let b_grant = table
            .admit_claimed(
                Request::Static(Ipv4Addr::new(198, 19, 0, 10)),
                None,
                &b,
                t0(),
                wall0(),
            )
            .expect("grant");
        assert_eq!(b_grant.address6, None);
        assert!(table.is_free(v6("2001:2:0:100::2")));
        // A's newer session is claimed another address: the old one is
        // free here again.
        let (a2, _rx) = extension_peer(&table, 1003, k1);
        let moved = v6("2001:2:0:100::78");
        let again = table
            .admit_claimed(
                Request::Static(grant.address),
                Some(moved),
                &a2,
                t0(),
                wall0(),
            )
            .expect("grant");
        assert_eq!(again.address6, Some(moved));
        assert!(table.is_free(claimed) && !table.is_free(moved));
        assert!(table
            .kick(moved)
            .is_some_and(|p| p.address == grant.address));
    }

    #[test]
    fn extension_peers_get_a_sticky_ipv6_address_and_original_ones_none() {
        let v6 = |s: &str| -> Ipv6Addr { s.parse().expect("v6") };
        let (k1, k2, k3) = (
            PublicKey::from_raw(&[1; 32]).expect("key"),
            PublicKey::from_raw(&[2; 32]).expect("key"),
            PublicKey::from_raw(&[3; 32]).expect("key"),
        );
        let table = dual_stack(&[(k3, "2001:2:0:100::99")]);
        table.restore(Vec::new(), Vec::new(), Duration::from_secs(3600));
        assert_eq!(table.free_count6(), Some((1u128 << 64) - 3));
        let (original, _rx) = link(&table, 1000);
        let granted = table
            .admit(Request::Dynamic, &original, t0(), wall0())
            .expect("grant");
        assert_eq!(granted.address6, None);
        let (a, _rx) = extension_peer(&table, 1001, k1);
        let a_grant = table
            .admit(Request::Dynamic, &a, t0(), wall0())
            .expect("grant");
        assert_eq!(a_grant.address6, Some(v6("2001:2:0:100::2")));
        let (b, _rx) = extension_peer(&table, 1002, k2);
        let b_grant = table
            .admit(Request::Dynamic, &b, t0(), wall0())
            .expect("grant");
        assert_eq!(b_grant.address6, Some(v6("2001:2:0:100::3")));
        let (c, _rx) = extension_peer(&table, 1003, k3);
        let c_grant = table
            .admit(Request::Dynamic, &c, t0(), wall0())
            .expect("grant");
        assert_eq!(c_grant.address6, Some(v6("2001:2:0:100::99")));
        assert_eq!(
            table.peer(a_grant.address).and_then(|p| p.address6),
            Some(v6("2001:2:0:100::2"))
        );
        // Packets for an IPv6 address go to its holder.
        assert_eq!(
            deliver(&table, v6("2001:2:0:100::3"), Bytes::from_static(b"6")),
            Some(Delivery::Queued)
        );
        assert_eq!(deliver(&table, v6("2001:2:0:100::4"), Bytes::new()), None);
        // Away, its lease keeps both addresses for it; back, it has both.
        let lease = table
            .remove(a_grant.address, a.id, wall0())
            .expect("lease kept");
        assert_eq!(lease.address6, a_grant.address6);
        let (other, _rx) =
            extension_peer(&table, 1004, PublicKey::from_raw(&[4; 32]).expect("key"));
        let other_grant = table
            .admit(Request::Dynamic, &other, t0(), wall0())
            .expect("grant");
        assert_eq!(other_grant.address6, Some(v6("2001:2:0:100::4")));
        let (back, _rx) = extension_peer(&table, 1005, k1);
        let back_grant = table
            .admit(Request::Dynamic, &back, t0(), wall0())
            .expect("grant");
        assert_eq!(
            (back_grant.address, back_grant.address6),
            (a_grant.address, a_grant.address6)
        );
        // A second connection of the same key takes both over.
        let (again, _rx) = extension_peer(&table, 1006, k1);
        let again_grant = table
            .admit(Request::Dynamic, &again, t0(), wall0())
            .expect("grant");
        assert_eq!(again_grant.address6, a_grant.address6);
        assert_eq!(table.remove(a_grant.address, back.id, wall0()), None);
        // The key back without the extension: IPv4 only, its IPv6 address freed.
        let free = table.free_count6();
        let (plain, _rx) = peer_with(&table, 1007, tls(k1));
        let plain_grant = table
            .admit(Request::Dynamic, &plain, t0(), wall0())
            .expect("grant");
        assert_eq!(
            (plain_grant.address, plain_grant.address6),
            (a_grant.address, None)
        );
        assert_eq!(table.free_count6(), free.map(|f| f + 1));
        table.remove(plain_grant.address, plain.id, wall0());
        let (again, _rx) = extension_peer(&table, 1008, k1);
        let again_grant = table
            .admit(Request::Dynamic, &again, t0(), wall0())
            .expect("grant");
        assert_eq!(
            again_grant.address6, a_grant.address6,
            "the lowest free again"
        );
        let lease = table.lease_of(&k1).expect("a lease");

        // After a restart the lease is honoured for both addresses.
        let restarted = dual_stack(&[]);
        restarted.restore(vec![lease], Vec::new(), Duration::from_secs(3600));
        let (first, _rx) = extension_peer(&restarted, 2000, k2);
        assert_eq!(
            restarted
                .admit(Request::Dynamic, &first, t0(), wall0())
                .expect("grant")
                .address6,
            Some(v6("2001:2:0:100::3")),
            "the leased ::2 is not handed to another key"
        );
        let (back, _rx) = extension_peer(&restarted, 2001, k1);
        let grant = restarted
            .admit(Request::Dynamic, &back, t0(), wall0())
            .expect("grant");
        assert_eq!(
            (grant.address, grant.address6),
            (a_grant.address, a_grant.address6)
        );
    }

    #[test]
    fn a_lease_ended_by_a_fixed_address_frees_its_ipv6_address_too() {
        let table = dual_stack(&[]);
        table.restore(Vec::new(), Vec::new(), Duration::from_secs(3600));
        let key = PublicKey::from_raw(&[1; 32]).expect("key");
        let (peer, _rx) = extension_peer(&table, 1000, key);
        let grant = table
            .admit(Request::Dynamic, &peer, t0(), wall0())
            .expect("grant");
        let lease = table
            .remove(grant.address, peer.id, wall0())
            .expect("leased");
        assert_eq!(lease.address6, grant.address6);
        let free = table.free_count6();
        let fixed = Ipv4Addr::new(198, 19, 0, 99);
        table
            .set_fixed(&HashMap::from([(fixed, key)]))
            .expect("free");
        assert_eq!(table.lease_of(&key), None);
        assert_eq!(table.free_count6(), free.map(|f| f + 1));
    }

    #[test]
    fn an_ipv6_address_without_a_lease_goes_back_to_the_pool() {
        let table = dual_stack(&[]);
        let key = PublicKey::from_raw(&[1; 32]).expect("key");
        let identity = Identity::Tls {
            key,
            name: None,
            fixed: Some(Ipv4Addr::new(198, 19, 0, 50)),
        };
        let (fixed, _rx) = peer_with_extension(&table, 1000, identity);
        let grant = table
            .admit(Request::Dynamic, &fixed, t0(), wall0())
            .expect("grant");
        assert_eq!(grant.address6, Some("2001:2:0:100::2".parse().expect("v6")));
        let free = table.free_count6();
        assert_eq!(table.remove(grant.address, fixed.id, wall0()), None);
        assert_eq!(table.free_count6().map(|f| f - 1), free);
        // Without a lease, a key still gets its last address back while it
        // is free (not the lowest free one).
        let fixed_key = |n: u8, port: u16| {
            let identity = Identity::Tls {
                key: PublicKey::from_raw(&[n; 32]).expect("key"),
                name: None,
                fixed: Some(Ipv4Addr::new(198, 19, 0, 50 + n)),
            };
            peer_with_extension(&table, port, identity)
        };
        let (f, _rx) = fixed_key(5, 2000);
        let (g, _rx) = fixed_key(6, 2001);
        let f_grant = table
            .admit(Request::Dynamic, &f, t0(), wall0())
            .expect("grant");
        let g_grant = table
            .admit(Request::Dynamic, &g, t0(), wall0())
            .expect("grant");
        assert_eq!(f_grant.address6, grant.address6, "the lowest free");
        table.remove(f_grant.address, f.id, wall0());
        table.remove(g_grant.address, g.id, wall0());
        let (g_again, _rx) = fixed_key(6, 2002);
        let back = table
            .admit(Request::Dynamic, &g_again, t0(), wall0())
            .expect("grant");
        assert_eq!(back.address6, g_grant.address6);
        // Nor does a table without network6 give any.
        let v4_only = new_table();
        let (peer, _rx) = extension_peer(&v4_only, 1001, key);
        assert_eq!(
            v4_only
                .admit(Request::Dynamic, &peer, t0(), wall0())
                .expect("grant")
                .address6,
            None
        );
        assert_eq!(v4_only.free_count6(), None);
    }

    #[test]
    fn restored_bans_refuse_until_they_expire() {
        let table = new_table();
        let now = wall0();
        let who = Banned::Key(PublicKey::from_raw(&[2; 32]).expect("key"));
        let ban = Ban {
            who: who.clone(),
            until: now + Duration::from_secs(30),
            reason: "kicked by uid 0".into(),
        };
        table.restore(Vec::new(), vec![ban], Duration::from_secs(60));
        assert!(table.ban_remaining(&who, now).is_some());
        assert!(table
            .ban_remaining(&who, now + Duration::from_secs(31))
            .is_none());
    }

    #[test]
    fn fixed_addresses_change_live_but_never_take_one_in_use() {
        let table = new_table();
        let (a, _rx) = link(&table, 1000);
        let held = table
            .admit(Request::Dynamic, &a, t0(), wall0())
            .map(|g| g.address)
            .expect("grant");
        let key = PublicKey::from_raw(&[3; 32]).expect("key");
        let other = Ipv4Addr::new(198, 19, 0, 50);
        assert_eq!(
            table.set_fixed(&HashMap::from([(held, key)])),
            Err(Refusal::Taken(held))
        );
        table
            .set_fixed(&HashMap::from([(other, key)]))
            .expect("free");
        let (b, _rx) = link(&table, 1001);
        assert_eq!(
            table
                .admit(Request::Static(other), &b, t0(), wall0())
                .map(|g| g.address),
            Err(Refusal::Taken(other))
        );
        table.set_fixed(&HashMap::new()).expect("none");
        assert_eq!(
            table
                .admit(Request::Static(other), &b, t0(), wall0())
                .map(|g| g.address),
            Ok(other)
        );
    }

    #[test]
    fn a_lease_ends_exactly_when_its_time_is_up() {
        let table = table_of("198.19.0.0/29", &[]);
        let lease_time = Duration::from_secs(3600);
        table.restore(Vec::new(), Vec::new(), lease_time);
        let key = PublicKey::from_raw(&[1; 32]).expect("key");
        let (first, _rx) = peer_with(&table, 1000, tls(key));
        let address = table
            .admit(Request::Dynamic, &first, t0(), wall0())
            .expect("grant")
            .address;
        let left = wall0() + Duration::from_secs(10);
        let lease = table.remove(address, first.id, left).expect("leased");
        assert_eq!(lease.expires, left + lease_time, "it runs from the leaving");
        let (other, _rx) = link(&table, 1001);
        let just_before = lease.expires - Duration::from_nanos(1);
        assert_eq!(
            table
                .admit(Request::Static(address), &other, t0(), just_before)
                .map(|g| g.address),
            Err(Refusal::Taken(address))
        );
        assert_eq!(table.lease_of(&key), Some(lease.clone()));
        assert_eq!(
            table
                .admit(Request::Static(address), &other, t0(), lease.expires)
                .map(|g| g.address),
            Ok(address)
        );
        assert_eq!(table.lease_of(&key), None);
    }

    #[test]
    fn a_ban_lapses_at_its_end_and_a_later_ban_clears_it_out() {
        let table = new_table();
        // By key: one remote address serves both in these tests.
        let key = |n: u8| tls(PublicKey::from_raw(&[n; 32]).expect("key"));
        let (a, _rx) = peer_with(&table, 1000, key(1));
        let (b, _rx) = peer_with(&table, 1001, key(2));
        let a_address = table
            .admit(Request::Dynamic, &a, t0(), wall0())
            .expect("a")
            .address;
        let b_address = table
            .admit(Request::Dynamic, &b, t0(), wall0())
            .expect("b")
            .address;
        let a_who = Banned::of(&a.identity, a.remote.ip());
        let until = wall0() + Duration::from_secs(60);
        table
            .ban(a_address, until, "first", wall0())
            .expect("a banned");
        let last_moment = until - Duration::from_nanos(1);
        assert_eq!(
            table.ban_remaining(&a_who, last_moment),
            Some(Duration::from_nanos(1))
        );
        assert_eq!(table.ban_remaining(&a_who, until), None, "lapsed");
        assert!(table.bans(until).is_empty());
        let reasons = |at: SystemTime| -> Vec<String> {
            table.bans(at).into_iter().map(|b| b.reason).collect()
        };
        assert_eq!(reasons(wall0()), ["first"], "kept, though lapsed");
        // A ban made after it lapsed clears it out, so old bans do not
        // pile up.
        table
            .ban(b_address, until + Duration::from_secs(60), "second", until)
            .expect("b banned");
        assert_eq!(reasons(wall0()), ["second"]);
        assert!(!table.unban(&a_who, until), "none in force to lift");
    }

    #[test]
    fn over_the_budget_the_largest_queue_is_shed_once_per_interval() {
        let table = new_table();
        let budget = table.budget_handle();
        let admitted = |port: u16| {
            let (queue, rx) = crate::connection::queue(1000, 8 << 20, Some(budget.clone()));
            let remote = SocketAddr::from(([198, 18, 0, 2], port));
            let peer = table.new_peer(
                remote,
                Identity::Original,
                Vec::new(),
                queue,
                false,
                wall0(),
            );
            table
                .admit(Request::Dynamic, &peer, t0(), wall0())
                .expect("grant");
            (peer, rx)
        };
        let (big, _big_rx) = admitted(1000);
        let (small, _small_rx) = admitted(1001);
        let frame = || Bytes::from(vec![0; 64 << 10]);
        let spent = (0..100)
            .find(|_| matches!(table.push(&big, frame(), wall0), Delivery::QueueFull))
            .is_some();
        assert!(spent, "the budget is spent");
        assert!(big.shed.load(Ordering::Relaxed) && big.kick.is_cancelled());
        assert_eq!(budget.closed(), 1);
        // Within the interval, no more, however often the budget is hit.
        let soon = wall0() + Duration::from_millis(SHED_INTERVAL_MS - 1);
        for _ in 0..3 {
            table.push(&small, frame(), || soon);
        }
        assert!(!small.kick.is_cancelled());
        assert_eq!(budget.closed(), 1);
        // Then the largest of those still open: the only one left.
        let later = wall0() + Duration::from_millis(SHED_INTERVAL_MS);
        assert!(matches!(
            table.push(&small, frame(), || later),
            Delivery::QueueFull
        ));
        assert!(small.shed.load(Ordering::Relaxed) && small.kick.is_cancelled());
        assert_eq!(budget.closed(), 2);
    }
}
