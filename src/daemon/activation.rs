//! Socket activation: the server's listening socket(s) handed over by
//! systemd (`simplevpnd.socket`, or `systemd-socket-activate`) through
//! `LISTEN_FDS` / `LISTEN_PID` / `LISTEN_FDNAMES`, instead of binding
//! `listen` itself. A port below 1024 (443, say) then needs no capability:
//! the daemon still drops every one as it does otherwise and only inherits
//! the bound socket.
//!
//! The inherited fds start at 3 and are not close-on-exec; the helper is
//! spawned with its own socket dup'ed onto fd 3 and every fd above made
//! close-on-exec in the child only, so the helper never holds the listener
//! while the daemon keeps it. [`sd_notify::listen_fds`] makes them
//! close-on-exec here as well.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use nix::sys::socket::{getsockopt, sockopt, SockType};
use tokio::net::{TcpListener, TcpStream};

/// Why an inherited socket cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket activation: {0}")]
    Environment(std::io::Error),
    #[error("socket activation: fd {fd} ({name}) is not a listening TCP socket")]
    NotListening { fd: RawFd, name: String },
    #[error("socket activation: fd {fd} ({name}): {source}")]
    Socket {
        fd: RawFd,
        name: String,
        source: std::io::Error,
    },
}

/// One listening socket and where it came from.
struct Entry {
    listener: TcpListener,
    /// The inherited fd number, if it was inherited.
    fd: Option<RawFd>,
    local: Option<SocketAddr>,
}

impl Entry {
    fn address(&self) -> String {
        self.local
            .map_or("unknown address".to_string(), |a| a.to_string())
    }
}

/// The sockets the server accepts on: the one it bound to `listen`, or every
/// one it inherited.
pub struct Listeners {
    entries: Vec<Entry>,
}

/// The inherited sockets are taken once: a second call (the cluster's link
/// listener, a test) must not wrap the same fds again.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The inherited listening sockets, if this process was socket-activated
/// (`LISTEN_PID` names it); `None` otherwise, and on every call after the
/// first.
pub fn inherited() -> Result<Option<Listeners>, ActivationError> {
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    let fds = sd_notify::listen_fds_with_names().map_err(ActivationError::Environment)?;
    let mut entries = Vec::new();
    for (fd, name) in fds {
        // SAFETY: the service manager passed these fds to this process for
        // it to own (LISTEN_PID is this process), and TAKEN makes sure
        // they are wrapped only once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let listening = getsockopt(&owned, sockopt::SockType) == Ok(SockType::Stream)
            && getsockopt(&owned, sockopt::AcceptConn) == Ok(true);
        if !listening {
            return Err(ActivationError::NotListening { fd, name });
        }
        let socket_error = |source| ActivationError::Socket {
            fd,
            name: name.clone(),
            source,
        };
        let std = std::net::TcpListener::from(owned);
        std.set_nonblocking(true).map_err(socket_error)?;
        let listener = TcpListener::from_std(std).map_err(socket_error)?;
        entries.push(Entry {
            local: listener.local_addr().ok(),
            listener,
            fd: Some(fd),
        });
    }
    Ok((!entries.is_empty()).then_some(Listeners { entries }))
}

impl Listeners {
    /// The socket the server bound itself.
    pub fn bound(listener: TcpListener) -> Listeners {
        Listeners {
            entries: vec![Entry {
                local: listener.local_addr().ok(),
                listener,
                fd: None,
            }],
        }
    }

    /// The addresses accepted on, for status lines: "[::]:443".
    pub fn addresses(&self) -> String {
        let addresses: Vec<String> = self.entries.iter().map(Entry::address).collect();
        addresses.join(", ")
    }

    /// The next connection on any of the sockets. Cancel-safe, as
    /// [`TcpListener::accept`].
    pub async fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        std::future::poll_fn(|cx| {
            for entry in &self.entries {
                if let Poll::Ready(accepted) = entry.listener.poll_accept(cx) {
                    return Poll::Ready(accepted);
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// For the "server ready" line: the address, or `socket-activated fd 3
/// (0.0.0.0:443)` for each inherited socket (`listen` is then ignored).
impl fmt::Display for Listeners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, entry) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let local = entry.address();
            match entry.fd {
                Some(fd) => write!(f, "socket-activated fd {fd} ({local})")?,
                None => f.write_str(&local)?,
            }
        }
        if self.entries.iter().any(|e| e.fd.is_some()) {
            f.write_str("; listen ignored")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bound_listener_is_shown_by_its_address_and_accepts() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let listeners = Listeners::bound(listener);
        assert_eq!(listeners.to_string(), address.to_string());
        let connect = tokio::spawn(async move { TcpStream::connect(address).await });
        let (_, remote) = listeners.accept().await.expect("accept");
        assert!(remote.ip().is_loopback());
        connect.await.expect("join").expect("connect");
    }

    #[test]
    fn without_the_environment_nothing_is_inherited() {
        // The test runner is not socket-activated: LISTEN_PID is not ours.
        assert!(inherited().expect("no error").is_none());
        assert!(inherited().expect("no error").is_none());
    }
}
