//! TLS 1.3 with mutual authentication by pinned public keys, no CA: each side
//! presents a self-signed certificate for its node key, and each side checks
//! the other's key (the certificate's real SubjectPublicKeyInfo) against its
//! configuration. The handshake signature proves possession of that key.
//!
//! ALPN tells our own peers apart from other TLS clients: our client offers
//! [`ALPN_EXTENSION`] ("simplevpn/2"), our server selects it when offered,
//! and only then do both sides speak the extension frames of
//! [`crate::wire`] and [`crate::params`] ([`speaks_extension`]). A client
//! that offers no ALPN at all (the original protocol's) is served without
//! extensions.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::keys::{NodeKey, PublicKey};

/// The name both sides put in, and ignore in, certificates and SNI.
pub const SERVER_NAME: &str = "simplevpn";

/// The ALPN protocol of our own peers, which speak the extension frames
/// (session parameters) on top of the original protocol. A later version
/// must keep offering it beside any newer name: a server refuses a client
/// whose ALPN offer contains none of the protocols it knows (RFC 7301).
pub const ALPN_EXTENSION: &[u8] = b"simplevpn/2";

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before
/// the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate for the node key: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(#[from] Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The handshake-signature checks both verifiers make: TLS 1.3 and Ed25519
/// only, the signature made by the key in the peer's certificate.
#[derive(Debug)]
struct Signatures {
    algorithms: WebPkiSupportedAlgorithms,
}

impl Signatures {
    fn new() -> Signatures {
        Signatures {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    fn tls12(&self) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("TLS 1.2 is not accepted".into()))
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn schemes() -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The public key a peer's certificate carries, if it is an Ed25519 key.
pub fn certificate_key(cert: &CertificateDer<'_>) -> Result<PublicKey, Error> {
    let parsed = ParsedCertificate::try_from(cert)?;
    let spki = parsed.subject_public_key_info();
    spki.strip_prefix(&ED25519_SPKI_PREFIX[..])
        .and_then(PublicKey::from_raw)
        .ok_or_else(|| Error::General("the peer's certificate key is not Ed25519".into()))
}

/// The key the peer of an established connection authenticated with.
pub fn peer_key(connection: &rustls::CommonState) -> Option<PublicKey> {
    connection
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| certificate_key(cert).ok())
}

/// Whether the connection negotiated [`ALPN_EXTENSION`]: the peer is one of
/// ours and both sides may use extension frames (build the decoder with
/// [`crate::wire::Decoder::with_extensions`]). False for a client that
/// offered no ALPN, and before the handshake is complete.
pub fn speaks_extension(connection: &rustls::CommonState) -> bool {
    connection.alpn_protocol() == Some(ALPN_EXTENSION)
}

/// A self-signed certificate for `key`, and the key in rustls's form.
fn identity(
    key: &NodeKey,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    let cert = params.self_signed(key.pair())?;
    let private = PrivatePkcs8KeyDer::from(key.pair().serialize_der());
    Ok((vec![cert.der().clone()], PrivateKeyDer::Pkcs8(private)))
}

/// The client keys a server accepts, shared between its TLS config and
/// whoever changes them at run time (peers added, removed, reloaded): a
/// handshake checks the set as it is at that moment; established sessions
/// are not affected by a change.
#[derive(Debug, Clone, Default)]
pub struct AllowedKeys(Arc<RwLock<HashSet<PublicKey>>>);

impl AllowedKeys {
    pub fn new(keys: HashSet<PublicKey>) -> AllowedKeys {
        AllowedKeys(Arc::new(RwLock::new(keys)))
    }

    /// Whether `key` may connect now.
    pub fn contains(&self, key: &PublicKey) -> bool {
        // A set is replaced whole: a poisoned lock still holds a whole set.
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }

    /// Replaces the set; later handshakes see the new one.
    pub fn replace(&self, keys: HashSet<PublicKey>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = keys;
    }
}

impl From<HashSet<PublicKey>> for AllowedKeys {
    fn from(keys: HashSet<PublicKey>) -> AllowedKeys {
        AllowedKeys::new(keys)
    }
}

/// The server's TLS config: TLS 1.3 only, client certificates required and
/// accepted only for the keys in `allowed` (at handshake time); selects [`ALPN_EXTENSION`] when
/// the client offers it, and accepts clients that offer no ALPN.
pub fn server_config(
    key: &NodeKey,
    allowed: AllowedKeys,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    pinned_server(key, Some(allowed), ALPN_EXTENSION)
}

/// The TLS config of a joining connection on the server's side
/// ([`crate::join::ALPN_JOIN`]): TLS 1.3 only, any well-formed Ed25519
/// client certificate (the joiner proves its key; the invitation's secret,
/// checked after the handshake, proves it may join). Used only for a
/// ClientHello that offers that ALPN, and it selects only that one.
pub fn join_server_config(key: &NodeKey) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    pinned_server(key, None, crate::join::ALPN_JOIN)
}

fn pinned_server(
    key: &NodeKey,
    allowed: Option<AllowedKeys>,
    alpn: &[u8],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, private) = identity(key)?;
    let verifier = Arc::new(PinnedClients {
        allowed,
        signatures: Signatures::new(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, private)?;
    // One long connection per client: resumption tickets would be unused.
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// A client's TLS config: TLS 1.3 only, the server's key pinned to `server`;
/// offers [`ALPN_EXTENSION`].
pub fn client_config(
    key: &NodeKey,
    server: PublicKey,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    pinned_client(key, vec![server], ALPN_EXTENSION)
}

/// A client's TLS config that accepts a server whose key is any of
/// `servers` (the servers of a cluster, each with its own key).
pub fn client_config_pinned(
    key: &NodeKey,
    servers: &[PublicKey],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    pinned_client(key, servers.to_vec(), ALPN_EXTENSION)
}

/// A joining client's TLS config (`simplevpnd join`): as
/// [`client_config`], the server's key one of `servers` (the token's),
/// offering [`crate::join::ALPN_JOIN`] only.
pub fn join_client_config(
    key: &NodeKey,
    servers: Vec<PublicKey>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    pinned_client(key, servers, crate::join::ALPN_JOIN)
}

fn pinned_client(
    key: &NodeKey,
    servers: Vec<PublicKey>,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let (certs, private) = identity(key)?;
    let verifier = Arc::new(PinnedServer {
        keys: servers,
        signatures: Signatures::new(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs, private)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// The name a client sends (nothing checks it: the key is the identity).
pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(rustls::pki_types::DnsName::try_from(SERVER_NAME).expect("valid DNS name"))
}

/// The name a client sends: `sni` (checked by [`check_sni`]) or the
/// built-in one.
pub fn server_name_or(sni: Option<&str>) -> ServerName<'static> {
    sni.and_then(|name| rustls::pki_types::DnsName::try_from(name.to_string()).ok())
        .map_or_else(server_name, ServerName::DnsName)
}

/// `[client] sni`: a DNS name (an IP address is never sent as SNI).
pub fn check_sni(sni: Option<String>) -> Result<Option<String>, crate::config::ConfigError> {
    match sni {
        Some(name) if rustls::pki_types::DnsName::try_from(name.as_str()).is_err() => Err(
            crate::config::ConfigError::new("sni", format!("{name:?} is not a DNS name")),
        ),
        sni => Ok(sni),
    }
}

/// Accepts client certificates whose key is listed; with no list, any
/// Ed25519 key (a joining host's).
#[derive(Debug)]
struct PinnedClients {
    allowed: Option<AllowedKeys>,
    signatures: Signatures,
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let key = certificate_key(end_entity)?;
        match self.allowed.as_ref().is_none_or(|a| a.contains(&key)) {
            true => Ok(ClientCertVerified::assertion()),
            false => Err(Error::General(format!("unknown client key {key}"))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.signatures.tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Signatures::schemes()
    }
}

/// Accepts only a server certificate whose key is one of the pinned ones.
#[derive(Debug)]
struct PinnedServer {
    keys: Vec<PublicKey>,
    signatures: Signatures,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let key = certificate_key(end_entity)?;
        match self.keys.contains(&key) {
            true => Ok(ServerCertVerified::assertion()),
            false => Err(Error::General(format!(
                "the server's key {key} is not the pinned server_key {}",
                self.keys
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.signatures.tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Signatures::schemes()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn sni_is_a_dns_name_or_the_built_in_one() {
        assert_eq!(check_sni(None), Ok(None));
        let site = Some("www.example.org".to_string());
        assert_eq!(check_sni(site.clone()), Ok(site));
        for bad in ["198.18.1.1", "not a name", ""] {
            let e = check_sni(Some(bad.into())).expect_err(bad);
            assert_eq!(e.field, "sni");
        }
        assert_eq!(server_name_or(None), server_name());
        assert_eq!(
            server_name_or(Some("www.example.org")).to_str(),
            "www.example.org"
        );
    }

    use super::*;
    use std::io;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn key(name: &str) -> NodeKey {
        let dir = std::env::temp_dir().join(format!("svtls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let key = NodeKey::generate(&dir.join("k")).expect("key");
        std::fs::remove_dir_all(&dir).expect("cleanup");
        key
    }

    /// Runs a handshake over an in-memory pipe; returns what each side saw.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (io::Result<Option<PublicKey>>, io::Result<()>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(client);
        let server_side = tokio::spawn(async move {
            let mut stream = acceptor.accept(a).await?;
            let key = peer_key(stream.get_ref().1);
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await?;
            stream.write_all(b"ok").await?;
            stream.flush().await?;
            Ok(key)
        });
        let client_side = async move {
            let mut stream = connector.connect(server_name(), b).await?;
            stream.write_all(b"hello").await?;
            stream.flush().await?;
            let mut reply = [0u8; 2];
            stream.read_exact(&mut reply).await?;
            Ok(())
        }
        .await;
        (server_side.await.expect("server side"), client_side)
    }

    /// Runs a handshake over an in-memory pipe; returns whether each side
    /// (server, client) then speaks the extension, or the first error.
    async fn negotiated(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> io::Result<(bool, bool)> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(client);
        let server_side = tokio::spawn(async move {
            let mut stream = acceptor.accept(a).await?;
            let speaks = speaks_extension(stream.get_ref().1);
            // Wait for the client's byte: its certificate has been checked.
            let mut buf = [0u8; 1];
            stream.read_exact(&mut buf).await?;
            Ok::<_, io::Error>(speaks)
        });
        let client_side = async move {
            let mut stream = connector.connect(server_name(), b).await?;
            let speaks = speaks_extension(stream.get_ref().1);
            stream.write_all(b"x").await?;
            stream.flush().await?;
            Ok::<_, io::Error>(speaks)
        }
        .await;
        Ok((server_side.await.expect("server side")?, client_side?))
    }

    #[tokio::test]
    async fn alpn_marks_our_own_peers() {
        let (server, client) = (key("as"), key("ac"));
        let allowed: HashSet<_> = [client.public()].into();
        let server_config = server_config(&server, allowed.into()).expect("server config");
        let ours = client_config(&client, server.public()).expect("client config");
        assert_eq!(ours.alpn_protocols, vec![b"simplevpn/2".to_vec()]);

        // Both sides ours: negotiated on both.
        let both = negotiated(server_config.clone(), ours.clone()).await;
        assert_eq!(both.expect("both ours"), (true, true));

        // A client that offers no ALPN (the original protocol's): the
        // handshake succeeds, without the extension.
        let mut plain = (*ours).clone();
        plain.alpn_protocols.clear();
        let without = negotiated(server_config.clone(), Arc::new(plain)).await;
        assert_eq!(without.expect("no ALPN"), (false, false));

        // A client offering only protocols we do not know is refused
        // (RFC 7301); hence ALPN_EXTENSION must stay in later offers.
        let mut foreign = (*ours).clone();
        foreign.alpn_protocols = vec![b"simplevpn/3".to_vec()];
        let refused = negotiated(server_config.clone(), Arc::new(foreign)).await;
        assert!(refused.is_err(), "{refused:?}");
        let mut newer = (*ours).clone();
        newer.alpn_protocols = vec![b"simplevpn/3".to_vec(), ALPN_EXTENSION.to_vec()];
        let fallback = negotiated(server_config, Arc::new(newer)).await;
        assert_eq!(fallback.expect("a newer offer"), (true, true));
    }

    #[tokio::test]
    async fn a_joining_client_is_let_in_by_any_key_only_on_the_join_alpn() {
        let (server, stranger) = (key("js"), key("jx"));
        let join = join_server_config(&server).expect("join config");
        let joiner = join_client_config(&stranger, vec![server.public()]).expect("config");
        let (server_saw, client_saw) = handshake(join.clone(), joiner.clone()).await;
        assert_eq!(server_saw.expect("joiner let in"), Some(stranger.public()));
        client_saw.expect("join server accepted");
        // The normal config still refuses the stranger, even offering the
        // join ALPN.
        let normal = server_config(&server, AllowedKeys::default()).expect("config");
        let (refused, _) = handshake(normal, joiner).await;
        assert!(refused.is_err(), "{refused:?}");
        // A joiner pinning another key refuses the server.
        let wrong = join_client_config(&stranger, vec![stranger.public()]).expect("config");
        let (_, client_saw) = handshake(join, wrong).await;
        assert!(client_saw.is_err());
    }

    #[tokio::test]
    async fn keys_allowed_later_are_let_in_by_the_same_config() {
        let (server, client) = (key("ls"), key("lc"));
        let allowed = AllowedKeys::default();
        let config = server_config(&server, allowed.clone()).expect("server config");
        let ours = client_config(&client, server.public()).expect("client config");
        let (refused, _) = handshake(config.clone(), ours.clone()).await;
        assert!(refused.is_err(), "{refused:?}");
        allowed.replace([client.public()].into());
        let (let_in, _) = handshake(config.clone(), ours.clone()).await;
        assert_eq!(let_in.expect("allowed now"), Some(client.public()));
        allowed.replace(HashSet::new());
        let (refused, _) = handshake(config, ours).await;
        assert!(refused.is_err(), "{refused:?}");
    }

    #[tokio::test]
    async fn pinned_keys_authenticate_both_ways() {
        let (server, client, stranger) = (key("s"), key("c"), key("x"));
        let allowed: HashSet<_> = [client.public()].into();
        let server_config = server_config(&server, allowed.into()).expect("server config");

        let good = client_config(&client, server.public()).expect("client config");
        let (server_saw, client_saw) = handshake(server_config.clone(), good).await;
        assert_eq!(server_saw.expect("pinned client"), Some(client.public()));
        client_saw.expect("pinned server");

        // An unlisted client key: the server refuses, naming the key.
        let unlisted = client_config(&stranger, server.public()).expect("config");
        let (server_saw, _) = handshake(server_config.clone(), unlisted).await;
        let err = server_saw.expect_err("unlisted key refused").to_string();
        assert!(err.contains(&stranger.public().to_string()), "{err}");

        // A client pinning another server key refuses the server.
        let wrong_pin = client_config(&client, stranger.public()).expect("config");
        let (_, client_saw) = handshake(server_config, wrong_pin).await;
        let err = client_saw
            .expect_err("wrong server key refused")
            .to_string();
        assert!(err.contains("not the pinned server_key"), "{err}");
    }
}
