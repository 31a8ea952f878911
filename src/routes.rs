//! Placeholder until the route table lands (replaced by wt-routes).
use ipnet::IpNet;

/// Whether one of the two networks contains the other.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Placeholder longest-prefix table (replaced by wt-routes).
#[derive(Debug)]
pub struct RouteTable<T> {
    entries: Vec<(IpNet, T)>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            entries: Vec::new(),
        }
    }
}

impl<T> RouteTable<T> {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        let net = net.trunc();
        let old = self.remove(&net);
        self.entries.push((net, value));
        old
    }
    pub fn remove(&mut self, net: &IpNet) -> Option<T> {
        let net = net.trunc();
        let i = self.entries.iter().position(|(n, _)| *n == net)?;
        Some(self.entries.swap_remove(i).1)
    }
    pub fn lookup_exact(&self, net: &IpNet) -> Option<&T> {
        let net = net.trunc();
        self.entries.iter().find(|(n, _)| *n == net).map(|(_, v)| v)
    }
    pub fn lookup(&self, address: std::net::IpAddr) -> Option<(IpNet, &T)> {
        self.entries
            .iter()
            .filter(|(n, _)| n.contains(&address))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(n, v)| (*n, v))
    }
}
