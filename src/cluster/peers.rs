//! Peers added live (`svpnctl peer add`), shared by the servers of a
//! cluster: one etcd key each, `<prefix>peers/<base64 key>`, its value the
//! peer as JSON. Every server watches them and allows the same peers.

use serde::{Deserialize, Serialize};

use super::etcd::{Etcd, EtcdError};
use crate::config::PeerSection;
use crate::keys::PublicKey;

/// A peer as stored in etcd.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    key: String,
    name: Option<String>,
    address: Option<String>,
    /// Absent in values written before IPv6 inside the tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address6: Option<String>,
    #[serde(default)]
    routes: Vec<String>,
}

fn key_of(prefix: &str, key: &PublicKey) -> String {
    format!("{prefix}peers/{key}")
}

pub fn encode(peer: &PeerSection) -> Vec<u8> {
    let stored = Stored {
        key: peer.key.to_string(),
        name: peer.name.clone(),
        address: peer.address.map(|a| a.to_string()),
        address6: peer.address6.map(|a| a.to_string()),
        routes: peer.routes.iter().map(ToString::to_string).collect(),
    };
    // Strings only: serialising cannot fail.
    serde_json::to_vec(&stored).unwrap_or_default()
}

/// None for a value that is not a peer (it is skipped, with a warning).
pub fn decode(value: &[u8]) -> Option<PeerSection> {
    let stored: Stored = serde_json::from_slice(value).ok()?;
    Some(PeerSection {
        client_to_client: None,
        key: stored.key.parse().ok()?,
        name: stored.name,
        address: stored.address.map(|a| a.parse()).transpose().ok()?,
        address6: stored.address6.map(|a| a.parse()).transpose().ok()?,
        routes: stored
            .routes
            .iter()
            .map(|r| r.parse())
            .collect::<Result<_, _>>()
            .ok()?,
    })
}

pub async fn put(etcd: &Etcd, prefix: &str, peer: &PeerSection) -> Result<(), EtcdError> {
    etcd.put(&key_of(prefix, &peer.key), encode(peer), 0).await
}

pub async fn remove(etcd: &Etcd, prefix: &str, key: &PublicKey) -> Result<(), EtcdError> {
    etcd.delete(&key_of(prefix, key)).await.map(drop)
}

/// Every peer stored, in key order; values that do not parse are skipped.
pub async fn list(etcd: &Etcd, prefix: &str) -> Result<Vec<PeerSection>, EtcdError> {
    Ok(etcd
        .prefix(&format!("{prefix}peers/"))
        .await?
        .into_iter()
        .filter_map(|kv| decode(&kv.value))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_round_trips_and_garbage_is_refused() {
        let peer = PeerSection {
            client_to_client: None,
            key: PublicKey::from_raw(&[9; 32]).expect("key"),
            name: Some("laptop".into()),
            address: Some("198.19.0.70".parse().expect("addr")),
            address6: None,
            routes: vec!["198.18.201.0/24".parse().expect("net")],
        };
        assert_eq!(decode(&encode(&peer)), Some(peer.clone()));
        // A value written before address6 existed still reads.
        assert!(!String::from_utf8_lossy(&encode(&peer)).contains("address6"));
        let with6 = PeerSection {
            client_to_client: None,
            address6: Some("2001:2:0:100::70".parse().expect("addr6")),
            routes: vec!["2001:2:0:201::/64".parse().expect("net6")],
            ..peer
        };
        assert_eq!(decode(&encode(&with6)), Some(with6.clone()));
        let key = with6.key;
        assert!(decode(format!(r#"{{"key":"{key}"}}"#).as_bytes()).is_some());
        assert_eq!(
            decode(format!(r#"{{"key":"{key}","address6":"198.19.0.70"}}"#).as_bytes()),
            None
        );
        for bad in [
            &b"{}"[..],
            b"nope",
            br#"{"key":"x","name":null,"address":null}"#,
        ] {
            assert_eq!(decode(bad), None);
        }
    }
}
