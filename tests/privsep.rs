//! Privilege separation, end to end: what the running daemons and helpers
//! hold (read from /proc), what happens to the helper and the tun when the
//! daemon is SIGKILLed and to the daemon when the helper is, the real
//! helper's refusals, and the `--user` errors.

mod common;

use std::collections::HashMap;
use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::vpn::*;
use common::{helper_binary, require_root, wait_until, Daemon, Netns};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, User};
use simplevpn::privsep::channel;
use simplevpn::privsep::protocol::{decode, encode, HelperRequest, HelperResponse};

/// CAP_NET_ADMIN (12) as /proc/PID/status prints a capability set.
const NET_ADMIN_ONLY: &str = "0000000000001000";
const NO_CAPS: &str = "0000000000000000";

/// The `Key: value` lines of /proc/PID/status (or of one task's status).
fn status(path: &str) -> HashMap<String, String> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The test user's uid and gid, as /proc prints them (real, effective, saved, fs).
fn user_ids() -> (String, String) {
    let user = User::from_name(USER)
        .expect("user database")
        .unwrap_or_else(|| panic!("user {USER} must exist"));
    let four = |id: u32| [id; 4].map(|i| i.to_string()).join("\t");
    (four(user.uid.as_raw()), four(user.gid.as_raw()))
}

/// Children of `pid` (every thread's).
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).expect("list tasks") {
        let path = task.expect("task entry").path().join("children");
        let text = fs::read_to_string(&path).unwrap_or_default();
        found.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    found
}

/// A process identified by PID and start time, so that a reused PID is not
/// mistaken for it.
#[derive(Debug, Clone, Copy)]
struct Process {
    pid: u32,
    start: u64,
}

impl Process {
    /// (state, start time) from /proc/PID/stat, if the PID exists.
    fn stat(pid: u32) -> Option<(char, u64)> {
        let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name is in parentheses and may hold spaces.
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let state = fields.first()?.chars().next()?;
        let start = fields.get(19)?.parse().ok()?;
        Some((state, start))
    }

    fn new(pid: u32) -> Process {
        let (_, start) = Process::stat(pid).unwrap_or_else(|| panic!("no process {pid}"));
        Process { pid, start }
    }

    /// The daemon's only child: its helper.
    fn helper_of(daemon: &Daemon) -> Process {
        let kids = children(daemon.pid());
        assert_eq!(
            kids.len(),
            1,
            "the daemon should have exactly one child, its helper: {kids:?}"
        );
        Process::new(kids[0])
    }

    /// Running (a zombie has already closed every fd, so it counts as gone).
    fn alive(&self) -> bool {
        matches!(Process::stat(self.pid), Some((state, start))
            if start == self.start && state != 'Z' && state != 'X')
    }
}

fn assert_daemon_unprivileged(daemon: &Daemon, what: &str) {
    let (uids, gids) = user_ids();
    let pid = daemon.pid();
    // Capabilities are per thread: check every one.
    for task in fs::read_dir(format!("/proc/{pid}/task")).expect("list tasks") {
        let task = task.expect("task").path();
        let st = status(&format!("{}/status", task.display()));
        let at = format!("{what} (pid {pid}, {})", task.display());
        assert_eq!(st["Uid"], uids, "{at}: Uid");
        assert_eq!(st["Gid"], gids, "{at}: Gid");
        assert_eq!(st["Groups"], "", "{at}: supplementary groups");
        for set in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
            assert_eq!(st[set], NO_CAPS, "{at}: {set}");
        }
        assert_eq!(st["NoNewPrivs"], "1", "{at}: NoNewPrivs");
    }
}

/// The helper's own user's uid and gid, as /proc prints them.
fn helper_user_ids() -> (String, String) {
    let user = User::from_name(HELPER_USER)
        .expect("user database")
        .unwrap_or_else(|| panic!("user {HELPER_USER} must exist (scripts/deps makes it)"));
    let four = |id: u32| [id; 4].map(|i| i.to_string()).join("\t");
    (four(user.uid.as_raw()), four(user.gid.as_raw()))
}

