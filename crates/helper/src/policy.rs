//! The helper's allow-list: which requests it carries out. A pure state
//! machine, so every rule is unit-tested without privileges.
//!
//! * The tun is opened once; every later request must name its ifindex.
//! * Addresses: on a server, a host address of the configured network with
//!   the network's prefix. On a client with a configured network, a host
//!   address whose whole subnet lies inside that network. On a client without
//!   one (its network is only known from the server's grant), any unicast
//!   host address (not loopback, multicast, broadcast or unspecified) with a
//!   prefix in [`TUNNEL_PREFIX`] (/8 to /30).
//! * Routes: inside the configured network; on a client without one, inside
//!   the subnet of the address the helper last set (none before that).
//!   Beyond the tunnel, only what [`RouteRule`] allows: on a server, the
//!   networks behind its peers; on a client, those inside its
//!   `accept_routes`, or without that list any route but a default one.
//! * IPv6 addresses and routes: as [`super::policy6`] says.
//! * MTU: from [`MIN_MTU`] to the configured maximum (at most [`MAX_MTU`]).
//! * Beyond the tun, only what the helper's command line grants
//!   ([`Grants`]): a server started with `--masquerade` may NAT exactly its
//!   own network; a client started with `--full-tunnel` may pin the host's
//!   current route to one unicast server address outside the tunnel
//!   ([`pin_route`]: a /32 via the gateway and interface the host already
//!   uses) and route everything else into the tun; a client started with
//!   `--dns` may set DNS (within the session parameters' limits) on its own
//!   tun only.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::policy6::AddressRule6;
use super::protocol::HelperRequest;
pub use super::refusal::Refusal;
use super::refusal::{AddressProblem, DnsProblem, RouteProblem, ServerProblem};
use crate::limits::{
    MAX_HELPER_ROUTES, MAX_MTU, MIN_MTU, MIN_PUSHED_PREFIX4, MIN_PUSHED_PREFIX6, TUNNEL_PREFIX,
};
use crate::params::{single_label, valid_domain, MAX_DNS, MAX_DNS_SEARCH};

/// What the helper's command line grants beyond the tun's address, MTU and
/// routes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grants {
    /// Server: NAT for its network (`--masquerade`).
    pub masquerade: bool,
    /// Client: the full tunnel's routes (`--full-tunnel`).
    pub full_tunnel: bool,
    /// Client: DNS on its tun (`--dns`).
    pub dns: bool,
    /// Client: single-label search domains too (`--dns-all-domains`).
    pub dns_all_domains: bool,
}

/// A route of the host's main table (IPv4 or IPv6), as far as pinning
/// needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRoute {
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    /// The output interface.
    pub index: u32,
    /// Its priority; lower wins.
    pub metric: u32,
}

/// The route to pin for `server`: the /32 (IPv6: /128) that goes where the
/// host's best route to it goes now (longest prefix, then lowest metric)
/// among the routes not through the tun `tun` (those are the tunnel's own).
pub fn pin_route(routes: &[HostRoute], server: IpAddr, tun: u32) -> Result<HostRoute, Refusal> {
    let best = routes
        .iter()
        .filter(|r| r.index != tun && r.destination.contains(&server))
        .min_by_key(|r| (std::cmp::Reverse(r.destination.prefix_len()), r.metric))
        .ok_or(Refusal::NoUnderlay(server))?;
    let destination = match server {
        IpAddr::V4(server) => IpNet::V4(Ipv4Net::from(server)),
        IpAddr::V6(server) => IpNet::V6(Ipv6Net::from(server)),
    };
    Ok(HostRoute {
        destination,
        ..*best
    })
}

/// Which addresses may be set on the tun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressRule {
    /// Server: a host address of this network, with exactly its prefix.
    HostOf(Ipv4Net),
    /// Client with a configured network: a host address whose subnet lies
    /// inside it.
    Inside(Ipv4Net),
    /// Client without one: any unicast host address, prefix in [`TUNNEL_PREFIX`].
    AnyUnicast,
}

/// Which routes beyond the tunnel network the tun may get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteRule {
    /// Those inside these networks (none if empty).
    Inside(Vec<IpNet>),
    /// Any route but a default one (a client that accepts what is pushed).
    AnyButDefault,
}

impl RouteRule {
    fn allows(&self, destination: IpNet) -> bool {
        match self {
            RouteRule::Inside(nets) => nets.iter().any(|n| n.contains(&destination)),
            RouteRule::AnyButDefault => destination.prefix_len() > 0,
        }
    }
}

/// The helper's policy and the state it depends on.
#[derive(Debug, Clone)]
pub struct Policy {
    rule: AddressRule,
    mtu: RangeInclusive<u32>,
    /// Whether `OpenTun` was asked for (successfully or not).
    tun_requested: bool,
    /// The tun's ifindex, once opened.
    index: Option<u32>,
    /// The subnet of the address last set.
    address: Option<Ipv4Net>,
    /// Which IPv6 addresses may be set.
    rule6: AddressRule6,
    /// The subnet of the IPv6 address last set.
    address6: Option<Ipv6Net>,
    /// Routes allowed beyond the tunnel network.
    routes: RouteRule,
    /// What else the command line allows.
    grants: Grants,
    /// Client: the server it is connected to now; no route may cover it.
    underlay: Option<IpAddr>,
    /// The routes added through the tun (at most [`MAX_HELPER_ROUTES`]).
    installed: BTreeSet<IpNet>,
}

impl Policy {
    /// A policy allowing `rule`'s addresses and MTUs from [`MIN_MTU`] to
    /// `max_mtu` (never above [`MAX_MTU`]).
    pub fn new(rule: AddressRule, max_mtu: u32) -> Policy {
        Policy {
            rule,
            mtu: MIN_MTU..=max_mtu.min(MAX_MTU),
            tun_requested: false,
            index: None,
            address: None,
            rule6: AddressRule6::Off,
            address6: None,
            routes: RouteRule::Inside(Vec::new()),
            grants: Grants::default(),
            underlay: None,
            installed: BTreeSet::new(),
        }
    }

