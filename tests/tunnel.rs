//! Real `simplevpnd` server and clients in network namespaces: TCP through
//! the tunnel between clients and with the server, restarts, shutdown, and
//! the command line's errors.

mod common;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use common::vpn::*;
use common::{require_root, wait_until, Netns};

const CLIENT_A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const CLIENT_B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 50);

fn tun_address(ns: &Netns) -> Option<(Ipv4Addr, u8)> {
    ns.ipv4_addrs(TUN).first().copied()
}

#[test]
fn traffic_between_clients_and_with_the_server() {
    if !require_root("traffic_between_clients_and_with_the_server") {
        return;
    }
    let bed = Bed::new("traffic", 2);
    let _server = bed.start_server(&[]);
    let _a = bed.start_client(0, &[]);
    let _b = bed.start_client(1, &["-a", "198.19.0.50"]);
    let (a_ns, b_ns) = (&bed.clients[0], &bed.clients[1]);
    // The server pushed its /16; the clients configured it.
    assert_eq!(tun_address(a_ns), Some((CLIENT_A, 16)));
    assert_eq!(tun_address(b_ns), Some((CLIENT_B, 16)));
    assert_eq!(tun_address(&bed.server), Some((SERVER_TUNNEL, 16)));

    // Client to client (through the server), both small and 4 MiB.
    tcp_round_trip(a_ns, b_ns, CLIENT_B, 5000, 100);
    tcp_round_trip(a_ns, b_ns, CLIENT_B, 5001, 4 << 20);
    tcp_round_trip(b_ns, a_ns, CLIENT_A, 5002, 4 << 20);
    // Client to the server's own tunnel address, and the server to a client.
    tcp_round_trip(a_ns, &bed.server, SERVER_TUNNEL, 5003, 1 << 20);
    tcp_round_trip(&bed.server, b_ns, CLIENT_B, 5004, 1 << 20);
}

#[test]
fn clients_keep_their_addresses_across_a_server_restart() {
    if !require_root("clients_keep_their_addresses_across_a_server_restart") {
        return;
    }
    let bed = Bed::new("restart", 2);
    let mut server = bed.start_server(&[]);
    // B first, so A's address is not the lowest free one.
    let b = bed.start_client(1, &[]);
    let a = bed.start_client(0, &[]);
    let (a_ns, b_ns) = (&bed.clients[0], &bed.clients[1]);
    let a_addr = Ipv4Addr::new(198, 19, 0, 3);
    assert_eq!(tun_address(a_ns), Some((a_addr, 16)));
    assert_eq!(tun_address(b_ns), Some((CLIENT_A, 16)));

    server.kill();
    assert!(
        a.wait_for_log("reconnecting", STARTUP),
        "A noticed nothing:\n{}",
        a.log()
    );
    let _server = bed.start_server(&[]);
    let granted_twice = |d: &common::Daemon| d.log().matches("granted").count() >= 2;
    assert!(
        wait_until(Duration::from_secs(20), || granted_twice(&a)
            && granted_twice(&b)),
        "clients did not come back:\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    assert_eq!(tun_address(a_ns), Some((a_addr, 16)));
    assert_eq!(tun_address(b_ns), Some((CLIENT_A, 16)));
    tcp_round_trip(a_ns, b_ns, CLIENT_A, 5000, 1000);
}

#[test]
fn a_client_whose_old_address_was_taken_asks_for_any() {
    if !require_root("a_client_whose_old_address_was_taken_asks_for_any") {
        return;
    }
    let bed = Bed::new("taken", 2);
    let mut server = bed.start_server(&[]);
    let a = bed.start_client(0, &[]);
    assert_eq!(tun_address(&bed.clients[0]), Some((CLIENT_A, 16)));

    // While A is away, someone else takes its address.
    server.kill();
    assert!(a.wait_for_log("reconnecting", STARTUP), "{}", a.log());
    let _server = bed.start_server(&[]);
    let mut thief = bed.raw_peer(1);
    assert_eq!(thief.ask(&static_request(CLIENT_A)), grant_16(CLIENT_A));

    // A is refused its old address once, then asks for any and gets one.
    let other = Ipv4Addr::new(198, 19, 0, 3);
    assert!(
        wait_until(Duration::from_secs(20), || tun_address(&bed.clients[0])
            == Some((other, 16))),
        "A did not move on:\n{}",
        a.log()
    );
    assert!(a
        .log()
        .contains("refused the previous address; asking for any"));
}

#[test]
fn the_daemon_raises_its_open_file_limit() {
    if !require_root("the_daemon_raises_its_open_file_limit") {
        return;
    }
    let bed = Bed::new("nofile", 0);
    // Started with a soft limit of 1024 (systemd's default), as a server
    // with many clients would be.
    let socket = bed.server_socket();
    let server = bed.server.spawn(
        "prlimit",
        &[
            "--nofile=1024:",
            SIMPLEVPND,
            "server",
            "--network",
            NETWORK,
            "--legacy",
            "--user",
            USER,
            "--control",
            &socket,
            "--state-dir",
            &bed.state_dir(),
        ],
    );
    assert!(
        server.wait_for_log("server ready", STARTUP),
        "{}",
        server.log()
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid()))
        .expect("read /proc/PID/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open-files line");
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers.len(), 2, "{line}");
    assert_eq!(
        numbers[0], numbers[1],
        "soft limit not raised to the hard one: {line}"
    );
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_tun() {
    if !require_root("sigterm_stops_cleanly_and_removes_the_tun") {
        return;
    }
    let bed = Bed::new("sigterm", 1);
    let mut server = bed.start_server(&[]);
    let mut client = bed.start_client(0, &[]);
    assert!(bed.clients[0].link_exists(TUN));
    assert!(bed.server.link_exists(TUN));

    let status = client.terminate(STARTUP).expect("client exits on SIGTERM");
    assert!(
        status.success(),
        "client exit status {status}:\n{}",
        client.log()
    );
    assert!(!bed.clients[0].link_exists(TUN), "client tun left behind");
    assert!(
        server.wait_for_log("closed by peer", STARTUP),
        "{}",
        server.log()
    );

    // A connected peer does not hold up the server's shutdown.
    let _raw = bed.raw_peer(0);
    let status = server.terminate(STARTUP).expect("server exits on SIGTERM");
    assert!(
        status.success(),
        "server exit status {status}:\n{}",
        server.log()
    );
    assert!(!bed.server.link_exists(TUN), "server tun left behind");
}

