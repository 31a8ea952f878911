//! What simplevpnd does first, as root, while it is still a single thread
//! and before it touches the network or the control socket: start
//! simplevpn-helper (the only privileged process from then on), then drop to
//! the service user with no capabilities at all.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::dir::{Dir, Type as DirType};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::libc;
use nix::sys::stat::{fstat, Mode, SFlag};
use nix::unistd::{fchown, geteuid};
use tracing::warn;

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
///
/// The service user can write in that directory, so nothing in it is
/// trusted: the directory and each entry are opened with `O_NOFOLLOW`
/// (relative to the directory's own fd, so a renamed parent changes
/// nothing), checked with `fstat`, and changed with `fchown`. Only the
/// directory and regular files with a single link are given away; a
/// symlink, a hard link to a file elsewhere, a FIFO or a device is logged
/// and skipped ([`StateEntry`]).
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
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir_fd = open_owned(None, dir, flags).map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => problem("is not a directory (a symlink?)".into()),
        e => problem(e.to_string()),
    })?;
    let mut listing = Dir::openat(
        Some(dir_fd.as_raw_fd()),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| problem(e.to_string()))?;
    let mut ours = Vec::new();
    for entry in listing.iter() {
        let entry = entry.map_err(|e| problem(e.to_string()))?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
        // Directories are the states of other daemons (simplevpnd@NAME
        // keeps its own in /var/lib/simplevpn/NAME): not ours to change.
        if entry.file_type() == Some(DirType::Directory) {
            continue;
        }
        if !name.to_string_lossy().starts_with(crate::state::STATE_FILE) {
            // Not only ours: leave ownership alone.
            return Ok(());
        }
        ours.push(name);
    }
    fchown(dir_fd.as_raw_fd(), Some(user.uid), Some(user.gid))
        .map_err(|e| problem(format!("chown to {}: {e}", user.name)))?;
    for name in ours {
        match give_entry(&dir_fd, Path::new(&name), user) {
            Ok(()) => {}
            Err(skipped) => warn!(
                dir = %dir.display(),
                entry = %name.to_string_lossy(),
                "state directory: left {skipped} as it is (not given to {})",
                user.name
            ),
        }
    }
    Ok(())
}

/// Why an entry of the state directory was not given to the service user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateEntry {
    #[error("a symlink")]
    Symlink,
    #[error("a file with {0} hard links")]
    HardLinked(u64),
    #[error("something other than a regular file")]
    NotAFile,
    #[error("an entry it could not open or change ({0})")]
    Failed(Errno),
}

/// Gives one entry of the state directory to `user`, if it is a regular
/// file with one link, never following a link.
fn give_entry(dir: &OwnedFd, name: &Path, user: &ServiceUser) -> Result<(), StateEntry> {
    // O_NONBLOCK: opening a FIFO planted there must not hang the start.
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = open_owned(Some(dir), name, flags).map_err(|e| match e {
        Errno::ELOOP => StateEntry::Symlink,
        e => StateEntry::Failed(e),
    })?;
    let stat = fstat(fd.as_raw_fd()).map_err(StateEntry::Failed)?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(StateEntry::NotAFile);
    }
    if stat.st_nlink != 1 {
        return Err(StateEntry::HardLinked(stat.st_nlink));
    }
    fchown(fd.as_raw_fd(), Some(user.uid), Some(user.gid)).map_err(StateEntry::Failed)
}

/// `openat` (or `open` without a directory), as an fd that closes itself.
fn open_owned(dir: Option<&OwnedFd>, path: &Path, flags: OFlag) -> Result<OwnedFd, Errno> {
    let raw = match dir {
        Some(dir) => openat(Some(dir.as_raw_fd()), path, flags, Mode::empty())?,
        None => nix::fcntl::open(path, flags, Mode::empty())?,
    };
    // SAFETY: `raw` was just returned by open(2) and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
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
            user: config.helper_user.clone(),
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
            dns_all_domains: false,
            // A tun queue per worker: each reads its share of the tun.
            queues: config.workers.clamp(1, MAX_TUN_QUEUES) as u16,
        },
        Role::Client(config) => HelperArgs {
            role: HelperRole::Client,
            tun: config.tun.clone(),
            network: config.network,
            network6: config.network6,
            max_mtu: config.max_frame as u32,
            user: config.helper_user.clone(),
            routes: config.accept_routes.iter().flatten().copied().collect(),
            any_route: config.accept_routes.is_none(),
            masquerade: false,
            forwarding: false,
            full_tunnel: config.full_tunnel,
            dns: config.dns.applies(),
            dns_all_domains: config.dns == crate::config::DnsMode::PushedAllDomains,
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

    /// As root only (the tests in namespaces run as root): a state
    /// directory with a symlink to a root-owned file, a hard link to one, a
    /// FIFO and a real state file, taken twice: only the directory and the
    /// real file become the user's.
    #[test]
    fn the_state_directory_is_taken_without_following_any_link() {
        if !geteuid().is_root() {
            eprintln!("skipped: needs root (chown)");
            return;
        }
        let user = ServiceUser::lookup("nobody").expect("user nobody");
        let base = std::env::temp_dir().join(format!("svpn-state-{}", std::process::id()));
        let dir = base.join("state");
        std::fs::create_dir_all(&dir).expect("state dir");
        let victim = base.join("victim");
        let pinned = base.join("pinned");
        std::fs::write(&victim, b"root's secret").expect("victim");
        std::fs::write(&pinned, b"root's other file").expect("pinned");
        std::fs::write(dir.join("state.db"), b"").expect("state file");
        std::os::unix::fs::symlink(&victim, dir.join("state.db-x")).expect("symlink");
        std::fs::hard_link(&pinned, dir.join("state.db-h")).expect("hard link");
        nix::unistd::mkfifo(&dir.join("state.db-fifo"), Mode::from_bits_truncate(0o600))
            .expect("fifo");
        for _ in 0..2 {
            take_state_dir(&dir, &user).expect("taken");
        }
        let owner = |p: &Path| std::fs::symlink_metadata(p).expect("stat").uid();
        assert_eq!(owner(&dir), user.uid.as_raw());
        assert_eq!(owner(&dir.join("state.db")), user.uid.as_raw());
        assert_eq!(owner(&victim), 0, "a symlink was followed");
        assert_eq!(owner(&pinned), 0, "a hard link was given away");
        assert_eq!(owner(&dir.join("state.db-fifo")), 0);
        assert_eq!(
            std::fs::read(&victim).expect("read"),
            b"root's secret".to_vec()
        );
        // The directory itself as a symlink is refused, not followed.
        let link = base.join("link");
        std::os::unix::fs::symlink(&dir, &link).expect("dir symlink");
        assert!(matches!(
            take_state_dir(&link, &user),
            Err(StartError::StateDir { .. })
        ));
        std::fs::remove_dir_all(&base).ok();
    }

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
