//! A client behind a proxy (`[client] proxy`): every server of its list is
//! reached through an HTTP proxy (CONNECT, optionally with Basic auth) or a
//! SOCKS5 proxy (no auth, or username and password), which resolves the
//! server's name itself. The TCP connection is to the proxy, so the address
//! the client pins (full tunnel, the helper's underlay) is the proxy's.
//!
//! The proxy is trusted no more than the network: it only carries our TLS,
//! and its answers are bounded ([`MAX_CONNECT_RESPONSE`], the dial timeout).
//! Its password appears nowhere: [`Proxy`]'s `Display` and `Debug` leave it
//! out.

use std::fmt;
use std::io;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::ConfigError;

/// The most an HTTP proxy's answer to CONNECT may take, headers and all.
pub const MAX_CONNECT_RESPONSE: usize = 4096;

/// The environment variables `proxy = "env"` reads, in order.
const PROXY_ENV: [&str; 4] = ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"];

/// The kinds of proxy a client can go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// HTTP CONNECT.
    Http,
    /// SOCKS5 (the proxy resolves names).
    Socks5,
}

impl ProxyKind {
    fn scheme(self) -> &'static str {
        match self {
            ProxyKind::Http => "http",
            ProxyKind::Socks5 => "socks5",
        }
    }
}

/// A user name and password for the proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ user: {:?}, password: <hidden> }}",
            self.user
        )
    }
}

/// The proxy a client goes through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    pub kind: ProxyKind,
    /// HOST:PORT (an IPv6 literal in brackets).
    pub address: String,
    pub credentials: Option<Credentials>,
}

/// `socks5://user@host:port`: the user shown, never the password.
impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.kind.scheme())?;
        if let Some(credentials) = &self.credentials {
            write!(f, "{}@", credentials.user)?;
        }
        f.write_str(&self.address)
    }
}

/// Why going through the proxy failed. The messages start with "proxy".
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy {proxy}: connect failed: {source}")]
    Connect { proxy: String, source: io::Error },
    #[error("proxy refused: {status}{}", reason_text(*status, reason))]
    Refused { status: u16, reason: String },
    #[error("proxy: its answer to CONNECT is not HTTP: {0:?}")]
    Malformed(String),
    #[error("proxy: its answer to CONNECT is over {MAX_CONNECT_RESPONSE} bytes")]
    TooLong,
    #[error("proxy: {0}")]
    Io(io::Error),
    #[error("proxy (SOCKS5): {0}")]
    Socks(#[from] tokio_socks::Error),
}

/// " Proxy Authentication Required (wrong or missing proxy credentials)".
fn reason_text(status: u16, reason: &str) -> String {
    let mut text = String::new();
    if !reason.is_empty() {
        text = format!(" {reason}");
    }
    if status == 407 {
        text.push_str(" (wrong or missing proxy credentials)");
    }
    text
}

/// `proxy` as written, checked: a URL, or "env" for the first of
/// `https_proxy`, `HTTPS_PROXY`, `all_proxy`, `ALL_PROXY` that is set.
pub fn resolve(setting: Option<String>) -> Result<Option<Proxy>, ConfigError> {
    let Some(setting) = setting else {
        return Ok(None);
    };
    let (url, from) = match setting.as_str() {
        "env" => PROXY_ENV
            .iter()
            .find_map(|name| {
                let value = std::env::var(name).ok().filter(|v| !v.is_empty())?;
                Some((value, format!("proxy (from {name})")))
            })
            .ok_or_else(|| {
                ConfigError::new("proxy", "\"env\": none of https_proxy, all_proxy is set")
            })?,
        _ => (setting, "proxy".to_string()),
    };
    parse(&url)
        .map(Some)
        .map_err(|problem| ConfigError::new(from, problem.to_string()))
}

