//! The route table: which value (a peer, a link) owns which address, by
//! longest prefix match, for IPv4 and IPv6 alike. It plays the part of
//! wireguard-go's allowed IPs (device/allowedips.go) and is sans-IO and
//! generic over the value.
//!
//! Layout: per address family, one hash map per prefix length (33 for IPv4,
//! 129 for IPv6), keyed by the network address as an integer, and a short
//! list of the prefix lengths in use, longest first. A lookup masks the
//! address once per length in use and probes that length's map, so it costs
//! at most one hash probe per distinct prefix length in the table (usually a
//! handful) and allocates nothing. Inserts and removals are a hash operation
//! plus, when a length comes into or goes out of use, an update of the short
//! list.
//!
//! The two families never mix: 0.0.0.0/0 matches every IPv4 address and no
//! IPv6 address, ::/0 the other way round, and an IPv4-mapped IPv6 address
//! (::ffff:a.b.c.d) is an IPv6 address like any other.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

use ipnet::IpNet;

/// Whether `a` and `b` share any address: one contains the other. Networks
/// of different families never overlap. Host bits are ignored.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    let (a, b) = (a.trunc(), b.trunc());
    a.contains(&b) || b.contains(&a)
}

/// An address family's integer form of addresses (u32 or u128).
trait Bits: Copy + Eq + Hash {
    /// The address length in bits: 32 or 128.
    const BITS: u8;

    /// `self` with all but the first `len` bits cleared.
    fn masked(self, len: u8) -> Self;
}

impl Bits for u32 {
    const BITS: u8 = 32;

    fn masked(self, len: u8) -> u32 {
        // A shift by 32 would overflow: /0 masks everything.
        self & u32::MAX
            .checked_shl(u32::from(32 - len.min(32)))
            .unwrap_or(0)
    }
}

impl Bits for u128 {
    const BITS: u8 = 128;

    fn masked(self, len: u8) -> u128 {
        self & u128::MAX
            .checked_shl(u32::from(128 - len.min(128)))
            .unwrap_or(0)
    }
}

/// The entries of one address family.
#[derive(Debug, Clone)]
struct Family<K, T> {
    /// Index = prefix length; key = the (masked) network address.
    by_len: Vec<HashMap<K, (IpNet, T)>>,
    /// The prefix lengths whose maps are not empty, longest first.
    in_use: Vec<u8>,
}

impl<K: Bits, T> Family<K, T> {
    fn new() -> Self {
        Family {
            by_len: (0..=K::BITS).map(|_| HashMap::new()).collect(),
            in_use: Vec::new(),
        }
    }

    fn insert(&mut self, key: K, len: u8, net: IpNet, value: T) -> Option<T> {
        let map = &mut self.by_len[usize::from(len)];
        let old = map.insert(key, (net, value)).map(|(_, old)| old);
        if old.is_none() {
            if let Err(at) = self.in_use.binary_search_by(|l| len.cmp(l)) {
                self.in_use.insert(at, len);
            }
        }
        old
    }

    fn remove(&mut self, key: K, len: u8) -> Option<T> {
        let map = &mut self.by_len[usize::from(len)];
        let (_, old) = map.remove(&key)?;
        if map.is_empty() {
            self.in_use.retain(|l| *l != len);
        }
        Some(old)
    }

    fn get(&self, key: K, len: u8) -> Option<&T> {
        self.by_len[usize::from(len)].get(&key).map(|(_, v)| v)
    }

    fn lookup(&self, address: K) -> Option<(IpNet, &T)> {
        self.in_use.iter().find_map(|&len| {
            self.by_len[usize::from(len)]
                .get(&address.masked(len))
                .map(|(net, value)| (*net, value))
        })
    }

    /// Keeps the entries for which `keep` is true; returns how many it removed.
    fn retain(&mut self, keep: &mut impl FnMut(&IpNet, &mut T) -> bool) -> usize {
        let mut removed = 0;
        for map in &mut self.by_len {
            let before = map.len();
            map.retain(|_, (net, value)| keep(net, value));
            removed += before - map.len();
        }
        let by_len = &self.by_len;
        self.in_use
            .retain(|len| !by_len[usize::from(*len)].is_empty());
        removed
    }

