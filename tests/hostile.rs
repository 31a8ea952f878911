//! The server on the open internet (issue #15): floods of connections that
//! never authenticate, from one source and from many, junk on a legacy
//! server, one key used on two hosts at once, and a tun deleted under a
//! running daemon. Real daemons in namespaces; every load loop is bounded in
//! count and time.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::vpn::*;
use common::{require_root, wait_until};

/// How long a slot of the flood waits before re-opening a closed connection.
const REOPEN_AFTER: Duration = Duration::from_millis(300);

/// Raises this process's open-file limit to its hard limit: a flood holds
/// hundreds of sockets.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// A TCP connection from `source` to `server` (blocking connect, at most 1 s).
fn connect_from(source: Ipv4Addr, server: SocketAddr) -> Option<TcpStream> {
    use nix::libc;
    use std::os::fd::{FromRawFd, OwnedFd};
    let SocketAddr::V4(server) = server else {
        return None;
    };
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a new fd that the OwnedFd then owns; the
    // addresses passed are valid sockaddr_in values that outlive the calls.
    unsafe {
        let raw = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if raw < 0 {
            return None;
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let local = sockaddr(SocketAddrV4::new(source, 0));
        if libc::bind(
            fd.as_raw_fd(),
            (&local as *const libc::sockaddr_in).cast(),
            len,
        ) != 0
        {
            return None;
        }
        let remote = sockaddr(server);
        if libc::connect(
            fd.as_raw_fd(),
            (&remote as *const libc::sockaddr_in).cast(),
            len,
        ) != 0
        {
            return None;
        }
        let stream = TcpStream::from(fd);
        stream.set_nonblocking(true).ok()?;
        Some(stream)
    }
}

/// Whether the server closed `stream` (or reset it).
fn closed(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    let mut reader = stream;
    match reader.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    }
}

/// What a flood did.
#[derive(Debug, Default)]
struct Flooded {
    /// Connections opened.
    opened: AtomicUsize,
    /// Connections the server closed.
    closed: AtomicUsize,
}

