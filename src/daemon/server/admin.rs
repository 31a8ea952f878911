//! Changes to the running server, one at a time: reload, peers added and
//! removed live, and applying the settings that result.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use tracing::{info, warn};

use crate::config::{check_peers, ConfigError, PeerSection, ServerConfig};
use crate::daemon::control::{AdminError, AdminRequest, ReloadReport};
use crate::daemon::events::EventKind;
use crate::daemon::gate::{merge_peers, AllowedPeer, PeerSource};
use crate::daemon::helper::Helper;
use crate::keys::PublicKey;

use super::connection::push_params;
use super::invites::{create_invite, revoke_invite};
use super::{fitting_live, fixed6, tun_routes, Shared};

/// Carries out one change to the running server and answers it.
pub(super) async fn administer(
    shared: &Arc<Shared>,
    helper: &Helper,
    tun: u32,
    request: AdminRequest,
) {
    match request {
        AdminRequest::Reload { reply } => {
            let result = reload(shared, helper, tun).await;
            log_reload(&result);
            let _ = reply.send(result);
        }
        AdminRequest::AddPeer { peer, reply } => {
            let result = add_peer(shared, helper, tun, peer).await;
            if let Err(e) = &result {
                warn!("peer add refused: {e}");
            }
            let _ = reply.send(result);
        }
        AdminRequest::RemovePeer { which, reply } => {
            let result = remove_peer(shared, helper, tun, &which).await;
            if let Err(e) = &result {
                warn!("peer remove refused: {e}");
            }
            let _ = reply.send(result);
        }
        AdminRequest::CreateInvite { request, reply } => {
            let result = create_invite(shared, request).await;
            if let Err(e) = &result {
                warn!("invitation refused: {e}");
            }
            let _ = reply.send(result);
        }
        AdminRequest::ListInvites { reply } => {
            let _ = reply.send(shared.invites().await);
        }
        AdminRequest::RevokeInvite { name, reply } => {
            let _ = reply.send(revoke_invite(shared, &name).await);
        }
        AdminRequest::ClusterPeers { live } => {
            let live = fitting_live(&shared.current(), live);
            let same = *shared.live.lock().unwrap_or_else(|e| e.into_inner()) == live;
            if !same {
                let config = (*shared.current()).clone();
                match apply(shared, helper, tun, config, live).await {
                    Ok(report) => info!(
                        added = ?report.added,
                        removed = ?report.removed,
                        disconnected = report.disconnected,
                        "live peers changed on a server of the cluster: applied"
                    ),
                    Err(e) => warn!("live peers changed in the cluster, not applied here: {e}"),
                }
            }
        }
    }
}

pub(super) fn log_reload(result: &Result<ReloadReport, AdminError>) {
    match result {
        Ok(report) => info!(
            added = ?report.added,
            removed = ?report.removed,
            changed = ?report.changed,
            routes_changed = report.routes_changed,
            offer_changed = report.offer_changed,
            disconnected = report.disconnected,
            params_pushed = report.pushed,
            "reloaded"
        ),
        Err(e) => warn!("reload refused: {e}"),
    }
}

/// Reads the config again and applies the difference.
pub(super) async fn reload(
    shared: &Arc<Shared>,
    helper: &Helper,
    tun: u32,
) -> Result<ReloadReport, AdminError> {
    let new = match &shared.source {
        Some(source) => source.load().map_err(AdminError::Invalid)?,
        None => shared.config.clone(),
    };
    let fields = shared.config.needs_restart(&new);
    if !fields.is_empty() {
        return Err(AdminError::NeedsRestart(fields));
    }
    let live = shared
        .live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    apply(shared, helper, tun, new, live).await
}

/// Allows `peer` now and keeps it in the store.
async fn add_peer(
    shared: &Arc<Shared>,
    helper: &Helper,
    tun: u32,
    peer: PeerSection,
) -> Result<(), AdminError> {
    if shared.gate.peer(&peer.key).is_some() {
        return Err(AdminError::Exists(peer.key));
    }
    let mut live = shared
        .live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    live.push(peer.clone());
    let config = (*shared.current()).clone();
    check(&config, &live)?;
    if let Some(cluster) = &shared.cluster {
        apply(shared, helper, tun, config, live).await?;
        cluster.share_peer(peer);
        return Ok(());
    }
    shared.store.put_peer(&peer)?;
    if let Err(e) = apply(shared, helper, tun, config, live).await {
        // Not allowed after all: not kept either.
        let _ = shared.store.remove_peer(&peer.key);
        return Err(e);
    }
    Ok(())
}

