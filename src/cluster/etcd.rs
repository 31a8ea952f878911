//! A small typed client of etcd's v3 API: the calls the cluster needs (get,
//! range by prefix, put, delete, create-if-absent and compare-and-swap
//! transactions, leases and their keep-alive, watches), over the gRPC
//! clients generated from proto/etcd by build.rs.
//!
//! Why not the `etcd-client` crate: it compiles the same .proto files at
//! build time with a system `protoc`, which this project does not need
//! anywhere else (build.rs compiles with protox); the generated clients are
//! the same tonic code, so the few calls used here are written against them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::config::{ClusterConfig, EtcdTransport, EtcdUser};
use pb::etcdserverpb::{
    auth_client::AuthClient, compare, kv_client::KvClient, lease_client::LeaseClient, request_op,
    watch_client::WatchClient, watch_request, AuthenticateRequest, Compare, DeleteRangeRequest,
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
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
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
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

/// The token of etcd's user authentication, sent with every call (in the
/// `token` header) once [`Etcd`] has authenticated.
#[derive(Clone, Default)]
pub struct Token(Arc<RwLock<Option<MetadataValue<Ascii>>>>);

impl tonic::service::Interceptor for Token {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let token = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(token) = token {
            request.metadata_mut().insert("token", token);
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Token>;

/// etcd's user and password, and the token they got.
#[derive(Clone)]
struct Login {
    user: String,
    password: String,
    auth: AuthClient<Channel>,
    token: Token,
}

/// A connection to an etcd cluster (its endpoints balanced); cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    kv: KvClient<Authed>,
    lease: LeaseClient<Authed>,
    watch: WatchClient<Authed>,
    login: Option<Login>,
}

fn read(path: &Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::File {
        path: path.to_path_buf(),
        source,
    })
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
    /// A client of the etcd at `endpoints` over plain `http://HOST:PORT`,
    /// without credentials (tests; a server uses [`Etcd::connect`]).
    pub fn new(endpoints: &[String]) -> Result<Etcd, EtcdError> {
        Etcd::with(endpoints, None, None)
    }

    /// The client a server's `[cluster]` describes: its endpoints, TLS
    /// (etcd's CA, this server's client certificate) and user. It connects
    /// on first use, so this fails only on a malformed endpoint or a file
    /// that cannot be read.
    pub fn connect(config: &ClusterConfig) -> Result<Etcd, EtcdError> {
        let tls = match &config.transport {
            EtcdTransport::Insecure => None,
            EtcdTransport::Tls { ca, identity } => {
                let mut tls =
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
                if let Some((cert, key)) = identity {
                    tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
                }
                Some(tls)
            }
        };
        let user = match &config.user {
            Some(EtcdUser {
                user,
                password_file,
            }) => {
                let password =
                    String::from_utf8(read(password_file)?).map_err(|_| EtcdError::Endpoint {
                        endpoint: password_file.display().to_string(),
                        problem: "the password is not UTF-8".into(),
                    })?;
                Some((
                    user.clone(),
                    password.trim_end_matches(['\n', '\r']).to_string(),
                ))
            }
            None => None,
        };
        Etcd::with(&config.etcd, tls, user)
    }

    fn with(
        endpoints: &[String],
        tls: Option<ClientTlsConfig>,
        user: Option<(String, String)>,
    ) -> Result<Etcd, EtcdError> {
        let endpoints = endpoints
            .iter()
            .map(|endpoint| {
                let problem = |e: tonic::transport::Error| EtcdError::Endpoint {
                    endpoint: endpoint.clone(),
                    problem: e.to_string(),
                };
                let e = Endpoint::from_shared(endpoint.clone())
                    .map_err(problem)?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(3));
                match &tls {
                    Some(tls) => e.tls_config(tls.clone()).map_err(problem),
                    None => Ok(e),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = Channel::balance_list(endpoints.into_iter());
        let token = Token::default();
        let login = user.map(|(user, password)| Login {
            user,
            password,
            auth: AuthClient::new(channel.clone()),
            token: token.clone(),
        });
        Ok(Etcd {
            kv: KvClient::with_interceptor(channel.clone(), token.clone()),
            lease: LeaseClient::with_interceptor(channel.clone(), token.clone()),
            watch: WatchClient::with_interceptor(channel, token),
            login,
        })
    }

    /// Logs in to etcd (its user authentication), if configured: when there
    /// is no token yet, or always if `force` (etcd refused the token: it
    /// expired).
    async fn authenticate(&self, force: bool) -> Result<(), EtcdError> {
        let Some(login) = &self.login else {
            return Ok(());
        };
        if !force
            && login
                .token
                .0
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
        {
            return Ok(());
        }
        let request = AuthenticateRequest {
            name: login.user.clone(),
            password: login.password.clone(),
        };
        let reply = timed(login.auth.clone().authenticate(request)).await?;
        let token = MetadataValue::try_from(reply.token.as_str())
            .map_err(|_| EtcdError::Protocol("etcd's auth token is not a header value"))?;
        *login.token.0.write().unwrap_or_else(|e| e.into_inner()) = Some(token);
        Ok(())
    }

    /// Runs `call` with a token (when etcd's user authentication is on),
    /// once more with a new one if etcd says the token expired.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, EtcdError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.authenticate(false).await?;
        match timed(call()).await {
            Err(EtcdError::Status(status))
                if self.login.is_some() && status.code() == tonic::Code::Unauthenticated =>
            {
                self.authenticate(true).await?;
                timed(call()).await
            }
            result => result,
        }
    }

    /// The value of `key`, with its revisions.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let request = RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let mut reply = self
            .call(|| {
                let (mut kv, request) = (self.kv.clone(), request.clone());
                async move { kv.range(request).await }
            })
            .await?;
        Ok(reply.kvs.pop())
    }

    /// Every key under `prefix`, in key order.
    pub async fn prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, EtcdError> {
        let request = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix),
            ..Default::default()
        };
        Ok(self
            .call(|| {
                let (mut kv, request) = (self.kv.clone(), request.clone());
                async move { kv.range(request).await }
            })
            .await?
            .kvs)
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
        self.call(|| {
            let (mut kv, request) = (self.kv.clone(), request.clone());
            async move { kv.put(request).await }
        })
        .await
        .map(drop)
    }

    /// Deletes `key`; whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, EtcdError> {
        let request = DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let reply = self
            .call(|| {
                let (mut kv, request) = (self.kv.clone(), request.clone());
                async move { kv.delete_range(request).await }
            })
            .await?;
        Ok(reply.deleted > 0)
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
        self.txn(request).await
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
        self.txn(request).await
    }

    /// Runs one transaction; whether its conditions held.
    async fn txn(&self, request: TxnRequest) -> Result<bool, EtcdError> {
        let reply = self
            .call(|| {
                let (mut kv, request) = (self.kv.clone(), request.clone());
                async move { kv.txn(request).await }
            })
            .await?;
        Ok(reply.succeeded)
    }

    /// A new lease of `ttl`; its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let request = LeaseGrantRequest {
            ttl: ttl.as_secs().max(1) as i64,
            id: 0,
        };
        let reply = self
            .call(|| {
                let mut lease = self.lease.clone();
                async move { lease.lease_grant(request).await }
            })
            .await?;
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
        let mut replies = self
            .call(|| {
                let mut lease = self.lease.clone();
                let requests = tokio_stream::once(LeaseKeepAliveRequest { id });
                async move { lease.lease_keep_alive(requests).await }
            })
            .await?;
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
        self.call(|| {
            let mut lease = self.lease.clone();
            async move { lease.lease_revoke(LeaseRevokeRequest { id }).await }
        })
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
        if let Err(e) = self.authenticate(false).await {
            return e;
        }
        let mut stream = match timed(self.watch.clone().watch(ReceiverStream::new(rx))).await {
            Ok(stream) => stream,
            Err(EtcdError::Status(status))
                if self.login.is_some() && status.code() == tonic::Code::Unauthenticated =>
            {
                // A new token for the next watch (the caller watches again).
                if let Err(e) = self.authenticate(true).await {
                    return e;
                }
                return status.into();
            }
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