/// The names of the threads of process `pid`, with the CPU ticks each used.
fn threads(pid: u32) -> Vec<(String, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/PID/task");
    tasks
        .filter_map(|task| {
            let dir = task.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            // After "(comm) ": state is field 0, utime 11, stime 12.
            let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
            let ticks =
                fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            Some((name.trim_end().to_string(), ticks))
        })
        .collect()
}

#[test]
fn a_server_with_two_workers_serves_two_clients_on_worker_threads() {
    if !require_root("a_server_with_two_workers_serves_two_clients_on_worker_threads") {
        return;
    }
    let bed = Bed::new("workers", 2);
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], 9103));
    let server = bed.start_server(&["--workers", "2", "--metrics", &metrics.to_string()]);
    // A tun queue per worker.
    for field in ["workers=2", "tun_queues=2"] {
        assert!(server.log().contains(field), "{field}: {}", server.log());
    }
    let _a = bed.start_client(0, &[]);
    let _b = bed.start_client(1, &["-a", "198.19.0.50"]);
    let (a_ns, b_ns) = (&bed.clients[0], &bed.clients[1]);
    std::thread::scope(|s| {
        s.spawn(|| tcp_round_trip(a_ns, &bed.server, SERVER_TUNNEL, 5010, 8 << 20));
        s.spawn(|| tcp_round_trip(b_ns, &bed.server, SERVER_TUNNEL, 5011, 8 << 20));
    });
    tcp_round_trip(a_ns, b_ns, CLIENT_B, 5012, 4 << 20);
    // The two clients wrote on different queues, so the server host's
    // answers to each were read from its own queue: both queues were read.
    let (_, body) = scrape(&bed.server, metrics);
    for queue in ["0", "1"] {
        let reads = body
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "simplevpn_tun_queue_reads_total{{queue=\"{queue}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok());
        assert!(
            reads.is_some_and(|n| n > 100),
            "queue {queue}: {reads:?}\n{body}"
        );
    }
    let all = threads(server.pid());
    let workers: Vec<_> = all
        .iter()
        .filter(|(name, _)| name == "svpn-worker")
        .collect();
    assert!(workers.len() >= 2, "fewer than 2 worker threads: {all:?}");
    // The packets went through the workers, not the main thread alone.
    let worker_ticks: u64 = workers.iter().map(|(_, ticks)| ticks).sum();
    assert!(worker_ticks > 0, "the workers did nothing: {all:?}");

    // One worker: today's single thread, no worker pool, one tun queue.
    drop(server);
    let server = bed.start_server(&["--workers", "1"]);
    assert!(server.log().contains("tun_queues=1"), "{}", server.log());
    let names = threads(server.pid());
    assert!(
        names.iter().all(|(name, _)| name != "svpn-worker"),
        "{names:?}"
    );
}

