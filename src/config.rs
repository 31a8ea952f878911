//! Configuration: the TOML file, the command-line overrides, and the resolved
//! settings each role runs with. Flags override the file; the file overrides
//! the defaults. Every error names the field and the problem in one line.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use crate::keys::PublicKey;
use crate::limits::{
    FRAME_RANGE, MAX_IFNAME_LEN, MAX_MTU, MAX_PEER_NAME_LEN, MIN_MTU, MTU_RANGE, TUNNEL_PREFIX,
};
use crate::params::{valid_domain, MAX_DNS, MAX_DNS_SEARCH, MAX_DOMAIN_LEN};
use crate::session::client::{ClientRules, HANDSHAKE_TIMEOUT};
use crate::session::Protocol;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/simplevpn/simplevpnd.toml";
pub const DEFAULT_PORT: u16 = 2002;
pub const DEFAULT_LISTEN: &str = "0.0.0.0:2002";
pub const DEFAULT_NETWORK: &str = "10.0.0.0/16";
pub const DEFAULT_TUN: &str = "svpn0";
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// The tun's MTU unless configured (or `max_frame` is smaller).
pub const DEFAULT_MTU: u32 = MAX_MTU;
/// The default `legacy_mtu`: original-protocol clients were built with a
/// 1500-byte tun, and some drop larger packets silently.
pub const DEFAULT_LEGACY_MTU: u32 = 1500;
pub const DEFAULT_PREFIX: u8 = 16;
pub const DEFAULT_QUEUE_LEN: usize = 512;
/// Bytes queued per peer before further frames are dropped.
pub const DEFAULT_QUEUE_BYTES: usize = 4 << 20;
/// Bytes all peers' queues and partly read frames may hold together.
pub const DEFAULT_MEMORY_BUDGET: usize = 64 << 20;
/// Seconds a frame may take from its first byte to its last.
pub const DEFAULT_FRAME_TIMEOUT_SECS: u64 = 10;
/// Connections not yet granted an address, at once: with
/// [`DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE`], it takes 128 sources to fill.
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 1024;
/// Connections not yet granted an address from one source (an IPv4 address,
/// or an IPv6 /64), at once.
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE: usize = 8;
/// The default `max_unauthenticated_per_network` (an IPv4 /24, an IPv6 /48)
/// and `unauthenticated_reserve` are each this fraction of
/// `max_unauthenticated` (the former at least the per-source limit).
pub const DEFAULT_UNAUTHENTICATED_SHARE: usize = 8;
/// Granted original-protocol sessions from one source (an IPv4 address, or
/// an IPv6 /64), at once.
pub const DEFAULT_LEGACY_MAX_PER_SOURCE: usize = 16;
/// Seconds a new connection has to send its ClientHello, or its whole
/// address request (original protocol).
pub const DEFAULT_FIRST_BYTES_TIMEOUT_SECS: u64 = 2;
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/simplevpn/control.sock";
pub const DEFAULT_CONTROL_GROUP: &str = "simplevpn";
/// The service user simplevpnd drops to.
pub const DEFAULT_USER: &str = "simplevpn";
/// The user simplevpn-helper runs as (with CAP_NET_ADMIN): not the daemon's,
/// so that what is granted to the helper (the polkit rule for
/// systemd-resolved) is not the daemon's too.
pub const DEFAULT_HELPER_USER: &str = "simplevpn-helper";
/// Where the server keeps its state (leases, bans, peers added live).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/simplevpn";
/// How long a TLS key keeps its address after it was last connected: 30 days.
pub const DEFAULT_LEASE_TIME_SECS: u64 = 30 * 86_400;

/// Who a client's packets for another client reach (`client_to_client`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClientToClient {
    /// Forwarded inside the server, as the original does.
    #[default]
    Allow,
    /// Dropped and counted; the server, its routes and the Internet stay
    /// reachable.
    Deny,
    /// Written to the server's tun: the host's routing and firewall (the
    /// nftables forward chain) decide, as OpenVPN without client-to-client.
    Kernel,
}

pub use simplevpn_proto::ConfigError;

/// The config file as written. Unknown fields are rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub server: Option<ServerSection>,
    pub client: Option<ClientSection>,
    pub control: Option<ControlSection>,
    pub metrics: Option<MetricsSection>,
    /// Several servers of one network (a server's; see [`crate::cluster`]).
    pub cluster: Option<crate::cluster::config::ClusterSection>,
}

/// `[metrics]`: the Prometheus endpoint (a server's).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// ADDR:PORT to serve /metrics on; absent: no metrics.
    pub listen: Option<SocketAddr>,
    /// Serve them on an address other than loopback (the metrics name every
    /// peer's address and traffic: an explicit choice).
    pub public: Option<bool>,
}

/// `[control]`: the control socket, for either role.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// Path of the control socket.
    pub socket: Option<PathBuf>,
    /// Group of the socket: its members may use svpnctl's read commands.
    pub group: Option<String>,
    /// Members of this group may also kick peers (root and the daemon's own
    /// user always may).
    pub admin_group: Option<String>,
}

/// The control socket's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    pub socket: PathBuf,
    pub group: String,
    /// Whether `group` was configured (a missing default group is no error).
    pub group_configured: bool,
    pub admin_group: Option<String>,
}

impl ControlSection {
    /// These settings, with the socket path replaced if `socket` is given.
    pub fn resolve(self, socket: Option<PathBuf>) -> Result<ControlConfig, ConfigError> {
        let socket = socket
            .or(self.socket)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET));
        if socket.as_os_str().is_empty() || socket.as_os_str().len() > 107 {
            return Err(ConfigError::new(
                "control",
                format!("{:?}: a socket path needs 1 to 107 bytes", socket.display()),
            ));
        }
        let non_empty = |field: &str, name: String| match name.is_empty() {
            true => Err(ConfigError::new(field, "must not be empty")),
            false => Ok(name),
        };
        Ok(ControlConfig {
            socket,
            group_configured: self.group.is_some(),
            group: non_empty(
                "control.group",
                self.group.unwrap_or_else(|| DEFAULT_CONTROL_GROUP.into()),
            )?,
            admin_group: self
                .admin_group
                .map(|g| non_empty("control.admin_group", g))
                .transpose()?,
        })
    }
}

/// `[server]`; also what the server's flags set.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<SocketAddr>,
    pub network: Option<Ipv4Net>,
    /// The IPv6 tunnel network (a /64 to a /120); absent: IPv4 only.
    pub network6: Option<Ipv6Net>,
    pub tun: Option<String>,
    /// Seconds of silence after which a client is dropped.
    pub client_timeout: Option<u64>,
    /// Seconds a new connection has to ask for an address.
    pub handshake_timeout: Option<u64>,
    /// Seconds a new connection has to send its first bytes: the whole
    /// ClientHello, or the whole address request.
    pub first_bytes_timeout: Option<u64>,
    pub mtu: Option<u32>,
    /// The largest packet sent to an original-protocol client (bigger ones
    /// are cut, or answered with ICMP "fragmentation needed").
    pub legacy_mtu: Option<u32>,
    pub max_frame: Option<usize>,
    /// Frames queued per peer before further ones are dropped.
    pub queue_len: Option<usize>,
    /// Bytes queued per peer before further frames are dropped.
    pub queue_bytes: Option<usize>,
    /// Bytes every queue and partly read frame may hold together.
    pub memory_budget: Option<usize>,
    /// Seconds a frame may take from its first byte to its last.
    pub frame_timeout: Option<u64>,
    /// The unprivileged user to run as.
    pub user: Option<String>,
    /// The user simplevpn-helper runs as (keeping CAP_NET_ADMIN only).
    pub helper_user: Option<String>,
    /// The server's private key file: TLS clients are served when set.
    pub key: Option<PathBuf>,
    /// Serve original-protocol (unauthenticated, plaintext) clients too.
    pub legacy: Option<bool>,
    /// With legacy on: only from these remote networks (empty: anyone).
    pub legacy_allow: Option<Vec<IpNet>>,
    /// `[[server.peer]]`: the TLS clients that may join.
    pub peer: Option<Vec<PeerSection>>,
    /// Connections still authenticating (or asking for an address) at once.
    pub max_unauthenticated: Option<usize>,
    /// The same, from one source address (IPv6: one /64).
    pub max_unauthenticated_per_source: Option<usize>,
    /// Whether clients reach each other through the server.
    pub client_to_client: Option<ClientToClient>,
    /// What clients dial to reach this server ("vpn.example.org:2002"):
    /// written into the configs `svpnctl peer new` makes.
    pub endpoint: Option<String>,
    /// The same, from one network (IPv4: one /24, IPv6: one /48).
    pub max_unauthenticated_per_network: Option<usize>,
    /// Places beyond those limits for sources granted an address recently.
    pub unauthenticated_reserve: Option<usize>,
    /// Granted original-protocol sessions from one source, at once.
    pub legacy_max_per_source: Option<usize>,
    /// Networks reachable through the server, pushed to extension clients.
    pub routes: Option<Vec<IpNet>>,
    /// Where leases, bans and peers added live are kept.
    pub state_dir: Option<PathBuf>,
    /// Seconds a TLS key keeps its address after it was last connected.
    pub lease_time: Option<u64>,
    /// Where /metrics is served: `[metrics] listen` in the file, or --metrics.
    #[serde(skip)]
    pub metrics: Option<SocketAddr>,
    /// `[metrics] public` in the file, or --metrics-public.
    #[serde(skip)]
    pub metrics_public: Option<bool>,
    /// Offer this server as the default gateway to extension clients (full
    /// tunnel).
    pub gateway: Option<bool>,
    /// NAT the tunnel network's traffic that leaves by any interface but the
    /// tun (an nftables table of the helper's own).
    pub masquerade: Option<bool>,
    /// Let the helper turn on IPv4 forwarding (net.ipv4.ip_forward) if it
    /// is off; otherwise it only says how.
    pub forwarding: Option<bool>,
    /// DNS servers pushed to extension clients.
    pub dns: Option<Vec<IpAddr>>,
    /// DNS search domains pushed to extension clients.
    pub dns_search: Option<Vec<String>>,
    /// Threads of the data path (the async runtime's workers); default: one
    /// per CPU. 1: the single-threaded runtime.
    pub workers: Option<usize>,
    /// HOST:PORT that connections which are not ours are handed to (the
    /// website on the same port); see [`crate::daemon::portshare`].
    pub port_share: Option<String>,
    /// Prepend a PROXY protocol v2 header for the port-share backend.
    pub port_share_proxy: Option<bool>,
}

