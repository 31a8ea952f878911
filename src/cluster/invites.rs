//! Invitations in a cluster (`svpnctl invite`): one etcd key each,
//! `<prefix>invites/<hash>` (the SHA-256 of the secret, hex), its value the
//! invitation as JSON, never the secret, in the envelope of the member that
//! wrote it ([`super::signed`]): one written by anyone else (with only etcd
//! access) is no invitation. Any server may redeem one: it is marked used by
//! a compare-and-swap on its revision, so of two servers redeeming it at
//! once exactly one wins.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::etcd::EtcdError;
use super::{unix_secs, Cluster};
use crate::join::JoinRefusal;
use crate::state::{Invite, InviteState};

/// An invitation as stored in etcd.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    name: String,
    address: Option<String>,
    created: u64,
    expires: u64,
    state: String,
}

fn key_of(prefix: &str, hash: &str) -> String {
    format!("{prefix}invites/{hash}")
}

pub fn encode(invite: &Invite) -> String {
    let stored = Stored {
        name: invite.name.clone(),
        address: invite.address.map(|a| a.to_string()),
        created: unix_secs(invite.created),
        expires: unix_secs(invite.expires),
        state: invite.state.as_str().to_string(),
    };
    // Strings and numbers only: serialising cannot fail.
    serde_json::to_string(&stored).unwrap_or_default()
}

/// None for a value that is not an invitation (it is skipped).
pub fn decode(hash: &str, value: &[u8]) -> Option<Invite> {
    let stored: Stored = serde_json::from_slice(value).ok()?;
    Some(Invite {
        hash: hash.to_string(),
        name: stored.name,
        address: stored.address.map(|a| a.parse()).transpose().ok()?,
        created: crate::wallclock::from_unix_secs(stored.created),
        expires: crate::wallclock::from_unix_secs(stored.expires),
        state: InviteState::parse(&stored.state)?,
    })
}

/// Why an invitation could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum InviteStoreError {
    #[error("{0}")]
    Etcd(#[from] EtcdError),
    #[error("an open invitation for {0:?} exists already (svpnctl invite revoke {0} first)")]
    Exists(String),
}

impl Cluster {
    /// `invite` at `key`, sealed by this server.
    fn sealed(&self, key: &str, invite: &Invite) -> Vec<u8> {
        self.records.seal(key, &encode(invite))
    }

    /// The invitation at `key` (of `hash`) if a pinned member signed it.
    fn opened(&self, key: &str, hash: &str, raw: &[u8]) -> Option<Invite> {
        decode(hash, &self.records.open(key, raw)?.value)
    }

