//! TLS 1.3 with pinned keys, end to end: real daemons in namespaces, keys
//! made by `simplevpnd keygen`, raw original-protocol peers for the legacy
//! switch.

mod common;

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::vpn::*;
use common::{require_root, wait_until};

#[test]
fn keygen_writes_0600_keys_and_never_overwrites() {
    if !require_root("keygen_writes_0600_keys_and_never_overwrites") {
        return;
    }
    let bed = Bed::new("keygen", 0);
    let (path, public) = keygen(&bed, "node");
    assert_eq!(public.len(), 44, "{public}");
    let mode = std::fs::metadata(&path).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = Command::new(SIMPLEVPND)
        .args(["keygen", &path])
        .output()
        .expect("run");
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    let out = Command::new(SIMPLEVPND)
        .args(["pubkey", &path])
        .output()
        .expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), public);
    // A key others can read is refused.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = Command::new(SIMPLEVPND)
        .args(["pubkey", &path])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

#[test]
fn listed_tls_clients_join_and_carry_traffic() {
    if !require_root("listed_tls_clients_join_and_carry_traffic") {
        return;
    }
    let bed = Bed::new("tlsjoin", 2);
    let tls = Tls::new(&bed, &["a", "b"]);
    let server_pub = &tls.server.public;
    let a_pub = &tls.clients[0].public;
    let server = bed.start_server(&tls.server_args());
    let _a = bed.start_client(0, &tls.client_args(0));
    let _b = bed.start_client(1, &tls.client_args(1));
    let (a, b) = (Ipv4Addr::new(198, 19, 0, 2), Ipv4Addr::new(198, 19, 0, 3));
    tcp_round_trip(&bed.clients[0], &bed.clients[1], b, 5000, 2 << 20);
    tcp_round_trip(&bed.clients[1], &bed.server, SERVER_TUNNEL, 5001, 1 << 20);
    tcp_round_trip(&bed.server, &bed.clients[0], a, 5002, 1 << 20);

    let peers = svpnctl_json(&bed.server_socket(), &["peers"]);
    let a_peer = &peers[0];
    assert_eq!(a_peer["address"], "198.19.0.2");
    assert_eq!(a_peer["protocol"], "tls");
    assert_eq!(a_peer["key"], a_pub.as_str());
    assert!(
        server.log().contains(&format!("key={a_pub}")),
        "{}",
        server.log()
    );
    // The client sees the server's pinned key too.
    let seen = svpnctl_json(&bed.client_socket(0), &["peers"]);
    assert_eq!(seen[0]["key"], server_pub.as_str());
    assert_eq!(seen[0]["protocol"], "tls");
}

#[test]
fn unknown_keys_and_wrong_pins_are_refused() {
    if !require_root("unknown_keys_and_wrong_pins_are_refused") {
        return;
    }
    let bed = Bed::new("tlsdeny", 2);
    let tls = Tls::new(&bed, &["listed", "stranger"]);
    let server_key = &tls.server.path;
    let listed_key = &tls.clients[0].path;
    let listed_pub = &tls.clients[0].public;
    let stranger_pub = &tls.clients[1].public;
    let server = bed.start_server(&["--key", server_key, "--peer", listed_pub]);

    // An unlisted key: the handshake fails, and the log names the key.
    let stranger = bed.spawn_client(0, &tls.client_args(1));
    assert!(
        server.wait_for_log(&format!("unknown client key {stranger_pub}"), STARTUP),
        "{}",
        server.log()
    );
    assert!(
        stranger.wait_for_log("the server rejected this client", STARTUP),
        "{}",
        stranger.log()
    );

    // A listed client that pins the wrong server key refuses the server.
    let wrong_pin = bed.spawn_client(1, &tls_client_args(listed_key, stranger_pub));
    assert!(
        wrong_pin.wait_for_log("is not the pinned server_key", STARTUP),
        "{}",
        wrong_pin.log()
    );
    assert!(!stranger.log().contains("granted"));
    assert!(!wrong_pin.log().contains("granted"));
    assert!(!server.log().contains("granted"));
}

