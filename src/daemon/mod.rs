//! simplevpnd: the server and client roles.
//!
//! Without the `server` feature (a client-only build) the server's own
//! modules are left out. What the client and the control socket share with
//! the server (the peer and gate types, admission's refusal reasons, the
//! port-share setting a config names) stays; its server-only parts are
//! unused there and link-time optimization drops them.

#[cfg_attr(not(feature = "server"), allow(dead_code))]
mod activation;
#[cfg_attr(not(feature = "server"), allow(dead_code))]
mod admission;
pub mod check;
pub mod cli;
pub mod client;
#[cfg(feature = "server")]
mod cluster;
pub mod control;
mod dialer;
mod events;
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub mod gate;
pub mod helper;
pub mod join;
#[cfg(feature = "server")]
mod links;
#[cfg(feature = "server")]
mod metrics;
#[cfg_attr(not(feature = "server"), allow(dead_code))]
mod notify;
#[cfg_attr(not(feature = "server"), allow(dead_code))]
mod peers;
#[cfg_attr(not(feature = "server"), allow(dead_code))]
mod peers6;
#[cfg_attr(not(feature = "server"), allow(dead_code, unused_imports))]
pub mod portshare;
pub mod privileges;
pub mod proxy;
#[cfg(feature = "server")]
pub mod server;
#[cfg_attr(not(feature = "server"), allow(dead_code))]
mod takeover;
pub mod tun;

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use self::helper::{Helper, HelperError};
use crate::config::{ClientConfig, ControlConfig, ServerConfig, ServerSource};
use crate::keys::NodeKey;
use crate::tls::TlsError;

/// Why a client-only build (without the `server` feature) refuses to
/// run a server: one line, for the command line and the config check.
pub const NO_SERVER: &str =
    "this simplevpnd is a client-only build (simplevpn-client) and cannot run a server; \
     the simplevpn package has the server";

/// What the daemon runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
// One Role is built per process: its size does not matter, and a Box would
// only add indirection at every use.
#[allow(clippy::large_enum_variant)]
pub enum Role {
    Server(ServerConfig),
    Client(ClientConfig),
}

impl Role {
    /// Whether this role authenticates with a key of its own (TLS).
    pub fn has_key(&self) -> bool {
        match self {
            Role::Server(config) => config.key.is_some(),
            Role::Client(config) => config.tls.is_some(),
        }
    }

    /// This role's private key, if it has one: read from its file (as
    /// root, before privileges are dropped) or decoded from the config.
    pub fn load_key(&self) -> Option<Result<crate::keys::NodeKey, crate::keys::KeyError>> {
        match self {
            Role::Server(config) => config.key.as_deref().map(crate::keys::NodeKey::load),
            Role::Client(config) => config.tls.as_ref().map(|(key, _)| key.load()),
        }
    }

    /// The service user this role runs as.
    pub fn user(&self) -> &str {
        match self {
            Role::Server(config) => &config.user,
            Role::Client(config) => &config.user,
        }
    }

    /// The user simplevpn-helper runs as.
    pub fn helper_user(&self) -> &str {
        match self {
            Role::Server(config) => &config.helper_user,
            Role::Client(config) => &config.helper_user,
        }
    }
}

/// Everything simplevpnd runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub role: Role,
    pub control: ControlConfig,
    /// A server's config file and flags, read again on reload.
    pub source: Option<ServerSource>,
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
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Activation(#[from] activation::ActivationError),
    #[error("tun device: {0}")]
    Tun(#[from] std::io::Error),
    #[error("{0}")]
    Helper(#[from] HelperError),
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// simplevpnd refuses a server config before it gets here
    /// ([`NO_SERVER`]); a library caller gets this.
    #[error("{}", NO_SERVER)]
    NoServer,
    #[error("a key file is configured, but no key was loaded")]
    NoKey,
    #[error("tun device failed: {0}")]
    TunFailed(#[from] crate::daemon::tun::TunFailure),
    #[error("{0}")]
    State(#[from] crate::state::StoreError),
    #[cfg(feature = "server")]
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::etcd::EtcdError),
    #[error("metrics: cannot listen on {address}: {source}")]
    Metrics {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// A client has nothing to reload: SIGHUP (which would otherwise end the
/// process) is logged and ignored.
async fn ignore_hangup() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP ignored: a client has nothing to reload");
    }
}

/// Runs the daemon in `role` until `shutdown` is cancelled, with `helper`
/// doing everything that needs privilege, serving the control API on
/// `control` if given, authenticating with `key` (the role's key file, read
/// before privileges were dropped). If the helper dies, the role is stopped
/// and the result is an error ([`HelperError::Died`]).
pub async fn run(
    role: Role,
    source: Option<ServerSource>,
    helper: Helper,
    control: Option<ControlOptions>,
    key: Option<NodeKey>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    if role.has_key() && key.is_none() {
        return Err(DaemonError::NoKey);
    }
    let stop = shutdown.child_token();
    let role_stop = stop.clone();
    let helper_ref = &helper;
    let role_run = async move {
        match role {
            #[cfg(feature = "server")]
            Role::Server(config) => {
                server::run(config, source, helper_ref, control, key, role_stop).await
            }
            #[cfg(not(feature = "server"))]
            Role::Server(_) => {
                let _ = (source, control, key, role_stop);
                Err(DaemonError::NoServer)
            }
            Role::Client(config) => {
                tokio::spawn(ignore_hangup());
                client::run(config, helper_ref, control, key, role_stop).await
            }
        }
    };
    tokio::pin!(role_run);
    tokio::select! {
        result = &mut role_run => result,
        why = helper.lost() => {
            stop.cancel();
            let _ = role_run.await;
            Err(HelperError::Died(why).into())
        }
    }
}
