//! The server's NAT: one nftables table of the helper's own, installed and
//! removed over netlink (libnftnl through the `nftnl` and `mnl` crates; no
//! shell, no `nft` binary). Only simplevpn-helper runs this (CAP_NET_ADMIN).
//!
//! What it installs, as `nft list table ip simplevpn_svpn0` shows it:
//!
//! ```text
//! table ip simplevpn_svpn0 {
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr 198.19.0.0/16 oifname != "svpn0" masquerade
//!     }
//! }
//! ```
//!
//! and with IPv6 inside the tunnel (`network6`) the same for IPv6 in a
//! table of family `ip6` of the same name (`ip6 saddr fd00:10::/64 ...`).
//!
//! Installing replaces any table of that name (left by a helper that was
//! killed), in one atomic batch; removing it twice is not an error.

use std::ffi::{CStr, CString};
use std::io;

use std::net::Ipv6Addr;

use ipnet::IpNet;
use nftnl::expr::InterfaceName;
use nftnl::{nft_expr, Batch, Chain, ChainType, FinalizedBatch, Hook, MsgType, ProtoFamily, Rule};
use nftnl::{Policy, Table};

/// The chain's priority: srcnat (100), where source NAT belongs.
const SRCNAT_PRIORITY: i32 = 100;
/// The chain's name.
const CHAIN: &str = "postrouting";

/// Why the NAT table could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("the name {0:?} contains a NUL byte")]
    Name(String),
    #[error("nftables over netlink: {0}")]
    Netlink(#[source] io::Error),
}

/// The table's name for tun `tun`: `simplevpn_` and the tun's name, with
/// every byte nft would not take unquoted made `_`.
pub fn table_name(tun: &str) -> String {
    let tun: String = tun
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() {
            true => c,
            false => '_',
        })
        .collect();
    format!("simplevpn_{tun}")
}

/// What the installed table does, as a phrase for logs and `svpnctl status`.
pub fn describe(tun: &str, network: impl Into<IpNet>) -> String {
    let network = network.into();
    let family = match network {
        IpNet::V4(_) => "ip",
        IpNet::V6(_) => "ip6",
    };
    format!(
        "nftables table {family} {}: masquerade {network} leaving by any interface but {tun}",
        table_name(tun)
    )
}

/// Installs (or replaces) the table that masquerades `network`'s packets
/// (IPv4, or IPv6 in a table of family `ip6`) leaving by any interface but
/// `tun`.
pub fn install(tun: &str, network: impl Into<IpNet>) -> Result<(), NatError> {
    let network = network.into();
    let name = cstring(&table_name(tun))?;
    let table = Table::new(&name, family(network));
    let mut batch = Batch::new();
    let chain_name = cstring(CHAIN)?;
    let chain = replace_table(
        &mut batch,
        &table,
        &chain_name,
        ChainType::Nat,
        Hook::PostRouting,
        SRCNAT_PRIORITY,
    );

    let mut rule = Rule::new(&chain);
    match network {
        IpNet::V4(network) => {
            rule.add_expr(&nft_expr!(payload ipv4 saddr));
            rule.add_expr(&nft_expr!(bitwise mask network.netmask(), xor 0u32));
            rule.add_expr(&nft_expr!(cmp == network.network()));
        }
        IpNet::V6(network) => {
            rule.add_expr(&nft_expr!(payload ipv6 saddr));
            rule.add_expr(&nft_expr!(bitwise mask network.netmask(), xor Ipv6Addr::UNSPECIFIED));
            rule.add_expr(&nft_expr!(cmp == network.network()));
        }
    }
    rule.add_expr(&nft_expr!(meta oifname));
    rule.add_expr(&nft_expr!(cmp != InterfaceName::Exact(cstring(tun)?)));
    rule.add_expr(&nft_expr!(masquerade));
    batch.add(&rule, MsgType::Add);
    send(&batch.finalize())
}

/// Adds to `batch` what replaces `table` with an empty one (add, delete,
/// add: whatever was there before is gone, and the table exists, in one
/// transaction) and its base chain `chain` (of type `kind` on `hook` at
/// `priority`, accepting what no rule drops). Returns the chain, for the
/// rules.
pub(super) fn replace_table<'a>(
    batch: &mut Batch,
    table: &'a Table,
    chain: &CStr,
    kind: ChainType,
    hook: Hook,
    priority: i32,
) -> Chain<'a> {
    batch.add(table, MsgType::Add);
    batch.add(table, MsgType::Del);
    batch.add(table, MsgType::Add);
    let mut chain = Chain::new(chain, table);
    chain.set_type(kind);
    chain.set_hook(hook, priority);
    chain.set_policy(Policy::Accept);
    batch.add(&chain, MsgType::Add);
    chain
}

/// Removes the tables of `tun` (both families); one that is not there is
/// not an error.
pub fn remove(tun: &str) -> Result<(), NatError> {
    let name = cstring(&table_name(tun))?;
    let mut batch = Batch::new();
    for family in [ProtoFamily::Ipv4, ProtoFamily::Ipv6] {
        let table = Table::new(&name, family);
        batch.add(&table, MsgType::Add);
        batch.add(&table, MsgType::Del);
    }
    send(&batch.finalize())
}

/// The table family for `network`'s packets.
fn family(network: IpNet) -> ProtoFamily {
    match network {
        IpNet::V4(_) => ProtoFamily::Ipv4,
        IpNet::V6(_) => ProtoFamily::Ipv6,
    }
}

pub(super) fn cstring(s: &str) -> Result<CString, NatError> {
    CString::new(s).map_err(|_| NatError::Name(s.to_owned()))
}

/// Sends a batch and waits for the kernel's answer to each message.
pub(super) fn send(batch: &FinalizedBatch) -> Result<(), NatError> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(NatError::Netlink)?;
    let portid = socket.portid();
    socket.send_all(batch).map_err(NatError::Netlink)?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        for message in socket.recv(&mut buffer[..]).map_err(NatError::Netlink)? {
            let message = message.map_err(NatError::Netlink)?;
            let Some(seq) = expected.next() else {
                return Err(NatError::Netlink(io::Error::other(
                    "an answer nobody asked for",
                )));
            };
            mnl::cb_run(message, seq, portid).map_err(NatError::Netlink)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_named_after_the_tun() {
        assert_eq!(table_name("svpn0"), "simplevpn_svpn0");
        assert_eq!(table_name("vpn-a.b"), "simplevpn_vpn_a_b");
        let network: ipnet::Ipv4Net = "198.19.0.0/16".parse().expect("net");
        assert_eq!(
            describe("svpn0", network),
            "nftables table ip simplevpn_svpn0: masquerade 198.19.0.0/16 leaving by any interface but svpn0"
        );
        let network6: ipnet::Ipv6Net = "2001:2:0:100::/64".parse().expect("net");
        assert_eq!(
            describe("svpn0", network6),
            "nftables table ip6 simplevpn_svpn0: masquerade 2001:2:0:100::/64 leaving by any interface but svpn0"
        );
    }
}