    /// All entries, shortest prefix first.
    fn iter(&self) -> impl Iterator<Item = (IpNet, &T)> {
        self.in_use
            .iter()
            .rev()
            .flat_map(|&len| self.by_len[usize::from(len)].values())
            .map(|(net, value)| (*net, value))
    }
}

/// A longest-prefix-match table from IPv4 and IPv6 networks to values.
///
/// Networks are stored normalized (host bits cleared: 10.1.2.3/16 is stored,
/// and reported, as 10.1.0.0/16); each network holds at most one value.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    v4: Family<u32, T>,
    v6: Family<u128, T>,
    len: usize,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable::new()
    }
}

impl<T> RouteTable<T> {
    /// An empty table.
    pub fn new() -> Self {
        RouteTable {
            v4: Family::new(),
            v6: Family::new(),
            len: 0,
        }
    }

    /// Maps `net` (host bits cleared) to `value`. Returns the value the same
    /// network had before, which `value` replaces; networks that merely
    /// overlap `net` are left alone (see [`RouteTable::overlapping`]).
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        let net = net.trunc();
        let old = match net {
            IpNet::V4(n) => self
                .v4
                .insert(u32::from(n.network()), n.prefix_len(), net, value),
            IpNet::V6(n) => self
                .v6
                .insert(u128::from(n.network()), n.prefix_len(), net, value),
        };
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes exactly `net` (host bits ignored), returning its value; a
    /// network that only overlaps it stays.
    pub fn remove(&mut self, net: &IpNet) -> Option<T> {
        let old = match net.trunc() {
            IpNet::V4(n) => self.v4.remove(u32::from(n.network()), n.prefix_len()),
            IpNet::V6(n) => self.v6.remove(u128::from(n.network()), n.prefix_len()),
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The value of exactly `net` (host bits ignored), not of a network
    /// containing it; [`RouteTable::lookup`] is the longest match.
    pub fn get(&self, net: &IpNet) -> Option<&T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.get(u32::from(n.network()), n.prefix_len()),
            IpNet::V6(n) => self.v6.get(u128::from(n.network()), n.prefix_len()),
        }
    }

    /// Keeps only the entries for which `keep(net, value)` returns true
    /// (e.g. drops all routes of one peer when it leaves).
    pub fn retain(&mut self, mut keep: impl FnMut(&IpNet, &mut T) -> bool) {
        let removed = self.v4.retain(&mut keep) + self.v6.retain(&mut keep);
        self.len -= removed;
    }