/// Keeps `per_source` idle connections from each of `sources` open to
/// `server`, re-opening each [`REOPEN_AFTER`] after the server closes it,
/// until `stop` is set or `limit` has passed. Call it inside the namespace
/// that holds `sources`.
fn flood(
    sources: &[Ipv4Addr],
    per_source: usize,
    server: SocketAddr,
    limit: Duration,
    stop: &AtomicBool,
    flooded: &Flooded,
) {
    let end = Instant::now() + limit;
    let mut slots: Vec<(Ipv4Addr, Option<TcpStream>, Instant)> = sources
        .iter()
        .flat_map(|s| std::iter::repeat_n(*s, per_source))
        .map(|s| (s, None, Instant::now()))
        .collect();
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        for (source, stream, reopen_at) in &mut slots {
            match stream {
                Some(open) if closed(open) => {
                    *stream = None;
                    *reopen_at = now + REOPEN_AFTER;
                    flooded.closed.fetch_add(1, Ordering::Relaxed);
                }
                Some(_) => {}
                None if now >= *reopen_at => {
                    *stream = connect_from(*source, server);
                    match stream {
                        Some(_) => flooded.opened.fetch_add(1, Ordering::Relaxed),
                        None => 0,
                    };
                    *reopen_at = now + REOPEN_AFTER;
                }
                None => {}
            }
            if Instant::now() >= end || stop.load(Ordering::Relaxed) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lines of `log` that contain `needle`.
fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn idle_connections_from_one_source_do_not_lock_out_a_real_client() {
    if !require_root("idle_connections_from_one_source_do_not_lock_out_a_real_client") {
        return;
    }
    raise_open_file_limit();
    let bed = Bed::new("flood1", 2);
    let tls = Tls::new(&bed, &["b"]);
    let server = bed.start_server(&tls.server_args());
    let stop = AtomicBool::new(false);
    let flooded = Flooded::default();
    let attacker = Ipv4Addr::new(198, 18, 1, 2);
    std::thread::scope(|s| {
        s.spawn(|| {
            bed.clients[0].enter(|| {
                flood(
                    &[attacker],
                    300,
                    bed.server_addr(0),
                    Duration::from_secs(25),
                    &stop,
                    &flooded,
                )
            })
        });
        // Let the flood fill what it can first.
        assert!(wait_until(Duration::from_secs(10), || {
            flooded.opened.load(Ordering::Relaxed) >= 300
        }));
        let started = Instant::now();
        let client = bed.spawn_client(1, &tls.client_args(0));
        let granted = client.wait_for_log("granted", Duration::from_secs(15));
        let took = started.elapsed();
        // The idle connections that got in are cut off by the first-bytes
        // timeout, and re-opened: the flood goes on.
        let cut_off = server.wait_for_log("first-bytes timeout", Duration::from_secs(5));
        stop.store(true, Ordering::Relaxed);
        assert!(granted, "no grant within 15 s:\n{}", client.log());
        assert!(cut_off, "{}", server.log());
        eprintln!("granted after {took:?} while flooded: {flooded:?}");
    });
    assert!(flooded.closed.load(Ordering::Relaxed) >= 300, "{flooded:?}");
    let log = server.log();
    assert!(log.contains("kind=per_source_cap"), "{log}");
    assert!(
        count(&log, "refused") < 20,
        "refusals are summarised, not logged one by one:\n{log}"
    );
}

#[test]
fn a_flood_from_many_sources_hits_the_global_cap_and_is_summarised() {
    if !require_root("a_flood_from_many_sources_hits_the_global_cap_and_is_summarised") {
        return;
    }
    raise_open_file_limit();
    let bed = Bed::new("flood300", 1);
    let (server_key, _) = keygen(&bed, "server");
    let config = bed.path("server.toml");
    // Two /24s: without a per-network limit as large as the global one,
    // they would hit that limit first.
    std::fs::write(
        &config,
        "[server]\nmax_unauthenticated = 128\nmax_unauthenticated_per_network = 128\n",
    )
    .expect("config");
    // 300 sources: 198.18.1.10-250 and 198.18.3.2-60 on the attacker's veth,
    // 198.18.3.1/24 added on the server's side of it.
    let server_dev = veth_with(&bed.server, "198.18.1.1/24");
    bed.server
        .ip(&["addr", "add", "198.18.3.1/24", "dev", &server_dev]);
    let client_dev = veth_with(&bed.clients[0], "198.18.1.2/24");
    let mut sources: Vec<Ipv4Addr> = (10..=250).map(|i| Ipv4Addr::new(198, 18, 1, i)).collect();
    sources.extend((2..=60).map(|i| Ipv4Addr::new(198, 18, 3, i)));
    assert_eq!(sources.len(), 300);
    for source in &sources {
        let prefix = format!("{source}/24");
        bed.clients[0].ip(&["addr", "add", &prefix, "dev", &client_dev]);
    }
    let server = bed.start_server(&["--config", &config, "--key", &server_key]);
    let stop = AtomicBool::new(false);
    let flooded = Flooded::default();
    let flood_for = Duration::from_secs(12);
    bed.clients[0].enter(|| flood(&sources, 1, bed.server_addr(0), flood_for, &stop, &flooded));
    eprintln!("{flooded:?}");
    assert!(flooded.opened.load(Ordering::Relaxed) >= 300);
    assert!(
        wait_until(Duration::from_secs(5), || server
            .log()
            .contains("global_cap=")),
        "{}",
        server.log()
    );
    let log = server.log();
    let summaries = count(&log, "connections in the last");
    assert!((1..=3).contains(&summaries), "one summary per 10 s:\n{log}");
    assert!(count(&log, "refused") <= 10, "{log}");
    assert!(log.contains("kind=global_cap"), "{log}");
}

/// The veth in `ns` that holds `cidr`.
fn veth_with(ns: &common::Netns, cidr: &str) -> String {
    let out = ns.ip(&["-o", "-4", "addr", "show"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains(cidr))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|dev| dev.split('@').next().unwrap_or(dev).to_string())
        .unwrap_or_else(|| panic!("no device with {cidr}:\n{text}"))
}

#[test]
fn junk_on_a_legacy_server_is_closed_within_the_first_bytes_timeout() {
    if !require_root("junk_on_a_legacy_server_is_closed_within_the_first_bytes_timeout") {
        return;
    }
    let bed = Bed::new("junk", 1);
    let server = bed.start_server(&[]);
    let within = Duration::from_secs(3);
    // An HTTP request: its first byte 'G' (0x47) looks like IPv4.
    let mut http = bed.raw_peer(0);
    http.send(b"GET / HTTP/1.1\r\nHost: 198.18.1.1\r\nUser-Agent: probe\r\n\r\n");
    let took = http.expect_closed(within);
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    // Half an HTTP request line, then nothing.
    let mut half = bed.raw_peer(0);
    half.send(b"GET /");
    half.expect_closed(within);
    // Random bytes that start like an IPv4 header.
    let mut random = bed.raw_peer(0);
    let mut bytes: Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8).collect();
    bytes[0] = 0x45;
    random.send(&bytes);
    random.expect_closed(within);
    // Nothing at all.
    let mut mute = bed.raw_peer(0);
    let took = mute.expect_closed(within);
    assert!(took >= Duration::from_millis(1500), "closed after {took:?}");
    let log = server.log();
    assert!(log.contains("not an address request"), "{log}");
    assert!(log.contains("first-bytes timeout"), "{log}");
    // A real original-protocol client still gets in.
    let mut real = bed.raw_peer(0);
    assert_eq!(
        real.ask(&dynamic_request()),
        grant_16(Ipv4Addr::new(198, 19, 0, 2))
    );
}

#[test]
fn a_deleted_tun_ends_the_daemon_with_an_error() {
    if !require_root("a_deleted_tun_ends_the_daemon_with_an_error") {
        return;
    }
    let bed = Bed::new("tundel", 1);
    let mut server = bed.start_server(&[]);
    let mut client = bed.start_client(0, &[]);
    let status = svpnctl_json(&bed.server_socket(), &["status"]);
    assert_eq!(status["tun_state"], "up");
    assert_eq!(
        svpnctl_json(&bed.client_socket(0), &["status"])["tun_state"],
        "up"
    );

    bed.server.ip(&["link", "del", TUN]);
    assert!(
        server.wait_for_log("tun read failed for good", Duration::from_secs(5)),
        "{}",
        server.log()
    );
    assert!(wait_until(Duration::from_secs(5), || server
        .try_status()
        .is_some()));
    let code = server.try_status().and_then(|s| s.code());
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}");
    assert!(
        server.log().contains("tun device failed"),
        "{}",
        server.log()
    );

    // The same on a client.
    bed.clients[0].ip(&["link", "del", TUN]);
    assert!(
        client.wait_for_log("failed for good", Duration::from_secs(5)),
        "{}",
        client.log()
    );
    assert!(wait_until(Duration::from_secs(5), || client
        .try_status()
        .is_some()));
    let code = client.try_status().and_then(|s| s.code());
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}");
}

