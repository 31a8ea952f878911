//! Privilege separation: simplevpn-helper (CAP_NET_ADMIN only) and what
//! simplevpnd (unprivileged) shares with it. simplevpnd names this crate
//! `simplevpn::privsep`.
//!
//! ```text
//! simplevpnd (service user, no capabilities)
//!    |  SOCK_SEQPACKET socketpair (the helper's fd 3): HelperRequest / HelperResponse,
//!    |  the tun fd back with SCM_RIGHTS
//!    v
//! simplevpn-helper (service user, CAP_NET_ADMIN only): checks each request
//!    against its Policy, then does it with netdev (tun ioctl, rtnetlink)
//! ```
//!
//! Most of this crate is shared; [`netdev`], [`nat`] and [`resolved`] are
//! the helper's alone (the daemon's side of the tun is
//! `simplevpn::daemon::tun`).
//!
//! * [`protocol`]: the closed set of requests and answers, and their framing;
//! * [`channel`]: the socketpair, one frame (and maybe one fd) per message;
//! * [`policy`]: the helper's allow-list, a pure state machine, and
//!   [`refusal`]: why it refuses a request;
//! * [`netdev`]: what the helper carries out: tun creation and rtnetlink
//!   configuration (privileged);
//! * [`nat`]: the server's masquerade, an nftables table of the helper's own;
//! * [`dnsguard`]: a full-tunnel client's DNS guard when resolved cannot
//!   take the pushed DNS, an nftables table of the helper's own;
//! * [`resolved`]: DNS on the tun through systemd-resolved (D-Bus);
//! * [`args`]: the helper's command line, which is its whole configuration;
//! * [`credentials`]: switching to the service user and dropping capabilities;
//! * [`program`]: what both programs do at their edges (command line, logs).

pub mod args;
pub mod channel;
pub mod credentials;
pub mod dnsguard;
pub mod nat;
pub mod netdev;
pub mod policy;
pub mod policy6;
pub mod program;
pub mod protocol;
pub mod refusal;
pub mod resolved;

// The limits and codecs the requests carry, under the paths this crate
// names them by.
use simplevpn_proto::{limits, params};
