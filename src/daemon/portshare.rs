//! Port sharing (`[server] port_share = "HOST:PORT"`): a connection that is
//! not one of ours goes on to a backend (the website on the same port),
//! byte for byte, with what the gate already read replayed first. A probe
//! then sees the website, not a VPN.
//!
//! Not ours: a TLS ClientHello that does not offer our ALPN
//! ([`tls::ALPN_EXTENSION`]), anything that is neither TLS nor the original
//! protocol (an HTTP request), and original-protocol bytes the server would
//! not take (legacy off, a remote outside `legacy_allow`, no address
//! request). To tell, the gate reads the whole ClientHello into a buffer
//! ([`read_client_hello`], at most [`MAX_CLIENT_HELLO`] bytes within the
//! first-bytes timeout) and either hands the buffer and the stream to TLS
//! ([`Replay`]) or to [`splice`].
//!
//! The splice is bounded like any unauthenticated connection: it holds its
//! admission place until the backend has answered (its first byte), at
//! most [`BACKEND_ANSWER_TIMEOUT`] from the start; then it is idle-timed
//! out after [`SPLICE_IDLE_TIMEOUT`] without a byte either way.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::admission::Pending;
#[cfg(feature = "server")]
use super::metrics::Metrics;
use crate::config::ConfigError;
use crate::tls;

/// The most of a ClientHello read before deciding: a record's largest
/// payload (16 KiB) and its header, and a little more for a hello split
/// over records. A bigger one is not ours (ours are well under 1 KiB).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024 + 5 + 1024;
/// From the splice's start until the backend has connected and sent its
/// first byte; the admission place is held until then.
pub const BACKEND_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// A splice with no byte either way for this long is closed.
pub const SPLICE_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Where connections that are not ours go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortShare {
    /// The backend, HOST:PORT (resolved at each connection).
    pub backend: String,
    /// Prepend a PROXY protocol v2 header naming the client.
    pub proxy_header: bool,
}

/// `port_share` and `port_share_proxy`, checked: the backend is HOST:PORT
/// (a name is resolved at each connection).
pub fn resolve(
    backend: Option<String>,
    proxy_header: Option<bool>,
) -> Result<Option<PortShare>, ConfigError> {
    let Some(backend) = backend else {
        return match proxy_header {
            Some(true) => Err(ConfigError::new(
                "port_share_proxy",
                "needs port_share (the backend to send the header to)",
            )),
            _ => Ok(None),
        };
    };
    let port = backend.rsplit_once(':').and_then(|(host, port)| {
        let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
        (!host.is_empty()).then_some(port)
    });
    match port {
        Some(_) => Ok(Some(PortShare {
            backend,
            proxy_header: proxy_header.unwrap_or(false),
        })),
        None => Err(ConfigError::new(
            "port_share",
            format!("{backend:?} is not HOST:PORT (e.g. \"127.0.0.1:8443\")"),
        )),
    }
}

/// A connection the gate found is not ours, with what it read of it.
#[derive(Debug)]
pub struct Foreign {
    pub stream: TcpStream,
    /// The bytes already read, sent to the backend first.
    pub read: Vec<u8>,
    /// Why it is not ours (for the log).
    pub why: &'static str,
}

