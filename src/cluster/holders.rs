//! Who holds which address in the cluster, as this server last saw it:
//! read once from etcd when it joins (and after a broken watch), then kept
//! current by the watch. It answers, without a round trip to etcd, where a
//! packet for another server's client goes, which addresses a new grant
//! need not try, and which address a TLS key already holds.
//!
//! It may lag etcd by the watch's delay, so it only proposes: every grant
//! is still an etcd transaction that fails if the address is taken.

use std::collections::HashMap;
use std::net::IpAddr;

use super::leases::{Claimant, Family, Holder};
use crate::keys::PublicKey;

/// The address holders seen, by address and by key.
#[derive(Debug, Default)]
pub struct Holders {
    by_address: HashMap<IpAddr, Holder>,
    /// The address of each family each TLS key holds (an original-protocol
    /// claimant, a remote address, may hold several: it is not indexed).
    by_key: HashMap<(PublicKey, Family), IpAddr>,
}

impl Holders {
    /// The view of a full read of the leases.
    pub fn from_all(all: impl IntoIterator<Item = (IpAddr, Holder)>) -> Holders {
        let mut holders = Holders::default();
        for (address, holder) in all {
            holders.put(address, holder);
        }
        holders
    }

    /// `holder` holds `address` now.
    pub fn put(&mut self, address: IpAddr, holder: Holder) {
        if let Claimant::Key(key) = holder.claimant {
            self.by_key.insert((key, Family::of(address)), address);
        }
        if let Some(old) = self.by_address.insert(address, holder) {
            self.unindex(address, &old);
        }
    }

    /// Nobody holds `address` now.
    pub fn remove(&mut self, address: IpAddr) {
        if let Some(old) = self.by_address.remove(&address) {
            self.unindex(address, &old);
        }
    }

    /// Drops `old`'s key entry if it still points at `address` (and the
    /// address's new holder is not that key).
    fn unindex(&mut self, address: IpAddr, old: &Holder) {
        let Claimant::Key(key) = old.claimant else {
            return;
        };
        let still = self
            .by_address
            .get(&address)
            .is_some_and(|h| h.claimant == old.claimant);
        let indexed = (key, Family::of(address));
        if !still && self.by_key.get(&indexed) == Some(&address) {
            self.by_key.remove(&indexed);
        }
    }

    /// The server whose client holds `address`.
    pub fn node(&self, address: IpAddr) -> Option<&str> {
        self.by_address.get(&address).map(|h| h.node.as_str())
    }

    /// Who holds `address`.
    pub fn holder(&self, address: IpAddr) -> Option<&Holder> {
        self.by_address.get(&address)
    }

    /// Whether anyone holds `address`.
    pub fn is_held(&self, address: IpAddr) -> bool {
        self.by_address.contains_key(&address)
    }

    /// The address of `family` `key` holds, on any server.
    pub fn of_key(&self, key: &PublicKey, family: Family) -> Option<IpAddr> {
        self.by_key.get(&(*key, family)).copied()
    }

    pub fn len(&self) -> usize {
        self.by_address.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_address.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_raw(&[n; 32]).expect("key")
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 19, 0, last])
    }

    fn ip6(last: u16) -> IpAddr {
        IpAddr::from([0x2001, 2, 0, 0x100, 0, 0, 0, last])
    }

    fn by(node: &str, claimant: Claimant) -> Holder {
        Holder {
            node: node.into(),
            claimant,
        }
    }

    #[test]
    fn a_key_is_found_where_it_holds_and_forgotten_when_it_leaves() {
        let mut holders = Holders::from_all([
            (ip(2), by("s1", Claimant::Key(key(1)))),
            (
                ip(3),
                by("s2", Claimant::Remote("198.18.1.2".parse().expect("ip"))),
            ),
        ]);
        assert_eq!(holders.of_key(&key(1), Family::V4), Some(ip(2)));
        assert_eq!(holders.node(ip(3)), Some("s2"));
        assert!(holders.is_held(ip(3)) && !holders.is_held(ip(4)));
        assert_eq!(holders.len(), 2);

        // Moved to another server: same address, new node.
        holders.put(ip(2), by("s2", Claimant::Key(key(1))));
        assert_eq!(holders.of_key(&key(1), Family::V4), Some(ip(2)));
        assert_eq!(holders.node(ip(2)), Some("s2"));

        // Another client took the address: the key holds nothing.
        holders.put(ip(2), by("s1", Claimant::Key(key(2))));
        assert_eq!(holders.of_key(&key(1), Family::V4), None);
        assert_eq!(holders.of_key(&key(2), Family::V4), Some(ip(2)));

        holders.remove(ip(2));
        assert_eq!(holders.of_key(&key(2), Family::V4), None);
        assert!(!holders.is_held(ip(2)));
        assert_eq!(holders.holder(ip(3)).map(|h| h.node.as_str()), Some("s2"));
    }

    #[test]
    fn a_key_that_moved_to_a_new_address_keeps_it_when_the_old_one_goes() {
        let mut holders = Holders::default();
        holders.put(ip(2), by("s1", Claimant::Key(key(1))));
        holders.put(ip(5), by("s2", Claimant::Key(key(1))));
        // The old key's deletion arrives after the new one's creation.
        holders.remove(ip(2));
        assert_eq!(holders.of_key(&key(1), Family::V4), Some(ip(5)));
        holders.remove(ip(5));
        assert_eq!(holders.of_key(&key(1), Family::V4), None);
        assert!(holders.is_empty());
    }

    #[test]
    fn a_key_holds_one_address_of_each_family() {
        let mut holders = Holders::default();
        holders.put(ip(2), by("s1", Claimant::Key(key(1))));
        holders.put(ip6(2), by("s1", Claimant::Key(key(1))));
        assert_eq!(holders.of_key(&key(1), Family::V4), Some(ip(2)));
        assert_eq!(holders.of_key(&key(1), Family::V6), Some(ip6(2)));
        // Failed over: the IPv6 address moved to s2, the IPv4 one not yet.
        holders.put(ip6(2), by("s2", Claimant::Key(key(1))));
        assert_eq!(holders.node(ip6(2)), Some("s2"));
        assert_eq!(holders.node(ip(2)), Some("s1"));
        // The IPv4 address freed: the IPv6 one is still the key's.
        holders.remove(ip(2));
        assert_eq!(holders.of_key(&key(1), Family::V4), None);
        assert_eq!(holders.of_key(&key(1), Family::V6), Some(ip6(2)));
        holders.remove(ip6(2));
        assert!(holders.is_empty());
    }
}
