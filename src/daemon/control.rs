//! The control service (proto/control.proto): gRPC over a Unix socket, with
//! callers authorized by their peer credentials.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use nix::fcntl::AtFlags;
use nix::sys::stat::{umask, Mode};
use nix::unistd::{fchownat, Gid};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use tokio::sync::{mpsc, oneshot};

use super::events::{EventKind, PeerEvent};
use super::gate::{AllowedPeer, PeerSource};
use super::peers::PeerInfo;
use crate::config::{ConfigError, PeerSection};
use crate::keys::PublicKey;
use crate::proto::{self, control_server::ControlServer};
use crate::state::{check_ban_reason, Ban, Banned, Invite, InviteState, StoreError};

/// What the control service asks of a running role (server or client).
pub trait Node: Send + Sync + 'static {
    fn status(&self) -> proto::StatusReply;
    /// Every peer that holds an address, ordered by address.
    fn peers(&self) -> Vec<PeerInfo>;
    /// The peer that holds `address`.
    fn peer(&self, address: Ipv4Addr) -> Option<PeerInfo> {
        self.peers().into_iter().find(|p| p.address == address)
    }
    /// Closes the connection of the peer at `address`; with `ban`, refuses
    /// the same client for that long. `by` says who asked, and `why` (may
    /// be empty) their words: the log, and the ban's reason
    /// ([`crate::state::check_ban_reason`] holds for `why`).
    fn kick(
        &self,
        address: Ipv4Addr,
        ban: Option<Duration>,
        by: &str,
        why: &str,
    ) -> Result<PeerInfo, KickError>;
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<PeerEvent>;
    /// Where changes to a running server go (peers added and removed,
    /// reloads): one at a time, in order. None on a client.
    fn admin(&self) -> Option<mpsc::Sender<AdminRequest>> {
        None
    }
    /// Every allowed key, and the address each holds if connected.
    fn allowed(&self) -> Result<Vec<(AllowedPeer, Option<Ipv4Addr>)>, AdminError> {
        Err(AdminError::NotAServer)
    }
    /// The bans in force now, soonest to end first.
    fn bans(&self) -> Result<Vec<Ban>, KickError> {
        Err(KickError::NotAServer)
    }
    /// Lifts the ban on `who`, here and in the cluster; false if there was
    /// none. `by` says who asked, for the log.
    fn unban(&self, _who: &Banned, _by: &str) -> Result<bool, KickError> {
        Err(KickError::NotAServer)
    }
}

/// A change to a running server, answered on `reply`.
#[derive(Debug)]
pub enum AdminRequest {
    Reload {
        reply: oneshot::Sender<Result<ReloadReport, AdminError>>,
    },
    AddPeer {
        peer: PeerSection,
        reply: oneshot::Sender<Result<(), AdminError>>,
    },
    /// By key or name.
    RemovePeer {
        which: String,
        reply: oneshot::Sender<Result<(PeerSection, usize), AdminError>>,
    },
    /// The peers added live in a cluster changed (on any server): these
    /// are all of them now.
    ClusterPeers { live: Vec<PeerSection> },
    /// A new invitation; answered with it and its token.
    CreateInvite {
        request: InviteRequest,
        reply: oneshot::Sender<Result<(Invite, String), AdminError>>,
    },
    ListInvites {
        reply: oneshot::Sender<Result<Vec<Invite>, AdminError>>,
    },
    /// By name.
    RevokeInvite {
        name: String,
        reply: oneshot::Sender<Result<Invite, AdminError>>,
    },
}

/// What `svpnctl invite` asks for.
#[derive(Debug, Clone)]
pub struct InviteRequest {
    pub name: String,
    pub address: Option<Ipv4Addr>,
    pub ttl: Duration,
    /// What the joining host dials, if not the server's `endpoint`.
    pub endpoint: Option<String>,
}

/// How long an invitation lasts when no TTL is given.
pub const DEFAULT_INVITE_TTL: Duration = Duration::from_secs(3600);