#[test]
fn one_key_on_two_hosts_backs_off_instead_of_flapping() {
    if !require_root("one_key_on_two_hosts_backs_off_instead_of_flapping") {
        return;
    }
    let bed = Bed::new("flap", 2);
    let tls = Tls::new(&bed, &["shared"]);
    let public = &tls.clients[0].public;
    let server = bed.start_server(&tls.server_args());
    let _a = bed.start_client(0, &tls.client_args(0));
    let _b = bed.spawn_client(1, &tls.client_args(0));
    let start = Instant::now();
    assert!(
        server.wait_for_log("key connected from two places", Duration::from_secs(10)),
        "{}",
        server.log()
    );
    std::thread::sleep(Duration::from_secs(30).saturating_sub(start.elapsed()));
    let log = server.log();
    let grants = count(&log, "granted ");
    assert!(grants <= 6, "{grants} grants in 30 s:\n{log}");
    let warning = log
        .lines()
        .find(|l| l.contains("key connected from two places"))
        .expect("the warning");
    assert!(warning.contains(public), "{warning}");
    assert!(
        warning.contains("198.18.1.2") && warning.contains("198.18.2.2"),
        "{warning}"
    );
    assert!(log.contains("took over its own session"), "{log}");
    // Never two addresses at once: one peer holds the key.
    let peers = svpnctl_json(&bed.server_socket(), &["peers"]);
    assert_eq!(peers.as_array().map(Vec::len), Some(1), "{peers}");
}

