//! The server's memory is a budget in bytes (README: Security model): peers
//! that never read, and peers that stall inside a large frame, cost at most
//! what the budget allows, and everyone else goes on.

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use common::vpn::*;
use common::{require_root, wait_until};

/// The server's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The address in a 20-byte grant.
fn granted(reply: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(reply[16], reply[17], reply[18], reply[19])
}

/// A config file for the server with these `[server]` lines.
fn config(bed: &Bed, lines: &str) -> String {
    let path = bed.path("memory.toml");
    std::fs::write(&path, format!("[server]\n{lines}\n")).expect("write config");
    path
}

/// Lets the test process hold `n` sockets.
fn raise_fd_limit(n: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, n.min(hard), hard).expect("setrlimit");
}

#[test]
fn peers_that_never_read_cost_a_bounded_amount() {
    if !require_root("peers_that_never_read_cost_a_bounded_amount") {
        return;
    }
    let bed = Bed::new("stuck", 1);
    let server = bed.start_server(&[]);
    let mut sender = bed.raw_peer(0);
    let me = granted(&sender.ask(&dynamic_request()));
    let mut healthy = bed.raw_peer(0);
    let healthy_address = granted(&healthy.ask(&dynamic_request()));
    // Four peers that take their grant and then never read again.
    let stuck: Vec<(RawPeer, Ipv4Addr)> = (0..4)
        .map(|_| {
            let mut peer = bed.raw_peer(0);
            let address = granted(&peer.ask(&dynamic_request()));
            (peer, address)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_kib(server.pid());

    // Small packets for the stuck peers, each beside a large one for the
    // server's own address, in big writes: the server reads them in large
    // chunks, and each small packet queued for a stuck peer could pin one.
    let small = |to: Ipv4Addr| udp_packet(me, to, &[1; 1000]);
    let large = udp_packet(me, SERVER_TUNNEL, &[2; 60_000]);
    let mut batch = Vec::new();
    for round in 0..6000 {
        let (_, to) = &stuck[round % stuck.len()];
        batch.extend_from_slice(&small(*to));
        batch.extend_from_slice(&large);
        if batch.len() > 1 << 20 {
            sender.send(&batch);
            batch.clear();
        }
    }
    sender.send(&batch);
    std::thread::sleep(Duration::from_secs(1));
    let grown_mib = rss_kib(server.pid()).saturating_sub(before) / 1024;
    eprintln!("four stuck peers: the server grew by {grown_mib} MiB");
    assert!(
        grown_mib <= 64,
        "the server grew by {grown_mib} MiB for four stuck peers"
    );
    // The others go on: a keepalive is echoed, a packet is delivered.
    assert_eq!(healthy.ask(&keepalive()), keepalive());
    let to_healthy = udp_packet(me, healthy_address, b"still here");
    sender.send(&to_healthy);
    assert_eq!(healthy.recv(to_healthy.len(), STARTUP), to_healthy);
    let peers = svpnctl_json(&bed.server_socket(), &["peers"]);
    let dropped: u64 = peers
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| p["dropped_queue_full"].as_u64().unwrap_or(0))
        .sum();
    assert!(dropped > 0, "the stuck peers' queues never filled: {peers}");
    drop(stuck);
}

#[test]
fn stalled_frames_are_budgeted_and_cut_off() {
    if !require_root("stalled_frames_are_budgeted_and_cut_off") {
        return;
    }
    const PEERS: usize = 1000;
    raise_fd_limit(4096);
    let bed = Bed::new("stalled", 1);
    // Every peer comes from one address, as the original protocol's
    // clients behind one NAT would: the per-source cap is raised for them.
    let conf = config(&bed, "frame_timeout = 4\nlegacy_max_per_source = 4096");
    let server = bed.start_server(&["--config", &conf]);
    let mut healthy = bed.raw_peer(0);
    healthy.ask(&dynamic_request());
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_kib(server.pid());

    // Each peer takes an address, then sends the header and almost all of
    // a 65,535-byte packet, and stalls (about 62 MiB in all).
    let mut header = vec![0x45, 0];
    header.extend_from_slice(&65_535u16.to_be_bytes());
    header.resize(64_000, 0);
    let started = Instant::now();
    let mut stalled: Vec<TcpStream> = Vec::with_capacity(PEERS);
    for _ in 0..PEERS {
        let mut peer = bed.raw_peer(0);
        peer.ask(&dynamic_request());
        peer.stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .expect("write timeout");
        peer.stream
            .write_all(&header)
            .expect("send the frame's start");
        stalled.push(peer.stream);
    }
    std::thread::sleep(Duration::from_secs(1));
    let grown_mib = rss_kib(server.pid()).saturating_sub(before) / 1024;
    eprintln!("{PEERS} stalled frames: the server grew by {grown_mib} MiB");
    assert!(
        grown_mib <= 32,
        "{PEERS} stalled frames grew the server by {grown_mib} MiB"
    );
    // The frame timeout closes them all (each within 4 s of its first
    // bytes, give or take the wait for the budget).
    assert!(
        wait_until(Duration::from_secs(30), || {
            server
                .log()
                .matches("a frame was not completed within 4s")
                .count()
                >= PEERS
        }),
        "not every stalled connection was closed after {:?}:\n{}",
        started.elapsed(),
        server
            .log()
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Meanwhile the healthy peer was served.
    assert_eq!(healthy.ask(&keepalive()), keepalive());
    drop(stalled);
}
