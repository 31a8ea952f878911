//! simplevpn: an IP-in-TCP VPN, wire-compatible with the original simplevpn.
//!
//! The library holds what the programs share: the sans-IO wire codec
//! ([`wire`]) and its session-parameters extension ([`params`]), framed I/O
//! over any byte stream ([`connection`]), the address pools ([`pool`], [`pool6`]), the
//! longest-prefix route table ([`routes`]), configuration ([`config`]) and
//! the limits it shares with the helper ([`limits`]), what the daemon and its
//! privileged helper share along with the helper's tun and netlink setup
//! ([`privsep`]), node keys and TLS ([`keys`], [`tls`]), the session rules and
//! the closed sets they name ([`session`]), the gRPC control API ([`proto`]),
//! the server's state store ([`state`]: leases, bans, peers added at run
//! time), the daemon's roles ([`daemon`]), whose entry point [`daemon::run`] takes a
//! shutdown token, and both programs' command lines ([`daemon::cli`],
//! [`ctl::cli`]), from which the man pages and shell completions are
//! generated.

pub mod budget;
#[cfg(feature = "server")]
pub mod cluster;
/// A client-only build parses a `[cluster]` section (to refuse it with the
/// rest of a server's config) but runs no cluster.
#[cfg(not(feature = "server"))]
pub mod cluster {
    pub mod config;
    pub mod signed;
}
pub mod config;
pub mod config6;
pub mod connection;
pub mod daemon;
/// svpnctl's command line (the program itself is src/bin/svpnctl/).
pub mod ctl {
    pub mod cli;
}
pub mod join;
pub mod keys;
pub mod proto;
pub mod reload;
// A client-only build keeps the records the control API speaks of and
// leaves out the SQLite store.
#[cfg_attr(not(feature = "server"), allow(dead_code, unused_imports))]
pub mod state;
pub mod tls;
pub mod workers;

// The sans-IO core, from its own crate (crates/proto), under the paths the
// rest of this crate names it by.
pub use simplevpn_proto::{
    codel, egress, limits, offload, params, pool, pool6, routes, session, wallclock, wire,
};
// What the daemon shares with its privileged helper (crates/helper).
pub use simplevpn_helper as privsep;
pub use simplevpn_helper::program;