/// `[[server.peer]]`: a TLS client that may join.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    /// Its public key (`simplevpnd pubkey` prints it).
    pub key: PublicKey,
    /// A name for logs and svpnctl.
    pub name: Option<String>,
    /// The address it always gets; no one else can have it.
    pub address: Option<Ipv4Addr>,
    /// The IPv6 address it always gets (inside `network6`).
    pub address6: Option<Ipv6Addr>,
    /// Networks behind this client (site-to-site): the server forwards them
    /// to it, accepts them as its sources, and pushes them to the others.
    #[serde(default)]
    pub routes: Vec<IpNet>,
    /// This client's own `client_to_client`, over the server's.
    #[serde(default)]
    pub client_to_client: Option<ClientToClient>,
}

impl PeerSection {
    /// How the peer is named in messages: its name, else its key.
    pub fn label(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => self.key.to_string(),
        }
    }
}

/// `[client]`; also what the client's flags set.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    /// HOST or HOST:PORT, or a list of them (servers of one cluster).
    pub server: Option<Servers>,
    /// Which server of the list is tried first.
    pub server_order: Option<ServerOrder>,
    /// A static address to ask for; dynamic when absent.
    pub address: Option<Ipv4Addr>,
    pub tun: Option<String>,
    /// Prefix length used when the server pushes no netmask.
    pub prefix: Option<u8>,
    /// Seconds of silence from the server after which the link is dead.
    pub timeout: Option<u64>,
    pub mtu: Option<u32>,
    pub max_frame: Option<usize>,
    /// The unprivileged user to run as.
    pub user: Option<String>,
    /// The user simplevpn-helper runs as (keeping CAP_NET_ADMIN only).
    pub helper_user: Option<String>,
    /// The tunnel network, if known: the helper then sets only addresses
    /// inside it.
    pub network: Option<Ipv4Net>,
    /// The IPv6 tunnel network, if known: the helper then sets only IPv6
    /// addresses inside it.
    pub network6: Option<Ipv6Net>,
    /// This client's private key file: with `server_key`, it speaks TLS.
    pub key: Option<PathBuf>,
    /// This client's private key itself (base64 of its 32-byte seed), in
    /// place of `key`: what `svpnctl peer new` writes. The file must then
    /// be readable by its owner only.
    pub private_key: Option<String>,
    /// The servers' public keys, pinned: one, or a list (the servers of a
    /// cluster each have their own key).
    pub server_key: Option<ServerKeys>,
    /// Without a key, speak the original protocol (plaintext, nothing
    /// authenticated): an explicit choice, never a silent fallback.
    pub legacy: Option<bool>,
    /// Pushed routes are installed only inside these networks (empty: none);
    /// absent: every pushed route but a default route and one that covers
    /// the server's own address.
    pub accept_routes: Option<Vec<IpNet>>,
    /// Accept the default route when the server offers one: all traffic
    /// goes through the tunnel.
    pub full_tunnel: Option<bool>,
    /// With full tunnel: remove the tunnel's routes while the link is down
    /// (traffic then takes the open network) instead of keeping them
    /// (kill switch, the default).
    pub fail_open: Option<bool>,
    /// What to do with pushed DNS settings.
    pub dns: Option<DnsMode>,
    /// The name a TLS client's ClientHello gives (SNI), e.g. the website's
    /// on a shared port; nothing checks it (the server's key is pinned).
    pub sni: Option<String>,
    /// `http://[USER:PASS@]HOST:PORT`, `socks5://...`, or "env": every
    /// server is reached through this proxy.
    pub proxy: Option<String>,
}

/// Where a client's private key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientKey {
    /// In a key file (`key`), read as root at start.
    File(PathBuf),
    /// In the config itself (`private_key`, base64 of the seed).
    Inline(String),
}

impl ClientKey {
    /// The key, read from its file or decoded.
    pub fn load(&self) -> Result<crate::keys::NodeKey, crate::keys::KeyError> {
        match self {
            ClientKey::File(path) => crate::keys::NodeKey::load(path),
            ClientKey::Inline(text) => crate::keys::NodeKey::from_inline(text),
        }
    }
}

/// What a client does with the DNS servers and search domains the server
/// pushes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DnsMode {
    /// Set them on the tun through systemd-resolved; search domains of a
    /// single label (`lan`, `com`) are left out, since resolved sends every
    /// lookup under a link's domain to that link's servers.
    #[default]
    Pushed,
    /// The same with every pushed search domain, single labels included:
    /// the server then answers every lookup under them.
    #[serde(rename = "pushed-all-domains")]
    #[value(name = "pushed-all-domains")]
    PushedAllDomains,
    /// Ignore them.
    Off,
}

impl DnsMode {
    /// Whether pushed DNS settings are applied at all.
    pub fn applies(self) -> bool {
        self != DnsMode::Off
    }
}

/// What the server runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub network: Ipv4Net,
    /// The IPv6 tunnel network; `None`: IPv4 only inside the tunnel.
    pub network6: Option<Ipv6Net>,
    pub tun: String,
    pub client_timeout: Duration,
    pub handshake_timeout: Duration,
    pub first_bytes_timeout: Duration,
    pub mtu: u32,
    /// The largest packet sent to an original-protocol client.
    pub legacy_mtu: u32,
    pub max_frame: usize,
    pub queue_len: usize,
    pub queue_bytes: usize,
    pub memory_budget: usize,
    pub frame_timeout: Duration,
    pub user: String,
    pub helper_user: String,
    /// The private key file; `None`: no TLS (legacy must be on).
    pub key: Option<PathBuf>,
    /// The TLS clients that may join.
    pub peers: Vec<PeerSection>,
    /// Whether original-protocol clients are served, and from where.
    pub legacy: Legacy,
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_source: usize,
    /// Whether clients reach each other through the server (a peer's own
    /// setting wins).
    pub client_to_client: ClientToClient,
    /// What clients dial to reach this server, if set.
    pub endpoint: Option<String>,
    pub max_unauthenticated_per_network: usize,
    pub unauthenticated_reserve: usize,
    pub legacy_max_per_source: usize,
    /// Networks reachable through the server (its host routes them on).
    pub routes: Vec<IpNet>,
    /// Where the state store lives.
    pub state_dir: PathBuf,
    /// How long a TLS key keeps its address after it was last connected.
    pub lease_time: Duration,
    /// Where /metrics is served, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Offered as the default gateway to extension clients.
    pub gateway: bool,
    /// NAT for the tunnel network (see [`ServerSection::masquerade`]).
    pub masquerade: bool,
    /// The helper may turn IPv4 forwarding on.
    pub forwarding: bool,
    /// Pushed DNS servers.
    pub dns: Vec<IpAddr>,
    /// Pushed DNS search domains.
    pub dns_search: Vec<String>,
    /// Shared state in etcd; `None`: this server alone, state in SQLite.
    pub cluster: Option<crate::cluster::config::ClusterConfig>,
    /// The async runtime's worker threads (see [`crate::workers`]).
    pub workers: usize,
    /// Where connections that are not ours go, if anywhere.
    pub port_share: Option<crate::daemon::portshare::PortShare>,
}

impl ServerConfig {
    /// The settings that differ between `self` and `new` and that a running
    /// server cannot take over (reload refuses them, naming each; see
    /// [`crate::reload`]).
    pub fn needs_restart(&self, new: &ServerConfig) -> Vec<&'static str> {
        crate::reload::restart_fields(self, new)
    }

    /// Every network the server serves: its own routes, then each peer's.
    pub fn served_routes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.routes
            .iter()
            .chain(self.peers.iter().flat_map(|p| p.routes.iter()))
            .copied()
    }
}

/// Whether the server serves the original, unauthenticated protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Legacy {
    Off,
    /// On, from remote addresses in these networks (empty: from anywhere).
    On(Vec<IpNet>),
}

impl Legacy {
    /// Whether an original-protocol client at `remote` may connect.
    pub fn allows(&self, remote: std::net::IpAddr) -> bool {
        match self {
            Legacy::Off => false,
            Legacy::On(nets) => nets.is_empty() || nets.iter().any(|n| n.contains(&remote)),
        }
    }
}

/// `server_key` as written: one key, or several (`server_key = ["..", ".."]`);
/// a server whose key is any of them is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerKeys(pub Vec<PublicKey>);

