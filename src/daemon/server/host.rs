//! The host's side of the server's start: the tun, its addresses and
//! routes, and a gateway's NAT and forwarding, all through the helper.

use std::net::Ipv4Addr;

use tracing::warn;

use crate::config::{PeerSection, ServerConfig};
use crate::daemon::helper::{Helper, HelperError};
use crate::daemon::DaemonError;
use crate::pool6::server_address6;
use crate::privsep::protocol::{Forwarding, TunFd};

/// Opens and configures the tun: its MTU and addresses, the routes to the
/// networks behind clients, and a gateway's setup beyond it. Returns the
/// tun and what was changed on the host beyond it.
pub(super) async fn set_up_tun(
    config: &ServerConfig,
    live: &[PeerSection],
    helper: &Helper,
    own_address: Ipv4Addr,
) -> Result<(TunFd, Vec<String>), DaemonError> {
    let tun = helper.open_tun().await?;
    helper.set_mtu(tun.index, config.mtu).await?;
    helper
        .set_ipv4(tun.index, own_address, config.network.prefix_len())
        .await?;
    helper.set_up(tun.index).await?;
    if let Some(network6) = config.network6 {
        // After the link is up: the kernel sets up IPv6 on a link when it
        // comes up.
        helper
            .set_ipv6(tun.index, server_address6(network6), network6.prefix_len())
            .await?;
    }
    // The networks behind clients are reached through the tun: the host
    // routes them here, and the peer table on to the client behind each.
    for route in config.peers.iter().flat_map(|p| p.routes.iter()) {
        helper.add_route(tun.index, *route).await?;
    }
    for route in live.iter().flat_map(|p| p.routes.iter()) {
        if let Err(e) = helper.add_route(tun.index, *route).await {
            warn!(%route, error = %e, "a live peer's network is not routed into the tun on this host");
        }
    }
    let host_changes = beyond_the_tun(config, helper, tun.index, &tun.name).await?;
    Ok((tun, host_changes))
}

/// A gateway's setup beyond the tun: the NAT table (`masquerade`) and the
/// forwarding check. Returns what was changed on the host.
async fn beyond_the_tun(
    config: &ServerConfig,
    helper: &Helper,
    index: u32,
    tun: &str,
) -> Result<Vec<String>, DaemonError> {
    let mut changes = Vec::new();
    if config.masquerade {
        changes.extend(helper.masquerade(index).await?);
    }
    let forwards = config.masquerade || config.gateway || !config.routes.is_empty();
    if forwards {
        let checked = helper.check_forwarding().await;
        report_forwarding(checked, "IPv4", "net.ipv4.ip_forward", tun, &mut changes)?;
    }
    if forwards && config.network6.is_some() {
        let checked = helper.check_forwarding6().await;
        let sysctl = "net.ipv6.conf.all.forwarding";
        report_forwarding(checked, "IPv6", sysctl, tun, &mut changes)?;
    }
    Ok(changes)
}

/// Logs what the helper found of `family`'s forwarding (`sysctl`), and
/// adds it to `changes` if it turned it on.
fn report_forwarding(
    checked: Result<Forwarding, HelperError>,
    family: &str,
    sysctl: &str,
    tun: &str,
    changes: &mut Vec<String>,
) -> Result<(), DaemonError> {
    match checked {
        Ok(Forwarding::On) => {}
        // E.g. /proc/sys read-only (the unit's ProtectKernelTunables=).
        Err(HelperError::Failed { reason, .. }) => warn!(
            tun,
            %reason,
            "{family} forwarding could not be checked or turned on: turn it on with \
             `sysctl -w {sysctl}=1` (and in /etc/sysctl.d to keep it)"
        ),
        Err(e) => return Err(e.into()),
        Ok(Forwarding::TurnedOn) => changes.push(format!("{sysctl} turned on (it stays on)")),
        Ok(Forwarding::Off) => warn!(
            tun,
            "{family} forwarding is off, so clients' {family} traffic does not leave this host: \
             turn it on with `sysctl -w {sysctl}=1`, or set forwarding = true"
        ),
    }
    Ok(())
}
