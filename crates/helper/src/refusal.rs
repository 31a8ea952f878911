//! Why the helper refuses a request: [`Refusal`], and the reasons an
//! address, a route, a full tunnel's server or DNS settings are refused.
//! The helper logs a refusal and answers the daemon with its text.

use std::net::IpAddr;
use std::ops::RangeInclusive;

use ipnet::IpNet;

use crate::params::{MAX_DNS, MAX_DNS_SEARCH};

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the tun was already opened; it is opened once")]
    TunAlreadyOpened,
    #[error("no tun has been opened yet")]
    NoTun,
    #[error("ifindex {asked} is not the tun this helper created (ifindex {tun})")]
    OtherInterface { asked: u32, tun: u32 },
    #[error("{address}/{prefix}: {why}")]
    Address {
        address: IpAddr,
        prefix: u8,
        why: AddressProblem,
    },
    #[error("route {destination}: {why}")]
    Route {
        destination: IpNet,
        why: RouteProblem,
    },
    #[error("MTU {mtu} is outside {}..={}", .range.start(), .range.end())]
    Mtu {
        mtu: u32,
        range: RangeInclusive<u32>,
    },
    #[error("{what} is not allowed: the helper was not started with {flag}")]
    NotGranted {
        what: &'static str,
        flag: &'static str,
    },
    #[error("{0} is for a server's helper only")]
    ServerOnly(&'static str),
    #[error("{0} is for a client's helper only")]
    ClientOnly(&'static str),
    /// A client's route or address inside `lan`, a network of another of
    /// the host's interfaces.
    #[error(
        "{what} {net}: inside {lan}, a network connected to another interface of this host: \
         its traffic would go into the tunnel"
    )]
    Host {
        what: &'static str,
        net: IpNet,
        lan: IpNet,
    },
    #[error("the server address {server}: {why}")]
    Server { server: IpAddr, why: ServerProblem },
    #[error("the host has no route to {0} outside the tun: nothing to pin")]
    NoUnderlay(IpAddr),
    #[error("DNS: {0}")]
    Dns(DnsProblem),
}

/// Why an address may not be set on the tun (either family).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressProblem {
    #[error("IPv6 inside the tunnel is off (the helper has no --network6)")]
    Ipv6Off,
    /// A server's address must have its network's prefix.
    #[error("the prefix must be the network's: {0}")]
    NotTheNetworksPrefix(IpNet),
    #[error("outside the network {0}")]
    Outside(IpNet),
    /// A client's subnet would reach beyond its configured network.
    #[error("the prefix must be from /{} to /{} to stay inside {network}", .allowed.start(), .allowed.end())]
    PrefixLeaves {
        allowed: RangeInclusive<u8>,
        network: IpNet,
    },
    #[error("the prefix must be from /{} to /{}", .0.start(), .0.end())]
    Prefix(RangeInclusive<u8>),
    #[error("not a unicast address")]
    NotUnicast,
    #[error("not a global unicast address")]
    NotGlobalUnicast,
    /// The subnet's network (or IPv4 broadcast) address.
    #[error("not a host address of {0}")]
    NotAHost(IpNet),
    #[error("/{0} is not a prefix length")]
    PrefixLength(u8),
}

/// Why a route may not be added to (or removed from) the tun.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteProblem {
    #[error("this helper already installed {0} routes")]
    TooMany(usize),
    #[error("no address has been set, so no route is allowed yet")]
    NoAddressYet,
    #[error("no IPv6 address has been set, so no IPv6 route is allowed yet")]
    NoIpv6AddressYet,
    /// Outside the tunnel, on a client that accepts any route but a
    /// default one.
    #[error("outside {0}, and a default route is never allowed")]
    DefaultNever(IpNet),
    #[error("outside {0}")]
    Outside(IpNet),
    #[error("outside {tunnel} and outside the allowed routes {}", list(.allowed))]
    OutsideAllowed { tunnel: IpNet, allowed: Vec<IpNet> },
    /// Shorter than this prefix, pushed to a client that did not opt in.
    #[error(
        "wider than /{0}: installed only with accept_routes covering it \
         (or full_tunnel), the user's choice"
    )]
    TooWide(u8),
    #[error("covers the server's address {0}: the tunnel would carry itself")]
    CoversServer(IpAddr),
}

