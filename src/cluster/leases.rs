//! Address leases in etcd: who holds which tunnel address, cluster-wide.
//!
//! One key per address, `<prefix>leases/<address>`, whose value names the
//! server and the client: `<node> key:<base64>` or `<node> remote:<ip>`. It
//! is attached to the holding server's etcd lease, so when that server dies
//! its addresses are freed after `lease_ttl`, unless their clients reappear
//! on another server first: then that server moves the key to itself.
//!
//! Every change is one etcd transaction: an address is created only if no
//! key for it exists, and moved only if it was not changed since it was
//! read. So two servers never both hold one address: of two racing
//! transactions, etcd lets exactly one through.
//!
//! The value is signed by the server it names ([`super::signed`]): a lease
//! that is not (written by someone with etcd access only, or naming
//! another server than its signer) holds nothing: it is ignored when read
//! and replaced when its address is claimed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};

use std::sync::Arc;

use super::etcd::{Etcd, EtcdError};
use super::signed::{Records, Refusal};
use crate::keys::PublicKey;

/// Who holds an address: a TLS client by its key, an original-protocol
/// client by its remote IP address (it has no other identity).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Claimant {
    Key(PublicKey),
    Remote(IpAddr),
}

impl Claimant {
    /// The claimant of a client with this key (if TLS) at `remote`.
    pub fn of(key: Option<PublicKey>, remote: IpAddr) -> Claimant {
        match key {
            Some(key) => Claimant::Key(key),
            None => Claimant::Remote(remote),
        }
    }
}

impl fmt::Display for Claimant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claimant::Key(key) => write!(f, "key:{key}"),
            Claimant::Remote(ip) => write!(f, "remote:{ip}"),
        }
    }
}

impl FromStr for Claimant {
    type Err = ();
    fn from_str(text: &str) -> Result<Claimant, ()> {
        match text.split_once(':') {
            Some(("key", key)) => key.parse().map(Claimant::Key).map_err(drop),
            Some(("remote", ip)) => ip.parse().map(Claimant::Remote).map_err(drop),
            _ => Err(()),
        }
    }
}

/// The value of one address's key: which server holds it, for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub node: String,
    pub claimant: Claimant,
}

impl Holder {
    pub fn encode(&self) -> String {
        format!("{} {}", self.node, self.claimant)
    }

    /// None for a value no server of ours wrote.
    pub fn decode(value: &[u8]) -> Option<Holder> {
        let text = std::str::from_utf8(value).ok()?;
        let (node, claimant) = text.split_once(' ')?;
        Some(Holder {
            node: node.to_string(),
            claimant: claimant.parse().ok()?,
        })
    }
}

/// Which of the two networks (`network`, `network6`) an address is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(address: IpAddr) -> Family {
        match address {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// What a client asks the cluster for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// This address (a static request, a fixed address).
    Exactly(IpAddr),
    /// This address, which it held on some server, if no other client
    /// holds it now; else any free one of its family.
    Again(IpAddr),
    /// Any free address of the family's network.
    Any(Family),
}

/// Why no address was claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("the cluster's state (etcd) is unreachable, so no address can be granted: {0}")]
    Unreachable(#[from] EtcdError),
    #[error("{0} is held by another client in the cluster")]
    Taken(IpAddr),
    #[error("every address of the network is held in the cluster")]
    Exhausted,
    #[error("{0} changed under us too often")]
    Contended(IpAddr),
}

/// How often one address is read and tried again when it changed between
/// the read and the transaction.
const RETRIES: usize = 4;

/// The address leases of one network in etcd, as server `node` sees them.
pub struct Leases {
    etcd: Etcd,
    /// `<prefix>leases/`.
    dir: String,
    /// This server (its name, its key) and the members it trusts.
    records: Arc<Records>,
    network: Ipv4Net,
    /// None: the servers grant IPv4 addresses only.
    network6: Option<Ipv6Net>,
}

/// The etcd key of `address` under `dir` (`<prefix>leases/`).
fn lease_key(dir: &str, address: IpAddr) -> String {
    format!("{dir}{address}")
}

/// The address a key under `dir` names: only in the form [`lease_key`]
/// writes, so that one address never has two keys (`2001:2::5` and
/// `2001:2:0:0::5` would both parse to it).
fn lease_address(dir: &str, key: &str) -> Option<IpAddr> {
    let text = key.strip_prefix(dir)?;
    let address: IpAddr = text.parse().ok()?;
    (address.to_string() == text).then_some(address)
}