impl ServerKeys {
    pub fn one(key: PublicKey) -> ServerKeys {
        ServerKeys(vec![key])
    }
}

impl std::fmt::Display for ServerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&keys.join(", "))
    }
}

impl<'de> Deserialize<'de> for ServerKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ServerKeys, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            One(PublicKey),
            Many(Vec<PublicKey>),
        }
        match Written::deserialize(d)? {
            Written::One(key) => Ok(ServerKeys::one(key)),
            Written::Many(keys) if keys.is_empty() => {
                Err(serde::de::Error::custom("an empty list of keys"))
            }
            Written::Many(keys) => Ok(ServerKeys(keys)),
        }
    }
}

/// `server` as written: one server, or several (`server = ["a", "b"]`), or
/// `[[client.server]]` tables, each a server and its key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Servers {
    One(String),
    Many(Vec<String>),
    Pinned(Vec<PinnedServer>),
}

/// `[[client.server]]`: a server (`HOST[:PORT]`) and its public key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedServer {
    pub address: String,
    pub key: PublicKey,
}

impl From<&str> for Servers {
    fn from(server: &str) -> Servers {
        Servers::One(server.to_string())
    }
}

/// In which order a client tries the servers it lists; after a failure it
/// goes on to the next either way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ServerOrder {
    /// The first listed first.
    #[default]
    First,
    /// A random one first (spreads clients over the servers).
    Random,
}

/// What the client runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The servers, as written (for logs and status): `HOST:PORT[, ...]`.
    pub server: String,
    /// Each server as HOST:PORT, resolved at every connect; at least one.
    pub servers: Vec<String>,
    pub server_order: ServerOrder,
    pub address: Option<Ipv4Addr>,
    pub tun: String,
    pub prefix: u8,
    pub timeout: Duration,
    pub keepalive_after: Duration,
    pub mtu: u32,
    pub max_frame: usize,
    pub user: String,
    pub helper_user: String,
    /// Addresses outside it are refused (by the helper); `None`: any unicast.
    pub network: Option<Ipv4Net>,
    /// IPv6 addresses outside it are refused (by the helper); `None`: any
    /// unicast.
    pub network6: Option<Ipv6Net>,
    /// TLS with this private key and the pinned server keys; `None`: the
    /// original protocol.
    pub tls: Option<(ClientKey, ServerKeys)>,
    /// Which pushed routes are installed (see [`ClientSection::accept_routes`]).
    pub accept_routes: Option<Vec<IpNet>>,
    /// Accept the server's default route.
    pub full_tunnel: bool,
    /// Full tunnel without the kill switch.
    pub fail_open: bool,
    /// What to do with pushed DNS settings.
    pub dns: DnsMode,
    /// The TLS server name sent (SNI); `None`: the built-in one.
    pub sni: Option<String>,
    /// The proxy every server is reached through, if any.
    pub proxy: Option<crate::daemon::proxy::Proxy>,
}

impl ClientConfig {
    /// The session rules of this client, speaking `protocol`.
    pub fn rules(&self, protocol: Protocol) -> ClientRules {
        ClientRules {
            static_address: self.address,
            default_prefix: self.prefix,
            protocol,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            keepalive_after: self.keepalive_after,
            timeout: self.timeout,
            accept_routes: self.accept_routes.clone(),
            full_tunnel: self.full_tunnel,
            fail_open: self.fail_open,
            dns: self.dns.applies(),
            dns_all_domains: self.dns == DnsMode::PushedAllDomains,
        }
    }
}

impl ConfigFile {
    /// Reads `path`. Errors name the file, the line and the key.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path.display().to_string(), e.to_string()))?;
        let file = ConfigFile::parse(&text, path)?;
        // A file that holds a private key is a key file: its owner's alone.
        if file
            .client
            .as_ref()
            .is_some_and(|c| c.private_key.is_some())
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| ConfigError::new(path.display().to_string(), e.to_string()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(ConfigError::new(
                    format!("{}: private_key", path.display()),
                    format!(
                        "the file is readable by others (mode {:o}); run: chmod 600 {}",
                        mode & 0o777,
                        path.display()
                    ),
                ));
            }
        }
        Ok(file)
    }

    /// Parses config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, key) = match e.span() {
                Some(span) => {
                    let line_no = text[..span.start].matches('\n').count() + 1;
                    let line = text.lines().nth(line_no - 1).unwrap_or("");
                    let key = line.split('=').next().unwrap_or("").trim().to_string();
                    (format!(":{line_no}"), key)
                }
                None => (String::new(), String::new()),
            };
            let message = e.message().replace('\n', " ");
            let field = match key.is_empty() || key.starts_with('[') {
                true => format!("{}{line}", path.display()),
                false => format!("{}{line}: {key}", path.display()),
            };
            ConfigError::new(field, message)
        })
    }
}

/// The config file a start reads: the one given, else the default one if
/// it exists.
pub fn config_path(explicit: Option<&Path>) -> Option<&Path> {
    match explicit {
        Some(path) => Some(path),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => Some(Path::new(DEFAULT_CONFIG_PATH)),
        None => None,
    }
}

/// The config file to read ([`config_path`]), or an empty one.
pub fn config_file(explicit: Option<&Path>) -> Result<ConfigFile, ConfigError> {
    match config_path(explicit) {
        Some(path) => ConfigFile::load(path),
        None => Ok(ConfigFile::default()),
    }
}

/// The server's settings: `[server]` and `[metrics]` of a file, with
/// `flags` on top.
pub fn server_settings(
    server: Option<ServerSection>,
    metrics: Option<MetricsSection>,
    cluster: Option<crate::cluster::config::ClusterSection>,
    flags: ServerSection,
) -> Result<ServerConfig, ConfigError> {
    let file = ServerSection {
        metrics: metrics.as_ref().and_then(|m| m.listen),
        metrics_public: metrics.and_then(|m| m.public),
        ..server.unwrap_or_default()
    };
    let config = file.overridden_by(flags).resolve()?;
    let cluster = cluster.map(|c| c.resolve()).transpose()?;
    if cluster.is_some() && config.key.is_none() {
        return Err(ConfigError::new(
            "cluster",
            "a cluster server needs a key (key = PATH): the servers authenticate their links with it",
        ));
    }
    Ok(ServerConfig { cluster, ..config })
}

/// Where a server's settings came from: the config file (the default one
/// if none was given) and the flags, to read them again on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSource {
    pub file: Option<PathBuf>,
    pub flags: ServerSection,
}

impl ServerSource {
    /// Reads the file again and applies the same flags.
    pub fn load(&self) -> Result<ServerConfig, ConfigError> {
        let file = config_file(self.file.as_deref())?;
        server_settings(file.server, file.metrics, file.cluster, self.flags.clone())
    }
}

impl ServerSection {
    /// These settings, with each one that `flags` sets replaced.
    pub fn overridden_by(self, flags: ServerSection) -> ServerSection {
        ServerSection {
            listen: flags.listen.or(self.listen),
            network: flags.network.or(self.network),
            network6: flags.network6.or(self.network6),
            tun: flags.tun.or(self.tun),
            client_timeout: flags.client_timeout.or(self.client_timeout),
            handshake_timeout: flags.handshake_timeout.or(self.handshake_timeout),
            first_bytes_timeout: flags.first_bytes_timeout.or(self.first_bytes_timeout),
            mtu: flags.mtu.or(self.mtu),
            legacy_mtu: flags.legacy_mtu.or(self.legacy_mtu),
            max_frame: flags.max_frame.or(self.max_frame),
            queue_len: flags.queue_len.or(self.queue_len),
            queue_bytes: flags.queue_bytes.or(self.queue_bytes),
            memory_budget: flags.memory_budget.or(self.memory_budget),
            frame_timeout: flags.frame_timeout.or(self.frame_timeout),
            user: flags.user.or(self.user),
            helper_user: flags.helper_user.or(self.helper_user),
            key: flags.key.or(self.key),
            legacy: flags.legacy.or(self.legacy),
            legacy_allow: flags.legacy_allow.or(self.legacy_allow),
            // Peers given as flags come in addition to those in the file.
            peer: match (self.peer, flags.peer) {
                (Some(mut file), Some(flags)) => {
                    file.extend(flags);
                    Some(file)
                }
                (file, flags) => flags.or(file),
            },
            max_unauthenticated: flags.max_unauthenticated.or(self.max_unauthenticated),
            max_unauthenticated_per_source: flags
                .max_unauthenticated_per_source
                .or(self.max_unauthenticated_per_source),
            client_to_client: flags.client_to_client.or(self.client_to_client),
            endpoint: flags.endpoint.or(self.endpoint),
            max_unauthenticated_per_network: flags
                .max_unauthenticated_per_network
                .or(self.max_unauthenticated_per_network),
            unauthenticated_reserve: flags
                .unauthenticated_reserve
                .or(self.unauthenticated_reserve),
            legacy_max_per_source: flags.legacy_max_per_source.or(self.legacy_max_per_source),
            routes: flags.routes.or(self.routes),
            state_dir: flags.state_dir.or(self.state_dir),
            lease_time: flags.lease_time.or(self.lease_time),
            metrics: flags.metrics.or(self.metrics),
            metrics_public: flags.metrics_public.or(self.metrics_public),
            gateway: flags.gateway.or(self.gateway),
            masquerade: flags.masquerade.or(self.masquerade),
            forwarding: flags.forwarding.or(self.forwarding),
            dns: flags.dns.or(self.dns),
            dns_search: flags.dns_search.or(self.dns_search),
            workers: flags.workers.or(self.workers),
            port_share: flags.port_share.or(self.port_share),
            port_share_proxy: flags.port_share_proxy.or(self.port_share_proxy),
        }
    }