/// Why an address may not be a full tunnel's server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerProblem {
    #[error("not a unicast address")]
    NotUnicast,
    #[error("inside the {family}tunnel network {0}", family = ipv6_word(.0))]
    InTunnel(IpNet),
    #[error("no address has been set yet")]
    NoAddressYet,
}

/// Why pushed DNS settings may not be set on the tun.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsProblem {
    #[error("{0} servers: at most {MAX_DNS}")]
    TooManyServers(usize),
    #[error("{0} search domains: at most {MAX_DNS_SEARCH}")]
    TooManyDomains(usize),
    /// Loopback too: a resolver on the client's own loopback would be a
    /// local service the server picked.
    #[error(
        "{0} is not a unicast address outside this host (loopback, \
         unspecified, multicast and broadcast are refused)"
    )]
    NotUnicast(IpAddr),
    #[error("{0:?} is not a domain")]
    NotADomain(String),
    #[error(
        "{0:?} has a single label: every lookup under it would go to the tunnel \
         (allowed with dns = \"pushed-all-domains\")"
    )]
    SingleLabel(String),
}

fn list(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// "IPv6 " before an IPv6 network's name, nothing before an IPv4 one's.
fn ipv6_word(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "",
        IpNet::V6(_) => "IPv6 ",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test network")
    }

    /// The daemon logs these words and the docs quote them.
    #[test]
    fn refusals_read_as_sentences_naming_their_values() {
        let cases = [
            (
                Refusal::Host {
                    what: "route",
                    net: net("198.18.1.0/25"),
                    lan: net("198.18.1.0/24"),
                },
                "route 198.18.1.0/25: inside 198.18.1.0/24, a network connected to another \
                 interface of this host: its traffic would go into the tunnel",
            ),
            (
                Refusal::Server {
                    server: "198.19.0.1".parse().expect("ip"),
                    why: ServerProblem::InTunnel(net("198.19.0.0/16")),
                },
                "the server address 198.19.0.1: inside the tunnel network 198.19.0.0/16",
            ),
            (
                Refusal::Server {
                    server: "2001:2:0:100::1".parse().expect("ip"),
                    why: ServerProblem::InTunnel(net("2001:2:0:100::/64")),
                },
                "the server address 2001:2:0:100::1: inside the IPv6 tunnel network \
                 2001:2:0:100::/64",
            ),
            (
                Refusal::Route {
                    destination: net("10.0.0.0/8"),
                    why: RouteProblem::OutsideAllowed {
                        tunnel: net("198.19.0.0/16"),
                        allowed: vec![net("198.18.201.0/24"), net("2001:2:0:201::/64")],
                    },
                },
                "route 10.0.0.0/8: outside 198.19.0.0/16 and outside the allowed routes \
                 198.18.201.0/24, 2001:2:0:201::/64",
            ),
            (
                Refusal::Address {
                    address: "198.19.0.2".parse().expect("ip"),
                    prefix: 4,
                    why: AddressProblem::PrefixLeaves {
                        allowed: 16..=30,
                        network: net("198.19.0.0/16"),
                    },
                },
                "198.19.0.2/4: the prefix must be from /16 to /30 to stay inside 198.19.0.0/16",
            ),
            (
                Refusal::Dns(DnsProblem::SingleLabel("lan".into())),
                "DNS: \"lan\" has a single label: every lookup under it would go to the \
                 tunnel (allowed with dns = \"pushed-all-domains\")",
            ),
        ];
        for (refusal, text) in cases {
            assert_eq!(refusal.to_string(), text);
        }
    }
}
