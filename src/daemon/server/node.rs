//! What the rest of the daemon asks of the server: the control API
//! ([`Node`]), packets from the cluster's links ([`LinkDelivery`]), and the
//! cluster's changes ([`ClusterHooks`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::cluster::ClusterHooks;
use crate::config::PeerSection;
use crate::daemon::control::{AdminError, AdminRequest, KickError, Node};
use crate::daemon::events::{EventKind, PeerEvent};
use crate::daemon::gate::AllowedPeer;
use crate::daemon::links::LinkDelivery;
use crate::daemon::metrics::DropKind;
use crate::daemon::peers::{Banned, PeerInfo};
use crate::egress::Outbound;
use crate::keys::PublicKey;
use crate::pool::server_address;
use crate::pool6::server_address6;
use crate::proto;
use crate::state::Ban;

use super::forward::send_to;
use super::Shared;

impl Node for Shared {
    fn status(&self) -> proto::StatusReply {
        let network = self.config.network;
        proto::StatusReply {
            role: proto::Role::Server.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            started: Some(self.started.into()),
            tun: self.tun_name.clone(),
            tun_state: self.tun_health.state().to_string(),
            address: format!("{}/{}", server_address(network), network.prefix_len()),
            listen: self.listening.clone(),
            network: network.to_string(),
            peer_count: self.peers.len() as u32,
            free_addresses: self.peers.free_count(),
            dropped_to_tun: self.metrics.drops.get(DropKind::TunFull),
            queued_bytes: self.peers.budget().queued() as u64,
            reading_bytes: self.peers.budget().reading() as u64,
            closed_for_memory: self.peers.budget().closed(),
            routes: self.served_routes().iter().map(|r| r.to_string()).collect(),
            host_changes: self.host_changes.clone(),
            network6: self
                .config
                .network6
                .map(|n| n.to_string())
                .unwrap_or_default(),
            address6: self
                .config
                .network6
                .map(|n| format!("{}/{}", server_address6(n), n.prefix_len()))
                .unwrap_or_default(),
            free_addresses6: self
                .peers
                .free_count6()
                .map_or(0, |n| u64::try_from(n).unwrap_or(u64::MAX)),
            cluster: self
                .cluster
                .as_ref()
                .map(|cluster| crate::daemon::cluster::status(cluster, self.links.as_deref())),
            public_key: self.public_key.map(|k| k.to_string()).unwrap_or_default(),
            endpoint: self.config.endpoint.clone().unwrap_or_default(),
            ..Default::default()
        }
    }

    fn peers(&self) -> Vec<PeerInfo> {
        self.peers.peers()
    }

    fn peer(&self, address: Ipv4Addr) -> Option<PeerInfo> {
        self.peers.peer(address)
    }

    fn kick(
        &self,
        address: Ipv4Addr,
        ban: Option<Duration>,
        by: &str,
        why: &str,
    ) -> Result<PeerInfo, KickError> {
        // The ban's reason: who, and their words if any.
        let kicked = match why.is_empty() {
            true => format!("kicked by {by}"),
            false => format!("kicked by {by}: {why}"),
        };
        let mut reason = kicked.clone();
        let peer = match ban {
            None => self.peers.kick(address),
            Some(ban) => {
                reason.push_str(&format!(", banned for {}", humantime::format_duration(ban)));
                let until = crate::wallclock::after(SystemTime::now(), ban);
                let peer = self.peers.ban(address, until, &kicked, SystemTime::now());
                if let Some(peer) = &peer {
                    let who = Banned::of(&peer.identity, peer.remote.ip());
                    let ban = Ban {
                        who,
                        until,
                        reason: kicked,
                    };
                    match &self.cluster {
                        Some(cluster) => cluster.share_ban(ban),
                        None => {
                            if let Err(e) = self.store.put_ban(&ban) {
                                warn!(error = %e, "ban not kept across restarts");
                            }
                        }
                    }
                }
                peer
            }
        }
        .ok_or(KickError::NoSuchPeer(address))?;
        info!(remote = %peer.remote, addr = %address, "{reason}");
        self.events
            .publish(EventKind::Kicked, peer.remote, Some(address), reason);
        Ok(peer)
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }

    fn bans(&self) -> Result<Vec<Ban>, KickError> {
        Ok(self.peers.bans(SystemTime::now()))
    }

    fn unban(&self, who: &Banned, by: &str) -> Result<bool, KickError> {
        let here = self.peers.unban(who, SystemTime::now());
        let kept = match &self.cluster {
            Some(cluster) => cluster.unshare_ban(who),
            None => match self.store.remove_ban(who) {
                Ok(kept) => kept,
                Err(e) => {
                    warn!(error = %e, "ban lifted until the next restart only: the state store failed");
                    false
                }
            },
        };
        let lifted = here || kept;
        if lifted {
            info!(who = %who, "ban lifted by {by}");
        }
        Ok(lifted)
    }

    fn admin(&self) -> Option<mpsc::Sender<AdminRequest>> {
        Some(self.admin.clone())
    }

    fn allowed(&self) -> Result<Vec<(AllowedPeer, Option<Ipv4Addr>)>, AdminError> {
        let connected: HashMap<PublicKey, Ipv4Addr> = self
            .peers
            .connected()
            .into_iter()
            .filter_map(|(address, peer)| Some((peer.identity.key()?, address)))
            .collect();
        Ok(self
            .gate
            .peers()
            .iter()
            .map(|p| (p.clone(), connected.get(&p.section.key).copied()))
            .collect())
    }
}

impl LinkDelivery for Shared {
    fn deliver(&self, destination: IpAddr, packet: Bytes) -> bool {
        match self.peers.holder(destination) {
            Some(peer) => {
                send_to(self, &peer, Outbound::Packet(packet));
                true
            }
            None => false,
        }
    }

    fn route_owner(&self, source: IpAddr) -> Option<PublicKey> {
        self.gate
            .peers()
            .iter()
            .find(|p| p.section.routes.iter().any(|r| r.contains(&source)))
            .map(|p| p.section.key)
    }
}

impl ClusterHooks for Shared {
    fn lost(&self, address: IpAddr, holder: &crate::cluster::leases::Holder) {
        crate::daemon::cluster::lost(&self.peers, &self.events, address, holder);
    }

    fn banned(&self, ban: Ban) {
        crate::daemon::cluster::banned(&self.peers, &self.events, ban);
    }

    fn fenced(&self) {
        crate::daemon::cluster::fenced(&self.peers, &self.events);
    }

    fn unbanned(&self, who: Banned) {
        if self.peers.unban(&who, SystemTime::now()) {
            info!(who = %who, "ban lifted on another server of the cluster");
        }
    }

    fn peers(&self, live: Vec<PeerSection>) {
        if self
            .admin
            .try_send(AdminRequest::ClusterPeers { live })
            .is_err()
        {
            warn!("the cluster's live peers changed but the server is busy: applied at the next change");
        }
    }
}
