//! `[cluster]`: the servers of one network share their state in etcd.
//! Without the table a server keeps its state in SQLite, on its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::signed::Pinned;
use crate::config::ConfigError;
use crate::keys::PublicKey;

/// The default of `lease_ttl`, in seconds: how long a dead server's
/// clients keep their addresses reserved (for them to reappear elsewhere).
pub const DEFAULT_LEASE_TTL_SECS: u64 = 15;
/// The bounds of `lease_ttl`: etcd renews every third of it, so below 3 s
/// one slow renewal loses every address; above an hour a dead server's
/// addresses stay locked for too long.
const LEASE_TTL_SECS: std::ops::RangeInclusive<u64> = 3..=3600;
/// Longest node name (it is part of etcd keys and log lines).
const MAX_NODE_LEN: usize = 63;

/// `[[cluster.member]]`: a server of the cluster and its public key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSection {
    pub node: String,
    pub key: PublicKey,
}

/// `[cluster]` as written.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// etcd's client URLs, `https://HOST:PORT` (`http://` only with
    /// `etcd_insecure`).
    pub etcd: Option<Vec<String>>,
    /// The CA that signed etcd's server certificate (PEM).
    pub etcd_ca: Option<PathBuf>,
    /// This server's client certificate for etcd (PEM), with `etcd_key`.
    pub etcd_cert: Option<PathBuf>,
    /// The private key of `etcd_cert` (PEM).
    pub etcd_key: Option<PathBuf>,
    /// etcd's user name (etcd's own authentication), with
    /// `etcd_password_file`.
    pub etcd_user: Option<String>,
    pub etcd_password_file: Option<PathBuf>,
    /// Allows `http://` endpoints: etcd's traffic in clear text.
    pub etcd_insecure: Option<bool>,
    /// The servers of the cluster, this one included, and their keys.
    pub member: Option<Vec<MemberSection>>,
    /// This server's name in the cluster, unique among its servers.
    pub node: Option<String>,
    /// Where the other servers reach this one (server-to-server links).
    pub advertise: Option<SocketAddr>,
    /// Seconds a dead server's address leases outlive it.
    pub lease_ttl: Option<u64>,
}

/// How this server authenticates etcd and itself to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdTransport {
    /// `http://`, allowed by `etcd_insecure = true`.
    Insecure,
    /// `https://`: etcd's certificate checked against `ca`; this server's
    /// client certificate and key, if given (mutual TLS).
    Tls {
        ca: PathBuf,
        identity: Option<(PathBuf, PathBuf)>,
    },
}

/// etcd's own user authentication: a user and the file of its password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUser {
    pub user: String,
    pub password_file: PathBuf,
}

/// `[cluster]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub etcd: Vec<String>,
    pub transport: EtcdTransport,
    pub user: Option<EtcdUser>,
    pub node: String,
    pub advertise: SocketAddr,
    pub lease_ttl: Duration,
    /// The members by name, this server included: the only servers whose
    /// records and links are trusted.
    pub members: Pinned,
}

impl ClusterConfig {
    /// Checks that this server's own `[[cluster.member]]` entry pins `own`,
    /// the key it serves with.
    pub fn check_own_key(&self, own: Option<PublicKey>) -> Result<(), ConfigError> {
        let Some(own) = own else {
            return Err(ConfigError::new(
                "key",
                "missing: a cluster server needs its own key (key or private_key): it signs its records in etcd and authenticates its links",
            ));
        };
        match self.members.get(&self.node) {
            Some(pinned) if *pinned == own => Ok(()),
            Some(pinned) => Err(ConfigError::new(
                "cluster.member",
                format!(
                    "the entry for this node {:?} pins {pinned}, but this server's key is {own}",
                    self.node
                ),
            )),
            None => Err(ConfigError::new(
                "cluster.member",
                format!("no entry for this node {:?} (key {own})", self.node),
            )),
        }
    }
}