/// What a reload (or a live change of peers) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub routes_changed: bool,
    /// Whether the pushed DNS settings or gateway changed.
    pub offer_changed: bool,
    pub disconnected: usize,
    pub pushed: usize,
}

/// Why a change to a running server was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("this is a client daemon: it has no peers to change")]
    NotAServer,
    #[error("{0}")]
    Invalid(ConfigError),
    #[error("{} cannot change without a restart (the running configuration stays in force)", .0.join(", "))]
    NeedsRestart(Vec<&'static str>),
    #[error("no allowed peer has the key or name {0:?}")]
    NoSuchPeer(String),
    #[error("key {0} is allowed already")]
    Exists(PublicKey),
    #[error("peer {0} is listed in the config file: remove it there, then reload")]
    InConfig(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the server is stopping")]
    Stopping,
    #[error("the server has no key (key = PATH in [server]): it serves no TLS client")]
    NoKey,
    #[error("no open invitation is named {0:?}")]
    NoSuchInvite(String),
    #[cfg(feature = "server")]
    #[error("{0}")]
    Cluster(#[from] crate::cluster::etcd::EtcdError),
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        let message = e.to_string();
        match e {
            AdminError::NotAServer
            | AdminError::NeedsRestart(_)
            | AdminError::InConfig(_)
            | AdminError::NoKey => Status::failed_precondition(message),
            AdminError::Invalid(_) => Status::invalid_argument(message),
            AdminError::NoSuchPeer(_) | AdminError::NoSuchInvite(_) => Status::not_found(message),
            AdminError::Exists(_) | AdminError::Store(StoreError::InviteExists(_)) => {
                Status::already_exists(message)
            }
            AdminError::Store(_) => Status::internal(message),
            AdminError::Stopping => Status::unavailable(message),
            #[cfg(feature = "server")]
            AdminError::Cluster(_) => Status::unavailable(message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KickError {
    #[error("no peer holds {0}")]
    NoSuchPeer(Ipv4Addr),
    #[error("this is a client daemon: it has no peers to kick")]
    NotAServer,
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlSocketError {
    #[error("control socket {0}: another simplevpnd is serving it")]
    Live(PathBuf),
    #[error("control socket {0}: exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{field}: no such group {name:?}")]
    NoSuchGroup { field: &'static str, name: String },
}

/// Resolves the groups of `config` and binds its socket; `service_uid` is
/// the user the daemon runs as (it may always make changes).
pub fn open(
    config: &crate::config::ControlConfig,
    service_uid: u32,
) -> Result<super::ControlOptions, ControlSocketError> {
    let group_id = |field: &'static str, name: &str| match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(Some(group.gid)),
        _ => Err(ControlSocketError::NoSuchGroup {
            field,
            name: name.to_string(),
        }),
    };
    let group = match group_id("control.group", &config.group) {
        Err(_) if !config.group_configured => {
            warn!(group = %config.group, "no such group: the control socket keeps the group it was created with, root's (it is bound before privileges are dropped), so only root can use svpnctl");
            None
        }
        other => other?,
    };
    let admin_gid = match &config.admin_group {
        Some(name) => group_id("control.admin_group", name)?.map(Gid::as_raw),
        None => None,
    };
    Ok(super::ControlOptions {
        socket: bind(&config.socket, group)?,
        access: Access {
            service_uid,
            admin_gid,
        },
    })
}

/// A bound control socket, ready to serve.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Binds the control socket at `path` with mode 0660 and group `group`. A
/// stale socket (nobody accepting) is replaced; a live one is an error.
pub fn bind(path: &Path, group: Option<Gid>) -> Result<ControlSocket, ControlSocketError> {
    let io_err = |source| ControlSocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io_err)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_err)?;
        }
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ControlSocketError::NotASocket(path.to_path_buf()))
        }
        Ok(_) if UnixStream::connect(path).is_ok() => {
            return Err(ControlSocketError::Live(path.to_path_buf()))
        }
        Ok(_) => {
            warn!(path = %path.display(), "replacing a stale control socket");
            fs::remove_file(path).map_err(io_err)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    // No moment with a socket that others could open: bind under a umask.
    let old = umask(Mode::from_bits_truncate(0o117));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(io_err)?;
    // As root, on a path in a directory someone else may write: never
    // through a link (a socket cannot be opened for fchmod/fchown, so the
    // path is checked to be the socket just bound, and chown'd as itself).
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {}
        Ok(_) => return Err(ControlSocketError::NotASocket(path.to_path_buf())),
        Err(e) => return Err(io_err(e)),
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o660)).map_err(io_err)?;
    if group.is_some() {
        fchownat(None, path, None, group, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| io_err(e.into()))?;
    }
    listener.set_nonblocking(true).map_err(io_err)?;
    Ok(ControlSocket {
        listener,
        path: path.to_path_buf(),
    })
}

