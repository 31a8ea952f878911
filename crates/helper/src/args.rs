//! What simplevpn-helper is started with: its command line, which simplevpnd
//! writes ([`HelperArgs::to_args`]) and the helper parses (clap), and the
//! policy it implies.

use clap::{Parser, ValueEnum};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::limits::MAX_TUN_QUEUES;

use super::policy::{AddressRule, Grants, Policy, RouteRule};
use super::policy6::AddressRule6;

/// The helper's configuration. Everything it allows follows from this, not
/// from anything the daemon sends later.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "simplevpn-helper",
    version,
    about = "The privileged side of simplevpnd: creates and configures its tun on request. \
             Started by simplevpnd, with its socket as fd 3; not meant to be run by hand."
)]
pub struct HelperArgs {
    /// Whose helper this is: it decides which addresses are allowed.
    #[arg(long, value_enum)]
    pub role: HelperRole,
    /// Name of the tun to create.
    #[arg(long, value_name = "NAME")]
    pub tun: String,
    /// The tunnel network (required for a server; narrows a client's addresses).
    #[arg(long, value_name = "CIDR")]
    pub network: Option<Ipv4Net>,
    /// The IPv6 tunnel network (a server's IPv6 addresses need it; narrows
    /// a client's).
    #[arg(long, value_name = "CIDR")]
    pub network6: Option<Ipv6Net>,
    /// Largest MTU allowed.
    #[arg(long, value_name = "BYTES")]
    pub max_mtu: u32,
    /// The unprivileged user to run as (keeping CAP_NET_ADMIN).
    #[arg(long, value_name = "NAME")]
    pub user: String,
    /// A network beyond the tunnel that routes may go to (repeatable):
    /// a server's peers' networks, a client's accept_routes.
    #[arg(long = "route", value_name = "CIDR")]
    pub routes: Vec<IpNet>,
    /// A client that accepts every pushed route: any route but a default one.
    #[arg(long)]
    pub any_route: bool,
    /// A server that NATs its network's traffic leaving by other interfaces.
    #[arg(long)]
    pub masquerade: bool,
    /// A server that may turn IPv4 forwarding on.
    #[arg(long)]
    pub forwarding: bool,
    /// A client that may route everything into its tun (full tunnel).
    #[arg(long)]
    pub full_tunnel: bool,
    /// A client that may set DNS on its tun (systemd-resolved).
    #[arg(long)]
    pub dns: bool,
    /// With --dns: search domains of a single label too.
    #[arg(long)]
    pub dns_all_domains: bool,
    /// Queues of the tun (`IFF_MULTI_QUEUE` above 1): a server's, one per
    /// worker, so that each reads its share of the tun.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=MAX_TUN_QUEUES as i64))]
    pub queues: u16,
}

/// The daemon role a helper serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HelperRole {
    Server,
    Client,
}

/// A command line that parses but implies no policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("--network: required for a server")]
    ServerWithoutNetwork,
}

impl HelperArgs {
    /// The command line that parses back into `self`.
    pub fn to_args(&self) -> Vec<String> {
        let role = match self.role {
            HelperRole::Server => "server",
            HelperRole::Client => "client",
        };
        let mut args = vec![
            "--role".to_string(),
            role.to_string(),
            "--tun".to_string(),
            self.tun.clone(),
        ];
        if let Some(network) = self.network {
            args.extend(["--network".to_string(), network.to_string()]);
        }
        if let Some(network6) = self.network6 {
            args.extend(["--network6".to_string(), network6.to_string()]);
        }
        args.extend([
            "--max-mtu".to_string(),
            self.max_mtu.to_string(),
            "--user".to_string(),
            self.user.clone(),
        ]);
        for route in &self.routes {
            args.extend(["--route".to_string(), route.to_string()]);
        }
        if self.queues != 1 {
            args.extend(["--queues".to_string(), self.queues.to_string()]);
        }
        for (on, flag) in [
            (self.any_route, "--any-route"),
            (self.masquerade, "--masquerade"),
            (self.forwarding, "--forwarding"),
            (self.full_tunnel, "--full-tunnel"),
            (self.dns, "--dns"),
            (self.dns_all_domains, "--dns-all-domains"),
        ] {
            if on {
                args.push(flag.to_string());
            }
        }
        args
    }

