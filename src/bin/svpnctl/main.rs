//! svpnctl: talks to a running simplevpnd over its control socket.

mod format;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Parser;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use simplevpn::ctl::cli::{Cli, Command, InviteArgs, InviteCommand, PeerCommand};
use simplevpn::keys::NodeKey;
use simplevpn::proto::control_client::ControlClient;
use simplevpn::proto::{self, peer_event::Kind};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

use format::*;

/// A failure to report: the message, and exit code 1.
struct Failure(String);

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        // Under --json, a failure is JSON too, on stdout where the answer
        // would have been.
        Err(Failure(message)) if json => {
            print_json(&json!({ "error": message }));
            ExitCode::from(1)
        }
        Err(Failure(message)) => {
            eprintln!("svpnctl: {message}");
            ExitCode::from(1)
        }
    }
}

async fn connect(socket: &PathBuf) -> Result<ControlClient<Channel>, Failure> {
    // Connect once by hand first, to say exactly what is wrong.
    if let Err(e) = tokio::net::UnixStream::connect(socket).await {
        let path = socket.display();
        return Err(Failure(match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                format!("is simplevpnd running? no control socket at {path}")
            }
            std::io::ErrorKind::PermissionDenied => format!(
                "permission denied opening {path}: join the socket's group (see ls -l {path}) or use sudo"
            ),
            _ => format!("cannot connect to {path}: {e}"),
        }));
    }
    let path = socket.clone();
    let channel = Endpoint::from_static("http://simplevpnd.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| Failure(format!("cannot talk to {}: {e}", socket.display())))?;
    Ok(ControlClient::new(channel))
}

fn failure(status: tonic::Status) -> Failure {
    Failure(match status.code() {
        Code::NotFound
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::InvalidArgument
        | Code::AlreadyExists
        | Code::Unavailable => status.message().to_string(),
        code => format!("{code:?}: {}", status.message()),
    })
}

/// A new client's whole config, for `svpnctl peer new`.
fn client_config(
    name: &str,
    endpoint: &str,
    server_keys: &[String],
    private_key: &str,
    address: Option<std::net::Ipv4Addr>,
) -> String {
    simplevpn::config::client_config_text(
        &format!(
            "simplevpn client \"{name}\", made by svpnctl peer new. It holds this\n\
             client's private key: keep it mode 0600. On the client:\n  \
             sudo install -m 600 THIS_FILE /etc/simplevpn/simplevpnd.toml\n  \
             sudo systemctl enable --now simplevpnd"
        ),
        endpoint,
        server_keys,
        &format!("private_key = \"{private_key}\""),
        address,
    )
}