    /// Fills in the defaults and checks every value.
    pub fn resolve(self) -> Result<ServerConfig, ConfigError> {
        let network = tunnel_network(
            self.network
                .unwrap_or_else(|| DEFAULT_NETWORK.parse().expect("default network")),
        )?;
        let max_frame = max_frame(self.max_frame)?;
        let mtu = mtu(self.mtu, max_frame)?;
        let (peers, routes) = check_peers(
            self.peer.unwrap_or_default(),
            self.routes.unwrap_or_default(),
            network,
            self.key.is_some(),
        )?;
        let network6 = crate::config6::network6(self.network6, &peers, &routes, mtu)?;
        let handshake_timeout = seconds(
            "handshake_timeout",
            self.handshake_timeout,
            DEFAULT_HANDSHAKE_TIMEOUT_SECS,
        )?;
        let first_bytes_timeout = match seconds(
            "first_bytes_timeout",
            self.first_bytes_timeout,
            DEFAULT_FIRST_BYTES_TIMEOUT_SECS,
        )? {
            // The default is shortened to a shorter handshake timeout.
            t if t > handshake_timeout && self.first_bytes_timeout.is_none() => handshake_timeout,
            t if t > handshake_timeout => {
                return Err(ConfigError::new(
                    "first_bytes_timeout",
                    format!(
                    "{}s is longer than handshake_timeout ({}s), which bounds the whole handshake",
                    t.as_secs(),
                    handshake_timeout.as_secs()
                ),
                ))
            }
            t => t,
        };
        let (dns, dns_search) = dns(
            self.dns.unwrap_or_default(),
            self.dns_search.unwrap_or_default(),
        )?;
        let max_unauthenticated = at_least_one(
            "max_unauthenticated",
            self.max_unauthenticated,
            DEFAULT_MAX_UNAUTHENTICATED,
        )?;
        let max_unauthenticated_per_source = at_least_one(
            "max_unauthenticated_per_source",
            self.max_unauthenticated_per_source,
            DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
        )?;
        Ok(ServerConfig {
            listen: self
                .listen
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("default listen")),
            network,
            network6,
            tun: tun_name(self.tun)?,
            client_timeout: seconds("client_timeout", self.client_timeout, DEFAULT_TIMEOUT_SECS)?,
            handshake_timeout,
            first_bytes_timeout,
            mtu,
            legacy_mtu: match self.legacy_mtu.unwrap_or(DEFAULT_LEGACY_MTU) {
                n if MTU_RANGE.contains(&n) => n,
                n => {
                    return Err(ConfigError::new(
                        "legacy_mtu",
                        format!("{n} must be between {MIN_MTU} and {MAX_MTU}"),
                    ))
                }
            },
            max_frame,
            queue_len: match self.queue_len.unwrap_or(DEFAULT_QUEUE_LEN) {
                0 => return Err(ConfigError::new("queue_len", "must be at least 1")),
                n => n,
            },
            queue_bytes: match self.queue_bytes.unwrap_or(DEFAULT_QUEUE_BYTES) {
                n if n < max_frame => {
                    return Err(ConfigError::new(
                        "queue_bytes",
                        format!("{n} is less than one frame (max_frame = {max_frame})"),
                    ))
                }
                n => n,
            },
            memory_budget: match self.memory_budget.unwrap_or(DEFAULT_MEMORY_BUDGET) {
                n if n < 1 << 20 => {
                    return Err(ConfigError::new(
                        "memory_budget",
                        format!("{n} bytes is too little to serve anyone: give at least 1 MiB"),
                    ))
                }
                n => n,
            },
            frame_timeout: seconds(
                "frame_timeout",
                self.frame_timeout,
                DEFAULT_FRAME_TIMEOUT_SECS,
            )?,
            helper_user: helper_user(self.helper_user, self.user.as_deref())?,
            user: user(self.user)?,
            legacy: legacy(self.legacy, self.legacy_allow, self.key.is_some())?,
            peers,
            routes,
            gateway: self.gateway.unwrap_or(false),
            masquerade: self.masquerade.unwrap_or(false),
            forwarding: self.forwarding.unwrap_or(false),
            dns,
            dns_search,
            cluster: None,
            key: self.key,
            state_dir: match self.state_dir {
                Some(dir) if dir.as_os_str().is_empty() => {
                    return Err(ConfigError::new("state_dir", "must not be empty"))
                }
                Some(dir) => dir,
                None => PathBuf::from(DEFAULT_STATE_DIR),
            },
            lease_time: Duration::from_secs(match self.lease_time {
                Some(0) => return Err(ConfigError::new("lease_time", "must be at least 1 second")),
                Some(secs) if secs > 10 * 365 * 86_400 => {
                    return Err(ConfigError::new("lease_time", "must be at most ten years"))
                }
                Some(secs) => secs,
                None => DEFAULT_LEASE_TIME_SECS,
            }),
            metrics: metrics_listen(self.metrics, self.metrics_public.unwrap_or(false))?,
            workers: crate::workers::resolve(self.workers)?,
            port_share: crate::daemon::portshare::resolve(self.port_share, self.port_share_proxy)?,
            max_unauthenticated,
            max_unauthenticated_per_source,
            max_unauthenticated_per_network: at_least_one(
                "max_unauthenticated_per_network",
                self.max_unauthenticated_per_network,
                (max_unauthenticated / DEFAULT_UNAUTHENTICATED_SHARE)
                    .max(max_unauthenticated_per_source),
            )?,
            unauthenticated_reserve: match self
                .unauthenticated_reserve
                .unwrap_or(max_unauthenticated / DEFAULT_UNAUTHENTICATED_SHARE)
            {
                n if n > max_unauthenticated => {
                    return Err(ConfigError::new(
                        "unauthenticated_reserve",
                        format!("must be at most max_unauthenticated ({max_unauthenticated})"),
                    ))
                }
                n => n,
            },
            legacy_max_per_source: at_least_one(
                "legacy_max_per_source",
                self.legacy_max_per_source,
                DEFAULT_LEGACY_MAX_PER_SOURCE,
            )?,
            client_to_client: self.client_to_client.unwrap_or_default(),
            endpoint: endpoint(self.endpoint)?,
        })
    }
}

/// The legacy switch, checked: a server needs a key, legacy, or both.
fn legacy(
    on: Option<bool>,
    allow: Option<Vec<IpNet>>,
    has_key: bool,
) -> Result<Legacy, ConfigError> {
    match (on.unwrap_or(false), allow) {
        (true, allow) => Ok(Legacy::On(allow.unwrap_or_default())),
        (false, Some(_)) => Err(ConfigError::new(
            "legacy_allow",
            "set, but legacy is off: add legacy = true (or --legacy)",
        )),
        (false, None) if has_key => Ok(Legacy::Off),
        (false, None) => Err(ConfigError::new(
            "key",
            "the server has no key and legacy is off, so no client could join: \
             run `simplevpnd keygen /etc/simplevpn/server.key`, set key = that path and list \
             clients in [[server.peer]] (TLS); or set legacy = true (--legacy) to serve the \
             unauthenticated original protocol",
        )),
    }
}

/// The TLS peers and the server's own routes, checked together: unique keys
/// and names, fixed addresses unique and in the pool, networks apart. The
/// same check admits a peer added at run time (after those of the file).
pub fn check_peers(
    peers: Vec<PeerSection>,
    routes: Vec<IpNet>,
    network: Ipv4Net,
    has_key: bool,
) -> Result<(Vec<PeerSection>, Vec<IpNet>), ConfigError> {
    let peers = self::peers(peers, network, has_key)?;
    let routes = server_routes(routes, network, &peers)?;
    Ok((peers, routes))
}

/// The TLS peers, checked: unique keys, fixed addresses unique and in the pool.
fn peers(
    peers: Vec<PeerSection>,
    network: Ipv4Net,
    has_key: bool,
) -> Result<Vec<PeerSection>, ConfigError> {
    if !peers.is_empty() && !has_key {
        return Err(ConfigError::new(
            "peer",
            "TLS peers are listed but the server has no key: set key = PATH (or --key)",
        ));
    }
    let pool = crate::pool::AddressPool::new(network);
    let mut keys = std::collections::HashSet::new();
    let mut addresses = std::collections::HashSet::new();
    let mut names = std::collections::HashSet::new();
    for (i, peer) in peers.iter().enumerate() {
        let field = format!("server.peer[{i}]");
        if let Some(name) = &peer.name {
            if !crate::join::valid_name(name) {
                return Err(ConfigError::new(
                    format!("{field}.name"),
                    format!(
                        "{name:?}: 1 to {MAX_PEER_NAME_LEN} printable characters without spaces"
                    ),
                ));
            }
            if !names.insert(name) {
                return Err(ConfigError::new(
                    format!("{field}.name"),
                    format!("{name:?} names two peers"),
                ));
            }
        }
        if !keys.insert(peer.key) {
            return Err(ConfigError::new(
                field,
                format!("key {} is listed twice", peer.key),
            ));
        }
        if let Some(address) = peer.address {
            if !pool.contains(address) {
                return Err(ConfigError::new(
                    format!("{field}.address"),
                    format!("{address} is not a client address of {network}"),
                ));
            }
            if !addresses.insert(address) {
                return Err(ConfigError::new(
                    format!("{field}.address"),
                    format!("{address} is fixed for two peers"),
                ));
            }
        }
        let field = format!("{field}.routes");
        for route in &peer.routes {
            if route.prefix_len() == 0 {
                return Err(ConfigError::new(
                    field,
                    format!("{route}: a peer cannot take the default route"),
                ));
            }
            check_route(&field, *route, network)?;
        }
        // Two peers may not claim overlapping networks: whose would it be?
        for (j, other) in peers[..i].iter().enumerate() {
            let clash = peer.routes.iter().find_map(|mine| {
                let theirs = other
                    .routes
                    .iter()
                    .find(|t| crate::routes::overlaps(mine, t))?;
                Some((mine, theirs))
            });
            if let Some((mine, theirs)) = clash {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{mine} of peer {} overlaps {theirs} of peer {} (server.peer[{j}])",
                        peer.label(),
                        other.label()
                    ),
                ));
            }
        }
    }
    Ok(peers)
}

