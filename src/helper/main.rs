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
//!
//! It never runs a shell or any other program. SIGINT, SIGTERM and SIGHUP are
//! ignored: a terminal's Ctrl-C or systemd's stop reaches the daemon too, and
//! the helper leaves only after the daemon has.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use caps::Capability;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::prctl;
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::socket::SockType;
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::getppid;
use simplevpn::privsep::args::HelperArgs;
use simplevpn::privsep::channel::{self, Message};
use simplevpn::privsep::credentials::{self, ServiceUser};
use simplevpn::privsep::netdev::{self, LinkConfig, NetdevError};
use simplevpn::privsep::policy::Policy;
use simplevpn::privsep::protocol::{decode, encode, HelperRequest, HelperResponse};
use simplevpn::program;
use tracing::{error, info, info_span, warn};

/// The daemon's socket, as set up by simplevpnd.
const SOCKET_FD: RawFd = 3;

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
    let policy = args.policy().map_err(|e| anyhow!(e))?;
    let user = ServiceUser::lookup(&args.user)?;
    let device = netdev::open_tun_device()?;
    credentials::become_user(&user, &[Capability::CAP_NET_ADMIN]).context("dropping privileges")?;
    // After the uid change, which clears it. The socket's EOF is the main
    // signal that the daemon is gone; this covers a helper stuck elsewhere.
    prctl::set_pdeathsig(Signal::SIGKILL).context("PR_SET_PDEATHSIG")?;
    if getppid() != parent {
        info!("simplevpnd exited before the helper was ready");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the netlink runtime")?;
    let links = runtime.block_on(LinkConfig::connect())?;
    let mut state = State {
        args,
        policy,
        device: Some(device),
        tun: None,
        links,
        runtime,
    };

    loop {
        let message = match channel::recv(socket.as_fd()) {
            Ok(message) => message,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
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
        let fd = match (&response, &state.tun) {
            (HelperResponse::Tun { .. }, Some((_, fd))) => Some(fd.as_fd()),
            _ => None,
        };
        let frame = encode(&response).context("encoding a response")?;
        match channel::send(socket.as_fd(), &frame, fd) {
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
    /// /dev/net/tun, opened at startup (as root), until `OpenTun` turns it
    /// into the tun.
    device: Option<OwnedFd>,
    /// The tun's name and this helper's own fd for it.
    tun: Option<(String, OwnedFd)>,
    links: LinkConfig,
    runtime: tokio::runtime::Runtime,
}

impl State {
    /// Checks and carries out one request.
    fn handle(&mut self, message: Message) -> HelperResponse {
        if message.fd.is_some() {
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
        if let Err(refusal) = self.policy.check(&request) {
            warn!("refused to {request}: {refusal}");
            return HelperResponse::Refused(refusal.to_string());
        }
        match self.execute(&request) {
            Ok(response) => response,
            Err(e) => {
                warn!("failed to {request}: {e}");
                HelperResponse::Failed(e.to_string())
            }
        }
    }

    /// Carries out an allowed request and records it in the policy.
    fn execute(&mut self, request: &HelperRequest) -> Result<HelperResponse, NetdevError> {
        let links = &self.links;
        let done = match *request {
            HelperRequest::OpenTun => {
                // The policy allows OpenTun once, so the device is still here;
                // there is no second way to a tun (opening /dev/net/tun again
                // may need the root this process no longer has).
                let created = self
                    .device
                    .take()
                    .ok_or_else(|| NetdevError::OpenTun(io::Error::other("already used")))
                    .and_then(|device| netdev::attach_tun(device, &self.args.tun));
                self.policy
                    .record(request, created.as_ref().ok().map(|tun| tun.index));
                let tun = created?;
                info!(tun = %tun.name, index = tun.index, "created the tun");
                let response = HelperResponse::Tun {
                    name: tun.name.clone(),
                    index: tun.index,
                };
                self.tun = Some((tun.name, tun.fd));
                return Ok(response);
            }
            HelperRequest::SetAddress {
                index,
                address,
                prefix,
            } => self
                .runtime
                .block_on(links.set_ipv4(index, address, prefix)),
            HelperRequest::SetMtu { index, mtu } => {
                self.runtime.block_on(links.set_mtu(index, mtu))
            }
            HelperRequest::LinkUp { index } => self.runtime.block_on(links.set_up(index)),
            HelperRequest::AddRoute { index, destination } => {
                self.runtime.block_on(links.add_route(index, destination))
            }
            HelperRequest::DelRoute { index, destination } => {
                self.runtime.block_on(links.del_route(index, destination))
            }
        };
        done?;
        self.policy.record(request, None);
        Ok(HelperResponse::Ok)
    }
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
