//! What the packages install, checked without a container: the default
//! config parses (as the TLS server it runs, and with its peer and client
//! examples uncommented), and the template unit is the plain unit apart from
//! its description and command line. The packages themselves are tested in
//! booted containers by tests/package/run.

use std::path::Path;

use simplevpn::config::{ConfigFile, DEFAULT_CONTROL_SOCKET, DEFAULT_LISTEN};

/// The key the package's postinst makes (packaging/debian/postinst).
const HOST_KEY: &str = "/etc/simplevpn/host.key";
const DEFAULT_CONFIG: &str = include_str!("../packaging/simplevpnd.toml");
const UNIT: &str = include_str!("../packaging/systemd/simplevpnd.service");
const TEMPLATE: &str = include_str!("../packaging/systemd/simplevpnd@.service");

/// `text`, a commented TOML example, with its tables and settings uncommented.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| line.strip_prefix("# ").unwrap_or(line))
        .filter(|line| line.starts_with('[') || line.contains(" = "))
        .map(|line| format!("{line}\n"))
        .collect()
}

#[test]
fn the_default_config_runs_a_tls_server_with_the_defaults() {
    let file = ConfigFile::parse(DEFAULT_CONFIG, Path::new("simplevpnd.toml")).expect("parses");
    assert!(file.client.is_none());
    let server = file.server.expect("[server]").resolve().expect("resolves");
    assert_eq!(server.listen.to_string(), DEFAULT_LISTEN);
    // The key the package makes at installation, and no client yet.
    assert_eq!(server.key.as_deref(), Some(Path::new(HOST_KEY)));
    assert!(server.peers.is_empty());
    let control = file.control.unwrap_or_default();
    let control = control.resolve(None).expect("resolves");
    assert_eq!(control.socket, Path::new(DEFAULT_CONTROL_SOCKET));
}

#[test]
fn the_commented_peer_example_parses_when_uncommented() {
    let (server, rest) = DEFAULT_CONFIG
        .split_once("\n# [[server.peer]]")
        .expect("a commented [[server.peer]] example");
    let (peer, _) = rest
        .split_once("\n# A client instead")
        .expect("the client example after it");
    let text = format!(
        "{server}\n{}",
        uncommented(&format!("# [[server.peer]]{peer}"))
    );
    let file = ConfigFile::parse(&text, Path::new("server.toml")).expect("parses");
    let server = file.server.expect("[server]").resolve().expect("resolves");
    assert_eq!(server.peers.len(), 1);
}

#[test]
fn the_commented_client_and_control_examples_parse_when_uncommented() {
    // Drop the [server] table, uncomment everything from "# [client]" on.
    let (_, rest) = DEFAULT_CONFIG
        .split_once("\n# [client]")
        .expect("a commented [client] example");
    let text = uncommented(&format!("# [client]{rest}"));
    let file = ConfigFile::parse(&text, Path::new("client.toml")).expect("parses");
    let client = file.client.expect("[client]").resolve().expect("resolves");
    assert_eq!(client.server, "vpn.example.org:2002");
    assert!(client.tls.is_some(), "key and server_key: TLS");
    let control = file.control.expect("[control]");
    let control = control.resolve(None).expect("resolves");
    assert_eq!(control.admin_group.as_deref(), Some("wheel"));
}

/// The unit's lines that are neither comments nor the ones that may differ.
fn settings(unit: &str) -> Vec<&str> {
    unit.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            ![
                "Description=",
                "ExecStart=",
                "StateDirectory=",
                "ExecReload=",
                "Environment=SIMPLEVPN_INSTANCE=",
            ]
            .iter()
            .any(|differs| line.starts_with(differs))
        })
        .collect()
}

/// The unit's line that starts with `key`.
fn line<'a>(unit: &'a str, key: &str) -> &'a str {
    unit.lines()
        .find(|line| line.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} line"))
}

