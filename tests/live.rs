//! Operating a server live (issue #14), end to end: peers added and removed
//! with svpnctl while others move data, reload (svpnctl and SIGHUP) of a
//! good and of a broken file, state (leases, bans, live peers) across a
//! restart, and /metrics checked with the reference Prometheus parser.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::vpn::*;
use common::{require_root, wait_until, Daemon, Netns};
use nix::sys::signal::Signal;
use serde_json::Value;

/// The peer at `address` in `svpnctl --json peers`, if listed.
fn listed(bed: &Bed, address: Ipv4Addr) -> Option<Value> {
    let peers = svpnctl_json(&bed.server_socket(), &["peers"]);
    peers
        .as_array()
        .and_then(|peers| {
            peers
                .iter()
                .find(|p| p["address"] == address.to_string().as_str())
        })
        .cloned()
}

/// The address the server lists for key `key`.
fn address_of(bed: &Bed, key: &str) -> Option<Ipv4Addr> {
    let peers = svpnctl_json(&bed.server_socket(), &["peers"]);
    peers.as_array()?.iter().find_map(|p| {
        (p["key"] == key)
            .then(|| p["address"].as_str()?.parse().ok())
            .flatten()
    })
}

/// `svpnctl ARGS` as root, which must succeed; its stdout.
fn ctl_ok(bed: &Bed, args: &[&str]) -> String {
    let out = svpnctl(&bed.server_socket(), args, None);
    assert!(
        out.status.success(),
        "svpnctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP stream from `from` to `to` at `target` that sends until `stop` is
/// set, then half-closes; the listener answers with the byte count it read.
/// Returns (sent, counted by the listener).
fn stream_until(from: &Netns, to: &Netns, target: SocketAddr, stop: &AtomicBool) -> (u64, u64) {
    let listener = to.tcp_listen(target).expect("listen in the tunnel");
    std::thread::scope(|scope| {
        let sink = scope.spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                match conn.read(&mut buf).expect("read at the listener") {
                    0 => break,
                    n => total += n as u64,
                }
            }
            conn.write_all(&total.to_be_bytes()).expect("answer");
            total
        });
        let mut conn = from
            .tcp_connect(target, STARTUP)
            .expect("connect through the tunnel");
        conn.set_write_timeout(Some(STARTUP)).expect("timeout");
        conn.set_read_timeout(Some(STARTUP)).expect("timeout");
        let chunk = vec![0x5au8; 16 * 1024];
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            conn.write_all(&chunk).expect("the stream broke");
            sent += chunk.len() as u64;
        }
        conn.shutdown(Shutdown::Write).expect("half-close");
        let mut answer = [0u8; 8];
        conn.read_exact(&mut answer).expect("the listener's count");
        let counted = sink.join().expect("sink thread");
        assert_eq!(u64::from_be_bytes(answer), counted);
        (sent, counted)
    })
}