/// A ClientHello read whole (or what came instead of one).
#[derive(Debug)]
pub enum Hello {
    /// It offers our ALPN: the bytes read, for the TLS handshake.
    Ours(Vec<u8>),
    /// Not ours (another ALPN or none, too big, not TLS after all, closed
    /// half-way): the bytes read.
    Foreign(Vec<u8>, &'static str),
    /// Closed before sending a byte.
    Closed,
    /// Not whole by the deadline.
    Timeout,
}

/// Reads a TLS ClientHello into a buffer, at most [`MAX_CLIENT_HELLO`]
/// bytes by `deadline`, and tells whether it offers our ALPN.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    deadline: Instant,
) -> io::Result<Hello> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut read = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let room = (MAX_CLIENT_HELLO - read.len()).min(chunk.len());
        if room == 0 {
            return Ok(Hello::Foreign(read, "a ClientHello too big to be ours"));
        }
        let n = match timeout_at(deadline, stream.read(&mut chunk[..room])).await {
            Err(_) => return Ok(Hello::Timeout),
            Ok(n) => n?,
        };
        if n == 0 {
            return Ok(match read.is_empty() {
                true => Hello::Closed,
                false => Hello::Foreign(read, "closed before its ClientHello was whole"),
            });
        }
        read.extend_from_slice(&chunk[..n]);
        let mut fresh = &chunk[..n];
        while !fresh.is_empty() {
            match acceptor.read_tls(&mut fresh) {
                Ok(0) | Err(_) => return Ok(Hello::Foreign(read, "not a TLS ClientHello")),
                Ok(_) => {}
            }
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                let ours = accepted.client_hello().alpn().is_some_and(|mut offered| {
                    offered.any(|p| p == tls::ALPN_EXTENSION || p == crate::join::ALPN_JOIN)
                });
                return Ok(match ours {
                    true => Hello::Ours(read),
                    false => Hello::Foreign(read, "a ClientHello without our ALPN"),
                });
            }
            Err(_) => return Ok(Hello::Foreign(read, "not a TLS ClientHello")),
        }
    }
}

/// Writes go straight to the wrapped stream, `inner`.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<S: AsyncWrite + Unpin> AsyncWrite for $wrapper<S> {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

/// A stream whose first bytes, already read from it, are read again.
#[derive(Debug)]
pub struct Replay<S> {
    prefix: Vec<u8>,
    position: usize,
    inner: S,
}

