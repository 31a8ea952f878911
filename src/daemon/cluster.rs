//! The server's side of a cluster ([`crate::cluster`]): a grant is claimed
//! in etcd before the peer table enters it, an address is released in etcd
//! when its client leaves, and what other servers change (an address moved
//! to them, a ban) is applied to the peer table here.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{info, warn};

use super::events::{EventKind, Events};
use super::links::Links;
use super::peers::{Granted, Peer, PeerTable};
use crate::cluster::leases::{ClaimError, Claimant, Family, Holder, Wanted};
use crate::cluster::{Cluster, Health};
use crate::pool::Refusal;
use crate::proto;
use crate::state::Ban;
use crate::wire::Request;

/// Who `peer` is in the cluster's address leases.
pub fn claimant(peer: &Peer) -> Claimant {
    Claimant::of(peer.identity.key(), peer.remote.ip())
}

/// Grants `peer` an address for `request`: claimed in the cluster first
/// (the one it asks for or has fixed, else the one it holds on any server,
/// else a free one), then entered in the table. With `network6`, an
/// extension client's IPv6 address is claimed the same way (the one fixed
/// for its key, else the one it holds on any server, else a free one).
/// Refused, with the reason, while etcd is unreachable.
pub async fn admit(
    cluster: &Cluster,
    peers: &PeerTable,
    request: Request,
    peer: &Arc<Peer>,
) -> Result<Granted, Refusal> {
    let claimant = claimant(peer);
    let exactly = match (peer.identity.fixed(), request) {
        (Some(fixed), _) => Some(fixed),
        (None, Request::Static(address)) => Some(address),
        (None, Request::Dynamic | Request::Keepalive) => None,
    };
    // Nothing outside the network reaches etcd (the request may come from
    // an unauthenticated original-protocol client).
    if let Some(address) = exactly.filter(|a| !peers.in_pool(*a)) {
        return Err(Refusal::NotInPool(address));
    }
    let wanted = exactly.map_or(Wanted::Any(Family::V4), |a| Wanted::Exactly(IpAddr::V4(a)));
    let address = match cluster.claim(&claimant, wanted, |a| peers.is_free(a)).await {
        Ok(IpAddr::V4(address)) => address,
        // An IPv4 claim gives an IPv4 address.
        Ok(IpAddr::V6(_)) => return Err(Refusal::Exhausted),
        Err(e) => return Err(refused(e)),
    };
    let address6 = match claim6(cluster, peers, peer, &claimant).await {
        Ok(address6) => address6,
        Err(refusal) => {
            cluster.release(&claimant, IpAddr::V4(address)).await;
            return Err(refusal);
        }
    };
    match peers.admit_claimed(
        Request::Static(address),
        address6,
        peer,
        std::time::Instant::now(),
        std::time::SystemTime::now(),
    ) {
        Ok(granted) => Ok(granted),
        Err(refusal) => {
            cluster.release(&claimant, IpAddr::V4(address)).await;
            if let Some(address6) = address6 {
                cluster.release(&claimant, IpAddr::V6(address6)).await;
            }
            Err(refusal)
        }
    }
}

/// The IPv6 address claimed in the cluster for `peer`, if it gets one: an
/// extension client of a server with `network6`. None, served IPv4 only,
/// when every IPv6 address is held (as a single server does).
async fn claim6(
    cluster: &Cluster,
    peers: &PeerTable,
    peer: &Arc<Peer>,
    claimant: &Claimant,
) -> Result<Option<Ipv6Addr>, Refusal> {
    if peers.network6().is_none() || !peer.takes_params() {
        return Ok(None);
    }
    let wanted = peer
        .identity
        .key()
        .and_then(|key| peers.fixed_address6(&key))
        .map_or(Wanted::Any(Family::V6), |fixed| {
            Wanted::Exactly(IpAddr::V6(fixed))
        });
    match cluster.claim(claimant, wanted, |a| peers.is_free(a)).await {
        Ok(IpAddr::V6(address6)) => Ok(Some(address6)),
        Ok(IpAddr::V4(_)) | Err(ClaimError::Exhausted) => {
            warn!(remote = %peer.remote, "no IPv6 address: every one of network6 is held in the cluster");
            Ok(None)
        }
        Err(e) => Err(refused(e)),
    }
}

/// The refusal a client hears for a claim that failed.
fn refused(error: ClaimError) -> Refusal {
    match error {
        ClaimError::Taken(IpAddr::V4(address)) => Refusal::Taken(address),
        // A fixed IPv6 address held by another client: refused as a
        // single server refuses a fixed IPv4 one.
        ClaimError::Taken(IpAddr::V6(address)) => {
            warn!(addr = %address, "grant refused: the IPv6 address fixed for the key is held by another client in the cluster");
            Refusal::ClusterUnavailable(
                "the IPv6 address fixed for this key is held by another client",
            )
        }
        ClaimError::Exhausted => Refusal::Exhausted,
        e @ ClaimError::Unreachable(_) => {
            warn!(error = %e, "grant refused: the cluster's state (etcd) is unreachable");
            Refusal::ClusterUnavailable(
                "the cluster's state (etcd) is unreachable: no new grants until it answers",
            )
        }
        e @ ClaimError::Contended(_) => {
            warn!(error = %e, "grant refused");
            Refusal::ClusterUnavailable(
                "the address changed in the cluster too often while it was claimed",
            )
        }
    }
}