/// Why a `proxy` setting is not a proxy URL. Only the scheme and the
/// address are ever echoed: the rest may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyUrlError {
    #[error("is not a URL: give http://HOST:PORT or socks5://HOST:PORT")]
    NotAUrl,
    #[error("scheme {0:?}: only http and socks5 are supported")]
    Scheme(String),
    #[error("a bad %-escape in the user name or password")]
    BadEscape,
    #[error("the user name or password is not UTF-8")]
    NotUtf8,
    #[error("the user name must be 1 to 255 bytes, the password at most 255")]
    CredentialsLength,
    #[error("{0:?} is not HOST:PORT (the port is needed)")]
    NoPort(String),
}

/// Parses `http://[USER:PASS@]HOST:PORT` or `socks5://...` (a trailing
/// `/` is allowed; USER and PASS may be percent-encoded).
fn parse(url: &str) -> Result<Proxy, ProxyUrlError> {
    let (scheme, rest) = url.split_once("://").ok_or(ProxyUrlError::NotAUrl)?;
    let kind = match scheme.to_ascii_lowercase().as_str() {
        "http" => ProxyKind::Http,
        "socks5" | "socks5h" => ProxyKind::Socks5,
        other => return Err(ProxyUrlError::Scheme(other.to_string())),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (userinfo, address) = match rest.rsplit_once('@') {
        Some((userinfo, address)) => (Some(userinfo), address),
        None => (None, rest),
    };
    let credentials = match userinfo {
        Some(userinfo) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            let (user, password) = (decode(user)?, decode(password)?);
            if user.is_empty() || user.len() > 255 || password.len() > 255 {
                return Err(ProxyUrlError::CredentialsLength);
            }
            Some(Credentials { user, password })
        }
        None => None,
    };
    let port = address
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && !host.contains('/'))
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .filter(|port| *port != 0);
    if port.is_none() {
        return Err(ProxyUrlError::NoPort(address.to_string()));
    }
    Ok(Proxy {
        kind,
        address: address.to_string(),
        credentials,
    })
}

/// Percent-decodes a URL's user name or password.
fn decode(text: &str) -> Result<String, ProxyUrlError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(ProxyUrlError::BadEscape)?;
                out.push(hex);
                i += 3;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| ProxyUrlError::NotUtf8)
}

/// HOST:PORT split for SOCKS5 (brackets taken off an IPv6 literal).
fn host_port(target: &str) -> io::Result<(String, u16)> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{target:?} is not HOST:PORT"),
        )
    };
    let (host, port) = target.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host.to_string(), port))
}

impl Proxy {
    /// Connects to the proxy (bound the call with the dial timeout).
    pub async fn connect(&self) -> Result<TcpStream, ProxyError> {
        TcpStream::connect(&self.address)
            .await
            .map_err(|source| ProxyError::Connect {
                proxy: self.to_string(),
                source,
            })
    }

    /// Asks the proxy, on `stream`, for a tunnel to `target` (HOST:PORT, a
    /// name resolved by the proxy); the stream then carries it.
    pub async fn open(&self, stream: TcpStream, target: &str) -> Result<TcpStream, ProxyError> {
        match self.kind {
            ProxyKind::Http => self.connect_http(stream, target).await,
            ProxyKind::Socks5 => {
                let (host, port) = host_port(target).map_err(ProxyError::Io)?;
                let target = (host.as_str(), port);
                let opened = match &self.credentials {
                    None => {
                        tokio_socks::tcp::Socks5Stream::connect_with_socket(stream, target).await
                    }
                    Some(c) => {
                        tokio_socks::tcp::Socks5Stream::connect_with_password_and_socket(
                            stream,
                            target,
                            &c.user,
                            &c.password,
                        )
                        .await
                    }
                };
                Ok(opened?.into_inner())
            }
        }
    }

