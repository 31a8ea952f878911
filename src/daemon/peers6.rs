//! The IPv6 side of the peer table (a server with `network6`): who holds
//! which IPv6 address, and the addresses fixed for keys. Only extension
//! clients (TLS with ALPN `simplevpn/2`, which hears the session
//! parameters) get one; original-protocol clients stay IPv4-only. Kept
//! under the peer table's one lock, beside the IPv4 pool
//! ([`super::peers::PeerTable`]).

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::Arc;

use ipnet::Ipv6Net;

use super::peers::Peer;
use crate::keys::PublicKey;
use crate::pool6::{Pool6, Refusal6};

/// The IPv6 addresses of connected peers and the pool they come from.
#[derive(Debug, Default)]
pub struct Six {
    /// `None`: the server has no `network6`.
    pool: Option<Pool6>,
    /// The connection that holds each address.
    holders: HashMap<Ipv6Addr, Arc<Peer>>,
    /// The address each connection holds, by connection id.
    held: HashMap<u64, Ipv6Addr>,
    /// Addresses fixed for keys (`[[server.peer]] address6`), reserved in
    /// the pool for good.
    fixed: HashMap<PublicKey, Ipv6Addr>,
    /// The address each key held last, for a key without a lease (one with
    /// a fixed IPv4 address): it gets it back while it is free. One entry
    /// per key that connected since the start.
    last: HashMap<PublicKey, Ipv6Addr>,
}

impl Six {
    /// Over `network6` (none: IPv4 only), with `fixed` addresses reserved
    /// for their keys (each must be a client address of `network6`).
    pub fn new(network6: Option<Ipv6Net>, fixed: HashMap<PublicKey, Ipv6Addr>) -> Six {
        let mut six = Six {
            pool: network6.map(Pool6::new),
            ..Six::default()
        };
        // A clash was refused by the config already.
        let _ = six.set_fixed(fixed);
        six
    }

    pub fn network(&self) -> Option<Ipv6Net> {
        self.pool.as_ref().map(Pool6::network)
    }

    /// Free addresses; `None` without `network6`.
    pub fn free_count(&self) -> Option<u128> {
        self.pool.as_ref().map(Pool6::free_count)
    }

    /// The address connection `id` holds.
    pub fn of(&self, id: u64) -> Option<Ipv6Addr> {
        self.held.get(&id).copied()
    }

    /// The connection that holds `address`.
    pub fn holder(&self, address: Ipv6Addr) -> Option<&Arc<Peer>> {
        self.holders.get(&address)
    }

    /// Gives `peer` (being admitted) its address: the one fixed for its
    /// key, else `kept` (the one its key held or leases, still reserved),
    /// else the one its key held last if that is free, else the lowest
    /// free one. `None` for a peer that does not speak the
    /// extension, without `network6`, or when the pool is exhausted (then
    /// it is served IPv4 only).
    pub fn assign(&mut self, peer: &Arc<Peer>, kept: Option<Ipv6Addr>) -> Option<Ipv6Addr> {
        let pool = self.pool.as_mut().filter(|_| peer.takes_params())?;
        let key = peer.identity.key();
        let fixed = key.and_then(|k| self.fixed.get(&k).copied());
        let last = || {
            let last = self.last.get(&key?).copied()?;
            pool.claim(last).ok().map(|()| last)
        };
        let address = match fixed.or(kept).or_else(last) {
            Some(address) => address,
            None => match pool.allocate() {
                Ok(address) => address,
                Err(e) => {
                    tracing::warn!(remote = %peer.remote, "no IPv6 address: {e}");
                    return None;
                }
            },
        };
        // The previous holder (an older session of the same key) is
        // unlinked by the caller; its entry must not outlive this one.
        if let Some(old) = self.holders.insert(address, peer.clone()) {
            if old.id != peer.id {
                self.held.remove(&old.id);
            }
        }
        self.held.insert(peer.id, address);
        if let Some(key) = key {
            self.last.insert(key, address);
        }
        Some(address)
    }

    /// Takes connection `id` out; returns its address, which stays
    /// reserved until [`Six::release`].
    pub fn unlink(&mut self, id: u64) -> Option<Ipv6Addr> {
        let address = self.held.remove(&id)?;
        if self.holders.get(&address).is_some_and(|p| p.id == id) {
            self.holders.remove(&address);
        }
        Some(address)
    }

    /// Returns `address` to the pool, unless it is fixed or held.
    pub fn release(&mut self, address: Ipv6Addr) {
        if self.holders.contains_key(&address) || self.fixed.values().any(|a| *a == address) {
            return;
        }
        if let Some(pool) = &mut self.pool {
            pool.release(address);
        }
    }

    /// Whether `address` is a free client address of `network6`.
    pub fn is_free(&self, address: Ipv6Addr) -> bool {
        self.pool.as_ref().is_some_and(|pool| pool.is_free(address))
    }

    /// The address fixed for `key`.
    pub fn fixed_of(&self, key: &PublicKey) -> Option<Ipv6Addr> {
        self.fixed.get(key).copied()
    }

    /// Reserves `address` (a lease kept across a restart); false if it is
    /// not a free client address of `network6` now.
    pub fn reserve(&mut self, address: Ipv6Addr) -> bool {
        self.pool
            .as_mut()
            .is_some_and(|pool| pool.claim(address).is_ok())
    }

    /// Makes `fixed` the fixed addresses: new ones are reserved, those no
    /// longer fixed go back to the pool once free. Refused, changing
    /// nothing, if a new one is in use by another key.
    pub fn set_fixed(&mut self, fixed: HashMap<PublicKey, Ipv6Addr>) -> Result<(), Refusal6> {
        let Some(pool) = &mut self.pool else {
            return Ok(());
        };
        let was_fixed = |a: &Ipv6Addr| self.fixed.values().any(|f| f == a);
        for (key, address) in &fixed {
            let held_by_other = self
                .holders
                .get(address)
                .is_some_and(|p| p.identity.key() != Some(*key));
            let in_use = !was_fixed(address) && !self.holders.contains_key(address);
            if held_by_other || (in_use && !pool.is_free(*address)) {
                return Err(Refusal6::Taken(*address));
            }
            if !pool.contains(*address) {
                return Err(Refusal6::NotInPool(*address));
            }
        }
        for address in self.fixed.values() {
            if !fixed.values().any(|a| a == address) && !self.holders.contains_key(address) {
                pool.release(*address);
            }
        }
        for address in fixed.values() {
            let _ = pool.claim(*address);
        }
        self.fixed = fixed;
        Ok(())
    }
}