#[test]
fn peers_join_and_leave_live_while_another_moves_data() {
    if !require_root("peers_join_and_leave_live_while_another_moves_data") {
        return;
    }
    let bed = Bed::new("livepeer", 2);
    let tls = Tls::new(&bed, &["a", "b"]);
    let server_key = &tls.server.path;
    let a_pub = &tls.clients[0].public;
    let b_pub = &tls.clients[1].public;
    let server = bed.start_server(&["--key", server_key, "--peer", a_pub]);
    let _a = bed.start_client(0, &tls.client_args(0));
    let a = address_of(&bed, a_pub).expect("A listed");
    let a_since = listed(&bed, a).expect("A")["connected_since"].clone();

    let stop = AtomicBool::new(false);
    let target = SocketAddr::from((SERVER_TUNNEL, 6100));
    let (sent, counted) = std::thread::scope(|scope| {
        let stream = scope.spawn(|| stream_until(&bed.clients[0], &bed.server, target, &stop));
        // The stream is under way before B is added.
        std::thread::sleep(Duration::from_millis(500));
        let added = ctl_ok(&bed, &["peer", "add", b_pub, "--name", "bee"]);
        assert!(added.contains("added"), "{added}");
        let b = bed.start_client(1, &tls.client_args(1));
        let b_address = address_of(&bed, b_pub).expect("B listed");
        tcp_round_trip(&bed.clients[1], &bed.server, SERVER_TUNNEL, 6101, 256 << 10);

        let list = svpnctl_json(&bed.server_socket(), &["peer", "list"]);
        let list = list.as_array().expect("array");
        let entry = |key: &str| {
            list.iter()
                .find(|p| p["key"] == key)
                .unwrap_or_else(|| panic!("{key} not in peer list: {list:?}"))
                .clone()
        };
        assert_eq!(entry(a_pub)["source"], "config");
        assert_eq!(entry(a_pub)["connected"], true);
        assert_eq!(entry(b_pub)["source"], "live");
        assert_eq!(entry(b_pub)["name"], "bee");
        assert_eq!(entry(b_pub)["connected"], true);

        // Removing B closes its connection at once; its key is refused then.
        let start = Instant::now();
        ctl_ok(&bed, &["peer", "remove", "bee"]);
        assert!(
            wait_until(Duration::from_secs(2), || listed(&bed, b_address).is_none()),
            "B still connected 2 s after peer remove:\n{}",
            server.log()
        );
        let closed_after = start.elapsed();
        assert!(
            server.wait_for_log(&format!("unknown client key {b_pub}"), STARTUP),
            "B's key was not refused after removal:\n{}",
            server.log()
        );
        assert!(
            b.wait_for_log("the server rejected this client", STARTUP),
            "{}",
            b.log()
        );
        let list = svpnctl_json(&bed.server_socket(), &["peer", "list"]);
        assert_eq!(list.as_array().expect("array").len(), 1, "{list}");
        // A config peer cannot be removed live.
        let out = svpnctl(&bed.server_socket(), &["peer", "remove", a_pub], None);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("config file"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("B closed {closed_after:?} after peer remove");
        stop.store(true, Ordering::Relaxed);
        stream.join().expect("A's stream")
    });
    assert!(sent > 0);
    assert_eq!(sent, counted, "every byte A sent arrived");
    let a_after = listed(&bed, a).expect("A still connected");
    assert_eq!(
        a_after["connected_since"], a_since,
        "A was never reconnected"
    );
    assert_eq!(a_after["key"], a_pub.as_str());
}

#[test]
fn reload_applies_a_changed_file_and_refuses_a_broken_one() {
    if !require_root("reload_applies_a_changed_file_and_refuses_a_broken_one") {
        return;
    }
    let bed = Bed::new("livereload", 2);
    let tls = Tls::new(&bed, &["a", "b"]);
    let server_key = &tls.server.path;
    let a_pub = &tls.clients[0].public;
    let b_pub = &tls.clients[1].public;
    let config = bed.path("server.toml");
    let peer =
        |key: &str, name: &str| format!("[[server.peer]]\nkey = \"{key}\"\nname = \"{name}\"\n");
    // The network in the file (so that a reload reads it), the bed's own.
    let head = format!("[server]\nkey = \"{server_key}\"\nnetwork = \"{NETWORK}\"\n");
    std::fs::write(&config, format!("{head}{}", peer(a_pub, "a"))).expect("config");
    let server = bed.start_server(&["--config", &config]);
    let a_client = bed.start_client(0, &tls.client_args(0));
    let a = address_of(&bed, a_pub).expect("A listed");
    let a_since = listed(&bed, a).expect("A")["connected_since"].clone();

    // B is added to the file, and a DNS server: after a reload B joins and
    // gets the DNS server, A undisturbed and sent it.
    let dns = "dns = [\"198.18.0.53\"]\n";
    std::fs::write(
        &config,
        format!("{head}{dns}{}{}", peer(a_pub, "a"), peer(b_pub, "b")),
    )
    .expect("config");
    let report = svpnctl_json(&bed.server_socket(), &["reload"]);
    assert_eq!(report["added"], serde_json::json!(["b"]), "{report}");
    assert_eq!(report["disconnected"], 0, "{report}");
    assert_eq!(report["offer_changed"], true, "{report}");
    let b = bed.start_client(1, &tls.client_args(1));
    tcp_round_trip(&bed.clients[1], &bed.clients[0], a, 6200, 256 << 10);
    for (name, client) in [
        ("B, connected after", &b),
        ("A, connected before", &a_client),
    ] {
        assert!(
            client.wait_for_log("198.18.0.53", STARTUP),
            "{name} the reload never got the new DNS server:\n{}",
            client.log()
        );
    }
    let head = format!("{head}{dns}");

    // A broken file is refused with the field named; everything stays.
    std::fs::write(&config, format!("{head}netwrok = \"198.19.0.0/16\"\n")).expect("config");
    let out = svpnctl(&bed.server_socket(), &["reload"], None);
    assert!(!out.status.success(), "a broken file was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("netwrok"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        server.wait_for_log("reload refused", STARTUP),
        "{}",
        server.log()
    );
    // A setting that needs a restart is named in the refusal.
    let without_network = head.replace(&format!("network = \"{NETWORK}\"\n"), "");
    for (field, changed) in [
        ("listen", format!("{head}listen = \"0.0.0.0:2003\"\n")),
        (
            "network",
            format!("{without_network}network = \"198.19.0.0/24\"\n"),
        ),
    ] {
        let text = format!("{changed}{}{}", peer(a_pub, "a"), peer(b_pub, "b"));
        std::fs::write(&config, text).expect("config");
        let out = svpnctl(&bed.server_socket(), &["reload"], None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(field),
            "{field}: {stderr}"
        );
    }
    tcp_round_trip(&bed.clients[0], &bed.server, SERVER_TUNNEL, 6201, 256 << 10);

    // SIGHUP: B leaves the file, so B is disconnected; A is not touched.
    std::fs::write(&config, format!("{head}{}", peer(a_pub, "a"))).expect("config");
    server.signal(Signal::SIGHUP);
    assert!(
        server.wait_for_log("disconnected: no longer allowed", STARTUP),
        "{}",
        server.log()
    );
    assert!(
        b.wait_for_log("the server rejected this client", STARTUP),
        "{}",
        b.log()
    );
    assert!(address_of(&bed, b_pub).is_none());
    let a_after = listed(&bed, a).expect("A still connected");
    assert_eq!(
        a_after["connected_since"], a_since,
        "A was never reconnected"
    );
    tcp_round_trip(&bed.clients[0], &bed.server, SERVER_TUNNEL, 6202, 256 << 10);
}

/// Stops `daemon` (SIGTERM) and asserts that it exited.
fn stop(daemon: &mut Daemon) {
    assert!(
        daemon.terminate(STARTUP).is_some(),
        "did not stop:\n{}",
        daemon.log()
    );
}

#[test]
fn leases_bans_and_live_peers_survive_a_restart() {
    if !require_root("leases_bans_and_live_peers_survive_a_restart") {
        return;
    }
    let bed = Bed::new("livestate", 2);
    let tls = Tls::new(&bed, &["a", "b", "x"]);
    let server_key = &tls.server.path;
    let a_pub = &tls.clients[0].public;
    let b_pub = &tls.clients[1].public;
    let x_pub = &tls.clients[2].public;
    let flags = ["--key", server_key, "--peer", a_pub, "--peer", x_pub];
    let mut server = bed.start_server(&flags);
    ctl_ok(&bed, &["peer", "add", b_pub]);

    // B first (the lowest address), then A (the next one): A's address is
    // one that a fresh allocation would not give it if B were away.
    let mut b = bed.start_client(1, &tls.client_args(1));
    let b_address = address_of(&bed, b_pub).expect("B");
    let mut a = bed.start_client(0, &tls.client_args(0));
    let a_address = address_of(&bed, a_pub).expect("A");
    assert!(a_address > b_address);
    stop(&mut a);

    // X connects and is banned for an hour.
    let mut x = bed.start_client(0, &tls.client_args(2));
    let x_address = address_of(&bed, x_pub).expect("X");
    assert_ne!(x_address, a_address, "A's address is kept for A while away");
    ctl_ok(
        &bed,
        &[
            "kick",
            &x_address.to_string(),
            "--ban",
            "1h",
            "--reason",
            "lost laptop",
        ],
    );
    stop(&mut x);
    stop(&mut b);

    // The restart: the state file is all that connects the two servers.
    stop(&mut server);
    let state = std::path::Path::new(&bed.state_dir()).join("state.db");
    assert!(state.is_file(), "no state file at {}", state.display());
    let server = bed.start_server(&flags);

    // A asks for any address and gets the one it had.
    let mut a = bed.start_client(0, &tls.client_args(0));
    assert_eq!(address_of(&bed, a_pub), Some(a_address), "{}", server.log());
    stop(&mut a);
    // X is still banned.
    let x = bed.spawn_client(0, &tls.client_args(2));
    assert!(
        server.wait_for_log("banned for", STARTUP),
        "X was not refused after the restart:\n{}",
        server.log()
    );
    assert!(!x.log().contains("granted"), "{}", x.log());
    drop(x);
    // And its reason was kept with it.
    let bans = svpnctl_json(&bed.server_socket(), &["bans"]);
    assert_eq!(bans[0]["key"], x_pub.as_str(), "{bans}");
    assert_eq!(bans[0]["reason"], "kicked by uid 0: lost laptop", "{bans}");
    // B, added live before the restart, is still allowed, at its address.
    let _b = bed.start_client(1, &tls.client_args(1));
    assert_eq!(address_of(&bed, b_pub), Some(b_address));
    let list = svpnctl_json(&bed.server_socket(), &["peer", "list"]);
    let live: Vec<&Value> = list
        .as_array()
        .expect("array")
        .iter()
        .filter(|p| p["source"] == "live")
        .collect();
    assert_eq!(live.len(), 1, "{list}");
    assert_eq!(live[0]["key"], b_pub.as_str());
    // The file is a plain SQLite database, owned by the daemon's user.
    let meta = std::fs::metadata(&state).expect("state file");
    let nobody = nix::unistd::User::from_name(USER)
        .expect("user database")
        .expect("user");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.uid(), nobody.uid.as_raw());
}

