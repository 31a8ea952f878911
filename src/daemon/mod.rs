//! simplevpnd: the server and client roles.

pub mod cli;
pub mod client;
pub mod control;
mod events;
mod registry;
pub mod server;

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::config::{ClientConfig, ControlConfig, ServerConfig};
use crate::netdev::NetdevError;

/// What the daemon runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Server(ServerConfig),
    Client(ClientConfig),
}

/// Everything simplevpnd runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub role: Role,
    pub control: ControlConfig,
}

/// A bound control socket and who may change things through it.
#[derive(Debug)]
pub struct ControlOptions {
    pub socket: control::ControlSocket,
    pub access: control::Access,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Netdev(#[from] NetdevError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("tun device: {0}")]
    Tun(#[from] std::io::Error),
}

/// Runs the daemon in `role` until `shutdown` is cancelled, serving the
/// control API on `control` if given.
pub async fn run(
    role: Role,
    control: Option<ControlOptions>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    match role {
        Role::Server(config) => server::run(config, control, shutdown).await,
        Role::Client(config) => client::run(config, control, shutdown).await,
    }
}
