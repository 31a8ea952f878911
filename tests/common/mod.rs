//! Network-namespace test harness for the end-to-end tests.
//!
//! Everything a test creates lives in network namespaces created here
//! (`svt-{tag}-{pid}-{n}`), joined by veth pairs that are created directly
//! inside their namespaces, so nothing ever appears in the root namespace.
//! Use addresses from 198.18.0.0/15 only (`link` asserts this).
//!
//! Usage:
//! ```ignore
//! mod common;
//! use common::*;
//!
//! #[test]
//! fn tunnel_comes_up() {
//!     if !require_root("tunnel_comes_up") { return; }
//!     // Declare namespaces BEFORE the daemons that run in them: locals are
//!     // dropped in reverse order, so the daemons are stopped first and the
//!     // namespaces deleted afterwards.
//!     let server_ns = Netns::new("srv");
//!     let client_ns = Netns::new("cli");
//!     link(&server_ns, "198.18.1.1/24", &client_ns, "198.18.1.2/24");
//!     let server = server_ns.spawn(env!("CARGO_BIN_EXE_simplevpnd"), &["..."]);
//!     assert!(server.wait_for_log("listening", Duration::from_secs(5)), "{}", server.log());
//! }
//! ```
//!
//! Cleanup: `Netns` runs `ip netns del` on drop and `Daemon` stops its process
//! (by its PID only) on drop; both also run while a test panics. If a test
//! binary is killed outright (SIGKILL, timeout), the next harness user removes
//! namespaces whose creating process no longer exists.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const NETNS_DIR: &str = "/var/run/netns";
const PREFIX: &str = "svt-";

/// Per-process counter used for every unique name (namespaces, veths, logs).
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// True when the test may run. Without root: panics if `CI=true` (a skipped
/// root test under CI is a failure), otherwise prints a skip notice and
/// returns false.
pub fn require_root(test: &str) -> bool {
    if effective_uid() == Some(0) {
        helper_binary();
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root (creates network namespaces), and CI=true forbids skipping");
    }
    eprintln!("skipping {test}: needs root (creates network namespaces)");
    false
}

/// simplevpn-helper, built beside simplevpnd, where simplevpnd looks for
/// it. The helper is a crate of its own (crates/helper), and cargo builds
/// only this package's binaries for its tests; so the first test of each
/// test binary to need it builds it (`cargo build -p simplevpn-helper` in
/// simplevpnd's profile: a quick no-op when it is up to date, as after
/// `cargo test --workspace`).
pub fn helper_binary() -> &'static str {
    static HELPER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HELPER.get_or_init(|| {
        let daemon = Path::new(env!("CARGO_BIN_EXE_simplevpnd"));
        let dir = daemon.parent().expect("simplevpnd has a directory");
        let target_dir = dir
            .parent()
            .expect("a profile directory is inside the target directory");
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(name) => name,
            None => panic!("no profile directory in {}", daemon.display()),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(&cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "simplevpn-helper",
                "--bin",
                "simplevpn-helper",
            ])
            .args(["--profile", profile, "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap_or_else(|e| panic!("run {cargo} to build simplevpn-helper: {e}"));
        assert!(
            status.success(),
            "building simplevpn-helper failed: {status}"
        );
        let helper = dir.join("simplevpn-helper");
        assert!(helper.is_file(), "{} was not built", helper.display());
        helper.to_str().expect("a UTF-8 target path").to_string()
    })
}

fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Poll `cond` every 50 ms until it is true or `timeout` has passed; returns
/// whether it became true (it is always evaluated at least once, and once more
/// at the deadline).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50).min(deadline - now));
    }
}

/// Run `ip` with `args`; panic with its stderr if it fails.
fn ip_checked(args: &[&str]) -> Output {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("failed to run `ip` (is iproute2 installed?)");
    if !out.status.success() {
        panic!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out
}

/// Serialises `ip netns add` across threads and test binaries: concurrent
/// first-time `ip netns add` calls race on turning /var/run/netns into a shared
/// mount point and can stack mounts.
fn netns_lock() -> (MutexGuard<'static, ()>, Flock<File>) {
    static LOCAL: Mutex<()> = Mutex::new(());
    let guard = LOCAL.lock().unwrap_or_else(|e| e.into_inner());
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/svt-netns.lock")
        .expect("open /run/svt-netns.lock");
    let flock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock /run/svt-netns.lock");
    (guard, flock)
}

/// Delete namespaces left behind by harness processes that no longer exist
/// (e.g. a test binary killed by a timeout). Names are `svt-{tag}-{pid}-{n}`;
/// a namespace is removed only if process `pid` is gone (or is this process,
/// which has not created any namespace yet when this runs).
fn sweep_stale_namespaces() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('-').collect();
        if parts.len() != 3 || parts[2].parse::<u32>().is_err() {
            continue;
        }
        let Ok(pid) = parts[1].parse::<u32>() else {
            continue;
        };
        if pid == me || !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stdin(Stdio::null())
                .output();
        }
    }
}