impl<S> Replay<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Replay<S> {
        Replay {
            prefix,
            position: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.position < this.prefix.len() {
            let rest = &this.prefix[this.position..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.position += n;
            if this.position == this.prefix.len() {
                this.prefix = Vec::new();
                this.position = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

write_through!(Replay);

/// Why a splice ended before it carried anything.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("backend {backend}: no answer within {seconds}s", seconds = BACKEND_ANSWER_TIMEOUT.as_secs())]
    BackendTimeout { backend: String },
    #[error("backend {backend}: {source}")]
    Backend { backend: String, source: io::Error },
    #[error("PROXY header: {0}")]
    ProxyHeader(io::Error),
    /// After the backend answered: either side reset, say. Not a failure
    /// of the backend.
    #[error("splice: {0}")]
    Carried(io::Error),
}

#[cfg(feature = "server")]
/// The PROXY protocol v2 header that names `remote` as the client and
/// `local` as where it connected to (both as the IPv4 address an
/// IPv4-mapped one is).
fn proxy_header(remote: SocketAddr, local: SocketAddr) -> io::Result<Vec<u8>> {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (canonical(remote), canonical(local)),
    )
    .build()
}

#[cfg(feature = "server")]
/// Carries `foreign` to the backend: connects, sends the PROXY header (if
/// asked) and the bytes already read, and waits for the backend's first
/// byte, all within [`BACKEND_ANSWER_TIMEOUT`] and holding `pending` (its
/// admission place); then copies both ways until either side closes or
/// [`SPLICE_IDLE_TIMEOUT`] passes without a byte. Returns the bytes carried
/// (to the backend, from it).
pub async fn splice(
    share: &PortShare,
    foreign: Foreign,
    remote: SocketAddr,
    pending: Pending,
) -> Result<(u64, u64), SpliceError> {
    let Foreign {
        stream: client,
        read,
        why,
    } = foreign;
    debug!(why, backend = %share.backend, "not ours: to the port-share backend");
    let local = client.local_addr().ok();
    let deadline = Instant::now() + BACKEND_ANSWER_TIMEOUT;
    let timed_out = || SpliceError::BackendTimeout {
        backend: share.backend.clone(),
    };
    let failed = |source| SpliceError::Backend {
        backend: share.backend.clone(),
        source,
    };
    let mut backend = timeout_at(deadline, TcpStream::connect(&share.backend))
        .await
        .map_err(|_| timed_out())?
        .map_err(failed)?;
    let mut head = Vec::new();
    if share.proxy_header {
        let local = local.unwrap_or(remote);
        head = proxy_header(remote, local).map_err(SpliceError::ProxyHeader)?;
    }
    head.extend_from_slice(&read);
    timeout_at(deadline, backend.write_all(&head))
        .await
        .map_err(|_| timed_out())?
        .map_err(failed)?;
    let activity = Arc::new(Activity::new());
    let mut client = Active::new(client, activity.clone());
    // Until the backend answers, the client's further bytes go on (a
    // request may come in pieces), but the place is held and the deadline
    // stands.
    let answered = async {
        let (mut from_backend, mut to_backend) = backend.split();
        let (mut first, mut buf) = ([0u8; 1], [0u8; 4096]);
        let mut client_done = false;
        loop {
            let n = tokio::select! {
                peeked = from_backend.peek(&mut first) => return peeked.map(|_| ()),
                n = client.read(&mut buf), if !client_done => n?,
            };
            match n {
                // The client has said all it will: the backend hears so.
                0 => {
                    client_done = true;
                    to_backend.shutdown().await?;
                }
                n => to_backend.write_all(&buf[..n]).await?,
            }
        }
    };
    timeout_at(deadline, answered)
        .await
        .map_err(|_| timed_out())?
        .map_err(failed)?;
    let mut backend = Active::new(backend, activity.clone());
    drop(pending);
    debug!(why, backend = %share.backend, "port shared");
    let copied = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut backend) => copied.map_err(SpliceError::Carried),
        () = activity.idle(SPLICE_IDLE_TIMEOUT) => {
            debug!("port-share splice idle: closed");
            Ok((client.count, backend.count))
        }
    }?;
    Ok((copied.0 + read.len() as u64, copied.1))
}

#[cfg(feature = "server")]
/// [`splice`], counted in `metrics` and logged; cut short by `shutdown`.
pub async fn serve(
    share: &PortShare,
    foreign: Foreign,
    remote: SocketAddr,
    pending: Pending,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    metrics.port_share.inc();
    let spliced = tokio::select! {
        _ = shutdown.cancelled() => return,
        spliced = splice(share, foreign, remote, pending) => spliced,
    };
    match spliced {
        Ok((up, down)) => debug!(up, down, "port-share splice ended"),
        Err(e @ SpliceError::Carried(_)) => debug!(error = %e, "port-share splice ended"),
        Err(e) => {
            metrics.port_share_failures.inc();
            // A backend that is down, and a flood of probes: one line per
            // interval, the rest at debug level.
            match warning_due(std::time::Instant::now()) {
                true => {
                    warn!(error = %e, "port share failed (further failures within {}s at debug level)", WARNING_INTERVAL.as_secs())
                }
                false => debug!(error = %e, "port share failed"),
            }
        }
    }
}

/// How often a port-share failure is logged as a warning.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Whether a failure at `now` is logged as a warning: the first one, and
/// then the first after each [`WARNING_INTERVAL`].
fn warning_due(now: std::time::Instant) -> bool {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    match *last {
        Some(at) if now.duration_since(at) < WARNING_INTERVAL => false,
        _ => {
            *last = Some(now);
            true
        }
    }
}

/// When a splice last carried a byte, in milliseconds since its start.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    /// Resolves once nothing was carried for `limit`.
    async fn idle(&self, limit: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            if last + limit <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(last + limit).await;
        }
    }
}

/// A stream that marks its [`Activity`] at every byte read and counts them.
struct Active<S> {
    inner: S,
    activity: Arc<Activity>,
    count: u64,
}

