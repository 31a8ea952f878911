//! Through any firewall: the server on port 443 by socket activation (no
//! capability of its own), sharing its port with a web server, and clients
//! behind HTTP and SOCKS5 proxies. Real daemons, real tools (systemd-socket-
//! activate, python3, openssl, squid, microsocks), all in namespaces.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use common::vpn::*;
use common::{require_root, wait_until, Daemon, Netns};

const CLIENT_A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);

/// Whether `program` is on PATH; under CI a missing one fails the test
/// (scripts/deps installs it), elsewhere the test is skipped with a notice.
fn have(test: &str, program: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: needs {program} (scripts/deps installs it)");
        }
        eprintln!("skipping {test}: {program} is not installed (scripts/deps installs it)");
    }
    found
}

/// `simplevpnd server` started by `systemd-socket-activate -l ADDRESS`,
/// which binds ADDRESS as root, waits for the first connection and then
/// execs the daemon with the socket as fd 3 (the PID stays the same).
fn socket_activated_server(bed: &Bed, address: &str, extra: &[&str]) -> Daemon {
    let server = bed.spawn_server_under(&["systemd-socket-activate", "-l", address], extra);
    assert!(
        server.wait_for_log("Listening on", STARTUP),
        "systemd-socket-activate did not listen:\n{}",
        server.log()
    );
    server
}

/// The effective capability set of process `pid` (hex, from /proc).
fn cap_eff(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff line")
        .trim()
        .to_string()
}

fn tun_address(ns: &Netns) -> Option<(Ipv4Addr, u8)> {
    ns.ipv4_addrs(TUN).first().copied()
}

#[test]
fn a_socket_activated_server_serves_port_443_without_capabilities() {
    let test = "a_socket_activated_server_serves_port_443_without_capabilities";
    if !require_root(test) || !have(test, "systemd-socket-activate") {
        return;
    }
    let bed = Bed::new("sockact", 1);
    let server = socket_activated_server(&bed, "198.18.1.1:443", &[]);
    // The first connection starts the daemon.
    let _client = bed.spawn_client_to(0, "198.18.1.1:443", &[]);
    assert!(
        server.wait_for_log("server ready", STARTUP),
        "the daemon did not start:\n{}",
        server.log()
    );
    assert!(
        server
            .log()
            .contains("socket-activated fd 3 (198.18.1.1:443)"),
        "the ready line does not name the inherited socket:\n{}",
        server.log()
    );
    assert!(
        common::wait_until(STARTUP, || tun_address(&bed.clients[0]).is_some()),
        "no address through the activated socket:\n{}",
        server.log()
    );
    assert_eq!(tun_address(&bed.clients[0]), Some((CLIENT_A, 16)));
    tcp_round_trip(&bed.clients[0], &bed.server, SERVER_TUNNEL, 5000, 1 << 20);
    // The daemon (systemd-socket-activate exec'd it: same PID) holds no
    // capability: the port came bound.
    assert_eq!(
        cap_eff(server.pid()),
        "0000000000000000",
        "{}",
        server.log()
    );
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", server.pid())).expect("comm");
    assert_eq!(comm.trim(), "simplevpnd");
    // The helper, started before privileges were dropped, does not hold
    // the inherited socket.
    let inherited = std::fs::read_link(format!("/proc/{}/fd/3", server.pid())).expect("fd 3");
    let log = server.log();
    let helper: u32 = log
        .split("helper_pid=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no helper_pid in the log:\n{log}"));
    let fds = std::fs::read_dir(format!("/proc/{helper}/fd")).expect("the helper's fds");
    for fd in fds.flatten() {
        let target = std::fs::read_link(fd.path()).ok();
        assert_ne!(
            target.as_ref(),
            Some(&inherited),
            "the helper holds {inherited:?}"
        );
    }
    // Status names the socket it serves, not `listen`.
    let status = svpnctl_json(&bed.server_socket(), &["status"]);
    assert_eq!(status["listen"], "198.18.1.1:443", "{status}");
}

/// A page the web servers serve: 3000 bytes nobody else would send.
fn web_root(bed: &Bed) -> (String, Vec<u8>) {
    let dir = bed.path("www");
    std::fs::create_dir_all(&dir).expect("web root");
    let page: Vec<u8> = (0..3000u32)
        .map(|i| b"simplevpn port share "[(i % 21) as usize])
        .collect();
    std::fs::write(format!("{dir}/index.html"), &page).expect("page");
    (dir, page)
}

