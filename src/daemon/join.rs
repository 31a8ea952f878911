//! `simplevpnd join TOKEN`: the joining host's side of an invitation, and
//! the reading of one join message both sides share. The messages and the
//! token are in [`crate::join`].

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::client_config_text;
use crate::join::{JoinAccepted, JoinError, JoinMessage, JoinRequest, Token, MAX_JOIN_MESSAGE};
use crate::keys::NodeKey;
use crate::limits::JOIN_REQUEST_TIMEOUT;
use crate::tls;

/// How long the joining host waits for the TCP connection.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a join message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("closed before a whole join message")]
    Closed,
    #[error("{0}")]
    Malformed(#[from] JoinError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads one join message: at most its length prefix and
/// [`MAX_JOIN_MESSAGE`] bytes, never more.
pub async fn read_message<R: AsyncRead + Unpin>(reader: &mut R) -> Result<JoinMessage, ReadError> {
    let mut buf = Vec::with_capacity(2 + MAX_JOIN_MESSAGE);
    let mut chunk = [0u8; 2 + MAX_JOIN_MESSAGE];
    loop {
        if let Some((message, _)) = JoinMessage::decode(&buf)? {
            return Ok(message);
        }
        // Read only up to the end of this message (or its length prefix).
        let want = match buf.len() {
            n if n < 2 => 2 - n,
            n => 2 + u16::from_be_bytes([buf[0], buf[1]]) as usize - n,
        };
        let n = reader.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What `simplevpnd join` was asked to do.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub token: String,
    /// Where the client config goes.
    pub config_out: PathBuf,
    /// This host's private key: read, or made if missing.
    pub key: PathBuf,
    /// Overwrite an existing config file.
    pub force: bool,
}

/// Why a join failed: a usage error (a bad token, a file in the way;
/// nothing was dialed) or a failure after that.
#[derive(Debug, thiserror::Error)]
pub enum JoinFailure {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

/// What a successful join did.
#[derive(Debug)]
pub struct Joined {
    pub accepted: JoinAccepted,
    pub key: NodeKey,
    pub made_key: bool,
}

/// Joins with `options.token`: checks the token and the files first, makes
/// the key if missing, dials, redeems the invitation, writes the config.
pub async fn join(options: &JoinOptions) -> Result<Joined, JoinFailure> {
    let token =
        Token::decode(&options.token).map_err(|e| JoinFailure::Usage(format!("token: {e}")))?;
    if !options.force && options.config_out.exists() {
        return Err(JoinFailure::Usage(format!(
            "{} exists: pass --force to overwrite it, or --config-out FILE",
            options.config_out.display()
        )));
    }
    let (key, made_key) = match options.key.exists() {
        true => (load_key(&options.key)?, false),
        false => {
            if let Some(dir) = options.key.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| JoinFailure::Failed(format!("{}: {e}", dir.display())))?;
            }
            let key =
                NodeKey::generate(&options.key).map_err(|e| JoinFailure::Failed(e.to_string()))?;
            (key, true)
        }
    };
    let accepted = redeem(&token, &key).await?;
    let text = client_config_text(
        &format!(
            "simplevpn client \"{}\", joined with an invitation (simplevpnd join).\n\
             Its private key stays on this host, in {}.",
            accepted.name,
            options.key.display()
        ),
        &token.endpoint,
        &token
            .server_keys
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>(),
        &format!("key = \"{}\"", options.key.display()),
        accepted.address,
    );
    write_config(&options.config_out, &text)
        .map_err(|e| JoinFailure::Failed(format!("{}: {e}", options.config_out.display())))?;
    Ok(Joined {
        accepted,
        key,
        made_key,
    })
}

fn load_key(path: &Path) -> Result<NodeKey, JoinFailure> {
    NodeKey::load(path).map_err(|e| JoinFailure::Failed(e.to_string()))
}

/// Dials the token's endpoint, pinning its keys, and redeems it.
async fn redeem(token: &Token, key: &NodeKey) -> Result<JoinAccepted, JoinFailure> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        JoinFailure::Failed(format!("{what} {}: {e}", token.endpoint))
    };
    let tcp = match timeout(DIAL_TIMEOUT, TcpStream::connect(&token.endpoint)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(failed("cannot reach", &e)),
        Err(_) => return Err(failed("cannot reach", &"no answer within 10 s")),
    };
    let config = tls::join_client_config(key, token.server_keys.clone())
        .map_err(|e| JoinFailure::Failed(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let exchange = async {
        let mut stream = connector
            .connect(tls::server_name(), tcp)
            .await
            .map_err(|e| failed("TLS with", &e))?;
        let request = JoinMessage::Request(JoinRequest {
            secret: token.secret.clone(),
            name: token.name.clone(),
        });
        let bytes = request
            .encode()
            .map_err(|e| JoinFailure::Failed(e.to_string()))?;
        stream
            .write_all(&bytes)
            .await
            .map_err(|e| failed("sending to", &e))?;
        stream.flush().await.map_err(|e| failed("sending to", &e))?;
        read_message(&mut stream)
            .await
            .map_err(|e| failed("no answer from", &e))
    };
    let answer = timeout(2 * JOIN_REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| failed("no answer from", &"timed out"))??;
    match answer {
        JoinMessage::Accepted(accepted) => Ok(accepted),
        JoinMessage::Refused(reason) => Err(JoinFailure::Failed(format!("refused: {reason}"))),
        JoinMessage::Request(_) => Err(failed("no answer from", &"a request instead")),
    }
}

/// Writes the client config, mode 0644 (it holds no secret), replacing
/// what is there (the caller checked --force).
fn write_config(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::{JoinRefusal, Secret, SECRET_LEN};

    #[tokio::test]
    async fn one_message_is_read_in_any_split_and_no_further() {
        let request = JoinMessage::Request(JoinRequest {
            secret: Secret([3; SECRET_LEN]),
            name: "laptop".into(),
        });
        let mut bytes = request.encode().expect("encode");
        let refused = JoinMessage::Refused(JoinRefusal::Used)
            .encode()
            .expect("encode");
        bytes.extend_from_slice(&refused);
        for split in 1..bytes.len() {
            let (a, b) = tokio::io::duplex(4096);
            let (mut writer, mut reader) = (a, b);
            let chunks = bytes.clone();
            let write = tokio::spawn(async move {
                for chunk in chunks.chunks(split) {
                    writer.write_all(chunk).await.expect("write");
                    tokio::task::yield_now().await;
                }
                writer
            });
            assert_eq!(read_message(&mut reader).await.expect("first"), request);
            assert_eq!(
                read_message(&mut reader).await.expect("second"),
                JoinMessage::Refused(JoinRefusal::Used)
            );
            drop(write.await.expect("writer"));
        }
        // Too long a length: refused at once.
        let mut long: &[u8] = &[0x10, 0x00, 1, 2, 3];
        assert!(matches!(
            read_message(&mut long).await,
            Err(ReadError::Malformed(JoinError::TooLong(4096)))
        ));
        let mut short: &[u8] = &[0, 5, 1];
        assert!(matches!(
            read_message(&mut short).await,
            Err(ReadError::Closed)
        ));
    }
}