/// A route as configured: a
/// network address (no host bits), and apart from the tunnel network.
fn check_route(field: &str, route: IpNet, network: Ipv4Net) -> Result<(), ConfigError> {
    let problem = if route != route.trunc() {
        format!("{route} has host bits set: write {}", route.trunc())
    } else if crate::routes::overlaps(&route, &IpNet::V4(network)) {
        format!("{route} overlaps the tunnel network {network}")
    } else {
        return Ok(());
    };
    Err(ConfigError::new(field, problem))
}

/// The pushed DNS settings, checked against the limits of the session
/// parameters: at most [`MAX_DNS`] unicast servers, at most
/// [`MAX_DNS_SEARCH`] valid domains.
fn dns(
    servers: Vec<IpAddr>,
    search: Vec<String>,
) -> Result<(Vec<IpAddr>, Vec<String>), ConfigError> {
    if servers.len() > MAX_DNS {
        return Err(ConfigError::new(
            "dns",
            format!("{} servers: at most {MAX_DNS}", servers.len()),
        ));
    }
    if let Some(bad) = servers
        .iter()
        .find(|s| s.is_unspecified() || s.is_multicast() || s == &&IpAddr::V4(Ipv4Addr::BROADCAST))
    {
        return Err(ConfigError::new(
            "dns",
            format!("{bad} is not a unicast address"),
        ));
    }
    if search.len() > MAX_DNS_SEARCH {
        return Err(ConfigError::new(
            "dns_search",
            format!("{} domains: at most {MAX_DNS_SEARCH}", search.len()),
        ));
    }
    if let Some(bad) = search.iter().find(|d| !valid_domain(d.as_bytes())) {
        return Err(ConfigError::new(
            "dns_search",
            format!("{bad:?} is not 1 to {MAX_DOMAIN_LEN} ASCII letters, digits, '-' and '.'"),
        ));
    }
    Ok((servers, search))
}

/// The server's own routes, checked, and apart from every peer's.
fn server_routes(
    routes: Vec<IpNet>,
    network: Ipv4Net,
    peers: &[PeerSection],
) -> Result<Vec<IpNet>, ConfigError> {
    for route in &routes {
        check_route("routes", *route, network)?;
        for peer in peers {
            if let Some(theirs) = peer
                .routes
                .iter()
                .find(|t| crate::routes::overlaps(route, t))
            {
                return Err(ConfigError::new(
                    "routes",
                    format!(
                        "{route} overlaps {theirs}, a network behind peer {}",
                        peer.label()
                    ),
                ));
            }
        }
    }
    let served = routes.len() + peers.iter().map(|p| p.routes.len()).sum::<usize>();
    if served > crate::params::MAX_ROUTES {
        return Err(ConfigError::new(
            "routes",
            format!(
                "{served} networks are served (the server's and its peers'): at most {} fit in the session parameters",
                crate::params::MAX_ROUTES
            ),
        ));
    }
    Ok(routes)
}

impl ClientSection {
    /// These settings, with each one that `flags` sets replaced.
    pub fn overridden_by(self, flags: ClientSection) -> ClientSection {
        ClientSection {
            server: flags.server.or(self.server),
            server_order: flags.server_order.or(self.server_order),
            address: flags.address.or(self.address),
            tun: flags.tun.or(self.tun),
            prefix: flags.prefix.or(self.prefix),
            timeout: flags.timeout.or(self.timeout),
            mtu: flags.mtu.or(self.mtu),
            max_frame: flags.max_frame.or(self.max_frame),
            user: flags.user.or(self.user),
            helper_user: flags.helper_user.or(self.helper_user),
            network: flags.network.or(self.network),
            network6: flags.network6.or(self.network6),
            key: flags.key.or(self.key),
            server_key: flags.server_key.or(self.server_key),
            private_key: flags.private_key.or(self.private_key),
            legacy: flags.legacy.or(self.legacy),
            accept_routes: flags.accept_routes.or(self.accept_routes),
            full_tunnel: flags.full_tunnel.or(self.full_tunnel),
            fail_open: flags.fail_open.or(self.fail_open),
            dns: flags.dns.or(self.dns),
            sni: flags.sni.or(self.sni),
            proxy: flags.proxy.or(self.proxy),
        }
    }

    /// Fills in the defaults and checks every value.
    pub fn resolve(mut self) -> Result<ClientConfig, ConfigError> {
        let listed = match self.server.take() {
            None => Vec::new(),
            Some(Servers::One(server)) => vec![server],
            Some(Servers::Many(servers)) => servers,
            // Each table's key is pinned beside `server_key`'s: a server
            // with any of them is accepted.
            Some(Servers::Pinned(servers)) => {
                let mut keys = self.server_key.take().map_or(Vec::new(), |k| k.0);
                for server in &servers {
                    if !keys.contains(&server.key) {
                        keys.push(server.key);
                    }
                }
                self.server_key = Some(ServerKeys(keys));
                servers.into_iter().map(|s| s.address).collect()
            }
        };
        let servers = listed
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(with_default_port)
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(ConfigError::new(
                "server",
                "missing: give --server HOST[:PORT] or server = \"HOST:PORT\" in [client]",
            ));
        }
        let server = servers.join(", ");
        let prefix = self.prefix.unwrap_or(DEFAULT_PREFIX);
        if !TUNNEL_PREFIX.contains(&prefix) {
            return Err(ConfigError::new(
                "prefix",
                format!(
                    "{prefix} must be between {} and {}",
                    TUNNEL_PREFIX.start(),
                    TUNNEL_PREFIX.end()
                ),
            ));
        }
        let network = self.network.map(tunnel_network).transpose()?;
        if let (Some(network), Some(address)) = (network, self.address) {
            if !network.contains(&address) {
                return Err(ConfigError::new(
                    "address",
                    format!("{address} is outside the network {network}"),
                ));
            }
        }
        let timeout = seconds("timeout", self.timeout, DEFAULT_TIMEOUT_SECS)?;
        let max_frame = max_frame(self.max_frame)?;
        if let Some(route) = self
            .accept_routes
            .iter()
            .flatten()
            .find(|r| **r != r.trunc())
        {
            return Err(ConfigError::new(
                "accept_routes",
                format!("{route} has host bits set: write {}", route.trunc()),
            ));
        }
        let full_tunnel = self.full_tunnel.unwrap_or(false);
        if self.fail_open == Some(true) && !full_tunnel {
            return Err(ConfigError::new(
                "fail_open",
                "set, but full_tunnel is off: it only changes what a full tunnel does on link loss",
            ));
        }
        Ok(ClientConfig {
            accept_routes: self.accept_routes,
            full_tunnel,
            fail_open: self.fail_open.unwrap_or(false),
            dns: self.dns.unwrap_or_default(),
            sni: crate::tls::check_sni(self.sni)?,
            proxy: crate::daemon::proxy::resolve(self.proxy)?,
            server,
            servers,
            server_order: self.server_order.unwrap_or_default(),
            address: self.address,
            tun: tun_name(self.tun)?,
            prefix,
            timeout,
            keepalive_after: Duration::from_secs(15).min(timeout / 2),
            mtu: mtu(self.mtu, max_frame)?,
            max_frame,
            helper_user: helper_user(self.helper_user, self.user.as_deref())?,
            user: user(self.user)?,
            network,
            network6: match self.network6 {
                Some(n) => {
                    check_tunnel_net("network6", n.into(), crate::limits::TUNNEL_PREFIX6)?;
                    Some(n)
                }
                None => None,
            },
            tls: match (self.key, self.private_key, self.server_key) {
                (Some(_), Some(_), _) => {
                    return Err(ConfigError::new(
                        "private_key",
                        "give either key (a file) or private_key, not both",
                    ))
                }
                (Some(key), None, Some(server_key)) => Some((ClientKey::File(key), server_key)),
                (None, Some(inline), Some(server_key)) => {
                    crate::keys::NodeKey::from_inline(&inline)
                        .map_err(|e| ConfigError::new("private_key", e.to_string()))?;
                    Some((ClientKey::Inline(inline), server_key))
                }
                (None, None, None) if self.legacy == Some(true) => None,
                (None, None, None) => {
                    return Err(ConfigError::new(
                        "key",
                        "missing: without one this client would speak the original protocol, \
                         where nothing is authenticated; make one with \
                         `simplevpnd keygen /etc/simplevpn/client.key` and set key and server_key \
                         (--key, --server-key), or set legacy = true (--legacy) for an \
                         original-protocol server",
                    ))
                }
                (Some(_) | None, Some(_) | None, None) => {
                    return Err(ConfigError::new(
                        "server_key",
                        "missing: with a key, give the server's public key to pin (--server-key)",
                    ))
                }
                (None, None, Some(_)) => {
                    return Err(ConfigError::new(
                        "key",
                        "missing: with server_key, give this client's private key file (--key)",
                    ))
                }
            },
        })
    }
}