/// Writes `text` to a new file `path` with mode 0600 (never overwriting).
fn write_private(path: &std::path::Path, text: &str) -> Result<(), Failure> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|e| Failure(format!("{}: {e}", path.display())))
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let mut client = connect(&cli.socket).await?;
    let now = SystemTime::now();
    match cli.command {
        Command::Status => {
            let s = client
                .status(proto::StatusRequest {})
                .await
                .map_err(failure)?
                .into_inner();
            if cli.json {
                print_json(&status_json(&s));
            } else {
                println!("{}", status_text(&s, now));
            }
        }
        Command::Sessions => {
            let peers = client
                .list_peers(proto::ListPeersRequest {})
                .await
                .map_err(failure)?
                .into_inner()
                .peers;
            if cli.json {
                print_json(&Value::Array(peers.iter().map(peer_json).collect()));
            } else if peers.is_empty() {
                println!("no peers");
            } else {
                println!("{}", peers_table(&peers, now));
            }
        }
        Command::Inspect { peer } => {
            let peer = client
                .get_peer(proto::GetPeerRequest { address: peer })
                .await
                .map_err(failure)?
                .into_inner();
            if cli.json {
                print_json(&peer_json(&peer));
            } else {
                println!("{}", peer_fields(&peer, now));
            }
        }
        Command::Bans => {
            let bans = client
                .list_bans(proto::ListBansRequest {})
                .await
                .map_err(failure)?
                .into_inner()
                .bans;
            if cli.json {
                print_json(&Value::Array(bans.iter().map(ban_json).collect()));
            } else if bans.is_empty() {
                println!("no bans");
            } else {
                println!("{}", bans_table(&bans, now));
            }
        }
        Command::Unban { who } => {
            client
                .unban(proto::UnbanRequest { who: who.clone() })
                .await
                .map_err(failure)?;
            match cli.json {
                true => print_json(&json!({ "unbanned": who })),
                false => println!("unbanned {who}"),
            }
        }
        Command::Kick { peer, ban, reason } => {
            let reply = client
                .kick_peer(proto::KickPeerRequest {
                    address: peer.clone(),
                    ban_seconds: ban.map(|b| b.as_secs().max(1)),
                    reason: reason.unwrap_or_default(),
                })
                .await
                .map_err(failure)?
                .into_inner();
            let remote = reply
                .peer
                .as_ref()
                .map(|p| p.remote.clone())
                .unwrap_or_default();
            if cli.json {
                print_json(&json!({
                    "kicked": reply.peer.as_ref().map(peer_json),
                    "ban_seconds": ban.map(|b| b.as_secs()),
                }));
            } else {
                match ban {
                    Some(ban) => println!(
                        "kicked {peer} ({remote}); banned for {}",
                        humantime::format_duration(ban)
                    ),
                    None => println!("kicked {peer} ({remote})"),
                }
            }
        }
        Command::Peer(PeerCommand::Add {
            key,
            name,
            address,
            address6,
            routes,
        }) => {
            let reply = client
                .add_peer(proto::AddPeerRequest {
                    key: key.to_string(),
                    name: name.unwrap_or_default(),
                    address: address.map(|a| a.to_string()).unwrap_or_default(),
                    routes: routes.iter().map(ToString::to_string).collect(),
                    address6: address6.map(|a| a.to_string()).unwrap_or_default(),
                })
                .await
                .map_err(failure)?
                .into_inner();
            match (cli.json, reply.peer) {
                (true, peer) => print_json(&json!({ "added": peer.as_ref().map(allowed_json) })),
                (false, _) => println!("added {key}; it may connect now"),
            }
        }
        Command::Peer(PeerCommand::New {
            name,
            address,
            output,
            endpoint,
        }) => {
            let status = client
                .status(proto::StatusRequest {})
                .await
                .map_err(failure)?
                .into_inner();
            let endpoint = endpoint
                .or_else(|| Some(status.endpoint.clone()).filter(|e| !e.is_empty()))
                .ok_or_else(|| {
                    Failure(
                        "the server has no endpoint: set endpoint = \"HOST:PORT\" in [server] \
                         (what clients dial), or pass --endpoint"
                            .into(),
                    )
                })?;
            if status.public_key.is_empty() {
                return Err(Failure(
                    "the server has no key (key = PATH in [server]): it serves no TLS client"
                        .into(),
                ));
            }
            let (key, private) =
                NodeKey::new_inline().map_err(|e| Failure(format!("making a key: {e}")))?;
            // In a cluster the client pins every member's key: it may be
            // served by any of them after a failover.
            let mut server_keys = vec![status.public_key.clone()];
            for member in status.cluster.iter().flat_map(|c| c.members.iter()) {
                if !member.key.is_empty() && !server_keys.contains(&member.key) {
                    server_keys.push(member.key.clone());
                }
            }
            let config = client_config(&name, &endpoint, &server_keys, &private, address);
            // Written before the key is allowed: a config that cannot be
            // saved leaves no allowed key behind.
            if let Some(path) = &output {
                write_private(path, &config)?;
            }
            client
                .add_peer(proto::AddPeerRequest {
                    key: key.public().to_string(),
                    name: name.clone(),
                    address: address.map(|a| a.to_string()).unwrap_or_default(),
                    routes: Vec::new(),
                    address6: String::new(),
                })
                .await
                .map_err(|status| {
                    if let Some(path) = &output {
                        let _ = std::fs::remove_file(path);
                    }
                    failure(status)
                })?;
            match (cli.json, &output) {
                (true, _) => print_json(&json!({
                    "name": name,
                    "key": key.public().to_string(),
                    "config": output.as_ref().map_or(Value::String(config.clone()), |p| json!(p)),
                })),
                (false, Some(path)) => println!(
                    "added {name} ({}); its config is in {} (copy it to the client as \
                     /etc/simplevpn/simplevpnd.toml, mode 0600)",
                    key.public(),
                    path.display()
                ),
                (false, None) => print!("{config}"),
            }
        }
        Command::Peer(PeerCommand::Remove { peer }) => {
            let reply = client
                .remove_peer(proto::RemovePeerRequest { peer: peer.clone() })
                .await
                .map_err(failure)?
                .into_inner();
            if cli.json {
                print_json(&json!({
                    "removed": reply.peer.as_ref().map(allowed_json),
                    "disconnected": reply.disconnected,
                }));
            } else {
                println!(
                    "removed {peer}; {} connection(s) closed",
                    reply.disconnected
                );
            }
        }
        Command::Peer(PeerCommand::List) | Command::Keys => {
            let peers = client
                .list_allowed(proto::ListAllowedRequest {})
                .await
                .map_err(failure)?
                .into_inner()
                .peers;
            if cli.json {
                print_json(&Value::Array(peers.iter().map(allowed_json).collect()));
            } else if peers.is_empty() {
                println!("no allowed keys");
            } else {
                println!("{}", allowed_table(&peers));
            }
        }
        Command::Reload => {
            let r = client
                .reload(proto::ReloadRequest {})
                .await
                .map_err(failure)?
                .into_inner();
            if cli.json {
                print_json(&json!({
                    "added": r.added,
                    "removed": r.removed,
                    "changed": r.changed,
                    "routes_changed": r.routes_changed,
                    "offer_changed": r.offer_changed,
                    "disconnected": r.disconnected,
                    "params_pushed": r.params_pushed,
                }));
            } else {
                println!(
                    "reloaded: added {}, removed {}, changed {}; routes {}; dns and gateway {}; {} disconnected, {} sent new parameters",
                    list_or_dash(&r.added),
                    list_or_dash(&r.removed),
                    list_or_dash(&r.changed),
                    if r.routes_changed { "changed" } else { "unchanged" },
                    if r.offer_changed { "changed" } else { "unchanged" },
                    r.disconnected,
                    r.params_pushed
                );
            }
        }
        Command::Invite(InviteArgs {
            command: Some(InviteCommand::List),
            ..
        }) => {
            let invites = client
                .list_invites(proto::ListInvitesRequest {})
                .await
                .map_err(failure)?
                .into_inner()
                .invites;
            if cli.json {
                print_json(&Value::Array(invites.iter().map(invite_json).collect()));
            } else if invites.is_empty() {
                println!("no invitations");
            } else {
                println!("{}", invites_table(&invites, now));
            }
        }
        Command::Invite(InviteArgs {
            command: Some(InviteCommand::Revoke { name }),
            ..
        }) => {
            let reply = client
                .revoke_invite(proto::RevokeInviteRequest { name: name.clone() })
                .await
                .map_err(failure)?
                .into_inner();
            match cli.json {
                true => print_json(&json!({ "revoked": reply.invite.as_ref().map(invite_json) })),
                false => println!("revoked the invitation for {name}"),
            }
        }
        Command::Invite(InviteArgs {
            command: None,
            name,
            ttl,
            address,
            endpoint,
        }) => {
            let reply = client
                .create_invite(proto::CreateInviteRequest {
                    name: name.unwrap_or_default(),
                    ttl_seconds: ttl.as_secs().max(1),
                    address: address.map(|a| a.to_string()).unwrap_or_default(),
                    endpoint: endpoint.unwrap_or_default(),
                })
                .await
                .map_err(failure)?
                .into_inner();
            match cli.json {
                true => print_json(&json!({
                    "token": reply.token,
                    "invite": reply.invite.as_ref().map(invite_json),
                })),
                false => println!("simplevpnd join {}", reply.token),
            }
        }
        Command::Watch => {
            let mut events = client
                .watch_peers(proto::WatchPeersRequest {})
                .await
                .map_err(failure)?
                .into_inner();
            while let Some(event) = events.message().await.map_err(failure)? {
                if cli.json {
                    println!("{}", event_json(&event));
                } else {
                    println!("{}", event_text(&event));
                }
            }
        }
    }
    Ok(())
}

