//! What simplevpnd does first, as root, while it is still a single thread
//! and before it touches the network or the control socket: start
//! simplevpn-helper (the only privileged process from then on), then drop to
//! the service user with no capabilities at all.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::libc;
use nix::unistd::geteuid;

use super::Role;
use crate::limits::MAX_TUN_QUEUES;
use crate::privsep::args::{HelperArgs, HelperRole};
use crate::privsep::channel;
use crate::privsep::credentials::{become_user, PrivilegeError, ServiceUser};

/// The helper's file name, looked for beside simplevpnd's own executable.
pub const HELPER_NAME: &str = "simplevpn-helper";
/// Where packages install the helper.
pub const LIBEXEC_HELPER: &str = "/usr/libexec/simplevpn/simplevpn-helper";
/// The fd the helper finds its socket on.
const HELPER_FD: i32 = 3;

/// Why the privileged start failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "must be started as root: it starts simplevpn-helper with CAP_NET_ADMIN, \
         then drops to user {0:?} itself"
    )]
    NotRoot(String),
    #[error("{HELPER_NAME} not found: looked for {0}")]
    HelperNotFound(String),
    #[error("refusing to run {path}: {why}")]
    HelperUntrusted { path: PathBuf, why: String },
    #[error("start {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("create the helper's socketpair: {0}")]
    Socket(io::Error),
    #[error("dropping privileges: {0}")]
    Drop(#[from] PrivilegeError),
    #[error("state_dir {path}: {problem}")]
    StateDir { path: PathBuf, problem: String },
}

/// Makes the server's state directory ready for `user`, as root, before
/// privileges are dropped: created (mode 0700) if missing, and given to the
/// user with the state files in it (subdirectories, the states of other
/// daemons, are left alone). A directory that holds any other file
/// (say `/` or `/tmp` by mistake) is never taken over: it must then be
/// writable by the user already, or opening the database says why not.
/// Under systemd, `StateDirectory=simplevpn` makes /var/lib/simplevpn, owned
/// by root (the unit has no `User=`): this gives it to the service user.
pub fn take_state_dir(dir: &Path, user: &ServiceUser) -> Result<(), StartError> {
    let problem = |problem: String| StartError::StateDir {
        path: dir.to_path_buf(),
        problem,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| problem(e.to_string()))?;
    }
    let entries = std::fs::read_dir(dir).map_err(|e| problem(e.to_string()))?;
    let mut ours = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| problem(e.to_string()))?;
        let name = entry.file_name();
        // Directories are the states of other daemons (simplevpnd@NAME
        // keeps its own in /var/lib/simplevpn/NAME): not ours to change.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if !name.to_string_lossy().starts_with(crate::state::STATE_FILE) {
            // Not only ours: leave ownership alone.
            return Ok(());
        }
        ours.push(entry.path());
    }
    for path in std::iter::once(dir.to_path_buf()).chain(ours) {
        nix::unistd::chown(&path, Some(user.uid), Some(user.gid))
            .map_err(|e| problem(format!("chown {} to {}: {e}", path.display(), user.name)))?;
    }
    Ok(())
}

/// The running helper.
#[derive(Debug)]
pub struct HelperProcess {
    /// The helper process; reap it with [`reap`] after closing the socket.
    pub child: Child,
    /// The daemon's end of the socketpair, for [`super::helper::Helper::new`].
    pub socket: OwnedFd,
}

/// Starts the helper for `role`, then switches this process to `user` with
/// every capability gone and no_new_privs set. Needs root and a single thread.
pub fn start(role: &Role, user: &ServiceUser) -> Result<HelperProcess, StartError> {
    require_root(user)?;
    let helper = spawn_helper(&helper_path()?, &helper_args(role))?;
    become_user(user, &[])?;
    Ok(helper)
}

/// simplevpnd starts as root and drops privileges itself; started as anyone
/// else it could neither give the helper CAP_NET_ADMIN nor become `user`.
pub fn require_root(user: &ServiceUser) -> Result<(), StartError> {
    match geteuid().is_root() {
        true => Ok(()),
        false => Err(StartError::NotRoot(user.name.clone())),
    }
}

