//! Invitations: the token `svpnctl invite` prints and `simplevpnd join`
//! takes, and the messages of a joining connection, as bytes. Making a
//! secret (the system's random source) and the TLS that carries the
//! messages belong to the `simplevpn` crate.
//!
//! The token is `svpn1-` and the base64url (no padding) of a versioned
//! binary struct:
//!
//! ```text
//! version u8 (1) | secret [16] | keys u8 (1..=8) | keys [32 each]
//!   | endpoint len u8 | endpoint (UTF-8, HOST:PORT) | name len u8 | name
//!   | checksum [4]: the first 4 bytes of SHA-256 of everything before it
//! ```
//!
//! The checksum makes a token mistyped by a character fail here, with a
//! message saying so, before anything is dialed.
//!
//! A joining connection is TLS with the ALPN [`ALPN_JOIN`]: the joiner
//! sends one [`JoinRequest`], the server answers one [`JoinAccepted`] or
//! [`JoinRefusal`] and closes. Each message is a 2-byte big-endian length,
//! then that many bytes: a type byte and its fields (at most
//! [`MAX_JOIN_MESSAGE`] bytes in all; a length beyond it is refused before
//! anything more is read).
//!
//! ```text
//! 1 REQUEST   secret [16] | name len u8 | name
//! 2 ACCEPTED  name len u8 | name | address: 0, or 4 and 4 bytes | keys u8 | keys [32 each]
//! 3 REFUSED   reason u8 (JoinRefusal)
//! ```

use std::fmt;
use std::net::Ipv4Addr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

pub use crate::limits::MAX_JOIN_MESSAGE;

/// The ALPN protocol of a joining connection.
pub const ALPN_JOIN: &[u8] = b"simplevpn-join/1";
/// What every token starts with.
pub const TOKEN_PREFIX: &str = "svpn1-";
/// The token format's version byte.
const TOKEN_VERSION: u8 = 1;
/// Bytes of a token's secret: 128 bits.
pub const SECRET_LEN: usize = 16;
/// Bytes of a token's checksum.
const CHECKSUM_LEN: usize = 4;
/// Server keys a token or an acceptance carries, at most.
pub const MAX_KEYS: usize = 8;
/// Bytes of a server key (Ed25519) on the wire.
pub const KEY_LEN: usize = 32;

/// A server key as tokens and acceptances carry it: [`KEY_LEN`] raw bytes.
/// The codec leaves the key type to its user (the daemon's Ed25519
/// `PublicKey`; plain bytes for a fuzzer), so the core needs no key
/// handling of its own.
pub trait JoinKey: Clone + fmt::Debug + PartialEq + Eq {
    /// The key of `bytes`, if they are one.
    fn from_raw(bytes: &[u8]) -> Option<Self>;
    /// The key's bytes.
    fn raw(&self) -> &[u8; KEY_LEN];
}

impl JoinKey for [u8; KEY_LEN] {
    fn from_raw(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok()
    }

    fn raw(&self) -> &[u8; KEY_LEN] {
        self
    }
}

/// A token's random secret. Its Debug form hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; SECRET_LEN]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// What the server keeps: SHA-256 of the secret, in hex.
    pub fn hash(&self) -> String {
        Sha256::digest(self.0)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// What `simplevpnd join` needs to know: where to dial, which keys to pin,
/// the name it joins as, and the secret that proves the invitation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token<K> {
    pub endpoint: String,
    pub server_keys: Vec<K>,
    pub name: String,
    pub secret: Secret,
}

/// Why a token or a message was refused. Each is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("not an invitation token: it starts with {TOKEN_PREFIX:?}")]
    NoPrefix,
    #[error(
        "the token has a character that is not in it (copy it whole, as svpnctl invite printed it)"
    )]
    BadCharacter,
    #[error("the token's checksum does not match: a character is mistyped or missing (copy it whole, as svpnctl invite printed it)")]
    Checksum,
    #[error("the token is cut short")]
    Truncated,
    #[error("token version {0} is not known to this simplevpnd (1 is)")]
    UnknownVersion(u8),
    #[error("{0}: out of range")]
    BadField(&'static str),
    #[error("a join message of {0} bytes is larger than {MAX_JOIN_MESSAGE}")]
    TooLong(usize),
    #[error("unknown join message type {0}")]
    UnknownType(u8),
    #[error("unknown join refusal reason {0}")]
    UnknownReason(u8),
    #[error("{0} trailing bytes in a join message")]
    Trailing(usize),
    /// Making a secret (the simplevpn crate's part) found no randomness.
    #[error("no randomness from the system")]
    NoRandomness,
}