fn assert_helper_net_admin_only(helper: Process, what: &str) {
    let (uids, gids) = helper_user_ids();
    let (daemon_uids, _) = user_ids();
    assert_ne!(uids, daemon_uids, "the helper's user is the daemon's");
    let st = status(&format!("/proc/{}/status", helper.pid));
    let at = format!("{what}'s helper (pid {})", helper.pid);
    assert_eq!(st["CapEff"], NET_ADMIN_ONLY, "{at}: CapEff");
    assert_eq!(st["CapPrm"], NET_ADMIN_ONLY, "{at}: CapPrm");
    assert_eq!(st["CapBnd"], NET_ADMIN_ONLY, "{at}: CapBnd");
    assert_eq!(st["CapInh"], NO_CAPS, "{at}: CapInh");
    assert_eq!(st["CapAmb"], NO_CAPS, "{at}: CapAmb");
    assert_eq!(st["NoNewPrivs"], "1", "{at}: NoNewPrivs");
    assert_eq!(st["Uid"], uids, "{at}: Uid");
    assert_eq!(st["Gid"], gids, "{at}: Gid");
    assert_eq!(st["Threads"], "1", "{at}: threads");
    assert!(
        children(helper.pid).is_empty(),
        "{at} started a process of its own"
    );
}

#[test]
fn the_daemons_hold_no_privilege_and_their_helpers_only_net_admin() {
    if !require_root("the_daemons_hold_no_privilege_and_their_helpers_only_net_admin") {
        return;
    }
    let bed = Bed::new("privs", 1);
    let server = bed.start_server(&[]);
    let client = bed.start_client(0, &[]);
    for (daemon, what) in [(&server, "server"), (&client, "client")] {
        assert_daemon_unprivileged(daemon, what);
        assert_helper_net_admin_only(Process::helper_of(daemon), what);
    }
    // The helpers configured both tuns (traffic: tests/tunnel.rs).
    assert_eq!(bed.server.ipv4_addrs(TUN), vec![(SERVER_TUNNEL, 16)]);
    assert_eq!(
        bed.clients[0].ipv4_addrs(TUN),
        vec![(Ipv4Addr::new(198, 19, 0, 2), 16)]
    );
}

/// Starts a server and a client, then runs `check` on the client (the server
/// still up) and then on the server, with the daemon's namespace and role.
fn for_client_then_server(tag: &str, mut check: impl FnMut(&mut Daemon, &Netns, &str)) {
    let bed = Bed::new(tag, 1);
    let mut server = bed.start_server(&[]);
    let mut client = bed.start_client(0, &[]);
    check(&mut client, &bed.clients[0], "client");
    check(&mut server, &bed.server, "server");
}

#[test]
fn sigkill_of_the_daemon_takes_the_helper_and_the_tun_within_2s() {
    if !require_root("sigkill_of_the_daemon_takes_the_helper_and_the_tun_within_2s") {
        return;
    }
    for_client_then_server("sigkill", |daemon, ns, what| {
        let helper = Process::helper_of(daemon);
        assert!(ns.link_exists(TUN), "{what}: no tun to begin with");
        daemon.kill();
        assert!(
            wait_until(Duration::from_secs(2), || !helper.alive()
                && !ns.link_exists(TUN)),
            "{what}: 2 s after SIGKILL of the daemon, helper alive: {}, tun present: {}",
            helper.alive(),
            ns.link_exists(TUN)
        );
    });
}

#[test]
fn the_daemon_exits_with_an_error_when_its_helper_dies() {
    if !require_root("the_daemon_exits_with_an_error_when_its_helper_dies") {
        return;
    }
    for_client_then_server("helperdies", |daemon, ns, what| {
        let helper = Process::helper_of(daemon);
        // The helper was started by the daemon this test started.
        kill(Pid::from_raw(helper.pid as i32), Signal::SIGKILL).expect("SIGKILL the helper");
        assert!(
            wait_until(Duration::from_secs(5), || daemon.try_status().is_some()),
            "{what} still running 5 s after its helper died:\n{}",
            daemon.log()
        );
        let status = daemon.try_status().expect("exit status");
        assert_eq!(status.code(), Some(1), "{what}: {status}\n{}", daemon.log());
        assert!(
            daemon.log().contains("simplevpn-helper died"),
            "{what} did not say why:\n{}",
            daemon.log()
        );
        assert!(!ns.link_exists(TUN), "{what}: tun left behind");
    });
}