/// Forgets the live peer with key or name `which` and closes its connections.
async fn remove_peer(
    shared: &Arc<Shared>,
    helper: &Helper,
    tun: u32,
    which: &str,
) -> Result<(PeerSection, usize), AdminError> {
    let found = shared
        .gate
        .peers()
        .iter()
        .find(|p| p.section.key.to_string() == which || p.section.name.as_deref() == Some(which))
        .cloned()
        .ok_or_else(|| AdminError::NoSuchPeer(which.to_string()))?;
    if found.source == PeerSource::Config {
        return Err(AdminError::InConfig(found.section.label()));
    }
    let key = found.section.key;
    match &shared.cluster {
        Some(cluster) => cluster.unshare_peer(key),
        None => {
            shared.store.remove_peer(&key)?;
        }
    }
    let mut live = shared
        .live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    live.retain(|p| p.key != key);
    let config = (*shared.current()).clone();
    let report = apply(shared, helper, tun, config, live).await?;
    Ok((found.section, report.disconnected))
}

/// Checks that the peers of `config` and `live` fit together.
pub(super) fn check(
    config: &ServerConfig,
    live: &[PeerSection],
) -> Result<Vec<AllowedPeer>, AdminError> {
    let merged = merge_peers(&config.peers, live);
    let sections = merged.iter().map(|p| p.section.clone()).collect();
    peers_fit(config, sections).map_err(AdminError::Invalid)?;
    Ok(merged)
}

/// Whether `sections` (the config's peers and those added live) fit
/// together and beside `config`'s routes and networks.
pub(super) fn peers_fit(
    config: &ServerConfig,
    sections: Vec<PeerSection>,
) -> Result<(), ConfigError> {
    let (peers, routes) = check_peers(
        sections,
        config.routes.clone(),
        config.network,
        config.key.is_some(),
    )?;
    crate::config6::network6(config.network6, &peers, &routes, config.mtu)?;
    Ok(())
}

/// Makes `config` (whose fixed settings are those started with) and the
/// `live` peers the ones in force: peers no longer allowed, or whose entry
/// changed, are disconnected; new ones may join; if the served networks
/// changed, connected extension clients get new session parameters.
/// Nothing else is touched.
async fn apply(
    shared: &Arc<Shared>,
    helper: &Helper,
    tun: u32,
    config: ServerConfig,
    live: Vec<PeerSection>,
) -> Result<ReloadReport, AdminError> {
    let merged = check(&config, &live)?;
    let fixed: HashMap<Ipv4Addr, PublicKey> = merged
        .iter()
        .filter_map(|p| Some((p.section.address?, p.section.key)))
        .collect();
    shared
        .peers
        .set_fixed(&fixed)
        .map_err(|refusal| AdminError::Invalid(ConfigError::new("address", refusal.to_string())))?;
    shared
        .peers
        .set_fixed6(fixed6(&merged))
        .map_err(|refusal| {
            AdminError::Invalid(ConfigError::new("address6", refusal.to_string()))
        })?;
    let old = shared.gate.peers();
    let old_served = shared.served_routes();
    let old_offer = shared.offer();
    shared.gate.set_peers(merged.clone());
    *shared.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    *shared.live.lock().unwrap_or_else(|e| e.into_inner()) = live;

    let mut report = ReloadReport::default();
    for before in old.iter() {
        let now = merged.iter().find(|p| p.section.key == before.section.key);
        let why = match now {
            None => {
                report.removed.push(before.section.label());
                "no longer allowed"
            }
            Some(now) if now.section != before.section => {
                report.changed.push(before.section.label());
                "its entry changed: reconnect"
            }
            Some(_) => continue,
        };
        for peer in shared.peers.kick_key(&before.section.key) {
            report.disconnected += 1;
            info!(addr = %peer.address, remote = %peer.remote, key = %before.section.key, "disconnected: {why}");
            shared.events.publish(
                EventKind::Kicked,
                peer.remote,
                Some(peer.address),
                why.to_string(),
            );
        }
    }
    report.added = merged
        .iter()
        .filter(|p| !old.iter().any(|o| o.section.key == p.section.key))
        .map(|p| p.section.label())
        .collect();

    let (before, after) = (tun_routes(&old), tun_routes(&merged));
    for route in after.difference(&before) {
        if let Err(e) = helper.add_route(tun, *route).await {
            warn!(%route, error = %e, "not routed into the tun on this host until a restart; clients still reach it through the server");
        }
    }
    for route in before.difference(&after) {
        if let Err(e) = helper.del_route(tun, *route).await {
            warn!(%route, error = %e, "route not removed from the tun");
        }
    }

    report.routes_changed = shared.served_routes() != old_served;
    report.offer_changed = shared.offer() != old_offer;
    if report.routes_changed || report.offer_changed {
        for (address, peer) in shared.peers.connected() {
            if peer.takes_params() && !peer.kick.is_cancelled() {
                let address6 = shared.peers.peer(address).and_then(|p| p.address6);
                push_params(shared, &peer, address, address6);
                report.pushed += 1;
            }
        }
    }
    Ok(report)
}
