//! The helper's allow-list for IPv6 on the tun (IPv6 inside the tunnel):
//! which IPv6 address may be set. Pure rules, unit-tested without
//! privileges; [`super::policy::Policy`] applies them.
//!
//! * A server with `--network6`: a host address of that network (its `::1`),
//!   with exactly its prefix; a server without: none at all.
//! * A client with `--network6` (its config's `network6`): an address whose
//!   subnet lies inside that network. Without it (the network is only known
//!   from the server's grant): any global unicast address (not loopback,
//!   link-local, multicast or unspecified) with a prefix in
//!   [`TUNNEL_PREFIX6`] (/64 to /120).
//!
//! IPv6 routes then go only inside the tunnel network (or the subnet of
//! the address last set), or where the command line's route rule allows.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;

use crate::limits::TUNNEL_PREFIX6;
use crate::refusal::AddressProblem;

/// Which IPv6 addresses may be set on the tun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressRule6 {
    /// None: a server without `network6`.
    Off,
    /// Server: a host address of this network, with exactly its prefix.
    HostOf(Ipv6Net),
    /// Client with a configured network: a host address whose subnet lies
    /// inside it.
    Inside(Ipv6Net),
    /// Client without one: any global unicast address, prefix in
    /// [`TUNNEL_PREFIX6`].
    AnyUnicast,
}

impl AddressRule6 {
    /// The subnet of `address/prefix` if the rule allows it, else why not.
    pub fn check(self, address: Ipv6Addr, prefix: u8) -> Result<Ipv6Net, AddressProblem> {
        let subnet = match self {
            AddressRule6::Off => return Err(AddressProblem::Ipv6Off),
            AddressRule6::HostOf(network) => {
                if prefix != network.prefix_len() {
                    return Err(AddressProblem::NotTheNetworksPrefix(network.into()));
                }
                network
            }
            AddressRule6::Inside(network) => {
                if prefix < network.prefix_len() || !TUNNEL_PREFIX6.contains(&prefix) {
                    return Err(AddressProblem::PrefixLeaves {
                        allowed: network.prefix_len().max(*TUNNEL_PREFIX6.start())
                            ..=*TUNNEL_PREFIX6.end(),
                        network: network.into(),
                    });
                }
                network
            }
            AddressRule6::AnyUnicast => {
                if !TUNNEL_PREFIX6.contains(&prefix) {
                    return Err(AddressProblem::Prefix(TUNNEL_PREFIX6));
                }
                if address.is_loopback()
                    || address.is_multicast()
                    || address.is_unspecified()
                    || address.is_unicast_link_local()
                {
                    return Err(AddressProblem::NotGlobalUnicast);
                }
                subnet_of(address, prefix)?
            }
        };
        if !subnet.contains(&address) {
            return Err(AddressProblem::Outside(subnet.into()));
        }
        let own = subnet_of(address, prefix)?;
        if address == own.network() {
            return Err(AddressProblem::NotAHost(own.into()));
        }
        Ok(own)
    }

    /// The network IPv6 routes may go inside: the configured one, else the
    /// subnet of the address last set (`set`).
    pub fn tunnel(self, set: Option<Ipv6Net>) -> Option<Ipv6Net> {
        match self {
            AddressRule6::HostOf(network) | AddressRule6::Inside(network) => Some(network),
            AddressRule6::Off | AddressRule6::AnyUnicast => set,
        }
    }
}

/// The subnet `address/prefix` lies in.
fn subnet_of(address: Ipv6Addr, prefix: u8) -> Result<Ipv6Net, AddressProblem> {
    Ipv6Net::new(address, prefix)
        .map(|n| n.trunc())
        .map_err(|_| AddressProblem::PrefixLength(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv6Net {
        s.parse().expect("net")
    }

    fn check(rule: AddressRule6, address: &str, prefix: u8) -> Result<Ipv6Net, AddressProblem> {
        rule.check(address.parse().expect("address"), prefix)
    }

    #[test]
    fn a_server_sets_host_addresses_of_its_network6_only() {
        let rule = AddressRule6::HostOf(net("2001:2:0:100::/64"));
        assert_eq!(
            check(rule, "2001:2:0:100::1", 64),
            Ok(net("2001:2:0:100::/64"))
        );
        for (address, prefix) in [
            ("2001:2:0:100::1", 80),
            ("2001:2:0:101::1", 64),
            ("2001:2:0:100::", 64),
        ] {
            assert!(check(rule, address, prefix).is_err(), "{address}/{prefix}");
        }
        assert!(check(AddressRule6::Off, "2001:2:0:100::1", 64).is_err());
        assert_eq!(rule.tunnel(None), Some(net("2001:2:0:100::/64")));
        assert_eq!(AddressRule6::Off.tunnel(None), None);
    }

    #[test]
    fn a_client_stays_inside_its_network6_or_takes_global_unicast() {
        let inside = AddressRule6::Inside(net("2001:2:0:100::/64"));
        assert_eq!(
            check(inside, "2001:2:0:100::7", 64),
            Ok(net("2001:2:0:100::/64"))
        );
        assert_eq!(
            check(inside, "2001:2:0:100::7", 120),
            Ok(net("2001:2:0:100::/120"))
        );
        assert!(check(inside, "2001:2:0:100::7", 48).is_err());
        assert!(check(inside, "2001:2:0:200::7", 64).is_err());
        let any = AddressRule6::AnyUnicast;
        assert_eq!(
            check(any, "2001:2:0:100::7", 64),
            Ok(net("2001:2:0:100::/64"))
        );
        for (address, prefix) in [
            ("2001:2:0:100::7", 48),
            ("2001:2:0:100::7", 121),
            ("fe80::7", 64),
            ("ff02::1", 64),
            ("::1", 64),
            ("::", 64),
            ("2001:2:0:100::", 64),
        ] {
            assert!(check(any, address, prefix).is_err(), "{address}/{prefix}");
        }
        assert_eq!(any.tunnel(None), None);
        let set = Some(net("2001:2:0:100::/64"));
        assert_eq!(any.tunnel(set), set);
    }
}
