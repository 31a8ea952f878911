//! The gate every new connection passes: its first byte tells TLS (0x16)
//! from the original protocol (an IP version nibble of 4 or 6); TLS clients
//! must authenticate with a listed key, original-protocol clients are let in
//! only when legacy is on for their remote address. Nothing of the tunnel is
//! reachable before this.
//!
//! The first bytes have a short deadline of their own (`first_bytes_timeout`):
//! a TLS client's whole ClientHello, or an original-protocol client's whole
//! 20-byte address request, must arrive within it; only the rest of a TLS
//! handshake has the longer handshake timeout. A TLS client that offers
//! the join ALPN ([`crate::join::ALPN_JOIN`]) is let through the handshake
//! with any Ed25519 key and handed on as a [`Joining`] connection, which
//! may only redeem an invitation ([`super::server`]). An original-protocol
//! connection whose first 20 bytes are not an address request (an HTTP
//! request, random bytes) is refused at once.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::LazyConfigAcceptor;

use super::admission::RefusalReason;
use super::portshare::{self, Foreign, Hello, Replay};
use crate::config::{ClientToClient, Legacy, PeerSection, ServerConfig};
use crate::connection::{Reader, Writer};
use crate::keys::{NodeKey, PublicKey};
use crate::session::Protocol;
use crate::tls::{self, AllowedKeys, TlsError};
use crate::wire::{Control, Decoder, Frame, Marker, CONTROL_LEN};

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Who is on the other end of an admitted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An original-protocol client: known by its remote address only.
    Original,
    /// A TLS client that proved it holds `key`.
    Tls {
        key: PublicKey,
        name: Option<String>,
        /// The address it always gets.
        fixed: Option<Ipv4Addr>,
    },
}

impl Identity {
    pub fn protocol(&self) -> Protocol {
        match self {
            Identity::Original => Protocol::Original,
            Identity::Tls { .. } => Protocol::Tls,
        }
    }

    pub fn key(&self) -> Option<PublicKey> {
        match self {
            Identity::Original => None,
            Identity::Tls { key, .. } => Some(*key),
        }
    }

    pub fn name(&self) -> Option<&str> {
        match self {
            Identity::Original => None,
            Identity::Tls { name, .. } => name.as_deref(),
        }
    }

    pub fn fixed(&self) -> Option<Ipv4Addr> {
        match self {
            Identity::Original => None,
            Identity::Tls { fixed, .. } => *fixed,
        }
    }
}

/// A connection that passed the gate.
pub struct Admitted {
    pub reader: Reader,
    pub writer: Writer,
    pub identity: Identity,
    /// The networks behind this client (its `[[server.peer]]` routes).
    pub routes: Vec<IpNet>,
    /// Its own `client_to_client`, if its `[[server.peer]]` sets one.
    pub client_to_client: Option<ClientToClient>,
    /// Whether it speaks our extension (negotiated inside TLS, or offered
    /// by a plaintext client's [`Marker`]): it is sent session parameters
    /// after its grant.
    pub extension: bool,
}

/// What a joining connection's stream is (TLS over TCP, or over what was
/// replayed of it).
pub trait JoinIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> JoinIo for T {}

/// A TLS connection on the join ALPN: its key proved, nothing else; it may
/// send one join request.
pub struct Joining {
    pub stream: Box<dyn JoinIo>,
    pub key: PublicKey,
}

impl fmt::Debug for Joining {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Joining({})", self.key)
    }
}

