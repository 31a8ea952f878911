//! The servers of a cluster: each registers its name, the address other
//! servers reach it at, and its public key, under its etcd lease, so a
//! server that dies leaves the list after `lease_ttl`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::etcd::{Etcd, EtcdError};

/// One server of the cluster, as registered in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: String,
    pub advertise: SocketAddr,
    /// Its public key (base64), if it serves TLS.
    pub key: Option<String>,
}

impl Member {
    pub fn etcd_key(&self, prefix: &str) -> String {
        format!("{prefix}members/{}", self.node)
    }

    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and an address always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The members registered now, by name; entries that do not parse are
/// skipped.
pub async fn list(etcd: &Etcd, prefix: &str) -> Result<Vec<Member>, EtcdError> {
    Ok(etcd
        .prefix(&format!("{prefix}members/"))
        .await?
        .into_iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_round_trips() {
        let member = Member {
            node: "s1".into(),
            advertise: "198.18.1.1:2002".parse().expect("addr"),
            key: Some("ScFYNjnPxvAxr6GGa07nJpY3Y6mxoP6KgSTp3vU//xo=".into()),
        };
        let back: Member = serde_json::from_slice(&member.encode()).expect("parse");
        assert_eq!(back, member);
        assert_eq!(member.etcd_key("/p/"), "/p/members/s1");
    }
}