/// Whether `name` may name a peer: 1 to [`crate::limits::MAX_PEER_NAME_LEN`]
/// printable ASCII characters without spaces.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::limits::MAX_PEER_NAME_LEN
        && name.chars().all(|c| c.is_ascii_graphic())
}

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let digest = Sha256::digest(bytes);
    let mut sum = [0u8; CHECKSUM_LEN];
    sum.copy_from_slice(&digest[..CHECKSUM_LEN]);
    sum
}

/// Appends a length byte and `text`; refuses text longer than 255 bytes.
fn put_text(out: &mut Vec<u8>, text: &str, field: &'static str) -> Result<(), JoinError> {
    let len = u8::try_from(text.len()).map_err(|_| JoinError::BadField(field))?;
    out.push(len);
    out.extend_from_slice(text.as_bytes());
    Ok(())
}

fn put_keys<K: JoinKey>(
    out: &mut Vec<u8>,
    keys: &[K],
    field: &'static str,
) -> Result<(), JoinError> {
    if keys.len() > MAX_KEYS {
        return Err(JoinError::BadField(field));
    }
    out.push(keys.len() as u8);
    for key in keys {
        out.extend_from_slice(key.raw());
    }
    Ok(())
}

/// Reads fields off the front of a slice; running out is `short`.
struct Fields<'a> {
    bytes: &'a [u8],
    short: JoinError,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], JoinError> {
        if self.bytes.len() < n {
            return Err(self.short.clone());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, JoinError> {
        Ok(self.take(1)?[0])
    }

    fn text(&mut self, field: &'static str) -> Result<String, JoinError> {
        let len = self.byte()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| JoinError::BadField(field))
    }

    fn name(&mut self) -> Result<String, JoinError> {
        let name = self.text("name")?;
        match valid_name(&name) {
            true => Ok(name),
            false => Err(JoinError::BadField("name")),
        }
    }

    fn secret(&mut self) -> Result<Secret, JoinError> {
        let mut secret = [0u8; SECRET_LEN];
        secret.copy_from_slice(self.take(SECRET_LEN)?);
        Ok(Secret(secret))
    }

    fn keys<K: JoinKey>(&mut self, field: &'static str, min: usize) -> Result<Vec<K>, JoinError> {
        let n = self.byte()? as usize;
        if !(min..=MAX_KEYS).contains(&n) {
            return Err(JoinError::BadField(field));
        }
        (0..n)
            .map(|_| {
                let raw = self.take(KEY_LEN)?;
                K::from_raw(raw).ok_or(JoinError::BadField(field))
            })
            .collect()
    }

    fn end(&self) -> Result<(), JoinError> {
        match self.bytes.len() {
            0 => Ok(()),
            n => Err(JoinError::Trailing(n)),
        }
    }
}

impl<K: JoinKey> Token<K> {
    /// The token's text: [`TOKEN_PREFIX`] and base64url.
    pub fn encode(&self) -> Result<String, JoinError> {
        let mut bytes = vec![TOKEN_VERSION];
        bytes.extend_from_slice(&self.secret.0);
        if self.server_keys.is_empty() {
            return Err(JoinError::BadField("server keys"));
        }
        put_keys(&mut bytes, &self.server_keys, "server keys")?;
        put_text(&mut bytes, &self.endpoint, "endpoint")?;
        if !valid_name(&self.name) {
            return Err(JoinError::BadField("name"));
        }
        put_text(&mut bytes, &self.name, "name")?;
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum);
        Ok(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// The token in `text` (surrounding white space ignored).
    pub fn decode(text: &str) -> Result<Token<K>, JoinError> {
        let body = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(JoinError::NoPrefix)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| JoinError::BadCharacter)?;
        if bytes.len() < 1 + CHECKSUM_LEN {
            return Err(JoinError::Truncated);
        }
        let (data, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if checksum(data) != sum {
            return Err(JoinError::Checksum);
        }
        let mut fields = Fields {
            bytes: data,
            short: JoinError::Truncated,
        };
        match fields.byte()? {
            TOKEN_VERSION => {}
            other => return Err(JoinError::UnknownVersion(other)),
        }
        let secret = fields.secret()?;
        let server_keys = fields.keys("server keys", 1)?;
        let endpoint = fields.text("endpoint")?;
        if endpoint.is_empty() {
            return Err(JoinError::BadField("endpoint"));
        }
        let name = fields.name()?;
        fields.end()?;
        Ok(Token {
            endpoint,
            server_keys,
            name,
            secret,
        })
    }
}

/// The joiner's one message: the secret, and the name it was invited as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    pub secret: Secret,
    pub name: String,
}