/// `peer`, which held `address` (and `address6`), has left the table: each
/// is free in the cluster, unless a newer connection of the same client
/// holds it here.
pub async fn released(
    cluster: &Cluster,
    peers: &PeerTable,
    peer: &Peer,
    address: IpAddr,
    address6: Option<Ipv6Addr>,
) {
    let addresses = std::iter::once(address).chain(address6.map(IpAddr::V6));
    for address in addresses {
        if peers.peer(address).is_none() {
            cluster.release(&claimant(peer), address).await;
        }
    }
}

/// Another server holds `address` now: its client here is closed.
pub fn lost(peers: &PeerTable, events: &Events, address: IpAddr, holder: &Holder) {
    if let Some(peer) = peers.kick(address) {
        let reason = format!(
            "{address} is held by {} on server {} now",
            holder.claimant, holder.node
        );
        warn!(addr = %address, remote = %peer.remote, "disconnected: {reason}");
        events.publish(EventKind::Kicked, peer.remote, Some(peer.address), reason);
    }
}

/// This server is fenced (its etcd lease went unrenewed for `lease_ttl`):
/// every client's session is closed, so that it fails over to a server that
/// reaches etcd, where it keeps its address.
pub fn fenced(peers: &PeerTable, events: &Events) {
    let reason = "this server is fenced: cut off from the cluster's state (etcd) for lease_ttl";
    for (address, _) in peers.connected() {
        if let Some(peer) = peers.kick(address) {
            warn!(addr = %address, remote = %peer.remote, "disconnected: {reason}");
            events.publish(EventKind::Kicked, peer.remote, Some(address), reason);
        }
    }
}

/// A ban made on another server: refused here too, its connections closed.
pub fn banned(peers: &PeerTable, events: &Events, ban: Ban) {
    for peer in peers.ban_who(ban) {
        let reason = "banned on another server of the cluster";
        info!(addr = %peer.address, remote = %peer.remote, "disconnected: {reason}");
        events.publish(EventKind::Kicked, peer.remote, Some(peer.address), reason);
    }
}

/// What the cluster refused (records, links, packets), for the metrics.
pub fn refusals(cluster: &Cluster, links: Option<&Links>) -> super::metrics::ClusterRefusals {
    let refused = cluster.refused();
    let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    super::metrics::ClusterRefusals {
        records: [
            ("unsigned", count(&refused.unsigned)),
            ("unknown_node", count(&refused.unknown_node)),
            ("bad_signature", count(&refused.bad_signature)),
            ("wrong_node", count(&refused.wrong_node)),
        ],
        links: links.map_or(0, |l| count(&l.refused_admission)),
        spoofed: links.map_or(0, |l| count(&l.dropped_spoofed)),
    }
}

/// The cluster as `svpnctl status` shows it.
pub fn status(cluster: &Cluster, links: Option<&Links>) -> proto::ClusterStatus {
    proto::ClusterStatus {
        node: cluster.config().node.clone(),
        health: match cluster.health() {
            Health::Reachable => "reachable",
            Health::Degraded => "degraded",
            Health::Fenced => "fenced",
        }
        .into(),
        fenced: cluster.health() == Health::Fenced,
        members: cluster
            .known_members()
            .into_iter()
            .map(|m| proto::ClusterMember {
                node: m.node,
                advertise: m.advertise.to_string(),
                key: m.key.unwrap_or_default(),
            })
            .collect(),
        links: links
            .map(Links::links)
            .unwrap_or_default()
            .into_iter()
            .map(|l| proto::ClusterLink {
                node: l.node,
                remote: l.remote.to_string(),
                up: l.up,
                tx_packets: l.tx_packets,
                tx_bytes: l.tx_bytes,
                dropped_queue_full: l.dropped_queue_full,
            })
            .collect(),
        dropped_no_peer: links.map_or(0, |l| l.dropped_no_peer.load(Ordering::Relaxed)),
        dropped_link_down: links.map_or(0, |l| l.dropped_link_down.load(Ordering::Relaxed)),
        records_refused: cluster.refused().total(),
        dropped_spoofed: links.map_or(0, |l| l.dropped_spoofed.load(Ordering::Relaxed)),
        links_refused: links.map_or(0, |l| l.refused_admission.load(Ordering::Relaxed)),
    }
}
