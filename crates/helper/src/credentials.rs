//! Who a process runs as, and giving up everything else: the service user,
//! supplementary groups, the capability sets and no_new_privs.
//!
//! Both programs call [`become_user`] at startup while they are still
//! single-threaded: glibc's set*id calls change every thread, but `capset`
//! and `prctl` act on the calling thread only, so a thread started earlier
//! would keep what the others gave up.

use std::collections::HashSet;
use std::io;

use caps::{CapSet, Capability};
use nix::libc;
use nix::sys::prctl;
use nix::unistd::{getgroups, getresgid, getresuid, setgid, setgroups, setresgid, setresuid};
use nix::unistd::{setuid, Gid, Uid, User};

use simplevpn_proto::ConfigError;

/// The unprivileged user a program switches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

impl ServiceUser {
    /// Looks `name` up in the user database. A missing user, or one that is
    /// root or in group root, is a config error that says what to do.
    pub fn lookup(name: &str) -> Result<ServiceUser, ConfigError> {
        ServiceUser::lookup_setting("user", name)
    }

    /// The daemon's user (`user`) and the helper's (`helper_user`), looked
    /// up; they must be two users, with two uids.
    pub fn daemon_and_helper(
        user: &str,
        helper: &str,
    ) -> Result<(ServiceUser, ServiceUser), ConfigError> {
        let user = ServiceUser::lookup_setting("user", user)?;
        let helper = ServiceUser::lookup_setting("helper_user", helper)?;
        if helper.uid == user.uid {
            return Err(ConfigError::new(
                "helper_user",
                format!(
                    "{:?} has the daemon's uid {}; the helper needs a user of its own",
                    helper.name, user.uid
                ),
            ));
        }
        Ok((user, helper))
    }

    /// [`ServiceUser::lookup`] for the setting `field` (`user`, `helper_user`).
    pub fn lookup_setting(field: &str, name: &str) -> Result<ServiceUser, ConfigError> {
        let user = match User::from_name(name) {
            Ok(Some(user)) => user,
            Ok(None) => {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "no such user {name:?}; create it with: \
                         useradd --system --no-create-home --shell /usr/sbin/nologin {name}"
                    ),
                ))
            }
            Err(e) => return Err(ConfigError::new(field, format!("look up {name:?}: {e}"))),
        };
        if user.uid.is_root() || user.gid.as_raw() == 0 {
            return Err(ConfigError::new(
                field,
                format!("{name:?} is root or in group root; give an unprivileged user"),
            ));
        }
        Ok(ServiceUser {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
        })
    }
}

/// A step of dropping privileges that failed, or a check afterwards that
/// found something left.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("{step}: {source}")]
    Step {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("after dropping privileges, {0}")]
    Left(String),
}