    /// The most specific entry containing `address`, and its network; None
    /// when no entry of the address's family contains it. On the packet
    /// path: at most one hash probe per prefix length in use, no allocation.
    pub fn lookup(&self, address: IpAddr) -> Option<(IpNet, &T)> {
        match address {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    /// The entries that overlap `net`: those that contain it (including an
    /// exact match) and those it contains. For checking a new route against
    /// the existing ones; it scans the table (not for the packet path).
    pub fn overlapping<'a>(&'a self, net: &IpNet) -> impl Iterator<Item = (IpNet, &'a T)> + 'a {
        let net = net.trunc();
        self.iter().filter(move |(entry, _)| overlaps(entry, &net))
    }

    /// All entries: IPv4 first, then IPv6, each shortest prefix first, in no
    /// particular order within one prefix length.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &T)> {
        self.v4.iter().chain(self.v6.iter())
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test network")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn found<'a>(t: &'a RouteTable<&'static str>, a: &str) -> Option<(String, &'a str)> {
        t.lookup(ip(a)).map(|(n, v)| (n.to_string(), *v))
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = RouteTable::new();
        t.insert(net("10.0.0.0/8"), "eight");
        t.insert(net("10.1.0.0/16"), "sixteen");
        t.insert(net("10.1.2.0/24"), "twentyfour");
        t.insert(net("10.1.2.3/32"), "host");
        assert_eq!(found(&t, "10.1.2.3"), Some(("10.1.2.3/32".into(), "host")));
        assert_eq!(
            found(&t, "10.1.2.4"),
            Some(("10.1.2.0/24".into(), "twentyfour"))
        );
        assert_eq!(
            found(&t, "10.1.3.4"),
            Some(("10.1.0.0/16".into(), "sixteen"))
        );
        assert_eq!(found(&t, "10.2.3.4"), Some(("10.0.0.0/8".into(), "eight")));
        assert_eq!(found(&t, "11.0.0.1"), None);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn insert_normalizes_and_replaces_exact_matches() {
        let mut t = RouteTable::new();
        assert_eq!(t.insert(net("192.168.1.77/24"), 1), None);
        assert_eq!(t.get(&net("192.168.1.0/24")), Some(&1));
        assert_eq!(t.insert(net("192.168.1.0/24"), 2), Some(1));
        assert_eq!(t.len(), 1);
        let all: Vec<_> = t.iter().collect();
        assert_eq!(all, vec![(net("192.168.1.0/24"), &2)]);
        // Same address, other length: a different entry.
        assert_eq!(t.insert(net("192.168.1.0/25"), 3), None);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn families_are_kept_apart() {
        let mut t = RouteTable::new();
        t.insert(net("0.0.0.0/0"), "v4 default");
        assert_eq!(found(&t, "::1"), None);
        assert_eq!(found(&t, "::ffff:10.0.0.1"), None);
        t.insert(net("::/0"), "v6 default");
        t.insert(net("fd00::/8"), "ula");
        assert_eq!(found(&t, "fd12::1"), Some(("fd00::/8".into(), "ula")));
        assert_eq!(
            found(&t, "2001:db8::1"),
            Some(("::/0".into(), "v6 default"))
        );
        assert_eq!(
            found(&t, "253.0.0.1"),
            Some(("0.0.0.0/0".into(), "v4 default"))
        );
        // ::/0 and 0.0.0.0/0 are distinct entries.
        assert_eq!(t.len(), 3);
        assert_eq!(t.remove(&net("0.0.0.0/0")), Some("v4 default"));
        assert_eq!(found(&t, "10.0.0.1"), None);
        assert!(found(&t, "fd12::1").is_some());
    }

    #[test]
    fn default_route_catches_the_rest() {
        let mut t = RouteTable::new();
        t.insert(net("0.0.0.0/0"), "gateway");
        t.insert(net("10.0.0.0/16"), "vpn");
        assert_eq!(found(&t, "10.0.9.9").map(|f| f.1), Some("vpn"));
        assert_eq!(found(&t, "1.1.1.1").map(|f| f.1), Some("gateway"));
        assert_eq!(found(&t, "255.255.255.255").map(|f| f.1), Some("gateway"));
        t.insert(net("::/0"), "gateway6");
        t.insert(net("2001:db8::/128"), "host6");
        assert_eq!(found(&t, "2001:db8::").map(|f| f.1), Some("host6"));
        assert_eq!(found(&t, "2001:db8::1").map(|f| f.1), Some("gateway6"));
    }

    #[test]
    fn removal_uncovers_shorter_prefixes() {
        let mut t = RouteTable::new();
        t.insert(net("10.0.0.0/8"), "a");
        t.insert(net("10.1.0.0/16"), "b");
        assert_eq!(t.remove(&net("10.1.0.0/24")), None, "no exact match");
        assert_eq!(t.remove(&net("10.1.255.255/16")), Some("b"));
        assert_eq!(found(&t, "10.1.2.3").map(|f| f.1), Some("a"));
        assert_eq!(t.remove(&net("10.1.0.0/16")), None);
        assert_eq!(t.remove(&net("10.0.0.0/8")), Some("a"));
        assert!(t.is_empty());
        assert_eq!(found(&t, "10.1.2.3"), None);
        assert!(t.v4.in_use.is_empty());
    }

    #[test]
    fn retain_drops_a_peers_routes() {
        let mut t = RouteTable::new();
        t.insert(net("10.0.0.2/32"), 1);
        t.insert(net("192.168.0.0/24"), 1);
        t.insert(net("fd00::/64"), 1);
        t.insert(net("10.0.0.3/32"), 2);
        t.retain(|_, peer| *peer != 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(ip("192.168.0.1")), None);
        assert_eq!(t.lookup(ip("fd00::1")), None);
        assert_eq!(t.lookup(ip("10.0.0.3")), Some((net("10.0.0.3/32"), &2)));
        assert_eq!(t.v4.in_use, vec![32]);
        assert!(t.v6.in_use.is_empty());
    }

    #[test]
    fn overlapping_entries() {
        let mut t = RouteTable::new();
        t.insert(net("10.0.0.0/8"), "a");
        t.insert(net("10.1.0.0/16"), "b");
        t.insert(net("10.1.2.0/24"), "c");
        t.insert(net("10.2.0.0/16"), "d");
        t.insert(net("::/0"), "v6");
        let mut hits: Vec<&str> = t.overlapping(&net("10.1.0.0/16")).map(|e| *e.1).collect();
        hits.sort_unstable();
        assert_eq!(hits, vec!["a", "b", "c"]);
        let mut hits: Vec<&str> = t.overlapping(&net("10.1.2.3/32")).map(|e| *e.1).collect();
        hits.sort_unstable();
        assert_eq!(hits, vec!["a", "b", "c"]);
        assert_eq!(t.overlapping(&net("11.0.0.0/8")).count(), 0);
        assert_eq!(t.overlapping(&net("0.0.0.0/0")).count(), 4);
        let v6: Vec<_> = t.overlapping(&net("fd00::/8")).collect();
        assert_eq!(v6, vec![(net("::/0"), &"v6")]);
    }

    #[test]
    fn overlaps_helper() {
        assert!(overlaps(&net("10.0.0.0/8"), &net("10.1.0.0/16")));
        assert!(overlaps(&net("10.1.0.0/16"), &net("10.0.0.0/8")));
        assert!(overlaps(&net("10.1.0.0/16"), &net("10.1.0.0/16")));
        assert!(overlaps(&net("10.1.2.3/16"), &net("10.1.200.0/24")));
        assert!(!overlaps(&net("10.1.0.0/16"), &net("10.2.0.0/16")));
        assert!(overlaps(&net("0.0.0.0/0"), &net("1.2.3.4/32")));
        assert!(!overlaps(&net("0.0.0.0/0"), &net("::/0")));
        assert!(!overlaps(&net("::ffff:10.0.0.0/104"), &net("10.0.0.0/8")));
        assert!(overlaps(&net("fd00::/8"), &net("fd00:1::/32")));
    }

    #[test]
    fn masks() {
        assert_eq!(0xffff_ffffu32.masked(0), 0);
        assert_eq!(0xffff_ffffu32.masked(1), 0x8000_0000);
        assert_eq!(0xffff_ffffu32.masked(32), 0xffff_ffff);
        assert_eq!(u128::MAX.masked(0), 0);
        assert_eq!(u128::MAX.masked(128), u128::MAX);
        assert_eq!(u128::MAX.masked(127), u128::MAX - 1);
        let a = u32::from(Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(a.masked(16), u32::from(Ipv4Addr::new(10, 1, 0, 0)));
        let b = u128::from("2001:db8::1".parse::<Ipv6Addr>().expect("v6"));
        assert_eq!(
            b.masked(32),
            u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0))
        );
    }

    mod randomized {
        use proptest::prelude::*;

        use super::*;

        /// Addresses drawn from a few nearby blocks, so that random
        /// networks nest and overlap often.
        fn addr() -> impl Strategy<Value = IpAddr> {
            let v4 = (0u32..4, any::<u32>()).prop_map(|(block, low)| {
                IpAddr::V4(Ipv4Addr::from(
                    0x0a00_0000 | (block << 22) | (low & 0x3f_ffff),
                ))
            });
            let v4_any = any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a)));
            let v6 = (0u128..4, any::<u128>()).prop_map(|(block, low)| {
                let base = 0xfd00u128 << 112;
                IpAddr::V6(Ipv6Addr::from(base | (block << 100) | (low >> 28)))
            });
            let v6_any = any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a)));
            prop_oneof![4 => v4, 1 => v4_any, 4 => v6, 1 => v6_any]
        }

        fn network() -> impl Strategy<Value = IpNet> {
            (addr(), any::<u8>()).prop_map(|(a, p)| match a {
                // Prefix lengths cluster around the interesting middle and
                // include the edges (/0 and full length).
                IpAddr::V4(_) => IpNet::new(a, p % 33).expect("valid v4 prefix"),
                IpAddr::V6(_) => IpNet::new(a, p % 129).expect("valid v6 prefix"),
            })
        }

        #[derive(Debug, Clone)]
        enum Op {
            Insert(IpNet, u32),
            /// Removes the n-th network inserted so far (mod count), or a
            /// fresh one when there are none.
            RemoveKnown(prop::sample::Index),
            Remove(IpNet),
            /// Drops the entries whose value is divisible by this.
            Retain(u32),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (network(), any::<u32>()).prop_map(|(n, v)| Op::Insert(n, v)),
                2 => any::<prop::sample::Index>().prop_map(Op::RemoveKnown),
                1 => network().prop_map(Op::Remove),
                1 => (2u32..7).prop_map(Op::Retain),
            ]
        }

        /// The obvious model: a list, scanned in full.
        fn model_lookup(model: &[(IpNet, u32)], a: IpAddr) -> Option<(IpNet, u32)> {
            model
                .iter()
                .filter(|(n, _)| n.contains(&a))
                .max_by_key(|(n, _)| n.prefix_len())
                .copied()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn lookup_matches_a_brute_force_scan(
                ops in prop::collection::vec(op(), 0..120),
                probes in prop::collection::vec(addr(), 0..60),
            ) {
                let mut table = RouteTable::new();
                let mut model: Vec<(IpNet, u32)> = Vec::new();
                let mut inserted: Vec<IpNet> = Vec::new();
                for op in ops {
                    match op {
                        Op::Insert(n, v) => {
                            let n = n.trunc();
                            let old = model.iter().position(|(m, _)| *m == n).map(|i| model.remove(i).1);
                            model.push((n, v));
                            inserted.push(n);
                            prop_assert_eq!(table.insert(n, v), old);
                        }
                        Op::RemoveKnown(i) => {
                            if inserted.is_empty() { continue; }
                            let n = inserted[i.index(inserted.len())];
                            let old = model.iter().position(|(m, _)| *m == n).map(|i| model.remove(i).1);
                            prop_assert_eq!(table.remove(&n), old);
                        }
                        Op::Remove(n) => {
                            let t = n.trunc();
                            let old = model.iter().position(|(m, _)| *m == t).map(|i| model.remove(i).1);
                            prop_assert_eq!(table.remove(&n), old);
                        }
                        Op::Retain(d) => {
                            model.retain(|(_, v)| v % d != 0);
                            table.retain(|_, v| *v % d != 0);
                        }
                    }
                    prop_assert_eq!(table.len(), model.len());
                }
                // Probe random addresses and every entry's own edges.
                let mut all_probes = probes;
                for (n, _) in &model {
                    all_probes.push(n.network());
                    all_probes.push(n.broadcast());
                }
                for a in all_probes {
                    let got = table.lookup(a).map(|(n, v)| (n, *v));
                    prop_assert_eq!(got, model_lookup(&model, a), "address {}", a);
                }
                // iter() lists the model, and overlapping() agrees with overlaps().
                let mut listed: Vec<(IpNet, u32)> = table.iter().map(|(n, v)| (n, *v)).collect();
                listed.sort_unstable();
                let mut want = model.clone();
                want.sort_unstable();
                prop_assert_eq!(&listed, &want);
                for (n, _) in model.iter().take(10) {
                    let probe = IpNet::new(n.addr(), n.prefix_len().saturating_sub(3)).expect("shorter prefix");
                    let mut got: Vec<(IpNet, u32)> = table.overlapping(&probe).map(|(n, v)| (n, *v)).collect();
                    got.sort_unstable();
                    let mut want: Vec<(IpNet, u32)> = model.iter().filter(|(m, _)| overlaps(m, &probe)).copied().collect();
                    want.sort_unstable();
                    prop_assert_eq!(got, want);
                }
            }
        }
    }
}