/// Who may change things (KickPeer): uid 0, the daemon's own user, and
/// members of the admin group. Reading is open to whoever can open the socket.
#[derive(Debug, Clone)]
pub struct Access {
    pub service_uid: u32,
    pub admin_gid: Option<u32>,
}

impl Access {
    /// Whether the process `pid` of `uid`/`gid` may make changes.
    fn may_change(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        uid == 0
            || uid == self.service_uid
            || self.admin_gid.is_some_and(|admin| {
                gid == admin || pid.is_some_and(|pid| supplementary_groups(pid).contains(&admin))
            })
    }
}

/// The supplementary groups of process `pid`, from /proc.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| {
                l.strip_prefix("Groups:").map(|g| {
                    g.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}

/// Serves the control API on `socket` until `shutdown`, then removes it.
pub async fn serve(
    control: super::ControlOptions,
    node: Arc<dyn Node>,
    shutdown: CancellationToken,
) {
    let super::ControlOptions { socket, access } = control;
    let path = socket.path.clone();
    let listener = match tokio::net::UnixListener::from_std(socket.listener) {
        Ok(listener) => listener,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "control socket unusable; no control API");
            return;
        }
    };
    info!(path = %path.display(), "control socket ready");
    let service = ControlService { node, access };
    let served = tonic::transport::Server::builder()
        .add_service(ControlServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown.cancelled())
        .await;
    if let Err(e) = served {
        warn!(error = %e, "control service stopped");
    }
    // Best effort: the socket's directory may not be ours to write any more.
    let _ = fs::remove_file(&path);
}

struct ControlService {
    node: Arc<dyn Node>,
    access: Access,
}

impl ControlService {
    /// The caller's uid, if it may change things (see [`Access`]).
    fn admin_uid<T>(&self, request: &Request<T>, what: &str) -> Result<u32, Status> {
        let cred = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .ok_or_else(|| Status::permission_denied("caller credentials unknown"))?;
        if !self.access.may_change(cred.uid(), cred.gid(), cred.pid()) {
            warn!(uid = cred.uid(), "{what} refused: not an administrator");
            return Err(Status::permission_denied(format!(
                "uid {} may not {what}: only root, the daemon's user and the admin group may",
                cred.uid()
            )));
        }
        Ok(cred.uid())
    }

    /// Sends a change to the server and waits for its answer.
    async fn change<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, AdminError>>) -> AdminRequest,
    ) -> Result<T, Status> {
        let admin = self.node.admin().ok_or(AdminError::NotAServer)?;
        let (reply, answer) = oneshot::channel();
        admin
            .send(request(reply))
            .await
            .map_err(|_| AdminError::Stopping)?;
        Ok(answer.await.map_err(|_| AdminError::Stopping)??)
    }
}