    /// This policy, allowing also what `grants` grants.
    pub fn with_grants(self, grants: Grants) -> Policy {
        Policy { grants, ..self }
    }

    /// This policy, allowing also the IPv6 addresses `rule6` allows.
    pub fn with_ipv6(self, rule6: AddressRule6) -> Policy {
        Policy { rule6, ..self }
    }

    /// This policy, allowing also the routes `routes` allows.
    pub fn with_routes(self, routes: RouteRule) -> Policy {
        Policy { routes, ..self }
    }

    /// Whether `request` is allowed now. Call [`Policy::record`] once it has
    /// been carried out.
    pub fn check(&self, request: &HelperRequest) -> Result<(), Refusal> {
        match *request {
            HelperRequest::OpenTun if self.tun_requested => Err(Refusal::TunAlreadyOpened),
            HelperRequest::OpenTun => Ok(()),
            HelperRequest::SetAddress {
                index,
                address,
                prefix,
            } => {
                self.check_index(index)?;
                self.check_address(address, prefix)
                    .map_err(|why| Refusal::Address {
                        address: address.into(),
                        prefix,
                        why,
                    })
            }
            HelperRequest::SetAddress6 {
                index,
                address,
                prefix,
            } => {
                self.check_index(index)?;
                match self.rule6.check(address, prefix) {
                    Ok(_) => Ok(()),
                    Err(why) => Err(Refusal::Address {
                        address: address.into(),
                        prefix,
                        why,
                    }),
                }
            }
            HelperRequest::SetMtu { index, mtu } => {
                self.check_index(index)?;
                match self.mtu.contains(&mtu) {
                    true => Ok(()),
                    false => Err(Refusal::Mtu {
                        mtu,
                        range: self.mtu.clone(),
                    }),
                }
            }
            HelperRequest::LinkUp { index } => self.check_index(index),
            HelperRequest::AddRoute { index, destination } => {
                self.check_index(index)?;
                if !self.installed.contains(&destination)
                    && self.installed.len() >= MAX_HELPER_ROUTES
                {
                    return Err(Refusal::Route {
                        destination,
                        why: RouteProblem::TooMany(MAX_HELPER_ROUTES),
                    });
                }
                self.check_route(destination)
                    .and_then(|()| self.check_client_route(destination))
                    .map_err(|why| Refusal::Route { destination, why })
            }
            HelperRequest::DelRoute { index, destination } => {
                self.check_index(index)?;
                self.check_route(destination)
                    .map_err(|why| Refusal::Route { destination, why })
            }
            HelperRequest::Underlay { index, server } => {
                if !self.is_client() {
                    return Err(Refusal::ClientOnly("the server's address"));
                }
                self.check_index(index)?;
                match unicast(server) {
                    true => Ok(()),
                    false => Err(Refusal::Server {
                        server,
                        why: ServerProblem::NotUnicast,
                    }),
                }
            }
            HelperRequest::Masquerade { index } => {
                self.granted(self.grants.masquerade, "masquerade", "--masquerade")?;
                self.server_only("masquerade")?;
                self.check_index(index)
            }
            HelperRequest::CheckForwarding => self.server_only("checking forwarding"),
            HelperRequest::CheckForwarding6 => {
                self.server_only("checking forwarding")?;
                match self.rule6 {
                    AddressRule6::HostOf(_) => Ok(()),
                    _ => Err(Refusal::NotGranted {
                        what: "IPv6 forwarding",
                        flag: "--network6",
                    }),
                }
            }
            HelperRequest::FullTunnel { index, server } => {
                self.granted(self.grants.full_tunnel, "a full tunnel", "--full-tunnel")?;
                self.check_index(index)?;
                self.check_server(server)
                    .map_err(|why| Refusal::Server { server, why })
            }
            HelperRequest::EndFullTunnel { index } => {
                self.granted(self.grants.full_tunnel, "a full tunnel", "--full-tunnel")?;
                self.check_index(index)
            }
            HelperRequest::SetDns {
                index,
                ref servers,
                ref domains,
                ..
            } => {
                self.granted(self.grants.dns, "DNS", "--dns")?;
                self.check_index(index)?;
                check_dns(servers, domains, self.grants.dns_all_domains).map_err(Refusal::Dns)
            }
            HelperRequest::RevertDns { index } => {
                self.granted(self.grants.dns, "DNS", "--dns")?;
                self.check_index(index)
            }
        }
    }

    fn granted(
        &self,
        granted: bool,
        what: &'static str,
        flag: &'static str,
    ) -> Result<(), Refusal> {
        match granted {
            true => Ok(()),
            false => Err(Refusal::NotGranted { what, flag }),
        }
    }

    fn server_only(&self, what: &'static str) -> Result<(), Refusal> {
        match self.rule {
            AddressRule::HostOf(_) => Ok(()),
            AddressRule::Inside(_) | AddressRule::AnyUnicast => Err(Refusal::ServerOnly(what)),
        }
    }

    /// What the command line granted beyond the tun.
    pub fn grants(&self) -> Grants {
        self.grants
    }

    /// The tun's ifindex, once opened.
    pub fn tun_index(&self) -> Option<u32> {
        self.index
    }

    /// The subnet of the IPv6 address last set on the tun, if any.
    pub fn address6(&self) -> Option<Ipv6Net> {
        self.address6
    }

    /// The IPv6 network NAT is for: a server's own `network6`, if it has one.
    pub fn masquerade_network6(&self) -> Option<Ipv6Net> {
        match (self.rule6, self.masquerade_network()) {
            (AddressRule6::HostOf(network6), Some(_)) => Some(network6),
            _ => None,
        }
    }

    /// The network NAT is for: a server's own.
    pub fn masquerade_network(&self) -> Option<Ipv4Net> {
        match self.rule {
            AddressRule::HostOf(network) if self.grants.masquerade => Some(network),
            _ => None,
        }
    }

