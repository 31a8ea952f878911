//! The gate every new connection passes: its first byte tells TLS (0x16)
//! from the original protocol (an IP version nibble of 4 or 6); TLS clients
//! must authenticate with a listed key, original-protocol clients are let in
//! only when legacy is on for their remote address. Nothing of the tunnel is
//! reachable before this.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::IpNet;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{Legacy, PeerSection, ServerConfig};
use crate::connection::{Reader, Writer};
use crate::keys::{NodeKey, PublicKey};
use crate::session::Protocol;
use crate::tls::{self, TlsError};

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
    /// Whether it speaks our extension (negotiated inside TLS): it is sent
    /// session parameters after its grant.
    pub extension: bool,
}

/// Why a connection did not pass.
#[derive(Debug)]
pub enum Rejection {
    /// Closed before sending a byte.
    Closed,
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
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Closed => f.write_str("closed before sending anything"),
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
        }
    }
}

/// The server's gate: its TLS acceptor, listed peers and legacy policy.
pub struct Gate {
    tls: Option<TlsAcceptor>,
    peers: HashMap<PublicKey, PeerSection>,
    legacy: Legacy,
}

impl Gate {
    /// The gate for `config`; `key` is the server's key, loaded from
    /// `config.key`.
    pub fn new(config: &ServerConfig, key: Option<&NodeKey>) -> Result<Gate, TlsError> {
        let peers: HashMap<PublicKey, PeerSection> =
            config.peers.iter().map(|p| (p.key, p.clone())).collect();
        let tls = match key {
            Some(key) => Some(TlsAcceptor::from(tls::server_config(
                key,
                peers.keys().copied().collect(),
            )?)),
            None => None,
        };
        Ok(Gate {
            tls,
            peers,
            legacy: config.legacy.clone(),
        })
    }

    /// Tells the protocol from the first byte and lets the connection in,
    /// or says why not. Bound it with the handshake timeout.
    pub async fn admit(
        &self,
        stream: TcpStream,
        remote: SocketAddr,
    ) -> Result<Admitted, Rejection> {
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(0) => return Err(Rejection::Closed),
            Ok(_) => {}
            Err(e) => return Err(Rejection::Io(e)),
        }
        match first[0] {
            TLS_HANDSHAKE => self.admit_tls(stream).await,
            byte if matches!(byte >> 4, 4 | 6) => {
                if self.legacy == Legacy::Off {
                    return Err(Rejection::LegacyOff);
                }
                if !self.legacy.allows(remote.ip()) {
                    return Err(Rejection::LegacyNotAllowed);
                }
                let (reader, writer) = stream.into_split();
                Ok(Admitted {
                    reader: Box::new(reader),
                    writer: Box::new(writer),
                    identity: Identity::Original,
                    routes: Vec::new(),
                    extension: false,
                })
            }
            byte => Err(Rejection::Unknown(byte)),
        }
    }

    async fn admit_tls(&self, stream: TcpStream) -> Result<Admitted, Rejection> {
        let acceptor = self.tls.as_ref().ok_or(Rejection::NoTls)?;
        let stream = acceptor
            .accept(stream)
            .await
            .map_err(|e| Rejection::Handshake(e.to_string()))?;
        let key = tls::peer_key(stream.get_ref().1)
            .ok_or_else(|| Rejection::Handshake("no client key".into()))?;
        let peer = self.peers.get(&key);
        let identity = Identity::Tls {
            key,
            name: peer.and_then(|p| p.name.clone()),
            fixed: peer.and_then(|p| p.address),
        };
        let extension = tls::speaks_extension(stream.get_ref().1);
        let routes = peer.map(|p| p.routes.clone()).unwrap_or_default();
        let (reader, writer) = tokio::io::split(stream);
        Ok(Admitted {
            reader: Box::new(reader),
            writer: Box::new(writer),
            identity,
            routes,
            extension,
        })
    }
}