impl<S> Active<S> {
    fn new(inner: S, activity: Arc<Activity>) -> Active<S> {
        Active {
            inner,
            activity,
            count: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Active<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.activity.touch();
            self.count += n as u64;
        }
        polled
    }
}

write_through!(Active);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_replay_reads_its_prefix_then_the_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.expect("write");
        drop(a);
        let mut replay = Replay::new(b"hello".to_vec(), b);
        let mut all = String::new();
        replay.read_to_string(&mut all).await.expect("read");
        assert_eq!(all, "hello world");
    }

    /// A ClientHello as `alpn` makes it (rustls, no network).
    fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = "www.example.org".try_into().expect("name");
        let mut connection =
            rustls::ClientConnection::new(Arc::new(config), name).expect("connection");
        let mut hello = Vec::new();
        connection.write_tls(&mut hello).expect("hello");
        hello
    }

    async fn classify(bytes: &[u8]) -> Hello {
        let deadline = Instant::now() + Duration::from_secs(5);
        read_client_hello(&mut &bytes[..], deadline)
            .await
            .expect("read")
    }

    #[tokio::test]
    async fn only_a_hello_offering_our_alpn_is_ours() {
        let ours = client_hello(&[b"h2", tls::ALPN_EXTENSION]);
        assert!(matches!(classify(&ours).await, Hello::Ours(read) if read == ours));
        let web = client_hello(&[b"h2", b"http/1.1"]);
        assert!(matches!(classify(&web).await, Hello::Foreign(read, _) if read == web));
        let none = client_hello(&[]);
        assert!(matches!(classify(&none).await, Hello::Foreign(..)));
        // Cut short, then closed: what was read goes on.
        assert!(matches!(classify(&ours[..20]).await, Hello::Foreign(read, _) if read.len() == 20));
        assert!(matches!(classify(b"").await, Hello::Closed));
        // A record header, then garbage.
        let junk = [0x16, 3, 1, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8];
        assert!(matches!(classify(&junk).await, Hello::Foreign(..)));
    }

    #[test]
    fn failures_are_warned_once_per_interval() {
        let now = std::time::Instant::now();
        assert!(warning_due(now));
        assert!(!warning_due(now + Duration::from_secs(1)));
        assert!(warning_due(now + WARNING_INTERVAL));
    }

    #[test]
    fn the_backend_is_host_and_port() {
        let share = resolve(Some("127.0.0.1:8443".into()), Some(true)).expect("valid");
        assert_eq!(
            share,
            Some(PortShare {
                backend: "127.0.0.1:8443".into(),
                proxy_header: true
            })
        );
        assert!(resolve(Some("[::1]:443".into()), None).is_ok());
        for bad in ["web", "web:0", ":443", "web:https"] {
            let e = resolve(Some(bad.into()), None).expect_err(bad);
            assert_eq!(e.field, "port_share");
        }
        let e = resolve(None, Some(true)).expect_err("proxy without backend");
        assert_eq!(e.field, "port_share_proxy");
        assert_eq!(resolve(None, None), Ok(None));
    }

    #[cfg(feature = "server")]
    #[test]
    fn the_proxy_header_names_the_client_as_ipv4() {
        let remote: SocketAddr = "198.18.1.2:40000".parse().expect("remote");
        let local: SocketAddr = "[::ffff:198.18.1.1]:443".parse().expect("local");
        let header = proxy_header(remote, local).expect("header");
        // Signature, v2 PROXY, TCP over IPv4, 12 bytes of addresses.
        assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(header[12], 0x21);
        assert_eq!(header[13], 0x11);
        assert_eq!(&header[14..16], &[0, 12]);
        assert_eq!(&header[16..20], &[198, 18, 1, 2]);
        assert_eq!(&header[20..24], &[198, 18, 1, 1]);
        assert_eq!(&header[24..26], &40000u16.to_be_bytes());
        assert_eq!(&header[26..28], &443u16.to_be_bytes());
    }
}
