//! simplevpn-helper: the only code of simplevpn that runs with privilege.
//!
//! simplevpnd starts it (as root) with one end of a `SOCK_SEQPACKET`
//! socketpair as fd 3 and its whole configuration on the command line
//! ([`HelperArgs`]). It then:
//!
//! 1. opens /dev/net/tun (the device node may be root-only), switches to the
//!    service user keeping only CAP_NET_ADMIN (effective, permitted,
//!    bounding), and sets no_new_privs and a parent-death signal;
//! 2. answers the daemon's requests one at a time, each checked against its
//!    [`Policy`] first: the tun is created once and its fd sent back with
//!    `SCM_RIGHTS`; address, MTU, link and routes only on that tun and inside
//!    the configured network;
//! 3. exits when the daemon's end of the socket closes (the daemon exited or
//!    was killed), closing its own copy of the tun fd, which removes the tun.
//!    Before that it undoes what it changed beyond the tun: the NAT table,
//!    the pinned route to the server, the tun's DNS settings or the DNS
//!    guard that stands in for them. A parent-death
//!    signal (SIGUSR1, caught) leads there too.
//!
//! It never runs a shell or any other program. SIGINT, SIGTERM and SIGHUP are
//! ignored: a terminal's Ctrl-C or systemd's stop reaches the daemon too, and
//! the helper leaves only after the daemon has.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use anyhow::{bail, Context};
use caps::Capability;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::prctl;
use nix::sys::signal::{sigaction, signal, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::socket::SockType;
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::getppid;
use simplevpn_helper::args::HelperArgs;
use simplevpn_helper::channel::{self, Message};
use simplevpn_helper::credentials::{self, ServiceUser};
use simplevpn_helper::dnsguard::{self, DnsFallback};
use simplevpn_helper::nat::{self, NatError};
use simplevpn_helper::netdev::{self, LinkConfig, NetdevError};
use simplevpn_helper::policy::{pin_route, HostRoute, Policy, Refusal};
use simplevpn_helper::program;
use simplevpn_helper::protocol::{decode, encode, Forwarding, HelperRequest, HelperResponse};
use simplevpn_helper::resolved::{self, ResolvedError};
use tracing::{debug, error, info, info_span, warn};

/// The daemon's socket, as set up by simplevpnd.
const SOCKET_FD: RawFd = 3;
/// Distinct refusals logged as warnings; later ones go to the debug level.
const MAX_LOGGED_REFUSALS: usize = 256;
/// The parent-death signal: caught, so that the helper cleans up first.
const PARENT_DEATH: Signal = Signal::SIGUSR1;
/// Set by the parent-death signal's handler.
static PARENT_DIED: AtomicBool = AtomicBool::new(false);

/// The full tunnel's routes into the tun: everything, as two halves that
/// beat the host's default route without replacing it.
const HALF_DEFAULTS: [Ipv4Net; 2] = [
    Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 1),
    Ipv4Net::new_assert(Ipv4Addr::new(128, 0, 0, 0), 1),
];
/// And IPv6's halves: with an IPv6 address on the tun (IPv6 inside the
/// tunnel) these are the IPv6 default route through the tunnel; without
/// one, the daemon sends no IPv6, so these drop it (no leak).
const IPV6_HALVES: [Ipv6Net; 2] = [
    Ipv6Net::new_assert(std::net::Ipv6Addr::UNSPECIFIED, 1),
    Ipv6Net::new_assert(std::net::Ipv6Addr::new(0x8000, 0, 0, 0, 0, 0, 0, 0), 1),
];