    /// HTTP CONNECT: the request, then the answer's headers read a byte at
    /// a time (nothing of the tunnel is read), at most
    /// [`MAX_CONNECT_RESPONSE`] bytes; a 2xx status opens the tunnel.
    async fn connect_http(
        &self,
        mut stream: TcpStream,
        target: &str,
    ) -> Result<TcpStream, ProxyError> {
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(c) = &self.credentials {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", c.user, c.password));
            request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(ProxyError::Io)?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() >= MAX_CONNECT_RESPONSE {
                return Err(ProxyError::TooLong);
            }
            match stream.read(&mut byte).await.map_err(ProxyError::Io)? {
                0 => {
                    return Err(ProxyError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed before answering CONNECT",
                    )))
                }
                _ => head.push(byte[0]),
            }
        }
        let head = String::from_utf8_lossy(&head);
        let status_line = head.lines().next().unwrap_or("");
        let mut words = status_line.splitn(3, ' ');
        let (version, status) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let status = match (version.starts_with("HTTP/1."), status.parse::<u16>()) {
            (true, Ok(status)) => status,
            _ => {
                let shown: String = status_line.chars().take(80).collect();
                return Err(ProxyError::Malformed(shown));
            }
        };
        match status {
            200..=299 => Ok(stream),
            status => Err(ProxyError::Refused {
                status,
                reason: words.next().unwrap_or("").chars().take(80).collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_never_show_the_password() {
        let proxy = parse("http://alice:s%40cret@proxy.example.org:3128/").expect("valid");
        assert_eq!(proxy.kind, ProxyKind::Http);
        assert_eq!(proxy.address, "proxy.example.org:3128");
        let credentials = proxy.credentials.clone().expect("credentials");
        assert_eq!(credentials.password, "s@cret");
        assert_eq!(proxy.to_string(), "http://alice@proxy.example.org:3128");
        assert!(!format!("{proxy:?}").contains("cret"));
        let socks = parse("socks5://[2001:2::1]:1080").expect("valid");
        assert_eq!(socks.kind, ProxyKind::Socks5);
        assert_eq!(socks.credentials, None);
        for bad in [
            "proxy:3128",
            "ftp://proxy:21",
            "http://proxy",
            "http://proxy:0",
            "http://:3128",
            "http://a:%zz@proxy:3128",
        ] {
            let e = parse(bad).expect_err(bad).to_string();
            assert!(!e.contains("%zz"), "{e}");
        }
        let e = resolve(Some("http://bob:hunter2@proxy".into())).expect_err("no port");
        assert_eq!(e.field, "proxy");
        assert!(!e.problem.contains("hunter2"), "{e}");
    }

    #[test]
    fn a_refusal_names_the_status() {
        let e = ProxyError::Refused {
            status: 407,
            reason: "Proxy Authentication Required".into(),
        };
        assert_eq!(
            e.to_string(),
            "proxy refused: 407 Proxy Authentication Required (wrong or missing proxy credentials)"
        );
    }

    #[test]
    fn socks_targets_lose_their_brackets() {
        assert_eq!(
            host_port("[2001:2::1]:2002").expect("valid"),
            ("2001:2::1".to_string(), 2002)
        );
        assert_eq!(
            host_port("vpn.example.org:443").expect("valid"),
            ("vpn.example.org".to_string(), 443)
        );
    }

    /// A CONNECT answer from a fake proxy on loopback.
    async fn answer(reply: &'static [u8]) -> Result<TcpStream, ProxyError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let _ = conn.write_all(reply).await;
        });
        let proxy = parse(&format!("http://u:p@{address}")).expect("proxy");
        let stream = proxy.connect().await?;
        proxy.open(stream, "198.18.1.1:443").await
    }

    #[tokio::test]
    async fn connect_answers_are_bounded_and_checked() {
        assert!(answer(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_ok());
        let e = answer(b"HTTP/1.1 407 Proxy Authentication Required\r\nX: y\r\n\r\n")
            .await
            .expect_err("407");
        assert!(e.to_string().starts_with("proxy refused: 407"), "{e}");
        let e = answer(b"SSH-2.0-OpenSSH\r\n\r\n")
            .await
            .expect_err("not HTTP");
        assert!(matches!(e, ProxyError::Malformed(_)), "{e}");
        static ENDLESS: [u8; 8192] = [b'a'; 8192];
        let e = answer(&ENDLESS).await.expect_err("too long");
        assert!(matches!(e, ProxyError::TooLong), "{e}");
    }
}