#[test]
fn a_key_never_holds_two_addresses() {
    if !require_root("a_key_never_holds_two_addresses") {
        return;
    }
    let bed = Bed::new("twoaddr", 2);
    let tls = Tls::new(&bed, &["shared"]);
    let server = bed.start_server(&tls.server_args());
    let _a = bed.start_client(0, &tls.client_args(0));
    let b = bed.start_client(1, &tls.client_args(0));
    let peers = svpnctl_json(&bed.server_socket(), &["peers"]);
    assert_eq!(peers.as_array().map(Vec::len), Some(1), "{peers}");
    // The newer connection took the key's one address over.
    assert_eq!(peers[0]["address"], "198.19.0.2", "{peers}");
    assert!(b.log().contains("198.19.0.2"), "{}", b.log());
    assert!(server.log().contains("key connected from two places"));
}

#[test]
fn a_flood_from_one_network_locks_out_neither_other_networks_nor_its_known_clients() {
    if !require_root(
        "a_flood_from_one_network_locks_out_neither_other_networks_nor_its_known_clients",
    ) {
        return;
    }
    raise_open_file_limit();
    let bed = Bed::new("flood24", 2);
    let tls = Tls::new(&bed, &["known", "other"]);
    let server_key = &tls.server.path;
    let known_pub = &tls.clients[0].public;
    let other_pub = &tls.clients[1].public;
    let config = bed.path("server.toml");
    std::fs::write(&config, "[server]\nmax_unauthenticated = 64\n").expect("config");
    // 200 attackers in 198.18.1.0/24, the network of the known client
    // (198.18.1.2); the other client is in 198.18.2.0/24.
    let client_dev = veth_with(&bed.clients[0], "198.18.1.2/24");
    let sources: Vec<Ipv4Addr> = (10..=209).map(|i| Ipv4Addr::new(198, 18, 1, i)).collect();
    for source in &sources {
        let prefix = format!("{source}/24");
        bed.clients[0].ip(&["addr", "add", &prefix, "dev", &client_dev]);
    }
    let server = bed.start_server(&[
        "--config",
        &config,
        "--key",
        server_key,
        "--peer",
        known_pub,
        "--peer",
        other_pub,
        "--max-unauthenticated-per-network",
        "32",
    ]);
    // The known client was here before the flood.
    let mut known = bed.start_client(0, &tls.client_args(0));
    known.terminate(Duration::from_secs(5));
    let stop = AtomicBool::new(false);
    let flooded = Flooded::default();
    std::thread::scope(|s| {
        s.spawn(|| {
            bed.clients[0].enter(|| {
                flood(
                    &sources,
                    1,
                    bed.server_addr(0),
                    Duration::from_secs(30),
                    &stop,
                    &flooded,
                )
            })
        });
        // 200 connections, more than max_unauthenticated, from one /24.
        let filled = wait_until(Duration::from_secs(10), || {
            flooded.opened.load(Ordering::Relaxed) >= 200
                && server.log().contains("kind=per_network_cap")
        });
        let started = Instant::now();
        let other = bed.spawn_client(1, &tls.client_args(1));
        let known = bed.spawn_client(0, &tls.client_args(0));
        let other_granted = other.wait_for_log("granted", Duration::from_secs(10));
        let known_granted = known.wait_for_log("granted", Duration::from_secs(10));
        let took = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        assert!(filled, "{flooded:?}\n{}", server.log());
        assert!(other_granted, "another network:\n{}", other.log());
        assert!(
            known_granted,
            "a known client of that network:\n{}",
            known.log()
        );
        eprintln!("both granted within {took:?} while flooded: {flooded:?}");
    });
}
