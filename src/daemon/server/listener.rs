//! Accepting clients: the listening socket, and one connection from accept
//! through the gate (TLS or the original protocol) and the ban check to its
//! session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument, Span};

use crate::daemon::admission::{Pending, RefusalReason};
use crate::daemon::events::EventKind;
use crate::daemon::gate::{Identity, Rejection};
use crate::daemon::peers::Banned;
use crate::daemon::portshare;
use crate::workers::WorkerPool;

use super::connection::connection;
use super::invites::join;
use super::Shared;

/// Connections the kernel may queue before they are accepted: bursts of
/// clients reconnecting at once (after a server restart, say) must not
/// overflow the default of 128 and wait a second for their SYN retry.
const LISTEN_BACKLOG: u32 = 4096;

/// The listening socket, with SO_REUSEADDR (a restart rebinds at once) and a
/// deep backlog. On `[::]` it serves both families (IPV6_V6ONLY off,
/// whatever net.ipv6.bindv6only says): IPv4 clients arrive as
/// IPv4-mapped addresses, which `run` turns back into IPv4 ones.
pub(super) fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(v6) => {
            let socket = TcpSocket::new_v6()?;
            if v6.ip().is_unspecified() {
                nix::sys::socket::setsockopt(
                    &socket,
                    nix::sys::socket::sockopt::Ipv6V6Only,
                    &false,
                )
                .map_err(std::io::Error::from)?;
            }
            socket
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// One client connection, from accept to close: through the gate, then a
/// session. `pending` counts it as unauthenticated until it is granted an
/// address.
pub(super) async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    remote: SocketAddr,
    pending: Pending,
    shutdown: CancellationToken,
) {
    let start = Instant::now();
    let handshake_deadline = start + shared.config.handshake_timeout;
    let first_bytes_deadline = start + shared.config.first_bytes_timeout;
    crate::connection::tune_tcp(&stream);
    let admitted = tokio::select! {
        _ = shutdown.cancelled() => return,
        // Boxed, as the etcd calls below: the handshake's future (TLS) is
        // large and lives only until the grant.
        admitted = timeout_at(
            handshake_deadline,
            Box::pin(shared.gate.admit(stream, remote, first_bytes_deadline)),
        ) => admitted,
    };
    let admitted = match admitted {
        Ok(Ok(admitted)) => admitted,
        Ok(Err(Rejection::Closed)) => {
            debug!("closed before sending anything");
            return;
        }
        Ok(Err(Rejection::Join(joining))) => {
            // Still counted as unauthenticated (`pending`) until it is done.
            tokio::select! {
                _ = shutdown.cancelled() => {}
                () = Box::pin(join(&shared, joining, remote)) => {}
            }
            drop(pending);
            return;
        }
        Ok(Err(Rejection::Share(foreign))) => {
            if let Some(share) = &shared.config.port_share {
                portshare::serve(share, foreign, remote, pending, &shared.metrics, &shutdown).await;
            }
            return;
        }
        Ok(Err(rejection)) => {
            shared.refuse(remote, rejection.reason(), &rejection.to_string());
            return;
        }
        Err(_) => {
            let reason = "no handshake within the handshake timeout";
            shared.refuse(remote, RefusalReason::HandshakeTimeout, reason);
            return;
        }
    };
    let identity = admitted.identity.clone();
    if let Some(name) = identity.name() {
        Span::current().record("name", name);
    }
    let banned = Banned::of(&identity, remote.ip());
    if let Some(remaining) = shared.peers.ban_remaining(&banned, SystemTime::now()) {
        let reason = format!("banned for {}s more", remaining.as_secs() + 1);
        shared.refuse(remote, RefusalReason::Banned, &reason);
        return;
    }
    if let Some(key) = identity.key() {
        let backoff = shared
            .peers
            .takeover_backoff(&key, std::time::Instant::now());
        if let Some(remaining) = backoff {
            let reason = format!(
                "its key took over its own session too often (is it used on two hosts at once?): \
                 refused for {}s more",
                remaining.as_secs() + 1
            );
            warn!(%key, %reason, "refused");
            shared
                .events
                .publish(EventKind::Refused, remote, None, reason);
            return;
        }
    }
    // An original-protocol session holds its source's slot for its whole
    // life: one host cannot take the whole pool.
    let _legacy = match identity {
        Identity::Original => match shared.admission.legacy(remote.ip()) {
            Ok(slot) => Some(slot),
            Err(kind) => {
                shared.refuse(remote, kind, kind.limit_text());
                return;
            }
        },
        Identity::Tls { .. } => None,
    };
    match identity.key() {
        Some(key) => info!(protocol = %identity.protocol(), %key, "connected"),
        None => info!(protocol = %identity.protocol(), "connected"),
    }
    shared.events.publish(
        EventKind::Connected,
        remote,
        None,
        identity.protocol().as_str(),
    );
    connection(
        shared,
        admitted,
        remote,
        pending,
        handshake_deadline,
        shutdown,
    )
    .await;
}

/// Hands an admitted connection to its task: on its worker's runtime if
/// there is more than one worker, else on this one.
#[allow(clippy::too_many_arguments)]
pub(super) fn hand_off(
    pool: Option<&WorkerPool>,
    tasks: &TaskTracker,
    shared: &Arc<Shared>,
    stream: TcpStream,
    remote: SocketAddr,
    pending: Pending,
    span: Span,
    shutdown: &CancellationToken,
) {
    match pool {
        // The connection moves to its worker: registered with
        // that runtime, it is read and written there alone.
        Some(pool) => {
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(e) => {
                    span.in_scope(|| warn!(error = %e, "dropped an accepted connection"));
                    return;
                }
            };
            let (shared, shutdown) = (shared.clone(), shutdown.clone());
            let serve = async move {
                match TcpStream::from_std(stream) {
                    Ok(stream) => serve(shared, stream, remote, pending, shutdown).await,
                    Err(e) => warn!(error = %e, "dropped an accepted connection"),
                }
            };
            pool.handle(pool.next())
                .spawn(tasks.track_future(serve.instrument(span)));
        }
        None => {
            let serve = serve(shared.clone(), stream, remote, pending, shutdown.clone());
            tasks.spawn(serve.instrument(span));
        }
    }
}