    /// Every invitation in etcd, with its revision, oldest first.
    async fn invites_with_revisions(&self) -> Result<Vec<(Invite, i64)>, EtcdError> {
        let dir = format!("{}invites/", self.prefix);
        let mut all: Vec<(Invite, i64)> = self
            .etcd
            .prefix(&dir)
            .await?
            .into_iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                let hash = key.strip_prefix(&dir)?;
                Some((self.opened(&key, hash, &kv.value)?, kv.mod_revision))
            })
            .collect();
        all.sort_by(|a, b| (a.0.created, &a.0.name).cmp(&(b.0.created, &b.0.name)));
        Ok(all)
    }

    /// Every invitation, oldest first.
    pub async fn invites(&self) -> Result<Vec<Invite>, EtcdError> {
        Ok(self
            .invites_with_revisions()
            .await?
            .into_iter()
            .map(|(invite, _)| invite)
            .collect())
    }

    /// Stores a new invitation; refused if an open one of the same name
    /// has not expired at `now` (an expired one is replaced).
    pub async fn put_invite(
        &self,
        invite: &Invite,
        now: SystemTime,
    ) -> Result<(), InviteStoreError> {
        for (old, _) in self.invites_with_revisions().await? {
            if old.name != invite.name || old.state != InviteState::Open {
                continue;
            }
            if old.expires > now {
                return Err(InviteStoreError::Exists(invite.name.clone()));
            }
            self.etcd.delete(&key_of(&self.prefix, &old.hash)).await?;
        }
        let key = key_of(&self.prefix, &invite.hash);
        match self.etcd.create(&key, self.sealed(&key, invite), 0).await? {
            true => Ok(()),
            false => Err(InviteStoreError::Exists(invite.name.clone())),
        }
    }

    /// Revokes the open invitation named `name`; None if there is none.
    pub async fn revoke_invite(&self, name: &str) -> Result<Option<Invite>, EtcdError> {
        for (invite, revision) in self.invites_with_revisions().await? {
            if invite.name != name || invite.state != InviteState::Open {
                continue;
            }
            let revoked = Invite {
                state: InviteState::Revoked,
                ..invite
            };
            let key = key_of(&self.prefix, &revoked.hash);
            if self
                .etcd
                .replace(&key, revision, self.sealed(&key, &revoked), 0)
                .await?
            {
                return Ok(Some(revoked));
            }
        }
        Ok(None)
    }

    /// Marks the invitation with `hash` used if `name` may redeem it at
    /// `now`: a compare-and-swap, so one of two redeemers wins.
    pub async fn redeem_invite(
        &self,
        hash: &str,
        name: &str,
        now: SystemTime,
    ) -> Result<Result<Invite, JoinRefusal>, EtcdError> {
        let key = key_of(&self.prefix, hash);
        let Some(kv) = self.etcd.get(&key).await? else {
            return Ok(Err(JoinRefusal::Unknown));
        };
        let Some(invite) = self.opened(&key, hash, &kv.value) else {
            return Ok(Err(JoinRefusal::Unknown));
        };
        if let Err(refusal) = invite.redeem(name, now) {
            return Ok(Err(refusal));
        }
        let used = Invite {
            state: InviteState::Used,
            ..invite.clone()
        };
        match self
            .etcd
            .replace(&key, kv.mod_revision, self.sealed(&key, &used), 0)
            .await?
        {
            true => Ok(Ok(invite)),
            // Changed since it was read: redeemed or revoked meanwhile.
            false => Ok(Err(match self.etcd.get(&key).await? {
                Some(kv) => self
                    .opened(&key, hash, &kv.value)
                    .map_or(JoinRefusal::Unknown, |i| match i.state {
                        InviteState::Revoked => JoinRefusal::Revoked,
                        _ => JoinRefusal::Used,
                    }),
                None => JoinRefusal::Unknown,
            })),
        }
    }

    /// Opens a redeemed invitation again (its peer could not be added).
    pub async fn unredeem_invite(&self, hash: &str) -> Result<(), EtcdError> {
        let key = key_of(&self.prefix, hash);
        let Some(kv) = self.etcd.get(&key).await? else {
            return Ok(());
        };
        if let Some(invite) = self
            .opened(&key, hash, &kv.value)
            .filter(|i| i.state == InviteState::Used)
        {
            let open = Invite {
                state: InviteState::Open,
                ..invite
            };
            self.etcd
                .replace(&key, kv.mod_revision, self.sealed(&key, &open), 0)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_invitation_round_trips_and_garbage_is_refused() {
        let now = crate::wallclock::from_unix_secs(1_800_000_000);
        let invite = Invite {
            hash: "ab".repeat(32),
            name: "laptop".into(),
            address: Some("198.19.0.70".parse().expect("addr")),
            created: now,
            expires: now + Duration::from_secs(3600),
            state: InviteState::Used,
        };
        let text = encode(&invite);
        assert_eq!(decode(&invite.hash, text.as_bytes()), Some(invite.clone()));
        assert!(
            !text.contains(&invite.hash),
            "the key holds the hash: {text}"
        );
        for bad in [
            &b"{}"[..],
            b"nope",
            br#"{"name":"n","address":null,"created":1,"expires":2,"state":"gone"}"#,
            br#"{"name":"n","address":"x","created":1,"expires":2,"state":"open"}"#,
        ] {
            assert_eq!(decode("ab", bad), None);
        }
    }
}
