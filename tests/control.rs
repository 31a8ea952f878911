//! The control plane end to end: real daemons in namespaces, svpnctl over
//! the control socket, as root and as an unprivileged user.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::vpn::*;
use common::{require_root, wait_until};
use serde_json::Value;

/// uid and gid of `nobody` / `nogroup`.
const NOBODY: u32 = 65534;
/// A system user other than nobody for the daemon, so that nobody is a
/// stranger to it.
const DAEMON_USER: &str = "daemon";

fn addresses(peers: &Value) -> Vec<String> {
    peers
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|p| p["address"].as_str().expect("address").to_string())
        .collect()
}

/// The JSON events `svpnctl --json watch` printed so far.
fn watch_events(watch: &common::Daemon) -> Vec<Value> {
    watch
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The value of `key` in svpnctl's "key   value" output.
fn field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().to_string())
    })
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn peers_inspect_status_and_counters() {
    if !require_root("peers_inspect_status_and_counters") {
        return;
    }
    let bed = Bed::new("ctlpeers", 2);
    let _server = bed.start_server(&[]);
    let _a = bed.start_client(0, &[]);
    let _b = bed.start_client(1, &["-a", "198.19.0.50"]);
    let socket = bed.server_socket();

    let peers = svpnctl_json(&socket, &["peers"]);
    assert_eq!(addresses(&peers), ["198.19.0.2", "198.19.0.50"]);
    let a = &peers[0];
    assert_eq!(
        a["remote"].as_str().map(|r| r.starts_with("198.18.1.2:")),
        Some(true)
    );
    for field in ["connected_since", "last_seen"] {
        let time = a[field].as_str().expect("RFC 3339 time");
        assert!(humantime::parse_rfc3339(time).is_ok(), "{field}: {time}");
    }
    let rx_before = a["rx_bytes"].as_u64().expect("rx_bytes");

    let b_address = Ipv4Addr::new(198, 19, 0, 50);
    tcp_round_trip(&bed.clients[0], &bed.clients[1], b_address, 6000, 1 << 20);
    let a = svpnctl_json(&socket, &["inspect", "198.19.0.2"]);
    assert_eq!(a["address"], "198.19.0.2");
    let rx_after = a["rx_bytes"].as_u64().expect("rx_bytes");
    assert!(
        rx_after >= rx_before + (1 << 20),
        "{rx_before} -> {rx_after}"
    );
    // At least 1 MiB in packets of at most 64 KiB.
    assert!(a["rx_packets"].as_u64() >= Some(16), "{a}");
    let b = svpnctl_json(&socket, &["inspect", "198.19.0.50"]);
    assert!(b["tx_bytes"].as_u64() >= Some(1 << 20), "{b}");

    // The tables, for people.
    let table = stdout(&svpnctl(&socket, &["peers"], None));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("ADDRESS"), "{table}");
    assert!(lines[1].starts_with("198.19.0.2 "), "{table}");
    assert!(lines[2].starts_with("198.19.0.50 "), "{table}");
    assert!(table.contains("MiB"), "human units: {table}");
    // Columns line up: every row's REMOTE starts where the header's does.
    let column = lines[0].find("REMOTE").expect("REMOTE column");
    for line in &lines[1..] {
        assert_eq!(line.find("198.18."), Some(column), "{table}");
    }
    let detail = stdout(&svpnctl(&socket, &["inspect", "198.19.0.2"], None));
    assert!(detail.contains("remote"), "{detail}");
    assert!(detail.contains(" MiB in "), "{detail}");

    let status = svpnctl_json(&socket, &["status"]);
    assert_eq!(status["role"], "server");
    assert_eq!(status["peer_count"], 2);
    assert_eq!(status["network"], NETWORK);
    assert_eq!(status["address"], "198.19.0.1/16");
    let text = stdout(&svpnctl(&socket, &["status"], None));
    assert_eq!(
        field(&text, "peers").as_deref(),
        Some("2 (65531 addresses free)"),
        "{text}"
    );

    // A client daemon reports its link, and lists the server as its peer.
    let client = svpnctl_json(&bed.client_socket(0), &["status"]);
    assert_eq!(client["role"], "client");
    assert_eq!(client["link_state"], "connected");
    assert_eq!(client["address"], "198.19.0.2/16");
    assert!(
        client["server_peer"]["tx_bytes"].as_u64() >= Some(1 << 20),
        "{client}"
    );
    let server_as_peer = svpnctl_json(&bed.client_socket(0), &["peers"]);
    assert_eq!(addresses(&server_as_peer), ["198.19.0.1"]);
    let text = stdout(&svpnctl(&bed.client_socket(0), &["status"], None));
    assert_eq!(field(&text, "link").as_deref(), Some("connected"), "{text}");

    // Unknown peers and bad input.
    let out = svpnctl(&socket, &["inspect", "198.19.9.9"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no peer holds 198.19.9.9"),
        "{}",
        stderr(&out)
    );
    let out = svpnctl(&socket, &["inspect", "not-an-address"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no peer is \"not-an-address\""),
        "{}",
        stderr(&out)
    );
    let missing = bed.path("nothing-here.sock");
    let out = svpnctl(&missing, &["peers"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "is simplevpnd running? no control socket at {missing}"
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn watch_kick_and_ban() {
    if !require_root("watch_kick_and_ban") {
        return;
    }
    let bed = Bed::new("ctlkick", 2);
    let _server = bed.start_server(&[]);
    let socket = bed.server_socket();
    let mut watch = bed
        .server
        .spawn(SVPNCTL, &["--socket", &socket, "--json", "watch"]);
    // Wait until the watch is subscribed: probe connections until one shows.
    assert!(
        wait_until(STARTUP, || {
            bed.raw_peer(0).send(&keepalive());
            watch_events(&watch)
                .iter()
                .any(|e| e["event"] == "connected")
        }),
        "watch shows nothing:\n{}",
        watch.log()
    );
    assert!(watch.is_running());

    // A raw peer: connect, grant; kick: closed, gone from the list.
    let mut raw = bed.raw_peer(1);
    assert_eq!(
        raw.ask(&dynamic_request()),
        grant_16(Ipv4Addr::new(198, 19, 0, 2))
    );
    let out = svpnctl(&socket, &["kick", "198.19.0.2"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("kicked 198.19.0.2 (198.18.2.2:"),
        "{}",
        stdout(&out)
    );
    raw.expect_closed(STARTUP);
    assert!(wait_until(STARTUP, || addresses(&svpnctl_json(
        &socket,
        &["peers"]
    ))
    .is_empty()));
    let seen = |event: &str, reason: &str| {
        watch_events(&watch).iter().any(|e| {
            e["event"] == event
                && e["address"] == "198.19.0.2"
                && e["remote"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("198.18.2.2:"))
                && e["reason"].as_str().is_some_and(|r| r.starts_with(reason))
        })
    };
    assert!(
        wait_until(STARTUP, || seen("granted", "Dynamic")
            && seen("kicked", "kicked by uid 0")
            && seen("disconnected", "kicked")),
        "events missing:\n{}",
        watch.log()
    );

    // A real client, kicked with a ban: it cannot come back until the ban ends.
    let client = bed.start_client(0, &[]);
    let granted = |n: usize| client.log().matches("granted").count() >= n;
    let out = svpnctl(&socket, &["kick", "198.19.0.2", "--ban", "4s"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("banned for 4s"), "{}", stdout(&out));
    assert!(
        client.wait_for_log("reconnecting", STARTUP),
        "{}",
        client.log()
    );
    assert!(
        !wait_until(Duration::from_secs(2), || granted(2)),
        "came back during the ban"
    );
    assert!(addresses(&svpnctl_json(&socket, &["peers"])).is_empty());
    assert!(
        wait_until(STARTUP, || watch_events(&watch).iter().any(|e| e["event"]
            == "refused"
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("banned")))),
        "{}",
        watch.log()
    );
    // Another host is not banned.
    let mut other = bed.raw_peer(1);
    assert_eq!(other.ask(&dynamic_request()).len(), 20);
    drop(other);
    assert!(
        wait_until(Duration::from_secs(20), || granted(2)),
        "{}",
        client.log()
    );
    assert_eq!(
        addresses(&svpnctl_json(&socket, &["peers"])),
        ["198.19.0.2"]
    );

    // Kicking nobody is a failure with exit code 1.
    let out = svpnctl(&socket, &["kick", "198.19.7.7"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no peer holds 198.19.7.7"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn only_administrators_may_kick() {
    if !require_root("only_administrators_may_kick") {
        return;
    }
    let bed = Bed::new("ctlperm", 1);
    // The server runs as `daemon` and its socket's group is nogroup, so
    // nobody can open the socket and read, but it is neither root, the
    // daemon's user nor in an admin group.
    let config = bed.path("server.toml");
    std::fs::write(&config, "[control]\ngroup = \"nogroup\"\n").expect("config");
    let _server = bed.start_server(&["--config", &config, "--user", DAEMON_USER]);
    let _client = bed.start_client(0, &[]);
    let socket = bed.server_socket();

    let out = svpnctl(&socket, &["--json", "peers"], Some(NOBODY));
    assert!(out.status.success(), "nobody may read: {}", stderr(&out));
    let out = svpnctl(&socket, &["kick", "198.19.0.2"], Some(NOBODY));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("uid 65534 may not kick"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        addresses(&svpnctl_json(&socket, &["peers"])),
        ["198.19.0.2"]
    );

    // Without the group, the socket itself is closed to nobody.
    let client_socket = bed.client_socket(0);
    let out = svpnctl(&client_socket, &["peers"], Some(NOBODY));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );

    // With an admin group, its members may kick.
    let admin_config = bed.path("admin.toml");
    std::fs::write(
        &admin_config,
        "[control]\ngroup = \"nogroup\"\nadmin_group = \"nogroup\"\n",
    )
    .expect("config");
    drop(_server);
    let _server = bed.start_server(&["--config", &admin_config, "--user", DAEMON_USER]);
    assert!(wait_until(Duration::from_secs(20), || {
        addresses(&svpnctl_json(&socket, &["peers"])) == ["198.19.0.2"]
    }));
    let out = svpnctl(&socket, &["kick", "198.19.0.2"], Some(NOBODY));
    assert!(out.status.success(), "admin group member: {}", stderr(&out));
}

#[test]
fn sessions_and_keys_and_a_peer_named_by_its_name_or_key() {
    if !require_root("sessions_and_keys_and_a_peer_named_by_its_name_or_key") {
        return;
    }
    let bed = Bed::new("ctlnames", 1);
    let tls = Tls::new(&bed, &["laptop"]);
    let server_key = &tls.server.path;
    let public = &tls.clients[0].public;
    let _server = bed.start_server(&["--key", server_key]);
    let socket = bed.server_socket();
    let added = svpnctl(&socket, &["peer", "add", public, "--name", "laptop"], None);
    assert!(added.status.success(), "{}", stderr(&added));
    let _client = bed.start_client(0, &tls.client_args(0));

    // `sessions` is `peers`; `keys` is `peer list`.
    let sessions = svpnctl_json(&socket, &["sessions"]);
    assert_eq!(addresses(&sessions), ["198.19.0.2"]);
    assert_eq!(sessions, svpnctl_json(&socket, &["peers"]));
    let keys = svpnctl_json(&socket, &["keys"]);
    assert_eq!(keys, svpnctl_json(&socket, &["peer", "list"]));
    assert!(
        keys.as_array()
            .is_some_and(|keys| keys.iter().any(|k| k["key"] == public.as_str())),
        "{keys}"
    );

    // inspect by address, name and key: the same session.
    let by_address = svpnctl_json(&socket, &["inspect", "198.19.0.2"]);
    for who in ["laptop", public.as_str()] {
        let by = svpnctl_json(&socket, &["inspect", who]);
        assert_eq!(by["address"], by_address["address"], "{who}: {by}");
        assert_eq!(by["key"], public.as_str(), "{who}: {by}");
    }
    let out = svpnctl(&socket, &["inspect", "desktop"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no peer is \"desktop\""),
        "{}",
        stderr(&out)
    );

    // kick by name, with a ban: gone, and listed as banned by its key.
    let out = svpnctl(&socket, &["kick", "laptop", "--ban", "1h"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("kicked laptop (198.18.1.2:"),
        "{}",
        stdout(&out)
    );
    assert!(
        wait_until(STARTUP, || addresses(&svpnctl_json(&socket, &["sessions"]))
            .is_empty()),
        "still listed after the kick"
    );
    let bans = svpnctl_json(&socket, &["bans"]);
    assert!(
        bans.as_array()
            .is_some_and(|bans| bans.iter().any(|b| b["key"] == public.as_str())),
        "{bans}"
    );
    // No --reason: the ban says who made it (the test runs as root).
    assert_eq!(bans[0]["reason"], "kicked by uid 0", "{bans}");
}