    /// A full tunnel's server: a unicast address outside the tunnel.
    fn check_server(&self, server: IpAddr) -> Result<(), ServerProblem> {
        if !unicast(server) {
            return Err(ServerProblem::NotUnicast);
        }
        let tunnel = match self.rule {
            AddressRule::HostOf(network) | AddressRule::Inside(network) => Some(network),
            AddressRule::AnyUnicast => self.address,
        };
        let tunnel6 = self.rule6.tunnel(self.address6);
        match (tunnel, server) {
            (Some(tunnel), IpAddr::V4(v4)) if tunnel.contains(&v4) => {
                Err(ServerProblem::InTunnel(tunnel.into()))
            }
            (_, IpAddr::V6(v6)) => match tunnel6 {
                Some(tunnel6) if tunnel6.contains(&v6) => {
                    Err(ServerProblem::InTunnel(tunnel6.into()))
                }
                _ if tunnel.is_some() => Ok(()),
                _ => Err(ServerProblem::NoAddressYet),
            },
            (Some(_), _) => Ok(()),
            (None, _) => Err(ServerProblem::NoAddressYet),
        }
    }

    /// Records the outcome of an allowed request: the tun's ifindex after
    /// `OpenTun` (`None` if creating it failed), the address after `SetAddress`.
    pub fn record(&mut self, request: &HelperRequest, opened: Option<u32>) {
        match *request {
            HelperRequest::OpenTun => {
                self.tun_requested = true;
                self.index = opened;
            }
            HelperRequest::SetAddress {
                address, prefix, ..
            } => self.address = Ipv4Net::new(address, prefix).ok().map(|n| n.trunc()),
            HelperRequest::SetAddress6 {
                address, prefix, ..
            } => self.address6 = self.rule6.check(address, prefix).ok(),
            HelperRequest::AddRoute { destination, .. } => {
                self.installed.insert(destination);
            }
            HelperRequest::DelRoute { destination, .. } => {
                self.installed.remove(&destination);
            }
            HelperRequest::Underlay { server, .. } | HelperRequest::FullTunnel { server, .. } => {
                self.underlay = Some(server)
            }
            _ => {}
        }
    }

    /// Whether this is a client's helper (a server's sets its network's
    /// host address).
    fn is_client(&self) -> bool {
        !matches!(self.rule, AddressRule::HostOf(_))
    }

    /// What a client's helper refuses of a pushed route even where
    /// [`Policy::check_route`] allows it: without `accept_routes`, a route
    /// wider than [`MIN_PUSHED_PREFIX4`] (IPv6: [`MIN_PUSHED_PREFIX6`])
    /// unless the full tunnel was granted; and any route that covers the
    /// server's address (the tunnel would carry itself, or a malicious
    /// server would take the connection to itself).
    fn check_client_route(&self, destination: IpNet) -> Result<(), RouteProblem> {
        if !self.is_client() {
            return Ok(());
        }
        let min = match destination {
            IpNet::V4(_) => MIN_PUSHED_PREFIX4,
            IpNet::V6(_) => MIN_PUSHED_PREFIX6,
        };
        if self.routes == RouteRule::AnyButDefault
            && !self.grants.full_tunnel
            && destination.prefix_len() < min
        {
            return Err(RouteProblem::TooWide(min));
        }
        match self.underlay {
            Some(server) if destination.contains(&server) => {
                Err(RouteProblem::CoversServer(server))
            }
            _ => Ok(()),
        }
    }

    /// The checks of a client's request against the host: `connected` are
    /// the networks connected to the host's other interfaces (routes without
    /// a gateway in the main table, not through the tun). A route inside
    /// (or equal to) one of them would take part of that LAN's traffic into
    /// the tun, and so would an address inside one (or a subnet inside
    /// one): refused. A wider route is allowed: the LAN's own, longer
    /// route still wins for it. Servers are not checked (their routes and
    /// addresses are their own configuration).
    pub fn check_host(&self, request: &HelperRequest, connected: &[IpNet]) -> Result<(), Refusal> {
        if !self.is_client() {
            return Ok(());
        }
        let (what, net, address) = match *request {
            HelperRequest::AddRoute { destination, .. } => ("route", destination, None),
            HelperRequest::SetAddress {
                address, prefix, ..
            } => match Ipv4Net::new(address, prefix) {
                Ok(net) => ("address", IpNet::V4(net.trunc()), Some(IpAddr::V4(address))),
                Err(_) => return Ok(()),
            },
            HelperRequest::SetAddress6 {
                address, prefix, ..
            } => match Ipv6Net::new(address, prefix) {
                Ok(net) => ("address", IpNet::V6(net.trunc()), Some(IpAddr::V6(address))),
                Err(_) => return Ok(()),
            },
            _ => return Ok(()),
        };
        let clash = connected.iter().find(|lan| {
            lan.contains(&net) || address.is_some_and(|address| lan.contains(&address))
        });
        match clash {
            Some(&lan) => Err(Refusal::Host { what, net, lan }),
            None => Ok(()),
        }
    }

    fn check_index(&self, asked: u32) -> Result<(), Refusal> {
        match self.index {
            None => Err(Refusal::NoTun),
            Some(tun) if tun == asked => Ok(()),
            Some(tun) => Err(Refusal::OtherInterface { asked, tun }),
        }
    }

    fn check_address(&self, address: Ipv4Addr, prefix: u8) -> Result<(), AddressProblem> {
        let subnet = match self.rule {
            AddressRule::HostOf(network) => {
                if prefix != network.prefix_len() {
                    return Err(AddressProblem::NotTheNetworksPrefix(network.into()));
                }
                if !network.contains(&address) {
                    return Err(AddressProblem::Outside(network.into()));
                }
                network
            }
            AddressRule::Inside(network) => {
                if !network.contains(&address) {
                    return Err(AddressProblem::Outside(network.into()));
                }
                if prefix < network.prefix_len() || !TUNNEL_PREFIX.contains(&prefix) {
                    return Err(AddressProblem::PrefixLeaves {
                        allowed: network.prefix_len().max(*TUNNEL_PREFIX.start())
                            ..=*TUNNEL_PREFIX.end(),
                        network: network.into(),
                    });
                }
                subnet_of(address, prefix)?
            }
            AddressRule::AnyUnicast => {
                if !TUNNEL_PREFIX.contains(&prefix) {
                    return Err(AddressProblem::Prefix(TUNNEL_PREFIX));
                }
                if address.is_loopback()
                    || address.is_multicast()
                    || address.is_broadcast()
                    || address.is_unspecified()
                {
                    return Err(AddressProblem::NotUnicast);
                }
                subnet_of(address, prefix)?
            }
        };
        if address == subnet.network() || address == subnet.broadcast() {
            return Err(AddressProblem::NotAHost(subnet.into()));
        }
        Ok(())
    }

