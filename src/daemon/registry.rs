//! The server's peer table: who holds which tunnel address, and the queue that
//! reaches each of them. One lock guards the table and the pool together; it
//! is held only for map operations and non-blocking queue pushes, never across
//! I/O, so a stuck client cannot stall anyone else.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use ipnet::Ipv4Net;
use tokio::sync::mpsc;

use crate::pool::{AddressPool, Refusal};
use crate::wire::{Control, Request};

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
}

impl PeerStats {
    pub fn count_rx(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn count_tx(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// What the table keeps of a connected client that holds an address.
#[derive(Debug, Clone)]
pub struct PeerLink {
    /// Tells one connection from the next that holds the same address.
    pub id: u64,
    pub remote: SocketAddr,
    pub queue: mpsc::Sender<Bytes>,
    pub stats: Arc<PeerStats>,
}

/// Where a packet went.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the peer that holds the destination address.
    Queued,
    /// That peer's queue was full: dropped and counted.
    QueueFull,
    /// No connected peer holds the destination.
    NoPeer,
}

struct Table {
    pool: AddressPool,
    peers: HashMap<Ipv4Addr, PeerLink>,
}

/// The shared peer table of one server.
pub struct Registry {
    table: RwLock<Table>,
    next_id: AtomicU64,
}

impl Registry {
    pub fn new(network: Ipv4Net) -> Registry {
        Registry {
            table: RwLock::new(Table {
                pool: AddressPool::new(network),
                peers: HashMap::new(),
            }),
            next_id: AtomicU64::new(1),
        }
    }

    /// A fresh connection id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The network's netmask, pushed in every grant.
    pub fn netmask(&self) -> Ipv4Addr {
        self.read().pool.network().netmask()
    }

    /// Grants an address for `request` (Dynamic or Static) to the connection
    /// `link`, enters it in the table and queues the grant to it, all under
    /// one lock, so that the grant goes out before any packet for the new
    /// address can.
    pub fn admit(&self, request: Request, link: PeerLink) -> Result<Ipv4Addr, Refusal> {
        let mut table = self.write();
        let remote = link.remote.ip();
        let address = match request {
            Request::Static(wanted) => table.pool.claim(wanted, remote).map(|()| wanted),
            Request::Dynamic | Request::Keepalive => table.pool.allocate(remote),
        }?;
        let grant = Control::grant(address, Some(table.pool.network().netmask()));
        // The queue is new and empty: this push cannot fail for lack of room.
        let _ = link.queue.try_send(Bytes::copy_from_slice(&grant.encode()));
        table.peers.insert(address, link);
        Ok(address)
    }

    /// Removes connection `id` from `address` and frees the address. Does
    /// nothing if another connection holds it by now.
    pub fn remove(&self, address: Ipv4Addr, id: u64) {
        let mut table = self.write();
        if table.peers.get(&address).is_some_and(|p| p.id == id) {
            table.peers.remove(&address);
            table.pool.release(address);
        }
    }

    /// Queues `packet` for the peer that holds `destination`, without waiting.
    pub fn deliver(&self, destination: Ipv4Addr, packet: Bytes) -> Delivery {
        let table = self.read();
        let Some(peer) = table.peers.get(&destination) else {
            return Delivery::NoPeer;
        };
        let len = packet.len();
        match peer.queue.try_send(packet) {
            Ok(()) => {
                peer.stats.count_tx(len);
                Delivery::Queued
            }
            Err(_) => {
                peer.stats
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                Delivery::QueueFull
            }
        }
    }

    /// How many clients hold an address.
    pub fn len(&self) -> usize {
        self.read().peers.len()
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

    fn link(registry: &Registry, port: u16) -> (PeerLink, mpsc::Receiver<Bytes>) {
        let (queue, rx) = mpsc::channel(2);
        let link = PeerLink {
            id: registry.next_id(),
            remote: SocketAddr::from(([198, 18, 0, 2], port)),
            queue,
            stats: Arc::default(),
        };
        (link, rx)
    }

    #[test]
    fn grant_goes_out_first_and_packets_follow() {
        let registry = Registry::new("198.19.0.0/16".parse().expect("net"));
        let (a, mut rx) = link(&registry, 1000);
        let stats = a.stats.clone();
        let address = registry.admit(Request::Dynamic, a).expect("grant");
        assert_eq!(address, Ipv4Addr::new(198, 19, 0, 2));
        let grant = rx.try_recv().expect("grant queued");
        assert_eq!(&grant[12..16], &[255, 255, 0, 0]);
        assert_eq!(&grant[16..20], &[198, 19, 0, 2]);
        assert_eq!(
            registry.deliver(address, Bytes::from_static(b"one")),
            Delivery::Queued
        );
        assert_eq!(
            registry.deliver(address, Bytes::from_static(b"two")),
            Delivery::Queued
        );
        assert_eq!(
            registry.deliver(address, Bytes::from_static(b"three")),
            Delivery::QueueFull
        );
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 1);
        assert_eq!(stats.tx_packets.load(Ordering::Relaxed), 2);
        assert_eq!(
            registry.deliver(Ipv4Addr::new(198, 19, 0, 9), Bytes::new()),
            Delivery::NoPeer
        );
    }

    #[test]
    fn remove_frees_only_its_own_address() {
        let registry = Registry::new("198.19.0.0/16".parse().expect("net"));
        let (a, _rx_a) = link(&registry, 1000);
        let a_id = a.id;
        let address = registry
            .admit(Request::Static(Ipv4Addr::new(198, 19, 0, 7)), a)
            .expect("grant");
        let (b, _rx_b) = link(&registry, 1001);
        assert_eq!(
            registry.admit(Request::Static(address), b),
            Err(Refusal::Taken(address))
        );
        registry.remove(address, a_id + 100);
        assert_eq!(registry.len(), 1);
        registry.remove(address, a_id);
        assert_eq!(registry.len(), 0);
        let (c, _rx_c) = link(&registry, 1002);
        assert_eq!(registry.admit(Request::Static(address), c), Ok(address));
    }
}