fn main() -> ExitCode {
    let args = match program::parse_args::<HelperArgs>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    program::init_logging();
    let _span = info_span!("helper").entered();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: HelperArgs) -> anyhow::Result<()> {
    let parent = getppid();
    let socket = take_socket()?;
    ignore_stop_signals()?;
    let policy = args.policy()?;
    let user = ServiceUser::lookup(&args.user)?;
    // One /dev/net/tun fd per queue, while root: the device node may be
    // root-only.
    let devices = (0..args.queues)
        .map(|_| netdev::open_tun_device())
        .collect::<Result<Vec<_>, _>>()?;
    // While root (reading PID 1's namespace needs it): systemd-resolved
    // runs in PID 1's network namespace, where an ifindex names another
    // interface than here, if this one is not that.
    let resolved_here = same_netns_as_init();
    credentials::become_user(&user, &[Capability::CAP_NET_ADMIN]).context("dropping privileges")?;
    // After the uid change, which clears it. The socket's EOF is the main
    // signal that the daemon is gone; this covers a helper stuck elsewhere.
    catch_parent_death()?;
    prctl::set_pdeathsig(PARENT_DEATH).context("PR_SET_PDEATHSIG")?;
    if getppid() != parent {
        info!("simplevpnd exited before the helper was ready");
        return Ok(());
    }
    let links = LinkConfig::connect()?;
    let mut state = State {
        args,
        policy,
        devices,
        tun: None,
        links,
        changes: Changes::default(),
        resolved_here,
        refusals_logged: HashSet::new(),
    };
    let result = serve(&socket, &mut state);
    state.undo();
    result
}

/// Answers the daemon's requests until it goes away.
fn serve(socket: &OwnedFd, state: &mut State) -> anyhow::Result<()> {
    loop {
        let message = match channel::recv(socket.as_fd()) {
            Ok(message) => message,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                if PARENT_DIED.load(Ordering::Relaxed) {
                    info!("simplevpnd died; exiting");
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e).context("reading the daemon's socket"),
        };
        if message.is_eof() {
            let tun = state
                .tun
                .as_ref()
                .map_or("no tun", |(name, _)| name.as_str());
            info!("simplevpnd closed its socket; exiting ({tun} goes with the last fd)");
            return Ok(());
        }
        let response = state.handle(message);
        let fds: Vec<_> = match (&response, &state.tun) {
            (HelperResponse::Tun { .. }, Some((_, fds))) => {
                fds.iter().map(|fd| fd.as_fd()).collect()
            }
            _ => Vec::new(),
        };
        let frame = encode(&response).context("encoding a response")?;
        match channel::send(socket.as_fd(), &frame, &fds) {
            Ok(()) => {}
            // The daemon went away between its request and our answer.
            Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => {
                info!("simplevpnd is gone; exiting");
                return Ok(());
            }
            Err(e) => return Err(e).context("writing the daemon's socket"),
        }
    }
}

/// The helper's state between requests.
struct State {
    args: HelperArgs,
    policy: Policy,
    /// /dev/net/tun, opened at startup (as root) once per queue, until
    /// `OpenTun` turns them into the tun's queues.
    devices: Vec<OwnedFd>,
    /// The tun's name and this helper's own fds for it, one per queue.
    tun: Option<(String, Vec<OwnedFd>)>,
    links: LinkConfig,
    /// What was changed beyond the tun, to undo on exit.
    changes: Changes,
    /// Whether this is PID 1's network namespace, the one systemd-resolved
    /// serves: DNS is set only then.
    resolved_here: bool,
    /// The refusals logged as warnings so far (see [`State::log_refusal`]).
    refusals_logged: HashSet<String>,
}

/// What the helper changed on the host beyond the tun (whose own routes go
/// with it).
#[derive(Debug, Default)]
struct Changes {
    /// The NAT table is installed, for this tun.
    nat: Option<String>,
    /// The pinned route to the server, if this helper added it.
    pinned: Option<HostRoute>,
    /// DNS is set on the tun (this ifindex).
    dns: Option<u32>,
    /// The DNS guard is installed, for this tun.
    dns_guard: Option<String>,
}

