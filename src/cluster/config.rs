//! `[cluster]`: the servers of one network share their state in etcd.
//! Without the table a server keeps its state in SQLite, as before.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

/// The default of `lease_ttl`, in seconds: how long a dead server's
/// clients keep their addresses reserved (for them to reappear elsewhere).
pub const DEFAULT_LEASE_TTL_SECS: u64 = 15;
/// The bounds of `lease_ttl`: etcd renews every third of it, so below 3 s
/// one slow renewal loses every address; above an hour a dead server's
/// addresses stay locked for too long.
const LEASE_TTL_SECS: std::ops::RangeInclusive<u64> = 3..=3600;
/// Longest node name (it is part of etcd keys and log lines).
const MAX_NODE_LEN: usize = 63;

/// `[cluster]` as written.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// etcd's client URLs, `http://HOST:PORT`.
    pub etcd: Option<Vec<String>>,
    /// This server's name in the cluster, unique among its servers.
    pub node: Option<String>,
    /// Where the other servers reach this one (server-to-server links).
    pub advertise: Option<SocketAddr>,
    /// Seconds a dead server's address leases outlive it.
    pub lease_ttl: Option<u64>,
}

/// `[cluster]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub etcd: Vec<String>,
    pub node: String,
    pub advertise: SocketAddr,
    pub lease_ttl: Duration,
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
        for url in &etcd {
            let hostport = url.strip_prefix("http://").ok_or_else(|| {
                let problem = match url.starts_with("https://") {
                    true => format!("{url:?}: etcd over TLS is not supported yet; use http://"),
                    false => format!("{url:?} is not http://HOST:PORT"),
                };
                ConfigError::new("cluster.etcd", problem)
            })?;
            if hostport.is_empty() || hostport.contains('/') {
                return Err(ConfigError::new(
                    "cluster.etcd",
                    format!("{url:?} is not http://HOST:PORT"),
                ));
            }
        }
        let node = self.node.ok_or_else(|| {
            ConfigError::new(
                "cluster.node",
                "missing: name this server, unique in the cluster",
            )
        })?;
        let fine = !node.is_empty()
            && node.len() <= MAX_NODE_LEN
            && node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !fine {
            return Err(ConfigError::new(
                "cluster.node",
                format!("{node:?}: 1 to {MAX_NODE_LEN} letters, digits, '-', '_' or '.'"),
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
            node,
            advertise,
            lease_ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section() -> ClusterSection {
        ClusterSection {
            etcd: Some(vec!["http://198.18.9.1:2379".into()]),
            node: Some("s1".into()),
            advertise: Some("198.18.1.1:2002".parse().expect("addr")),
            lease_ttl: None,
        }
    }

    #[test]
    fn defaults_and_each_bad_field_named() {
        let config = section().resolve().expect("fine");
        assert_eq!(
            config.lease_ttl,
            Duration::from_secs(DEFAULT_LEASE_TTL_SECS)
        );
        let cases = [
            (
                ClusterSection {
                    etcd: Some(vec![]),
                    ..section()
                },
                "cluster.etcd",
            ),
            (
                ClusterSection {
                    etcd: Some(vec!["https://x:2379".into()]),
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
