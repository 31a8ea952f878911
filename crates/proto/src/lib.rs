//! simplevpn's sans-IO core: what a connection means, without a socket, a
//! tun or a clock of its own. Everything here takes bytes and the current
//! time and returns frames, actions or answers, so every rule is
//! unit-tested with the time passed in; the I/O loops that carry the
//! actions out live in the `simplevpn` crate.
//!
//! * [`wire`]: frames cut by their own IP header, control messages,
//!   extension frames;
//! * [`params`]: the session-parameters extension (SESSION_PARAMS);
//! * [`offload`]: super-packets (GSO/GRO) split and joined by their headers;
//! * [`egress`]: how outbound packets are batched into frames;
//! * [`join`]: invitation tokens and the messages of a joining connection;
//! * [`codel`]: CoDel on a peer's send queue (drop or ECN-mark what stood too long);
//! * [`session`]: the session rules of both roles;
//! * [`routes`]: the longest-prefix route table;
//! * [`pool`], [`pool6`]: the address pools;
//! * [`limits`]: every size and count limit, one definition each;
//! * [`wallclock`]: wall-clock arithmetic that saturates instead of panicking;
//! * [`ConfigError`]: a bad setting, named.

pub mod codel;
mod config_error;
pub mod egress;
pub mod join;
pub mod limits;
pub mod offload;
pub mod params;
pub mod pool;
pub mod pool6;
pub mod routes;
pub mod session;
pub mod wallclock;
pub mod wire;

pub use config_error::ConfigError;
