//! The server's address pool: every host address of the network except the
//! network address, the broadcast address and the server's own.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

/// Why an address cannot be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is not in the pool")]
    NotInPool(Ipv4Addr),
    #[error("{0} is held by another client")]
    Taken(Ipv4Addr),
    #[error("the pool is exhausted")]
    Exhausted,
    /// Its key took over its own session too often (used on two hosts at
    /// once?): refused for a while (see `daemon::takeover`).
    #[error(
        "its key took over its own session {takeovers} times within a minute \
         (is it used on two hosts at once?): refused for {retry_after_secs}s"
    )]
    KeyFlapping {
        takeovers: usize,
        retry_after_secs: u64,
    },
    /// A cluster server cannot reach the shared state (etcd), so it grants
    /// nothing that another server might grant too.
    #[error("{0}")]
    ClusterUnavailable(&'static str),
}

/// Free and used addresses, plus a memory of who held which address last, so
/// a client that comes back from the same remote host gets its old address.
#[derive(Debug)]
pub struct AddressPool {
    network: Ipv4Net,
    /// One bit per address of the network, set when in use (or reserved).
    used: Vec<u64>,
    /// No address below this index is free.
    lowest_free: u32,
    free_count: u32,
    /// Last remote host to hold each address, and the reverse. Both are
    /// bounded by the size of the pool.
    last_holder: HashMap<Ipv4Addr, IpAddr>,
    last_address: HashMap<IpAddr, Ipv4Addr>,
}

impl AddressPool {
    /// A pool over `network`, whose first host address is the server's.
    /// The network must have room for the server and at least one client
    /// (prefix at most /30).
    pub fn new(network: Ipv4Net) -> AddressPool {
        let size = 1u64 << (32 - u32::from(network.prefix_len()));
        let words = size.div_ceil(64) as usize;
        let mut pool = AddressPool {
            network: network.trunc(),
            used: vec![0; words],
            lowest_free: 0,
            free_count: 0,
            last_holder: HashMap::new(),
            last_address: HashMap::new(),
        };
        let last = (size - 1) as u32;
        pool.mark(0, true);
        pool.mark(last, true);
        pool.mark(1, true);
        pool.free_count = (size as u32).saturating_sub(3);
        pool.lowest_free = 2;
        pool
    }

    pub fn network(&self) -> Ipv4Net {
        self.network
    }

    pub fn free_count(&self) -> u32 {
        self.free_count
    }

