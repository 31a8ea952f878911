//! Peers added live (`svpnctl peer add`), shared by the servers of a
//! cluster: one etcd key each, `<prefix>peers/<base64 key>`, its value the
//! peer as JSON, signed by the server that added it ([`super::signed`]).
//! Every server watches them and allows the same peers.

use serde::{Deserialize, Serialize};

use super::etcd::{Etcd, EtcdError};
use super::signed::Records;
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

pub fn encode(peer: &PeerSection) -> String {
    let stored = Stored {
        key: peer.key.to_string(),
        name: peer.name.clone(),
        address: peer.address.map(|a| a.to_string()),
        address6: peer.address6.map(|a| a.to_string()),
        routes: peer.routes.iter().map(ToString::to_string).collect(),
    };
    // Strings only: serialising cannot fail.
    serde_json::to_string(&stored).unwrap_or_default()
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

pub async fn put(
    etcd: &Etcd,
    prefix: &str,
    records: &Records,
    peer: &PeerSection,
) -> Result<(), EtcdError> {
    let at = key_of(prefix, &peer.key);
    etcd.put(&at, records.seal(&at, &encode(peer)), 0).await
}

/// The peer a verified record at `etcd_key` holds: its key must be the
/// one the record's etcd key names (a signed record moved to another key
/// does not verify anyway).
pub fn verified(records: &Records, etcd_key: &str, raw: &[u8]) -> Option<PeerSection> {
    let opened = records.open(etcd_key, raw)?;
    let peer = decode(&opened.value)?;
    match etcd_key.ends_with(&format!("peers/{}", peer.key)) {
        true => Some(peer),
        false => None,
    }
}

pub async fn remove(etcd: &Etcd, prefix: &str, key: &PublicKey) -> Result<(), EtcdError> {
    etcd.delete(&key_of(prefix, key)).await.map(drop)
}

/// Every peer stored, in key order; values that do not verify or parse
/// are skipped.
pub async fn list(
    etcd: &Etcd,
    prefix: &str,
    records: &Records,
) -> Result<Vec<PeerSection>, EtcdError> {
    Ok(etcd
        .prefix(&format!("{prefix}peers/"))
        .await?
        .into_iter()
        .filter_map(|kv| verified(records, &String::from_utf8_lossy(&kv.key), &kv.value))
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
        assert_eq!(decode(encode(&peer).as_bytes()), Some(peer.clone()));
        // A value written before address6 existed still reads.
        assert!(!encode(&peer).contains("address6"));
        let with6 = PeerSection {
            client_to_client: None,
            address6: Some("2001:2:0:100::70".parse().expect("addr6")),
            routes: vec!["2001:2:0:201::/64".parse().expect("net6")],
            ..peer
        };
        assert_eq!(decode(encode(&with6).as_bytes()), Some(with6.clone()));
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
