//! simplevpn: an IP-in-TCP VPN, wire-compatible with the original simplevpn.
//!
//! The library holds what the programs share: the sans-IO wire codec
//! ([`wire`]), framed I/O over any byte stream ([`connection`]), the address
//! pool ([`pool`]), configuration ([`config`]), tun and netlink setup
//! ([`netdev`]), what the daemon and its privileged helper share
//! ([`privsep`]), and the daemon's roles ([`daemon`]), whose entry point
//! [`daemon::run`] takes a shutdown token.

pub mod config;
pub mod connection;
pub mod daemon;
pub mod netdev;
pub mod pool;
pub mod privsep;
pub mod program;
pub mod wire;
