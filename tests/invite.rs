//! Invitations end to end: `svpnctl invite` on a real server, `simplevpnd
//! join` in a client namespace, the joined host connecting with its own
//! key; used, expired, revoked, unknown and mistyped tokens refused with
//! nothing changed.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::Duration;

use common::require_root;
use common::vpn::*;
use simplevpn::join::{RandomSecret, Secret, Token};

/// Runs `simplevpnd join TOKEN` with `extra` flags in client namespace 0.
fn join(bed: &Bed, token: &str, extra: &[&str]) -> Output {
    let mut args = vec!["join", token];
    args.extend_from_slice(extra);
    bed.clients[0].run(SIMPLEVPND, &args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The token of `svpnctl invite NAME extra...`.
fn invite(socket: &str, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["invite", name];
    args.extend_from_slice(extra);
    let out = svpnctl(socket, &args, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    let token = line
        .trim()
        .strip_prefix("simplevpnd join ")
        .unwrap_or_else(|| panic!("not one join line: {line:?}"));
    assert_eq!(line.lines().count(), 1, "{line}");
    token.to_string()
}

/// The state `svpnctl invite list --json` gives `name`.
fn state(socket: &str, name: &str) -> String {
    let list = svpnctl_json(socket, &["invite", "list"]);
    list.as_array()
        .and_then(|all| all.iter().find(|i| i["name"] == name))
        .and_then(|i| i["state"].as_str())
        .unwrap_or_else(|| panic!("{name} is not listed: {list}"))
        .to_string()
}

/// Asserts that a join was refused with `code` and `says`, and that the
/// allowed keys and the invitations are as they were.
fn refused(bed: &Bed, out: &Output, code: i32, says: &str, allowed: &serde_json::Value) {
    let socket = bed.server_socket();
    assert_eq!(out.status.code(), Some(code), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(says), "{}", text(&out.stderr));
    assert_eq!(&svpnctl_json(&socket, &["peer", "list"]), allowed);
}

#[test]
fn a_host_joins_once_with_its_own_key_and_bad_tokens_change_nothing() {
    if !require_root("a_host_joins_once_with_its_own_key_and_bad_tokens_change_nothing") {
        return;
    }
    let bed = Bed::new("invite", 1);
    let (server_key, server_pub) = keygen(&bed, "server");
    let endpoint = bed.server_addr(0).to_string();
    let server = bed.start_server(&["--key", &server_key, "--endpoint", &endpoint]);
    let socket = bed.server_socket();
    let none = svpnctl_json(&socket, &["peer", "list"]);

    let token = invite(&socket, "laptop", &["--address", "198.19.0.50"]);
    let decoded = Token::decode(&token).expect("a token");
    assert_eq!(decoded.endpoint, endpoint);
    assert_eq!(decoded.server_keys[0].to_string(), server_pub);
    assert_eq!(state(&socket, "laptop"), "open");
    // The list never shows the secret.
    let listed = text(&svpnctl(&socket, &["--json", "invite", "list"], None).stdout);
    assert!(!listed.contains(&token[6..20]), "{listed}");

    let (config, key) = (bed.path("laptop.toml"), bed.path("laptop.key"));
    let files = ["--config-out", config.as_str(), "--key", key.as_str()];

    // One character changed: refused here, before anything is dialed.
    let mut altered = token.clone().into_bytes();
    let i = altered.len() / 2;
    altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).expect("ascii");
    let out = join(&bed, &altered, &files);
    refused(&bed, &out, 2, "mistyped", &none);
    assert!(!std::path::Path::new(&config).exists());
    assert!(!std::path::Path::new(&key).exists());
    assert_eq!(state(&socket, "laptop"), "open");

    // A well-formed token with a secret the server never made: refused
    // by the server (counted as a refused join), nothing changed.
    let forged = Token {
        secret: Secret::random().expect("secret"),
        ..decoded
    }
    .encode()
    .expect("encode");
    let out = join(&bed, &forged, &files);
    refused(&bed, &out, 1, "no such invitation", &none);
    assert!(!std::path::Path::new(&config).exists());
    assert_eq!(state(&socket, "laptop"), "open");
    assert!(
        server.wait_for_log("join_refused", Duration::from_secs(5)),
        "{}",
        server.log()
    );

    // The real one: the key made here, the config written, the key allowed.
    let out = join(&bed, &token, &files);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("joined as laptop"), "{said}");
    assert!(said.contains(&format!("--config {config}")), "{said}");
    let mode = |path: &str| std::fs::metadata(path).expect("file").permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&config), 0o644);
    let written = std::fs::read_to_string(&config).expect("config");
    assert!(
        written.contains(&format!("server_key = \"{server_pub}\"")),
        "{written}"
    );
    assert!(written.contains("address = \"198.19.0.50\""), "{written}");
    assert!(!written.contains("private_key"), "{written}");
    let joined_pub = pubkey(&key);
    let allowed = svpnctl_json(&socket, &["peer", "list"]);
    assert_eq!(allowed[0]["name"], "laptop", "{allowed}");
    assert_eq!(allowed[0]["key"], joined_pub.as_str(), "{allowed}");
    assert_eq!(state(&socket, "laptop"), "used");

    // Once only: the same token again is refused, nothing changes (and the
    // existing config is not overwritten without --force).
    let out = join(&bed, &token, &files);
    refused(&bed, &out, 2, "--force", &allowed);
    let other_key = bed.path("other.key");
    let again = [
        "--config-out",
        config.as_str(),
        "--key",
        other_key.as_str(),
        "--force",
    ];
    let out = join(&bed, &token, &again);
    refused(&bed, &out, 1, "used already", &allowed);
    assert_eq!(std::fs::read_to_string(&config).expect("config"), written);
    assert_eq!(state(&socket, "laptop"), "used");

    // The joined host connects with its own key, gets its address, and is
    // listed by name.
    let client = bed.start_client(0, &["--config", &config]);
    assert!(client.log().contains("198.19.0.50"), "{}", client.log());
    let peers = svpnctl_json(&socket, &["peers"]);
    assert_eq!(peers[0]["name"], "laptop", "{peers}");
    assert_eq!(peers[0]["address"], "198.19.0.50", "{peers}");
    assert_eq!(peers[0]["key"], joined_pub.as_str(), "{peers}");
    drop(client);

    // Two hosts racing with one token: one joins, the other is refused.
    let racing = invite(&socket, "racer", &[]);
    let outs: Vec<Output> = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..2)
            .map(|n| {
                let (config, key) = (
                    bed.path(&format!("r{n}.toml")),
                    bed.path(&format!("r{n}.key")),
                );
                let racing = racing.clone();
                let bed = &bed;
                scope.spawn(move || join(bed, &racing, &["--config-out", &config, "--key", &key]))
            })
            .collect();
        runs.into_iter().map(|r| r.join().expect("join")).collect()
    });
    let won = outs.iter().filter(|o| o.status.success()).count();
    let lost: Vec<_> = outs.iter().filter(|o| !o.status.success()).collect();
    assert_eq!(won, 1, "{outs:?}");
    assert!(text(&lost[0].stderr).contains("used already"), "{outs:?}");
    let after_race = svpnctl_json(&socket, &["peer", "list"]);
    let names: Vec<_> = after_race
        .as_array()
        .expect("list")
        .iter()
        .map(|p| p["name"].clone())
        .collect();
    assert_eq!(names, ["laptop", "racer"], "{after_race}");
    let allowed = after_race;

    // Expired.
    let expiring = invite(&socket, "phone", &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(state(&socket, "phone"), "expired");
    let out = join(&bed, &expiring, &again);
    refused(&bed, &out, 1, "expired", &allowed);
    assert_eq!(state(&socket, "phone"), "expired");

    // Revoked.
    let revoked = invite(&socket, "tablet", &[]);
    let out = svpnctl(&socket, &["invite", "revoke", "tablet"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = join(&bed, &revoked, &again);
    refused(&bed, &out, 1, "revoked", &allowed);
    assert_eq!(state(&socket, "tablet"), "revoked");
    // Revoking what is not open is an error.
    let out = svpnctl(&socket, &["invite", "revoke", "tablet"], None);
    assert_eq!(out.status.code(), Some(1));
    // A name an allowed peer has is refused at invite time.
    let out = svpnctl(&socket, &["invite", "laptop"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("allowed peer"),
        "{}",
        text(&out.stderr)
    );
    let table = text(&svpnctl(&socket, &["invite", "list"], None).stdout);
    for row in ["laptop", "phone", "tablet", "used", "expired", "revoked"] {
        assert!(table.contains(row), "{table}");
    }
}
