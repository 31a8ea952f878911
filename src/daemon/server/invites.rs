//! Invitations: made and revoked through the control API, redeemed by a
//! joining host ([`join`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::io::AsyncWriteExt;
use tokio::time::timeout;
use tracing::{debug, info, warn, Span};

use crate::cluster::invites::InviteStoreError;
use crate::config::{ConfigError, PeerSection};
use crate::daemon::admission::RefusalReason;
use crate::daemon::control::{AdminError, AdminRequest, InviteRequest};
use crate::daemon::gate::Joining;
use crate::daemon::peers::Banned;
use crate::join::{
    JoinAccepted, JoinMessage, JoinRefusal, JoinRequest, RandomSecret, Secret, Token,
};
use crate::keys::PublicKey;
use crate::limits::JOIN_REQUEST_TIMEOUT;
use crate::state::{Invite, InviteState, StoreError};

use super::admin::check;
use super::Shared;

/// Makes an invitation: checks that its name and address would fit as a
/// peer now, keeps the hash of a new secret, and returns the token.
pub(super) async fn create_invite(
    shared: &Arc<Shared>,
    request: InviteRequest,
) -> Result<(Invite, String), AdminError> {
    let server_key = shared.public_key.ok_or(AdminError::NoKey)?;
    let invalid =
        |field: &str, problem: String| AdminError::Invalid(ConfigError::new(field, problem));
    if !crate::join::valid_name(&request.name) {
        return Err(invalid(
            "name",
            format!(
                "{:?}: 1 to {} printable characters without spaces",
                request.name,
                crate::limits::MAX_PEER_NAME_LEN
            ),
        ));
    }
    let endpoint = request
        .endpoint
        .clone()
        .or_else(|| shared.current().endpoint.clone())
        .ok_or_else(|| {
            invalid(
                "endpoint",
                "the server has no endpoint: set endpoint = \"HOST:PORT\" in [server] (what \
                 clients dial), or pass --endpoint"
                    .into(),
            )
        })?;
    // The joining host's entry, with a key no host has: it must fit beside
    // the peers allowed now (its name free, its address in the network and
    // not fixed for another).
    let placeholder = PublicKey::from_raw(&[0; 32]).ok_or(AdminError::NoKey)?;
    let mut live = shared
        .live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    live.push(PeerSection {
        client_to_client: None,
        key: placeholder,
        name: Some(request.name.clone()),
        address: request.address,
        address6: None,
        routes: Vec::new(),
    });
    if let Some(taken) = shared
        .gate
        .peers()
        .iter()
        .find(|p| p.section.name.as_deref() == Some(request.name.as_str()))
    {
        return Err(invalid(
            "name",
            format!(
                "{:?} names an allowed peer already ({})",
                request.name, taken.section.key
            ),
        ));
    }
    check(&shared.current(), &live)?;
    let secret = Secret::random().map_err(|e| invalid("secret", e.to_string()))?;
    let token = Token {
        endpoint,
        server_keys: shared.server_keys(server_key),
        name: request.name.clone(),
        secret: secret.clone(),
    }
    .encode()
    .map_err(|e| invalid("endpoint", e.to_string()))?;
    let now = SystemTime::now();
    let invite = Invite {
        hash: secret.hash(),
        name: request.name,
        address: request.address,
        created: now,
        expires: now + request.ttl,
        state: InviteState::Open,
    };
    match &shared.cluster {
        Some(cluster) => cluster
            .put_invite(&invite, now)
            .await
            .map_err(|e| match e {
                InviteStoreError::Exists(name) => StoreError::InviteExists(name).into(),
                InviteStoreError::Etcd(e) => AdminError::Cluster(e),
            })?,
        None => shared.store.put_invite(&invite, now)?,
    }
    Ok((invite, token))
}

/// Revokes the open invitation named `name`.
pub(super) async fn revoke_invite(shared: &Arc<Shared>, name: &str) -> Result<Invite, AdminError> {
    let revoked = match &shared.cluster {
        Some(cluster) => cluster.revoke_invite(name).await?,
        None => match shared.store.revoke_invite(name)? {
            true => shared
                .store
                .invites()?
                .into_iter()
                .rev()
                .find(|i| i.name == name && i.state == InviteState::Revoked),
            false => None,
        },
    };
    revoked.ok_or_else(|| AdminError::NoSuchInvite(name.to_string()))
}

impl Shared {
    /// Every invitation: in etcd in a cluster, else in the state store.
    pub(super) async fn invites(&self) -> Result<Vec<Invite>, AdminError> {
        match &self.cluster {
            Some(cluster) => Ok(cluster.invites().await?),
            None => Ok(self.store.invites()?),
        }
    }

