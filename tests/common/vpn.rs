//! A simplevpn test bed: a server namespace joined by veth to client
//! namespaces, the real `simplevpnd` started in them, and a raw TCP peer that
//! speaks the original protocol byte for byte.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{link, Daemon, Netns};

pub const SIMPLEVPND: &str = env!("CARGO_BIN_EXE_simplevpnd");
pub const SVPNCTL: &str = env!("CARGO_BIN_EXE_svpnctl");

/// The simplevpnd that [`Bed::spawn_client`] and its kin start: with
/// `SIMPLEVPN_CLIENT_BIN_DIR` set (to `target/small` after a client-only
/// build, say), that directory's simplevpnd, which starts the
/// simplevpn-helper beside it; otherwise [`SIMPLEVPND`]. Servers always
/// come from this build. Whatever is named must be there: a test never
/// quietly falls back to the other build.
pub fn client_simplevpnd() -> &'static str {
    static CLIENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| match std::env::var_os("SIMPLEVPN_CLIENT_BIN_DIR") {
        None => SIMPLEVPND.to_string(),
        Some(dir) => {
            let dir = PathBuf::from(dir);
            for name in ["simplevpnd", "simplevpn-helper"] {
                assert!(
                    dir.join(name).is_file(),
                    "SIMPLEVPN_CLIENT_BIN_DIR={}: no {name} there",
                    dir.display()
                );
            }
            let daemon = dir.join("simplevpnd");
            let daemon = std::fs::canonicalize(&daemon).unwrap_or(daemon);
            eprintln!("clients run {}", daemon.display());
            daemon
                .to_str()
                .expect("SIMPLEVPN_CLIENT_BIN_DIR is UTF-8")
                .to_string()
        }
    })
}
/// The tunnel network of every test, and the server's address in it.
pub const NETWORK: &str = "198.19.0.0/16";
pub const SERVER_TUNNEL: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const TUN: &str = "svpn0";
pub const STARTUP: Duration = Duration::from_secs(10);
/// The service user every daemon the tests start drops to.
pub const USER: &str = "nobody";
/// The helper's own user, the default `helper_user` (scripts/deps makes it).
pub const HELPER_USER: &str = "simplevpn-helper";

