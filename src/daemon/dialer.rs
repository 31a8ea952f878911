//! How a client reaches its server: TCP, then TLS with the server's key
//! pinned when the client has keys, else the original plaintext protocol.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::gate::Identity;
use crate::config::ClientConfig;
use crate::connection::{Reader, Writer};
use crate::keys::{NodeKey, PublicKey};
use crate::tls::{self, TlsError};

/// A connection to the server, ready for the protocol.
pub struct Dialed {
    pub reader: Reader,
    pub writer: Writer,
    pub remote: SocketAddr,
}

/// Connects to the configured server.
pub struct Dialer {
    server: String,
    tls: Option<(TlsConnector, PublicKey)>,
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
            (Some((_, server_key)), Some(key)) => Some((
                TlsConnector::from(tls::client_config(key, *server_key)?),
                *server_key,
            )),
            _ => None,
        };
        Ok(Dialer {
            server: config.server.clone(),
            tls,
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

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects (and, with TLS, authenticates both ways) within the timeout.
    pub async fn dial(&self) -> Result<Dialed, String> {
        let stream = match timeout(self.timeout, TcpStream::connect(self.server.as_str())).await {
            Err(_) => return Err("connect timed out".into()),
            Ok(Err(e)) => return Err(format!("connect failed: {e}")),
            Ok(Ok(stream)) => stream,
        };
        crate::connection::tune_tcp(&stream);
        let remote = stream
            .peer_addr()
            .map_err(|e| format!("connection lost at once: {e}"))?;
        let Some((connector, _)) = &self.tls else {
            let (reader, writer) = stream.into_split();
            return Ok(Dialed {
                reader: Box::new(reader),
                writer: Box::new(writer),
                remote,
            });
        };
        let stream =
            match timeout(self.timeout, connector.connect(tls::server_name(), stream)).await {
                Err(_) => return Err("TLS handshake timed out".into()),
                Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
                Ok(Ok(stream)) => stream,
            };
        let (reader, writer) = tokio::io::split(stream);
        Ok(Dialed {
            reader: Box::new(reader),
            writer: Box::new(writer),
            remote,
        })
    }
}