#[test]
fn a_fixed_address_belongs_to_its_key() {
    if !require_root("a_fixed_address_belongs_to_its_key") {
        return;
    }
    let bed = Bed::new("tlsfixed", 2);
    let tls = Tls::new(&bed, &["laptop"]);
    let server_key = &tls.server.path;
    let server_pub = &tls.server.public;
    let laptop_key = &tls.clients[0].path;
    let laptop_pub = &tls.clients[0].public;
    let config = bed.path("server.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlegacy = true\n\n[[server.peer]]\nkey = \"{laptop_pub}\"\n\
             name = \"laptop\"\naddress = \"198.19.0.77\"\n"
        ),
    )
    .expect("config");
    let _server = bed.start_server(&["--config", &config, "--key", server_key]);
    let fixed = Ipv4Addr::new(198, 19, 0, 77);

    // The key gets its address even when it asks for another one.
    let _laptop = bed.start_client(
        0,
        &[
            "-a",
            "198.19.0.9",
            "--key",
            laptop_key,
            "--server-key",
            server_pub,
        ],
    );
    let peer = svpnctl_json(&bed.server_socket(), &["inspect", "198.19.0.77"]);
    assert_eq!(peer["name"], "laptop");
    assert_eq!(bed.clients[0].ipv4_addrs(TUN), [(fixed, 16)]);
    // No one else gets it.
    let mut other = bed.raw_peer(1);
    other.send(&static_request(fixed));
    other.expect_closed(STARTUP);
    let table = String::from_utf8_lossy(
        &svpnctl(&bed.server_socket(), &["inspect", "198.19.0.77"], None).stdout,
    )
    .into_owned();
    assert!(table.contains("laptop"), "{table}");
}

#[test]
fn the_original_protocol_is_opt_in() {
    if !require_root("the_original_protocol_is_opt_in") {
        return;
    }
    let bed = Bed::new("tlslegacy", 1);
    let (server_key, _) = keygen(&bed, "server");
    let server = bed.start_server(&["--key", &server_key]);
    let mut raw = bed.raw_peer(0);
    raw.send(&dynamic_request());
    raw.expect_closed(STARTUP);
    assert!(
        server.wait_for_log("legacy is off", STARTUP),
        "{}",
        server.log()
    );
    drop(server);

    let _server = bed.start_server(&["--key", &server_key, "--legacy"]);
    let mut raw = bed.raw_peer(0);
    assert_eq!(
        raw.ask(&dynamic_request()),
        grant_16(Ipv4Addr::new(198, 19, 0, 2))
    );

    // A server with neither a key nor legacy refuses to start, saying what to run.
    let out = Command::new(SIMPLEVPND)
        .args(["server", "--network", NETWORK, "--user", USER])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("simplevpnd keygen"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn stalled_handshakes_are_cut_off_without_disturbing_others() {
    if !require_root("stalled_handshakes_are_cut_off_without_disturbing_others") {
        return;
    }
    let bed = Bed::new("tlsstall", 2);
    let tls = Tls::new(&bed, &["a", "b"]);
    let server = bed.start_server(&[tls.server_args(), vec!["--handshake-timeout", "1"]].concat());
    let _a = bed.start_client(0, &tls.client_args(0));

    // Half a TLS record, then nothing: cut off after the first-bytes timeout
    // (by default 2 s, shortened to this handshake timeout).
    let mut half_open = bed.raw_peer(1);
    half_open
        .stream
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x40, 0x01])
        .expect("write");
    let took = half_open.expect_closed(Duration::from_secs(10));
    assert!(took >= Duration::from_millis(800), "cut off after {took:?}");
    // Garbage: closed at once.
    let mut garbage = bed.raw_peer(1);
    garbage.send(&[0x00, 0x01, 0x02]);
    garbage.expect_closed(STARTUP);
    assert!(server.wait_for_log(
        "no ClientHello or address request within the first-bytes timeout",
        STARTUP
    ));
    assert!(server.wait_for_log("neither TLS (0x16) nor an IP packet", STARTUP));

    // Meanwhile and afterwards, the TLS clients work.
    let _b = bed.start_client(1, &tls.client_args(1));
    tcp_round_trip(
        &bed.clients[0],
        &bed.clients[1],
        Ipv4Addr::new(198, 19, 0, 3),
        5000,
        100_000,
    );
}