    /// The allow-list for this role and network.
    pub fn policy(&self) -> Result<Policy, ArgsError> {
        let rule = match (self.role, self.network) {
            (HelperRole::Server, Some(network)) => AddressRule::HostOf(network),
            (HelperRole::Server, None) => return Err(ArgsError::ServerWithoutNetwork),
            (HelperRole::Client, Some(network)) => AddressRule::Inside(network),
            (HelperRole::Client, None) => AddressRule::AnyUnicast,
        };
        let rule6 = match (self.role, self.network6) {
            (HelperRole::Server, Some(network6)) => AddressRule6::HostOf(network6),
            (HelperRole::Server, None) => AddressRule6::Off,
            (HelperRole::Client, Some(network6)) => AddressRule6::Inside(network6),
            (HelperRole::Client, None) => AddressRule6::AnyUnicast,
        };
        let routes = match self.any_route {
            true => RouteRule::AnyButDefault,
            false => RouteRule::Inside(self.routes.clone()),
        };
        let server = self.role == HelperRole::Server;
        let grants = Grants {
            masquerade: self.masquerade && server,
            full_tunnel: self.full_tunnel && !server,
            dns: self.dns && !server,
            dns_all_domains: self.dns_all_domains && !server,
        };
        Ok(Policy::new(rule, self.max_mtu)
            .with_ipv6(rule6)
            .with_routes(routes)
            .with_grants(grants))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses_back() {
        for (role, network) in [
            (HelperRole::Server, Some("198.19.0.0/16")),
            (HelperRole::Client, Some("198.19.0.0/16")),
            (HelperRole::Client, None),
        ] {
            let args = HelperArgs {
                role,
                tun: "svpn0".into(),
                network: network.map(|n| n.parse().expect("net")),
                network6: network.map(|_| "2001:2:0:100::/64".parse().expect("net")),
                max_mtu: 65535,
                user: "nobody".into(),
                routes: vec![
                    "198.18.201.0/24".parse().expect("net"),
                    "2001:2:0:201::/64".parse().expect("net"),
                ],
                any_route: role == HelperRole::Client,
                masquerade: role == HelperRole::Server,
                forwarding: role == HelperRole::Server,
                full_tunnel: role == HelperRole::Client,
                dns: role == HelperRole::Client,
                dns_all_domains: false,
                queues: match role {
                    HelperRole::Server => 4,
                    HelperRole::Client => 1,
                },
            };
            let argv = std::iter::once("simplevpn-helper".to_string()).chain(args.to_args());
            assert_eq!(HelperArgs::try_parse_from(argv).expect("parse"), args);
            assert!(args.policy().is_ok());
        }
    }

    #[test]
    fn a_server_needs_a_network() {
        let args = HelperArgs {
            role: HelperRole::Server,
            tun: "svpn0".into(),
            network: None,
            network6: None,
            max_mtu: 1500,
            user: "nobody".into(),
            routes: Vec::new(),
            any_route: false,
            masquerade: false,
            forwarding: false,
            full_tunnel: false,
            dns: false,
            dns_all_domains: false,
            queues: 1,
        };
        assert_eq!(args.policy().err(), Some(ArgsError::ServerWithoutNetwork));
    }

    #[test]
    fn queues_are_bounded() {
        let parse = |queues: &str| {
            HelperArgs::try_parse_from([
                "simplevpn-helper",
                "--role",
                "server",
                "--tun",
                "svpn0",
                "--max-mtu",
                "1500",
                "--user",
                "nobody",
                "--queues",
                queues,
            ])
        };
        assert_eq!(parse("1").expect("one queue").queues, 1);
        let most = MAX_TUN_QUEUES.to_string();
        assert_eq!(
            parse(&most).expect("the most").queues as usize,
            MAX_TUN_QUEUES
        );
        for bad in ["0", &(MAX_TUN_QUEUES + 1).to_string(), "many"] {
            let e = parse(bad).expect_err(bad).to_string();
            assert!(e.contains("--queues"), "{bad}: {e}");
        }
    }
}