/// Server namespace plus `n` client namespaces; client `i` reaches the server
/// at 198.18.{i+1}.1 from 198.18.{i+1}.2. Each daemon gets a control socket
/// of its own in the bed's directory (removed on drop).
pub struct Bed {
    pub server: Netns,
    pub clients: Vec<Netns>,
    pub dir: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bed {
    pub fn new(tag: &str, n: u8) -> Bed {
        let server = Netns::new(&format!("{tag}s"));
        let clients: Vec<Netns> = (1..=n)
            .map(|i| {
                let ns = Netns::new(&format!("{tag}c{i}"));
                link(
                    &server,
                    &format!("198.18.{i}.1/24"),
                    &ns,
                    &format!("198.18.{i}.2/24"),
                );
                ns
            })
            .collect();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "svt-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("bed directory");
        Bed {
            server,
            clients,
            dir,
        }
    }

    /// The server's control socket.
    pub fn server_socket(&self) -> String {
        self.path("server.sock")
    }

    /// Client `i`'s control socket.
    pub fn client_socket(&self, i: usize) -> String {
        self.path(&format!("client{i}.sock"))
    }

    /// A path in the bed's directory.
    pub fn path(&self, name: &str) -> String {
        self.dir
            .join(name)
            .to_str()
            .expect("utf-8 path")
            .to_string()
    }

    /// The server's underlay address as seen from client `i` (0-based).
    pub fn server_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([198, 18, i as u8 + 1, 1], 2002))
    }

    /// The server's state directory (leases, bans, live peers): in the
    /// bed's directory, made by the daemon for its user on start.
    pub fn state_dir(&self) -> String {
        self.path("state")
    }

    /// Starts `simplevpnd server` with `extra` flags and waits until it
    /// serves. It runs as [`USER`] unless `extra` names a `--user`, keeps
    /// its state in [`Bed::state_dir`] unless `extra` names a `--state-dir`,
    /// and serves the original protocol (`--legacy`) unless `extra` gives it
    /// a `--key`.
    pub fn start_server(&self, extra: &[&str]) -> Daemon {
        let server = self.spawn_server(extra);
        assert!(
            server.wait_for_log("server ready", STARTUP),
            "server did not start:\n{}",
            server.log()
        );
        server
    }

    /// Starts `simplevpnd server` as [`Bed::start_server`] does, without
    /// waiting for anything.
    pub fn spawn_server(&self, extra: &[&str]) -> Daemon {
        self.spawn_server_under(&[], extra)
    }

    /// Starts `simplevpnd server` as [`Bed::spawn_server`] does, through
    /// `launcher`: a program and its arguments that exec the daemon
    /// (`["systemd-socket-activate", "-l", "198.18.1.1:443"]`, say); empty:
    /// the daemon itself.
    pub fn spawn_server_under(&self, launcher: &[&str], extra: &[&str]) -> Daemon {
        let socket = self.server_socket();
        let state = self.state_dir();
        let mut args = vec!["server", "--control", &socket];
        // The bed's network, unless the flags or the config file name one
        // (a file's would lose to the flag, even on reload).
        if !extra.contains(&"--network") && !config_names_network(extra) {
            args.extend_from_slice(&["--network", NETWORK]);
        }
        args.extend_from_slice(extra);
        with_default_user(&mut args);
        if !args.contains(&"--state-dir") {
            args.extend_from_slice(&["--state-dir", &state]);
        }
        if !args.contains(&"--key") {
            args.push("--legacy");
        }
        match launcher.split_first() {
            Some((program, launcher_args)) => {
                let mut all = launcher_args.to_vec();
                all.push(SIMPLEVPND);
                all.extend_from_slice(&args);
                self.server.spawn(program, &all)
            }
            None => self.server.spawn(SIMPLEVPND, &args),
        }
    }

    /// Starts `simplevpnd client` in client namespace `i` (as [`USER`]
    /// unless `extra` names a `--user`), without waiting for anything.
    pub fn spawn_client(&self, i: usize, extra: &[&str]) -> Daemon {
        self.spawn_client_to(i, &self.server_addr(i).to_string(), extra)
    }

    /// Starts `simplevpnd client` as [`Bed::spawn_client`] does, to
    /// `server` (HOST:PORT) instead of the bed's port 2002.
    pub fn spawn_client_to(&self, i: usize, server: &str, extra: &[&str]) -> Daemon {
        self.spawn_client_env(i, server, extra, &[])
    }

    /// Starts `simplevpnd client` as [`Bed::spawn_client_to`] does, with
    /// extra environment variables.
    pub fn spawn_client_env(
        &self,
        i: usize,
        server: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let socket = self.client_socket(i);
        let mut args = vec!["client", "-s", server, "--control", &socket];
        args.extend_from_slice(extra);
        with_default_user(&mut args);
        // A client without a key speaks the original protocol only when told.
        if !args.contains(&"--key") && !args.contains(&"--config") {
            args.push("--legacy");
        }
        self.clients[i].spawn_env(client_simplevpnd(), &args, env)
    }

    /// Starts `simplevpnd client` in client namespace `i` and waits for its grant.
    pub fn start_client(&self, i: usize, extra: &[&str]) -> Daemon {
        let client = self.spawn_client(i, extra);
        assert!(
            client.wait_for_log("granted", STARTUP),
            "client {i} got no grant:\n{}",
            client.log()
        );
        client
    }

    /// A raw original-protocol connection from client namespace `i`.
    pub fn raw_peer(&self, i: usize) -> RawPeer {
        let stream = self.clients[i]
            .tcp_connect(self.server_addr(i), STARTUP)
            .expect("raw peer connects");
        stream
            .set_nodelay(true)
            .expect("TCP_NODELAY on the raw peer");
        RawPeer { stream }
    }
}

/// Runs `simplevpnd keygen` in the bed's directory: (key path, public key).
pub fn keygen(bed: &Bed, name: &str) -> (String, String) {
    keygen_at(bed.path(&format!("{name}.key")))
}