fn allowed_proto(peer: &AllowedPeer, connected: Option<Ipv4Addr>) -> proto::AllowedPeer {
    let source = match peer.source {
        PeerSource::Config => proto::PeerSource::Config,
        PeerSource::Live => proto::PeerSource::Live,
    };
    proto::AllowedPeer {
        key: peer.section.key.to_string(),
        name: peer.section.name.clone().unwrap_or_default(),
        address: peer
            .section
            .address
            .map(|a| a.to_string())
            .unwrap_or_default(),
        routes: peer
            .section
            .routes
            .iter()
            .map(ToString::to_string)
            .collect(),
        source: source.into(),
        connected_address: connected.map(|a| a.to_string()).unwrap_or_default(),
        address6: peer
            .section
            .address6
            .map(|a| a.to_string())
            .unwrap_or_default(),
    }
}

fn invite_proto(invite: &Invite, now: SystemTime) -> proto::Invite {
    let state = match invite.state {
        InviteState::Open if invite.expires <= now => proto::InviteState::Expired,
        InviteState::Open => proto::InviteState::Open,
        InviteState::Used => proto::InviteState::Used,
        InviteState::Revoked => proto::InviteState::Revoked,
    };
    proto::Invite {
        name: invite.name.clone(),
        address: invite.address.map(|a| a.to_string()).unwrap_or_default(),
        created: Some(invite.created.into()),
        expires: Some(invite.expires.into()),
        state: state.into(),
    }
}

/// The peer an AddPeer request describes; errors name the field.
fn requested_peer(request: &proto::AddPeerRequest) -> Result<PeerSection, Status> {
    let invalid = |field: &str, problem: String| {
        Status::invalid_argument(ConfigError::new(field, problem).to_string())
    };
    let key = request
        .key
        .parse()
        .map_err(|e: crate::keys::KeyError| invalid("key", e.to_string()))?;
    let address = match request.address.as_str() {
        "" => None,
        text => Some(
            text.parse()
                .map_err(|_| invalid("address", format!("{text:?} is not an IPv4 address")))?,
        ),
    };
    let address6 = match request.address6.as_str() {
        "" => None,
        text => Some(
            text.parse()
                .map_err(|_| invalid("address6", format!("{text:?} is not an IPv6 address")))?,
        ),
    };
    let routes = request
        .routes
        .iter()
        .map(|r| {
            r.parse()
                .map_err(|_| invalid("routes", format!("{r:?} is not a network (CIDR)")))
        })
        .collect::<Result<_, _>>()?;
    Ok(PeerSection {
        client_to_client: None,
        key,
        name: (!request.name.is_empty()).then(|| request.name.clone()),
        address,
        address6,
        routes,
    })
}

/// The IPv4 tunnel address of the peer named by `text`: its IPv4 tunnel
/// address, or its IPv6 one.
/// The tunnel address of the peer `text` names: one of its tunnel
/// addresses (IPv4, or its IPv6 one), its public key, or its name.
fn find_peer(node: &dyn Node, text: &str) -> Result<Ipv4Addr, Status> {
    let peers = node.peers();
    let matches: Vec<&PeerInfo> = match text.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(address)) => return Ok(address),
        Ok(std::net::IpAddr::V6(address6)) => peers
            .iter()
            .filter(|p| p.address6 == Some(address6))
            .collect(),
        Err(_) => match text.parse::<PublicKey>() {
            Ok(key) => peers
                .iter()
                .filter(|p| p.identity.key() == Some(key))
                .collect(),
            Err(_) => peers
                .iter()
                .filter(|p| p.identity.name() == Some(text))
                .collect(),
        },
    };
    match matches.as_slice() {
        [peer] => Ok(peer.address),
        [] => Err(Status::not_found(format!(
            "no peer is {text:?} (a tunnel address, a public key or a name)"
        ))),
        more => Err(Status::invalid_argument(format!(
            "{} peers are named {text:?}: give an address or a key",
            more.len()
        ))),
    }
}

#[tonic::async_trait]
impl proto::control_server::Control for ControlService {
    async fn status(
        &self,
        _: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        Ok(Response::new(self.node.status()))
    }

    async fn list_peers(
        &self,
        _: Request<proto::ListPeersRequest>,
    ) -> Result<Response<proto::ListPeersReply>, Status> {
        let peers = self.node.peers().iter().map(proto::Peer::from).collect();
        Ok(Response::new(proto::ListPeersReply { peers }))
    }