/// HOST[:PORT] with the default port added where none is given. Accepts
/// names, IPv4 and bracketed IPv6 literals.
fn with_default_port(server: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| ConfigError::new("server", format!("{server:?}: {why}"));
    if server.parse::<SocketAddr>().is_ok() {
        return Ok(server.to_string());
    }
    if server.parse::<std::net::IpAddr>().is_ok() {
        return Ok(match server.contains(':') {
            true => format!("[{server}]:{DEFAULT_PORT}"),
            false => format!("{server}:{DEFAULT_PORT}"),
        });
    }
    if server.starts_with('[') {
        return Err(bad("expected [IPv6]:PORT"));
    }
    match server.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>()
                .map_err(|_| bad("the port must be a number from 1 to 65535"))?;
            if host.is_empty() {
                return Err(bad("the host is empty"));
            }
            Ok(server.to_string())
        }
        None => Ok(format!("{server}:{DEFAULT_PORT}")),
    }
}

/// A tunnel network: a prefix in [`TUNNEL_PREFIX`] (/8 to /30), without
/// host bits.
fn tunnel_network(network: Ipv4Net) -> Result<Ipv4Net, ConfigError> {
    check_tunnel_net("network", network.into(), TUNNEL_PREFIX)?;
    Ok(network)
}

/// A tunnel network of either family (`field`): a prefix in `prefixes`,
/// without host bits.
pub fn check_tunnel_net(
    field: &str,
    network: IpNet,
    prefixes: std::ops::RangeInclusive<u8>,
) -> Result<(), ConfigError> {
    if !prefixes.contains(&network.prefix_len()) {
        return Err(ConfigError::new(
            field,
            format!(
                "{network}: the prefix must be between /{} and /{}",
                prefixes.start(),
                prefixes.end()
            ),
        ));
    }
    if network != network.trunc() {
        return Err(ConfigError::new(
            field,
            format!(
                "{network} has host bits set; did you mean {}?",
                network.trunc()
            ),
        ));
    }
    Ok(())
}

/// The service user's name (whether it exists is checked at startup).
fn user(name: Option<String>) -> Result<String, ConfigError> {
    match name.unwrap_or_else(|| DEFAULT_USER.to_string()) {
        name if name.is_empty() => Err(ConfigError::new("user", "must not be empty")),
        name => Ok(name),
    }
}

/// What clients dial: HOST:PORT (a name or an address, and a port).
fn endpoint(endpoint: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(endpoint) = endpoint else {
        return Ok(None);
    };
    let port = endpoint
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .filter(|port| *port != 0);
    match port {
        Some(_) => Ok(Some(endpoint)),
        None => Err(ConfigError::new(
            "endpoint",
            format!(
                "{endpoint:?} is not HOST:PORT (what clients dial, e.g. \"vpn.example.org:2002\")"
            ),
        )),
    }
}

/// Where /metrics is served: loopback, unless `public` says otherwise.
fn metrics_listen(
    listen: Option<SocketAddr>,
    public: bool,
) -> Result<Option<SocketAddr>, ConfigError> {
    match listen {
        Some(address) if !address.ip().is_loopback() && !public => Err(ConfigError::new(
            "metrics",
            format!(
                "{address} is not a loopback address, and the metrics name every peer: \
                 set [metrics] public = true (or --metrics-public) to serve them to the network"
            ),
        )),
        listen => Ok(listen),
    }
}

/// The helper's user: not empty, and not the daemon's own user (the
/// daemon must not be able to signal it, nor be granted what it is).
fn helper_user(name: Option<String>, daemon: Option<&str>) -> Result<String, ConfigError> {
    let name = name.unwrap_or_else(|| DEFAULT_HELPER_USER.to_string());
    if name.is_empty() {
        return Err(ConfigError::new("helper_user", "must not be empty"));
    }
    if name == daemon.unwrap_or(DEFAULT_USER) {
        return Err(ConfigError::new(
            "helper_user",
            format!("{name:?} is also the daemon's user; the helper needs a user of its own"),
        ));
    }
    Ok(name)
}

/// The environment variable naming the systemd instance a daemon runs as
/// (`simplevpnd@NAME.service` sets it to NAME): its tun's default name then
/// comes from the instance ([`instance_tun`]).
pub const INSTANCE_ENV: &str = "SIMPLEVPN_INSTANCE";

/// The default tun name of instance `instance`: `svpn-` and the instance's
/// interface-name characters, cut to [`MAX_IFNAME_LEN`] bytes; `svpn0` for
/// an instance with none.
pub fn instance_tun(instance: &str) -> String {
    let kept: String = instance
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .collect();
    if kept.is_empty() {
        return DEFAULT_TUN.to_string();
    }
    let mut name = format!("svpn-{kept}");
    name.truncate(MAX_IFNAME_LEN);
    name
}

/// The tun name when neither a flag nor the file gives one: from the
/// systemd instance ([`INSTANCE_ENV`]) if there is one, else `svpn0`.
fn default_tun() -> String {
    match std::env::var(INSTANCE_ENV) {
        Ok(instance) => instance_tun(&instance),
        Err(_) => DEFAULT_TUN.to_string(),
    }
}

/// The tun's name: 1 to [`MAX_IFNAME_LEN`] (15) bytes of a-z, A-Z, 0-9, `-_.`.
fn tun_name(name: Option<String>) -> Result<String, ConfigError> {
    let name = name.unwrap_or_else(default_tun);
    let valid = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    match valid {
        true => Ok(name),
        false => Err(ConfigError::new(
            "tun",
            format!("{name:?} is not an interface name (1-{MAX_IFNAME_LEN} of a-z, 0-9, - _ .)"),
        )),
    }
}

/// A count that must be at least 1.
fn at_least_one(field: &str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(ConfigError::new(field, "must be at least 1")),
        n => Ok(n),
    }
}

fn seconds(field: &str, value: Option<u64>, default: u64) -> Result<Duration, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(ConfigError::new(field, "must be at least 1 second")),
        secs if secs > 86_400 * 365 => Err(ConfigError::new(field, "must be at most a year")),
        secs => Ok(Duration::from_secs(secs)),
    }
}

/// The largest frame: [`FRAME_RANGE`], by default its upper end.
fn max_frame(value: Option<usize>) -> Result<usize, ConfigError> {
    match value.unwrap_or(*FRAME_RANGE.end()) {
        n if FRAME_RANGE.contains(&n) => Ok(n),
        n => Err(ConfigError::new(
            "max_frame",
            format!(
                "{n} must be between {} and {}",
                FRAME_RANGE.start(),
                FRAME_RANGE.end()
            ),
        )),
    }
}

/// The tun's MTU: by default as large as a frame may be (packets travel
/// inside TCP, so nothing on the way limits them, and a large MTU moves up to
/// 64 KiB per read and write).
fn mtu(value: Option<u32>, max_frame: usize) -> Result<u32, ConfigError> {
    let mtu = value.unwrap_or(DEFAULT_MTU.min(max_frame as u32));
    if mtu < MIN_MTU || mtu as usize > max_frame {
        return Err(ConfigError::new(
            "mtu",
            format!("{mtu} must be between {MIN_MTU} and max_frame ({max_frame})"),
        ));
    }
    Ok(mtu)
}

