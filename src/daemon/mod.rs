//! simplevpnd: the server and client roles.

pub mod cli;
pub mod client;
mod registry;
pub mod server;

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::config::{ClientConfig, ServerConfig};
use crate::netdev::NetdevError;

/// What the daemon runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Server(ServerConfig),
    Client(ClientConfig),
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

/// Runs the daemon in `role` until `shutdown` is cancelled.
pub async fn run(role: Role, shutdown: CancellationToken) -> Result<(), DaemonError> {
    match role {
        Role::Server(config) => server::run(config, shutdown).await,
        Role::Client(config) => client::run(config, shutdown).await,
    }
}
