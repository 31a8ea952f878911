//! Every record the servers of a cluster write to etcd is signed by the
//! server that wrote it, so that etcd is storage, not authority: someone
//! who can write to etcd (but holds no member's private key) can delete
//! records, but not make a server trust anything.
//!
//! A record's value in etcd is an envelope, JSON:
//!
//! ```text
//! {"node":"s1","signature":"<base64 of 64 bytes>","value":"<the record>"}
//! ```
//!
//! The signature is the Ed25519 signature, by the key pinned for `node`
//! in `[[cluster.member]]`, of [`CONTEXT`], the etcd key's length (4 bytes,
//! big-endian), the etcd key, and the value. So a record copied to another
//! key, an edited record, and a record signed by a node that is not pinned
//! (or with another key than its pinned one) are all refused.
//!
//! Sans-IO: bytes in, bytes or a verdict out.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::keys::{NodeKey, PublicKey};

/// What every signature covers first: records of no other use of the key
/// (a TLS handshake, another version of this format) can be replayed as one.
pub const CONTEXT: &[u8] = b"simplevpn cluster record v1\0";

/// How often refused records are logged at most: a summary of those since
/// the last line, not a line per record.
pub const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The members of a cluster and their keys, as this server's configuration
/// pins them: nothing in etcd adds to it.
pub type Pinned = BTreeMap<String, PublicKey>;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    node: String,
    signature: String,
    value: String,
}

/// Why a record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a signed record")]
    Unsigned,
    #[error("signed by a node that is not a pinned member")]
    UnknownNode,
    #[error("its signature does not verify with the member's pinned key")]
    BadSignature,
    #[error("signed by another member than the one it is about")]
    WrongNode,
}

/// A record whose signature verified: who wrote it, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub node: String,
    pub value: Vec<u8>,
}

fn message(etcd_key: &str, value: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(CONTEXT.len() + 4 + etcd_key.len() + value.len());
    message.extend_from_slice(CONTEXT);
    // etcd keys are far below 4 GiB (etcd refuses requests over 1.5 MiB).
    message.extend_from_slice(&(etcd_key.len() as u32).to_be_bytes());
    message.extend_from_slice(etcd_key.as_bytes());
    message.extend_from_slice(value);
    message
}

/// The envelope of `value` at `etcd_key`, signed by `node` with `key`. The
/// same inputs always give the same bytes (Ed25519 is deterministic), so a
/// transaction may compare a stored value with a freshly sealed one.
pub fn seal(etcd_key: &str, value: &str, node: &str, key: &NodeKey) -> Vec<u8> {
    let signature = key.sign(&message(etcd_key, value.as_bytes()));
    let envelope = Envelope {
        node: node.to_string(),
        signature: STANDARD.encode(signature),
        value: value.to_string(),
    };
    // Strings only: serialising cannot fail.
    serde_json::to_vec(&envelope).unwrap_or_default()
}

/// The record at `etcd_key` if its envelope is signed by a pinned member.
pub fn open(etcd_key: &str, raw: &[u8], pinned: &Pinned) -> Result<Opened, Refusal> {
    let envelope: Envelope = serde_json::from_slice(raw).map_err(|_| Refusal::Unsigned)?;
    let key = pinned.get(&envelope.node).ok_or(Refusal::UnknownNode)?;
    let signature = STANDARD
        .decode(&envelope.signature)
        .map_err(|_| Refusal::BadSignature)?;
    let value = envelope.value.into_bytes();
    match key.verifies(&message(etcd_key, &value), &signature) {
        true => Ok(Opened {
            node: envelope.node,
            value,
        }),
        false => Err(Refusal::BadSignature),
    }
}

/// The records refused, by reason, for the metrics.
#[derive(Debug, Default)]
pub struct RefusedCounts {
    pub unsigned: AtomicU64,
    pub unknown_node: AtomicU64,
    pub bad_signature: AtomicU64,
    pub wrong_node: AtomicU64,
}

impl RefusedCounts {
    fn of(&self, why: Refusal) -> &AtomicU64 {
        match why {
            Refusal::Unsigned => &self.unsigned,
            Refusal::UnknownNode => &self.unknown_node,
            Refusal::BadSignature => &self.bad_signature,
            Refusal::WrongNode => &self.wrong_node,
        }
    }