/// A client's whole config as `svpnctl peer new` and `simplevpnd join`
/// write it: `comment` (lines, each made a `#` comment), the server to
/// dial and its key, `key_line` (where this client's key is, or the key
/// itself), the address fixed for it, and hints as comments.
pub fn client_config_text(
    comment: &str,
    endpoint: &str,
    server_keys: &[String],
    key_line: &str,
    address: Option<Ipv4Addr>,
) -> String {
    let comment: String = comment.lines().map(|l| format!("# {l}\n")).collect();
    let server_key = match server_keys {
        [one] => format!("\"{one}\""),
        keys => format!(
            "[{}]",
            keys.iter()
                .map(|k| format!("\"{k}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let address = match address {
        Some(a) => format!("address = \"{a}\"\n"),
        None => String::new(),
    };
    format!(
        "{comment}\
         [client]\n\
         server = \"{endpoint}\"\n\
         server_key = {server_key}\n\
         {key_line}\n\
         {address}\
         # full_tunnel = true        # all traffic through the server, if it offers it\n\
         # accept_routes = []        # install none of the routes the server pushes\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_names_its_tun() {
        assert_eq!(instance_tun("home"), "svpn-home");
        assert_eq!(instance_tun("office-2"), "svpn-office-2");
        // Cut to 15 bytes; characters an interface name cannot hold dropped.
        assert_eq!(instance_tun("a-very-long-instance"), "svpn-a-very-lon");
        assert_eq!(instance_tun("x/y:z"), "svpn-xyz");
        assert_eq!(instance_tun("//"), "svpn0");
        for instance in ["home", "a-very-long-instance", "x/y:z", ""] {
            assert!(tun_name(Some(instance_tun(instance))).is_ok(), "{instance}");
        }
    }

    fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse(text, Path::new("test.toml"))
    }

    /// The error a [server] section resolves to.
    fn server_error(section: &str) -> ConfigError {
        let key = "ScFYNjnPxvAxr6GGa07nJpY3Y6mxoP6KgSTp3vU//xo=";
        let other = "ONOr9fEmSGWf1Q33P2uSfmTX9ENUe0rqqUCpKFvaoik=";
        let text = format!(
            "[server]\nkey = \"/k\"\nnetwork = \"198.19.0.0/16\"\n{}",
            section.replace("KEY1", key).replace("KEY2", other)
        );
        parse(&text)
            .expect("parse")
            .server
            .expect("server")
            .resolve()
            .expect_err("refused")
    }

    #[test]
    fn admission_limits_have_defaults_and_are_checked() {
        let text = "[server]\nlegacy = true\n";
        let config = parse(text)
            .expect("parse")
            .server
            .expect("server")
            .resolve()
            .expect("valid");
        assert_eq!(config.max_unauthenticated, DEFAULT_MAX_UNAUTHENTICATED);
        assert_eq!(config.max_unauthenticated_per_source, 8);
        assert_eq!(config.first_bytes_timeout, Duration::from_secs(2));
        let short = parse("[server]\nlegacy = true\nhandshake_timeout = 1\n")
            .expect("parse")
            .server
            .expect("server")
            .resolve()
            .expect("valid");
        assert_eq!(
            short.first_bytes_timeout,
            Duration::from_secs(1),
            "shortened"
        );
        let zero = server_error("max_unauthenticated_per_source = 0\n");
        assert_eq!(zero.field, "max_unauthenticated_per_source");
        // The per-network limit and the reserve: an eighth of the global
        // limit, the former at least the per-source one.
        assert_eq!(config.max_unauthenticated_per_network, 128);
        assert_eq!(config.unauthenticated_reserve, 128);
        assert_eq!(config.legacy_max_per_source, DEFAULT_LEGACY_MAX_PER_SOURCE);
        let small = legacy_server("max_unauthenticated = 20\n");
        assert_eq!(small.max_unauthenticated_per_network, 8);
        assert_eq!(small.unauthenticated_reserve, 2);
        for (text, field) in [
            (
                "max_unauthenticated_per_network = 0\n",
                "max_unauthenticated_per_network",
            ),
            ("legacy_max_per_source = 0\n", "legacy_max_per_source"),
            (
                "max_unauthenticated = 10\nunauthenticated_reserve = 11\n",
                "unauthenticated_reserve",
            ),
        ] {
            assert_eq!(server_error(text).field, field, "{text}");
        }
        let long = server_error("handshake_timeout = 5\nfirst_bytes_timeout = 6\n");
        assert_eq!(long.field, "first_bytes_timeout");
        assert!(
            long.problem.contains("longer than handshake_timeout"),
            "{long}"
        );
    }

    /// A valid [server] section of a legacy server with `extra` settings.
    fn legacy_server(extra: &str) -> ServerConfig {
        parse(&format!("[server]\nlegacy = true\n{extra}"))
            .expect("parse")
            .server
            .expect("server")
            .resolve()
            .expect("valid")
    }

    #[test]
    fn the_new_admission_limits_need_a_restart() {
        let old = legacy_server("");
        for (extra, field) in [
            (
                "max_unauthenticated_per_network = 9\n",
                "max_unauthenticated_per_network",
            ),
            ("unauthenticated_reserve = 9\n", "unauthenticated_reserve"),
            ("legacy_max_per_source = 9\n", "legacy_max_per_source"),
        ] {
            assert_eq!(old.needs_restart(&legacy_server(extra)), vec![field]);
        }
    }

    #[test]
    fn routes_are_checked_and_peers_may_not_overlap() {
        let overlap = server_error(
            "[[server.peer]]\nkey = \"KEY1\"\nname = \"site-a\"\nroutes = [\"198.18.201.0/24\"]\n\
             [[server.peer]]\nkey = \"KEY2\"\nroutes = [\"198.18.201.128/25\"]\n",
        );
        assert_eq!(overlap.field, "server.peer[1].routes");
        assert!(overlap.problem.contains("198.18.201.128/25"), "{overlap}");
        assert!(
            overlap.problem.contains("198.18.201.0/24 of peer site-a"),
            "{overlap}"
        );
        let host_bits = server_error("routes = [\"198.18.200.1/24\"]\n");
        assert_eq!(host_bits.field, "routes");
        assert!(host_bits.problem.contains("write 198.18.200.0/24"));
        let v6 = server_error("network6 = \"2001:2:0:100::/64\"\nroutes = [\"2001:2::/48\"]\n");
        assert!(
            v6.problem.contains("overlaps the IPv6 tunnel network"),
            "{v6}"
        );
        let tunnel = server_error("routes = [\"198.19.4.0/24\"]\n");
        assert!(
            tunnel.problem.contains("overlaps the tunnel network"),
            "{tunnel}"
        );
        let default = server_error("[[server.peer]]\nkey = \"KEY1\"\nroutes = [\"0.0.0.0/0\"]\n");
        assert!(default.problem.contains("default route"), "{default}");
        let served = server_error(
            "routes = [\"198.18.200.0/23\"]\n[[server.peer]]\nkey = \"KEY1\"\nroutes = [\"198.18.201.0/24\"]\n",
        );
        assert!(served.problem.contains("a network behind peer"), "{served}");
    }

    #[test]
    fn defaults() {
        let server = ServerSection {
            legacy: Some(true),
            ..Default::default()
        }
        .resolve()
        .expect("defaults");
        assert_eq!(server.listen, "0.0.0.0:2002".parse().expect("addr"));
        assert_eq!(server.network, "10.0.0.0/16".parse().expect("net"));
        assert_eq!(server.client_timeout, Duration::from_secs(60));
        assert_eq!(server.tun, "svpn0");
        assert_eq!(server.user, "simplevpn");
    }

    #[test]
    fn user_and_client_network() {
        let file = parse(
            "[client]\nserver = \"198.18.1.1\"\nlegacy = true\nuser = \"nobody\"\nnetwork = \"198.19.0.0/16\"\n",
        )
        .expect("parse")
        .client
        .expect("client section");
        let config = file.clone().resolve().expect("resolve");
        assert_eq!(config.user, "nobody");
        assert_eq!(config.network, Some("198.19.0.0/16".parse().expect("net")));
        let flags = ClientSection {
            user: Some("svpn".into()),
            ..Default::default()
        };
        assert_eq!(
            file.overridden_by(flags).resolve().expect("resolve").user,
            "svpn"
        );

        let client = |network: &str, address: Option<&str>| ClientSection {
            server: Some("198.18.1.1".into()),
            network: Some(network.parse().expect("net")),
            address: address.map(|a| a.parse().expect("addr")),
            ..Default::default()
        };
        let err = client("198.19.0.0/16", Some("198.20.0.1"))
            .resolve()
            .expect_err("static address outside the network");
        assert_eq!(err.field, "address");
        let err = client("198.19.0.1/16", None)
            .resolve()
            .expect_err("host bits");
        assert_eq!(err.field, "network");
        let err = ServerSection {
            user: Some(String::new()),
            ..Default::default()
        }
        .resolve()
        .expect_err("empty user");
        assert_eq!(err.field, "user");
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse("[server]\nnetwork = \"198.19.0.0/16\"\nclient_timeout = 30\n")
            .expect("parse")
            .server
            .expect("server section");
        let flags = ServerSection {
            client_timeout: Some(5),
            legacy: Some(true),
            ..Default::default()
        };
        let config = file.overridden_by(flags).resolve().expect("resolve");
        assert_eq!(config.network, "198.19.0.0/16".parse().expect("net"));
        assert_eq!(config.client_timeout, Duration::from_secs(5));
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = parse("[server]\nlisten = \"0.0.0.0:2002\"\nnetwrok = \"10.0.0.0/16\"\n")
            .expect_err("unknown field");
        assert!(err.to_string().contains("test.toml:3"), "{err}");
        assert!(err.to_string().contains("netwrok"), "{err}");
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse("[server]\nnetwork = \"10.0.0.0/33\"\n").expect_err("bad network");
        assert!(
            err.to_string().starts_with("test.toml:2: network:"),
            "{err}"
        );
        let err = ServerSection {
            network: Some("10.0.0.0/31".parse().expect("net")),
            ..Default::default()
        }
        .resolve()
        .expect_err("too small");
        assert_eq!(err.field, "network");
        let err = ServerSection {
            client_timeout: Some(0),
            ..Default::default()
        }
        .resolve()
        .expect_err("zero");
        assert_eq!(err.field, "client_timeout");
        let err = ServerSection {
            tun: Some("a-very-long-interface-name".into()),
            ..Default::default()
        }
        .resolve()
        .expect_err("long name");
        assert_eq!(err.field, "tun");
    }

    #[test]
    fn tls_and_legacy_settings() {
        let key = "ScFYNjnPxvAxr6GGa07nJpY3Y6mxoP6KgSTp3vU//xo=";
        let resolve = |text: &str| {
            parse(text)
                .and_then(|f| f.server.unwrap_or_default().resolve())
                .map_err(|e| e.to_string())
        };
        let err = resolve("[server]\n").expect_err("no key, no legacy");
        assert!(
            err.starts_with("key: ") && err.contains("simplevpnd keygen"),
            "{err}"
        );
        let err = resolve("[server]\nlegacy_allow = [\"198.18.0.0/15\"]\n").expect_err("allow");
        assert!(err.starts_with("legacy_allow:"), "{err}");
        let peer = format!("[server]\nlegacy = true\n[[server.peer]]\nkey = \"{key}\"\n");
        let err = resolve(&peer).expect_err("peers need a key");
        assert!(err.starts_with("peer:"), "{err}");
        let with_key = |extra: &str| {
            format!("[server]\nkey = \"/k\"\n[[server.peer]]\nkey = \"{key}\"\n{extra}")
        };
        let err = resolve(&with_key("address = \"10.9.0.5\"\n")).expect_err("outside");
        assert!(err.starts_with("server.peer[0].address:"), "{err}");
        let twice = with_key(&format!("[[server.peer]]\nkey = \"{key}\"\n"));
        assert!(resolve(&twice).expect_err("twice").contains("listed twice"));
        let config =
            resolve(&with_key("name = \"laptop\"\naddress = \"10.0.0.9\"\n")).expect("valid");
        assert_eq!(config.legacy, Legacy::Off);
        assert_eq!(config.peers[0].name.as_deref(), Some("laptop"));
        let err = resolve("[server]\nlegacy = true\n[[server.peer]]\nkey = \"AAAA\"\n")
            .expect_err("bad key");
        assert!(
            err.contains("key") && err.contains("not a public key"),
            "{err}"
        );

        let on = Legacy::On(vec!["198.18.0.0/15".parse().expect("net")]);
        assert!(on.allows("198.19.1.1".parse().expect("ip")));
        assert!(!on.allows("203.0.113.1".parse().expect("ip")));
        assert!(Legacy::On(vec![]).allows("203.0.113.1".parse().expect("ip")));
        assert!(!Legacy::Off.allows("198.19.1.1".parse().expect("ip")));

        let client = |text: &str| {
            parse(text)
                .and_then(|f| f.client.unwrap_or_default().resolve())
                .map_err(|e| e.field)
        };
        assert_eq!(
            client("[client]\nserver = \"h\"\nkey = \"/k\"\n")
                .err()
                .as_deref(),
            Some("server_key")
        );
        let pinned = format!("[client]\nserver = \"h\"\nserver_key = \"{key}\"\n");
        assert_eq!(client(&pinned).err().as_deref(), Some("key"));
        // Several servers' keys: a list; a single string still works.
        let other = PublicKey::from_raw(&[3; 32]).expect("key");
        let parsed: PublicKey = key.parse().expect("key");
        let inline = crate::keys::NodeKey::new_inline().expect("key").1;
        for (written, keys) in [
            (format!("\"{key}\""), vec![parsed]),
            (format!("[\"{key}\", \"{other}\"]"), vec![parsed, other]),
        ] {
            let text = format!(
                "[client]\nserver = \"h\"\nprivate_key = \"{inline}\"\nserver_key = {written}\n"
            );
            let config = client(&text).expect("resolves");
            assert_eq!(config.tls.expect("tls").1, ServerKeys(keys), "{text}");
        }
        assert!(client("[client]\nserver = \"h\"\nserver_key = []\n").is_err());
        // [[client.server]] tables: each server and its key.
        let text = format!(
            "[client]\nprivate_key = \"{inline}\"\n\
             [[client.server]]\naddress = \"vpn1.example.org\"\nkey = \"{key}\"\n\
             [[client.server]]\naddress = \"vpn2.example.org:443\"\nkey = \"{other}\"\n"
        );
        let config = client(&text).expect("resolves");
        assert_eq!(
            config.servers,
            ["vpn1.example.org:2002", "vpn2.example.org:443"]
        );
        assert_eq!(config.tls.expect("tls").1, ServerKeys(vec![parsed, other]));
    }

    #[test]
    fn control_section() {
        let file =
            parse("[control]\nsocket = \"/tmp/a.sock\"\nadmin_group = \"wheel\"\n").expect("parse");
        let control = file
            .control
            .expect("control")
            .resolve(None)
            .expect("resolve");
        assert_eq!(control.socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(control.group, "simplevpn");
        assert!(!control.group_configured);
        assert_eq!(control.admin_group.as_deref(), Some("wheel"));
        let flag = ControlSection::default()
            .resolve(Some(PathBuf::from("/tmp/b.sock")))
            .expect("resolve");
        assert_eq!(flag.socket, PathBuf::from("/tmp/b.sock"));
        assert!(ControlSection::default()
            .resolve(Some(PathBuf::from("")))
            .is_err());
    }

    #[test]
    fn a_client_lists_several_servers_and_the_order_to_try_them() {
        let client = |text: &str| {
            parse(&text.replace("[client]\n", "[client]\nlegacy = true\n"))
                .map(|f| f.client.expect("client").resolve())
        };
        let config = client(
            "[client]\nserver = [\"198.18.1.1\", \"198.18.2.1:7000\"]\nserver_order = \"random\"\n",
        )
        .expect("parse")
        .expect("valid");
        assert_eq!(config.servers, ["198.18.1.1:2002", "198.18.2.1:7000"]);
        assert_eq!(config.server_order, ServerOrder::Random);
        let one = client("[client]\nserver = \"198.18.1.1\"\n")
            .expect("parse")
            .expect("valid");
        assert_eq!(one.servers, ["198.18.1.1:2002"]);
        assert_eq!(one.server_order, ServerOrder::First);
        let err = client("[client]\nserver = []\n")
            .expect("parse")
            .expect_err("no server");
        assert_eq!(err.field, "server");
        let err = client("[client]\nserver = [\"198.18.1.1:x\"]\n")
            .expect("parse")
            .expect_err("bad port");
        assert_eq!(err.field, "server");
        assert!(client("[client]\nserver = \"a\"\nserver_order = \"roundrobin\"\n").is_err());
    }

    #[test]
    fn client_server_addresses() {
        let resolve = |s: &str| {
            ClientSection {
                server: Some(s.into()),
                legacy: Some(true),
                ..Default::default()
            }
            .resolve()
            .map(|c| c.server)
        };
        assert_eq!(resolve("198.18.0.1"), Ok("198.18.0.1:2002".into()));
        assert_eq!(resolve("198.18.0.1:7000"), Ok("198.18.0.1:7000".into()));
        assert_eq!(
            resolve("vpn.example.org"),
            Ok("vpn.example.org:2002".into())
        );
        assert_eq!(resolve("::1"), Ok("[::1]:2002".into()));
        assert_eq!(resolve("[::1]:7000"), Ok("[::1]:7000".into()));
        assert!(resolve("host:notaport").is_err());
        assert!(resolve("").is_err());
        assert_eq!(
            ClientSection::default().resolve().map_err(|e| e.field),
            Err("server".to_string())
        );
    }

    #[test]
    fn full_tunnel_settings_are_checked() {
        let client = |text: &str| {
            parse(&format!(
                "[client]\nserver = \"198.18.1.1\"\nlegacy = true\n{text}"
            ))
            .expect("parses")
            .client
            .expect("client")
            .resolve()
        };
        let config = client("full_tunnel = true\nfail_open = true\ndns = \"off\"\n").expect("ok");
        assert!(config.full_tunnel && config.fail_open);
        assert_eq!(config.dns, DnsMode::Off);
        let config = client("").expect("defaults");
        assert!(!config.full_tunnel && !config.fail_open);
        assert_eq!(config.dns, DnsMode::Pushed);
        assert_eq!(
            client("fail_open = true\n").expect_err("alone").field,
            "fail_open"
        );
        assert!(parse("[client]\ndns = \"maybe\"\n").is_err());

        let server = |dns: Vec<&str>, search: Vec<&str>| {
            ServerSection {
                legacy: Some(true),
                gateway: Some(true),
                dns: Some(dns.iter().map(|d| d.parse().expect("ip")).collect()),
                dns_search: Some(search.iter().map(|d| d.to_string()).collect()),
                ..Default::default()
            }
            .resolve()
        };
        let config = server(vec!["10.0.0.1"], vec!["vpn.example"]).expect("ok");
        assert!(config.gateway && !config.masquerade);
        assert_eq!(
            server(vec!["224.0.0.1"], vec![])
                .expect_err("multicast")
                .field,
            "dns"
        );
        assert_eq!(
            server(vec![], vec!["not a domain"])
                .expect_err("domain")
                .field,
            "dns_search"
        );
        let many = vec!["10.0.0.1"; MAX_DNS + 1];
        assert_eq!(server(many, vec![]).expect_err("too many").field, "dns");
    }

    #[test]
    fn a_cluster_server_may_have_network6() {
        let text = "[server]\nkey = \"/k\"\nnetwork = \"198.19.0.0/16\"\n{}\n\
                    [cluster]\netcd = [\"http://198.18.9.1:2379\"]\nnode = \"s1\"\n\
                    advertise = \"198.18.1.1:2003\"\netcd_insecure = true\n\
                    [[cluster.member]]\nnode = \"s1\"\n\
                    key = \"ScFYNjnPxvAxr6GGa07nJpY3Y6mxoP6KgSTp3vU//xo=\"\n";
        let settings = |v6: &str| {
            let file = parse(&text.replace("{}", v6)).expect("parse");
            server_settings(
                file.server,
                file.metrics,
                file.cluster,
                ServerSection::default(),
            )
        };
        let config = settings("").expect("an IPv4-only cluster server");
        assert!(config.cluster.is_some());
        assert_eq!(config.network6, None);
        let config = settings("network6 = \"2001:2:0:100::/64\"").expect("a dual-stack one");
        assert!(config.cluster.is_some());
        assert_eq!(config.network6, "2001:2:0:100::/64".parse().ok());
    }
}
