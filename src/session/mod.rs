//! The session rules, without I/O: what a connection does with each event
//! (a decoded frame, a tick with the current time, a kick), returned as
//! actions for the I/O loops in `daemon/` to carry out. Nothing here touches a
//! socket, a tun or a clock of its own, so every rule is unit-tested with the
//! time passed in.
//!
//! This module also holds the closed sets that the rest of the program and
//! the control API name: [`Protocol`], [`NodeRole`] and [`LinkState`].

pub mod client;
pub mod server;

use std::fmt;

/// How a peer speaks to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// The original plaintext protocol (shared/protocol.md).
    Original,
    /// The same framing inside TLS 1.3 with pinned keys.
    Tls,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Original => "original",
            Protocol::Tls => "tls",
        }
    }
}

/// Which side of the tunnel a daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeRole {
    Server,
    Client,
}

impl NodeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Server => "server",
            NodeRole::Client => "client",
        }
    }
}

/// A client's link to its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LinkState {
    /// Dialing, or waiting for the grant.
    #[default]
    Connecting,
    /// Granted an address: packets flow.
    Connected,
    /// The last attempt ended; waiting before the next.
    Backoff,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Backoff => "backoff",
        }
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(Protocol, NodeRole, LinkState);