/// Why an allowed request was not carried out.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Netdev(#[from] NetdevError),
    #[error("{0}")]
    Nat(#[from] NatError),
    #[error("{0}")]
    Dns(#[from] ResolvedError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl State {
    /// Checks and carries out one request.
    fn handle(&mut self, message: Message) -> HelperResponse {
        if !message.fds.is_empty() {
            warn!("refused a request that carried an fd");
            return HelperResponse::Refused("requests carry no fds".into());
        }
        let request: HelperRequest = match decode(&message.frame) {
            Ok(request) => request,
            Err(e) => {
                warn!("refused a malformed request: {e}");
                return HelperResponse::Refused(format!("malformed request: {e}"));
            }
        };
        let checked = self.policy.check(&request).and_then(|()| {
            // A client's routes and addresses are checked against the
            // host's other networks as they are now.
            match request {
                HelperRequest::AddRoute { .. }
                | HelperRequest::SetAddress { .. }
                | HelperRequest::SetAddress6 { .. } => {
                    let connected = self.connected_networks();
                    self.policy.check_host(&request, &connected)
                }
                _ => Ok(()),
            }
        });
        if let Err(refusal) = checked {
            self.log_refusal(&request, &refusal);
            return HelperResponse::Refused(refusal.to_string());
        }
        match self.execute(&request) {
            Ok(response) => response,
            Err(Failure::Refused(refusal)) => {
                warn!("refused to {request}: {refusal}");
                HelperResponse::Refused(refusal.to_string())
            }
            Err(e) => {
                warn!("failed to {request}: {e}");
                HelperResponse::Failed(e.to_string())
            }
        }
    }

    /// The networks connected to the host's interfaces other than the tun:
    /// the main table's routes without a gateway. If they cannot be read,
    /// none (the policy's other rules still hold), with a warning.
    fn connected_networks(&self) -> Vec<IpNet> {
        let tun = self.policy.tun_index();
        match self.links.host_routes() {
            Ok(routes) => routes
                .into_iter()
                .filter(|r| r.gateway.is_none() && Some(r.index) != tun)
                .filter(|r| r.destination.prefix_len() > 0)
                .map(|r| r.destination)
                .collect(),
            Err(e) => {
                warn!("cannot list the host's routes to check against its networks: {e}");
                Vec::new()
            }
        }
    }

    /// A refusal is logged once as a warning (a client asks again on every
    /// reconnect), then at debug level.
    fn log_refusal(&mut self, request: &HelperRequest, refusal: &Refusal) {
        let line = format!("refused to {request}: {refusal}");
        if self.refusals_logged.len() < MAX_LOGGED_REFUSALS
            && self.refusals_logged.insert(line.clone())
        {
            warn!("{line}");
        } else {
            debug!("{line}");
        }
    }

    /// Undoes what was changed beyond the tun; each failure is logged.
    fn undo(&mut self) {
        let changes = std::mem::take(&mut self.changes);
        if let Some(tun) = changes.nat {
            match nat::remove(&tun) {
                Ok(()) => info!(table = %nat::table_name(&tun), "removed the NAT table"),
                Err(e) => error!("removing the NAT table: {e}"),
            }
        }
        if let Some(route) = changes.pinned {
            match self.links.del_host_route(route) {
                Ok(()) => info!(route = %describe(route), "removed the pinned route"),
                Err(e) => error!("removing the pinned route: {e}"),
            }
        }
        if let Some(tun) = changes.dns_guard {
            remove_dns_guard(&tun);
        }
        if let Some(index) = changes.dns {
            let reverted = resolved::revert(index).and_then(|calls| resolved::apply(&calls));
            match reverted {
                Ok(()) => info!("reverted the tun's DNS settings"),
                Err(e) => warn!("reverting the tun's DNS settings: {e}"),
            }
        }
    }

    /// The tun's name: as created, or as configured before that.
    fn tun_name(&self) -> String {
        self.tun
            .as_ref()
            .map_or_else(|| self.args.tun.clone(), |(name, _)| name.clone())
    }

    /// Sets the tun's DNS through systemd-resolved, if it serves this
    /// network namespace.
    fn set_dns(
        &mut self,
        index: u32,
        servers: &[IpAddr],
        domains: &[String],
        default_route: bool,
    ) -> Result<(), Failure> {
        if !self.resolved_here {
            return Err(Failure::Io {
                what: "DNS not applied",
                source: io::Error::other(
                    "this helper runs in another network namespace than systemd-resolved \
                     (PID 1's), where the tun's ifindex would name another interface",
                ),
            });
        }
        let calls = resolved::plan(index, servers, domains, default_route)?;
        // Marked first: a call that fails half-way leaves something to
        // revert.
        self.changes.dns = Some(index);
        resolved::apply(&calls)?;
        Ok(())
    }

    /// Full tunnel: pins the route to `server`, then routes everything
    /// else into the tun. Returns what it changed.
    fn full_tunnel(&mut self, index: u32, server: IpAddr) -> Result<Vec<String>, Failure> {
        let pin = self.pin(index, server)?;
        let tun = self.args.tun.clone();
        let mut changes = vec![format!("route {} (pinned: the server)", describe(pin))];
        for half in HALF_DEFAULTS {
            self.links.add_route(index, half)?;
        }
        changes.push(format!(
            "routes {} dev {tun} (full tunnel)",
            HALF_DEFAULTS.map(|h| h.to_string()).join(", ")
        ));
        for half in IPV6_HALVES {
            match self.links.add_route(index, half) {
                Ok(()) => {}
                // No IPv6 on this host at all: nothing can leak.
                Err(NetdevError::Netlink { source, .. })
                    if source.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) =>
                {
                    return Ok(changes);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let why = match self.policy.address6() {
            Some(_) => "IPv6 through the tunnel",
            None => "IPv6 blocked: no IPv6 address inside the tunnel",
        };
        changes.push(format!(
            "routes {} dev {tun} ({why})",
            IPV6_HALVES.map(|h| h.to_string()).join(", ")
        ));
        Ok(changes)
    }

    /// Pins the route to `server` where the host's best route to it (not
    /// through the tun, and not the pin this helper added before) goes now:
    /// after the underlay changed (another network, another gateway) the
    /// old pin is replaced, and one the kernel removed with its interface
    /// is added again. Returns the pin.
    fn pin(&mut self, index: u32, server: IpAddr) -> Result<HostRoute, Failure> {
        let old = self.changes.pinned;
        let routes: Vec<HostRoute> = self
            .links
            .host_routes()?
            .into_iter()
            .filter(|r| !old.is_some_and(|old| same_route(*r, old)))
            .collect();
        let pin = pin_route(&routes, server, index)?;
        if let Some(old) = old.filter(|old| !same_route(*old, pin)) {
            // Gone with its interface, or still there: either way not ours now.
            if let Err(e) = self.links.del_host_route(old) {
                warn!(route = %describe(old), "removing the old pinned route: {e}");
            }
            self.changes.pinned = None;
            info!(old = %describe(old), new = %describe(pin), "the underlay changed: re-pinned the route to the server");
        }
        // EEXIST (false): the host's own route, or this helper's still in
        // place; only a route this helper added is its to remove.
        if self.links.add_host_route(pin)? {
            self.changes.pinned = Some(pin);
        }
        Ok(pin)
    }

    /// Undoes [`State::full_tunnel`].
    fn end_full_tunnel(&mut self, index: u32) -> Result<(), Failure> {
        for half in HALF_DEFAULTS {
            self.links.del_route(index, half)?;
        }
        for half in IPV6_HALVES {
            if let Err(e) = self.links.del_route(index, half) {
                warn!("removing {half}: {e}");
            }
        }
        if let Some(pinned) = self.changes.pinned.take() {
            self.links.del_host_route(pinned)?;
        }
        Ok(())
    }

    /// Whether `sysctl` is on; a helper started with `--forwarding` turns
    /// it on if not.
    fn forwarding(&self, sysctl: netdev::ForwardingSysctl) -> Result<Forwarding, Failure> {
        let failed = |what: &'static str| move |source| Failure::Io { what, source };
        let state = match sysctl
            .is_on()
            .map_err(failed("reading a forwarding sysctl"))?
        {
            true => Forwarding::On,
            false if self.args.forwarding => {
                sysctl
                    .turn_on()
                    .map_err(failed("writing a forwarding sysctl"))?;
                info!("turned on forwarding ({}=1)", sysctl.name);
                Forwarding::TurnedOn
            }
            false => Forwarding::Off,
        };
        Ok(state)
    }

    /// Carries out an allowed request and records it in the policy.
    fn execute(&mut self, request: &HelperRequest) -> Result<HelperResponse, Failure> {
        let links = &self.links;
        let done = match *request {
            HelperRequest::OpenTun => {
                // The policy allows OpenTun once, so the device is still here;
                // there is no second way to a tun (opening /dev/net/tun again
                // may need the root this process no longer has).
                let mut devices = std::mem::take(&mut self.devices).into_iter();
                let created = devices
                    .next()
                    .ok_or_else(|| NetdevError::OpenTun(io::Error::other("already used")))
                    .and_then(|first| {
                        netdev::attach_tun_queues(first, devices.collect(), &self.args.tun)
                    });
                self.policy
                    .record(request, created.as_ref().ok().map(|tun| tun.index));
                let tun = created?;
                let queues = 1 + tun.more_queues.len();
                info!(tun = %tun.name, index = tun.index, offloads = ?tun.offloads, queues, "created the tun");
                let response = HelperResponse::Tun {
                    name: tun.name.clone(),
                    index: tun.index,
                    offloads: tun.offloads,
                };
                let fds = std::iter::once(tun.fd).chain(tun.more_queues).collect();
                self.tun = Some((tun.name, fds));
                return Ok(response);
            }
            HelperRequest::SetAddress {
                index,
                address,
                prefix,
            } => links.set_ipv4(index, address, prefix),
            HelperRequest::SetAddress6 {
                index,
                address,
                prefix,
            } => links.set_ipv6(index, address, prefix),
            HelperRequest::SetMtu { index, mtu } => links.set_mtu(index, mtu),
            HelperRequest::LinkUp { index } => links.set_up(index),
            HelperRequest::AddRoute { index, destination } => links.add_route(index, destination),
            HelperRequest::DelRoute { index, destination } => links.del_route(index, destination),
            HelperRequest::Masquerade { .. } => {
                let network = self
                    .policy
                    .masquerade_network()
                    .ok_or(Refusal::ServerOnly("masquerade"))?;
                let tun = self.tun_name();
                // Marked first: a batch that fails half-way is removed too.
                self.changes.nat = Some(tun.clone());
                let networks = std::iter::once(IpNet::from(network))
                    .chain(self.policy.masquerade_network6().map(IpNet::from));
                let mut changes = Vec::new();
                for network in networks {
                    nat::install(&tun, network)?;
                    let change = nat::describe(&tun, network);
                    info!("installed {change}");
                    changes.push(change);
                }
                return Ok(HelperResponse::Changed(changes));
            }
            HelperRequest::CheckForwarding => {
                let state = self.forwarding(netdev::IPV4_FORWARDING)?;
                return Ok(HelperResponse::Forwarding(state));
            }
            HelperRequest::CheckForwarding6 => {
                let state = self.forwarding(netdev::IPV6_FORWARDING)?;
                return Ok(HelperResponse::Forwarding(state));
            }
            HelperRequest::FullTunnel { index, server } => {
                let changes = self.full_tunnel(index, server)?;
                for change in &changes {
                    info!("full tunnel: {change}");
                }
                return Ok(HelperResponse::Changed(changes));
            }
            HelperRequest::Underlay { index, server } => {
                // With a full tunnel on, the server's route follows the
                // underlay of this connection, as a full tunnel's would.
                let full_tunnel = HelperRequest::FullTunnel { index, server };
                if self.changes.pinned.is_some() && self.policy.check(&full_tunnel).is_ok() {
                    self.pin(index, server)?;
                }
                Ok(())
            }
            HelperRequest::EndFullTunnel { index } => {
                self.end_full_tunnel(index)?;
                info!("full tunnel ended: its routes are removed");
                return Ok(HelperResponse::Ok);
            }
            HelperRequest::SetDns {
                index,
                ref servers,
                ref domains,
                default_route,
            } => {
                let set = self.set_dns(index, servers, domains, default_route);
                let failure = match set {
                    Ok(()) => {
                        // resolved has the pushed servers now: no guard needed.
                        if let Some(tun) = self.changes.dns_guard.take() {
                            remove_dns_guard(&tun);
                        }
                        let change = format!("DNS on {}: {request}", self.args.tun);
                        info!("{change}");
                        return Ok(HelperResponse::Changed(vec![change]));
                    }
                    Err(failure) => failure,
                };
                match dnsguard::fallback(self.policy.grants(), request) {
                    DnsFallback::Nothing => return Err(failure),
                    DnsFallback::Guard => {
                        let tun = self.tun_name();
                        let first = self.changes.dns_guard.is_none();
                        // Marked first: a batch that fails half-way is removed too.
                        self.changes.dns_guard = Some(tun.clone());
                        dnsguard::install(&tun)?;
                        let change = dnsguard::describe(&tun);
                        // Once: a reconnect that asks again says nothing new.
                        if first {
                            warn!(
                                "the pushed DNS could not be set on {tun} ({failure}): \
                                 blocking DNS outside the tunnel instead, {change}"
                            );
                        } else {
                            debug!("{change} (again: {failure})");
                        }
                        return Ok(HelperResponse::Changed(vec![change]));
                    }
                }
            }
            HelperRequest::RevertDns { index } => {
                if let Some(tun) = self.changes.dns_guard.take() {
                    remove_dns_guard(&tun);
                }
                // Only what this helper set: never another link's settings.
                if self.changes.dns.take().is_none() {
                    return Ok(HelperResponse::Ok);
                }
                let calls = resolved::revert(index)?;
                resolved::apply(&calls)?;
                Ok(())
            }
        };
        done?;
        self.policy.record(request, None);
        Ok(HelperResponse::Ok)
    }
}

/// Removes the DNS guard of `tun`, logging the outcome.
fn remove_dns_guard(tun: &str) {
    match dnsguard::remove(tun) {
        Ok(()) => info!(table = %dnsguard::table_name(tun), "removed the DNS guard"),
        Err(e) => error!("removing the DNS guard: {e}"),
    }
}

/// Whether this process is in PID 1's network namespace (false if that
/// cannot be told).
fn same_netns_as_init() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net"));
    match (ns("1"), ns("self")) {
        (Ok(init), Ok(me)) => init == me,
        // PID 1's link is not ours to read in the hardened unit (reading it
        // takes CAP_SYS_PTRACE, or PID 1's capabilities, and ProtectProc=
        // hides /proc/1): then whether systemd's own socket is in this
        // namespace's table says it.
        (Err(_), Ok(_)) => std::fs::read_to_string("/proc/self/net/unix")
            .is_ok_and(|table| resolved::listens_at(&table, resolved::SYSTEMD_PRIVATE_SOCKET)),
        _ => false,
    }
}

/// Whether `a` and `b` are the same route (destination, gateway and
/// interface; the kernel may report another metric).
fn same_route(a: HostRoute, b: HostRoute) -> bool {
    (a.destination, a.gateway, a.index) == (b.destination, b.gateway, b.index)
}

/// A pinned route as a phrase, with the interface's name.
fn describe(route: HostRoute) -> String {
    let name = interface_name(route.index).unwrap_or_else(|| format!("ifindex {}", route.index));
    match route.gateway {
        Some(gateway) => format!("{} via {gateway} dev {name}", route.destination),
        None => format!("{} dev {name}", route.destination),
    }
}

/// The name of interface `index`, if it has one.
fn interface_name(index: u32) -> Option<String> {
    let mut buf = [0 as nix::libc::c_char; nix::libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
    let name = unsafe { nix::libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: on success the kernel's name in `buf` is NUL-terminated.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

extern "C" fn on_parent_death(_: nix::libc::c_int) {
    PARENT_DIED.store(true, Ordering::Relaxed);
}

/// Catches the parent-death signal without SA_RESTART, so that a blocked
/// read returns and the helper cleans up before it exits.
fn catch_parent_death() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_parent_death),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { sigaction(PARENT_DEATH, &action) }.context("catch SIGUSR1")?;
    Ok(())
}

/// Fd 3, checked to be the daemon's `SOCK_SEQPACKET` socket.
fn take_socket() -> anyhow::Result<OwnedFd> {
    let not_started_by_simplevpnd =
        "fd 3 is not simplevpnd's socket: this program is started by simplevpnd, not by hand";
    let flags = fcntl(SOCKET_FD, FcntlArg::F_GETFD).context(not_started_by_simplevpnd)?;
    // SAFETY: fd 3 is open (F_GETFD succeeded), was given to this process by
    // its parent for exactly this purpose, and nothing else here owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(SOCKET_FD) };
    match getsockopt(&socket, sockopt::SockType) {
        Ok(SockType::SeqPacket) => {}
        _ => bail!(not_started_by_simplevpnd),
    }
    let flags = FdFlag::from_bits_retain(flags) | FdFlag::FD_CLOEXEC;
    fcntl(socket.as_raw_fd(), FcntlArg::F_SETFD(flags)).context("F_SETFD on fd 3")?;
    Ok(socket)
}

/// Ignores the signals that ask a process to stop: the helper stops when the
/// daemon does.
fn ignore_stop_signals() -> anyhow::Result<()> {
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { signal(sig, SigHandler::SigIgn) }.with_context(|| format!("ignore {sig}"))?;
    }
    Ok(())
}