/// Why a connection did not pass.
#[derive(Debug)]
pub enum Rejection {
    /// Closed before sending a byte.
    Closed,
    /// No ClientHello, or no whole address request, within the first-bytes
    /// timeout.
    FirstBytesTimeout,
    /// Its first 20 bytes start like IP but are no address request.
    NotAnAddressRequest,
    /// Its first byte is neither TLS nor an IP packet.
    Unknown(u8),
    /// An original-protocol client, and legacy is off.
    LegacyOff,
    /// An original-protocol client from a remote outside `legacy_allow`.
    LegacyNotAllowed,
    /// A TLS client, and this server has no key.
    NoTls,
    /// The TLS handshake failed (an unknown key, say).
    Handshake(String),
    Io(std::io::Error),
    /// Not ours, and the port is shared: for the backend
    /// ([`super::portshare`]).
    Share(Foreign),
    /// Not a tunnel client: a host joining with an invitation, for the
    /// server to serve its one request.
    Join(Joining),
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Closed => f.write_str("closed before sending anything"),
            Rejection::FirstBytesTimeout => {
                f.write_str("no ClientHello or address request within the first-bytes timeout")
            }
            Rejection::NotAnAddressRequest => {
                f.write_str("protocol error: the first 20 bytes are not an address request")
            }
            Rejection::Unknown(byte) => write!(
                f,
                "protocol error: first byte {byte:#04x} is neither TLS (0x16) nor an IP packet"
            ),
            Rejection::LegacyOff => f.write_str(
                "original-protocol client refused: legacy is off (set legacy = true in \
                 [server], or --legacy, to serve unauthenticated clients)",
            ),
            Rejection::LegacyNotAllowed => {
                f.write_str("original-protocol client refused: its address is not in legacy_allow")
            }
            Rejection::NoTls => f.write_str(
                "TLS client refused: this server has no key (set key = PATH in [server])",
            ),
            Rejection::Handshake(why) => write!(f, "TLS handshake failed: {why}"),
            Rejection::Io(e) => write!(f, "{e}"),
            Rejection::Share(foreign) => write!(f, "not ours ({}): port shared", foreign.why),
            Rejection::Join(joining) => write!(f, "a host joining with key {}", joining.key),
        }
    }
}

impl Rejection {
    /// The counter of the refusal summary this rejection goes to.
    pub fn reason(&self) -> RefusalReason {
        match self {
            Rejection::Closed | Rejection::Io(_) => RefusalReason::Io,
            Rejection::FirstBytesTimeout => RefusalReason::FirstBytesTimeout,
            Rejection::NotAnAddressRequest => RefusalReason::NotAnAddressRequest,
            Rejection::Unknown(_) => RefusalReason::UnknownProtocol,
            Rejection::LegacyOff => RefusalReason::LegacyOff,
            Rejection::LegacyNotAllowed => RefusalReason::LegacyNotAllowed,
            Rejection::NoTls => RefusalReason::NoTls,
            Rejection::Handshake(_) => RefusalReason::Handshake,
            // Not refused (the server hands it on); if it is counted as a
            // refusal after all, it is one of an unknown protocol.
            Rejection::Share(_) => RefusalReason::UnknownProtocol,
            // Not refused either (served a join request).
            Rejection::Join(_) => RefusalReason::JoinRefused,
        }
    }
}

/// Where an allowed key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerSource {
    /// `[[server.peer]]` in the config file, or `--peer`.
    Config,
    /// `svpnctl peer add`, kept in the state store.
    Live,
}

impl PeerSource {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerSource::Config => "config",
            PeerSource::Live => "live",
        }
    }
}

/// A TLS client that may join, and where that was said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedPeer {
    pub section: PeerSection,
    pub source: PeerSource,
}

/// Every allowed peer: those of the config first, then those added live
/// (a key listed in both is the config's).
pub fn merge_peers(config: &[PeerSection], live: &[PeerSection]) -> Vec<AllowedPeer> {
    let allowed = |source| {
        move |section: &PeerSection| AllowedPeer {
            section: section.clone(),
            source,
        }
    };
    config
        .iter()
        .map(allowed(PeerSource::Config))
        .chain(
            live.iter()
                .filter(|l| !config.iter().any(|c| c.key == l.key))
                .map(allowed(PeerSource::Live)),
        )
        .collect()
}

/// The server's gate: its TLS acceptor, allowed peers and legacy policy.
/// The peers change at run time; each handshake sees them as they are.
pub struct Gate {
    tls: Option<Arc<rustls::ServerConfig>>,
    /// For a ClientHello that offers the join ALPN.
    join_tls: Option<Arc<rustls::ServerConfig>>,
    allowed: AllowedKeys,
    peers: RwLock<Arc<Vec<AllowedPeer>>>,
    legacy: Legacy,
    /// Whether a connection that is not ours goes to a port-share backend
    /// instead of being refused.
    share: bool,
}

impl Gate {
    /// The gate for `config` and the `live` peers (from the state store);
    /// `key` is the server's key, loaded from `config.key`.
    pub fn new(
        config: &ServerConfig,
        key: Option<&NodeKey>,
        live: &[PeerSection],
    ) -> Result<Gate, TlsError> {
        let allowed = AllowedKeys::default();
        let (tls, join_tls) = match key {
            Some(key) => (
                Some(tls::server_config(key, allowed.clone())?),
                Some(tls::join_server_config(key)?),
            ),
            None => (None, None),
        };
        let gate = Gate {
            tls,
            join_tls,
            allowed,
            peers: RwLock::new(Arc::new(Vec::new())),
            legacy: config.legacy.clone(),
            share: config.port_share.is_some(),
        };
        gate.set_peers(merge_peers(&config.peers, live));
        Ok(gate)
    }