    async fn get_peer(
        &self,
        request: Request<proto::GetPeerRequest>,
    ) -> Result<Response<proto::Peer>, Status> {
        let address = find_peer(self.node.as_ref(), &request.get_ref().address)?;
        self.node
            .peer(address)
            .map(|p| Response::new((&p).into()))
            .ok_or_else(|| Status::not_found(format!("no peer holds {address}")))
    }

    async fn kick_peer(
        &self,
        request: Request<proto::KickPeerRequest>,
    ) -> Result<Response<proto::KickPeerReply>, Status> {
        let uid = self.admin_uid(&request, "kick peers")?;
        let address = find_peer(self.node.as_ref(), &request.get_ref().address)?;
        let ban = request
            .get_ref()
            .ban_seconds
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        let why = request.get_ref().reason.trim();
        check_ban_reason(why).map_err(|e| Status::invalid_argument(e.to_string()))?;
        match self.node.kick(address, ban, &format!("uid {uid}"), why) {
            Ok(peer) => Ok(Response::new(proto::KickPeerReply {
                peer: Some((&peer).into()),
            })),
            Err(e @ KickError::NoSuchPeer(_)) => Err(Status::not_found(e.to_string())),
            Err(e @ KickError::NotAServer) => Err(Status::failed_precondition(e.to_string())),
        }
    }

    async fn list_bans(
        &self,
        _: Request<proto::ListBansRequest>,
    ) -> Result<Response<proto::ListBansReply>, Status> {
        let bans = match self.node.bans() {
            Ok(bans) => bans,
            Err(e) => return Err(Status::failed_precondition(e.to_string())),
        };
        let bans = bans
            .into_iter()
            .map(|ban| {
                let (key, remote) = match ban.who {
                    Banned::Key(key) => (key.to_string(), String::new()),
                    Banned::Remote(ip) => (String::new(), ip.to_string()),
                };
                proto::Ban {
                    key,
                    remote,
                    until: Some(ban.until.into()),
                    reason: ban.reason,
                }
            })
            .collect();
        Ok(Response::new(proto::ListBansReply { bans }))
    }