/// Switches the process to `user` and keeps only the capabilities in `keep`,
/// in the effective and permitted sets; the bounding set becomes `keep` too,
/// the inheritable and ambient sets empty, and no_new_privs is set. Then
/// checks the result; if the process can still become root it aborts.
///
/// Needs root (CAP_SETPCAP, CAP_SETUID, CAP_SETGID) and a single thread.
pub fn become_user(user: &ServiceUser, keep: &[Capability]) -> Result<(), PrivilegeError> {
    let keep_set: HashSet<Capability> = keep.iter().copied().collect();
    let step = |step: &'static str| {
        move |e: nix::Error| PrivilegeError::Step {
            step,
            source: e.into(),
        }
    };
    let caps_step = |step: &'static str| {
        move |e: caps::errors::CapsError| PrivilegeError::Step {
            step,
            source: io::Error::other(e.to_string()),
        }
    };

    // The bounding set first: dropping from it needs CAP_SETPCAP, which the
    // uid change takes away.
    for index in kernel_capabilities() {
        if !keep.iter().any(|c| c.index() == index) {
            // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointers.
            let rc =
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(index), 0, 0, 0) };
            if rc != 0 {
                return Err(PrivilegeError::Step {
                    step: "drop from the bounding set",
                    source: io::Error::last_os_error(),
                });
            }
        }
    }
    // Without keepcaps the uid change empties the permitted set.
    if !keep.is_empty() {
        prctl::set_keepcaps(true).map_err(step("PR_SET_KEEPCAPS"))?;
    }
    setgroups(&[]).map_err(step("clear supplementary groups"))?;
    setresgid(user.gid, user.gid, user.gid).map_err(step("setgid"))?;
    setresuid(user.uid, user.uid, user.uid).map_err(step("setuid"))?;
    if !keep.is_empty() {
        prctl::set_keepcaps(false).map_err(step("PR_SET_KEEPCAPS"))?;
    }
    caps::clear(None, CapSet::Effective).map_err(caps_step("clear the effective set"))?;
    caps::set(None, CapSet::Permitted, &keep_set).map_err(caps_step("set the permitted set"))?;
    caps::set(None, CapSet::Effective, &keep_set).map_err(caps_step("set the effective set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_step("clear the inheritable set"))?;
    caps::clear(None, CapSet::Ambient).map_err(caps_step("clear the ambient set"))?;
    prctl::set_no_new_privs().map_err(step("PR_SET_NO_NEW_PRIVS"))?;

    if setuid(Uid::from_raw(0)).is_ok() || setgid(Gid::from_raw(0)).is_ok() {
        eprintln!("fatal: could become root again after dropping privileges; aborting");
        std::process::abort();
    }
    check(user, &keep_set)
}

/// Every capability number the running kernel knows (which may be more than
/// the `caps` crate names).
fn kernel_capabilities() -> impl Iterator<Item = u8> {
    // SAFETY: PR_CAPBSET_READ takes a capability number and no pointers; it
    // fails with EINVAL past the last capability.
    (0u8..64).take_while(
        |&i| unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(i), 0, 0, 0) } >= 0,
    )
}

/// Verifies what [`become_user`] should have achieved.
fn check(user: &ServiceUser, keep: &HashSet<Capability>) -> Result<(), PrivilegeError> {
    let left = |what: String| Err(PrivilegeError::Left(what));
    let uids = getresuid().map_err(|e| PrivilegeError::Left(format!("getresuid: {e}")))?;
    let gids = getresgid().map_err(|e| PrivilegeError::Left(format!("getresgid: {e}")))?;
    if [uids.real, uids.effective, uids.saved] != [user.uid; 3]
        || [gids.real, gids.effective, gids.saved] != [user.gid; 3]
    {
        return left(format!(
            "uids {uids:?} / gids {gids:?} are not all {}",
            user.name
        ));
    }
    match getgroups() {
        Ok(groups) if groups.is_empty() => {}
        Ok(groups) => return left(format!("supplementary groups {groups:?} remain")),
        Err(e) => return left(format!("getgroups: {e}")),
    }
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
    ] {
        let want = match set {
            CapSet::Effective | CapSet::Permitted => keep.clone(),
            _ => HashSet::new(),
        };
        match caps::read(None, set) {
            Ok(have) if have == want => {}
            Ok(have) => return left(format!("the {set:?} set is {have:?}, not {want:?}")),
            Err(e) => return left(format!("read the {set:?} set: {e}")),
        }
    }
    for index in kernel_capabilities() {
        // SAFETY: as in kernel_capabilities.
        let has =
            unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(index), 0, 0, 0) } == 1;
        if has != keep.iter().any(|c| c.index() == index) {
            return left(format!(
                "capability {index} is wrongly in or out of the bounding set"
            ));
        }
    }
    match prctl::get_no_new_privs() {
        Ok(true) => Ok(()),
        Ok(false) => left("no_new_privs is not set".into()),
        Err(e) => left(format!("PR_GET_NO_NEW_PRIVS: {e}")),
    }
}
