//! The gRPC control API (proto/control.proto, package
//! `simplevpn.control.v2`), generated at build time, and the conversions
//! between its enums and the program's own ([`NodeRole`], [`LinkState`],
//! [`Protocol`] in [`crate::session`]).
//!
//! The program's enums own the names that people read ("server",
//! "connected", "tls"): [`Role::text`], [`LinkState::text`] and
//! [`Protocol::text`] give a proto value's name through them, so svpnctl
//! prints exactly what the v1 API carried as strings.

use crate::session::{self, NodeRole};

/// The code generated from proto/control.proto.
mod generated {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("simplevpn.control.v2");
}
pub use generated::*;

/// A proto enum value that stands for none of the program's values: the
/// `*_UNSPECIFIED` zero value (or a number this build does not know).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} is unspecified")]
pub struct Unspecified(pub &'static str);

impl From<NodeRole> for Role {
    fn from(role: NodeRole) -> Role {
        match role {
            NodeRole::Server => Role::Server,
            NodeRole::Client => Role::Client,
        }
    }
}

impl TryFrom<Role> for NodeRole {
    type Error = Unspecified;

    fn try_from(role: Role) -> Result<NodeRole, Unspecified> {
        match role {
            Role::Server => Ok(NodeRole::Server),
            Role::Client => Ok(NodeRole::Client),
            Role::Unspecified => Err(Unspecified("role")),
        }
    }
}

impl From<session::LinkState> for LinkState {
    fn from(state: session::LinkState) -> LinkState {
        match state {
            session::LinkState::Connecting => LinkState::Connecting,
            session::LinkState::Connected => LinkState::Connected,
            session::LinkState::Backoff => LinkState::Backoff,
        }
    }
}

impl TryFrom<LinkState> for session::LinkState {
    type Error = Unspecified;

    fn try_from(state: LinkState) -> Result<session::LinkState, Unspecified> {
        match state {
            LinkState::Connecting => Ok(session::LinkState::Connecting),
            LinkState::Connected => Ok(session::LinkState::Connected),
            LinkState::Backoff => Ok(session::LinkState::Backoff),
            LinkState::Unspecified => Err(Unspecified("link state")),
        }
    }
}

impl From<session::Protocol> for Protocol {
    fn from(protocol: session::Protocol) -> Protocol {
        match protocol {
            session::Protocol::Original => Protocol::Original,
            session::Protocol::Tls => Protocol::Tls,
        }
    }
}

impl TryFrom<Protocol> for session::Protocol {
    type Error = Unspecified;

    fn try_from(protocol: Protocol) -> Result<session::Protocol, Unspecified> {
        match protocol {
            Protocol::Original => Ok(session::Protocol::Original),
            Protocol::Tls => Ok(session::Protocol::Tls),
            Protocol::Unspecified => Err(Unspecified("protocol")),
        }
    }
}

impl Role {
    /// The role's name ("server", "client"); empty when unspecified.
    pub fn text(self) -> &'static str {
        NodeRole::try_from(self).map_or("", NodeRole::as_str)
    }
}

impl LinkState {
    /// The state's name ("connecting", "connected", "backoff"); empty when
    /// unspecified (as on a server).
    pub fn text(self) -> &'static str {
        session::LinkState::try_from(self).map_or("", session::LinkState::as_str)
    }

    /// The value for a client's link state, given as a
    /// [`session::LinkState`] or by its name ("connecting", ...); a name that
    /// is none of them gives [`LinkState::Unspecified`].
    pub fn of<S: TryInto<session::LinkState>>(state: S) -> LinkState {
        state
            .try_into()
            .map_or(LinkState::Unspecified, LinkState::from)
    }
}

impl Protocol {
    /// The protocol's name ("original", "tls"); empty when unspecified.
    pub fn text(self) -> &'static str {
        session::Protocol::try_from(self).map_or("", session::Protocol::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_round_trips_and_keeps_its_name() {
        for &role in NodeRole::ALL {
            let wire = Role::from(role);
            assert_eq!(NodeRole::try_from(wire), Ok(role));
            assert_eq!(wire.text(), role.as_str());
        }
        for &state in session::LinkState::ALL {
            let wire = LinkState::from(state);
            assert_eq!(session::LinkState::try_from(wire), Ok(state));
            assert_eq!(wire.text(), state.as_str());
            assert_eq!(LinkState::of(state), wire);
            assert_eq!(LinkState::of(state.as_str()), wire);
        }
        for &protocol in session::Protocol::ALL {
            let wire = Protocol::from(protocol);
            assert_eq!(session::Protocol::try_from(wire), Ok(protocol));
            assert_eq!(wire.text(), protocol.as_str());
        }
    }

    #[test]
    fn unspecified_is_no_value_and_reads_as_nothing() {
        assert!(NodeRole::try_from(Role::Unspecified).is_err());
        assert!(session::LinkState::try_from(LinkState::Unspecified).is_err());
        assert!(session::Protocol::try_from(Protocol::Unspecified).is_err());
        assert_eq!(Role::Unspecified.text(), "");
        assert_eq!(LinkState::Unspecified.text(), "");
        assert_eq!(Protocol::Unspecified.text(), "");
        assert_eq!(LinkState::of("up"), LinkState::Unspecified);
    }

    #[test]
    fn the_wire_numbers_are_the_protos() {
        assert_eq!(Role::Server as i32, 1);
        assert_eq!(Role::Client as i32, 2);
        assert_eq!(LinkState::Connecting as i32, 1);
        assert_eq!(LinkState::Connected as i32, 2);
        assert_eq!(LinkState::Backoff as i32, 3);
        assert_eq!(Protocol::Original as i32, 1);
        assert_eq!(Protocol::Tls as i32, 2);
    }
}