/// The server's yes: the name the joiner's key is allowed under, the
/// address fixed for it, and the keys of the servers it may meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinAccepted<K> {
    pub name: String,
    pub address: Option<Ipv4Addr>,
    pub server_keys: Vec<K>,
}

/// The server's no (a closed set: the joiner prints each its own way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRefusal {
    /// No invitation has this secret and name.
    Unknown,
    /// It was redeemed already.
    Used,
    /// Its time ran out.
    Expired,
    /// `svpnctl invite revoke` withdrew it.
    Revoked,
    /// Its name or address is taken now, or the joining key is allowed
    /// already.
    DoesNotFit,
    /// The server could not decide now (its store, stopping): try again.
    Unavailable,
}

impl JoinRefusal {
    fn code(self) -> u8 {
        match self {
            JoinRefusal::Unknown => 1,
            JoinRefusal::Used => 2,
            JoinRefusal::Expired => 3,
            JoinRefusal::Revoked => 4,
            JoinRefusal::DoesNotFit => 5,
            JoinRefusal::Unavailable => 6,
        }
    }

    fn from_code(code: u8) -> Result<JoinRefusal, JoinError> {
        Ok(match code {
            1 => JoinRefusal::Unknown,
            2 => JoinRefusal::Used,
            3 => JoinRefusal::Expired,
            4 => JoinRefusal::Revoked,
            5 => JoinRefusal::DoesNotFit,
            6 => JoinRefusal::Unavailable,
            other => return Err(JoinError::UnknownReason(other)),
        })
    }
}

impl fmt::Display for JoinRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JoinRefusal::Unknown => "the server knows no such invitation (wrong token, or another server's)",
            JoinRefusal::Used => "the invitation was used already (each token joins one host once)",
            JoinRefusal::Expired => "the invitation has expired (ask for a new one: svpnctl invite)",
            JoinRefusal::Revoked => "the invitation was revoked",
            JoinRefusal::DoesNotFit => "the invitation does not fit any more (its name or address is taken, or this host's key is allowed already)",
            JoinRefusal::Unavailable => "the server cannot decide now (its state store, or it is stopping): try again",
        })
    }
}

/// One message of a joining connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinMessage<K> {
    Request(JoinRequest),
    Accepted(JoinAccepted<K>),
    Refused(JoinRefusal),
}

const TYPE_REQUEST: u8 = 1;
const TYPE_ACCEPTED: u8 = 2;
const TYPE_REFUSED: u8 = 3;

