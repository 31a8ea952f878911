//! `simplevpnd check`: what a start would refuse, found without starting.
//!
//! The config is parsed and resolved by the same code as a start (so every
//! error a start gives, `check` gives, with the file and line where the
//! field stands). Then what a start would only find later: the users it
//! drops to, the key file it reads as root, a port below the unprivileged
//! range without socket activation, and `gateway` on a host that does not
//! forward.

use std::path::Path;

use super::Role;
use crate::config::ConfigError;
use crate::privsep::credentials::ServiceUser;

/// What `check` found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// What a start would refuse: each makes the exit status 2.
    pub problems: Vec<String>,
    /// What works but is likely not meant (printed, exit status 0).
    pub warnings: Vec<String>,
    /// The role and its main settings, in one line.
    pub summary: String,
}

/// What the host says, as far as `check` asks (read by [`Host::current`],
/// given by hand in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// `net.ipv4.ip_unprivileged_port_start`.
    pub unprivileged_port_start: u16,
    /// `net.ipv4.ip_forward`.
    pub forwarding: bool,
    /// Listening sockets passed by systemd (`LISTEN_FDS`).
    pub socket_activated: bool,
}

impl Host {
    /// This host, now.
    pub fn current() -> Host {
        let sysctl = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
                .ok()
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        Host {
            unprivileged_port_start: sysctl("ip_unprivileged_port_start")
                .map_or(1024, |p| p.min(u32::from(u16::MAX)) as u16),
            forwarding: sysctl("ip_forward").is_some_and(|v| v != 0),
            socket_activated: std::env::var_os("LISTEN_FDS").is_some(),
        }
    }
}

/// Checks `role` (resolved from `file`) against `host`.
pub fn check(role: &Role, file: Option<&Path>, host: Host) -> Report {
    let mut report = Report::default();
    let text = file.and_then(|f| std::fs::read_to_string(f).ok());
    let mut problem = |e: ConfigError| {
        report
            .problems
            .push(locate(&e, file, text.as_deref()).to_string())
    };
    if let Err(e) = ServiceUser::daemon_and_helper(role.user(), role.helper_user()) {
        problem(e);
    }
    if let Some(Err(e)) = role.load_key() {
        problem(ConfigError::new("key", e.to_string()));
    }
    match role {
        Role::Server(config) => {
            let port = config.listen.port();
            if port < host.unprivileged_port_start && !host.socket_activated {
                report.warnings.push(format!(
                    "listen: port {port} is below {}, and the daemon listens unprivileged: \
                     start it from its socket unit (systemctl enable --now simplevpnd.socket), \
                     or lower net.ipv4.ip_unprivileged_port_start",
                    host.unprivileged_port_start
                ));
            }
            if config.gateway && !config.forwarding && !host.forwarding {
                report.warnings.push(
                    "gateway: clients will send all their traffic here, but IPv4 forwarding \
                     is off: set forwarding = true, or write net.ipv4.ip_forward = 1 to \
                     /etc/sysctl.d/90-simplevpn.conf and run sysctl --system"
                        .into(),
                );
            }
            let tls = match &config.key {
                Some(_) => format!("TLS with {} peers", config.peers.len()),
                None => "no TLS".into(),
            };
            let legacy = match config.legacy {
                crate::config::Legacy::Off => "original protocol off",
                crate::config::Legacy::On(_) => "original protocol on",
            };
            report.summary = format!(
                "server on {}, network {}, {tls}, {legacy}",
                config.listen, config.network
            );
        }
        Role::Client(config) => {
            let transport = match &config.tls {
                Some((_, server_keys)) => format!("TLS pinning {server_keys}"),
                None => "the original protocol (legacy, plaintext)".into(),
            };
            report.summary = format!("client of {}, {transport}", config.servers.join(", "));
        }
    }
    report
}

/// `e` with the file and line where its field is set, if it is set there:
/// `FILE:LINE: field: problem`.
pub fn locate(e: &ConfigError, file: Option<&Path>, text: Option<&str>) -> ConfigError {
    let (Some(file), Some(text)) = (file, text) else {
        return e.clone();
    };
    let line = text.lines().position(|line| {
        line.split_once('=')
            .is_some_and(|(key, _)| key.trim() == e.field)
    });
    match line {
        Some(n) => ConfigError::new(
            format!("{}:{}: {}", file.display(), n + 1, e.field),
            e.problem.clone(),
        ),
        None => e.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_names_the_line_its_field_is_set_on() {
        let text = "[server]\nnetwork = \"198.19.0.0/16\"\n  workers = 0\n";
        let e = ConfigError::new("workers", "must be at least 1");
        let located = locate(&e, Some(Path::new("/etc/x.toml")), Some(text));
        assert_eq!(
            located.to_string(),
            "/etc/x.toml:3: workers: must be at least 1"
        );
        // A field not in the file (a flag's, say) stays as it is.
        let e = ConfigError::new("tun", "too long");
        assert_eq!(locate(&e, Some(Path::new("x")), Some(text)), e);
    }
}