    fn check_route(&self, destination: IpNet) -> Result<(), RouteProblem> {
        if self.routes.allows(destination) {
            return Ok(());
        }
        let allowed: IpNet = match (destination, self.rule) {
            (IpNet::V4(_), AddressRule::HostOf(network) | AddressRule::Inside(network)) => {
                network.into()
            }
            (IpNet::V4(_), AddressRule::AnyUnicast) => {
                self.address.ok_or(RouteProblem::NoAddressYet)?.into()
            }
            (IpNet::V6(_), _) => self
                .rule6
                .tunnel(self.address6)
                .ok_or(RouteProblem::NoIpv6AddressYet)?
                .into(),
        };
        match (allowed.contains(&destination), &self.routes) {
            (true, _) => Ok(()),
            (false, RouteRule::AnyButDefault) => Err(RouteProblem::DefaultNever(allowed)),
            (false, RouteRule::Inside(nets)) if nets.is_empty() => {
                Err(RouteProblem::Outside(allowed))
            }
            (false, RouteRule::Inside(nets)) => Err(RouteProblem::OutsideAllowed {
                tunnel: allowed,
                allowed: nets.clone(),
            }),
        }
    }
}

/// DNS settings within the session parameters' limits: unicast servers,
/// valid search domains.
fn check_dns(servers: &[IpAddr], domains: &[String], all_domains: bool) -> Result<(), DnsProblem> {
    if servers.len() > MAX_DNS {
        return Err(DnsProblem::TooManyServers(servers.len()));
    }
    if domains.len() > MAX_DNS_SEARCH {
        return Err(DnsProblem::TooManyDomains(domains.len()));
    }
    // Loopback too: a pushed resolver on the client's own loopback would
    // be a local service the server picked.
    if let Some(&bad) = servers.iter().find(|s| !unicast(**s)) {
        return Err(DnsProblem::NotUnicast(bad));
    }
    if let Some(bad) = domains.iter().find(|d| !valid_domain(d.as_bytes())) {
        return Err(DnsProblem::NotADomain(bad.clone()));
    }
    if let Some(wide) = domains.iter().find(|d| !all_domains && single_label(d)) {
        return Err(DnsProblem::SingleLabel(wide.clone()));
    }
    Ok(())
}

/// A unicast address of another host: not loopback, multicast, broadcast
/// or unspecified.
fn unicast(address: IpAddr) -> bool {
    let broadcast = matches!(address, IpAddr::V4(v4) if v4.is_broadcast());
    !(address.is_loopback() || address.is_multicast() || broadcast || address.is_unspecified())
}

