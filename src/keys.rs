//! Node keys: an Ed25519 key pair per node, the private key in a PEM file
//! (PKCS#8, mode 0600), the public key shown and configured as one line of
//! base64 (32 raw bytes), as WireGuard users are used to.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rcgen::{KeyPair, PKCS_ED25519};
use ring::signature::Ed25519KeyPair;
use rustls::pki_types::PrivatePkcs8KeyDer;

/// Length of a raw Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// The DER of an Ed25519 private key in PKCS#8 v1 (RFC 8410), before the
/// 32 bytes of its seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Why a key could not be made, read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0} already exists; refusing to overwrite a key")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not an Ed25519 private key in PEM (PKCS#8): {reason}")]
    BadPrivateKey { path: PathBuf, reason: String },
    #[error("{path}: readable by others (mode {mode:o}); run: chmod 600 {path}")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{0:?} is not a public key (44 characters of base64 for 32 bytes)")]
    BadPublicKey(String),
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error("private_key: not a private key (44 characters of base64 for a 32-byte seed)")]
    BadInlineKey,
}

/// A node's public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; PUBLIC_KEY_LEN]);

impl PublicKey {
    pub fn from_raw(bytes: &[u8]) -> Option<PublicKey> {
        bytes.try_into().ok().map(PublicKey)
    }

    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<PublicKey, KeyError> {
        STANDARD
            .decode(s.trim())
            .ok()
            .and_then(|raw| PublicKey::from_raw(&raw))
            .ok_or_else(|| KeyError::BadPublicKey(s.to_string()))
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A node's key pair, loaded from its private key file.
pub struct NodeKey {
    pair: KeyPair,
    /// The same key, for signing records ([`NodeKey::sign`]).
    signer: Ed25519KeyPair,
}

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// The signing form of `pair` (ring reads PKCS#8 v1 and v2).
fn signer_of(pair: &KeyPair) -> Result<Ed25519KeyPair, KeyError> {
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pair.serialize_der())
        .map_err(|e| KeyError::Generate(format!("not an Ed25519 key: {e}")))
}

impl PublicKey {
    /// Whether `signature` is this key's Ed25519 signature of `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.public())
    }
}

impl NodeKey {
    /// A new key, in memory only.
    pub fn new_random() -> Result<NodeKey, KeyError> {
        let pair =
            KeyPair::generate_for(&PKCS_ED25519).map_err(|e| KeyError::Generate(e.to_string()))?;
        NodeKey::of_pair(pair)
    }

    /// The private key as a key file holds it (PEM, PKCS#8).
    pub fn to_pem(&self) -> String {
        self.pair.serialize_pem()
    }

    /// A private key from the text of a key file; `origin` names where it
    /// came from in errors.
    pub fn from_pem(pem: &str, origin: &Path) -> Result<NodeKey, KeyError> {
        let bad = |reason: String| KeyError::BadPrivateKey {
            path: origin.to_path_buf(),
            reason,
        };
        let pair = KeyPair::from_pem(pem).map_err(|e| bad(e.to_string()))?;
        if !pair.is_compatible(&PKCS_ED25519) {
            return Err(bad("another algorithm".into()));
        }
        let signer = signer_of(&pair).map_err(|e| bad(e.to_string()))?;
        Ok(NodeKey { pair, signer })
    }

