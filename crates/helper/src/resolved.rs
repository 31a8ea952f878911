//! DNS on the tun through systemd-resolved's D-Bus API (per link, as
//! `resolvectl dns` / `domain` / `default-route` / `revert` do), with
//! `zbus`'s blocking API. Only simplevpn-helper runs this. resolved lets root configure
//! links and asks polkit about anyone else: CAP_NET_ADMIN does not count,
//! because the bus (dbus-daemon, dbus-broker) passes no capabilities and
//! sd-bus will not take them from /proc. The helper runs as the service
//! user, so the packages ship a polkit rule that grants that user these
//! four actions (packaging/polkit/simplevpn.rules); without polkit the calls
//! are refused ("Access denied") and the daemon goes on without DNS.
//!
//! [`plan`] is pure (which calls, with which arguments), so it is
//! unit-tested; [`apply`] sends them.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use nix::libc;
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
use zbus::blocking::Connection;

/// resolved's bus name, object and interface.
const DESTINATION: &str = "org.freedesktop.resolve1";
const PATH: &str = "/org/freedesktop/resolve1";
const INTERFACE: &str = "org.freedesktop.resolve1.Manager";
/// How long resolved may take to answer all the calls of one request.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The routing domain that sends every name to this link's servers.
pub const ROUTE_ALL: &str = ".";

/// One method call on org.freedesktop.resolve1.Manager, with its arguments
/// as resolved types them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `SetLinkDNS(i ifindex, a(iay) addresses)`: (address family, bytes).
    SetLinkDns {
        index: i32,
        servers: Vec<(i32, Vec<u8>)>,
    },
    /// `SetLinkDomains(i ifindex, a(sb) domains)`: (domain, routing only).
    SetLinkDomains {
        index: i32,
        domains: Vec<(String, bool)>,
    },
    /// `SetLinkDefaultRoute(i ifindex, b enable)`.
    SetLinkDefaultRoute { index: i32, enable: bool },
    /// `RevertLink(i ifindex)`.
    RevertLink { index: i32 },
}

impl Call {
    /// The D-Bus method's name.
    pub fn method(&self) -> &'static str {
        match self {
            Call::SetLinkDns { .. } => "SetLinkDNS",
            Call::SetLinkDomains { .. } => "SetLinkDomains",
            Call::SetLinkDefaultRoute { .. } => "SetLinkDefaultRoute",
            Call::RevertLink { .. } => "RevertLink",
        }
    }
}

