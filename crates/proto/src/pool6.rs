//! The server's IPv6 address pool (`network6`, a /64 to a /120): every
//! address of the network but the first (the subnet-router anycast address)
//! and the server's own (`::1` of the prefix). A /64 holds 2^64 addresses,
//! so the pool remembers the addresses in use, not the free ones: its memory
//! grows with the clients, never with the network.

use std::collections::BTreeSet;
use std::net::Ipv6Addr;

use ipnet::Ipv6Net;

/// Why an IPv6 address cannot be given out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal6 {
    #[error("{0} is not a client address of the IPv6 network")]
    NotInPool(Ipv6Addr),
    #[error("{0} is held by another client")]
    Taken(Ipv6Addr),
    #[error("the IPv6 pool is exhausted")]
    Exhausted,
}

/// The IPv6 addresses in use, and the lowest that may be free.
#[derive(Debug)]
pub struct Pool6 {
    network: Ipv6Net,
    /// Offsets from the network address of the addresses in use (2 and up).
    used: BTreeSet<u128>,
    /// No offset below this one is free.
    lowest_free: u128,
    /// Addresses in the network (2^(128 - prefix)).
    size: u128,
}

/// The first offset a client may hold: 0 is the subnet-router anycast
/// address, 1 the server's.
const FIRST_CLIENT: u128 = 2;

impl Pool6 {
    /// A pool over `network` (its host bits are ignored). The network must
    /// hold the server and one client at least (prefix at most /126).
    pub fn new(network: Ipv6Net) -> Pool6 {
        let host_bits = 128 - u32::from(network.prefix_len());
        Pool6 {
            network: network.trunc(),
            used: BTreeSet::new(),
            lowest_free: FIRST_CLIENT,
            size: 1u128.checked_shl(host_bits).unwrap_or(u128::MAX),
        }
    }

    pub fn network(&self) -> Ipv6Net {
        self.network
    }

    /// Free addresses (2^64 - 2 in an empty /64).
    pub fn free_count(&self) -> u128 {
        self.size - FIRST_CLIENT - self.used.len() as u128
    }

    /// Whether `address` is one the pool can give a client (free or not).
    pub fn contains(&self, address: Ipv6Addr) -> bool {
        self.offset(address).is_some()
    }

    /// Whether `address` is in the pool and free.
    pub fn is_free(&self, address: Ipv6Addr) -> bool {
        self.offset(address)
            .is_some_and(|o| !self.used.contains(&o))
    }

    /// The lowest free address, now in use.
    pub fn allocate(&mut self) -> Result<Ipv6Addr, Refusal6> {
        let mut candidate = self.lowest_free;
        for &used in self.used.range(candidate..) {
            if used != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate >= self.size {
            return Err(Refusal6::Exhausted);
        }
        self.used.insert(candidate);
        self.lowest_free = candidate + 1;
        Ok(self.address(candidate))
    }

    /// Takes `address` (a fixed address, a lease kept across a restart).
    pub fn claim(&mut self, address: Ipv6Addr) -> Result<(), Refusal6> {
        let offset = self.offset(address).ok_or(Refusal6::NotInPool(address))?;
        match self.used.insert(offset) {
            true => Ok(()),
            false => Err(Refusal6::Taken(address)),
        }
    }

    /// Returns `address` to the pool.
    pub fn release(&mut self, address: Ipv6Addr) {
        if let Some(offset) = self.offset(address) {
            if self.used.remove(&offset) {
                self.lowest_free = self.lowest_free.min(offset);
            }
        }
    }

    fn offset(&self, address: Ipv6Addr) -> Option<u128> {
        let offset = u128::from(address).checked_sub(u128::from(self.network.network()))?;
        (self.network.contains(&address) && offset >= FIRST_CLIENT).then_some(offset)
    }

    fn address(&self, offset: u128) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.network.network()) + offset)
    }
}

/// The server's IPv6 tunnel address: `::1` of `network`'s prefix.
pub fn server_address6(network: Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(network.network()) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv6Net {
        s.parse().expect("test network")
    }
    fn ip(s: &str) -> Ipv6Addr {
        s.parse().expect("test address")
    }

    #[test]
    fn hands_out_from_2_lowest_first_and_reuses_released() {
        let mut pool = Pool6::new(net("2001:2:0:100::/126"));
        assert_eq!(server_address6(pool.network()), ip("2001:2:0:100::1"));
        assert_eq!(pool.free_count(), 2);
        assert_eq!(pool.allocate(), Ok(ip("2001:2:0:100::2")));
        assert_eq!(pool.allocate(), Ok(ip("2001:2:0:100::3")));
        assert_eq!(pool.allocate(), Err(Refusal6::Exhausted));
        assert_eq!(pool.free_count(), 0);
        pool.release(ip("2001:2:0:100::2"));
        pool.release(ip("2001:2:0:100::2"));
        assert_eq!(pool.free_count(), 1);
        assert_eq!(pool.allocate(), Ok(ip("2001:2:0:100::2")));
    }

    #[test]
    fn a_64_counts_2_to_the_64_and_skips_claimed_addresses() {
        let mut pool = Pool6::new(net("2001:2:0:100::/64"));
        assert_eq!(pool.free_count(), (1u128 << 64) - 2);
        assert_eq!(pool.claim(ip("2001:2:0:100::3")), Ok(()));
        assert_eq!(
            pool.claim(ip("2001:2:0:100::3")),
            Err(Refusal6::Taken(ip("2001:2:0:100::3")))
        );
        assert_eq!(pool.allocate(), Ok(ip("2001:2:0:100::2")));
        assert_eq!(pool.allocate(), Ok(ip("2001:2:0:100::4")));
        assert!(!pool.is_free(ip("2001:2:0:100::4")));
        assert!(pool.is_free(ip("2001:2:0:100:ffff:ffff:ffff:ffff")));
        assert_eq!(pool.free_count(), (1u128 << 64) - 5);
    }

    #[test]
    fn the_first_two_and_foreign_addresses_are_not_in_the_pool() {
        let mut pool = Pool6::new(net("2001:2:0:100::/120"));
        for outside in [
            "2001:2:0:100::",
            "2001:2:0:100::1",
            "2001:2:0:101::5",
            "::1",
        ] {
            assert!(!pool.contains(ip(outside)), "{outside}");
            assert_eq!(
                pool.claim(ip(outside)),
                Err(Refusal6::NotInPool(ip(outside)))
            );
        }
        assert!(pool.contains(ip("2001:2:0:100::ff")));
        assert_eq!(pool.free_count(), 254);
    }
}