#[test]
fn the_template_unit_is_the_plain_unit_with_another_config_and_socket() {
    assert_eq!(settings(UNIT), settings(TEMPLATE));
    let exec = |unit: &'static str| {
        unit.lines()
            .find(|line| line.starts_with("ExecStart="))
            .expect("ExecStart=")
    };
    assert_eq!(
        exec(UNIT),
        "ExecStart=/usr/sbin/simplevpnd --config /etc/simplevpn/simplevpnd.toml \
         --control /run/simplevpn/control.sock"
    );
    assert_eq!(
        exec(TEMPLATE),
        "ExecStart=/usr/sbin/simplevpnd --config /etc/simplevpn/%i.toml \
         --control /run/simplevpn/%i.sock --state-dir /var/lib/simplevpn/%i"
    );
    // An instance's tun is named after it, unless its file says otherwise.
    assert_eq!(
        line(TEMPLATE, "Environment="),
        "Environment=SIMPLEVPN_INSTANCE=%i"
    );
    assert!(!UNIT.contains("SIMPLEVPN_INSTANCE"));
    // Each daemon has a state of its own, and reloads through its own
    // control socket.
    assert_eq!(line(UNIT, "StateDirectory="), "StateDirectory=simplevpn");
    assert_eq!(
        line(TEMPLATE, "StateDirectory="),
        "StateDirectory=simplevpn/%i"
    );
    assert_eq!(
        line(UNIT, "ExecReload="),
        "ExecReload=/usr/bin/svpnctl --socket /run/simplevpn/control.sock reload"
    );
    assert_eq!(
        line(TEMPLATE, "ExecReload="),
        "ExecReload=/usr/bin/svpnctl --socket /run/simplevpn/%i.sock reload"
    );
}

const SOCKET: &str = include_str!("../packaging/systemd/simplevpnd.socket");
const SOCKET_TEMPLATE: &str = include_str!("../packaging/systemd/simplevpnd@.socket");

#[test]
fn the_socket_units_listen_on_2002_and_differ_only_in_description() {
    assert_eq!(settings(SOCKET), settings(SOCKET_TEMPLATE));
    assert_eq!(line(SOCKET, "ListenStream="), "ListenStream=2002");
    // The daemon accepts itself: one process for every client.
    assert_eq!(line(SOCKET, "Accept="), "Accept=no");
    // Both units are packaged, for deb and rpm.
    let manifest = include_str!("../Cargo.toml");
    for unit in ["simplevpnd.socket", "simplevpnd@.socket"] {
        assert_eq!(
            manifest
                .matches(&format!("packaging/systemd/{unit}"))
                .count(),
            2,
            "{unit} in both asset lists"
        );
    }
}

const RESTART_CHECKED: &str = include_str!("../packaging/restart-checked");
const POSTINST: &str = include_str!("../packaging/debian/postinst");
const RPM_POSTUN: &str = include_str!("../packaging/rpm/postun.sh");

/// The command lines of a shell script (no comments, no blank lines).
fn commands(script: &str) -> Vec<&str> {
    script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[test]
fn an_upgrade_restarts_a_daemon_only_if_simplevpnd_check_passes_deb_and_rpm() {
    // The shared script checks each running unit's config before it
    // restarts it, and restarts it with try-restart only then.
    let script = commands(RESTART_CHECKED);
    let check = script
        .iter()
        .position(|l| l.contains("simplevpnd check --config \"$conf\""))
        .expect("restart-checked runs simplevpnd check on the unit's config");
    let restart = script
        .iter()
        .position(|l| l.contains("systemctl try-restart \"$unit\""))
        .expect("restart-checked restarts the unit");
    assert!(check < restart, "the check comes before the restart");
    assert!(script[check].starts_with("if "), "{}", script[check]);
    // Both packages' upgrade scriptlets run it, and restart nothing else.
    for (name, scriptlet) in [("deb postinst", POSTINST), ("rpm postun", RPM_POSTUN)] {
        let lines = commands(scriptlet);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("/usr/libexec/simplevpn/restart-checked")),
            "{name} runs restart-checked"
        );
        assert!(
            !lines.iter().any(|l| l.contains("try-restart")),
            "{name} restarts nothing unchecked"
        );
    }
    // Both packages install it there.
    let manifest = include_str!("../Cargo.toml");
    assert_eq!(
        manifest.matches("\"packaging/restart-checked\"").count(),
        2,
        "restart-checked in both asset lists"
    );
    assert!(manifest.contains("dest = \"/usr/libexec/simplevpn/restart-checked\""));
}