fn kind_name(event: &proto::PeerEvent) -> &'static str {
    match Kind::try_from(event.kind).unwrap_or(Kind::Unspecified) {
        Kind::Connected => "connected",
        Kind::Granted => "granted",
        Kind::Disconnected => "disconnected",
        Kind::Kicked => "kicked",
        Kind::Refused => "refused",
        Kind::Lagged => "lagged",
        Kind::Unspecified => "unknown",
    }
}

fn event_json(e: &proto::PeerEvent) -> Value {
    json!({
        "event": kind_name(e),
        "time": rfc3339(&e.time),
        "remote": e.remote,
        "address": e.address,
        "reason": e.reason,
        "missed": e.missed,
    })
}

fn event_text(e: &proto::PeerEvent) -> String {
    let time = rfc3339(&e.time);
    let time = time.as_str().unwrap_or("-");
    if kind_name(e) == "lagged" {
        return format!("{time}  lagged: missed {} events", e.missed);
    }
    let mut line = format!("{time}  {:<12}  {}", kind_name(e), e.remote);
    if !e.address.is_empty() {
        line.push_str(&format!("  {}", e.address));
    }
    if !e.reason.is_empty() {
        line.push_str(&format!("  ({})", e.reason));
    }
    line
}

fn status_json(s: &proto::StatusReply) -> Value {
    let mut v = json!({
        "role": s.role().text(),
        "version": s.version,
        "started": rfc3339(&s.started),
        "tun": s.tun,
        "tun_state": s.tun_state,
        "address": s.address,
        "address6": or_null(&s.address6),
        "routes": s.routes,
        "host_changes": s.host_changes,
    });
    let extra = match s.role() {
        proto::Role::Server => json!({
            "listen": s.listen,
            "network": s.network,
            "peer_count": s.peer_count,
            "free_addresses": s.free_addresses,
            "network6": or_null(&s.network6),
            "free_addresses6": if s.network6.is_empty() { Value::Null } else { json!(s.free_addresses6) },
            "dropped_to_tun": s.dropped_to_tun,
            "queued_bytes": s.queued_bytes,
            "reading_bytes": s.reading_bytes,
            "closed_for_memory": s.closed_for_memory,
            "cluster": s.cluster.as_ref().map(cluster_json),
        }),
        _ => json!({
            "server": s.server,
            "proxy": s.proxy,
            "last_error": s.last_error,
            "link_state": s.link_state().text(),
            "server_peer": s.server_peer.as_ref().map(peer_json),
        }),
    };
    if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        v.extend(extra.clone());
    }
    v
}