impl Leases {
    pub fn new(
        etcd: Etcd,
        prefix: &str,
        records: Arc<Records>,
        network: Ipv4Net,
        network6: Option<Ipv6Net>,
    ) -> Leases {
        Leases {
            etcd,
            dir: format!("{prefix}leases/"),
            records,
            network,
            network6,
        }
    }

    fn key(&self, address: IpAddr) -> String {
        lease_key(&self.dir, address)
    }

    fn node(&self) -> &str {
        self.records.node()
    }

    /// The signed value of `address`'s key, held by this server for
    /// `claimant`.
    fn mine(&self, address: IpAddr, claimant: &Claimant) -> Vec<u8> {
        let holder = Holder {
            node: self.node().to_string(),
            claimant: claimant.clone(),
        };
        self.records.seal(&self.key(address), &holder.encode())
    }

    /// The holder a lease record names, if the member it names signed it.
    pub fn holder_of(&self, etcd_key: &str, raw: &[u8]) -> Option<Holder> {
        let opened = self.records.open(etcd_key, raw)?;
        let holder = Holder::decode(&opened.value)?;
        match holder.node == opened.node {
            true => Some(holder),
            false => self
                .records
                .check(etcd_key, Err(Refusal::WrongNode))
                .and(None),
        }
    }

    /// The address `key` names, if it is one of ours.
    pub fn address_of(&self, key: &str) -> Option<IpAddr> {
        lease_address(&self.dir, key)
    }