/// The Python with the reference parser (scripts/deps installs it), if any.
fn python_with_parser() -> Option<&'static str> {
    ["python3", "/usr/bin/python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import prometheus_client.openmetrics.parser"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Parses `text` with the reference OpenMetrics parser: every sample as
/// (name, labels, value).
fn parse_metrics(python: &str, text: &str) -> Vec<(String, serde_json::Map<String, Value>, f64)> {
    let script = "import sys, json\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        out = []\n\
        for family in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in family.samples:\n\
        \x20       out.append([s.name, s.labels, s.value])\n\
        print(json.dumps(out))\n";
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed the parser");
    let out = child.wait_with_output().expect("parser");
    assert!(
        out.status.success(),
        "the reference parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, serde_json::Map<String, Value>, f64)> =
        serde_json::from_slice(&out.stdout).expect("parser output");
    samples
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(
    samples: &[(String, serde_json::Map<String, Value>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k) == Some(&Value::from(*v)))
        })
        .map(|(_, _, v)| *v)
}

#[test]
fn metrics_parse_and_move_with_traffic() {
    if !require_root("metrics_parse_and_move_with_traffic") {
        return;
    }
    let Some(python) = python_with_parser() else {
        let why = "python3 with prometheus_client is missing: run scripts/deps";
        assert!(std::env::var("CI").is_err(), "{why}");
        eprintln!("skipping metrics_parse_and_move_with_traffic: {why}");
        return;
    };
    let bed = Bed::new("livemetric", 1);
    let tls = Tls::new(&bed, &["a"]);
    let server_key = &tls.server.path;
    let a_pub = &tls.clients[0].public;
    let config = bed.path("server.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nkey = \"{server_key}\"\n[[server.peer]]\nkey = \"{a_pub}\"\nname = \"alpha\"\n\
             [metrics]\nlisten = \"127.0.0.1:9102\"\n"
        ),
    )
    .expect("config");
    let server = bed.start_server(&["--config", &config]);
    let endpoint = SocketAddr::from(([127, 0, 0, 1], 9102));
    let (status, body) = scrape(&bed.server, endpoint);
    assert!(status.contains("200"), "{status}");
    let before = parse_metrics(python, &body);
    assert_eq!(sample(&before, "simplevpn_peers_connected", &[]), Some(0.0));
    assert_eq!(
        sample(&before, "simplevpn_free_addresses", &[]),
        Some(65533.0)
    );

    let _a = bed.start_client(0, &tls.client_args(0));
    tcp_round_trip(&bed.clients[0], &bed.server, SERVER_TUNNEL, 6300, 1 << 20);
    let (_, body) = scrape(&bed.server, endpoint);
    let after = parse_metrics(python, &body);
    let peer = [("peer", "alpha")];
    assert_eq!(
        sample(&after, "simplevpn_peers_connected", &[]),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&after, "simplevpn_free_addresses", &[]),
        Some(65532.0)
    );
    assert_eq!(
        sample(&after, "simplevpn_grants_total", &[]),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&after, "simplevpn_handshake_duration_seconds_count", &[]),
        Some(1.0)
    );
    let rx = sample(&after, "simplevpn_peer_rx_bytes_total", &peer).expect("rx of alpha");
    let tx = sample(&after, "simplevpn_peer_tx_bytes_total", &peer).expect("tx of alpha");
    assert!(rx > f64::from(1u32 << 20), "rx {rx}:\n{body}");
    assert!(tx > f64::from(1u32 << 20), "tx {tx}:\n{body}");
    assert!(sample(&after, "simplevpn_peer_rx_packets_total", &peer).is_some_and(|p| p > 10.0));
    assert!(sample(&after, "simplevpn_drops_total", &[("reason", "spoofed")]).is_some());

    // A kick is a disconnect by reason.
    let a = address_of(&bed, a_pub).expect("A");
    ctl_ok(&bed, &["kick", &a.to_string()]);
    assert!(
        wait_until(STARTUP, || {
            let (_, body) = scrape(&bed.server, endpoint);
            let samples = parse_metrics(python, &body);
            sample(
                &samples,
                "simplevpn_disconnects_total",
                &[("reason", "kicked")],
            ) == Some(1.0)
        }),
        "{}",
        server.log()
    );
    // Anything but /metrics is not found.
    let mut conn = bed.server.tcp_connect(endpoint, STARTUP).expect("connect");
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("response");
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");

    // A connection that sends nothing does not keep a place: it is closed
    // once the header timeout has passed (5 s; 15 s allowed here).
    let mut idle = bed.server.tcp_connect(endpoint, STARTUP).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    // Closed (or answered with a timeout status, then closed): not held.
    if let Err(e) = idle.read(&mut byte) {
        panic!("an idle metrics connection was still open after 15 s: {e}");
    }
    // More than 64 at once: the ones beyond are closed at once, and the
    // endpoint still answers when they are gone.
    let held: Vec<_> = (0..64)
        .map(|_| bed.server.tcp_connect(endpoint, STARTUP).expect("connect"))
        .collect();
    let mut over = bed.server.tcp_connect(endpoint, STARTUP).expect("connect");
    over.set_read_timeout(Some(Duration::from_secs(4)))
        .expect("timeout");
    assert!(
        matches!(over.read(&mut byte), Ok(0)),
        "the 65th metrics connection was not closed"
    );
    drop(held);
    assert!(wait_until(STARTUP, || scrape(&bed.server, endpoint)
        .0
        .contains("200")));
}