impl ClusterSection {
    /// Fills in the defaults and checks every value.
    pub fn resolve(self) -> Result<ClusterConfig, ConfigError> {
        let etcd = match self.etcd {
            Some(etcd) if !etcd.is_empty() => etcd,
            _ => {
                return Err(ConfigError::new(
                    "cluster.etcd",
                    "missing: list etcd's client URLs, e.g. etcd = [\"http://10.1.0.5:2379\"]",
                ))
            }
        };
        let insecure = self.etcd_insecure.unwrap_or(false);
        let mut tls = None;
        for url in &etcd {
            let (secure, hostport) =
                match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
                    (Some(hostport), _) => (true, hostport),
                    (None, Some(hostport)) => (false, hostport),
                    (None, None) => {
                        return Err(ConfigError::new(
                            "cluster.etcd",
                            format!("{url:?} is not https://HOST:PORT"),
                        ))
                    }
                };
            if hostport.is_empty() || hostport.contains('/') {
                return Err(ConfigError::new(
                    "cluster.etcd",
                    format!("{url:?} is not https://HOST:PORT"),
                ));
            }
            if !secure && !insecure {
                return Err(ConfigError::new(
                    "cluster.etcd",
                    format!("{url:?}: http:// sends the cluster's state in clear text to anyone on the path; use https:// (with etcd_ca, etcd_cert, etcd_key), or set etcd_insecure = true"),
                ));
            }
            if *tls.get_or_insert(secure) != secure {
                return Err(ConfigError::new(
                    "cluster.etcd",
                    "mixes https:// and http:// endpoints",
                ));
            }
        }
        let transport = match tls {
            Some(true) => {
                let ca = self.etcd_ca.ok_or_else(|| {
                    ConfigError::new(
                        "cluster.etcd_ca",
                        "missing: the CA certificate (PEM) that signed etcd's server certificate",
                    )
                })?;
                let identity = match (self.etcd_cert, self.etcd_key) {
                    (Some(cert), Some(key)) => Some((cert, key)),
                    (None, None) => None,
                    (Some(_), None) => {
                        return Err(ConfigError::new(
                            "cluster.etcd_key",
                            "missing: etcd_cert needs the private key of the certificate",
                        ))
                    }
                    (None, Some(_)) => {
                        return Err(ConfigError::new(
                            "cluster.etcd_cert",
                            "missing: etcd_key needs its client certificate",
                        ))
                    }
                };
                EtcdTransport::Tls { ca, identity }
            }
            _ => {
                for (field, given) in [
                    ("cluster.etcd_ca", self.etcd_ca.is_some()),
                    ("cluster.etcd_cert", self.etcd_cert.is_some()),
                    ("cluster.etcd_key", self.etcd_key.is_some()),
                ] {
                    if given {
                        return Err(ConfigError::new(
                            field,
                            "given, but etcd's endpoints are http://: use https://",
                        ));
                    }
                }
                EtcdTransport::Insecure
            }
        };
        let user = match (self.etcd_user, self.etcd_password_file) {
            (Some(user), Some(password_file)) if !user.is_empty() => Some(EtcdUser {
                user,
                password_file,
            }),
            (Some(_), Some(_)) => {
                return Err(ConfigError::new("cluster.etcd_user", "empty"));
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "cluster.etcd_password_file",
                    "missing: etcd_user needs the file of its password",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "cluster.etcd_user",
                    "missing: etcd_password_file needs the user it is the password of",
                ))
            }
        };
        let node = self.node.ok_or_else(|| {
            ConfigError::new(
                "cluster.node",
                "missing: name this server, unique in the cluster",
            )
        })?;
        check_node("cluster.node", &node)?;
        let mut members = Pinned::new();
        for member in self.member.unwrap_or_default() {
            check_node("cluster.member", &member.node)?;
            if members.insert(member.node.clone(), member.key).is_some() {
                return Err(ConfigError::new(
                    "cluster.member",
                    format!("node {:?} is listed twice", member.node),
                ));
            }
        }
        if !members.contains_key(&node) {
            return Err(ConfigError::new(
                "cluster.member",
                format!("no entry for this node {node:?}: list every server of the cluster, this one included, with its key"),
            ));
        }
        let advertise = self.advertise.ok_or_else(|| {
            ConfigError::new(
                "cluster.advertise",
                "missing: the ADDR:PORT other servers reach this one at",
            )
        })?;
        let lease_ttl = match self.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL_SECS) {
            secs if LEASE_TTL_SECS.contains(&secs) => Duration::from_secs(secs),
            secs => {
                return Err(ConfigError::new(
                    "cluster.lease_ttl",
                    format!(
                        "{secs}: must be {} to {} seconds",
                        LEASE_TTL_SECS.start(),
                        LEASE_TTL_SECS.end()
                    ),
                ))
            }
        };
        Ok(ClusterConfig {
            etcd,
            transport,
            user,
            members,
            node,
            advertise,
            lease_ttl,
        })
    }
}