/// Runs `simplevpnd keygen PATH`: (PATH, public key).
pub fn keygen_at(path: String) -> (String, String) {
    let out = Command::new(SIMPLEVPND)
        .args(["keygen", &path])
        .output()
        .expect("run keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (path, public)
}

/// Runs `simplevpnd pubkey PATH`: the public key of the key file at `path`.
pub fn pubkey(path: &str) -> String {
    let out = Command::new(SIMPLEVPND)
        .args(["pubkey", path])
        .output()
        .expect("run pubkey");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The flags that make a client speak TLS with `key`, pinning `server_key`.
pub fn tls_client_args<'a>(key: &'a str, server_key: &'a str) -> [&'a str; 4] {
    ["--key", key, "--server-key", server_key]
}

/// A node's key made by `simplevpnd keygen`: the key file and its public key.
pub struct NodeKeys {
    pub path: String,
    pub public: String,
}

/// The TLS set-up most tests share: keys made by `simplevpnd keygen` in the
/// bed's directory for the server (`server.key`) and each client
/// (`NAME.key`), and the flags that name them. The server allows every
/// client's key; each client pins the server's.
pub struct Tls {
    pub server: NodeKeys,
    /// In the order their names were given.
    pub clients: Vec<NodeKeys>,
}

impl Tls {
    /// Keys for the server and for clients named `clients`.
    pub fn new(bed: &Bed, clients: &[&str]) -> Tls {
        let made = |name: &str| {
            let (path, public) = keygen(bed, name);
            NodeKeys { path, public }
        };
        Tls {
            server: made("server"),
            clients: clients.iter().map(|name| made(name)).collect(),
        }
    }

    /// The server's flags: its key, and every client's key as a `--peer`.
    pub fn server_args(&self) -> Vec<&str> {
        let mut args = vec!["--key", self.server.path.as_str()];
        for client in &self.clients {
            args.extend(["--peer", client.public.as_str()]);
        }
        args
    }

    /// Client `i`'s flags: its key, pinning the server's.
    pub fn client_args(&self, i: usize) -> [&str; 4] {
        tls_client_args(&self.clients[i].path, &self.server.public)
    }
}

/// Sends `len` bytes from `from` to a listener in `to` at `address`, over TCP
/// through the tunnel (IPv4 or IPv6); the listener echoes them back.
/// Asserts both ways.
pub fn tcp_round_trip(from: &Netns, to: &Netns, address: impl Into<IpAddr>, port: u16, len: usize) {
    let target = SocketAddr::new(address.into(), port);
    let listener = to.tcp_listen(target).expect("listen on the tunnel address");
    let echo = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = vec![0; len];
        conn.read_exact(&mut buf).expect("read at the listener");
        conn.write_all(&buf).expect("echo");
        buf
    });
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let mut conn = from
        .tcp_connect(target, STARTUP)
        .unwrap_or_else(|e| panic!("connect to {target} through the tunnel: {e}"));
    conn.set_read_timeout(Some(STARTUP)).expect("timeout");
    conn.write_all(&payload).expect("send");
    let mut back = vec![0; len];
    conn.read_exact(&mut back).expect("read the echo");
    assert_eq!(
        echo.join().expect("echo thread"),
        payload,
        "bytes at {target}"
    );
    assert_eq!(back, payload, "echo from {target}");
}

/// Adds `--user USER` unless `args` already choose a user.
fn with_default_user(args: &mut Vec<&str>) {
    if !args.contains(&"--user") {
        args.extend_from_slice(&["--user", USER]);
    }
}

/// Parses hex bytes written as in protocol.md ("45 14 00 ...").
pub fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

/// The original protocol's messages, byte for byte (protocol.md part 1).
pub fn dynamic_request() -> Vec<u8> {
    hex("45 14 00 00 00 00 00 00 40 00 00 00 00 00 00 00 00 00 00 00")
}
pub fn static_request(address: Ipv4Addr) -> Vec<u8> {
    control(address, Ipv4Addr::UNSPECIFIED)
}
pub fn keepalive() -> Vec<u8> {
    hex("45 14 00 00 00 00 00 00 40 00 00 00 ff ff ff ff ff ff ff ff")
}
/// A grant of `address` with the /16 netmask pushed in the source field.
pub fn grant_16(address: Ipv4Addr) -> Vec<u8> {
    control(Ipv4Addr::new(255, 255, 0, 0), address)
}
fn control(source: Ipv4Addr, destination: Ipv4Addr) -> Vec<u8> {
    let mut bytes = hex("45 14 00 00 00 00 00 00 40 00 00 00");
    bytes.extend_from_slice(&source.octets());
    bytes.extend_from_slice(&destination.octets());
    bytes
}

