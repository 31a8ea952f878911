//! The client-only build (`--no-default-features`, what simplevpn-client
//! ships), taken from `SIMPLEVPN_CLIENT_BIN_DIR` (see
//! `common::vpn::client_simplevpnd`): it refuses to be a server with one
//! line and exit code 2, and its keygen and check work. Without
//! `SIMPLEVPN_CLIENT_BIN_DIR` there is no client-only build to test and
//! each test says it is skipped (.ci/run builds the client-only build and
//! sets it, and runs tests/tunnel.rs with its clients from the same build).

mod common;

use std::process::{Command, Output};

use common::vpn::client_simplevpnd;

/// The client-only simplevpnd, or None (with a notice) without one.
fn small(test: &str) -> Option<&'static str> {
    if std::env::var_os("SIMPLEVPN_CLIENT_BIN_DIR").is_none() {
        eprintln!("skipping {test}: SIMPLEVPN_CLIENT_BIN_DIR names no client-only build");
        return None;
    }
    Some(client_simplevpnd())
}

fn run(daemon: &str, args: &[&str]) -> Output {
    Command::new(daemon)
        .args(args)
        .output()
        .expect("run the client-only simplevpnd")
}

/// The one line on stderr, which must be the only one.
fn one_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    stderr
}

#[test]
fn the_client_only_build_refuses_to_serve_with_one_line() {
    let Some(daemon) = small("the_client_only_build_refuses_to_serve_with_one_line") else {
        return;
    };
    let dir = tempdir("serve");

    let out = run(
        daemon,
        &["server", "--network", "198.19.0.0/16", "--legacy"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let line = one_line(&out);
    assert!(line.contains("client-only build"), "{line}");
    assert!(line.starts_with("simplevpnd: server: "), "{line}");

    // A config file with a [server] table, run and checked.
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"198.18.0.1:2002\"\nnetwork = \"198.19.0.0/16\"\n",
    )
    .expect("write config");
    let config = config.to_str().expect("utf-8");
    for args in [vec!["--config", config], vec!["--config", config, "check"]] {
        let out = run(daemon, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let line = one_line(&out);
        assert!(line.contains("client-only build"), "{args:?}: {line}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_client_only_build_makes_keys_and_checks_a_client_config() {
    let Some(daemon) = small("the_client_only_build_makes_keys_and_checks_a_client_config") else {
        return;
    };
    let dir = tempdir("keys");
    let key = dir.join("client.key");
    let key = key.to_str().expect("utf-8");
    let out = run(daemon, &["keygen", key]);
    assert!(out.status.success(), "{out:?}");
    let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!public.is_empty());
    let out = run(daemon, &["pubkey", key]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), public);

    let config = dir.join("client.toml");
    std::fs::write(
        &config,
        "[client]\nserver = \"198.18.0.1:2002\"\nlegacy = true\nuser = \"nobody\"\n",
    )
    .expect("write config");
    let out = run(
        daemon,
        &["--config", config.to_str().expect("utf-8"), "check"],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ok: "),
        "{out:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("svt-small-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
