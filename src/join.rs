//! Invitations: the codec of tokens and join messages
//! ([`simplevpn_proto::join`]) with the daemon's Ed25519 keys in them, and
//! the one part that needs the system: making a secret.
//!
//! The I/O of a joining connection is in [`crate::daemon::join`] (the
//! joiner) and the server.

pub use simplevpn_proto::join::{
    valid_name, JoinError, JoinKey, JoinRefusal, JoinRequest, Secret, ALPN_JOIN, KEY_LEN,
    MAX_JOIN_MESSAGE, MAX_KEYS, SECRET_LEN, TOKEN_PREFIX,
};

use crate::keys::{PublicKey, PUBLIC_KEY_LEN};

/// An invitation token that pins the daemon's keys.
pub type Token = simplevpn_proto::join::Token<PublicKey>;
/// The server's yes, with the daemon's keys.
pub type JoinAccepted = simplevpn_proto::join::JoinAccepted<PublicKey>;
/// One message of a joining connection, with the daemon's keys.
pub type JoinMessage = simplevpn_proto::join::JoinMessage<PublicKey>;

impl JoinKey for PublicKey {
    fn from_raw(bytes: &[u8]) -> Option<Self> {
        PublicKey::from_raw(bytes)
    }

    fn raw(&self) -> &[u8; PUBLIC_KEY_LEN] {
        self.as_bytes()
    }
}

/// Making a [`Secret`], which the sans-IO codec cannot: it reads the
/// system's random source.
pub trait RandomSecret: Sized {
    /// A new secret from the system's random source.
    fn random() -> Result<Self, JoinError>;
}

impl RandomSecret for Secret {
    fn random() -> Result<Secret, JoinError> {
        let mut bytes = [0u8; SECRET_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| JoinError::NoRandomness)?;
        Ok(Secret(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_secrets_differ_and_their_hash_is_sha256() {
        let (a, b) = (Secret::random().expect("a"), Secret::random().expect("b"));
        assert_ne!(a, b);
        assert_ne!(a.hash(), b.hash());
        let digest = ring::digest::digest(&ring::digest::SHA256, &a.0);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(a.hash(), hex);
        assert_eq!(format!("{a:?}"), "Secret(..)");
    }

    #[test]
    fn a_token_carries_the_daemons_keys() {
        let key = |n: u8| PublicKey::from_raw(&[n; KEY_LEN]).expect("key");
        let token = Token {
            endpoint: "vpn.example.org:2002".into(),
            server_keys: vec![key(1), key(2)],
            name: "laptop".into(),
            secret: Secret([7; SECRET_LEN]),
        };
        let text = token.encode().expect("encode");
        assert_eq!(Token::decode(&text), Ok(token));
    }
}