/// A hand-made IPv4/UDP packet (checksums left 0: nothing checks them in
/// transit between two raw peers).
pub fn udp_packet(source: Ipv4Addr, destination: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = (20 + 8 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&source.octets());
    p.extend_from_slice(&destination.octets());
    p.extend_from_slice(&[0x30, 0x39, 0x30, 0x39]);
    p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// A TCP connection to the server that speaks the original protocol.
pub struct RawPeer {
    pub stream: TcpStream,
}

impl RawPeer {
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("raw peer write");
    }

    /// Reads exactly `n` bytes, or panics after `timeout`.
    pub fn recv(&mut self, n: usize, timeout: Duration) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("set read timeout");
        self.stream
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("raw peer expected {n} bytes: {e}"));
        buf
    }

    /// Sends `request` and returns the 20-byte reply.
    pub fn ask(&mut self, request: &[u8]) -> Vec<u8> {
        self.send(request);
        self.recv(20, STARTUP)
    }

    /// Asserts that nothing arrives within `wait`.
    pub fn expect_silence(&mut self, wait: Duration) {
        self.stream
            .set_read_timeout(Some(wait))
            .expect("set read timeout");
        let mut buf = [0u8; 64];
        match self.stream.read(&mut buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Ok(0) => panic!("connection closed, expected it open and silent"),
            Ok(n) => panic!("expected silence, got {n} bytes: {:02x?}", &buf[..n]),
            Err(e) => panic!("expected silence, got error {e}"),
        }
    }

    /// Asserts that the server closes the connection within `wait` without
    /// sending anything first. Returns how long it took.
    pub fn expect_closed(&mut self, wait: Duration) -> Duration {
        let start = Instant::now();
        self.stream
            .set_read_timeout(Some(wait))
            .expect("set read timeout");
        let mut buf = [0u8; 64];
        match self.stream.read(&mut buf) {
            Ok(0) => start.elapsed(),
            Ok(n) => panic!("expected close, got {n} bytes: {:02x?}", &buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the server did not close the connection within {wait:?}")
            }
            // A reset, or an abort: the connection is gone either way.
            Err(_) => start.elapsed(),
        }
    }
}

/// Runs `svpnctl --socket SOCKET ARGS...` (as `uid` if given).
pub fn svpnctl(socket: &str, args: &[&str], uid: Option<u32>) -> Output {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(SVPNCTL);
    command.arg("--socket").arg(socket).args(args);
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    command.output().expect("run svpnctl")
}

/// `svpnctl --json ARGS...`, which must succeed, parsed.
pub fn svpnctl_json(socket: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = svpnctl(socket, &all, None);
    assert!(
        out.status.success(),
        "svpnctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("svpnctl prints JSON")
}

/// GET http://`address`/metrics from inside `ns`: (status line, body).
pub fn scrape(ns: &Netns, address: SocketAddr) -> (String, String) {
    let mut conn = ns
        .tcp_connect(address, STARTUP)
        .expect("connect to /metrics");
    conn.set_read_timeout(Some(STARTUP)).expect("timeout");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// `net.ipv4.ip_forward=1` inside `ns` (never in the root namespace).
pub fn forward(ns: &Netns) {
    let out = ns.run("sysctl", &["-w", "net.ipv4.ip_forward=1"]);
    assert!(
        out.status.success(),
        "sysctl in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A LAN namespace behind `gateway`: a veth from `gateway` (`gateway_cidr`,
/// e.g. "198.18.200.1/24") to the new namespace (`host_cidr`), the host's
/// default route pointing at the gateway, and the gateway forwarding.
pub fn lan_behind(gateway: &Netns, gateway_cidr: &str, host_cidr: &str, tag: &str) -> Netns {
    let lan = Netns::new(tag);
    link(gateway, gateway_cidr, &lan, host_cidr);
    let via = gateway_cidr.split('/').next().expect("gateway address");
    lan.ip(&["route", "add", "default", "via", via]);
    forward(gateway);
    lan
}

/// Whether the `--config` file among `args` sets `network` itself.
fn config_names_network(args: &[&str]) -> bool {
    let Some(at) = args.iter().position(|a| *a == "--config") else {
        return false;
    };
    let Some(path) = args.get(at + 1) else {
        return false;
    };
    std::fs::read_to_string(path).is_ok_and(|text| {
        text.lines().any(|line| {
            line.split_once('=')
                .is_some_and(|(key, _)| key.trim() == "network")
        })
    })
}