/// A process started by the test; killed (by PID) and reaped on drop.
struct Spawned(Option<Child>);

impl Spawned {
    /// Waits up to `timeout` for it to exit; its exit status and stderr.
    fn exited_within(mut self, timeout: Duration) -> Option<Output> {
        let child = self.0.as_mut()?;
        if !wait_until(timeout, || matches!(child.try_wait(), Ok(Some(_)))) {
            return None;
        }
        self.0.take()?.wait_with_output().ok()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Starts the real helper in `ns` with `args`, as simplevpnd does: its end
/// of a socketpair as fd 3. Returns the process and the daemon's end.
fn start_helper(ns: &Netns, args: &[&str]) -> (Spawned, OwnedFd) {
    let (ours, theirs) = channel::pair().expect("socketpair");
    let raw = theirs.as_raw_fd();
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", ns.name(), helper_binary()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(move || match nix::libc::dup2(raw, 3) {
            -1 => Err(std::io::Error::last_os_error()),
            _ => Ok(()),
        });
    }
    let child = command.spawn().expect("start simplevpn-helper");
    (Spawned(Some(child)), ours)
}

/// A server's helper, as simplevpnd starts it for a one-worker server.
const SERVER_HELPER: [&str; 10] = [
    "--role",
    "server",
    "--tun",
    TUN,
    "--network",
    NETWORK,
    "--max-mtu",
    "1500",
    "--user",
    USER,
];

/// Closes the daemon's end of a helper's socket (and its tun fds): the
/// helper exits 0 and the tun goes with it. Returns what it printed.
fn close_and_expect_clean_exit(
    helper: Spawned,
    socket: OwnedFd,
    fds: Vec<OwnedFd>,
    ns: &Netns,
) -> Output {
    drop(fds);
    drop(socket);
    let output = helper
        .exited_within(Duration::from_secs(2))
        .expect("the helper exits after EOF");
    assert!(output.status.success(), "helper exit: {}", output.status);
    assert!(!ns.link_exists(TUN), "tun left behind");
    output
}

/// Sends `request` to a helper and returns its answer and any fd with it.
fn ask(socket: &OwnedFd, request: &HelperRequest) -> (HelperResponse, Vec<OwnedFd>) {
    let frame = encode(request).expect("encode");
    channel::send(socket.as_fd(), &frame, &[]).expect("send a request");
    let message = channel::recv(socket.as_fd()).expect("receive the answer");
    assert!(
        !message.is_eof(),
        "the helper closed its socket on {request}"
    );
    (decode(&message.frame).expect("decode"), message.fds)
}