    /// Every allowed peer, config first.
    pub fn peers(&self) -> Arc<Vec<AllowedPeer>> {
        self.peers.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the allowed peers: later handshakes see the new set;
    /// connections already admitted are not touched.
    pub fn set_peers(&self, peers: Vec<AllowedPeer>) {
        let keys = peers.iter().map(|p| p.section.key).collect();
        let mut current = self.peers.write().unwrap_or_else(|e| e.into_inner());
        *current = Arc::new(peers);
        self.allowed.replace(keys);
    }

    /// The allowed peer with `key`.
    pub fn peer(&self, key: &PublicKey) -> Option<AllowedPeer> {
        self.peers().iter().find(|p| p.section.key == *key).cloned()
    }

    /// Tells the protocol from the first byte and lets the connection in,
    /// or says why not. The ClientHello or the address request must be in
    /// by `first_bytes`; bound the whole call with the handshake timeout.
    pub async fn admit(
        &self,
        mut stream: TcpStream,
        remote: SocketAddr,
        first_bytes: Instant,
    ) -> Result<Admitted, Rejection> {
        let mut first = [0u8; 1];
        match timeout_at(first_bytes, stream.peek(&mut first)).await {
            Err(_) => return Err(Rejection::FirstBytesTimeout),
            Ok(Ok(0)) => return Err(Rejection::Closed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Rejection::Io(e)),
        }
        // With the port shared, what is not ours goes to the backend with
        // what was read of it; otherwise it is refused.
        let share = |stream, read: &[u8], why, rejection| match self.share {
            true => Rejection::Share(Foreign {
                stream,
                read: read.to_vec(),
                why,
            }),
            false => rejection,
        };
        match first[0] {
            TLS_HANDSHAKE if self.share => {
                let hello = portshare::read_client_hello(&mut stream, first_bytes).await;
                match hello.map_err(Rejection::Io)? {
                    Hello::Ours(read) if self.tls.is_some() => {
                        self.admit_tls(Replay::new(read, stream), first_bytes).await
                    }
                    Hello::Ours(read) => {
                        Err(share(stream, &read, "TLS, and no key", Rejection::NoTls))
                    }
                    Hello::Foreign(read, why) => Err(share(stream, &read, why, Rejection::NoTls)),
                    Hello::Closed => Err(Rejection::Closed),
                    Hello::Timeout => Err(Rejection::FirstBytesTimeout),
                }
            }
            TLS_HANDSHAKE => self.admit_tls(stream, first_bytes).await,
            byte if matches!(byte >> 4, 4 | 6) => {
                if self.legacy == Legacy::Off {
                    return Err(share(stream, &[], "legacy off", Rejection::LegacyOff));
                }
                if !self.legacy.allows(remote.ip()) {
                    let why = "outside legacy_allow";
                    return Err(share(stream, &[], why, Rejection::LegacyNotAllowed));
                }
                let mut request = [0u8; CONTROL_LEN];
                let mut filled = 0;
                while filled < CONTROL_LEN {
                    match timeout_at(first_bytes, stream.read(&mut request[filled..])).await {
                        // Some bytes, then silence: an HTTP request shorter
                        // than an address request, say.
                        Err(_) if filled > 0 && self.share => {
                            let why = "no address request";
                            return Err(share(
                                stream,
                                &request[..filled],
                                why,
                                Rejection::FirstBytesTimeout,
                            ));
                        }
                        Err(_) => return Err(Rejection::FirstBytesTimeout),
                        Ok(Ok(0)) => {
                            let why = "closed before an address request";
                            return Err(share(
                                stream,
                                &request[..filled],
                                why,
                                Rejection::NotAnAddressRequest,
                            ));
                        }
                        Ok(Ok(n)) => filled += n,
                        Ok(Err(e)) => return Err(Rejection::Io(e)),
                    }
                }
                let Some(control) = address_request(&request) else {
                    if self.share {
                        let why = "no address request";
                        return Err(share(stream, &request, why, Rejection::NotAnAddressRequest));
                    }
                    // Nothing more is read: close at once, without waiting
                    // for the peer to send its rest.
                    let _ = stream.shutdown().await;
                    return Err(Rejection::NotAnAddressRequest);
                };
                let (reader, writer) = stream.into_split();
                // The request read here is the session's first frame.
                let reader = std::io::Cursor::new(request).chain(reader);
                Ok(Admitted {
                    reader: Box::new(reader),
                    writer: Box::new(writer),
                    identity: Identity::Original,
                    routes: Vec::new(),
                    client_to_client: None,
                    // Our plaintext client offers it in its request's
                    // ignored bytes; the original never does.
                    extension: control.marker == Some(Marker::Offer),
                })
            }
            byte => Err(share(
                stream,
                &[],
                "neither TLS nor the original protocol",
                Rejection::Unknown(byte),
            )),
        }
    }

    async fn admit_tls<S>(&self, stream: S, first_bytes: Instant) -> Result<Admitted, Rejection>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let config = self.tls.as_ref().ok_or(Rejection::NoTls)?;
        let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let start = match timeout_at(first_bytes, hello).await {
            Err(_) => return Err(Rejection::FirstBytesTimeout),
            Ok(Err(e)) => return Err(Rejection::Handshake(e.to_string())),
            Ok(Ok(start)) => start,
        };
        let joining = start
            .client_hello()
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == crate::join::ALPN_JOIN));
        let config = match (joining, &self.join_tls) {
            (true, Some(join)) => join,
            _ => config,
        };
        let stream = start
            .into_stream(config.clone())
            .await
            .map_err(|e| Rejection::Handshake(e.to_string()))?;
        let key = tls::peer_key(stream.get_ref().1)
            .ok_or_else(|| Rejection::Handshake("no client key".into()))?;
        if joining {
            return Err(Rejection::Join(Joining {
                stream: Box::new(stream),
                key,
            }));
        }
        // Removed between the handshake and now: refused like an unknown key.
        let peer = self
            .peer(&key)
            .map(|p| p.section)
            .ok_or_else(|| Rejection::Handshake(format!("unknown client key {key}")))?;
        let peer = Some(&peer);
        let identity = Identity::Tls {
            key,
            name: peer.and_then(|p| p.name.clone()),
            fixed: peer.and_then(|p| p.address),
        };
        let extension = tls::speaks_extension(stream.get_ref().1);
        let routes = peer.map(|p| p.routes.clone()).unwrap_or_default();
        let client_to_client = peer.and_then(|p| p.client_to_client);
        let (reader, writer) = tokio::io::split(stream);
        Ok(Admitted {
            reader: Box::new(reader),
            writer: Box::new(writer),
            identity,
            routes,
            client_to_client,
            extension,
        })
    }
}