    async fn unban(
        &self,
        request: Request<proto::UnbanRequest>,
    ) -> Result<Response<proto::UnbanReply>, Status> {
        let uid = self.admin_uid(&request, "lift bans")?;
        let text = request.get_ref().who.trim();
        let who = match (text.parse::<PublicKey>(), text.parse::<std::net::IpAddr>()) {
            (Ok(key), _) => Banned::Key(key),
            (_, Ok(ip)) => Banned::Remote(ip.to_canonical()),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "{text:?} is neither a public key nor an IP address"
                )))
            }
        };
        match self.node.unban(&who, &format!("uid {uid}")) {
            Ok(true) => Ok(Response::new(proto::UnbanReply {})),
            Ok(false) => Err(Status::not_found(format!("{text} is not banned"))),
            Err(e) => Err(Status::failed_precondition(e.to_string())),
        }
    }

    async fn list_allowed(
        &self,
        _: Request<proto::ListAllowedRequest>,
    ) -> Result<Response<proto::ListAllowedReply>, Status> {
        let peers = self
            .node
            .allowed()?
            .iter()
            .map(|(peer, connected)| allowed_proto(peer, *connected))
            .collect();
        Ok(Response::new(proto::ListAllowedReply { peers }))
    }

    async fn add_peer(
        &self,
        request: Request<proto::AddPeerRequest>,
    ) -> Result<Response<proto::AddPeerReply>, Status> {
        let uid = self.admin_uid(&request, "add peers")?;
        let peer = requested_peer(request.get_ref())?;
        let section = peer.clone();
        self.change(|reply| AdminRequest::AddPeer { peer, reply })
            .await?;
        info!(uid, key = %section.key, name = section.name.as_deref().unwrap_or(""), "peer added");
        let allowed = AllowedPeer {
            section,
            source: PeerSource::Live,
        };
        Ok(Response::new(proto::AddPeerReply {
            peer: Some(allowed_proto(&allowed, None)),
        }))
    }

    async fn remove_peer(
        &self,
        request: Request<proto::RemovePeerRequest>,
    ) -> Result<Response<proto::RemovePeerReply>, Status> {
        let uid = self.admin_uid(&request, "remove peers")?;
        let which = request.get_ref().peer.trim().to_string();
        let (section, disconnected) = self
            .change(|reply| AdminRequest::RemovePeer { which, reply })
            .await?;
        info!(uid, key = %section.key, disconnected, "peer removed");
        let allowed = AllowedPeer {
            section,
            source: PeerSource::Live,
        };
        Ok(Response::new(proto::RemovePeerReply {
            peer: Some(allowed_proto(&allowed, None)),
            disconnected: disconnected as u32,
        }))
    }

    async fn reload(
        &self,
        request: Request<proto::ReloadRequest>,
    ) -> Result<Response<proto::ReloadReply>, Status> {
        let uid = self.admin_uid(&request, "reload")?;
        info!(uid, "reload asked through the control socket");
        let report = self.change(|reply| AdminRequest::Reload { reply }).await?;
        Ok(Response::new(proto::ReloadReply {
            added: report.added,
            removed: report.removed,
            changed: report.changed,
            routes_changed: report.routes_changed,
            offer_changed: report.offer_changed,
            disconnected: report.disconnected as u32,
            params_pushed: report.pushed as u32,
        }))
    }

    async fn create_invite(
        &self,
        request: Request<proto::CreateInviteRequest>,
    ) -> Result<Response<proto::CreateInviteReply>, Status> {
        let uid = self.admin_uid(&request, "invite hosts")?;
        let r = request.into_inner();
        let address = match r.address.as_str() {
            "" => None,
            text => Some(text.parse().map_err(|_| {
                Status::invalid_argument(
                    ConfigError::new("address", format!("{text:?} is not an IPv4 address"))
                        .to_string(),
                )
            })?),
        };
        let request = InviteRequest {
            name: r.name.trim().to_string(),
            address,
            ttl: match r.ttl_seconds {
                0 => DEFAULT_INVITE_TTL,
                secs => Duration::from_secs(secs),
            },
            endpoint: (!r.endpoint.is_empty()).then_some(r.endpoint),
        };
        let (invite, token) = self
            .change(|reply| AdminRequest::CreateInvite { request, reply })
            .await?;
        info!(uid, name = %invite.name, "invitation made");
        Ok(Response::new(proto::CreateInviteReply {
            token,
            invite: Some(invite_proto(&invite, SystemTime::now())),
        }))
    }

    async fn list_invites(
        &self,
        _: Request<proto::ListInvitesRequest>,
    ) -> Result<Response<proto::ListInvitesReply>, Status> {
        let invites = self
            .change(|reply| AdminRequest::ListInvites { reply })
            .await?;
        let now = SystemTime::now();
        Ok(Response::new(proto::ListInvitesReply {
            invites: invites.iter().map(|i| invite_proto(i, now)).collect(),
        }))
    }

    async fn revoke_invite(
        &self,
        request: Request<proto::RevokeInviteRequest>,
    ) -> Result<Response<proto::RevokeInviteReply>, Status> {
        let uid = self.admin_uid(&request, "revoke invitations")?;
        let name = request.get_ref().name.trim().to_string();
        let invite = self
            .change(|reply| AdminRequest::RevokeInvite { name, reply })
            .await?;
        info!(uid, name = %invite.name, "invitation revoked");
        Ok(Response::new(proto::RevokeInviteReply {
            invite: Some(invite_proto(&invite, SystemTime::now())),
        }))
    }

    type WatchPeersStream = Pin<Box<dyn Stream<Item = Result<proto::PeerEvent, Status>> + Send>>;

    async fn watch_peers(
        &self,
        _: Request<proto::WatchPeersRequest>,
    ) -> Result<Response<Self::WatchPeersStream>, Status> {
        let events = BroadcastStream::new(self.node.subscribe()).map(|event| {
            Ok(match event {
                Ok(event) => proto::PeerEvent::from(&event),
                Err(BroadcastStreamRecvError::Lagged(missed)) => proto::PeerEvent {
                    kind: proto::peer_event::Kind::Lagged.into(),
                    time: Some(std::time::SystemTime::now().into()),
                    missed,
                    ..Default::default()
                },
            })
        });
        Ok(Response::new(Box::pin(events)))
    }
}

