//! How a client reaches its server: TCP, then TLS with the server's key
//! pinned when the client has keys, else the original plaintext protocol.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::gate::Identity;
use super::proxy::{Proxy, ProxyError};
use crate::config::{ClientConfig, ServerOrder};
use crate::connection::{Reader, Writer};
use crate::keys::{NodeKey, PublicKey};
use crate::tls::{self, TlsError};

/// Why connecting to the server failed. The messages name the step.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// Connected, but the socket had no peer address right after.
    #[error("connection lost at once: {0}")]
    LostAtOnce(io::Error),
    /// The proxy refused, failed, or gave a bad answer.
    #[error("{0}")]
    Proxy(#[from] ProxyError),
    #[error("proxy: no tunnel to the server within the connect timeout")]
    ProxyTimeout,
    #[error("TLS handshake timed out")]
    TlsHandshakeTimeout,
    /// Includes a server key that is not the pinned one.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(io::Error),
}

/// A connection to the server, ready for the protocol.
pub struct Dialed {
    pub reader: Reader,
    pub writer: Writer,
    pub remote: SocketAddr,
    /// Whether the server speaks our extension (negotiated inside TLS): it
    /// may send session parameters.
    pub extension: bool,
}

/// Connects to the configured server: with several listed, to the one
/// whose turn it is ([`Dialer::next_server`] after a failure).
pub struct Dialer {
    servers: Vec<String>,
    /// The index in `servers` dialed next.
    current: usize,
    tls: Option<(TlsConnector, PublicKey)>,
    /// The server name the ClientHello gives.
    sni: rustls::pki_types::ServerName<'static>,
    /// Every server is reached through it, if set.
    proxy: Option<Proxy>,
    timeout: Duration,
}

impl Dialer {
    /// A dialer for `config`; `key` is the client's key, loaded from its key
    /// file when `config.tls` is set.
    pub fn new(
        config: &ClientConfig,
        key: Option<&NodeKey>,
        timeout: Duration,
    ) -> Result<Dialer, TlsError> {
        let tls = match (&config.tls, key) {
            (Some((_, server_keys)), Some(key)) => Some((
                TlsConnector::from(tls::client_config_pinned(key, &server_keys.0)?),
                server_keys.0[0],
            )),
            _ => None,
        };
        let current = match config.server_order {
            ServerOrder::First => 0,
            ServerOrder::Random => fastrand::usize(..config.servers.len().max(1)),
        };
        Ok(Dialer {
            servers: config.servers.clone(),
            current,
            tls,
            sni: tls::server_name_or(config.sni.as_deref()),
            proxy: config.proxy.clone(),
            timeout,
        })
    }

    /// Who the server is to this client, for the control plane.
    pub fn identity(&self) -> Identity {
        match &self.tls {
            Some((_, key)) => Identity::Tls {
                key: *key,
                name: None,
                fixed: None,
            },
            None => Identity::Original,
        }
    }

    /// The server dialed next, HOST:PORT.
    pub fn server(&self) -> &str {
        self.servers.get(self.current).map_or("", String::as_str)
    }

    /// The session with the current server failed or ended: the next one
    /// listed (after the last, the first) is dialed next.
    pub fn next_server(&mut self) {
        if !self.servers.is_empty() {
            self.current = (self.current + 1) % self.servers.len();
        }
    }

    /// The address a direct dial tries first (the server's name resolved,
    /// within the timeout); none through a proxy or if it does not resolve.
    pub async fn first_address(&self) -> Option<IpAddr> {
        if self.proxy.is_some() {
            return None;
        }
        let resolved = timeout(self.timeout, tokio::net::lookup_host(self.server())).await;
        resolved.ok()?.ok()?.next().map(|address| address.ip())
    }

    /// Connects (and, with TLS, authenticates both ways) within the timeout.
    pub async fn dial(&self) -> Result<Dialed, DialError> {
        let stream = match &self.proxy {
            None => timeout(self.timeout, TcpStream::connect(self.server()))
                .await
                .map_err(|_| DialError::ConnectTimeout)?
                .map_err(DialError::Connect)?,
            // The TCP connection is the proxy's: its address is the one
            // pinned (full tunnel, the helper's underlay).
            Some(proxy) => timeout(self.timeout, async {
                let stream = proxy.connect().await?;
                proxy.open(stream, self.server()).await
            })
            .await
            .map_err(|_| DialError::ProxyTimeout)??,
        };
        crate::connection::tune_tcp(&stream);
        let remote = stream.peer_addr().map_err(DialError::LostAtOnce)?;
        let Some((connector, _)) = &self.tls else {
            let (reader, writer) = stream.into_split();
            return Ok(Dialed {
                extension: false,
                reader: Box::new(reader),
                writer: Box::new(writer),
                remote,
            });
        };
        let stream = timeout(self.timeout, connector.connect(self.sni.clone(), stream))
            .await
            .map_err(|_| DialError::TlsHandshakeTimeout)?
            .map_err(DialError::TlsHandshake)?;
        let extension = tls::speaks_extension(stream.get_ref().1);
        let (reader, writer) = tokio::io::split(stream);
        Ok(Dialed {
            extension,
            reader: Box::new(reader),
            writer: Box::new(writer),
            remote,
        })
    }
}
