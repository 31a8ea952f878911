//! The full tunnel's DNS guard: when a full-tunnel client's helper cannot
//! set the pushed resolvers on its tun (no systemd-resolved, no polkit, or
//! another network namespace than resolved's), the host keeps asking its
//! own resolver, usually on the LAN: a connected route beats the tunnel's
//! half-default routes, so those queries would leave beside the tunnel.
//! The guard drops them instead: one nftables table of the helper's own
//! (family `inet`, so IPv4 and IPv6), installed and removed over netlink
//! like the server's NAT table ([`super::nat`]). Only simplevpn-helper
//! runs this (CAP_NET_ADMIN).
//!
//! What it installs, as `nft list table inet simplevpn_dns_svpn0` shows it:
//!
//! ```text
//! table inet simplevpn_dns_svpn0 {
//!     chain output {
//!         type filter hook output priority filter; policy accept;
//!         oifname != "svpn0" oifname != "lo" meta l4proto udp udp dport 53 counter drop
//!         oifname != "svpn0" oifname != "lo" meta l4proto tcp tcp dport 53 counter drop
//!         oifname != "svpn0" oifname != "lo" meta l4proto tcp tcp dport 853 counter drop
//!     }
//! }
//! ```
//!
//! Loopback stays open: a resolver on the host itself is no leak by itself
//! (what it forwards leaves by another interface and meets the guard).
//! Installing replaces a table of that name (left by a helper that was
//! killed) in one atomic batch; removing it twice is not an error.
//!
//! [`fallback`] is the rule that decides when (pure, unit-tested).

use nftnl::expr::InterfaceName;
use nftnl::{nft_expr, Batch, ChainType, Hook, MsgType, ProtoFamily, Rule, Table};

use super::nat::{self, cstring, NatError};
use super::policy::Grants;
use super::protocol::HelperRequest;

/// The chain's name.
const CHAIN: &str = "output";
/// The filter priority (0).
const FILTER_PRIORITY: i32 = 0;

/// A transport protocol the guard matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What is dropped unless it leaves by the tun: DNS (UDP and TCP 53) and
/// DNS over TLS (TCP 853).
pub const BLOCKED: [(Transport, u16); 3] = [
    (Transport::Udp, 53),
    (Transport::Tcp, 53),
    (Transport::Tcp, 853),
];

/// What a client's helper does when the pushed DNS could not be set on
/// its tun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsFallback {
    /// Drop DNS to every destination outside the tunnel: a full tunnel
    /// whose resolvers were pushed, so the host's own resolver is the leak.
    Guard,
    /// Nothing: without a full tunnel (or without pushed resolvers) the
    /// host's resolver is the one meant to answer.
    Nothing,
}

/// The rule: `request` (a `SetDns` that failed) is guarded when the helper
/// was granted both the full tunnel and DNS and the request routes every
/// name to the pushed servers (what a full tunnel with pushed resolvers
/// asks for). `dns = "off"` starts the helper without `--dns`: nothing.
pub fn fallback(grants: Grants, request: &HelperRequest) -> DnsFallback {
    match *request {
        HelperRequest::SetDns {
            ref servers,
            default_route: true,
            ..
        } if grants.full_tunnel && grants.dns && !servers.is_empty() => DnsFallback::Guard,
        _ => DnsFallback::Nothing,
    }
}

/// The table's name for tun `tun`.
pub fn table_name(tun: &str) -> String {
    nat::table_name(tun).replacen("simplevpn_", "simplevpn_dns_", 1)
}

/// What the installed table does, as a phrase for logs and `svpnctl status`.
pub fn describe(tun: &str) -> String {
    format!(
        "nftables table inet {}: DNS (UDP and TCP 53, TCP 853) dropped unless it leaves by {tun}",
        table_name(tun)
    )
}

/// Installs (or replaces) the guard for tun `tun`.
pub fn install(tun: &str) -> Result<(), NatError> {
    let name = cstring(&table_name(tun))?;
    let table = Table::new(&name, ProtoFamily::Inet);
    let mut batch = Batch::new();
    let chain_name = cstring(CHAIN)?;
    let chain = nat::replace_table(
        &mut batch,
        &table,
        &chain_name,
        ChainType::Filter,
        Hook::Out,
        FILTER_PRIORITY,
    );

    for (transport, port) in BLOCKED {
        let mut rule = Rule::new(&chain);
        rule.add_expr(&nft_expr!(meta oifname));
        rule.add_expr(&nft_expr!(cmp != InterfaceName::Exact(cstring(tun)?)));
        rule.add_expr(&nft_expr!(meta oifname));
        rule.add_expr(&nft_expr!(cmp != InterfaceName::Exact(cstring("lo")?)));
        rule.add_expr(&nft_expr!(meta l4proto));
        match transport {
            Transport::Udp => {
                rule.add_expr(&nft_expr!(cmp == nix::libc::IPPROTO_UDP as u8));
                rule.add_expr(&nft_expr!(payload udp dport));
            }
            Transport::Tcp => {
                rule.add_expr(&nft_expr!(cmp == nix::libc::IPPROTO_TCP as u8));
                rule.add_expr(&nft_expr!(payload tcp dport));
            }
        }
        rule.add_expr(&nft_expr!(cmp == port.to_be()));
        rule.add_expr(&nft_expr!(counter));
        rule.add_expr(&nft_expr!(verdict drop));
        batch.add(&rule, MsgType::Add);
    }
    nat::send(&batch.finalize())
}

/// Removes the guard of `tun`; one that is not there is not an error.
pub fn remove(tun: &str) -> Result<(), NatError> {
    let name = cstring(&table_name(tun))?;
    let table = Table::new(&name, ProtoFamily::Inet);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    nat::send(&batch.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_dns(servers: &[&str], default_route: bool) -> HelperRequest {
        HelperRequest::SetDns {
            index: 7,
            servers: servers
                .iter()
                .map(|s| s.parse().expect("test address"))
                .collect(),
            domains: Vec::new(),
            default_route,
        }
    }

    fn grants(full_tunnel: bool, dns: bool) -> Grants {
        Grants {
            full_tunnel,
            dns,
            ..Grants::default()
        }
    }

    #[test]
    fn only_a_full_tunnel_with_pushed_resolvers_is_guarded() {
        let full = set_dns(&["198.19.0.1"], true);
        assert_eq!(fallback(grants(true, true), &full), DnsFallback::Guard);
        // No full tunnel granted, or no DNS granted (dns = "off").
        assert_eq!(fallback(grants(false, true), &full), DnsFallback::Nothing);
        assert_eq!(fallback(grants(true, false), &full), DnsFallback::Nothing);
        // Split DNS (no default route) or only search domains.
        let split = set_dns(&["198.19.0.1"], false);
        assert_eq!(fallback(grants(true, true), &split), DnsFallback::Nothing);
        let none = set_dns(&[], true);
        assert_eq!(fallback(grants(true, true), &none), DnsFallback::Nothing);
        // Anything else.
        assert_eq!(
            fallback(grants(true, true), &HelperRequest::RevertDns { index: 7 }),
            DnsFallback::Nothing
        );
    }

    #[test]
    fn the_table_is_named_after_the_tun() {
        assert_eq!(table_name("svpn0"), "simplevpn_dns_svpn0");
        assert_eq!(table_name("vpn-a.b"), "simplevpn_dns_vpn_a_b");
        assert_eq!(
            describe("svpn0"),
            "nftables table inet simplevpn_dns_svpn0: DNS (UDP and TCP 53, TCP 853) \
             dropped unless it leaves by svpn0"
        );
    }
}