    /// Writes a new private key to `path` (mode 0600, never overwriting).
    pub fn generate(path: &Path) -> Result<NodeKey, KeyError> {
        let NodeKey { pair, signer } = NodeKey::new_random()?;
        let io_err = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => KeyError::Exists(path.to_path_buf()),
                _ => io_err(e),
            })?;
        file.write_all(pair.serialize_pem().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_err)?;
        Ok(NodeKey { pair, signer })
    }

    /// Reads a private key file; refuses one that others may read.
    pub fn load(path: &Path) -> Result<NodeKey, KeyError> {
        let io_err = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mode = fs::metadata(path).map_err(io_err)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                path: path.to_path_buf(),
                mode: mode & 0o777,
            });
        }
        let pem = fs::read_to_string(path).map_err(io_err)?;
        NodeKey::from_pem(&pem, path)
    }

    /// A new key and its 32-byte Ed25519 seed, which is the whole private
    /// key: what a config's `private_key` holds (base64), as WireGuard's
    /// `PrivateKey` does.
    pub fn new_inline() -> Result<(NodeKey, String), KeyError> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| KeyError::Generate("no randomness".into()))?;
        let key = NodeKey::from_ed25519_seed(&seed)?;
        Ok((key, STANDARD.encode(seed)))
    }

    /// The key whose seed `text` holds (base64 of 32 bytes).
    pub fn from_inline(text: &str) -> Result<NodeKey, KeyError> {
        let seed = STANDARD
            .decode(text.trim())
            .ok()
            .filter(|s| s.len() == 32)
            .ok_or(KeyError::BadInlineKey)?;
        NodeKey::from_ed25519_seed(&seed)
    }

    /// The Ed25519 key of a 32-byte seed (PKCS#8 v1 around it).
    fn from_ed25519_seed(seed: &[u8]) -> Result<NodeKey, KeyError> {
        let mut der = Vec::with_capacity(ED25519_PKCS8_PREFIX.len() + seed.len());
        der.extend_from_slice(&ED25519_PKCS8_PREFIX);
        der.extend_from_slice(seed);
        let pair =
            KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der), &PKCS_ED25519)
                .map_err(|e| KeyError::Generate(e.to_string()))?;
        NodeKey::of_pair(pair)
    }

    /// The key numbered `index` of a family derived from `seed`: the
    /// Ed25519 key whose 32-byte seed is SHA-256(seed || index as 8 bytes,
    /// big-endian). The same seed and index always give the same key, so
    /// that a server can be configured with the public keys of many peers
    /// before they exist (the load generator's TLS peers). Not for real
    /// nodes: anyone who knows the seed has every key.
    pub fn from_seed(seed: &[u8], index: u64) -> Result<NodeKey, KeyError> {
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        hash.update(seed);
        hash.update(&index.to_be_bytes());
        NodeKey::from_ed25519_seed(hash.finish().as_ref())
    }

    fn of_pair(pair: KeyPair) -> Result<NodeKey, KeyError> {
        let signer = signer_of(&pair)?;
        Ok(NodeKey { pair, signer })
    }

    /// This key's Ed25519 signature of `message` (deterministic: the same
    /// message always gets the same signature).
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut signature = [0; SIGNATURE_LEN];
        signature.copy_from_slice(self.signer.sign(message).as_ref());
        signature
    }

    pub fn public(&self) -> PublicKey {
        PublicKey::from_raw(self.pair.public_key_raw()).unwrap_or(PublicKey([0; PUBLIC_KEY_LEN]))
    }

    pub fn pair(&self) -> &KeyPair {
        &self.pair
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("svkeys-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir.join("node.key")
    }

    #[test]
    fn generate_load_and_print() {
        let path = temp("roundtrip");
        let key = NodeKey::generate(&path).expect("generate");
        let mode = fs::metadata(&path).expect("key file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = NodeKey::load(&path).expect("load");
        assert_eq!(key.public(), again.public());
        let text = key.public().to_string();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<PublicKey>().expect("parse"), key.public());
        assert!(matches!(NodeKey::generate(&path), Err(KeyError::Exists(_))));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            NodeKey::load(&path),
            Err(KeyError::TooOpen { .. })
        ));
        fs::remove_dir_all(path.parent().expect("dir")).expect("cleanup");
    }

    #[test]
    fn seeded_keys_are_reproducible() {
        let a = NodeKey::from_seed(b"bench", 7).expect("seeded key");
        let b = NodeKey::from_seed(b"bench", 7).expect("seeded key");
        assert_eq!(a.public(), b.public());
        let other_index = NodeKey::from_seed(b"bench", 8).expect("seeded key");
        let other_seed = NodeKey::from_seed(b"bench2", 7).expect("seeded key");
        assert_ne!(a.public(), other_index.public());
        assert_ne!(a.public(), other_seed.public());
        // The public key is that of the derived seed (RFC 8032), not an
        // accident of the encoding: ring derives it the same way.
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        hash.update(b"bench");
        hash.update(&7u64.to_be_bytes());
        let direct = ring::signature::Ed25519KeyPair::from_seed_unchecked(hash.finish().as_ref())
            .expect("ring key");
        use ring::signature::KeyPair as _;
        assert_eq!(a.public().as_bytes(), direct.public_key().as_ref());
    }

    #[test]
    fn signatures_verify_with_the_signers_key_only() {
        let a = NodeKey::from_seed(b"sign", 1).expect("key");
        let b = NodeKey::from_seed(b"sign", 2).expect("key");
        let signature = a.sign(b"message");
        assert_eq!(signature, a.sign(b"message"), "deterministic");
        assert!(a.public().verifies(b"message", &signature));
        assert!(!a.public().verifies(b"messagE", &signature));
        assert!(!b.public().verifies(b"message", &signature));
        assert!(!a.public().verifies(b"message", &signature[..63]));
        let pem = NodeKey::from_pem(&a.to_pem(), Path::new("a")).expect("pem");
        assert_eq!(pem.sign(b"message"), signature);
    }

    #[test]
    fn bad_public_keys() {
        for bad in ["", "abc", "AAAA", &STANDARD.encode([1u8; 31])] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad:?}");
        }
    }
}