#[test]
fn the_real_helper_refuses_what_its_policy_does_not_allow() {
    if !require_root("the_real_helper_refuses_what_its_policy_does_not_allow") {
        return;
    }
    let ns = Netns::new("helper");
    let (helper, socket) = start_helper(&ns, &SERVER_HELPER);

    let (answer, tun_fd) = ask(&socket, &HelperRequest::OpenTun);
    let HelperResponse::Tun {
        name,
        index,
        offloads,
    } = answer
    else {
        panic!("OpenTun answered {answer:?}");
    };
    // The kernels we run on grant TSO (4.x and later).
    assert!(offloads.vnet_hdr && offloads.tso, "{offloads:?}");
    assert_eq!(name, TUN);
    assert_eq!(tun_fd.len(), 1, "the tun fd came with the answer");
    let lo = 1; // the loopback's ifindex in a fresh namespace
    let refused = [
        HelperRequest::OpenTun,
        HelperRequest::SetAddress {
            index,
            address: Ipv4Addr::new(198, 18, 0, 1),
            prefix: 16,
        },
        HelperRequest::SetAddress {
            index: lo,
            address: SERVER_TUNNEL,
            prefix: 16,
        },
        HelperRequest::AddRoute {
            index,
            destination: "198.18.0.0/16".parse().expect("net"),
        },
        HelperRequest::SetMtu { index, mtu: 9000 },
        HelperRequest::LinkUp { index: lo },
        // Started without --masquerade: no NAT; a server: no client's grants.
        HelperRequest::Masquerade { index },
        HelperRequest::FullTunnel {
            index,
            server: Ipv4Addr::new(198, 18, 1, 1).into(),
        },
        HelperRequest::SetDns {
            index,
            servers: vec![SERVER_TUNNEL.into()],
            domains: Vec::new(),
            default_route: true,
        },
    ];
    for request in &refused {
        let (answer, fd) = ask(&socket, request);
        assert!(
            matches!(answer, HelperResponse::Refused(_)),
            "{request}: {answer:?}"
        );
        assert!(fd.is_empty());
    }
    let allowed = [
        HelperRequest::SetMtu { index, mtu: 1400 },
        HelperRequest::SetAddress {
            index,
            address: SERVER_TUNNEL,
            prefix: 16,
        },
        HelperRequest::LinkUp { index },
        HelperRequest::AddRoute {
            index,
            destination: "198.19.7.0/24".parse().expect("net"),
        },
    ];
    for request in &allowed {
        assert_eq!(ask(&socket, request).0, HelperResponse::Ok, "{request}");
    }
    assert_eq!(ns.ipv4_addrs(TUN), vec![(SERVER_TUNNEL, 16)]);
    assert!(ns.ipv4_addrs("lo").iter().all(|(a, _)| a.is_loopback()));

    // The daemon's end closes: the helper exits 0 and the tun goes with it.
    let output = close_and_expect_clean_exit(helper, socket, tun_fd, &ns);
    let log = String::from_utf8_lossy(&output.stderr);
    assert_eq!(log.matches("refused").count(), refused.len(), "{log}");
}

#[test]
fn a_server_helper_opens_one_tun_queue_per_worker() {
    if !require_root("a_server_helper_opens_one_tun_queue_per_worker") {
        return;
    }
    let ns = Netns::new("queues");
    let args = [&SERVER_HELPER[..], &["--queues", "3"]].concat();
    let (helper, socket) = start_helper(&ns, &args);
    let (answer, fds) = ask(&socket, &HelperRequest::OpenTun);
    assert!(matches!(answer, HelperResponse::Tun { .. }), "{answer:?}");
    assert_eq!(fds.len(), 3, "one fd per queue");
    // The kernel counts the queues attached to the device.
    let listing = ns.run("ls", &[&format!("/sys/class/net/{TUN}/queues")]);
    let listing = String::from_utf8_lossy(&listing.stdout);
    let tx: Vec<_> = listing
        .split_whitespace()
        .filter(|q| q.starts_with("tx-"))
        .collect();
    assert_eq!(tx, ["tx-0", "tx-1", "tx-2"], "{listing}");
    close_and_expect_clean_exit(helper, socket, fds, &ns);
}

