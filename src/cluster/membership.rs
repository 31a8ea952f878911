//! The servers of a cluster: each registers its name, the address other
//! servers reach it at, and its public key, under its etcd lease, so a
//! server that dies leaves the list after `lease_ttl`. A membership counts
//! only if it is signed by the member it names, with the key this server's
//! configuration pins for it; the key used is the pinned one.

use std::net::SocketAddr;

use ipnet::Ipv6Net;
use serde::{Deserialize, Serialize};

use super::etcd::{Etcd, EtcdError};
use super::signed::Records;

/// One server of the cluster, as registered in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: String,
    pub advertise: SocketAddr,
    /// Its public key (base64), if it serves TLS.
    pub key: Option<String>,
    /// Its `network6`: every member must have the same. Absent from the
    /// records of servers without one (and of servers from before IPv6
    /// in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network6: Option<Ipv6Net>,
}

impl Member {
    pub fn etcd_key(&self, prefix: &str) -> String {
        format!("{prefix}members/{}", self.node)
    }

    pub fn encode(&self) -> String {
        // A struct of strings and an address always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The membership record at `etcd_key` (`<prefix>members/<node>`), if
/// `node` signed it; its key is the one pinned for `node`.
pub fn verified(records: &Records, etcd_key: &str, node: &str, raw: &[u8]) -> Option<Member> {
    let opened = records.open_by(etcd_key, raw, node)?;
    let member: Member = serde_json::from_slice(&opened.value).ok()?;
    if member.node != node {
        return None;
    }
    let key = records.pinned().get(node)?;
    Some(Member {
        key: Some(key.to_string()),
        ..member
    })
}

/// The pinned members registered now; entries that do not verify or parse
/// are skipped (and counted).
pub async fn list(etcd: &Etcd, prefix: &str, records: &Records) -> Result<Vec<Member>, EtcdError> {
    let dir = format!("{prefix}members/");
    Ok(etcd
        .prefix(&dir)
        .await?
        .into_iter()
        .filter_map(|kv| {
            let key = String::from_utf8_lossy(&kv.key);
            let node = key.strip_prefix(&dir)?;
            verified(records, &key, node, &kv.value)
        })
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
            network6: None,
        };
        let back: Member = serde_json::from_str(&member.encode()).expect("parse");
        assert_eq!(back, member);
        assert_eq!(member.etcd_key("/p/"), "/p/members/s1");
        // Without network6 the record is as servers without IPv6 wrote it.
        assert!(!member.encode().contains("network6"));
        let with6 = Member {
            network6: "2001:2:0:100::/64".parse().ok(),
            ..member
        };
        assert!(with6.encode().contains(r#""network6":"2001:2:0:100::/64""#));
        let back: Member = serde_json::from_str(&with6.encode()).expect("parse");
        assert_eq!(back, with6);
    }
}