/// Whether `bytes`, the first 20 an original-protocol client sent, are an
/// address request: a control message (an IPv4 header with total length 0)
/// whose addresses read as a request. Returns it.
fn address_request(bytes: &[u8; CONTROL_LEN]) -> Option<Control> {
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    match Decoder::new(CONTROL_LEN).decode(&mut buf) {
        Ok(Some(Frame::Control(control))) => control.as_request().is_ok().then_some(control),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Request;
    use std::net::Ipv4Addr;

    #[test]
    fn only_an_address_request_passes_as_the_original_protocol() {
        let dynamic = Control::request(Request::Dynamic).encode();
        let fixed = Control::request(Request::Static(Ipv4Addr::new(198, 19, 0, 7))).encode();
        assert!(address_request(&dynamic).is_some());
        assert!(address_request(&fixed).is_some());
        let http: [u8; CONTROL_LEN] = *b"GET / HTTP/1.1\r\nHost";
        assert!(address_request(&http).is_none());
        // A real IPv4 header (total length 20) is a packet, not a request.
        let mut packet = dynamic;
        packet[3] = 20;
        assert!(address_request(&packet).is_none());
        // A control message from a server (a grant) is no request.
        let grant = Control::grant(Ipv4Addr::new(198, 19, 0, 7), None).encode();
        assert!(address_request(&grant).is_none());
        let ipv6 = [0x60; CONTROL_LEN];
        assert!(address_request(&ipv6).is_none());
        // Our plaintext client's offer passes, and is seen.
        let offer = Control::request(Request::Dynamic).with_marker(Marker::Offer);
        assert_eq!(address_request(&offer.encode()), Some(offer));
        assert_eq!(address_request(&dynamic).and_then(|c| c.marker), None);
    }
}