    /// Whether `address` is one the pool can hand out (free or not).
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        self.index(address)
            .is_some_and(|i| i != 0 && i != self.last_index() && i != 1)
    }

    /// Whether `address` is in the pool and free.
    pub fn is_free(&self, address: Ipv4Addr) -> bool {
        self.contains(address) && self.index(address).is_some_and(|i| !self.is_used(i))
    }

    /// A free address for a dynamic request from `remote`: the one that
    /// remote host held last, if free, else the lowest free one.
    pub fn allocate(&mut self, remote: IpAddr) -> Result<Ipv4Addr, Refusal> {
        if let Some(&previous) = self.last_address.get(&remote) {
            if self.claim(previous, remote).is_ok() {
                return Ok(previous);
            }
        }
        let index = self.find_free().ok_or(Refusal::Exhausted)?;
        let address = self.address(index);
        self.take(index, address, remote);
        Ok(address)
    }

    /// Claims `address` for a static request from `remote`.
    pub fn claim(&mut self, address: Ipv4Addr, remote: IpAddr) -> Result<(), Refusal> {
        if !self.contains(address) {
            return Err(Refusal::NotInPool(address));
        }
        let index = self.index(address).ok_or(Refusal::NotInPool(address))?;
        if self.is_used(index) {
            return Err(Refusal::Taken(address));
        }
        self.take(index, address, remote);
        Ok(())
    }

    /// Takes `address` out of the pool for good (a fixed address).
    pub fn reserve(&mut self, address: Ipv4Addr) -> Result<(), Refusal> {
        let index = self
            .index(address)
            .filter(|_| self.contains(address))
            .ok_or(Refusal::NotInPool(address))?;
        if self.is_used(index) {
            return Err(Refusal::Taken(address));
        }
        self.mark(index, true);
        self.free_count -= 1;
        Ok(())
    }

    /// Returns `address` to the pool.
    pub fn release(&mut self, address: Ipv4Addr) {
        if let Some(index) = self.index(address).filter(|_| self.contains(address)) {
            if self.is_used(index) {
                self.mark(index, false);
                self.free_count += 1;
                self.lowest_free = self.lowest_free.min(index);
            }
        }
    }

    fn take(&mut self, index: u32, address: Ipv4Addr, remote: IpAddr) {
        self.mark(index, true);
        self.free_count -= 1;
        if let Some(old_remote) = self.last_holder.insert(address, remote) {
            if self.last_address.get(&old_remote) == Some(&address) {
                self.last_address.remove(&old_remote);
            }
        }
        if let Some(old_address) = self.last_address.insert(remote, address) {
            if old_address != address && self.last_holder.get(&old_address) == Some(&remote) {
                self.last_holder.remove(&old_address);
            }
        }
    }

    fn find_free(&mut self) -> Option<u32> {
        if self.free_count == 0 {
            return None;
        }
        let mut word = (self.lowest_free / 64) as usize;
        while word < self.used.len() {
            let bits = self.used[word];
            if bits != u64::MAX {
                let index = word as u32 * 64 + (!bits).trailing_zeros();
                self.lowest_free = index;
                return Some(index);
            }
            word += 1;
        }
        None
    }

    fn index(&self, address: Ipv4Addr) -> Option<u32> {
        self.network
            .contains(&address)
            .then(|| u32::from(address) - u32::from(self.network.network()))
    }

    fn address(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network.network()) + index)
    }

    fn last_index(&self) -> u32 {
        u32::from(self.network.broadcast()) - u32::from(self.network.network())
    }

    fn is_used(&self, index: u32) -> bool {
        self.used[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    fn mark(&mut self, index: u32, used: bool) {
        let word = &mut self.used[(index / 64) as usize];
        if used {
            *word |= 1 << (index % 64);
        } else {
            *word &= !(1 << (index % 64));
        }
    }
}

/// The server's tunnel address: the first host address of `network`.
pub fn server_address(network: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(network.network()) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test network")
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }
    fn remote(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, n))
    }

    #[test]
    fn hands_out_the_plain_host_range_lowest_first() {
        let mut pool = AddressPool::new(net("198.19.0.0/29"));
        assert_eq!(server_address(pool.network()), ip("198.19.0.1"));
        let got: Vec<_> = (1..=5)
            .map(|n| pool.allocate(remote(n)).expect("free"))
            .collect();
        let want: Vec<_> = (2..=6).map(|n| Ipv4Addr::new(198, 19, 0, n)).collect();
        assert_eq!(got, want);
        assert_eq!(pool.allocate(remote(9)), Err(Refusal::Exhausted));
        pool.release(ip("198.19.0.4"));
        assert_eq!(pool.allocate(remote(9)), Ok(ip("198.19.0.4")));
    }

    #[test]
    fn static_claims() {
        let mut pool = AddressPool::new(net("198.19.0.0/16"));
        assert_eq!(pool.claim(ip("198.19.1.7"), remote(1)), Ok(()));
        assert_eq!(
            pool.claim(ip("198.19.1.7"), remote(2)),
            Err(Refusal::Taken(ip("198.19.1.7")))
        );
        for reserved in ["198.19.0.0", "198.19.0.1", "198.19.255.255", "10.0.0.5"] {
            assert_eq!(
                pool.claim(ip(reserved), remote(1)),
                Err(Refusal::NotInPool(ip(reserved)))
            );
        }
        // A .0 inside the network is an ordinary host address of a /16.
        assert_eq!(pool.claim(ip("198.19.3.0"), remote(1)), Ok(()));
        // Dynamic grants skip claimed addresses.
        assert_eq!(pool.allocate(remote(3)), Ok(ip("198.19.0.2")));
    }

    #[test]
    fn a_returning_remote_gets_its_old_address() {
        let mut pool = AddressPool::new(net("198.19.0.0/16"));
        let a = pool.allocate(remote(1)).expect("a");
        let b = pool.allocate(remote(2)).expect("b");
        pool.release(a);
        pool.release(b);
        assert_eq!(pool.allocate(remote(2)), Ok(b));
        assert_eq!(pool.allocate(remote(1)), Ok(a));
        // Someone else took the old address meanwhile: the lowest free one.
        pool.release(a);
        pool.claim(a, remote(5)).expect("claim");
        pool.release(a);
        assert_eq!(pool.allocate(remote(1)), Ok(a));
    }

    #[test]
    fn free_count_tracks_grants() {
        let mut pool = AddressPool::new(net("198.19.0.0/24"));
        assert_eq!(pool.free_count(), 253);
        let a = pool.allocate(remote(1)).expect("a");
        assert_eq!(pool.free_count(), 252);
        pool.release(a);
        pool.release(a);
        assert_eq!(pool.free_count(), 253);
    }
}
