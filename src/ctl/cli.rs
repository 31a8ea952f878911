//! The command line of svpnctl, in the library so that the man page and
//! shell completions can be generated from it (see src/bin/simplevpn-gen-assets.rs).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueHint};
use ipnet::IpNet;

use crate::config::DEFAULT_CONTROL_SOCKET;
use crate::keys::PublicKey;

/// Control a running simplevpnd: list, inspect, watch and kick peers; add
/// and remove allowed keys and reload the config without a restart.
///
/// svpnctl talks gRPC to simplevpnd over the daemon's control socket. Every
/// command takes --json: raw numbers and RFC 3339 times instead of tables
/// with human units. On a client daemon, status shows the server, the
/// granted address and the link state, and peers lists the server.
#[derive(Debug, Parser)]
#[command(name = "svpnctl", version)]
pub struct Cli {
    /// The daemon's control socket
    #[arg(
        long,
        global = true,
        env = "SVPNCTL_SOCKET",
        default_value = DEFAULT_CONTROL_SOCKET,
        value_name = "PATH",
        value_hint = ValueHint::FilePath
    )]
    pub socket: PathBuf,
    /// Print JSON (raw numbers, RFC 3339 times) instead of tables
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// What the daemon is and does
    Status,
    /// The live sessions: every peer that holds a tunnel address (also
    /// `peers`)
    #[command(visible_alias = "peers")]
    Sessions,
    /// One session in detail
    Inspect {
        /// Its tunnel address (IPv4, or its IPv6 one), its public key or its name
        #[arg(value_name = "ADDRESS|PUBKEY|NAME")]
        peer: String,
    },
    /// Close a session and free its address
    Kick {
        /// Its tunnel address (IPv4, or its IPv6 one), its public key or its name
        #[arg(value_name = "ADDRESS|PUBKEY|NAME")]
        peer: String,
        /// Also refuse the same client for this long (e.g. 30s, 5m, 1h)
        #[arg(long, value_parser = humantime::parse_duration)]
        ban: Option<Duration>,
        /// Why, kept as the ban's reason (svpnctl bans) and logged; at most
        /// 200 bytes of printable text
        #[arg(long, value_name = "TEXT", value_parser = ban_reason)]
        reason: Option<String>,
    },
    /// Print peer events as they happen, until interrupted
    Watch,
    /// The bans in force: a key (TLS client) or a remote address
    /// (original-protocol client), until when, and why
    Bans,
    /// Lift a ban at once (in a cluster, on every server)
    Unban {
        /// The banned public key, or remote address (as `svpnctl bans` lists it)
        #[arg(value_name = "PUBKEY|ADDRESS")]
        who: String,
    },
    /// The keys allowed to connect: add and remove them at run time, list
    /// them (`svpnctl keys` lists them too)
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Every allowed key (as `peer list`): where it comes from (config file
    /// or added live), and whether it is connected
    Keys,
    /// Re-read the server's config file and apply the difference, as SIGHUP
    /// does; a bad file is refused and the running configuration stays
    Reload,
    /// Invite a new host: print the one-line `simplevpnd join TOKEN` to run
    /// there (the host makes its own key, which never leaves it). The token
    /// works once, until it expires; the server keeps only its hash. Also:
    /// `invite list`, `invite revoke NAME`.
    Invite(InviteArgs),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct InviteArgs {
    #[command(subcommand)]
    pub command: Option<InviteCommand>,
    /// The name the new host's key will be allowed under
    #[arg(required = true)]
    pub name: Option<String>,
    /// How long the token may be used (e.g. 30m, 1h, 2d)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub ttl: Duration,
    /// An address always given to the new host
    #[arg(long, value_name = "IP")]
    pub address: Option<Ipv4Addr>,
    /// What the new host dials, HOST:PORT [default: the server's endpoint setting]
    #[arg(long, value_name = "HOST:PORT")]
    pub endpoint: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum InviteCommand {
    /// Every invitation: name, address, expiry and state (open, used,
    /// revoked, expired); never the secret
    List,
    /// Withdraw an open invitation: its token is refused from now on
    Revoke {
        /// Its name
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Allow a key at once, kept across restarts (existing connections are
    /// not touched)
    Add {
        /// Its public key (`simplevpnd pubkey` prints it)
        key: PublicKey,
        /// A name for logs, metrics and `peer remove`
        #[arg(long)]
        name: Option<String>,
        /// An address always given to it
        #[arg(long, value_name = "IP")]
        address: Option<Ipv4Addr>,
        /// An IPv6 address always given to it (inside the server's network6)
        #[arg(long, value_name = "IPV6")]
        address6: Option<std::net::Ipv6Addr>,
        /// A network behind it (site-to-site; repeat for more)
        #[arg(long = "route", value_name = "CIDR")]
        routes: Vec<IpNet>,
    },
    /// Make a key pair for a new client, allow it at once (as `peer add`),
    /// and print the client's whole config: its private key inline, the
    /// server's endpoint and key. Copy it to the client and start it there.
    New {
        /// A name for the new client (logs, metrics, `peer remove`)
        name: String,
        /// An address always given to it
        #[arg(long, value_name = "IP")]
        address: Option<Ipv4Addr>,
        /// Write the config to FILE (mode 0600, never overwriting) instead
        /// of printing it
        #[arg(long, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
        /// What the client dials, HOST:PORT [default: the server's endpoint setting]
        #[arg(long, value_name = "HOST:PORT")]
        endpoint: Option<String>,
    },
    /// Forget a key added live and close its connection at once
    Remove {
        /// Its public key or its name
        #[arg(value_name = "PUBKEY|NAME")]
        peer: String,
    },
    /// Every allowed key: where it comes from (config file or added live),
    /// and whether it is connected
    List,
}

/// `--reason`: printable text, at most [`crate::limits::MAX_BAN_REASON`]
/// bytes (the server checks it again).
fn ban_reason(text: &str) -> Result<String, crate::state::BanReasonError> {
    let text = text.trim();
    crate::state::check_ban_reason(text)?;
    Ok(text.to_string())
}
