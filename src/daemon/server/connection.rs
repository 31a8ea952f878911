//! One admitted client's session: read its frames, hand them to the
//! [`ServerSession`], carry out its actions; and the control messages queued
//! for it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ipnet::Ipv6Net;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Span};

use crate::config::ServerConfig;
use crate::connection::{write_frames, FrameReader, ReadError};
use crate::daemon::admission::Pending;
use crate::daemon::events::EventKind;
use crate::daemon::gate::Admitted;
use crate::daemon::metrics::{Outcome, SuperKind};
use crate::daemon::peers::{Granted, Peer};
use crate::egress::Outbound;
use crate::limits::MAX_FRAME;
use crate::session::server::{pushed_params, Action, Ending, ServerSession};
use crate::session::Protocol;
use crate::wire::SUPER_HEADER_LEN;
use crate::wire::{Control, Decoder, Features, Frame, CONTROL_LEN};

use super::forward::{count_drop, forward_from};
use super::Shared;

/// How long a closing connection may take to flush what is queued for it.
const FLUSH_GRACE: Duration = Duration::from_secs(1);

/// An admitted connection, from its first frame to its end: the session
/// rules decide, this loop reads, writes, and keeps the one timer.
pub(super) async fn connection(
    shared: Arc<Shared>,
    admitted: Admitted,
    remote: SocketAddr,
    pending: Pending,
    handshake_deadline: Instant,
    shutdown: CancellationToken,
) {
    let Admitted {
        reader,
        writer,
        identity,
        routes,
        client_to_client,
        extension,
    } = admitted;
    let config = &shared.config;
    let client_to_client = client_to_client.unwrap_or(config.client_to_client);
    let budget = shared.peers.budget_handle();
    let (queue, queue_rx) =
        crate::connection::queue(config.queue_len, config.queue_bytes, Some(budget.clone()));
    let mut writer = tokio::spawn(write_frames(writer, queue_rx));
    // An extension client may send super-packets and its features.
    let decoder = match extension {
        true => Decoder::new(config.max_frame).with_extensions(),
        false => Decoder::new(config.max_frame),
    };
    // Before its grant an original-protocol client has proved nothing: it
    // may send its 20-byte request and nothing from the shared read budget.
    let before_grant = match identity.protocol() {
        Protocol::Original => Decoder::new(CONTROL_LEN),
        Protocol::Tls => decoder,
    };
    let mut reader =
        FrameReader::new(reader, before_grant).with_limits(budget, config.frame_timeout);
    let peer = shared.peers.new_peer(
        remote,
        identity,
        routes.clone(),
        queue,
        extension,
        SystemTime::now(),
    );
    let accepted = handshake_deadline - shared.config.handshake_timeout;
    let mut session = ServerSession::new(
        handshake_deadline.into_std(),
        shared.config.client_timeout,
        shared.peers.netmask(),
        routes,
    );
    if peer.accepts_offer() {
        session = session.marking_grants();
    }
    // Counts this connection as unauthenticated until it is granted.
    let mut pending = Some(pending);
    // The IPv6 address granted, released in the cluster when it leaves.
    let mut held6 = None;

    // One timer for the connection, not one per frame: it fires at the
    // deadline it was last set to, and is moved on if a frame came since.
    let idle = tokio::time::sleep_until(Instant::from_std(session.deadline()));
    tokio::pin!(idle);
    let ending = loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break Ending::Shutdown,
            _ = peer.kick.cancelled() => break match peer.shed.load(Ordering::Relaxed) {
                true => Ending::OverBudget,
                false => Ending::Kicked,
            },
            () = &mut idle => {
                if let Some(ending) = session.on_tick(std::time::Instant::now()) {
                    break ending;
                }
                idle.as_mut().reset(Instant::from_std(session.deadline()));
                continue;
            }
            read = reader.read_frame() => match read {
                Ok(Some(frame)) => frame,
                Ok(None) => break Ending::ClosedByPeer,
                Err(ReadError::Protocol(e)) => break Ending::Protocol(e),
                Err(e) => break Ending::Io(e.to_string()),
            },
        };
        let now = std::time::Instant::now();
        peer.stats.seen(SystemTime::now());
        match &frame {
            Frame::Packet(packet) => peer.stats.count_rx(packet.len()),
            Frame::Super(packet) => peer.stats.count_rx(packet.frame.len() - SUPER_HEADER_LEN),
            Frame::Control(_) | Frame::Extension(_) => {}
        }
        match session.on_frame(now, frame) {
            Action::None => {}
            Action::Reply(control) => send(&peer, control),
            Action::Admit(request) => match match &shared.cluster {
                // Boxed: an etcd call's future is large, and inline it would
                // make every connection's task that large for its whole life.
                Some(cluster) => {
                    Box::pin(crate::daemon::cluster::admit(
                        cluster,
                        &shared.peers,
                        request,
                        &peer,
                    ))
                    .await
                }
                None => {
                    shared
                        .peers
                        .admit(request, &peer, std::time::Instant::now(), SystemTime::now())
                }
            } {
                Ok(Granted {
                    address,
                    address6,
                    replaced,
                }) => {
                    session.granted(now, address);
                    session.granted6(address6);
                    held6 = address6;
                    if let Some(pending) = pending.take() {
                        pending.granted(peer.identity.protocol(), now);
                    }
                    reader.set_decoder(decoder);
                    shared.metrics.granted(accepted.elapsed().as_secs_f64());
                    if let Some(lease) = peer.identity.key().and_then(|k| shared.peers.lease_of(&k))
                    {
                        shared.keep_lease(&lease);
                    }
                    Span::current().record("addr", tracing::field::display(address));
                    if let (Some(old), Some(key)) = (replaced, peer.identity.key()) {
                        warn!(
                            %key,
                            old_remote = %old.remote,
                            new_remote = %remote,
                            old_address = %old.address,
                            "key connected from two places: the newer connection takes over, the older is closed"
                        );
                    }
                    match address6 {
                        Some(address6) => info!(
                            ?request,
                            peers = shared.peers.len(),
                            "granted {address} and {address6}"
                        ),
                        None => info!(?request, peers = shared.peers.len(), "granted {address}"),
                    }
                    shared.events.publish(
                        EventKind::Granted,
                        remote,
                        Some(address),
                        format!("{request:?}"),
                    );
                    if extension {
                        // Behind the grant: a plaintext client takes
                        // extension frames only once it has the grant's marker.
                        announce_features(config, &peer);
                    }
                    if peer.takes_params() {
                        push_params(&shared, &peer, address, address6);
                    }
                    // From now on silence counts, not the handshake deadline.
                    idle.as_mut().reset(Instant::from_std(session.deadline()));
                }
                Err(refusal) => break Ending::Refused(request, refusal),
            },
            Action::Forward {
                destination,
                packet,
            } => forward_from(
                &shared,
                &peer,
                client_to_client,
                destination,
                Outbound::Packet(packet),
            ),
            Action::ForwardSuper {
                destination,
                packet,
            } => {
                shared.metrics.supers.count(SuperKind::FromClient);
                forward_from(
                    &shared,
                    &peer,
                    client_to_client,
                    destination,
                    Outbound::Super(packet),
                )
            }
            Action::Announced(features) => {
                let takes = features.contains(Features::SUPER_PACKETS);
                debug!(super_packets = takes, "features announced");
                peer.super_packets.store(takes, Ordering::Relaxed);
            }
            Action::Drop(reason) => count_drop(&shared, &peer, reason),
            Action::Close(ending) => break ending,
        }
    };
    drop(pending);

    let address = session.address();
    if let Some(lease) = address.and_then(|a| shared.peers.remove(a, peer.id, SystemTime::now())) {
        shared.keep_lease(&lease);
    }
    if let (Some(cluster), Some(address)) = (&shared.cluster, address) {
        Box::pin(crate::daemon::cluster::released(
            cluster,
            &shared.peers,
            &peer,
            IpAddr::V4(address),
            held6,
        ))
        .await;
    }
    shared
        .metrics
        .ended(Outcome::of(&ending, address.is_some()));
    let peers = shared.peers.len();
    let kind = match ending {
        Ending::Refused(..) => EventKind::Refused,
        _ => EventKind::Disconnected,
    };
    shared
        .events
        .publish(kind, remote, address, ending.to_string());
    match ending.is_misbehaviour() {
        true => warn!(reason = %ending, peers, "disconnected"),
        false => info!(reason = %ending, peers, "disconnected"),
    }
    // Let the writer flush what is queued (e.g. a last keepalive echo), but a
    // refused or misbehaving client gets its connection closed right away.
    // The writer ends when the last sender of its queue (the peer record)
    // is gone.
    drop(peer);
    if !ending.flushes() || timeout(FLUSH_GRACE, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// Queues a control message to a client; dropped if its queue is full.
fn send(peer: &Peer, control: Control) {
    if peer
        .queue
        .try_push(Bytes::copy_from_slice(&control.encode()))
        .is_err()
    {
        peer.stats
            .dropped_queue_full
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// Queues what the server takes for an extension client: super-packets
/// whatever its tun does (it splits them for a tun without offloads), if
/// its frames may be as large.
fn announce_features(config: &ServerConfig, peer: &Peer) {
    if config.max_frame >= MAX_FRAME {
        let _ = peer.queue.try_push(Features::SUPER_PACKETS.encode());
    }
}

/// Queues the session parameters for an extension client just granted
/// `address` and `address6` (right behind its grant).
pub(super) fn push_params(
    shared: &Shared,
    peer: &Peer,
    address: Ipv4Addr,
    address6: Option<Ipv6Addr>,
) {
    let params = crate::params::SessionParams {
        address6: address6
            .and_then(|a| Ipv6Net::new(a, shared.peers.network6()?.prefix_len()).ok()),
        ..pushed_params(
            address,
            shared.config.network,
            shared.served_routes(),
            &peer.routes,
            &shared.offer(),
        )
    };
    match params.encode() {
        Ok(frame) => {
            debug!(routes = params.routes.len(), "pushing session parameters");
            if peer.queue.try_push(frame).is_err() {
                peer.stats
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        // The config's limits keep this from happening.
        Err(e) => warn!(error = %e, "session parameters not sent"),
    }
}
