//! The IPv6 settings of a server, checked: `network6` (the IPv6 tunnel
//! network, a /64 to a /120), each `[[server.peer]] address6`, and every
//! IPv6 route apart from `network6`. A server without `network6` is
//! IPv4-only inside the tunnel: then no peer may have an `address6`.

use std::collections::HashSet;
use std::net::Ipv6Addr;

use ipnet::{IpNet, Ipv6Net};

use crate::config::{check_tunnel_net, ConfigError, PeerSection};
use crate::limits::{MIN_MTU6, TUNNEL_PREFIX6};
use crate::pool6::Pool6;

/// Checks `network6` against the peers, the routes and the MTU; returns it.
pub fn network6(
    network6: Option<Ipv6Net>,
    peers: &[PeerSection],
    routes: &[IpNet],
    mtu: u32,
) -> Result<Option<Ipv6Net>, ConfigError> {
    let Some(network6) = network6 else {
        if let Some((i, peer)) = peers.iter().enumerate().find(|(_, p)| p.address6.is_some()) {
            return Err(ConfigError::new(
                format!("server.peer[{i}].address6"),
                format!(
                    "{} is set, but the server has no network6 (IPv6 inside the tunnel is off)",
                    peer.address6.map_or_else(String::new, |a| a.to_string())
                ),
            ));
        }
        return Ok(None);
    };
    check_tunnel_net("network6", network6.into(), TUNNEL_PREFIX6)?;
    let first = network6.network();
    if first.is_multicast() || first.is_loopback() || first.is_unspecified() {
        return Err(ConfigError::new(
            "network6",
            format!("{network6} is not a unicast network"),
        ));
    }
    if mtu < MIN_MTU6 {
        return Err(ConfigError::new(
            "mtu",
            format!("{mtu} is below {MIN_MTU6}, the least IPv6 (network6) works with"),
        ));
    }
    let pool = Pool6::new(network6);
    let mut fixed: HashSet<Ipv6Addr> = HashSet::new();
    for (i, peer) in peers.iter().enumerate() {
        let field = format!("server.peer[{i}]");
        if let Some(address6) = peer.address6 {
            if !pool.contains(address6) {
                return Err(ConfigError::new(
                    format!("{field}.address6"),
                    format!("{address6} is not a client address of {network6}"),
                ));
            }
            if !fixed.insert(address6) {
                return Err(ConfigError::new(
                    format!("{field}.address6"),
                    format!("{address6} is fixed for two peers"),
                ));
            }
        }
        apart(&format!("{field}.routes"), &peer.routes, network6)?;
    }
    apart("routes", routes, network6)?;
    Ok(Some(network6))
}

/// Each of `routes` apart from `network6`.
fn apart(field: &str, routes: &[IpNet], network6: Ipv6Net) -> Result<(), ConfigError> {
    match routes
        .iter()
        .find(|r| crate::routes::overlaps(r, &IpNet::V6(network6)))
    {
        Some(route) => Err(ConfigError::new(
            field,
            format!("{route} overlaps the IPv6 tunnel network {network6}"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PublicKey;

    fn peer(n: u8, address6: Option<&str>, routes: &[&str]) -> PeerSection {
        PeerSection {
            client_to_client: None,
            key: PublicKey::from_raw(&[n; 32]).expect("key"),
            name: None,
            address: None,
            address6: address6.map(|a| a.parse().expect("address")),
            routes: routes.iter().map(|r| r.parse().expect("route")).collect(),
        }
    }

    fn net(s: &str) -> Option<Ipv6Net> {
        Some(s.parse().expect("net"))
    }

    #[test]
    fn a_64_to_a_120_with_fixed_addresses_inside() {
        let peers = [peer(1, Some("2001:2:0:100::7"), &["2001:2:0:200::/64"])];
        assert_eq!(
            network6(net("2001:2:0:100::/64"), &peers, &[], 1500),
            Ok(net("2001:2:0:100::/64"))
        );
        assert_eq!(network6(None, &[peer(1, None, &[])], &[], 1500), Ok(None));
        let problem = |n: &str, peers: &[PeerSection], routes: &[&str], mtu| {
            let routes: Vec<IpNet> = routes.iter().map(|r| r.parse().expect("r")).collect();
            let e = network6(net(n), peers, &routes, mtu).expect_err("refused");
            format!("{}: {}", e.field, e.problem)
        };
        for (n, want) in [
            (
                "2001:2::/48",
                "network6: 2001:2::/48: the prefix must be between /64 and /120",
            ),
            (
                "2001:2::/121",
                "network6: 2001:2::/121: the prefix must be between /64 and /120",
            ),
            (
                "2001:2::1/64",
                "network6: 2001:2::1/64 has host bits set; did you mean 2001:2::/64?",
            ),
            ("ff02::/64", "network6: ff02::/64 is not a unicast network"),
        ] {
            assert_eq!(problem(n, &[], &[], 1500), want);
        }
        assert_eq!(
            problem("2001:2::/64", &[], &[], 1279),
            "mtu: 1279 is below 1280, the least IPv6 (network6) works with"
        );
        assert_eq!(
            problem("2001:2::/64", &[peer(1, Some("2001:2::1"), &[])], &[], 1500),
            "server.peer[0].address6: 2001:2::1 is not a client address of 2001:2::/64"
        );
        assert_eq!(
            problem(
                "2001:2::/64",
                &[
                    peer(1, Some("2001:2::5"), &[]),
                    peer(2, Some("2001:2::5"), &[])
                ],
                &[],
                1500
            ),
            "server.peer[1].address6: 2001:2::5 is fixed for two peers"
        );
        assert_eq!(
            problem("2001:2::/64", &[], &["2001:2::/56"], 1500),
            "routes: 2001:2::/56 overlaps the IPv6 tunnel network 2001:2::/64"
        );
        let e = network6(None, &[peer(1, Some("2001:2::5"), &[])], &[], 1500).expect_err("off");
        assert_eq!(e.field, "server.peer[0].address6");
    }
}
