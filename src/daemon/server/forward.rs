//! The packet path between clients, the tun and the cluster's links.
//!
//! Receive path (a client's packet): [`forward_from`] applies
//! `client_to_client`, then [`forward`]: [`to_client`] (this server's client,
//! else [`to_cluster`]), else [`to_tun`].
//!
//! Send path (a packet for a client): [`tun_reader`] (or a client's packet
//! above) -> [`to_client`] -> [`queue_for`], which queues it in the shape the
//! client takes; its writer task (`write_frames`) sends it.
//!
//! The calls run one way: what a stage cannot deliver (no client holds the
//! destination; an ICMP error for a packet too big for its client) goes
//! back to its caller, which sends it on.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::ClientToClient;
use crate::daemon::metrics::{DropKind, SuperKind};
use crate::daemon::peers::Peer;
use crate::daemon::tun::{AsyncTun, TunOp};
use crate::egress::{egress, from_tun_read, Egress, Outbound, PeerLink};
use crate::limits::MAX_PACKET;
use crate::offload::VNET_HDR_LEN;
use crate::session::server::DropReason;
use crate::session::Protocol;
use crate::wire::ip_addresses;
use crate::wire::IPV6_HEADER_LEN;

use super::Shared;

/// Sends a packet from client `peer` on, as `client_to_client` says:
/// `allow`, to the client that holds `destination` or into the server's
/// tun ([`forward`]); `deny`, into the tun unless a client (here or on
/// another server of the cluster) holds it, which is dropped and counted;
/// `kernel`, into the tun whoever holds it, so the host's routing and
/// firewall decide (the tun reader then brings it to the client).
pub(super) fn forward_from(
    shared: &Shared,
    peer: &Peer,
    client_to_client: ClientToClient,
    destination: IpAddr,
    out: Outbound,
) {
    match client_to_client {
        ClientToClient::Allow => forward(shared, destination, out),
        ClientToClient::Kernel => to_tun(shared, out),
        ClientToClient::Deny if held_by_a_client(shared, destination) => {
            debug!(%destination, "dropped a packet for another client (client_to_client = deny)");
            shared.metrics.drops.count(DropKind::ClientToClient);
            peer.stats
                .dropped_client_to_client
                .fetch_add(1, Ordering::Relaxed);
        }
        ClientToClient::Deny => to_tun(shared, out),
    }
}

/// Whether a client of this server, or of another server of the cluster,
/// holds `destination` (its address, or a network behind it).
fn held_by_a_client(shared: &Shared, destination: IpAddr) -> bool {
    if shared.peers.holder(destination).is_some() {
        return true;
    }
    shared
        .links
        .as_ref()
        .is_some_and(|links| links.held_elsewhere(destination))
}

/// Sends a packet on: to the client that holds `destination`, else into
/// the server's tun ([`to_tun`]); an ICMP error it causes goes the same way.
fn forward(shared: &Shared, mut destination: IpAddr, mut out: Outbound) {
    // An ICMP error is at most 576 bytes: it fits every link, so the
    // second round is the last.
    loop {
        match to_client(shared, destination, out) {
            Handed::Taken => return,
            Handed::Unheld(unheld) => return to_tun(shared, unheld),
            Handed::Answer { to, icmp } => (destination, out) = (to, icmp),
        }
    }
}

/// What [`to_client`] did with a packet.
enum Handed {
    /// Queued for a client of this server, or handed to the server of the
    /// cluster whose client holds it (or dropped, counted).
    Taken,
    /// No client holds its destination.
    Unheld(Outbound),
    /// Too big for its client's link: the ICMP error for its source `to`,
    /// for the caller to send on.
    Answer { to: IpAddr, icmp: Outbound },
}

/// Writes a packet into the server's tun, on the queue of the worker this
/// runs on (the one whose reader gets the answers: see [`crate::workers`]).
fn to_tun(shared: &Shared, out: Outbound) {
    let tun = shared.tun.local();
    let written = match &out {
        Outbound::Packet(packet) => tun.try_send(packet),
        Outbound::Super(packet) => tun.try_send_super(packet),
    };
    if let Err(e) = written {
        // A full tun queue is a drop; a tun gone for good ends the daemon.
        shared.tun_health.check(TunOp::Write, &e);
        let kind = match e.kind() {
            std::io::ErrorKind::InvalidData => DropKind::Offload,
            _ => DropKind::TunFull,
        };
        shared.metrics.drops.count(kind);
    }
}

/// Queues `out` for the client that holds `destination`, on this server or
/// on another of the cluster; hands it back if no client does.
fn to_client(shared: &Shared, destination: IpAddr, out: Outbound) -> Handed {
    match shared.peers.holder(destination) {
        Some(peer) => match queue_for(shared, &peer, out) {
            None => Handed::Taken,
            Some((to, icmp)) => Handed::Answer { to, icmp },
        },
        None => match to_cluster(shared, destination, out) {
            None => Handed::Taken,
            Some(unheld) => Handed::Unheld(unheld),
        },
    }
}

/// Queues `out` for `peer` ([`queue_for`]) and sends on the ICMP error it
/// may cause ([`forward`]).
pub(super) fn send_to(shared: &Shared, peer: &Peer, out: Outbound) {
    if let Some((source, icmp)) = queue_for(shared, peer, out) {
        forward(shared, source, icmp);
    }
}