#[test]
fn the_helper_will_not_run_without_the_daemons_socket() {
    let out = Command::new(helper_binary())
        .args([
            "--role",
            "client",
            "--tun",
            TUN,
            "--max-mtu",
            "1500",
            "--user",
            USER,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run simplevpn-helper");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("started by simplevpnd"), "{stderr}");
}

#[test]
fn a_missing_or_root_user_is_a_one_line_error_with_exit_2() {
    let run = |args: &[&str]| {
        let out = Command::new(SIMPLEVPND)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run simplevpnd");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let missing = "svpn-no-such-user";
    for role in [
        vec!["server", "--network", NETWORK, "--legacy"],
        vec!["client", "-s", "198.18.1.1", "--legacy"],
    ] {
        // The daemon's user, then the helper's: never a fallback to the daemon's.
        for (field, extra) in [
            ("user", vec!["--user", missing]),
            (
                "helper_user",
                vec!["--user", USER, "--helper-user", missing],
            ),
        ] {
            let mut args = role.clone();
            args.extend(extra);
            let (code, stderr) = run(&args);
            assert_eq!(code, Some(2), "{args:?}: {stderr}");
            assert_eq!(
                stderr.trim_end(),
                format!(
                    "simplevpnd: {field}: no such user \"{missing}\"; create it with: \
                     useradd --system --no-create-home --shell /usr/sbin/nologin {missing}"
                ),
                "{args:?}"
            );
        }
        let mut args = role.clone();
        args.extend(["--user", USER, "--helper-user", USER]);
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("helper_user:"), "{stderr}");

        let mut args = role.clone();
        args.extend(["--user", "root"]);
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("user: \"root\" is root"), "{stderr}");
    }
}

#[test]
fn a_client_exits_when_its_helper_refuses_the_granted_address() {
    if !require_root("a_client_exits_when_its_helper_refuses_the_granted_address") {
        return;
    }
    let bed = Bed::new("refused", 1);
    let _server = bed.start_server(&[]);
    // The client trusts only 198.20.0.0/16; the server grants from 198.19.0.0/16.
    let config = std::env::temp_dir().join(format!("svt-refused-{}.toml", std::process::id()));
    fs::write(
        &config,
        "[client]\nlegacy = true\nnetwork = \"198.20.0.0/16\"\n",
    )
    .expect("write config");
    let server = bed.server_addr(0).to_string();
    let config_arg = config.to_str().expect("utf-8 path");
    let mut client = bed.clients[0].spawn(
        SIMPLEVPND,
        &[
            "client", "--config", config_arg, "-s", &server, "--user", USER,
        ],
    );
    let exited = wait_until(STARTUP, || client.try_status().is_some());
    fs::remove_file(&config).ok();
    assert!(exited, "client still running:\n{}", client.log());
    let status = client.try_status().expect("exit status");
    assert_eq!(status.code(), Some(1), "{status}\n{}", client.log());
    assert!(
        client
            .log()
            .contains("simplevpn-helper refused to set address 198.19.0.2/16"),
        "{}",
        client.log()
    );
    assert!(bed.clients[0].ipv4_addrs(TUN).is_empty());
}

#[test]
fn started_as_another_user_it_says_it_must_be_started_as_root() {
    if !require_root("started_as_another_user_it_says_it_must_be_started_as_root") {
        return;
    }
    // A copy that the user can surely execute, wherever target/ is.
    let dir = std::env::temp_dir().join(format!("svt-notroot-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    let copy = dir.join("simplevpnd");
    fs::copy(SIMPLEVPND, &copy).expect("copy simplevpnd");
    let user = User::from_name(USER).expect("user database").expect("user");
    let run = || {
        Command::new(&copy)
            .args(["server", "--network", NETWORK, "--legacy", "--user", USER])
            .uid(user.uid.as_raw())
            .gid(user.gid.as_raw())
            .stdin(Stdio::null())
            .output()
    };
    // A process forked by a concurrent test may briefly hold the copy's
    // write fd, and exec then fails with ETXTBSY: try again.
    let mut out = run();
    for _ in 0..50 {
        match &out {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
                out = run();
            }
            _ => break,
        }
    }
    fs::remove_dir_all(&dir).ok();
    let out = out.expect("run simplevpnd as the user");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("simplevpnd: must be started as root"),
        "{stderr}"
    );
}

#[test]
fn root_never_follows_a_link_planted_in_the_state_directory() {
    if !require_root("root_never_follows_a_link_planted_in_the_state_directory") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let bed = Bed::new("statelink", 0);
    let state = bed.state_dir();
    fs::create_dir_all(&state).expect("state dir");
    // What a compromised daemon would plant for root's next start.
    let victim = bed.path("victim");
    fs::write(&victim, "root's own file\n").expect("victim");
    std::os::unix::fs::symlink(&victim, format!("{state}/state.db-x")).expect("symlink");
    for start in 0..2 {
        let mut server = bed.start_server(&[]);
        assert!(
            server.terminate(Duration::from_secs(5)).is_some(),
            "start {start}: the server did not stop"
        );
        assert!(
            server.log().contains("left a symlink as it is"),
            "start {start}: no line about the link:\n{}",
            server.log()
        );
    }
    let meta = fs::metadata(&victim).expect("victim");
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "the link was followed");
    assert_eq!(
        fs::read_to_string(&victim).expect("read"),
        "root's own file\n"
    );
    // The real state file is the service user's.
    let user = User::from_name(USER).expect("users").expect("nobody");
    let db = fs::metadata(format!("{state}/state.db")).expect("state.db");
    assert_eq!(db.uid(), user.uid.as_raw());
}
