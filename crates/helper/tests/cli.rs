//! The helper binary's command line, as simplevpnd's start meets it: a bad
//! flag is one line on stderr and exit code 2, before the helper looks for
//! its socket or needs any privilege. (Being an integration test, this also
//! makes `cargo test --workspace` build target/*/simplevpn-helper, which
//! the daemon's end-to-end tests start.)

use std::process::Command;

const HELPER: &str = env!("CARGO_BIN_EXE_simplevpn-helper");

#[test]
fn unknown_flag_is_one_line_and_exit_code_2() {
    let out = Command::new(HELPER)
        .arg("--no-such-flag")
        .output()
        .expect("run simplevpn-helper");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(
        stderr.contains("--no-such-flag"),
        "names the flag: {stderr}"
    );
}

#[test]
fn help_exits_0_on_stdout() {
    let out = Command::new(HELPER)
        .arg("--help")
        .output()
        .expect("run simplevpn-helper");
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("--user"), "the help lists --user: {stdout}");
}
