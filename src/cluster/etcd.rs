//! A small typed client of etcd's v3 API: the calls the cluster needs (get,
//! range by prefix, put, delete, create-if-absent and compare-and-swap
//! transactions, leases and their keep-alive, watches), over the gRPC
//! clients generated from proto/etcd by build.rs.
//!
//! Why not the `etcd-client` crate: it compiles the same .proto files at
//! build time with a system `protoc`, which this project does not need
//! anywhere else (build.rs compiles with protox); the generated clients are
//! the same tonic code, so the few calls used here are written against them.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

use pb::etcdserverpb::{
    compare, kv_client::KvClient, lease_client::LeaseClient, request_op, watch_client::WatchClient,
    watch_request, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchRequest,
};
pub use pb::mvccpb::KeyValue;

/// The code generated from etcd's .proto files.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

/// How long one call to etcd may take before it counts as unreachable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a call to etcd failed. One line each.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd endpoint {endpoint:?}: {problem}")]
    Endpoint { endpoint: String, problem: String },
    #[error("etcd: {0}")]
    Status(#[from] tonic::Status),
    #[error("etcd: no answer within {}s", CALL_TIMEOUT.as_secs())]
    Timeout,
    #[error("etcd: {0}")]
    Protocol(&'static str),
    /// A watch asked for changes older than etcd keeps (it compacted them
    /// up to this revision): the state must be read afresh.
    #[error("etcd: the changes since the watch's revision were compacted (up to {0})")]
    Compacted(i64),
}

/// An etcd event seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// A change seen by a watch, with the revision that made it: a watch that
/// breaks goes on from the last one applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub revision: i64,
    pub change: Change,
}

/// A connection to an etcd cluster (its endpoints balanced); cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    watch: WatchClient<Channel>,
}

/// The end of the range of every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The condition "`key`'s `target` equals `value`" of a transaction.
fn equal(key: &str, target: compare::CompareTarget, value: compare::TargetUnion) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: target as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(value),
        ..Default::default()
    }
}

async fn timed<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status.into()),
        Err(_) => Err(EtcdError::Timeout),
    }
}

impl Etcd {
    /// A client of the etcd at `endpoints` (`http://HOST:PORT`); it connects
    /// on first use, so this fails only on a malformed endpoint.
    pub fn new(endpoints: &[String]) -> Result<Etcd, EtcdError> {
        let endpoints = endpoints
            .iter()
            .map(|endpoint| {
                Endpoint::from_shared(endpoint.clone())
                    .map(|e| {
                        e.connect_timeout(CONNECT_TIMEOUT)
                            .tcp_nodelay(true)
                            .http2_keep_alive_interval(Duration::from_secs(5))
                            .keep_alive_timeout(Duration::from_secs(3))
                    })
                    .map_err(|e| EtcdError::Endpoint {
                        endpoint: endpoint.clone(),
                        problem: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = Channel::balance_list(endpoints.into_iter());
        Ok(Etcd {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel.clone()),
            watch: WatchClient::new(channel),
        })
    }

    /// The value of `key`, with its revisions.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let request = RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let mut reply = timed(self.kv.clone().range(request)).await?;
        Ok(reply.kvs.pop())
    }

    /// Every key under `prefix`, in key order.
    pub async fn prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, EtcdError> {
        let request = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix),
            ..Default::default()
        };
        Ok(timed(self.kv.clone().range(request)).await?.kvs)
    }