impl From<&PeerInfo> for proto::Peer {
    fn from(p: &PeerInfo) -> proto::Peer {
        proto::Peer {
            address: p.address.to_string(),
            address6: p.address6.map(|a| a.to_string()).unwrap_or_default(),
            remote: p.remote.to_string(),
            connected_since: Some(p.connected_since.into()),
            last_seen: Some(p.last_seen.into()),
            rx_bytes: p.rx_bytes,
            rx_packets: p.rx_packets,
            tx_bytes: p.tx_bytes,
            tx_packets: p.tx_packets,
            dropped_spoofed: p.dropped_spoofed,
            dropped_queue_full: p.dropped_queue_full,
            dropped_unassigned: p.dropped_unassigned,
            dropped_client_to_client: p.dropped_client_to_client,
            protocol: proto::Protocol::from(p.identity.protocol()).into(),
            name: p.identity.name().unwrap_or_default().to_string(),
            key: p.identity.key().map(|k| k.to_string()).unwrap_or_default(),
            routes: p.routes.iter().map(ToString::to_string).collect(),
        }
    }
}

impl From<&PeerEvent> for proto::PeerEvent {
    fn from(e: &PeerEvent) -> proto::PeerEvent {
        use proto::peer_event::Kind;
        let kind = match e.kind {
            EventKind::Connected => Kind::Connected,
            EventKind::Granted => Kind::Granted,
            EventKind::Disconnected => Kind::Disconnected,
            EventKind::Kicked => Kind::Kicked,
            EventKind::Refused => Kind::Refused,
        };
        proto::PeerEvent {
            kind: kind.into(),
            time: Some(e.time.into()),
            remote: e.remote.to_string(),
            address: e.address.map(|a| a.to_string()).unwrap_or_default(),
            reason: e.reason.clone(),
            missed: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_change_things() {
        let access = Access {
            service_uid: 999,
            admin_gid: Some(4242),
        };
        assert!(access.may_change(0, 0, None));
        assert!(access.may_change(999, 999, None));
        assert!(access.may_change(1000, 4242, None));
        assert!(!access.may_change(1000, 1000, None));
        let no_admins = Access {
            service_uid: 999,
            admin_gid: None,
        };
        assert!(!no_admins.may_change(1000, 4242, None));
        // Supplementary groups come from /proc: this process's own.
        let me = std::process::id() as i32;
        let mine = supplementary_groups(me);
        if let Some(&group) = mine.first() {
            let access = Access {
                service_uid: 999,
                admin_gid: Some(group),
            };
            assert!(access.may_change(1000, 1000, Some(me)));
        }
    }

    #[test]
    fn stale_sockets_are_replaced_and_live_ones_refused() {
        let dir = std::env::temp_dir().join(format!("svctl-unit-{}", std::process::id()));
        let path = dir.join("sub").join("control.sock");
        let live = bind(&path, None).expect("first bind");
        let mode = fs::metadata(&path).expect("socket").permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        assert!(matches!(
            bind(&path, None),
            Err(ControlSocketError::Live(_))
        ));
        drop(live);
        let again = bind(&path, None).expect("stale socket replaced");
        drop(again);
        fs::remove_file(&path).expect("remove socket");
        fs::write(&path, b"not a socket").expect("plain file");
        assert!(matches!(
            bind(&path, None),
            Err(ControlSocketError::NotASocket(_))
        ));
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