/// Why DNS could not be set or reverted.
#[derive(Debug, thiserror::Error)]
pub enum ResolvedError {
    #[error("ifindex {0} does not fit D-Bus's int32")]
    Index(u32),
    #[error("no D-Bus system bus: {0}")]
    NoBus(#[source] Box<zbus::Error>),
    #[error("systemd-resolved: {method}: {source}")]
    Call {
        method: &'static str,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("systemd-resolved did not answer within {}s", TIMEOUT.as_secs())]
    Timeout,
    #[error("starting a thread for D-Bus: {0}")]
    Thread(#[source] std::io::Error),
}

/// The calls that give link `index` these `servers` and search `domains`;
/// with `route_all`, the routing domain "~." too and the link as resolved's
/// default route, so that every name is resolved through it.
pub fn plan(
    index: u32,
    servers: &[IpAddr],
    domains: &[String],
    route_all: bool,
) -> Result<Vec<Call>, ResolvedError> {
    let index = link(index)?;
    let servers = servers
        .iter()
        .map(|server| match server {
            IpAddr::V4(v4) => (libc::AF_INET, v4.octets().to_vec()),
            IpAddr::V6(v6) => (libc::AF_INET6, v6.octets().to_vec()),
        })
        .collect();
    let mut domains: Vec<(String, bool)> = domains.iter().map(|d| (d.clone(), false)).collect();
    if route_all {
        domains.push((ROUTE_ALL.to_string(), true));
    }
    Ok(vec![
        Call::SetLinkDns { index, servers },
        Call::SetLinkDomains { index, domains },
        Call::SetLinkDefaultRoute {
            index,
            enable: route_all,
        },
    ])
}

/// The call that forgets everything set on link `index`.
pub fn revert(index: u32) -> Result<Vec<Call>, ResolvedError> {
    Ok(vec![Call::RevertLink {
        index: link(index)?,
    }])
}

/// The socket systemd (PID 1) listens on for its private API; it binds it
/// in its own network namespace.
pub const SYSTEMD_PRIVATE_SOCKET: &str = "/run/systemd/private";

/// Whether `table` (the text of /proc/self/net/unix: this network
/// namespace's unix sockets) has a socket listening at `path`.
pub fn listens_at(table: &str, path: &str) -> bool {
    /// `__SO_ACCEPTCON` in the Flags column: a listening socket.
    const ACCEPTCON: u32 = 1 << 16;
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match (fields.get(3), fields.get(7)) {
            (Some(flags), Some(bound)) => {
                *bound == path
                    && u32::from_str_radix(flags, 16).is_ok_and(|flags| flags & ACCEPTCON != 0)
            }
            _ => false,
        }
    })
}

fn link(index: u32) -> Result<i32, ResolvedError> {
    i32::try_from(index).map_err(|_| ResolvedError::Index(index))
}

/// Sends `calls` to systemd-resolved on the system bus, in order, all
/// answered within [`TIMEOUT`] (the daemon gives the helper 10 seconds per
/// request).
///
/// The calls run on a thread of their own, so that the wait can end at the
/// deadline whatever zbus is blocked in; a thread left behind sends no
/// further call and ends when its current one times out.
pub fn apply(calls: &[Call]) -> Result<(), ResolvedError> {
    let calls = calls.to_vec();
    let abandoned = Arc::new(AtomicBool::new(false));
    let (done, result) = mpsc::sync_channel(1);
    let flag = Arc::clone(&abandoned);
    // The thread, and the executor and reactor threads zbus starts from it,
    // inherit a mask that blocks every signal: a caught signal, such as the
    // helper's parent-death signal, must interrupt the thread that waits
    // for the daemon, not one of these.
    without_signals(|| {
        std::thread::Builder::new()
            .name("resolved".into())
            .spawn(move || {
                // The receiver is gone after the deadline: nobody to tell.
                let _ = done.send(send_all(&calls, &flag));
            })
    })
    .map_err(ResolvedError::Thread)?;
    match result.recv_timeout(TIMEOUT) {
        Ok(result) => result,
        Err(_) => {
            abandoned.store(true, Ordering::Relaxed);
            Err(ResolvedError::Timeout)
        }
    }
}

/// Connects and sends `calls`, unless `abandoned` (the caller stopped
/// waiting) before a call.
fn send_all(calls: &[Call], abandoned: &AtomicBool) -> Result<(), ResolvedError> {
    let bus = connect().map_err(|e| match timed_out(&e) {
        true => ResolvedError::Timeout,
        false => ResolvedError::NoBus(Box::new(e)),
    })?;
    for call in calls {
        if abandoned.load(Ordering::Relaxed) {
            return Err(ResolvedError::Timeout);
        }
        send(&bus, call).map_err(|source| match timed_out(&source) {
            true => ResolvedError::Timeout,
            false => ResolvedError::Call {
                method: call.method(),
                source: Box::new(source),
            },
        })?;
    }
    Ok(())
}

/// The system bus, with [`TIMEOUT`] on every method call (its `Hello`
/// too), so that a thread [`apply`] gave up on ends.
fn connect() -> zbus::Result<Connection> {
    zbus::blocking::connection::Builder::system()?
        .method_timeout(TIMEOUT)
        .build()
}

/// Whether `e` is a method call's timeout.
fn timed_out(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::InputOutput(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

/// Runs `f` with every signal blocked on this thread; signals that arrive
/// meanwhile stay pending until the mask is restored.
fn without_signals<T>(f: impl FnOnce() -> T) -> T {
    let mut old = SigSet::empty();
    let blocked = pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )
    .is_ok();
    let result = f();
    if blocked {
        // Restoring a mask this thread had cannot fail.
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
    result
}

fn send(bus: &Connection, call: &Call) -> zbus::Result<()> {
    let method = call.method();
    let reply = match call {
        Call::SetLinkDns { index, servers } => bus.call_method(
            Some(DESTINATION),
            PATH,
            Some(INTERFACE),
            method,
            &(*index, servers),
        ),
        Call::SetLinkDomains { index, domains } => bus.call_method(
            Some(DESTINATION),
            PATH,
            Some(INTERFACE),
            method,
            &(*index, domains),
        ),
        Call::SetLinkDefaultRoute { index, enable } => bus.call_method(
            Some(DESTINATION),
            PATH,
            Some(INTERFACE),
            method,
            &(*index, *enable),
        ),
        Call::RevertLink { index } => {
            bus.call_method(Some(DESTINATION), PATH, Some(INTERFACE), method, &(*index,))
        }
    };
    reply.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::zvariant::Type;

    #[test]
    fn the_calls_carry_resolveds_argument_types() {
        let servers: Vec<IpAddr> = vec![
            "198.19.0.1".parse().expect("ip"),
            "2001:2::53".parse().expect("ip"),
        ];
        let calls = plan(7, &servers, &["vpn.example".into()], true).expect("plan");
        let mut v6 = vec![0x20, 0x01, 0, 2];
        v6.extend_from_slice(&[0; 10]);
        v6.extend_from_slice(&[0, 0x53]);
        assert_eq!(
            calls,
            vec![
                Call::SetLinkDns {
                    index: 7,
                    servers: vec![(2, vec![198, 19, 0, 1]), (10, v6)],
                },
                Call::SetLinkDomains {
                    index: 7,
                    domains: vec![("vpn.example".into(), false), (".".into(), true)],
                },
                Call::SetLinkDefaultRoute {
                    index: 7,
                    enable: true
                },
            ]
        );
        // The D-Bus signatures resolved's methods take.
        assert_eq!(
            <(i32, Vec<(i32, Vec<u8>)>)>::SIGNATURE.to_string(),
            "(ia(iay))"
        );
        assert_eq!(
            <(i32, Vec<(String, bool)>)>::SIGNATURE.to_string(),
            "(ia(sb))"
        );
        assert_eq!(<(i32, bool)>::SIGNATURE.to_string(), "(ib)");
        assert_eq!(
            calls.iter().map(Call::method).collect::<Vec<_>>(),
            ["SetLinkDNS", "SetLinkDomains", "SetLinkDefaultRoute"]
        );
    }

    /// A bus of the test's own (dbus-daemon on a socket in a temp dir, no
    /// network), stopped and removed on drop.
    struct PrivateBus {
        daemon: std::process::Child,
        dir: std::path::PathBuf,
        address: String,
    }

    impl PrivateBus {
        /// None if dbus-daemon is not installed.
        fn start() -> Option<PrivateBus> {
            let dir = std::env::temp_dir().join(format!("svpn-resolved-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let socket = dir.join("bus");
            let address = format!("unix:path={}", socket.display());
            let config = dir.join("bus.conf");
            std::fs::write(
                &config,
                format!(
                    "<busconfig><type>session</type><listen>{address}</listen>\
                     <auth>EXTERNAL</auth><policy context=\"default\">\
                     <allow send_destination=\"*\"/><allow eavesdrop=\"true\"/>\
                     <allow own=\"*\"/></policy></busconfig>"
                ),
            )
            .expect("bus config");
            let daemon = std::process::Command::new("dbus-daemon")
                .arg(format!("--config-file={}", config.display()))
                .arg("--nofork")
                .spawn();
            let Ok(daemon) = daemon else {
                eprintln!("skipped: no dbus-daemon");
                let _ = std::fs::remove_dir_all(&dir);
                return None;
            };
            let bus = PrivateBus {
                daemon,
                dir,
                address,
            };
            let listening = (0..500).any(|_| {
                std::thread::sleep(Duration::from_millis(10));
                socket.exists()
            });
            assert!(listening, "dbus-daemon did not create {}", socket.display());
            Some(bus)
        }
    }

    impl Drop for PrivateBus {
        fn drop(&mut self) {
            let _ = self.daemon.kill();
            let _ = self.daemon.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Stands in for systemd-resolved: records each call with its
    /// arguments; SetLinkDefaultRoute on ifindex 99 never answers in time.
    struct FakeResolved(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl FakeResolved {
        fn record(&self, call: String) {
            self.0.lock().expect("calls").push(call);
        }
    }

    #[zbus::interface(name = "org.freedesktop.resolve1.Manager")]
    impl FakeResolved {
        #[zbus(name = "SetLinkDNS")]
        fn set_link_dns(&self, index: i32, servers: Vec<(i32, Vec<u8>)>) {
            self.record(format!("SetLinkDNS {index} {servers:?}"));
        }

        fn set_link_domains(&self, index: i32, domains: Vec<(String, bool)>) {
            self.record(format!("SetLinkDomains {index} {domains:?}"));
        }

        fn set_link_default_route(&self, index: i32, enable: bool) {
            if index == 99 {
                std::thread::sleep(TIMEOUT + Duration::from_secs(2));
            }
            self.record(format!("SetLinkDefaultRoute {index} {enable}"));
        }

        fn revert_link(&self, index: i32) {
            self.record(format!("RevertLink {index}"));
        }
    }

    #[test]
    fn apply_makes_resolveds_calls_in_order_and_gives_up_at_the_deadline() {
        let Some(bus) = PrivateBus::start() else {
            return;
        };
        let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let _resolved = zbus::blocking::connection::Builder::address(bus.address.as_str())
            .expect("address")
            // A bus that refuses the fake's own Hello fails the test.
            .method_timeout(TIMEOUT)
            .name(DESTINATION)
            .expect("name")
            .serve_at(PATH, FakeResolved(std::sync::Arc::clone(&calls)))
            .expect("serve")
            .build()
            .expect("fake resolved on the bus");
        // apply() talks to the system bus; this test's process has no other
        // user of the variable.
        std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &bus.address);

        let servers = ["198.19.0.1".parse().expect("ip")];
        let set = plan(7, &servers, &["vpn.example".into()], true).expect("plan");
        apply(&set).expect("set DNS");
        apply(&revert(7).expect("revert")).expect("revert DNS");
        assert_eq!(
            *calls.lock().expect("calls"),
            [
                "SetLinkDNS 7 [(2, [198, 19, 0, 1])]",
                "SetLinkDomains 7 [(\"vpn.example\", false), (\".\", true)]",
                "SetLinkDefaultRoute 7 true",
                "RevertLink 7",
            ]
        );

        // A resolved that does not answer: the request fails with a
        // timeout instead of holding the helper past the daemon's patience.
        let slow = plan(99, &[], &[], false).expect("plan");
        assert!(matches!(apply(&slow), Err(ResolvedError::Timeout)));

        // Nobody on the bus at resolved's name: refused, not a timeout.
        drop(_resolved);
        let refused = apply(&revert(7).expect("revert"));
        assert!(
            matches!(
                refused,
                Err(ResolvedError::Call {
                    method: "RevertLink",
                    ..
                })
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn a_listening_socket_is_found_by_its_path_in_proc_net_unix() {
        let table = "\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 17045 /run/systemd/private
0000000000000000: 00000003 00000000 00000000 0001 03 20110 /run/systemd/private
0000000000000000: 00000002 00000000 00000000 0002 01 16933 /run/systemd/notify
0000000000000000: 00000003 00000000 00000000 0001 03 20111
";
        assert!(listens_at(table, SYSTEMD_PRIVATE_SOCKET));
        // Bound but not listening, or only a connection to it: no.
        assert!(!listens_at(table, "/run/systemd/notify"));
        let connected_only = table.replace("00010000", "00000000");
        assert!(!listens_at(&connected_only, SYSTEMD_PRIVATE_SOCKET));
        // Another namespace's table: PID 1's socket is not in it.
        assert!(!listens_at(
            "Num       RefCount Protocol Flags    Type St Inode Path\n",
            SYSTEMD_PRIVATE_SOCKET
        ));
    }

    #[test]
    fn without_full_tunnel_no_routing_domain_and_revert_is_one_call() {
        let calls = plan(3, &[], &["a.example".into()], false).expect("plan");
        assert!(calls.contains(&Call::SetLinkDomains {
            index: 3,
            domains: vec![("a.example".into(), false)],
        }));
        assert!(calls.contains(&Call::SetLinkDefaultRoute {
            index: 3,
            enable: false
        }));
        assert_eq!(
            revert(3).expect("revert"),
            vec![Call::RevertLink { index: 3 }]
        );
        assert!(plan(u32::MAX, &[], &[], false).is_err());
    }
}
