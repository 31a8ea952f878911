//! The lines the workspace's crates draw, kept by their dependency lists:
//! the sans-IO core (simplevpn-proto) can do no I/O of its own, and the
//! privileged helper (simplevpn-helper) is not built from the daemon's
//! network, TLS or database stack. `cargo tree` lists what each crate's own
//! code links (normal dependencies only: not build scripts', not tests').

use std::collections::BTreeSet;
use std::process::Command;

/// The names of every crate in `package`'s normal dependency closure,
/// itself included.
fn closure(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = Command::new(&cargo)
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("run {cargo} tree: {e}"));
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(
        names.contains(package),
        "cargo tree -p {package} does not list {package} itself: {names:?}"
    );
    names
}

/// Fails naming each crate of `forbidden` that `package` depends on, and why
/// the line matters.
fn assert_none(package: &str, forbidden: &[&str], why: &str) {
    let names = closure(package);
    let found: Vec<&str> = forbidden
        .iter()
        .copied()
        .filter(|name| names.contains(*name))
        .collect();
    assert!(
        found.is_empty(),
        "{package} depends on {found:?} ({why}); `cargo tree -p {package} -e normal -i CRATE` shows through what"
    );
}

#[test]
fn proto_has_no_io_in_its_dependencies() {
    assert_none(
        "simplevpn-proto",
        &[
            "tokio", "mio", "nix", "libc", "socket2", "rustls", "tonic", "simplevpn",
        ],
        "the core is sans-IO: bytes and the time in, frames and actions out; the I/O belongs in the simplevpn crate",
    );
}

#[test]
fn helper_has_no_daemon_stack_in_its_dependencies() {
    assert_none(
        "simplevpn-helper",
        &["tonic", "rustls", "rusqlite", "hyper", "simplevpn"],
        "the helper keeps CAP_NET_ADMIN: auditing it must not mean auditing the daemon's control API, TLS or state store",
    );
}

#[test]
fn helper_has_no_tokio_in_its_dependencies() {
    assert_none(
        "simplevpn-helper",
        &["tokio", "mio", "rtnetlink", "netlink-proto"],
        "the helper serves one request at a time with blocking calls (netlink-sys, zbus's blocking API on its own executor); an async runtime is code to audit that it does not need",
    );
}