/// A network namespace owned by the test; `ip netns del` on drop.
///
/// Declare namespaces before the daemons running in them (locals drop in
/// reverse order). Deleting a namespace that still has processes only unlinks
/// its name; the namespace then lives until those processes exit.
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add svt-{tag}-{pid}-{n}` and bring `lo` up. `tag` is reduced
    /// to at most 10 ASCII alphanumerics; it only helps humans reading
    /// `ip netns list`.
    pub fn new(tag: &str) -> Netns {
        static SWEEP: Once = Once::new();
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(10)
            .collect::<String>()
            .to_ascii_lowercase();
        let tag = if tag.is_empty() {
            "ns".to_string()
        } else {
            tag
        };
        let name = format!("{PREFIX}{tag}-{}-{}", std::process::id(), next_id());
        {
            let _lock = netns_lock();
            SWEEP.call_once(sweep_stale_namespaces);
            ip_checked(&["netns", "add", &name]);
        }
        // From here on, Drop deletes the namespace even if the next step panics.
        let ns = Netns { name };
        ip_checked(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Run `program args...` inside the namespace (`ip netns exec`), wait for
    /// it and return its output. Panics only if it cannot be started; check
    /// `status` yourself.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn `{program}` in netns {}: {e}", self.name))
    }

    /// `ip -n NAME args...`; panics with stderr if it fails. Returns the output.
    /// E.g. `ns.ip(&["route", "add", "198.18.2.0/24", "via", "198.18.1.1"])`.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip_checked(&full)
    }

    /// Start a long-running `program args...` inside the namespace, with
    /// stdout and stderr going to a log file; the returned guard stops it (by
    /// PID) on drop. The environment is inherited (set e.g. RUST_LOG with
    /// `spawn_env`). The PID is the program's own: `ip netns exec` execs it.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Daemon {
        self.spawn_env(program, args, &[])
    }

    /// Like `spawn`, with extra environment variables.
    pub fn spawn_env(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let base = Path::new(program)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "daemon".to_string());
        let log = std::env::temp_dir().join(format!(
            "{PREFIX}{}-{}-{base}.log",
            std::process::id(),
            next_id()
        ));
        let out =
            File::create(&log).unwrap_or_else(|e| panic!("create log file {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log file handle");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `{program}` in netns {}: {e}", self.name));
        Daemon {
            pid: child.id(),
            state: Mutex::new(ChildState {
                child,
                status: None,
            }),
            log,
            what: format!("{program} {} (netns {})", args.join(" "), self.name),
        }
    }

    /// Run `f` on a helper thread that has entered this namespace, and
    /// return its result. Sockets created by `f` stay in this namespace
    /// whatever thread uses them later.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("{NETNS_DIR}/{}", self.name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        thread::scope(|s| {
            s.spawn(move || {
                let current = || fs::read_link("/proc/thread-self/ns/net").ok();
                let before = current();
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {path}: {e}"));
                assert_ne!(
                    before,
                    current(),
                    "setns did not move the thread into {path}"
                );
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// A TCP connection made from inside the namespace.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.enter(|| TcpStream::connect_timeout(&addr, timeout))
    }

    /// A TCP listener bound inside the namespace.
    pub fn tcp_listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.enter(|| TcpListener::bind(addr))
    }

    /// A UDP socket bound inside the namespace.
    pub fn udp_bind(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        self.enter(|| UdpSocket::bind(addr))
    }

    /// IPv4 addresses of `dev` in this namespace; empty if `dev` does not exist.
    pub fn ipv4_addrs(&self, dev: &str) -> Vec<(Ipv4Addr, u8)> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "-4", "addr", "show", "dev", dev])
            .stdin(Stdio::null())
            .output()
            .expect("failed to run `ip addr show`");
        if !out.status.success() {
            return Vec::new();
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut addrs = Vec::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                if w == "inet" {
                    if let Some(cidr) = words.next() {
                        if let Some(a) = parse_cidr(cidr) {
                            addrs.push(a);
                        }
                    }
                    break;
                }
            }
        }
        addrs
    }

    /// Whether network device `dev` exists in this namespace.
    pub fn link_exists(&self, dev: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", "dev", dev])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Never panic here (a panic while unwinding aborts the test binary).
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: `ip netns del {}` failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: `ip netns del {}` could not run: {e}", self.name),
        }
    }
}

fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, l) = s.split_once('/')?;
    let len: u8 = l.parse().ok()?;
    if len > 32 {
        return None;
    }
    Some((a.parse().ok()?, len))
}

fn parse_harness_cidr(s: &str) -> (Ipv4Addr, u8) {
    let (addr, len) = parse_cidr(s).unwrap_or_else(|| panic!("not an IPv4 CIDR: {s:?}"));
    let o = addr.octets();
    assert!(
        o[0] == 198 && (o[1] & 0xfe) == 18 && len >= 15,
        "harness addresses must lie in 198.18.0.0/15, got {s}"
    );
    (addr, len)
}

/// Connect `a` and `b` with a veth pair, assign `a_addr` / `b_addr` (CIDR
/// strings inside 198.18.0.0/15, e.g. "198.18.1.1/24") and bring both ends up.
/// The pair is created directly inside the two namespaces (never in the root
/// namespace). Returns the device names `(in a, in b)`, e.g. to take the link
/// down later with `a.ip(&["link", "set", &dev_a, "down"])`.
pub fn link(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> (String, String) {
    parse_harness_cidr(a_addr);
    parse_harness_cidr(b_addr);
    assert_ne!(a.name, b.name, "link: both ends in the same namespace");
    let n = next_id();
    let (dev_a, dev_b) = (format!("veth{n}a"), format!("veth{n}b"));
    ip_checked(&[
        "link", "add", &dev_a, "netns", &a.name, "type", "veth", "peer", "name", &dev_b, "netns",
        &b.name,
    ]);
    for (ns, dev, addr) in [(a, &dev_a, a_addr), (b, &dev_b, b_addr)] {
        ns.ip(&["addr", "add", addr, "dev", dev]);
        ns.ip(&["link", "set", dev, "up"]);
    }
    (dev_a, dev_b)
}

struct ChildState {
    child: Child,
    /// Set once the child has been reaped; after that its PID may be reused,
    /// so no signal is ever sent again.
    status: Option<ExitStatus>,
}

impl ChildState {
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
            }
        }
        self.status
    }

    /// Signal the child by PID unless it has already been reaped (an unreaped
    /// zombie keeps its PID, so this never hits an unrelated process).
    fn signal(&mut self, sig: Signal) {
        if self.status.is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
        }
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.poll() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill_and_reap(&mut self) -> Option<ExitStatus> {
        if self.poll().is_none() {
            self.signal(Signal::SIGKILL);
            if let Ok(st) = self.child.wait() {
                self.status = Some(st);
            }
        }
        self.status
    }
}

/// A process started by `Netns::spawn`. On drop: SIGTERM, SIGKILL after 2 s,
/// reap, all by its PID; if the thread is panicking its log is printed first.
pub struct Daemon {
    pid: u32,
    state: Mutex<ChildState>,
    log: PathBuf,
    what: String,
}

impl Daemon {
    fn state(&self) -> MutexGuard<'_, ChildState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Poll the log every 50 ms until it contains `needle`. Returns false on
    /// timeout, or early if the process exited without writing it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if self.state().poll().is_some() {
                return self.log().contains(needle);
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Send `sig` to the process (by PID); a no-op once it has been reaped.
    pub fn signal(&self, sig: Signal) {
        self.state().signal(sig);
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.state().kill_and_reap();
    }

    /// SIGTERM, then wait up to `timeout`: Some(exit status), or None if it
    /// is still running (it is left running; Drop will SIGKILL it).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut st = self.state();
        if let Some(s) = st.poll() {
            return Some(s);
        }
        st.signal(Signal::SIGTERM);
        st.wait_timeout(timeout)
    }

    /// Whether the process is still running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        self.state().poll().is_none()
    }

    /// The exit status if it has exited (reaps it), without signalling.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.state().poll()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        {
            let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
            if st.poll().is_none() {
                st.signal(Signal::SIGTERM);
                if st.wait_timeout(Duration::from_secs(2)).is_none() {
                    st.kill_and_reap();
                }
            }
        }
        if panicking {
            let status = self.state().status;
            eprintln!(
                "----- log of {} (pid {}, {}) -----\n{}\n----- end of log -----",
                self.what,
                self.pid,
                status.map_or("not reaped".to_string(), |s| s.to_string()),
                self.log()
            );
        }
        let _ = fs::remove_file(&self.log);
    }
}

pub mod etcd;
pub mod vpn;