/// Queues `out` for `peer` in the shape it takes: a super-packet whole or
/// split, anything cut to an original-protocol client's `legacy_mtu`; what
/// cannot be cut is answered with ICMP to its source, as a router would:
/// that answer and its destination are returned, for the caller to send.
fn queue_for(shared: &Shared, peer: &Peer, out: Outbound) -> Option<(IpAddr, Outbound)> {
    let link = PeerLink {
        super_packets: peer.super_packets.load(Ordering::Relaxed),
        // An original client's tun is 1500 bytes; ours (TLS, or plaintext
        // that offered the extension) take whatever their frames may carry.
        mtu: match (peer.identity.protocol(), peer.extension) {
            (Protocol::Original, false) => shared.config.legacy_mtu as usize,
            (Protocol::Original, true) | (Protocol::Tls, _) => usize::MAX,
        },
    };
    let is_super = matches!(out, Outbound::Super(_));
    match egress(out, link) {
        Egress::One(frame) => {
            if is_super && link.super_packets {
                shared.metrics.supers.count(SuperKind::Whole);
            }
            shared.peers.push(peer, frame, SystemTime::now);
            None
        }
        Egress::Many(frames) => {
            shared.metrics.supers.count(SuperKind::Split);
            for frame in frames {
                shared.peers.push(peer, frame, SystemTime::now);
            }
            None
        }
        Egress::TooBig { icmp } => {
            shared.metrics.drops.count(DropKind::TooBig);
            let (_, source) = icmp.as_deref().and_then(ip_addresses)?;
            Some((source, Outbound::Packet(icmp.unwrap_or_default())))
        }
        Egress::Malformed(e) => {
            debug!(error = %e, "dropped a super-packet that cannot be split");
            shared.metrics.drops.count(DropKind::Offload);
            None
        }
    }
}

/// Sends `packet` to the server of the cluster whose client holds
/// `destination`; hands it back if none does (or there is no cluster).
fn to_cluster(shared: &Shared, destination: IpAddr, out: Outbound) -> Option<Outbound> {
    let Some(links) = &shared.links else {
        return Some(out);
    };
    // Links carry plain packets: a super-packet goes as its segments.
    let sup = match out {
        // Handed back if no other server's client holds it.
        Outbound::Packet(packet) => {
            return links.forward(destination, packet).map(Outbound::Packet)
        }
        Outbound::Super(sup) if links.held_elsewhere(destination) => sup,
        out => return Some(out),
    };
    // The holder is looked up once for all the segments; it is gone only
    // if it left the cluster since `held_elsewhere`.
    let forwarded = match egress(Outbound::Super(sup), PeerLink::PLAIN) {
        Egress::One(frame) => links.forward_all(destination, [frame]),
        Egress::Many(frames) => links.forward_all(destination, frames),
        Egress::TooBig { .. } | Egress::Malformed(_) => {
            shared.metrics.drops.count(DropKind::Offload);
            return None;
        }
    };
    if !forwarded {
        debug!(%destination, "dropped a packet for a client that just left the cluster");
    }
    None
}

/// Counts a packet the session dropped.
pub(super) fn count_drop(shared: &Shared, peer: &Peer, reason: DropReason) {
    shared.metrics.drops.count(reason.into());
    let counter = match reason {
        DropReason::Unassigned => {
            debug!("dropped a packet sent before any address was granted");
            &peer.stats.dropped_unassigned
        }
        DropReason::Spoofed(source) => {
            debug!(%source, "dropped a packet with a spoofed source");
            &peer.stats.dropped_spoofed
        }
        DropReason::NotIpv4 => {
            debug!("dropped an IPv6 packet: no IPv6 address is assigned to this peer");
            &peer.stats.dropped_spoofed
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Reads packets the host routes into the tun and queues each for the client
/// that holds its destination.
pub(super) async fn tun_reader(
    tun: Arc<AsyncTun>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(4 * MAX_PACKET);
    loop {
        // Room for the largest read: a virtio-net header and an IPv6
        // super-packet (40 bytes of header beyond its 16-bit payload length).
        if buf.capacity() < MAX_PACKET + VNET_HDR_LEN + IPV6_HEADER_LEN {
            buf.reserve(4 * MAX_PACKET);
        }
        let len = tokio::select! {
            _ = shutdown.cancelled() => return,
            read = tun.recv_into(&mut buf) => match read {
                Ok(len) => len,
                Err(e) if shared.tun_health.check(TunOp::Read, &e) => return,
                Err(e) => {
                    warn!(error = %e, "tun read failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let read = buf.split_to(len);
        let out = match tun.offloads().vnet_hdr {
            true => match from_tun_read(read) {
                Ok(out) => out,
                Err(e) => {
                    debug!(error = %e, "dropped a tun packet with a bad offload header");
                    shared.metrics.drops.count(DropKind::Offload);
                    continue;
                }
            },
            false => Outbound::Packet(read.freeze()),
        };
        if let Outbound::Super(_) = out {
            shared.metrics.supers.count(SuperKind::FromTun);
        }
        // Only to clients, here or on another server of the cluster:
        // nothing read from the tun goes back into it.
        if let Some((_, destination)) = ip_addresses(out.packet()) {
            // What no client holds is dropped.
            if let Handed::Answer { to, icmp } = to_client(&shared, destination, out) {
                forward(&shared, to, icmp);
            }
        }
    }
}