fn cluster_json(c: &proto::ClusterStatus) -> Value {
    json!({
        "node": c.node,
        "health": c.health,
        "fenced": c.fenced,
        "members": c.members.iter().map(|m| json!({
            "node": m.node,
            "advertise": m.advertise,
            "key": m.key,
        })).collect::<Vec<_>>(),
        "links": c.links.iter().map(|l| json!({
            "node": l.node,
            "remote": l.remote,
            "up": l.up,
            "tx_packets": l.tx_packets,
            "tx_bytes": l.tx_bytes,
            "dropped_queue_full": l.dropped_queue_full,
        })).collect::<Vec<_>>(),
        "dropped_no_peer": c.dropped_no_peer,
        "dropped_link_down": c.dropped_link_down,
        "records_refused": c.records_refused,
        "dropped_spoofed": c.dropped_spoofed,
        "links_refused": c.links_refused,
    })
}

/// The cluster's lines of `svpnctl status`: one per member and per link.
fn cluster_pairs(c: &proto::ClusterStatus) -> Vec<(&'static str, String)> {
    let mut pairs = vec![("cluster", format!("node {}, etcd {}", c.node, c.health))];
    pairs.extend(
        c.members
            .iter()
            .map(|m| ("member", format!("{} at {}", m.node, m.advertise))),
    );
    pairs.extend(c.links.iter().map(|l| {
        let state = if l.up { "up" } else { "down" };
        (
            "link",
            format!(
                "{} at {} {state}: {} in {} packets, {} dropped (queue full)",
                l.node,
                l.remote,
                human_bytes(l.tx_bytes),
                l.tx_packets,
                l.dropped_queue_full
            ),
        )
    }));
    pairs
}

fn status_text(s: &proto::StatusReply, now: SystemTime) -> String {
    let mut pairs = vec![
        ("role", s.role().text().to_string()),
        ("version", s.version.clone()),
        ("uptime", age(&s.started, now)),
        ("tun", s.tun.clone()),
        ("tun state", or_dash(&s.tun_state)),
        ("address", or_dash(&s.address)),
        ("address6", or_dash(&s.address6)),
        ("routes", list_or_dash(&s.routes)),
    ];
    // One line each: the phrases are long.
    match s.host_changes.as_slice() {
        [] => pairs.push(("host changes", "-".to_string())),
        changes => pairs.extend(changes.iter().map(|c| ("host change", c.clone()))),
    }
    if s.role() == proto::Role::Server {
        pairs.extend([
            ("listen", s.listen.clone()),
            ("network", s.network.clone()),
            ("network6", or_dash(&s.network6)),
            (
                "peers",
                match s.network6.is_empty() {
                    true => format!("{} ({} addresses free)", s.peer_count, s.free_addresses),
                    false => format!(
                        "{} ({} addresses free, {} IPv6)",
                        s.peer_count, s.free_addresses, s.free_addresses6
                    ),
                },
            ),
            (
                "memory",
                format!(
                    "{} queued, {} in partly read frames, {} closed for the budget",
                    human_bytes(s.queued_bytes),
                    human_bytes(s.reading_bytes),
                    s.closed_for_memory
                ),
            ),
        ]);
        if let Some(cluster) = &s.cluster {
            pairs.extend(cluster_pairs(cluster));
        }
    } else {
        pairs.extend([
            ("server", s.server.clone()),
            ("link", or_dash(s.link_state().text())),
        ]);
        if !s.proxy.is_empty() {
            pairs.push(("proxy", s.proxy.clone()));
        }
        if !s.last_error.is_empty() {
            pairs.push(("last error", s.last_error.clone()));
        }
        if let Some(p) = &s.server_peer {
            pairs.extend([
                ("connected", age(&p.connected_since, now)),
                (
                    "rx",
                    format!("{} in {} packets", human_bytes(p.rx_bytes), p.rx_packets),
                ),
                (
                    "tx",
                    format!("{} in {} packets", human_bytes(p.tx_bytes), p.tx_packets),
                ),
            ]);
        }
    }
    fields(&pairs)
}
