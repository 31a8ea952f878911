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

/// A name that is none of a closed set's ([`Protocol`], [`NodeRole`],
/// [`LinkState`]) `as_str()` names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {name:?}")]
pub struct UnknownName {
    /// Which set: "protocol", "role" or "link state".
    pub what: &'static str,
    /// The name given.
    pub name: String,
}

/// `Display` as `as_str()`, and the way back from a name (`TryFrom<&str>`),
/// which takes the names from `as_str()` so that they are written once.
macro_rules! named {
    ($($t:ident ($what:literal): [$($v:ident),*]);* $(;)?) => {$(
        impl $t {
            /// Every value, in declaration order.
            pub const ALL: &'static [$t] = &[$($t::$v),*];
        }

        // Fails to compile when a variant is missing from the list above.
        const _: fn($t) = |v| match v {
            $($t::$v)|* => {}
        };

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl TryFrom<&str> for $t {
            type Error = UnknownName;

            /// The value whose `as_str()` is `name`.
            fn try_from(name: &str) -> Result<$t, UnknownName> {
                $t::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == name)
                    .ok_or_else(|| UnknownName { what: $what, name: name.to_owned() })
            }
        }
    )*};
}
named! {
    Protocol ("protocol"): [Original, Tls];
    NodeRole ("role"): [Server, Client];
    LinkState ("link state"): [Connecting, Connected, Backoff];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_go_both_ways() {
        for &p in Protocol::ALL {
            assert_eq!(Protocol::try_from(p.as_str()), Ok(p));
        }
        for &r in NodeRole::ALL {
            assert_eq!(NodeRole::try_from(r.to_string().as_str()), Ok(r));
        }
        for &l in LinkState::ALL {
            assert_eq!(LinkState::try_from(l.as_str()), Ok(l));
        }
        assert_eq!(LinkState::ALL.len(), 3);
        assert!(LinkState::try_from("up").is_err());
        assert!(Protocol::try_from("TLS").is_err());
    }
}