/// Waits until something listens at `address` in `ns`.
fn wait_for_listener(ns: &Netns, address: SocketAddr, what: &Daemon) {
    assert!(
        wait_until(STARTUP, || ns
            .tcp_connect(address, Duration::from_secs(1))
            .is_ok()),
        "nothing listens at {address}:\n{}",
        what.log()
    );
}

/// Python's http.server on 127.0.0.1:`port` in the server namespace,
/// serving `root`.
fn http_backend(bed: &Bed, root: &str, port: u16) -> Daemon {
    let port_text = port.to_string();
    let web = bed.server.spawn(
        "python3",
        &[
            "-m",
            "http.server",
            &port_text,
            "--bind",
            "127.0.0.1",
            "--directory",
            root,
        ],
    );
    wait_for_listener(&bed.server, SocketAddr::from(([127, 0, 0, 1], port)), &web);
    web
}

/// GET /index.html from `ns` at `host:port`, with TLS (ALPN http/1.1, the
/// certificate not checked) if `tls`: the response body.
fn get(ns: &Netns, host: &str, port: u16, tls: bool) -> Vec<u8> {
    let connection = match tls {
        true => {
            "import ssl; x = ssl.create_default_context(); x.check_hostname = False; \
                 x.verify_mode = ssl.CERT_NONE; x.set_alpn_protocols(['http/1.1']); \
                 c = http.client.HTTPSConnection(h, p, context=x, timeout=10)"
        }
        false => "c = http.client.HTTPConnection(h, p, timeout=10)",
    };
    let script = format!(
        "import http.client, sys; h = '{host}'; p = {port}; {connection}; \
         c.request('GET', '/index.html'); r = c.getresponse(); \
         assert r.status == 200, r.status; sys.stdout.buffer.write(r.read())"
    );
    let out = ns.run("python3", &["-c", &script]);
    assert!(
        out.status.success(),
        "GET {host}:{port} (tls {tls}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Reads the counter `name` from the server's /metrics at `address`.
fn counter(ns: &Netns, address: SocketAddr, name: &str) -> u64 {
    let (_, body) = scrape(ns, address);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
}

#[test]
fn a_shared_port_serves_the_website_to_others_and_the_vpn_to_clients() {
    let test = "a_shared_port_serves_the_website_to_others_and_the_vpn_to_clients";
    if !require_root(test) || !have(test, "python3") {
        return;
    }
    let bed = Bed::new("share", 2);
    let (root, page) = web_root(&bed);
    let _web = http_backend(&bed, &root, 8080);
    let tls = Tls::new(&bed, &["a"]);
    let server_key = &tls.server.path;
    let public = &tls.clients[0].public;
    // Small limits: 200 probes from one source must not lock out a client
    // from another.
    let config = bed.path("server.toml");
    std::fs::write(
        &config,
        "[server]\nmax_unauthenticated = 16\nmax_unauthenticated_per_source = 4\n",
    )
    .expect("config");
    let metrics = "127.0.0.1:9100";
    let server = bed.start_server(&[
        "--config",
        &config,
        "--key",
        server_key,
        "--peer",
        public,
        "--port-share",
        "127.0.0.1:8080",
        "--metrics",
        metrics,
    ]);
    let metrics: SocketAddr = metrics.parse().expect("metrics address");

    // An HTTP GET to the VPN's port gets the website's page, byte for byte.
    assert_eq!(get(&bed.clients[0], "198.18.1.1", 2002, false), page);

    // 200 idle probes from client 1's address, held open meanwhile.
    let probe_target = bed.server_addr(1);
    let probes: Vec<TcpStream> = bed.clients[1].enter(|| {
        (0..200)
            .filter_map(|_| TcpStream::connect_timeout(&probe_target, STARTUP).ok())
            .collect()
    });
    assert!(
        probes.len() >= 100,
        "only {} probes connected",
        probes.len()
    );

    // A VPN client, giving the website's name, on the same port.
    let mut args = tls.client_args(0).to_vec();
    args.extend_from_slice(&["--sni", "www.example.org"]);
    let _client = bed.start_client(0, &args);
    assert_eq!(tun_address(&bed.clients[0]), Some((CLIENT_A, 16)));
    tcp_round_trip(&bed.clients[0], &bed.server, SERVER_TUNNEL, 5000, 1 << 20);
    // The website still answers everyone else.
    assert_eq!(get(&bed.clients[0], "198.18.1.1", 2002, false), page);
    drop(probes);

    assert!(
        counter(
            &bed.server,
            metrics,
            "simplevpn_port_share_connections_total"
        ) >= 2,
        "{}",
        server.log()
    );
    assert_eq!(
        counter(&bed.server, metrics, "simplevpn_port_share_failures_total"),
        0
    );
}

/// `openssl s_server -WWW` on 127.0.0.1:`port` in the server namespace,
/// serving `root` over TLS with ALPN http/1.1 and a certificate made here.
fn https_backend(bed: &Bed, root: &str, port: u16) -> Daemon {
    let (cert, key) = (bed.path("web.crt"), bed.path("web.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=www.example.org"])
        .args(["-keyout", &key, "-out", &cert])
        .output()
        .expect("run openssl req");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // -WWW serves files relative to the working directory.
    let command = format!(
        "cd '{root}' && exec openssl s_server -accept 127.0.0.1:{port} -cert '{cert}' \
         -key '{key}' -alpn http/1.1 -WWW -quiet"
    );
    let web = bed.server.spawn("sh", &["-c", &command]);
    wait_for_listener(&bed.server, SocketAddr::from(([127, 0, 0, 1], port)), &web);
    web
}

#[test]
fn an_https_request_to_a_shared_port_reaches_the_https_website() {
    let test = "an_https_request_to_a_shared_port_reaches_the_https_website";
    if !require_root(test) || !have(test, "python3") || !have(test, "openssl") {
        return;
    }
    let bed = Bed::new("sharetls", 1);
    let (root, page) = web_root(&bed);
    let _web = https_backend(&bed, &root, 8443);
    let tls = Tls::new(&bed, &["a"]);
    let server =
        bed.start_server(&[tls.server_args(), vec!["--port-share", "127.0.0.1:8443"]].concat());
    // A browser's ClientHello (ALPN http/1.1) goes to the website.
    assert_eq!(get(&bed.clients[0], "198.18.1.1", 2002, true), page);
    // Our client's (ALPN simplevpn/2, SNI the website's) is served.
    let mut args = tls.client_args(0).to_vec();
    args.extend_from_slice(&["--sni", "www.example.org"]);
    let _client = bed.start_client(0, &args);
    tcp_round_trip(&bed.clients[0], &bed.server, SERVER_TUNNEL, 5000, 1 << 16);
    assert_eq!(get(&bed.clients[0], "198.18.1.1", 2002, true), page);
    assert!(
        !server.log().contains("port share failed"),
        "{}",
        server.log()
    );
}

/// A backend that records the first bytes of the first connection to
/// `record`, up to the end of the HTTP head that follows the PROXY v2
/// header, then answers with a short HTTP response. The header's own
/// signature holds a blank line (`\r\n\r\n`), so the head ends at the
/// second one; the header and the request may arrive in separate reads.
fn recording_backend(bed: &Bed, port: u16, record: &str) -> Daemon {
    let script = format!(
        "import socket, time\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('127.0.0.1', {port})); s.listen(8)\n\
         c, _ = s.accept(); c.settimeout(10); data = b''\n\
         while data.count(b'\\r\\n\\r\\n') < 2:\n\
         \x20   chunk = c.recv(4096)\n\
         \x20   if not chunk: break\n\
         \x20   data += chunk\n\
         open('{record}', 'wb').write(data)\n\
         c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok'); c.close()\n\
         time.sleep(60)\n"
    );
    let web = bed.server.spawn("python3", &["-c", &script]);
    // Not probed by connecting: the first connection is the one recorded.
    assert!(
        wait_until(STARTUP, || {
            let out = bed
                .server
                .run("ss", &["-Htln", &format!("sport = :{port}")]);
            !out.stdout.is_empty()
        }),
        "the recording backend does not listen:\n{}",
        web.log()
    );
    web
}

#[test]
fn the_backend_learns_the_clients_address_from_a_proxy_header() {
    let test = "the_backend_learns_the_clients_address_from_a_proxy_header";
    if !require_root(test) || !have(test, "python3") {
        return;
    }
    let bed = Bed::new("shareppv2", 1);
    let record = bed.path("first-bytes");
    let _web = recording_backend(&bed, 8081, &record);
    let (server_key, _) = keygen(&bed, "server");
    let _server = bed.start_server(&[
        "--key",
        &server_key,
        "--port-share",
        "127.0.0.1:8081",
        "--port-share-proxy",
    ]);
    let mut conn = bed.clients[0]
        .tcp_connect(bed.server_addr(0), STARTUP)
        .expect("connect");
    conn.set_read_timeout(Some(STARTUP)).expect("timeout");
    let request = b"GET / HTTP/1.0\r\nHost: www.example.org\r\n\r\n";
    conn.write_all(request).expect("request");
    let mut response = Vec::new();
    conn.read_to_end(&mut response).expect("response");
    assert!(response.ends_with(b"\r\n\r\nok"), "{response:?}");
    let local = conn.local_addr().expect("local address");
    let seen = std::fs::read(&record).expect("recorded bytes");
    // PROXY v2: signature, PROXY over TCP/IPv4, 12 bytes of addresses:
    // this client's address and port, then the server's.
    assert_eq!(&seen[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(&seen[12..16], &[0x21, 0x11, 0, 12]);
    assert_eq!(&seen[16..20], &[198, 18, 1, 2]);
    assert_eq!(&seen[20..24], &[198, 18, 1, 1]);
    assert_eq!(&seen[24..26], &local.port().to_be_bytes());
    assert_eq!(&seen[26..28], &2002u16.to_be_bytes());
    // Then the request, as sent.
    assert_eq!(&seen[28..], request);
}

/// A server namespace (198.18.1.1), a proxy namespace linked to it
/// (198.18.1.2) and to client namespace 0 (198.18.2.1 to 198.18.2.2). The
/// client has no route to the server: only the proxy reaches it.
fn behind_a_proxy(tag: &str) -> (Bed, Netns) {
    let mut bed = Bed::new(tag, 0);
    let proxy = Netns::new(&format!("{tag}p"));
    common::link(&bed.server, "198.18.1.1/24", &proxy, "198.18.1.2/24");
    let client = Netns::new(&format!("{tag}c"));
    common::link(&proxy, "198.18.2.1/24", &client, "198.18.2.2/24");
    bed.clients.push(client);
    (bed, proxy)
}

/// squid on 198.18.2.1:3128 in `ns`, its config and logs in the bed's
/// directory; with `user` (name, password), Basic auth against an
/// htpasswd file made here (basic_ncsa_auth).
fn squid(bed: &Bed, ns: &Netns, user: Option<(&str, &str)>) -> Daemon {
    let dir = bed.path("squid");
    std::fs::create_dir_all(&dir).expect("squid dir");
    // squid drops from root to its own user, which writes the logs here.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let access = match user {
        None => "http_access allow all\n".to_string(),
        Some((name, password)) => {
            let out = std::process::Command::new("openssl")
                .args(["passwd", "-apr1", password])
                .output()
                .expect("openssl passwd");
            assert!(out.status.success());
            let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
            std::fs::write(format!("{dir}/htpasswd"), format!("{name}:{hash}\n"))
                .expect("htpasswd");
            format!(
                "auth_param basic program /usr/lib/squid/basic_ncsa_auth {dir}/htpasswd\n\
                 auth_param basic realm svt\n\
                 acl users proxy_auth REQUIRED\n\
                 http_access allow users\n\
                 http_access deny all\n"
            )
        }
    };
    let config = format!(
        "http_port 198.18.2.1:3128\n\
         pid_filename {dir}/squid.pid\n\
         cache_log {dir}/cache.log\n\
         access_log stdio:{dir}/access.log\n\
         cache_store_log none\n\
         netdb_filename none\n\
         pinger_enable off\n\
         coredump_dir {dir}\n\
         cache deny all\n\
         shutdown_lifetime 0 seconds\n\
         visible_hostname svt-proxy\n\
         {access}"
    );
    let file = format!("{dir}/squid.conf");
    std::fs::write(&file, config).expect("squid.conf");
    let squid = ns.spawn("squid", &["-N", "-d", "1", "-f", &file]);
    wait_for_listener(ns, SocketAddr::from(([198, 18, 2, 1], 3128)), &squid);
    squid
}

/// microsocks on 198.18.2.1:1080 in `ns`, with `user` if given.
fn microsocks(ns: &Netns, user: Option<(&str, &str)>) -> Daemon {
    let mut args = vec!["-i", "198.18.2.1", "-p", "1080"];
    if let Some((name, password)) = user {
        args.extend_from_slice(&["-u", name, "-P", password]);
    }
    let socks = ns.spawn("microsocks", &args);
    wait_for_listener(ns, SocketAddr::from(([198, 18, 2, 1], 1080)), &socks);
    socks
}

/// A TLS server at 198.18.1.1:2002 and a client in the client namespace
/// started with `--proxy URL`, which must get its address and carry 1 MiB.
fn tunnel_through(bed: &Bed, url: &str) {
    tunnel_through_env(bed, url, &[]);
}

/// [`tunnel_through`] with extra environment variables for the client.
fn tunnel_through_env(bed: &Bed, url: &str, env: &[(&str, &str)]) {
    let tls = Tls::new(bed, &["a"]);
    let _server = bed.start_server(&tls.server_args());
    let mut args = tls.client_args(0).to_vec();
    args.extend_from_slice(&["--proxy", url]);
    let client = bed.spawn_client_env(0, "198.18.1.1:2002", &args, env);
    assert!(
        client.wait_for_log("granted", STARTUP),
        "no grant through {url}:\n{}",
        client.log()
    );
    assert_eq!(tun_address(&bed.clients[0]), Some((CLIENT_A, 16)));
    tcp_round_trip(&bed.clients[0], &bed.server, SERVER_TUNNEL, 5000, 1 << 20);
    // The connection the client holds (and would pin with a full tunnel)
    // is the proxy's.
    let status = svpnctl_json(&bed.client_socket(0), &["status"]);
    let remote = status["server_peer"]["remote"].as_str().unwrap_or("");
    assert!(remote.starts_with("198.18.2.1:"), "{status}");
    assert!(
        status["proxy"]
            .as_str()
            .is_some_and(|p| p.contains("198.18.2.1")),
        "{status}"
    );
}

#[test]
fn a_client_reaches_its_server_through_squid() {
    let test = "a_client_reaches_its_server_through_squid";
    if !require_root(test) || !have(test, "squid") {
        return;
    }
    let (bed, proxy) = behind_a_proxy("squid");
    let _squid = squid(&bed, &proxy, None);
    tunnel_through(&bed, "http://198.18.2.1:3128");
}

#[test]
fn a_client_reaches_its_server_through_squid_with_basic_auth() {
    let test = "a_client_reaches_its_server_through_squid_with_basic_auth";
    if !require_root(test) || !have(test, "squid") || !have(test, "openssl") {
        return;
    }
    let (bed, proxy) = behind_a_proxy("squidauth");
    let _squid = squid(&bed, &proxy, Some(("alice", "s3cret-pw")));
    tunnel_through(&bed, "http://alice:s3cret-pw@198.18.2.1:3128");
}

#[test]
fn a_wrong_proxy_password_is_named_and_retried() {
    let test = "a_wrong_proxy_password_is_named_and_retried";
    if !require_root(test) || !have(test, "squid") || !have(test, "openssl") {
        return;
    }
    let (bed, proxy) = behind_a_proxy("squid407");
    let _squid = squid(&bed, &proxy, Some(("alice", "s3cret-pw")));
    let tls = Tls::new(&bed, &["a"]);
    let _server = bed.start_server(&tls.server_args());
    let mut args = tls.client_args(0).to_vec();
    args.extend_from_slice(&["--proxy", "http://alice:wrong-pw@198.18.2.1:3128"]);
    let client = bed.spawn_client_to(0, "198.18.1.1:2002", &args);
    // Refused, and tried again after the back-off: twice at least.
    assert!(
        wait_until(Duration::from_secs(30), || client
            .log()
            .matches("proxy refused: 407")
            .count()
            >= 2),
        "{}",
        client.log()
    );
    assert!(client.log().contains("reconnecting in"), "{}", client.log());
    let status = svpnctl(&bed.client_socket(0), &["status"], None);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("proxy refused: 407"), "{status}");
    assert!(status.contains("http://alice@198.18.2.1:3128"), "{status}");
    for text in [client.log(), status.to_string()] {
        assert!(!text.contains("wrong-pw"), "the password shows:\n{text}");
    }
}

#[test]
fn a_client_reaches_its_server_through_socks5() {
    let test = "a_client_reaches_its_server_through_socks5";
    if !require_root(test) || !have(test, "microsocks") {
        return;
    }
    let (bed, proxy) = behind_a_proxy("socks");
    let _socks = microsocks(&proxy, None);
    tunnel_through(&bed, "socks5://198.18.2.1:1080");
}

#[test]
fn a_client_reaches_its_server_through_socks5_with_a_password() {
    let test = "a_client_reaches_its_server_through_socks5_with_a_password";
    if !require_root(test) || !have(test, "microsocks") {
        return;
    }
    let (bed, proxy) = behind_a_proxy("socksauth");
    let _socks = microsocks(&proxy, Some(("bob", "hunter22")));
    tunnel_through(&bed, "socks5://bob:hunter22@198.18.2.1:1080");
}

#[test]
fn a_client_takes_its_proxy_from_the_environment() {
    let test = "a_client_takes_its_proxy_from_the_environment";
    if !require_root(test) || !have(test, "microsocks") {
        return;
    }
    let (bed, proxy) = behind_a_proxy("socksenv");
    let _socks = microsocks(&proxy, None);
    tunnel_through_env(
        &bed,
        "env",
        &[
            ("https_proxy", ""),
            ("HTTPS_PROXY", ""),
            ("all_proxy", "socks5://198.18.2.1:1080"),
        ],
    );
}

#[test]
fn a_legacy_server_shares_its_port_and_still_serves_the_original_protocol() {
    let test = "a_legacy_server_shares_its_port_and_still_serves_the_original_protocol";
    if !require_root(test) || !have(test, "python3") {
        return;
    }
    let bed = Bed::new("sharelegacy", 1);
    let (root, page) = web_root(&bed);
    let _web = http_backend(&bed, &root, 8080);
    // No key: legacy on. An HTTP request starts like an IPv4 header ("G" is
    // 0x47); its first 20 bytes are read, found to be no address request,
    // and replayed to the website.
    let _server = bed.start_server(&["--port-share", "127.0.0.1:8080"]);
    assert_eq!(get(&bed.clients[0], "198.18.1.1", 2002, false), page);
    let mut peer = bed.raw_peer(0);
    assert_eq!(peer.ask(&dynamic_request()), grant_16(CLIENT_A));
}

#[test]
fn an_open_splice_does_not_hold_up_the_servers_shutdown() {
    if !require_root("an_open_splice_does_not_hold_up_the_servers_shutdown") {
        return;
    }
    let bed = Bed::new("sharestop", 1);
    // A backend (this test) that answers one byte and then holds the
    // connection open.
    let backend = bed
        .server
        .tcp_listen(SocketAddr::from(([127, 0, 0, 1], 8082)))
        .expect("backend listens");
    let held = std::thread::spawn(move || {
        let (mut conn, _) = backend.accept().expect("backend accepts");
        conn.write_all(b"x").expect("answer");
        conn.set_read_timeout(Some(STARTUP)).expect("timeout");
        // Until the splice is gone (EOF), or the bound.
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
    });
    let (server_key, _) = keygen(&bed, "server");
    let mut server = bed.start_server(&["--key", &server_key, "--port-share", "127.0.0.1:8082"]);
    let mut conn = bed.clients[0]
        .tcp_connect(bed.server_addr(0), STARTUP)
        .expect("connect");
    conn.set_read_timeout(Some(STARTUP)).expect("timeout");
    conn.write_all(b"GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
        .expect("request");
    let mut answer = [0u8; 1];
    conn.read_exact(&mut answer).expect("the backend's answer");
    assert_eq!(&answer, b"x");
    // The splice is idle now (for up to 120 s); SIGTERM ends it at once.
    let status = server
        .terminate(STARTUP)
        .expect("the server exits on SIGTERM");
    assert!(status.success(), "{status}:\n{}", server.log());
    held.join().expect("backend thread");
}