/// The helper's command line for `role`.
pub fn helper_args(role: &Role) -> HelperArgs {
    match role {
        Role::Server(config) => HelperArgs {
            role: HelperRole::Server,
            tun: config.tun.clone(),
            network: Some(config.network),
            network6: config.network6,
            max_mtu: config.max_frame as u32,
            user: config.user.clone(),
            // The server routes the networks behind its peers into its tun.
            routes: config
                .peers
                .iter()
                .flat_map(|p| p.routes.iter().copied())
                .collect(),
            any_route: false,
            masquerade: config.masquerade,
            forwarding: config.forwarding,
            full_tunnel: false,
            dns: false,
            // A tun queue per worker: each reads its share of the tun.
            queues: config.workers.clamp(1, MAX_TUN_QUEUES) as u16,
        },
        Role::Client(config) => HelperArgs {
            role: HelperRole::Client,
            tun: config.tun.clone(),
            network: config.network,
            network6: config.network6,
            max_mtu: config.max_frame as u32,
            user: config.user.clone(),
            routes: config.accept_routes.iter().flatten().copied().collect(),
            any_route: config.accept_routes.is_none(),
            masquerade: false,
            forwarding: false,
            full_tunnel: config.full_tunnel,
            dns: config.dns == crate::config::DnsMode::Pushed,
            queues: 1,
        },
    }
}

/// The helper beside simplevpnd's own executable, else the packaged one.
fn helper_path() -> Result<PathBuf, StartError> {
    let exe = std::env::current_exe().ok();
    let beside = exe
        .as_deref()
        .and_then(Path::parent)
        .map(|dir| dir.join(HELPER_NAME));
    let candidates: Vec<PathBuf> = beside.into_iter().chain([LIBEXEC_HELPER.into()]).collect();
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        return Err(StartError::HelperNotFound(looked.join(" and ")));
    };
    let exe_owner = exe
        .and_then(|exe| std::fs::metadata(exe).ok())
        .map(|m| m.uid());
    trusted(path, exe_owner)?;
    Ok(path.clone())
}

/// A root process runs the helper: it must be owned by root (or by whoever
/// owns simplevpnd itself) and writable by its owner only.
fn trusted(path: &Path, exe_owner: Option<u32>) -> Result<(), StartError> {
    let untrusted = |why: String| StartError::HelperUntrusted {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| untrusted(e.to_string()))?;
    if meta.uid() != 0 && Some(meta.uid()) != exe_owner {
        return Err(untrusted(format!(
            "owned by uid {}, neither root nor the owner of simplevpnd",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Starts the helper with its end of a fresh socketpair as fd 3, a clean
/// environment (RUST_LOG only) and stdin from /dev/null.
fn spawn_helper(path: &Path, args: &HelperArgs) -> Result<HelperProcess, StartError> {
    let (ours, theirs) = channel::pair().map_err(StartError::Socket)?;
    let theirs_raw = theirs.as_raw_fd();
    let mut command = Command::new(path);
    command
        .args(args.to_args())
        .env_clear()
        .stdin(Stdio::null());
    if let Some(filter) = std::env::var_os("RUST_LOG") {
        command.env("RUST_LOG", filter);
    }
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls (fcntl, dup2).
    unsafe {
        command.pre_exec(move || {
            // dup2 clears close-on-exec on the copy; if the socket already is
            // fd 3, clear it by hand.
            let rc = if theirs_raw == HELPER_FD {
                libc::fcntl(HELPER_FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(theirs_raw, HELPER_FD)
            };
            if rc == -1 {
                return Err(io::Error::last_os_error());
            }
            // Nothing else this process inherited reaches the helper: every
            // fd above 3 becomes close-on-exec (best effort: Linux >= 5.11).
            libc::syscall(
                libc::SYS_close_range,
                HELPER_FD + 1,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| StartError::Spawn {
        path: path.to_path_buf(),
        source,
    })?;
    drop(theirs);
    Ok(HelperProcess {
        child,
        socket: ours,
    })
}

/// Waits up to `timeout` for the helper to exit (it does once the daemon's
/// end of the socket is closed, and the tun goes with it); kills it if it
/// does not. Returns its exit status, if it could be reaped.
pub fn reap(mut child: Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                return child.wait().ok();
            }
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_a_root_or_same_owner_file_writable_by_its_owner_is_run() {
        let dir = std::env::temp_dir().join(format!("svpn-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("helper");
        std::fs::write(&file, b"").expect("write");
        let owner = std::fs::metadata(&file).expect("stat").uid();

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(trusted(&file, Some(owner)).is_ok());
        if owner != 0 {
            assert!(trusted(&file, None).is_err(), "owned by neither");
        }
        for mode in [0o775, 0o757, 0o777] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).expect("chmod");
            assert!(trusted(&file, Some(owner)).is_err(), "mode {mode:o}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