/// The subnet `address/prefix` lies in.
fn subnet_of(address: Ipv4Addr, prefix: u8) -> Result<Ipv4Net, AddressProblem> {
    Ipv4Net::new(address, prefix)
        .map(|n| n.trunc())
        .map_err(|_| AddressProblem::PrefixLength(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy6::AddressRule6;

    const TUN: u32 = 7;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test network")
    }

    fn addr(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    /// A policy whose tun (ifindex 7) is open.
    fn opened(rule: AddressRule) -> Policy {
        let mut policy = Policy::new(rule, 65535);
        policy.check(&HelperRequest::OpenTun).expect("first open");
        policy.record(&HelperRequest::OpenTun, Some(TUN));
        policy
    }

    fn server() -> Policy {
        opened(AddressRule::HostOf(net("198.19.0.0/16")))
    }

    fn set_address(address: &str, prefix: u8) -> HelperRequest {
        HelperRequest::SetAddress {
            index: TUN,
            address: addr(address),
            prefix,
        }
    }

    fn add_route(destination: &str) -> HelperRequest {
        HelperRequest::AddRoute {
            index: TUN,
            destination: net(destination).into(),
        }
    }

    fn assert_addresses_refused(policy: &Policy, cases: &[(&str, u8)]) {
        for &(address, prefix) in cases {
            assert!(
                matches!(
                    policy.check(&set_address(address, prefix)),
                    Err(Refusal::Address { .. })
                ),
                "{address}/{prefix}"
            );
        }
    }

    #[test]
    fn a_second_open_tun_is_refused() {
        let mut policy = server();
        assert_eq!(
            policy.check(&HelperRequest::OpenTun),
            Err(Refusal::TunAlreadyOpened)
        );
        // Also after a first attempt that failed; and with no tun, nothing
        // can be configured.
        policy = Policy::new(AddressRule::AnyUnicast, 1500);
        policy.record(&HelperRequest::OpenTun, None);
        assert_eq!(
            policy.check(&HelperRequest::OpenTun),
            Err(Refusal::TunAlreadyOpened)
        );
        assert_eq!(
            policy.check(&HelperRequest::LinkUp { index: TUN }),
            Err(Refusal::NoTun)
        );
    }

    #[test]
    fn another_interfaces_index_is_refused() {
        let policy = server();
        let other = [
            HelperRequest::LinkUp { index: 1 },
            HelperRequest::SetMtu {
                index: 2,
                mtu: 1500,
            },
            HelperRequest::SetAddress {
                index: 1,
                address: addr("198.19.0.1"),
                prefix: 16,
            },
            HelperRequest::AddRoute {
                index: 3,
                destination: net("198.19.0.0/16").into(),
            },
            HelperRequest::DelRoute {
                index: 3,
                destination: net("198.19.0.0/16").into(),
            },
        ];
        for request in other {
            assert!(
                matches!(
                    policy.check(&request),
                    Err(Refusal::OtherInterface { tun: TUN, .. })
                ),
                "{request}"
            );
        }
    }

    #[test]
    fn the_server_sets_host_addresses_of_its_network_only() {
        let policy = server();
        assert_eq!(policy.check(&set_address("198.19.0.1", 16)), Ok(()));
        assert_eq!(policy.check(&set_address("198.19.200.7", 16)), Ok(()));
        assert_addresses_refused(
            &policy,
            &[
                ("198.18.0.1", 16),     // outside the network
                ("10.0.0.1", 16),       // outside the network
                ("198.19.0.1", 24),     // not the network's prefix
                ("198.19.0.1", 8),      // not the network's prefix
                ("198.19.0.0", 16),     // the network address
                ("198.19.255.255", 16), // the broadcast address
            ],
        );
    }

    #[test]
    fn routes_outside_the_network_are_refused() {
        let policy = server();
        assert_eq!(policy.check(&add_route("198.19.0.0/16")), Ok(()));
        assert_eq!(policy.check(&add_route("198.19.4.0/24")), Ok(()));
        for destination in ["0.0.0.0/0", "198.18.0.0/15", "198.18.0.0/16", "10.0.0.0/8"] {
            assert!(
                matches!(
                    policy.check(&add_route(destination)),
                    Err(Refusal::Route { .. })
                ),
                "{destination}"
            );
            let delete = HelperRequest::DelRoute {
                index: TUN,
                destination: net(destination).into(),
            };
            assert!(matches!(policy.check(&delete), Err(Refusal::Route { .. })));
        }
    }

    #[test]
    fn mtu_is_bounded() {
        let mut policy = Policy::new(AddressRule::AnyUnicast, 9000);
        policy.record(&HelperRequest::OpenTun, Some(TUN));
        let mtu = |mtu| policy.check(&HelperRequest::SetMtu { index: TUN, mtu });
        assert_eq!(mtu(576), Ok(()));
        assert_eq!(mtu(1500), Ok(()));
        assert_eq!(mtu(9000), Ok(()));
        assert!(matches!(mtu(575), Err(Refusal::Mtu { .. })));
        assert!(matches!(mtu(9001), Err(Refusal::Mtu { .. })));
        assert!(matches!(mtu(0), Err(Refusal::Mtu { .. })));
    }

    #[test]
    fn a_client_with_a_network_stays_inside_it() {
        let policy = opened(AddressRule::Inside(net("198.19.0.0/16")));
        assert_eq!(policy.check(&set_address("198.19.0.2", 16)), Ok(()));
        assert_eq!(policy.check(&set_address("198.19.3.2", 24)), Ok(()));
        assert_addresses_refused(
            &policy,
            &[
                ("198.18.0.2", 16), // outside
                ("198.19.0.2", 15), // a subnet larger than the network
                ("198.19.0.2", 31), // too small to hold a peer
                ("198.19.3.0", 24), // the subnet's network address
            ],
        );
        assert_eq!(policy.check(&add_route("198.19.9.0/24")), Ok(()));
        assert!(policy.check(&add_route("198.20.0.0/16")).is_err());
    }

    #[test]
    fn a_client_without_a_network_takes_any_unicast_address() {
        let mut policy = opened(AddressRule::AnyUnicast);
        // No route before an address is set.
        assert!(matches!(
            policy.check(&add_route("198.19.0.0/16")),
            Err(Refusal::Route { .. })
        ));
        for (address, prefix) in [("198.19.0.2", 16), ("10.1.2.3", 8), ("172.16.0.9", 30)] {
            assert_eq!(
                policy.check(&set_address(address, prefix)),
                Ok(()),
                "{address}/{prefix}"
            );
        }
        assert_addresses_refused(
            &policy,
            &[
                ("127.0.0.2", 8),        // loopback
                ("224.0.0.5", 16),       // multicast
                ("255.255.255.255", 16), // broadcast
                ("0.0.0.0", 16),         // unspecified
                ("198.19.0.2", 7),       // prefix too short
                ("198.19.0.2", 31),      // prefix too long
                ("198.19.0.2", 40),      // not a prefix
                ("198.19.255.255", 16),  // broadcast of its subnet
            ],
        );
        // Routes follow the address the helper set last.
        let granted = set_address("198.19.0.2", 16);
        policy.record(&granted, None);
        assert_eq!(policy.check(&add_route("198.19.0.0/16")), Ok(()));
        assert_eq!(policy.check(&add_route("198.19.7.0/24")), Ok(()));
        assert!(policy.check(&add_route("198.18.0.0/16")).is_err());
        assert!(policy.check(&add_route("0.0.0.0/0")).is_err());
        let moved = set_address("10.1.2.3", 24);
        policy.record(&moved, None);
        assert_eq!(policy.check(&add_route("10.1.2.0/24")), Ok(()));
        assert!(policy.check(&add_route("198.19.0.0/16")).is_err());
    }

    #[test]
    fn routes_beyond_the_tunnel_only_as_the_rule_allows() {
        let network: Ipv4Net = "198.19.0.0/16".parse().expect("net");
        let lan: Ipv4Net = "198.18.201.0/24".parse().expect("net");
        let route = |destination: &str| HelperRequest::AddRoute {
            index: 7,
            destination: destination.parse().expect("net"),
        };
        let opened = |policy: Policy| {
            let mut policy = policy;
            policy.record(&HelperRequest::OpenTun, Some(7));
            policy
        };
        // A server: its peers' networks, nothing else.
        let server = opened(
            Policy::new(AddressRule::HostOf(network), 1500)
                .with_routes(RouteRule::Inside(vec![lan.into()])),
        );
        assert_eq!(server.check(&route("198.18.201.0/24")), Ok(()));
        assert_eq!(server.check(&route("198.18.201.128/25")), Ok(()));
        assert!(server.check(&route("198.18.202.0/24")).is_err());
        assert!(server.check(&route("0.0.0.0/0")).is_err());
        // A client that accepts what is pushed: anything but a default route.
        let client = opened(
            Policy::new(AddressRule::Inside(network), 1500).with_routes(RouteRule::AnyButDefault),
        );
        assert_eq!(client.check(&route("198.18.202.0/24")), Ok(()));
        let Err(refusal) = client.check(&route("0.0.0.0/0")) else {
            panic!("a default route was allowed");
        };
        assert!(refusal
            .to_string()
            .contains("default route is never allowed"));
        // Without a rule: the tunnel network only.
        let plain = opened(Policy::new(AddressRule::Inside(network), 1500));
        assert!(plain.check(&route("198.18.201.0/24")).is_err());
        assert_eq!(plain.check(&route("198.19.4.0/24")), Ok(()));
    }

    #[test]
    fn ipv6_addresses_and_routes_as_the_ipv6_rule_allows() {
        let set6 = |address: &str, prefix| HelperRequest::SetAddress6 {
            index: TUN,
            address: address.parse().expect("v6"),
            prefix,
        };
        let route = |destination: &str| HelperRequest::AddRoute {
            index: TUN,
            destination: destination.parse().expect("net"),
        };
        // A server without network6: no IPv6 at all.
        let v4_only = server();
        assert!(matches!(
            v4_only.check(&set6("2001:2:0:100::1", 64)),
            Err(Refusal::Address { .. })
        ));
        assert!(v4_only.check(&route("2001:2:0:100::/64")).is_err());
        // A server with one: its network, and its peers' IPv6 networks.
        let network6 = "2001:2:0:100::/64".parse().expect("net");
        let lan6: IpNet = "2001:2:0:201::/64".parse().expect("net");
        let server6 = opened(AddressRule::HostOf(net("198.19.0.0/16")))
            .with_ipv6(AddressRule6::HostOf(network6))
            .with_routes(RouteRule::Inside(vec![lan6]));
        assert_eq!(server6.check(&set6("2001:2:0:100::1", 64)), Ok(()));
        assert!(server6.check(&set6("2001:2:0:100::1", 96)).is_err());
        assert_eq!(server6.check(&route("2001:2:0:201::/64")), Ok(()));
        assert!(server6.check(&route("2001:2:0:202::/64")).is_err());
        // A client granted its address: routes inside its subnet, and what
        // it accepts, never a default route.
        let mut client = opened(AddressRule::AnyUnicast)
            .with_ipv6(AddressRule6::AnyUnicast)
            .with_routes(RouteRule::AnyButDefault);
        assert!(client.check(&route("2001:2:0:100::/64")).is_ok());
        assert!(client.check(&route("::/0")).is_err());
        let plain = opened(AddressRule::AnyUnicast).with_ipv6(AddressRule6::AnyUnicast);
        assert!(plain.check(&route("2001:2:0:100::/64")).is_err());
        let granted = set6("2001:2:0:100::2", 64);
        assert_eq!(client.check(&granted), Ok(()));
        client.record(&granted, None);
        assert!(client.check(&set6("fe80::2", 64)).is_err());
    }

    #[test]
    fn a_client_refuses_wide_routes_unless_opted_in_and_never_covers_its_server() {
        let route = |d: &str| HelperRequest::AddRoute {
            index: TUN,
            destination: d.parse().expect("net"),
        };
        let network = net("198.19.0.0/16");
        let opened = |mut policy: Policy| {
            policy.record(&HelperRequest::OpenTun, Some(TUN));
            policy
        };
        let pushed = opened(
            Policy::new(AddressRule::Inside(network), 1500).with_routes(RouteRule::AnyButDefault),
        );
        // Without accept_routes: nothing wider than a /8 (IPv6: /16).
        for wide in ["0.0.0.0/1", "128.0.0.0/2", "64.0.0.0/7"] {
            let Err(refusal) = pushed.check(&route(wide)) else {
                panic!("{wide} installed without accept_routes");
            };
            assert!(refusal.to_string().contains("wider than /8"), "{refusal}");
        }
        assert_eq!(pushed.check(&route("10.0.0.0/8")), Ok(()));
        // With the full tunnel granted, the user chose to send everything.
        let full = opened(
            Policy::new(AddressRule::Inside(network), 1500)
                .with_routes(RouteRule::AnyButDefault)
                .with_grants(grants(false, true, false)),
        );
        assert_eq!(full.check(&route("0.0.0.0/1")), Ok(()));
        // accept_routes = ["0.0.0.0/0"]: the explicit opt-in for anything.
        let mut accepting = opened(
            Policy::new(AddressRule::Inside(network), 1500)
                .with_routes(RouteRule::Inside(vec!["0.0.0.0/0".parse().expect("net")])),
        );
        assert_eq!(accepting.check(&route("0.0.0.0/1")), Ok(()));
        // Once the server's address is known, no route may cover it.
        let underlay = HelperRequest::Underlay {
            index: TUN,
            server: "203.0.113.9".parse().expect("ip"),
        };
        assert_eq!(accepting.check(&underlay), Ok(()));
        accepting.record(&underlay, None);
        let Err(refusal) = accepting.check(&route("203.0.113.0/24")) else {
            panic!("a route over the server was allowed");
        };
        assert!(
            refusal.to_string().contains("covers the server"),
            "{refusal}"
        );
        assert!(accepting.check(&route("0.0.0.0/1")).is_ok());
        assert!(accepting.check(&route("128.0.0.0/1")).is_err());
        // Servers never announce an underlay.
        assert!(matches!(
            server().check(&underlay),
            Err(Refusal::ClientOnly(_))
        ));
        let loopback = HelperRequest::Underlay {
            index: TUN,
            server: "127.0.0.1".parse().expect("ip"),
        };
        assert!(pushed.check(&loopback).is_err());
    }

    #[test]
    fn a_client_refuses_routes_and_addresses_inside_its_hosts_networks() {
        let lan: Vec<IpNet> = vec![
            "198.18.1.0/24".parse().expect("net"),
            "2001:2:0:1::/64".parse().expect("net"),
        ];
        let route = |d: &str| HelperRequest::AddRoute {
            index: TUN,
            destination: d.parse().expect("net"),
        };
        let client = opened(AddressRule::AnyUnicast).with_routes(RouteRule::AnyButDefault);
        for inside in [
            "198.18.1.0/24",
            "198.18.1.128/25",
            "198.18.1.7/32",
            "2001:2:0:1::/80",
        ] {
            assert!(
                matches!(
                    client.check_host(&route(inside), &lan),
                    Err(Refusal::Host { .. })
                ),
                "{inside}"
            );
        }
        // Wider than the LAN, or beside it: its own route still wins.
        for fine in ["198.18.0.0/16", "198.18.2.0/24", "2001:2::/48"] {
            assert_eq!(client.check_host(&route(fine), &lan), Ok(()), "{fine}");
        }
        // A granted address inside the LAN, or a subnet inside it.
        assert!(client
            .check_host(&set_address("198.18.1.50", 16), &lan)
            .is_err());
        assert!(client
            .check_host(&set_address("198.18.1.50", 28), &lan)
            .is_err());
        assert_eq!(
            client.check_host(&set_address("198.19.0.2", 16), &lan),
            Ok(())
        );
        let set6 = HelperRequest::SetAddress6 {
            index: TUN,
            address: "2001:2:0:1::9".parse().expect("v6"),
            prefix: 64,
        };
        assert!(client.check_host(&set6, &lan).is_err());
        // A server's own configuration is not second-guessed.
        assert_eq!(server().check_host(&route("198.18.1.0/24"), &lan), Ok(()));
    }

    #[test]
    fn the_routes_a_helper_installs_are_capped() {
        let mut client = opened(AddressRule::AnyUnicast)
            .with_routes(RouteRule::Inside(vec!["10.0.0.0/8".parse().expect("net")]));
        for i in 0..MAX_HELPER_ROUTES as u32 {
            let destination =
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).expect("net"));
            let add = HelperRequest::AddRoute {
                index: TUN,
                destination,
            };
            assert_eq!(client.check(&add), Ok(()));
            client.record(&add, None);
        }
        let one_more = add_route("10.200.0.0/24");
        assert!(matches!(
            client.check(&one_more),
            Err(Refusal::Route { .. })
        ));
        // One already installed may be asked again; one removed frees a place.
        assert_eq!(client.check(&add_route("10.0.0.0/24")), Ok(()));
        let del = HelperRequest::DelRoute {
            index: TUN,
            destination: net("10.0.0.0/24").into(),
        };
        client.record(&del, None);
        assert_eq!(client.check(&one_more), Ok(()));
    }

    fn grants(masquerade: bool, full_tunnel: bool, dns: bool) -> Grants {
        Grants {
            masquerade,
            full_tunnel,
            dns,
            dns_all_domains: false,
        }
    }

    #[test]
    fn masquerade_only_on_a_server_started_with_it() {
        let network = net("198.19.0.0/16");
        let nat = HelperRequest::Masquerade { index: TUN };
        let server = opened(AddressRule::HostOf(network));
        assert!(matches!(
            server.check(&nat),
            Err(Refusal::NotGranted { .. })
        ));
        assert_eq!(server.masquerade_network(), None);
        let server = server.with_grants(grants(true, false, false));
        assert_eq!(server.check(&nat), Ok(()));
        assert_eq!(server.masquerade_network(), Some(network));
        // Its network6 too, with IPv6 inside the tunnel; never without the grant.
        assert_eq!(server.masquerade_network6(), None);
        let network6 = "2001:2:0:100::/64".parse().expect("net");
        let dual = server.clone().with_ipv6(AddressRule6::HostOf(network6));
        assert_eq!(dual.masquerade_network6(), Some(network6));
        let ungranted =
            opened(AddressRule::HostOf(network)).with_ipv6(AddressRule6::HostOf(network6));
        assert_eq!(ungranted.masquerade_network6(), None);
        assert!(matches!(
            server.check(&HelperRequest::Masquerade { index: 1 }),
            Err(Refusal::OtherInterface { .. })
        ));
        // A client never NATs, whatever it was started with.
        let client = opened(AddressRule::Inside(network)).with_grants(grants(true, true, true));
        assert!(matches!(client.check(&nat), Err(Refusal::ServerOnly(_))));
        assert!(matches!(
            client.check(&HelperRequest::CheckForwarding),
            Err(Refusal::ServerOnly(_))
        ));
        assert_eq!(server.check(&HelperRequest::CheckForwarding), Ok(()));
        // IPv6 forwarding: a server with network6 only.
        let v6 = HelperRequest::CheckForwarding6;
        assert!(matches!(server.check(&v6), Err(Refusal::NotGranted { .. })));
        assert_eq!(dual.check(&v6), Ok(()));
        assert!(matches!(client.check(&v6), Err(Refusal::ServerOnly(_))));
    }

    #[test]
    fn a_full_tunnel_only_for_a_client_started_with_it_and_a_server_outside() {
        let full = |server: &str| HelperRequest::FullTunnel {
            index: TUN,
            server: server.parse().expect("ip"),
        };
        let plain = opened(AddressRule::Inside(net("198.19.0.0/16")));
        assert!(matches!(
            plain.check(&full("198.18.1.1")),
            Err(Refusal::NotGranted { .. })
        ));
        assert!(matches!(
            plain.check(&HelperRequest::EndFullTunnel { index: TUN }),
            Err(Refusal::NotGranted { .. })
        ));
        let client = plain.with_grants(grants(false, true, false));
        assert_eq!(client.check(&full("198.18.1.1")), Ok(()));
        assert_eq!(
            client.check(&HelperRequest::EndFullTunnel { index: TUN }),
            Ok(())
        );
        for bad in [
            "198.19.0.1",
            "127.0.0.1",
            "224.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
        ] {
            assert!(
                matches!(client.check(&full(bad)), Err(Refusal::Server { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            client.check(&HelperRequest::FullTunnel {
                index: 3,
                server: "198.18.1.1".parse().expect("ip")
            }),
            Err(Refusal::OtherInterface { .. })
        ));
        // Without a configured network: outside the subnet of the address
        // set, and nothing before one is set.
        let mut any = opened(AddressRule::AnyUnicast).with_grants(grants(false, true, false));
        assert!(any.check(&full("198.18.1.1")).is_err());
        any.record(&set_address("198.19.0.2", 16), None);
        assert_eq!(any.check(&full("198.18.1.1")), Ok(()));
        assert!(any.check(&full("198.19.0.1")).is_err());
        // The default route itself stays refused as a plain route.
        assert!(client.check(&add_route("0.0.0.0/0")).is_err());
        // A server reached over IPv6: outside the IPv6 tunnel network too.
        assert_eq!(client.check(&full("2001:2:0:1::1")), Ok(()));
        let mut dual = client.with_ipv6(AddressRule6::AnyUnicast);
        dual.record(
            &HelperRequest::SetAddress6 {
                index: TUN,
                address: "2001:2:0:100::2".parse().expect("v6"),
                prefix: 64,
            },
            None,
        );
        for bad in ["2001:2:0:100::1", "::1", "ff02::1", "::"] {
            assert!(
                matches!(dual.check(&full(bad)), Err(Refusal::Server { .. })),
                "{bad}"
            );
        }
        assert_eq!(dual.check(&full("2001:2:0:1::1")), Ok(()));
    }

    #[test]
    fn the_pinned_route_goes_where_the_hosts_route_goes_now() {
        let route = |dest: &str, gateway: Option<&str>, index: u32, metric: u32| HostRoute {
            destination: dest.parse().expect("net"),
            gateway: gateway.map(|g| g.parse().expect("ip")),
            index,
            metric,
        };
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let routes = [
            route("0.0.0.0/0", Some("198.18.0.1"), 2, 100),
            route("0.0.0.0/0", Some("198.18.9.1"), 3, 50),
            route("198.18.1.0/24", None, 4, 0),
            // The tunnel's own routes never count.
            route("0.0.0.0/1", None, TUN, 0),
            route("198.18.1.1/32", None, TUN, 0),
            // IPv6: an on-link /64 and a default via a link-local router.
            route("2001:2:0:1::/64", None, 4, 256),
            route("::/0", Some("fe80::1"), 2, 1024),
            route("::/1", None, TUN, 0),
        ];
        // Longest prefix first: the on-link /24.
        assert_eq!(
            pin_route(&routes, ip("198.18.1.1"), TUN),
            Ok(route("198.18.1.1/32", None, 4, 0))
        );
        // Then the lowest metric among the defaults.
        assert_eq!(
            pin_route(&routes, ip("198.18.50.1"), TUN),
            Ok(route("198.18.50.1/32", Some("198.18.9.1"), 3, 50))
        );
        assert_eq!(
            pin_route(&routes[3..5], ip("198.18.50.1"), TUN),
            Err(Refusal::NoUnderlay(ip("198.18.50.1")))
        );
        // An IPv6 server: a /128 the same way, never an IPv4 route.
        assert_eq!(
            pin_route(&routes, ip("2001:2:0:1::1"), TUN),
            Ok(route("2001:2:0:1::1/128", None, 4, 256))
        );
        assert_eq!(
            pin_route(&routes, ip("2001:2:0:9::1"), TUN),
            Ok(route("2001:2:0:9::1/128", Some("fe80::1"), 2, 1024))
        );
        assert_eq!(
            pin_route(&routes[..5], ip("2001:2:0:9::1"), TUN),
            Err(Refusal::NoUnderlay(ip("2001:2:0:9::1")))
        );
    }

    #[test]
    fn dns_only_on_its_own_tun_for_a_client_started_with_it() {
        let set = |servers: &[&str], domains: &[&str]| HelperRequest::SetDns {
            index: TUN,
            servers: servers.iter().map(|s| s.parse().expect("ip")).collect(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            default_route: true,
        };
        let plain = opened(AddressRule::Inside(net("198.19.0.0/16")));
        assert!(matches!(
            plain.check(&set(&["198.19.0.1"], &[])),
            Err(Refusal::NotGranted { .. })
        ));
        let client = plain.clone().with_grants(grants(false, false, true));
        assert_eq!(
            client.check(&set(&["198.19.0.1", "2001:2::53"], &["vpn.example"])),
            Ok(())
        );
        assert_eq!(
            client.check(&HelperRequest::RevertDns { index: TUN }),
            Ok(())
        );
        assert!(matches!(
            client.check(&HelperRequest::RevertDns { index: 1 }),
            Err(Refusal::OtherInterface { .. })
        ));
        for (servers, domains) in [
            (&["0.0.0.0"][..], &[][..]),
            (&["224.0.0.251"], &[]),
            (&["255.255.255.255"], &[]),
            (&["198.19.0.1"], &["bad domain"]),
            (&["198.19.0.1"], &[""]),
            // Loopback: a local service the server would pick.
            (&["127.0.0.53"], &[]),
            (&["::1"], &[]),
            // A single label steers every lookup under it to the tunnel.
            (&["198.19.0.1"], &["com"]),
            (&["198.19.0.1"], &["lan."]),
        ] {
            assert!(
                matches!(client.check(&set(servers, domains)), Err(Refusal::Dns(_))),
                "{servers:?} {domains:?}"
            );
        }
        // Unless the client chose dns = "pushed-all-domains".
        let all = plain.clone().with_grants(Grants {
            dns_all_domains: true,
            ..grants(false, false, true)
        });
        assert_eq!(all.check(&set(&["198.19.0.1"], &["lan"])), Ok(()));
        let many: Vec<String> = (0..=MAX_DNS)
            .map(|i| format!("198.19.0.{}", i + 1))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            client.check(&set(&many, &[])),
            Err(Refusal::Dns(_))
        ));
    }
}