impl<K: JoinKey> JoinMessage<K> {
    /// The message with its length in front.
    pub fn encode(&self) -> Result<Vec<u8>, JoinError> {
        let mut body = Vec::new();
        match self {
            JoinMessage::Request(request) => {
                body.push(TYPE_REQUEST);
                body.extend_from_slice(&request.secret.0);
                if !valid_name(&request.name) {
                    return Err(JoinError::BadField("name"));
                }
                put_text(&mut body, &request.name, "name")?;
            }
            JoinMessage::Accepted(accepted) => {
                body.push(TYPE_ACCEPTED);
                if !valid_name(&accepted.name) {
                    return Err(JoinError::BadField("name"));
                }
                put_text(&mut body, &accepted.name, "name")?;
                match accepted.address {
                    Some(address) => {
                        body.push(4);
                        body.extend_from_slice(&address.octets());
                    }
                    None => body.push(0),
                }
                put_keys(&mut body, &accepted.server_keys, "server keys")?;
            }
            JoinMessage::Refused(reason) => {
                body.push(TYPE_REFUSED);
                body.push(reason.code());
            }
        }
        if body.len() > MAX_JOIN_MESSAGE {
            return Err(JoinError::TooLong(body.len()));
        }
        let mut out = (body.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The message at the start of `bytes` and how many bytes it took;
    /// `Ok(None)` while it is incomplete. A length beyond
    /// [`MAX_JOIN_MESSAGE`] is refused as soon as its two bytes are in.
    pub fn decode(bytes: &[u8]) -> Result<Option<(JoinMessage<K>, usize)>, JoinError> {
        let Some(head) = bytes.get(..2) else {
            return Ok(None);
        };
        let len = u16::from_be_bytes([head[0], head[1]]) as usize;
        if len > MAX_JOIN_MESSAGE {
            return Err(JoinError::TooLong(len));
        }
        let Some(body) = bytes.get(2..2 + len) else {
            return Ok(None);
        };
        let mut fields = Fields {
            bytes: body,
            short: JoinError::Truncated,
        };
        let message = match fields.byte()? {
            TYPE_REQUEST => {
                let secret = fields.secret()?;
                let name = fields.name()?;
                JoinMessage::Request(JoinRequest { secret, name })
            }
            TYPE_ACCEPTED => {
                let name = fields.name()?;
                let address = match fields.byte()? {
                    0 => None,
                    4 => {
                        let o = fields.take(4)?;
                        Some(Ipv4Addr::new(o[0], o[1], o[2], o[3]))
                    }
                    _ => return Err(JoinError::BadField("address")),
                };
                let server_keys = fields.keys("server keys", 0)?;
                JoinMessage::Accepted(JoinAccepted {
                    name,
                    address,
                    server_keys,
                })
            }
            TYPE_REFUSED => JoinMessage::Refused(JoinRefusal::from_code(fields.byte()?)?),
            other => return Err(JoinError::UnknownType(other)),
        };
        fields.end()?;
        Ok(Some((message, 2 + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Key = [u8; KEY_LEN];
    type Token = super::Token<Key>;
    type JoinMessage = super::JoinMessage<Key>;

    fn key(n: u8) -> Key {
        [n; KEY_LEN]
    }

    fn token() -> Token {
        Token {
            endpoint: "vpn.example.org:2002".into(),
            server_keys: vec![key(1), key(2)],
            name: "laptop".into(),
            secret: Secret([7; SECRET_LEN]),
        }
    }

    #[test]
    fn a_token_round_trips_and_is_compact() {
        let text = token().encode().expect("encode");
        assert!(text.starts_with("svpn1-"), "{text}");
        assert!(text.len() < 160, "{} bytes: {text}", text.len());
        assert!(text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(Token::decode(&text), Ok(token()));
        assert_eq!(Token::decode(&format!("  {text}\n")), Ok(token()));
    }

    #[test]
    fn a_secret_is_kept_as_its_sha256_and_never_shown() {
        // sha256sum of the same 16 bytes.
        assert_eq!(
            Secret([0; SECRET_LEN]).hash(),
            "374708fff7719dd5979ec875d56cd2286f6d3cf7ec317a3b25632aab28ec37bb"
        );
        assert_eq!(
            Secret([7; SECRET_LEN]).hash(),
            "d761d406af2a4a5a15f67c924378ed88d1f85c13f1a37fc7366f59789b3bcd65"
        );
        assert_eq!(format!("{:?}", Secret([7; SECRET_LEN])), "Secret(..)");
    }

    #[test]
    fn every_one_character_change_is_refused() {
        let text = token().encode().expect("encode");
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for i in TOKEN_PREFIX.len()..text.len() {
            for &c in alphabet {
                let mut bytes = text.clone().into_bytes();
                if bytes[i] == c {
                    continue;
                }
                bytes[i] = c;
                let altered = String::from_utf8(bytes).expect("ascii");
                let e = Token::decode(&altered).expect_err(&altered);
                assert!(
                    matches!(e, JoinError::Checksum | JoinError::BadCharacter),
                    "{altered}: {e}"
                );
            }
        }
        // A character dropped, or one too many.
        let mut short = text.clone();
        short.remove(20);
        assert!(Token::decode(&short).is_err());
        let long = format!("{text}A");
        assert!(Token::decode(&long).is_err());
        assert_eq!(Token::decode("svpn2-abc"), Err(JoinError::NoPrefix));
        assert_eq!(
            Token::decode(&text.replace("svpn1-", "svpn1-*")),
            Err(JoinError::BadCharacter)
        );
        assert_eq!(Token::decode("svpn1-"), Err(JoinError::Truncated));
        let message = JoinError::Checksum.to_string();
        assert!(message.contains("mistyped"), "{message}");
    }

    #[test]
    fn a_token_with_bad_fields_is_refused_even_with_a_good_checksum() {
        let seal = |data: Vec<u8>| {
            let mut bytes = data.clone();
            bytes.extend_from_slice(&checksum(&data));
            format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
        };
        let mut good = vec![TOKEN_VERSION];
        good.extend_from_slice(&[7; SECRET_LEN]);
        good.push(1);
        good.extend_from_slice(&[1; 32]);
        good.push(4);
        good.extend_from_slice(b"h:22");
        good.push(1);
        good.push(b'n');
        assert!(Token::decode(&seal(good.clone())).is_ok());
        let mut newer = good.clone();
        newer[0] = 2;
        assert_eq!(
            Token::decode(&seal(newer)),
            Err(JoinError::UnknownVersion(2))
        );
        let mut no_keys = good.clone();
        no_keys[1 + SECRET_LEN] = 0;
        assert_eq!(
            Token::decode(&seal(no_keys)),
            Err(JoinError::BadField("server keys"))
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(Token::decode(&seal(trailing)), Err(JoinError::Trailing(1)));
        let mut cut = good.clone();
        cut.pop();
        assert_eq!(Token::decode(&seal(cut)), Err(JoinError::Truncated));
        let mut spaced = good;
        *spaced.last_mut().expect("name") = b' ';
        assert_eq!(
            Token::decode(&seal(spaced)),
            Err(JoinError::BadField("name"))
        );
    }

    fn messages() -> Vec<JoinMessage> {
        vec![
            JoinMessage::Request(JoinRequest {
                secret: Secret([9; SECRET_LEN]),
                name: "laptop".into(),
            }),
            JoinMessage::Accepted(JoinAccepted {
                name: "laptop".into(),
                address: Some(Ipv4Addr::new(198, 19, 0, 9)),
                server_keys: vec![key(1)],
            }),
            JoinMessage::Accepted(JoinAccepted {
                name: "x".into(),
                address: None,
                server_keys: Vec::new(),
            }),
            JoinMessage::Refused(JoinRefusal::Unknown),
            JoinMessage::Refused(JoinRefusal::Used),
            JoinMessage::Refused(JoinRefusal::Expired),
            JoinMessage::Refused(JoinRefusal::Revoked),
            JoinMessage::Refused(JoinRefusal::DoesNotFit),
            JoinMessage::Refused(JoinRefusal::Unavailable),
        ]
    }

    #[test]
    fn messages_round_trip_in_any_split() {
        for message in messages() {
            let bytes = message.encode().expect("encode");
            for cut in 0..bytes.len() {
                assert_eq!(JoinMessage::decode(&bytes[..cut]), Ok(None), "{cut}");
            }
            let mut more = bytes.clone();
            more.extend_from_slice(b"next");
            assert_eq!(
                JoinMessage::decode(&more),
                Ok(Some((message.clone(), bytes.len())))
            );
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        assert_eq!(
            JoinMessage::decode(&[0xff, 0xff]),
            Err(JoinError::TooLong(0xffff))
        );
        assert_eq!(JoinMessage::decode(&[0, 0]), Err(JoinError::Truncated));
        assert_eq!(
            JoinMessage::decode(&[0, 1, 9]),
            Err(JoinError::UnknownType(9))
        );
        assert_eq!(
            JoinMessage::decode(&[0, 2, TYPE_REFUSED, 0]),
            Err(JoinError::UnknownReason(0))
        );
        assert_eq!(
            JoinMessage::decode(&[0, 3, TYPE_REFUSED, 1, 1]),
            Err(JoinError::Trailing(1))
        );
        let mut request = vec![0, 1 + SECRET_LEN as u8 + 1, TYPE_REQUEST];
        request.extend_from_slice(&[0; SECRET_LEN]);
        request.push(0);
        assert_eq!(
            JoinMessage::decode(&request),
            Err(JoinError::BadField("name"))
        );
        let mut accepted = vec![0, 5, TYPE_ACCEPTED, 1, b'n', 6, 0];
        assert_eq!(
            JoinMessage::decode(&accepted),
            Err(JoinError::BadField("address"))
        );
        accepted[5] = 0;
        accepted[6] = 9;
        assert_eq!(
            JoinMessage::decode(&accepted),
            Err(JoinError::BadField("server keys"))
        );
        let long = JoinMessage::Request(JoinRequest {
            secret: Secret([0; SECRET_LEN]),
            name: "n".repeat(100),
        });
        assert_eq!(long.encode(), Err(JoinError::BadField("name")));
    }
}