    /// See [`crate::state::StateStore::redeem_invite`]; in etcd in a cluster.
    pub(super) async fn redeem_invite(
        &self,
        hash: &str,
        name: &str,
    ) -> Result<Result<Invite, JoinRefusal>, AdminError> {
        let now = SystemTime::now();
        match &self.cluster {
            Some(cluster) => Ok(cluster.redeem_invite(hash, name, now).await?),
            None => Ok(self.store.redeem_invite(hash, name, now)?),
        }
    }

    pub(super) async fn unredeem_invite(&self, hash: &str) -> Result<(), AdminError> {
        match &self.cluster {
            Some(cluster) => Ok(cluster.unredeem_invite(hash).await?),
            None => Ok(self.store.unredeem_invite(hash)?),
        }
    }
}

/// Serves a host joining with an invitation: one request within
/// [`JOIN_REQUEST_TIMEOUT`], one answer, then the connection is closed.
pub(super) async fn join(shared: &Arc<Shared>, joining: Joining, remote: SocketAddr) {
    let Joining { mut stream, key } = joining;
    let request = match timeout(
        JOIN_REQUEST_TIMEOUT,
        crate::daemon::join::read_message(&mut stream),
    )
    .await
    {
        Ok(Ok(JoinMessage::Request(request))) => request,
        Ok(Ok(other)) => {
            let reason = format!("join: a {other:?} instead of a request");
            shared.refuse(remote, RefusalReason::JoinRefused, &reason);
            return;
        }
        Ok(Err(e)) => {
            let reason = format!("join: {e}");
            shared.refuse(remote, RefusalReason::JoinRefused, &reason);
            return;
        }
        Err(_) => {
            let reason = "join: no request within the time allowed";
            shared.refuse(remote, RefusalReason::JoinRefused, reason);
            return;
        }
    };
    Span::current().record("name", request.name.as_str());
    let banned = [Banned::Key(key), Banned::Remote(remote.ip())]
        .iter()
        .find_map(|who| shared.peers.ban_remaining(who, SystemTime::now()));
    let outcome = match banned {
        Some(_) => Err(JoinRefusal::Unknown),
        None => redeem(shared, &request, key).await,
    };
    let answer = match &outcome {
        Ok(accepted) => JoinMessage::Accepted(accepted.clone()),
        Err(refusal) => JoinMessage::Refused(*refusal),
    };
    match &outcome {
        Ok(accepted) => info!(
            %key,
            name = %accepted.name,
            "joined with an invitation: its key is allowed now"
        ),
        Err(refusal) => {
            let reason = format!("join as {:?} refused: {refusal}", request.name);
            shared.refuse(remote, RefusalReason::JoinRefused, &reason);
        }
    }
    if let Ok(bytes) = answer.encode() {
        let sent = async {
            stream.write_all(&bytes).await?;
            stream.flush().await?;
            stream.shutdown().await
        };
        if let Err(e) = timeout(JOIN_REQUEST_TIMEOUT, sent)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "timed out",
                ))
            })
        {
            debug!(error = %e, "join: the answer was not delivered");
        }
    }
}

/// Redeems the invitation `request` proves for `key`: marks it used and
/// allows the key under its name, or changes nothing and says why not.
async fn redeem(
    shared: &Arc<Shared>,
    request: &JoinRequest,
    key: PublicKey,
) -> Result<JoinAccepted, JoinRefusal> {
    let hash = request.secret.hash();
    let invite = match shared.redeem_invite(&hash, &request.name).await {
        Ok(result) => result?,
        Err(e) => {
            warn!(error = %e, "join: the state store failed");
            return Err(JoinRefusal::Unavailable);
        }
    };
    let peer = PeerSection {
        client_to_client: None,
        key,
        name: Some(invite.name.clone()),
        address: invite.address,
        address6: None,
        routes: Vec::new(),
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let added = match shared
        .admin
        .send(AdminRequest::AddPeer { peer, reply })
        .await
    {
        Ok(()) => answer.await.unwrap_or(Err(AdminError::Stopping)),
        Err(_) => Err(AdminError::Stopping),
    };
    if let Err(e) = added {
        // Not joined: the invitation stays as it was.
        if let Err(e) = shared.unredeem_invite(&hash).await {
            warn!(error = %e, "join: the invitation could not be opened again");
        }
        return Err(match e {
            AdminError::Exists(_) | AdminError::Invalid(_) => JoinRefusal::DoesNotFit,
            _ => JoinRefusal::Unavailable,
        });
    }
    Ok(JoinAccepted {
        name: invite.name,
        address: invite.address,
        server_keys: shared
            .public_key
            .map(|own| shared.server_keys(own))
            .unwrap_or_default(),
    })
}