    /// etcd's current revision (read with the keys under `prefix`, which are
    /// not sent): whatever is read after this call is at least that new, so
    /// a watch from the revision after it misses no change.
    pub async fn revision(&self, prefix: &str) -> Result<i64, EtcdError> {
        let request = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix),
            count_only: true,
            ..Default::default()
        };
        timed(self.kv.clone().range(request))
            .await?
            .header
            .map(|header| header.revision)
            .ok_or(EtcdError::Protocol("a range reply without a header"))
    }

    /// Sets `key` to `value`, attached to `lease` (0: none).
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(), EtcdError> {
        let request = PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
            ..Default::default()
        };
        timed(self.kv.clone().put(request)).await.map(drop)
    }

    /// Deletes `key`; whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, EtcdError> {
        let request = DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        Ok(timed(self.kv.clone().delete_range(request)).await?.deleted > 0)
    }

    /// Puts `value` at `key` (attached to `lease`) if `condition` holds, in
    /// one transaction; whether it did.
    async fn put_if(
        &self,
        key: &str,
        condition: Compare,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<bool, EtcdError> {
        let put = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.as_bytes().to_vec(),
                value,
                lease,
                ..Default::default()
            })),
        };
        let request = TxnRequest {
            compare: vec![condition],
            success: vec![put],
            failure: Vec::new(),
        };
        Ok(timed(self.kv.clone().txn(request)).await?.succeeded)
    }

    /// Creates `key` with `value` (attached to `lease`) only if no such key
    /// exists; whether it did. etcd runs it as one transaction, so of two
    /// servers creating the same key at once exactly one succeeds.
    pub async fn create(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<bool, EtcdError> {
        let absent = equal(
            key,
            compare::CompareTarget::Create,
            compare::TargetUnion::CreateRevision(0),
        );
        self.put_if(key, absent, value, lease).await
    }

    /// Replaces `key` with `value` (attached to `lease`) only if it was not
    /// changed since `mod_revision`; whether it did.
    pub async fn replace(
        &self,
        key: &str,
        mod_revision: i64,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<bool, EtcdError> {
        let unchanged = equal(
            key,
            compare::CompareTarget::Mod,
            compare::TargetUnion::ModRevision(mod_revision),
        );
        self.put_if(key, unchanged, value, lease).await
    }

    /// Deletes `key` only if its value is `value`; whether it did.
    pub async fn delete_if(&self, key: &str, value: Vec<u8>) -> Result<bool, EtcdError> {
        let same = equal(
            key,
            compare::CompareTarget::Value,
            compare::TargetUnion::Value(value),
        );
        let delete = RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: key.as_bytes().to_vec(),
                    ..Default::default()
                },
            )),
        };
        let request = TxnRequest {
            compare: vec![same],
            success: vec![delete],
            failure: Vec::new(),
        };
        Ok(timed(self.kv.clone().txn(request)).await?.succeeded)
    }

    /// A new lease of `ttl`; its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let request = LeaseGrantRequest {
            ttl: ttl.as_secs().max(1) as i64,
            id: 0,
        };
        let reply = timed(self.lease.clone().lease_grant(request)).await?;
        match reply.error.is_empty() {
            true => Ok(reply.id),
            false => Err(EtcdError::Endpoint {
                endpoint: "lease grant".into(),
                problem: reply.error,
            }),
        }
    }

    /// Renews lease `id`; false if it has expired (its keys are gone).
    pub async fn keep_alive(&self, id: i64) -> Result<bool, EtcdError> {
        let requests = tokio_stream::once(LeaseKeepAliveRequest { id });
        let mut replies = timed(self.lease.clone().lease_keep_alive(requests)).await?;
        match tokio::time::timeout(CALL_TIMEOUT, replies.next()).await {
            Ok(Some(Ok(reply))) => Ok(reply.ttl > 0),
            Ok(Some(Err(status))) => Err(status.into()),
            Ok(None) => Err(EtcdError::Protocol(
                "keep-alive stream ended without an answer",
            )),
            Err(_) => Err(EtcdError::Timeout),
        }
    }

    /// Ends lease `id` now: its keys are deleted.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        timed(self.lease.clone().lease_revoke(LeaseRevokeRequest { id }))
            .await
            .map(drop)
    }

    /// Watches every key under `prefix` from `revision` on (0: from now),
    /// sending each change to `changes` until the stream fails or `changes`
    /// is closed. Returns why it ended ([`EtcdError::Compacted`] if etcd no
    /// longer has the changes from `revision`).
    pub async fn watch(
        &self,
        prefix: &str,
        revision: i64,
        changes: &mpsc::Sender<Event>,
    ) -> EtcdError {
        let (tx, rx) = mpsc::channel(1);
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: prefix.as_bytes().to_vec(),
                    range_end: prefix_end(prefix),
                    start_revision: revision,
                    ..Default::default()
                },
            )),
        };
        if tx.send(create).await.is_err() {
            return EtcdError::Protocol("watch request not sent");
        }
        let mut stream = match timed(self.watch.clone().watch(ReceiverStream::new(rx))).await {
            Ok(stream) => stream,
            Err(e) => return e,
        };
        // `tx` stays open while the stream is read: closing it would end
        // the watch.
        loop {
            let reply = match stream.next().await {
                Some(Ok(reply)) => reply,
                Some(Err(status)) => return status.into(),
                None => return EtcdError::Protocol("watch stream ended"),
            };
            if reply.compact_revision > 0 {
                return EtcdError::Compacted(reply.compact_revision);
            }
            if reply.canceled {
                return EtcdError::Protocol("watch cancelled by etcd");
            }
            for event in reply.events {
                let Some(kv) = event.kv else { continue };
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                let revision = kv.mod_revision;
                let change = match event.r#type {
                    0 => Change::Put {
                        key,
                        value: kv.value,
                    },
                    _ => Change::Delete { key },
                };
                if changes.send(Event { revision, change }).await.is_err() {
                    drop(tx);
                    return EtcdError::Protocol("watch no longer wanted");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_after_its_last_key() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }
}