/// Runs simplevpnd with `args`; returns (exit code, stderr).
fn simplevpnd(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(SIMPLEVPND)
        .args(args)
        .output()
        .expect("run simplevpnd");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_finds_what_a_start_would_refuse_and_key_commands_never_read_the_config() {
    let dir = std::env::temp_dir().join(format!("svt-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write config");
        path.to_str().expect("utf-8").to_string()
    };
    let run = |args: &[&str], stdin: Option<&[u8]>| {
        let mut child = std::process::Command::new(SIMPLEVPND)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run simplevpnd");
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input)
                .expect("write stdin");
        }
        let out = child.wait_with_output().expect("wait");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let key = dir.join("client.key");
    let key = key.to_str().expect("utf-8");
    let (code, public, _) = run(&["keygen", key], None);
    assert_eq!(code, Some(0));
    let server = file(
        "server.toml",
        &format!("[server]\nnetwork = \"198.19.0.0/16\"\nlegacy = true\nuser = \"{USER}\"\n"),
    );
    let client = file(
        "client.toml",
        &format!(
            "[client]\nserver = \"198.18.1.1\"\nuser = \"{USER}\"\nkey = \"{key}\"\nserver_key = \"{}\"\n",
            public.trim()
        ),
    );
    for good in [&server, &client] {
        let (code, stdout, stderr) = run(&["check", "--config", good], None);
        assert_eq!(code, Some(0), "{good}: {stderr}");
        assert!(stdout.starts_with("ok: "), "{stdout}");
    }
    let typo = file(
        "typo.toml",
        "[server]\nlegacy = true\nnetwrok = \"198.19.0.0/16\"\n",
    );
    let bad_net = file(
        "net.toml",
        "[server]\nlegacy = true\n\nnetwork = \"198.19.0.1/16\"\n",
    );
    let no_key = file(
        "nokey.toml",
        &format!(
            "[server]\nuser = \"{USER}\"\nkey = \"{}/missing.key\"\n",
            dir.display()
        ),
    );
    for (bad, at) in [
        (&typo, ":3: netwrok"),
        (&bad_net, ":4: network"),
        (&no_key, ":3: key"),
    ] {
        let (code, _, stderr) = run(&["check", "--config", bad], None);
        assert_eq!(code, Some(2), "{bad}: {stderr}");
        assert!(
            stderr.contains(&format!("{bad}{at}")),
            "{bad} should name {at}: {stderr}"
        );
    }
    // keygen and pubkey never read the config: a broken one changes nothing.
    let broken = file("broken.toml", "[server\n");
    let second = dir.join("second.key");
    let (code, _, stderr) = run(
        &[
            "--config",
            &broken,
            "keygen",
            second.to_str().expect("utf-8"),
        ],
        None,
    );
    assert_eq!(code, Some(0), "{stderr}");
    // keygen - | pubkey -: the private key on stdout, its public key on
    // stderr, and pubkey reads it back from stdin.
    let (code, pem, public) = run(&["keygen", "-"], None);
    assert_eq!(code, Some(0));
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    let (code, again, stderr) = run(&["pubkey", "-"], Some(pem.as_bytes()));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(again.trim(), public.trim());
    assert!(!dir.join("-").exists(), "keygen - made a file named -");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_flags_and_config_exit_2_with_one_line_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("svt-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write config");
        path.to_str().expect("utf-8").to_string()
    };
    let unknown = file(
        "unknown.toml",
        "[server]\nlisten = \"0.0.0.0:2002\"\nnetwrok = \"198.19.0.0/16\"\n",
    );
    let bad_value = file("bad.toml", "[server]\nclient_timeout = \"soon\"\n");
    let no_workers = file("workers.toml", "[server]\nlegacy = true\nworkers = 0\n");
    let both = file("both.toml", "[server]\n[client]\nserver = \"198.18.1.1\"\n");
    let missing = dir
        .join("missing.toml")
        .to_str()
        .expect("utf-8")
        .to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["server", "--network", "198.19.0.0/33"], "--network"),
        (vec!["server", "--network", "198.19.0.0/31"], "network"),
        (vec!["server", "--listen", "nowhere"], "--listen"),
        (vec!["server", "--client-timeout", "0"], "client_timeout"),
        (vec!["server", "--tun", "a-much-too-long-name"], "tun"),
        (vec!["server", "--legacy", "--workers", "0"], "workers"),
        (vec!["server", "--legacy", "--workers", "1025"], "workers"),
        (vec!["server", "--config", &no_workers], "workers"),
        (vec!["client"], "server"),
        (vec!["client", "-s", "198.18.1.1:99999"], "server"),
        (
            vec!["client", "-s", "198.18.1.1", "-a", "198.19.0"],
            "--address",
        ),
        (vec!["server", "--config", &unknown], "netwrok"),
        (vec!["server", "--config", &bad_value], "client_timeout"),
        (vec!["--config", &both], "both [server] and [client]"),
        (vec!["server", "--config", &missing], "missing.toml"),
        (vec!["--bogus"], "--bogus"),
        // Metrics name every peer: not on the network without saying so.
        (
            vec!["server", "--legacy", "--metrics", "0.0.0.0:9100"],
            "--metrics-public",
        ),
        // A client without a key: never a silent fallback to plaintext.
        (vec!["client", "-s", "198.18.1.1"], "simplevpnd keygen"),
    ];
    for (args, names) in cases {
        let (code, stderr) = simplevpnd(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains(names),
            "{args:?} should name {names}: {stderr}"
        );
    }
    let (code, _) = simplevpnd(&["--help"]);
    assert_eq!(code, Some(0));
    std::fs::remove_dir_all(&dir).ok();
}