    /// Every refused record, whatever the reason.
    pub fn total(&self) -> u64 {
        [
            &self.unsigned,
            &self.unknown_node,
            &self.bad_signature,
            &self.wrong_node,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// What a server signs its records with and checks the others' against,
/// and the count of records it refused (logged as a summary).
pub struct Records {
    node: String,
    key: Arc<NodeKey>,
    pinned: Pinned,
    pub refused: RefusedCounts,
    /// Refusals since the last log line, and when that was.
    unlogged: Mutex<(u64, Option<Instant>)>,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Records({}, {} pinned)", self.node, self.pinned.len())
    }
}

impl Records {
    pub fn new(node: &str, key: Arc<NodeKey>, pinned: Pinned) -> Records {
        Records {
            node: node.to_string(),
            key,
            pinned,
            refused: RefusedCounts::default(),
            unlogged: Mutex::new((0, None)),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn pinned(&self) -> &Pinned {
        &self.pinned
    }

    /// This server's envelope of `value` at `etcd_key`.
    pub fn seal(&self, etcd_key: &str, value: &str) -> Vec<u8> {
        seal(etcd_key, value, &self.node, &self.key)
    }

    /// The record at `etcd_key` if a pinned member signed it; else None,
    /// counted (and logged as a summary at most every
    /// [`REFUSED_LOG_INTERVAL`]).
    pub fn open(&self, etcd_key: &str, raw: &[u8]) -> Option<Opened> {
        self.check(etcd_key, open(etcd_key, raw, &self.pinned))
    }

    /// As [`Records::open`], and the record must be signed by `node` (the
    /// member it is about: its membership, an address it holds).
    pub fn open_by(&self, etcd_key: &str, raw: &[u8], node: &str) -> Option<Opened> {
        let opened = open(etcd_key, raw, &self.pinned).and_then(|o| {
            if o.node == node {
                Ok(o)
            } else {
                Err(Refusal::WrongNode)
            }
        });
        self.check(etcd_key, opened)
    }

    /// Counts and (now and then) logs a refusal.
    pub fn check(&self, etcd_key: &str, opened: Result<Opened, Refusal>) -> Option<Opened> {
        let why = match opened {
            Ok(opened) => return Some(opened),
            Err(why) => why,
        };
        self.refused.of(why).fetch_add(1, Ordering::Relaxed);
        let mut unlogged = self.unlogged.lock().unwrap_or_else(|e| e.into_inner());
        unlogged.0 += 1;
        let due = unlogged
            .1
            .is_none_or(|at| at.elapsed() >= REFUSED_LOG_INTERVAL);
        if due {
            warn!(
                refused = unlogged.0,
                total = self.refused.total(),
                latest = %etcd_key,
                reason = %why,
                "records in etcd not signed by a pinned member: ignored"
            );
            *unlogged = (0, Some(Instant::now()));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> NodeKey {
        NodeKey::from_seed(b"signed records", n).expect("key")
    }

    #[test]
    fn a_record_opens_only_where_and_as_it_was_signed_by_a_pinned_member() {
        let (s1, s2, stranger) = (key(1), key(2), key(3));
        let pinned: Pinned = [("s1".to_string(), s1.public()), ("s2".into(), s2.public())]
            .into_iter()
            .collect();
        let at = "/simplevpn/n/peers/abc";
        let sealed = seal(at, r#"{"key":"abc"}"#, "s1", &s1);
        assert_eq!(
            sealed,
            seal(at, r#"{"key":"abc"}"#, "s1", &s1),
            "deterministic"
        );
        let opened = open(at, &sealed, &pinned).expect("opens");
        assert_eq!(opened.node, "s1");
        assert_eq!(opened.value, br#"{"key":"abc"}"#);

        // Copied to another key.
        assert_eq!(
            open("/simplevpn/n/peers/xyz", &sealed, &pinned),
            Err(Refusal::BadSignature)
        );
        // Edited.
        let edited = String::from_utf8(sealed.clone())
            .expect("utf-8")
            .replace("abc", "abd");
        assert_eq!(
            open(at, edited.as_bytes(), &pinned),
            Err(Refusal::BadSignature)
        );
        // Signed by s1's name with another key, or claiming to be s2.
        let forged = seal(at, "x", "s1", &stranger);
        assert_eq!(open(at, &forged, &pinned), Err(Refusal::BadSignature));
        let relabelled = String::from_utf8(sealed.clone())
            .expect("utf-8")
            .replace("\"s1\"", "\"s2\"");
        assert_eq!(
            open(at, relabelled.as_bytes(), &pinned),
            Err(Refusal::BadSignature)
        );
        // A node that is not pinned, whatever its key.
        let unknown = seal(at, "x", "s3", &stranger);
        assert_eq!(open(at, &unknown, &pinned), Err(Refusal::UnknownNode));
        // Not an envelope at all, or a broken one.
        for raw in [
            &br#"{"key":"abc"}"#[..],
            b"1700000000",
            b"",
            br#"{"node":"s1","signature":"!!","value":"x"}"#,
        ] {
            assert!(open(at, raw, &pinned).is_err(), "{raw:?}");
        }

        let records = Records::new("s2", Arc::new(key(2)), pinned);
        assert!(records.open(at, &sealed).is_some());
        assert!(records.open_by(at, &sealed, "s1").is_some());
        assert!(records.open_by(at, &sealed, "s2").is_none());
        assert!(records.open(at, &unknown).is_none());
        assert!(records.open(at, b"1700000000").is_none());
        assert_eq!(records.refused.total(), 3);
        assert_eq!(records.refused.wrong_node.load(Ordering::Relaxed), 1);
        let own = records.seal(at, "mine");
        assert_eq!(
            records.open_by(at, &own, "s2").map(|o| o.value),
            Some(b"mine".to_vec())
        );
    }
}