#[test]
fn bans_of_tls_peers_go_by_key() {
    if !require_root("bans_of_tls_peers_go_by_key") {
        return;
    }
    let bed = Bed::new("tlsban", 1);
    let tls = Tls::new(&bed, &["a", "b"]);
    let b_pub = &tls.clients[1].public;
    let server = bed.start_server(&tls.server_args());
    let a = bed.start_client(0, &tls.client_args(0));
    let out = svpnctl(
        &bed.server_socket(),
        &["kick", "198.19.0.2", "--ban", "1h"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(a.wait_for_log("reconnecting", STARTUP));
    assert!(
        server.wait_for_log("refused reason=banned for", Duration::from_secs(15)),
        "{}",
        server.log()
    );
    drop(a);
    // Another key from the same host is not banned.
    let _b = bed.start_client(0, &tls.client_args(1));
    assert!(wait_until(STARTUP, || {
        svpnctl_json(&bed.server_socket(), &["peers"])[0]["key"] == b_pub.as_str()
    }));
}

#[test]
fn a_banned_key_is_listed_unbanned_and_connects_again() {
    if !require_root("a_banned_key_is_listed_unbanned_and_connects_again") {
        return;
    }
    let bed = Bed::new("tlsunban", 1);
    let tls = Tls::new(&bed, &["a"]);
    let a_pub = &tls.clients[0].public;
    let server = bed.start_server(&tls.server_args());
    let a = bed.start_client(0, &tls.client_args(0));
    let socket = bed.server_socket();
    let ok = |args: &[&str]| {
        let out = svpnctl(&socket, args, None);
        assert!(
            out.status.success(),
            "svpnctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A reason too long, or not printable, is refused before anything is done.
    let long = "x".repeat(201);
    for bad in [long.as_str(), "two\nlines"] {
        let out = svpnctl(
            &socket,
            &["kick", "198.19.0.2", "--ban", "1h", "--reason", bad],
            None,
        );
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("ban reason"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(svpnctl_json(&socket, &["bans"]) == serde_json::json!([]));
    ok(&[
        "kick",
        "198.19.0.2",
        "--ban",
        "1h",
        "--reason",
        "200 logins a minute",
    ]);
    assert!(
        server.wait_for_log("refused reason=banned for", Duration::from_secs(15)),
        "{}",
        server.log()
    );
    // Listed, by key, for about an hour.
    let bans = svpnctl_json(&socket, &["bans"]);
    assert_eq!(bans[0]["key"], a_pub.as_str(), "{bans}");
    // Why: who kicked (the test runs as root) and their words.
    assert_eq!(
        bans[0]["reason"], "kicked by uid 0: 200 logins a minute",
        "{bans}"
    );
    let table = ok(&["bans"]);
    assert!(table.contains(&format!("key {a_pub}")), "{table}");
    assert!(
        table.lines().next().is_some_and(|h| h.contains("REASON")),
        "{table}"
    );
    assert!(
        table.contains("kicked by uid 0: 200 logins a minute"),
        "{table}"
    );
    // Lifted: gone from the list, and the client is back.
    assert!(ok(&["unban", a_pub]).contains("unbanned"));
    assert_eq!(svpnctl_json(&socket, &["bans"]), serde_json::json!([]));
    assert!(
        wait_until(Duration::from_secs(20), || {
            svpnctl_json(&socket, &["peers"])[0]["key"] == a_pub.as_str()
        }),
        "the unbanned key did not come back:\n{}",
        a.log()
    );
    // A second unban finds nothing, said as JSON under --json.
    let out = svpnctl(&socket, &["--json", "unban", a_pub], None);
    assert_eq!(out.status.code(), Some(1));
    let error: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("a JSON error on stdout");
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("not banned")),
        "{error}"
    );
    // The peers table names its peers.
    let table = ok(&["peers"]);
    assert!(
        table.lines().next().is_some_and(|h| h.contains("NAME")),
        "{table}"
    );
}

#[test]
fn peer_new_makes_a_client_config_that_connects_and_is_listed_by_name() {
    if !require_root("peer_new_makes_a_client_config_that_connects_and_is_listed_by_name") {
        return;
    }
    let bed = Bed::new("tlsnew", 1);
    let (server_key, server_pub) = keygen(&bed, "server");
    let endpoint = bed.server_addr(0).to_string();
    let _server = bed.start_server(&["--key", &server_key, "--endpoint", &endpoint]);
    let socket = bed.server_socket();
    // Printed: a whole [client] config with the server's key and endpoint.
    let out = svpnctl(&socket, &["peer", "new", "phone"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        printed.contains(&format!("server = \"{endpoint}\"")),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("server_key = \"{server_pub}\"")),
        "{printed}"
    );
    assert!(printed.contains("private_key = \""), "{printed}");
    // Written to a file (0600), copied to the client, started: it connects
    // over TLS and the server lists it by name.
    let config = bed.path("laptop.toml");
    let out = svpnctl(
        &socket,
        &["peer", "new", "laptop", "--output", &config],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config)
        .expect("config")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let client = bed.start_client(0, &["--config", &config]);
    // Names belong to TLS peers: listed by its name, it came in over TLS.
    let _client = client;
    let peers = svpnctl_json(&socket, &["peers"]);
    assert_eq!(peers[0]["name"], "laptop", "{peers}");
    let table = String::from_utf8_lossy(&svpnctl(&socket, &["peers"], None).stdout).into_owned();
    assert!(table.contains("laptop"), "{table}");
    // The same file again is refused, and changes nothing.
    let out = svpnctl(
        &socket,
        &["peer", "new", "other", "--output", &config],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let allowed = svpnctl_json(&socket, &["peer", "list"]);
    assert!(
        !allowed.to_string().contains("\"other\""),
        "a refused peer new still allowed a key: {allowed}"
    );
}