/// A node name: part of etcd keys and log lines.
fn check_node(field: &'static str, node: &str) -> Result<(), ConfigError> {
    let fine = !node.is_empty()
        && node.len() <= MAX_NODE_LEN
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    match fine {
        true => Ok(()),
        false => Err(ConfigError::new(
            field,
            format!("{node:?}: 1 to {MAX_NODE_LEN} letters, digits, '-', '_' or '.'"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_raw(&[n; 32]).expect("key")
    }

    fn section() -> ClusterSection {
        ClusterSection {
            etcd: Some(vec!["https://198.18.9.1:2379".into()]),
            etcd_ca: Some("/etc/simplevpn/etcd-ca.pem".into()),
            etcd_cert: Some("/etc/simplevpn/etcd.pem".into()),
            etcd_key: Some("/etc/simplevpn/etcd-key.pem".into()),
            node: Some("s1".into()),
            advertise: Some("198.18.1.1:2002".parse().expect("addr")),
            member: Some(vec![
                MemberSection {
                    node: "s1".into(),
                    key: key(1),
                },
                MemberSection {
                    node: "s2".into(),
                    key: key(2),
                },
            ]),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_and_each_bad_field_named() {
        let config = section().resolve().expect("fine");
        assert_eq!(
            config.lease_ttl,
            Duration::from_secs(DEFAULT_LEASE_TTL_SECS)
        );
        assert!(matches!(
            config.transport,
            EtcdTransport::Tls {
                identity: Some(_),
                ..
            }
        ));
        assert_eq!(config.members.len(), 2);
        assert_eq!(config.check_own_key(Some(key(1))), Ok(()));
        for own in [Some(key(2)), None] {
            let err = config.check_own_key(own).expect_err("refused");
            assert!(
                ["cluster.member", "key"].contains(&err.field.as_str()),
                "{err}"
            );
        }
        let insecure = ClusterSection {
            etcd: Some(vec!["http://198.18.9.1:2379".into()]),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            etcd_insecure: Some(true),
            ..section()
        };
        assert_eq!(
            insecure.resolve().expect("insecure allowed").transport,
            EtcdTransport::Insecure
        );
        let cases = [
            (
                ClusterSection {
                    etcd: Some(vec!["http://198.18.9.1:2379".into()]),
                    etcd_ca: None,
                    etcd_cert: None,
                    etcd_key: None,
                    ..section()
                },
                "cluster.etcd",
            ),
            (
                ClusterSection {
                    etcd_ca: None,
                    ..section()
                },
                "cluster.etcd_ca",
            ),
            (
                ClusterSection {
                    etcd_key: None,
                    ..section()
                },
                "cluster.etcd_key",
            ),
            (
                ClusterSection {
                    etcd_user: Some("svpn".into()),
                    ..section()
                },
                "cluster.etcd_password_file",
            ),
            (
                ClusterSection {
                    member: Some(vec![MemberSection {
                        node: "s2".into(),
                        key: key(2),
                    }]),
                    ..section()
                },
                "cluster.member",
            ),
            (
                ClusterSection {
                    member: Some(vec![
                        MemberSection {
                            node: "s1".into(),
                            key: key(1),
                        },
                        MemberSection {
                            node: "s1".into(),
                            key: key(2),
                        },
                    ]),
                    ..section()
                },
                "cluster.member",
            ),
            (
                ClusterSection {
                    etcd: Some(vec![]),
                    ..section()
                },
                "cluster.etcd",
            ),
            (
                ClusterSection {
                    etcd: Some(vec!["https://x:2379".into(), "http://y:2379".into()]),
                    etcd_insecure: Some(true),
                    ..section()
                },
                "cluster.etcd",
            ),
            (
                ClusterSection {
                    etcd: Some(vec!["x:2379".into()]),
                    ..section()
                },
                "cluster.etcd",
            ),
            (
                ClusterSection {
                    node: None,
                    ..section()
                },
                "cluster.node",
            ),
            (
                ClusterSection {
                    node: Some("a b".into()),
                    ..section()
                },
                "cluster.node",
            ),
            (
                ClusterSection {
                    advertise: None,
                    ..section()
                },
                "cluster.advertise",
            ),
            (
                ClusterSection {
                    lease_ttl: Some(1),
                    ..section()
                },
                "cluster.lease_ttl",
            ),
        ];
        for (section, field) in cases {
            let err = section.resolve().expect_err("refused");
            assert_eq!(err.field, field, "{err}");
        }
    }
}