    /// Every address held in the cluster, with its holder.
    pub async fn all(&self) -> Result<Vec<(IpAddr, Holder)>, EtcdError> {
        Ok(self
            .etcd
            .prefix(&self.dir)
            .await?
            .into_iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(&kv.key);
                Some((self.address_of(&key)?, self.holder_of(&key, &kv.value)?))
            })
            .collect())
    }

    /// Claims an address for `claimant`, held by this server under etcd
    /// lease `lease`: the one wanted; or the one it held, if still its own,
    /// else a free one; or a free one. A free one is one for which `usable`
    /// says yes (the caller's view of the cluster and its own pool), tried
    /// from a random place on, so that servers granting at once seldom race
    /// for the same one, and created only if etcd has no key for it.
    ///
    /// Nothing is read from etcd but the wanted address: a grant costs one
    /// transaction when `usable` is right, one more per address it got wrong.
    pub async fn claim(
        &self,
        claimant: &Claimant,
        wanted: Wanted,
        lease: i64,
        usable: impl Fn(IpAddr) -> bool,
    ) -> Result<IpAddr, ClaimError> {
        match wanted {
            Wanted::Exactly(address) => self.claim_exactly(claimant, address, lease).await,
            Wanted::Again(address) => match self.claim_exactly(claimant, address, lease).await {
                Err(ClaimError::Taken(_)) => {
                    self.claim_free(claimant, Family::of(address), lease, usable)
                        .await
                }
                claimed => claimed,
            },
            Wanted::Any(family) => self.claim_free(claimant, family, lease, usable).await,
        }
    }

    /// The client addresses of `family`'s network: the first as a number,
    /// how many, and the server's own (skipped). None without that network.
    fn hosts(&self, family: Family) -> Option<(u128, u128, IpAddr)> {
        match family {
            Family::V4 => {
                let mut hosts = self.network.hosts();
                let (first, last) = (hosts.next()?, hosts.next_back());
                let first = u128::from(u32::from(first));
                let count = last.map_or(first, |l| u128::from(u32::from(l))) - first + 1;
                let own = crate::pool::server_address(self.network);
                Some((first, count, IpAddr::V4(own)))
            }
            Family::V6 => {
                let network = self.network6?.trunc();
                // As the IPv6 pool: the network's address and the server's
                // (the next) are no client's.
                let host_bits = 128 - u32::from(network.prefix_len());
                let size = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
                let first = u128::from(network.network()) + 2;
                let own = crate::pool6::server_address6(network);
                Some((first, size.checked_sub(2)?, IpAddr::V6(own)))
            }
        }
    }

    /// A free address for `claimant`: the hosts of the network from a
    /// random one on (wrapping), the server's own and those `usable` refuses
    /// skipped, until etcd lets one be created.
    async fn claim_free(
        &self,
        claimant: &Claimant,
        family: Family,
        lease: i64,
        usable: impl Fn(IpAddr) -> bool,
    ) -> Result<IpAddr, ClaimError> {
        let Some((first, count, own)) = self.hosts(family).filter(|(_, count, _)| *count > 0)
        else {
            return Err(ClaimError::Exhausted);
        };
        let start = fastrand::u128(..count);
        for i in 0..count {
            // Within the network: the offset is less than count (an IPv4
            // one below 2^32).
            let offset = first + (start + i) % count;
            let address = match family {
                Family::V4 => IpAddr::V4(Ipv4Addr::from(offset as u32)),
                Family::V6 => IpAddr::V6(Ipv6Addr::from(offset)),
            };
            if address == own || !usable(address) {
                continue;
            }
            if self
                .etcd
                .create(&self.key(address), self.mine(address, claimant), lease)
                .await?
            {
                return Ok(address);
            }
        }
        Err(ClaimError::Exhausted)
    }

    /// Claims `address` for `claimant`: created if no one holds it, moved
    /// here if `claimant` holds it on another server (or under an older
    /// lease of this one), refused if another client holds it.
    async fn claim_exactly(
        &self,
        claimant: &Claimant,
        address: IpAddr,
        lease: i64,
    ) -> Result<IpAddr, ClaimError> {
        let key = self.key(address);
        for _ in 0..RETRIES {
            let mine = self.mine(address, claimant);
            let done = match self.etcd.get(&key).await? {
                None => self.etcd.create(&key, mine, lease).await?,
                Some(kv) => match self.holder_of(&key, &kv.value) {
                    Some(holder) if holder.claimant == *claimant => {
                        if holder.node == self.node() && kv.lease == lease {
                            return Ok(address);
                        }
                        self.etcd
                            .replace(&key, kv.mod_revision, mine, lease)
                            .await?
                    }
                    Some(_) => return Err(ClaimError::Taken(address)),
                    // Not signed by the member it names: it holds nothing.
                    None => {
                        self.etcd
                            .replace(&key, kv.mod_revision, mine, lease)
                            .await?
                    }
                },
            };
            if done {
                return Ok(address);
            }
        }
        Err(ClaimError::Contended(address))
    }

    /// Gives `address` back, if this server still holds it for `claimant`.
    pub async fn release(&self, claimant: &Claimant, address: IpAddr) -> Result<(), EtcdError> {
        self.etcd
            .delete_if(&self.key(address), self.mine(address, claimant))
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_round_trip_and_foreign_values_are_ignored() {
        let key = PublicKey::from_raw(&[7; 32]).expect("key");
        for claimant in [
            Claimant::Key(key),
            Claimant::Remote("198.18.1.2".parse().expect("ip")),
        ] {
            let holder = Holder {
                node: "s1".into(),
                claimant,
            };
            assert_eq!(Holder::decode(holder.encode().as_bytes()), Some(holder));
        }
        for bad in [
            &b""[..],
            b"s1",
            b"s1 key:nope",
            b"s1 who:198.18.1.2",
            b"\xff x",
        ] {
            assert_eq!(Holder::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ipv6_lease_keys_name_one_address_each_in_one_form() {
        let dir = "/simplevpn/198.19.0.0_16/leases/";
        let v6: IpAddr = "2001:2:0:100::5".parse().expect("v6");
        let v4: IpAddr = "198.19.0.5".parse().expect("v4");
        for address in [v6, v4] {
            let key = lease_key(dir, address);
            assert_eq!(lease_address(dir, &key), Some(address), "{key}");
        }
        assert_eq!(lease_key(dir, v6), format!("{dir}2001:2:0:100::5"));
        for bad in [
            // Another spelling of the same address: not the key of it.
            format!("{dir}2001:2:0:100:0:0:0:5"),
            format!("{dir}2001:0002:0:100::5"),
            format!("{dir}2001:2:0:100::5/64"),
            format!("{dir}[2001:2:0:100::5]"),
            format!("{dir}::ffff:198.19.0.5x"),
            dir.to_string(),
            "/simplevpn/other/leases/2001:2:0:100::5".to_string(),
        ] {
            assert_eq!(lease_address(dir, &bad), None, "{bad}");
        }
    }

    #[test]
    fn an_ipv6_holder_round_trips() {
        let holder = Holder {
            node: "s2".into(),
            claimant: Claimant::Remote("2001:2:0:1::2".parse().expect("ip")),
        };
        assert_eq!(holder.encode(), "s2 remote:2001:2:0:1::2");
        assert_eq!(Holder::decode(holder.encode().as_bytes()), Some(holder));
        assert_eq!(Holder::decode(b"s2 remote:2001:2:0:1::2::"), None);
        assert_eq!(Family::of("2001:2::1".parse().expect("v6")), Family::V6);
        assert_eq!(Family::of("198.19.0.1".parse().expect("v4")), Family::V4);
    }
}
