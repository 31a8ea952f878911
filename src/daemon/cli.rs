//! The command line of simplevpnd.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::{IpNet, Ipv4Net};

use super::{Role, Settings};
use crate::config::{
    config_file, server_settings, ClientSection, ConfigError, DnsMode, PeerSection, ServerOrder,
    ServerSection, ServerSource, Servers,
};
use crate::keys::PublicKey;

/// IP-in-TCP VPN daemon, wire-compatible with the original simplevpn.
///
/// A server accepts clients on TCP port 2002 and grants each an address in
/// its tunnel network; whole IP packets travel over one TCP connection per
/// client, between the tun devices of both ends. "simplevpnd server" and
/// "simplevpnd client" run the two roles; "simplevpnd --config FILE" takes
/// the role from the file. svpnctl talks to the daemon over its control
/// socket.
#[derive(Debug, Parser)]
#[command(name = "simplevpnd", version)]
pub struct Cli {
    /// Config file (TOML). Default: /etc/simplevpn/simplevpnd.toml if it
    /// exists. Flags override the file. Without a subcommand, the role is
    /// taken from the file's [server] or [client] table.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Control socket for svpnctl [default: /run/simplevpn/control.sock].
    /// Overrides [control] socket in the file; one per daemon on a host.
    #[arg(long, global = true, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Server: where leases, bans and peers added live are kept
    /// [default: /var/lib/simplevpn]. Global, so that one unit line serves
    /// either role (a client keeps no state and ignores it).
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve clients: grant addresses and forward their packets.
    Server(ServerArgs),
    /// Join a server and carry this host's tunnel traffic.
    Client(ClientArgs),
    /// Write a new private key to PATH (mode 0600) and print its public key.
    /// With "-", the private key goes to standard output and the public key
    /// to standard error. Never reads the config file.
    Keygen {
        /// Where to write the key ("-": standard output); an existing file is
        /// never overwritten
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
    /// Print the public key of the private key in PATH ("-": standard
    /// input). Never reads the config file.
    Pubkey {
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
    /// Check a config file as a start would, without starting: prints the
    /// role and a summary, or each problem (FILE:LINE: field: problem); exit
    /// status 0 or 2.
    Check,
    /// Join a server with an invitation (the token `svpnctl invite` printed
    /// there): make this host's key if missing (it never leaves the host),
    /// dial the server pinning the key the token carries, get the key
    /// allowed under the invited name, and write this host's client config.
    /// Never reads the config file. Exit status 0 (and the next command to
    /// run), 1 when refused or unreachable (nothing changed on the server),
    /// 2 for a bad token or a config file in the way.
    Join {
        /// The token, as `svpnctl invite` printed it
        #[arg(value_name = "TOKEN")]
        token: String,
        /// Where to write the client config
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config_out: PathBuf,
        /// This host's private key: used if it exists, else made (mode 0600)
        #[arg(long, value_name = "FILE", default_value = DEFAULT_KEY)]
        key: PathBuf,
        /// Overwrite an existing config file
        #[arg(long)]
        force: bool,
    },
}

/// Where the config file is by default.
const DEFAULT_CONFIG: &str = "/etc/simplevpn/simplevpnd.toml";
/// Where a host's key is by default (what the packages make).
const DEFAULT_KEY: &str = "/etc/simplevpn/host.key";

/// What simplevpnd was asked to do.
#[derive(Debug)]
pub enum Action {
    Run(Box<Settings>),
    /// Check these settings, read from the file (if any), and exit.
    Check(Box<Settings>, Option<PathBuf>),
    Keygen(PathBuf),
    Pubkey(PathBuf),
    Join(super::join::JoinOptions),
}

/// Flags both roles take.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Name of the tun device [default: svpn0]
    #[arg(long, value_name = "NAME")]
    pub tun: Option<String>,
    /// MTU of the tun [default: 65535, or max_frame if smaller]
    #[arg(long, value_name = "BYTES")]
    pub mtu: Option<u32>,
    /// Unprivileged user to run as, once the helper is started [default: simplevpn]
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// User simplevpn-helper runs as, keeping CAP_NET_ADMIN only; not the
    /// daemon's user [default: simplevpn-helper]
    #[arg(long, value_name = "NAME")]
    pub helper_user: Option<String>,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address and port to accept clients on [default: 0.0.0.0:2002]
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Tunnel network; the server takes its first host address [default: 10.0.0.0/16]
    #[arg(long, value_name = "CIDR")]
    pub network: Option<Ipv4Net>,
    /// IPv6 tunnel network (/64 to /120): extension clients get an IPv6 address too, the server its ::1 [default: none, IPv4 only]
    #[arg(long, value_name = "CIDR")]
    pub network6: Option<ipnet::Ipv6Net>,
    /// Drop a client silent for this long, and free its address [default: 60]
    #[arg(long, value_name = "SECS")]
    pub client_timeout: Option<u64>,
    /// Drop a new connection that asks for no address within this time [default: 10]
    #[arg(long, value_name = "SECS")]
    pub handshake_timeout: Option<u64>,
    #[command(flatten)]
    pub common: CommonArgs,
    /// Private key file: serve TLS clients listed with --peer or [[server.peer]]
    #[arg(long, value_name = "PATH")]
    pub key: Option<PathBuf>,
    /// Public key of a TLS client that may join (repeat for more)
    #[arg(long = "peer", value_name = "PUBKEY")]
    pub peers: Vec<PublicKey>,
    /// Also serve the original protocol: unauthenticated and unencrypted
    #[arg(long)]
    pub legacy: bool,
    /// A network reachable through the server, pushed to clients (repeat for more)
    #[arg(long = "route", value_name = "CIDR")]
    pub routes: Vec<IpNet>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics [default: off]
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Serve the metrics on an address other than loopback ([metrics] public)
    #[arg(long)]
    pub metrics_public: bool,
    /// What clients dial to reach this server, HOST:PORT (svpnctl peer new writes it into their configs)
    #[arg(long, value_name = "HOST:PORT")]
    pub endpoint: Option<String>,
    /// Whether clients reach each other: allow (inside the server), deny (dropped), kernel (the host's firewall decides) [default: allow]
    #[arg(long, value_enum, value_name = "POLICY")]
    pub client_to_client: Option<crate::config::ClientToClient>,
    /// Offer this server as the default gateway to TLS clients (full tunnel)
    #[arg(long)]
    pub gateway: bool,
    /// NAT the tunnel network's traffic that leaves by any other interface (nftables)
    #[arg(long)]
    pub masquerade: bool,
    /// Let the helper turn on IPv4 forwarding if it is off (otherwise it only says how)
    #[arg(long)]
    pub forwarding: bool,
    /// A DNS server pushed to TLS clients (repeat for more)
    #[arg(long = "dns", value_name = "IP")]
    pub dns: Vec<IpAddr>,
    /// A DNS search domain pushed to TLS clients (repeat for more)
    #[arg(long = "dns-search", value_name = "DOMAIN")]
    pub dns_search: Vec<String>,
    /// Original-protocol sessions one source (IPv4 address, IPv6 /64) may hold at once [default: 16]
    #[arg(long, value_name = "N")]
    pub legacy_max_per_source: Option<usize>,
    /// Connections not yet granted an address from one IPv4 /24 or IPv6 /48 [default: max_unauthenticated / 8]
    #[arg(long, value_name = "N")]
    pub max_unauthenticated_per_network: Option<usize>,
    /// Places beyond the limits before authentication for sources granted an address within 24 h [default: max_unauthenticated / 8]
    #[arg(long, value_name = "N")]
    pub unauthenticated_reserve: Option<usize>,
    /// Threads of the data path, 1 to 1024 (1: one thread, the lowest latency for one busy peer) [default: one per CPU]
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Hand connections that are not ours (HTTP, TLS without our ALPN) to this backend, e.g. the website on the same port [default: off]
    #[arg(long, value_name = "HOST:PORT")]
    pub port_share: Option<String>,
    /// With --port-share: send the backend a PROXY protocol v2 header naming the client
    #[arg(long)]
    pub port_share_proxy: bool,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Server to connect to (repeat for the servers of one cluster: the next is tried when one fails)
    #[arg(short = 's', long, value_name = "HOST[:PORT]")]
    pub server: Vec<String>,
    /// Which listed server is tried first [default: first]
    #[arg(long, value_name = "ORDER")]
    pub server_order: Option<ServerOrder>,
    /// Ask for this static address (default: any, and the same one again on reconnect)
    #[arg(short = 'a', long, value_name = "IP")]
    pub address: Option<Ipv4Addr>,
    /// Treat the link as dead after this long without a byte from the server [default: 60]
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    #[command(flatten)]
    pub common: CommonArgs,
    /// Private key file: speak TLS to the server (needs --server-key)
    #[arg(long, value_name = "PATH")]
    pub key: Option<PathBuf>,
    /// The server's public key, pinned; repeat it for the servers of a
    /// cluster (each has its own key)
    #[arg(long, value_name = "PUBKEY")]
    pub server_key: Vec<PublicKey>,
    /// Without --key: speak the original protocol (plaintext, nothing authenticated)
    #[arg(long)]
    pub legacy: bool,
    /// Install only pushed routes inside this network (repeat for more) [default: every pushed route but a default route]
    #[arg(long = "accept-route", value_name = "CIDR")]
    pub accept_routes: Vec<IpNet>,
    /// Accept the server's default route: all traffic through the tunnel
    #[arg(long)]
    pub full_tunnel: bool,
    /// With --full-tunnel: drop the tunnel's routes while the link is down (no kill switch)
    #[arg(long)]
    pub fail_open: bool,
    /// Pushed DNS servers and search domains: set them on the tun (systemd-resolved) or ignore them [default: pushed]
    #[arg(long, value_enum, value_name = "MODE")]
    pub dns: Option<DnsMode>,
    /// The server name a TLS ClientHello gives (SNI), e.g. the website's on a shared port [default: a built-in name]
    #[arg(long, value_name = "NAME")]
    pub sni: Option<String>,
    /// Reach the server through this proxy: http://[USER:PASS@]HOST:PORT (CONNECT), socks5://[USER:PASS@]HOST:PORT, or env (https_proxy, all_proxy) [default: none]
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
}

impl From<ServerArgs> for ServerSection {
    fn from(args: ServerArgs) -> ServerSection {
        ServerSection {
            listen: args.listen,
            network: args.network,
            network6: args.network6,
            tun: args.common.tun,
            client_timeout: args.client_timeout,
            handshake_timeout: args.handshake_timeout,
            mtu: args.common.mtu,
            user: args.common.user,
            helper_user: args.common.helper_user,
            key: args.key,
            legacy: args.legacy.then_some(true),
            peer: (!args.peers.is_empty()).then(|| {
                args.peers
                    .into_iter()
                    .map(|key| PeerSection {
                        client_to_client: None,
                        key,
                        name: None,
                        address: None,
                        address6: None,
                        routes: Vec::new(),
                    })
                    .collect()
            }),
            routes: (!args.routes.is_empty()).then_some(args.routes),
            metrics: args.metrics,
            metrics_public: args.metrics_public.then_some(true),
            client_to_client: args.client_to_client,
            endpoint: args.endpoint,
            gateway: args.gateway.then_some(true),
            masquerade: args.masquerade.then_some(true),
            forwarding: args.forwarding.then_some(true),
            dns: (!args.dns.is_empty()).then_some(args.dns),
            dns_search: (!args.dns_search.is_empty()).then_some(args.dns_search),
            workers: args.workers,
            legacy_max_per_source: args.legacy_max_per_source,
            max_unauthenticated_per_network: args.max_unauthenticated_per_network,
            unauthenticated_reserve: args.unauthenticated_reserve,
            port_share: args.port_share,
            port_share_proxy: args.port_share_proxy.then_some(true),
            ..ServerSection::default()
        }
    }
}

impl From<ClientArgs> for ClientSection {
    fn from(args: ClientArgs) -> ClientSection {
        ClientSection {
            server: (!args.server.is_empty()).then_some(Servers::Many(args.server)),
            server_order: args.server_order,
            address: args.address,
            tun: args.common.tun,
            timeout: args.timeout,
            mtu: args.common.mtu,
            user: args.common.user,
            helper_user: args.common.helper_user,
            key: args.key,
            server_key: (!args.server_key.is_empty())
                .then_some(crate::config::ServerKeys(args.server_key)),
            legacy: args.legacy.then_some(true),
            accept_routes: (!args.accept_routes.is_empty()).then_some(args.accept_routes),
            full_tunnel: args.full_tunnel.then_some(true),
            fail_open: args.fail_open.then_some(true),
            dns: args.dns,
            sni: args.sni,
            proxy: args.proxy,
            ..ClientSection::default()
        }
    }
}

impl Cli {
    /// What to do: a key command, or run with the config file's settings
    /// overridden by flags.
    pub fn into_action(self) -> Result<Action, ConfigError> {
        // Key commands never read the config: a broken file must not stop
        // anyone from making a key (a package's postinst does).
        let mut check = false;
        let command = match self.command {
            Some(Command::Keygen { path }) => return Ok(Action::Keygen(path)),
            Some(Command::Pubkey { path }) => return Ok(Action::Pubkey(path)),
            Some(Command::Join {
                token,
                config_out,
                key,
                force,
            }) => {
                return Ok(Action::Join(super::join::JoinOptions {
                    token,
                    config_out,
                    key,
                    force,
                }))
            }
            Some(Command::Check) => {
                check = true;
                None
            }
            command => command,
        };
        let file = config_file(self.config.as_deref())?;
        let where_ = || {
            self.config
                .as_ref()
                .map_or("config".to_string(), |p| p.display().to_string())
        };
        let control = file.control.unwrap_or_default();
        #[cfg(not(feature = "server"))]
        if matches!(command, Some(Command::Server(_)))
            || (command.is_none() && file.server.is_some() && file.client.is_none())
        {
            return Err(ConfigError::new("server", super::NO_SERVER));
        }
        let mut source = None;
        let role = match command {
            Some(Command::Server(args)) => {
                let flags = ServerSection {
                    state_dir: self.state_dir.clone(),
                    ..ServerSection::from(args)
                };
                let config = server_settings(file.server, file.metrics, file.cluster.clone(), flags.clone())?;
                source = Some(ServerSource {
                    file: self.config.clone(),
                    flags,
                });
                Role::Server(config)
            }
            Some(Command::Client(args)) => {
                let section = file.client.unwrap_or_default().overridden_by(args.into());
                Role::Client(section.resolve()?)
            }
            Some(
                Command::Keygen { .. }
                | Command::Pubkey { .. }
                | Command::Check
                | Command::Join { .. },
            )
            | None => match (file.server, file.client) {
                (Some(server), None) => {
                    let flags = ServerSection {
                        state_dir: self.state_dir.clone(),
                        ..ServerSection::default()
                    };
                    source = Some(ServerSource {
                        file: self.config.clone(),
                        flags: flags.clone(),
                    });
                    Role::Server(server_settings(Some(server), file.metrics, file.cluster, flags)?)
                }
                (None, Some(client)) => Role::Client(client.resolve()?),
                (Some(_), Some(_)) => return Err(ConfigError::new(
                    where_(),
                    "has both [server] and [client]; say which to run: simplevpnd server|client",
                )),
                (None, None) => return Err(ConfigError::new(
                    where_(),
                    "no role: give a subcommand (server or client) or a config file with a [server] or [client] table",
                )),
            },
        };
        let settings = Box::new(Settings {
            role,
            control: control.resolve(self.control)?,
            source,
        });
        Ok(match check {
            true => Action::Check(settings, self.config),
            false => Action::Run(settings),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[cfg(feature = "server")]
    fn control_socket(args: &[&str]) -> Result<PathBuf, ConfigError> {
        let cli = Cli::try_parse_from(args).expect("parses");
        match cli.into_action()? {
            Action::Run(settings) => Ok(settings.control.socket),
            other => panic!("{args:?}: not a run: {other:?}"),
        }
    }

    #[cfg(feature = "server")]
    #[test]
    fn control_goes_before_or_after_the_subcommand_or_with_a_file_alone() {
        let dir = std::env::temp_dir().join(format!("svpn-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("office.toml");
        std::fs::write(&file, "[server]\nlegacy = true\n").expect("write");
        let file = file.to_str().expect("utf-8 path");

        for args in [
            &[
                "simplevpnd",
                "--control",
                "/run/a.sock",
                "server",
                "--legacy",
            ][..],
            &[
                "simplevpnd",
                "server",
                "--legacy",
                "--control",
                "/run/a.sock",
            ],
            &["simplevpnd", "--config", file, "--control", "/run/a.sock"],
        ] {
            assert_eq!(
                control_socket(args),
                Ok(PathBuf::from("/run/a.sock")),
                "{args:?}"
            );
        }
        assert_eq!(
            control_socket(&["simplevpnd", "--config", file]),
            Ok(PathBuf::from(crate::config::DEFAULT_CONTROL_SOCKET))
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[cfg(feature = "server")]
    #[test]
    fn the_template_units_command_line_serves_either_role() {
        // packaging/systemd/simplevpnd@.service passes --state-dir whatever
        // role the file names.
        let dir = std::env::temp_dir().join(format!("svpn-cli-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for (name, text) in [
            ("server.toml", "[server]\nlegacy = true\n"),
            (
                "client.toml",
                "[client]\nserver = \"198.18.100.1:2002\"\nlegacy = true\n",
            ),
        ] {
            let file = dir.join(name);
            std::fs::write(&file, text).expect("write");
            let file = file.to_str().expect("utf-8 path");
            let args = [
                "simplevpnd",
                "--config",
                file,
                "--control",
                "/run/simplevpn/home.sock",
                "--state-dir",
                "/var/lib/simplevpn/home",
            ];
            let cli = Cli::try_parse_from(args).expect("parses");
            match cli.into_action().expect("resolves") {
                Action::Run(settings) => {
                    if let Role::Server(config) = &settings.role {
                        assert_eq!(config.state_dir, PathBuf::from("/var/lib/simplevpn/home"));
                    }
                }
                other => panic!("{name}: not a run: {other:?}"),
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[cfg(not(feature = "server"))]
    #[test]
    fn a_client_only_build_refuses_a_server_and_still_resolves_a_client() {
        let dir = std::env::temp_dir().join(format!("svpn-cli-small-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let server = dir.join("server.toml");
        std::fs::write(&server, "[server]\nlegacy = true\n").expect("write");
        let server = server.to_str().expect("utf-8 path");
        let client = dir.join("client.toml");
        std::fs::write(
            &client,
            "[client]\nserver = \"198.18.100.1:2002\"\nlegacy = true\n",
        )
        .expect("write");
        let client = client.to_str().expect("utf-8 path");

        for args in [
            &["simplevpnd", "server", "--legacy"][..],
            &["simplevpnd", "--config", server],
            &["simplevpnd", "--config", server, "check"],
        ] {
            let cli = Cli::try_parse_from(args).expect("parses");
            let e = cli.into_action().expect_err("refused");
            assert_eq!(
                e,
                ConfigError::new("server", super::super::NO_SERVER),
                "{args:?}"
            );
        }
        // A [client] file resolves as in a full build.
        let cli = Cli::try_parse_from(["simplevpnd", "--config", client, "check"]).expect("parses");
        match cli.into_action().expect("resolves") {
            Action::Check(settings, _) => assert!(matches!(settings.role, Role::Client(_))),
            other => panic!("not a check: {other:?}"),
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
