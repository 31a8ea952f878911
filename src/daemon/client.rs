//! The client role: connects to the server, asks for an address, configures
//! its tun from the grant and forwards packets both ways; keeps the link alive
//! and reconnects after any failure, asking for the address it held.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument, Span};

use super::control::{self, KickError, Node};
use super::dialer::{Dialed, Dialer};
use super::events::{EventKind, Events, PeerEvent};
use super::gate::Identity;
use super::helper::Helper;
use super::notify;
use super::registry::{PeerInfo, PeerStats};
use super::{ControlOptions, DaemonError};
use crate::config::ClientConfig;
use crate::connection::{FrameReader, ReadError, Reader, Writer};
use crate::daemon::tun::AsyncTun;
use crate::keys::NodeKey;
use crate::pool::server_address;
use crate::proto;
use crate::wire::{ipv4_addresses, netmask_prefix, Control, Decoder, Frame, Reply, Request};

/// How long connecting, and then waiting for the grant, may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many bytes of waiting packets the uplink gathers into one write.
const UPLINK_BATCH: usize = 128 * 1024;
/// The largest packet a tun read can return.
const MAX_PACKET: usize = 65536;
/// Keepalives are re-sent this often while the server stays silent.
const KEEPALIVE_RETRY: Duration = Duration::from_secs(1);

/// The tun device and what it is configured with.
struct Tunnel {
    device: Arc<AsyncTun>,
    index: u32,
    helper: Helper,
    configured: Option<(Ipv4Addr, u8)>,
}

impl Tunnel {
    /// Sets the tun's address, unless it already has exactly this one.
    async fn configure(&mut self, address: Ipv4Addr, prefix: u8) -> Result<(), DaemonError> {
        if self.configured != Some((address, prefix)) {
            self.helper.set_ipv4(self.index, address, prefix).await?;
            self.helper.set_up(self.index).await?;
            self.configured = Some((address, prefix));
        }
        Ok(())
    }
}

/// The link to the server as the control service sees it.
struct ClientState {
    /// Who the server is: its pinned key with TLS.
    identity: Identity,
    server: String,
    tun: String,
    started: SystemTime,
    events: Events,
    link: Mutex<Link>,
}

#[derive(Debug, Default, Clone)]
struct Link {
    /// "connecting", "connected" (granted) or "backoff".
    state: &'static str,
    remote: Option<SocketAddr>,
    connected_since: Option<SystemTime>,
    granted: Option<(Ipv4Addr, u8)>,
    stats: Option<Arc<PeerStats>>,
}

impl ClientState {
    fn update(&self, change: impl FnOnce(&mut Link)) {
        change(&mut self.link.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn link(&self) -> Link {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The server as a peer, while a granted connection is up.
    fn server_peer(&self) -> Option<PeerInfo> {
        let link = self.link();
        match (
            link.state,
            link.remote,
            link.connected_since,
            link.granted,
            link.stats,
        ) {
            ("connected", Some(remote), Some(since), Some((address, prefix)), Some(stats)) => {
                // The server's tunnel address: the network's first host address.
                let network = ipnet::Ipv4Net::new(address, prefix).ok()?.trunc();
                Some(PeerInfo::new(
                    server_address(network),
                    remote,
                    since,
                    &stats,
                    &self.identity,
                ))
            }
            _ => None,
        }
    }
}

impl Node for ClientState {
    fn status(&self) -> proto::StatusReply {
        let link = self.link();
        proto::StatusReply {
            role: proto::Role::Client.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            started: Some(self.started.into()),
            tun: self.tun.clone(),
            address: link
                .granted
                .map(|(a, p)| format!("{a}/{p}"))
                .unwrap_or_default(),
            server: self.server.clone(),
            link_state: proto::LinkState::of(link.state).into(),
            server_peer: self.server_peer().as_ref().map(proto::Peer::from),
            ..Default::default()
        }
    }

    fn peers(&self) -> Vec<PeerInfo> {
        self.server_peer().into_iter().collect()
    }

    fn kick(&self, _: Ipv4Addr, _: Option<Duration>, _: &str) -> Result<PeerInfo, KickError> {
        Err(KickError::NotAServer)
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }
}

/// How a session with the server ended.
enum Ending {
    Shutdown,
    /// Closed before a grant: the server refused the request.
    Refused,
    /// Failed after `granted` (true if an address was granted on it).
    Failed {
        reason: String,
        granted: bool,
    },
}

/// Runs the client until `shutdown` is cancelled; `helper` creates the tun
/// and, only once the server grants one, sets its address; the control API
/// is served on `control` if given.
pub async fn run(
    config: ClientConfig,
    helper: &Helper,
    control: Option<ControlOptions>,
    key: Option<NodeKey>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let dialer = Dialer::new(&config, key.as_ref(), HANDSHAKE_TIMEOUT)?;
    let tun = helper.open_tun().await?;
    helper.set_mtu(tun.index, config.mtu).await?;
    let mut tunnel = Tunnel {
        device: Arc::new(AsyncTun::new(tun.fd)?),
        index: tun.index,
        helper: helper.clone(),
        configured: None,
    };
    let identity = dialer.identity();
    info!(
        server = %config.server,
        tun = %tun.name,
        protocol = %identity.protocol(),
        "client starting"
    );
    let state = Arc::new(ClientState {
        identity,
        server: config.server.clone(),
        tun: tun.name.clone(),
        started: SystemTime::now(),
        events: Events::default(),
        link: Mutex::default(),
    });
    let control_task = control.map(|control| {
        let node: Arc<dyn Node> = state.clone();
        tokio::spawn(control::serve(control, node, shutdown.clone()))
    });
    let status = state.clone();
    let notify_task = tokio::spawn(notify::serve(
        move || {
            let link = status.link();
            notify::client_status(link.state, &status.server, link.granted)
        },
        shutdown.clone(),
    ));

    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    // The address to ask for: the configured one, else the one held last.
    let mut wanted = config.address;
    loop {
        let span = info_span!("server", remote = %config.server, addr = tracing::field::Empty);
        state.update(|link| link.state = "connecting");
        let ending = session(&config, &dialer, &mut tunnel, &state, wanted, &shutdown)
            .instrument(span.clone())
            .await?;
        state.update(|link| {
            link.state = "backoff";
            link.stats = None;
        });
        let _entered = span.enter();
        match ending {
            Ending::Shutdown => break,
            Ending::Refused => match (config.address, wanted) {
                (Some(address), _) => {
                    warn!(%address, "the server refused the static address; retrying");
                }
                (None, Some(previous)) => {
                    info!(%previous, "the server refused the previous address; asking for any");
                    wanted = None;
                }
                (None, None) => warn!(
                    "the server closed the connection without a grant (addresses exhausted, \
                     banned, or protocol not allowed)"
                ),
            },
            Ending::Failed { reason, granted } => {
                if granted {
                    backoff.reset();
                    // Ask for the address just held (a static one stays wanted).
                    if config.address.is_none() {
                        wanted = tunnel.configured.map(|(address, _)| address);
                    }
                }
                warn!(%reason, "disconnected");
            }
        }
        let delay = backoff.next_delay();
        info!("reconnecting in {:.1}s", delay.as_secs_f64());
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    if let Some(task) = control_task {
        let _ = task.await;
    }
    let _ = notify_task.await;
    info!("client stopped");
    Ok(())
}

/// One connection to the server: connect, ask, configure, forward.
async fn session(
    config: &ClientConfig,
    dialer: &Dialer,
    tunnel: &mut Tunnel,
    state: &ClientState,
    wanted: Option<Ipv4Addr>,
    shutdown: &CancellationToken,
) -> Result<Ending, DaemonError> {
    let failed = |reason: String| Ending::Failed {
        reason,
        granted: false,
    };
    let Dialed {
        reader,
        writer,
        remote,
    } = tokio::select! {
        _ = shutdown.cancelled() => return Ok(Ending::Shutdown),
        dialed = dialer.dial() => match dialed {
            Ok(dialed) => dialed,
            Err(reason) => return Ok(failed(reason)),
        },
    };
    let stats = Arc::new(PeerStats::default());
    state.update(|link| {
        link.remote = Some(remote);
        link.connected_since = Some(SystemTime::now());
        link.stats = Some(stats.clone());
    });
    info!("connected");
    state.events.publish(EventKind::Connected, remote, None, "");
    let mut reader = FrameReader::new(reader, Decoder::new(config.max_frame));
    let mut writer = writer;
    let request = match wanted {
        Some(address) => Request::Static(address),
        None => Request::Dynamic,
    };
    let message = Control::request(request).encode();
    match timeout(HANDSHAKE_TIMEOUT, writer.write_all(&message)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Ok(failed(format!("sending the request failed: {e}"))),
        Err(_) => return Ok(failed("sending the request timed out".into())),
    }

    // Wait for the grant; keepalive echoes may come first.
    let grant_deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let (address, netmask) = loop {
        let read = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Ending::Shutdown),
            read = tokio::time::timeout_at(grant_deadline, reader.read_frame()) => read,
        };
        match read {
            Err(_) => return Ok(failed("no grant within the handshake timeout".into())),
            // TLS 1.3 tells a client that its key was rejected only now,
            // after its side of the handshake: an alert instead of a grant.
            Ok(Err(ReadError::Io(e))) if dialer.is_tls() => {
                return Ok(failed(format!(
                    "the server rejected this client ({e}): is its key listed in the server's [[server.peer]]?"
                )));
            }
            Ok(Ok(None)) | Ok(Err(ReadError::Io(_))) => return Ok(Ending::Refused),
            Ok(Err(e)) => return Ok(failed(e.to_string())),
            Ok(Ok(Some(Frame::Control(control)))) => match control.as_reply() {
                Ok(Reply::Grant { address, netmask }) => break (address, netmask),
                Ok(Reply::Keepalive) => continue,
                Err(e) => return Ok(failed(format!("protocol error: {e}"))),
            },
            // A packet before the grant: nothing is configured to take it.
            Ok(Ok(Some(Frame::Packet(_)))) => continue,
        }
    };
    let prefix = netmask.and_then(netmask_prefix).unwrap_or(config.prefix);
    tunnel.configure(address, prefix).await?;
    Span::current().record("addr", tracing::field::display(address));
    info!(
        pushed_netmask = netmask.is_some(),
        "granted {address}/{prefix}"
    );
    state.update(|link| {
        link.state = "connected";
        link.granted = Some((address, prefix));
    });
    state.events.publish(
        EventKind::Granted,
        remote,
        Some(address),
        format!("{request:?}"),
    );

    let activity = Arc::new(Activity::new());
    // Control messages (keepalives) for the uplink task, which owns the writer.
    let (control, control_rx) = mpsc::channel(4);
    let tun_to_server = tokio::spawn(
        forward_tun_to_server(
            tunnel.device.clone(),
            writer,
            control_rx,
            activity.clone(),
            stats.clone(),
        )
        .instrument(Span::current()),
    );
    let reason = forward_server_to_tun(
        config,
        tunnel,
        &mut reader,
        &control,
        &activity,
        &stats,
        shutdown,
    )
    .await;
    tun_to_server.abort();
    let _ = tun_to_server.await;
    if let Ok(Some(reason)) = &reason {
        state.events.publish(
            EventKind::Disconnected,
            remote,
            Some(address),
            reason.clone(),
        );
    }
    Ok(match reason {
        Err(e) => return Err(e),
        Ok(None) => Ending::Shutdown,
        Ok(Some(reason)) => Ending::Failed {
            reason,
            granted: true,
        },
    })
}

/// Milliseconds since the session started of the last frame each way.
struct Activity {
    start: Instant,
    last_rx: AtomicU64,
    last_tx: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_rx: AtomicU64::new(0),
            last_tx: AtomicU64::new(0),
        }
    }
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
    fn received(&self) {
        self.last_rx.store(self.now(), Ordering::Relaxed);
    }
    fn sent(&self) {
        self.last_tx.store(self.now(), Ordering::Relaxed);
    }
    fn since_rx(&self) -> Duration {
        Duration::from_millis(self.now() - self.last_rx.load(Ordering::Relaxed))
    }
    fn since_tx(&self) -> Duration {
        Duration::from_millis(self.now() - self.last_tx.load(Ordering::Relaxed))
    }
}

/// Reads the tun and writes each IPv4 packet to the server, together with
/// the control messages (keepalives) that arrive on `control`. A burst of
/// packets waiting in the tun goes out in one write; when the connection is
/// slow this waits (rather than queueing), so the tun's own queue drops.
async fn forward_tun_to_server(
    tun: Arc<AsyncTun>,
    mut writer: Writer,
    mut control: mpsc::Receiver<Bytes>,
    activity: Arc<Activity>,
    stats: Arc<PeerStats>,
) {
    let mut buf = vec![0u8; UPLINK_BATCH + MAX_PACKET];
    loop {
        let read = tokio::select! {
            biased;
            message = control.recv() => match message {
                Some(message) => {
                    if writer.write_all(&message).await.is_err() {
                        return;
                    }
                    activity.sent();
                    continue;
                }
                None => return,
            },
            read = tun.recv(&mut buf) => read,
        };
        let mut len = match read {
            Ok(len) => keep_ipv4(&buf[..len], &stats),
            Err(e) => {
                warn!(error = %e, "tun read failed");
                return;
            }
        };
        // More packets already waiting join this write.
        while len < UPLINK_BATCH {
            match tun.try_recv(&mut buf[len..]) {
                Ok(more) => len += keep_ipv4(&buf[len..len + more], &stats),
                Err(_) => break,
            }
        }
        if len == 0 {
            continue;
        }
        if writer.write_all(&buf[..len]).await.is_err() {
            return;
        }
        activity.sent();
    }
}

/// The length of `packet` if it is IPv4 (counted as sent), else 0. The
/// server grants IPv4 addresses only and drops anything else (IPv6
/// link-local chatter, say): no point in sending it.
fn keep_ipv4(packet: &[u8], stats: &PeerStats) -> usize {
    match ipv4_addresses(packet) {
        Some(_) => {
            stats.count_tx(packet.len());
            packet.len()
        }
        None => 0,
    }
}

/// Reads frames from the server into the tun, and keeps the link alive.
/// Returns `Ok(None)` on shutdown, `Ok(Some(reason))` when the link failed.
async fn forward_server_to_tun(
    config: &ClientConfig,
    tunnel: &mut Tunnel,
    reader: &mut FrameReader<Reader>,
    control: &mpsc::Sender<Bytes>,
    activity: &Activity,
    stats: &PeerStats,
    shutdown: &CancellationToken,
) -> Result<Option<String>, DaemonError> {
    let mut tick = tokio::time::interval(KEEPALIVE_RETRY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let keepalive = Bytes::copy_from_slice(&Control::KEEPALIVE.encode());
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tick.tick() => {
                let silent = activity.since_rx();
                if silent >= config.timeout {
                    return Ok(Some(format!("no traffic from the server for {}s", silent.as_secs())));
                }
                if silent >= config.keepalive_after || activity.since_tx() >= config.keepalive_after {
                    debug!("sending keepalive");
                    let _ = control.try_send(keepalive.clone());
                }
                continue;
            }
            read = reader.read_frame() => match read {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(Some("closed by server".into())),
                Err(e) => return Ok(Some(e.to_string())),
            },
        };
        activity.received();
        stats.seen();
        match frame {
            Frame::Packet(packet) => {
                stats.count_rx(packet.len());
                if let Err(e) = tunnel.device.send(&packet).await {
                    debug!(error = %e, "tun write failed");
                }
            }
            Frame::Control(control) => match control.as_reply() {
                Ok(Reply::Keepalive) => {}
                Ok(Reply::Grant { address, netmask }) => {
                    let prefix = netmask.and_then(netmask_prefix).unwrap_or(config.prefix);
                    if tunnel.configured != Some((address, prefix)) {
                        info!("server moved us to {address}/{prefix}");
                        tunnel.configure(address, prefix).await?;
                        Span::current().record("addr", tracing::field::display(address));
                    }
                }
                Err(e) => return Ok(Some(format!("protocol error: {e}"))),
            },
        }
    }
}

/// Reconnect delays: `initial` doubling up to `max`, each with +-20% jitter.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay to wait before reconnecting.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        base.mul_f64(0.8 + fastrand::f64() * 0.4).min(self.max)
    }

    /// Back to the initial delay, after a connection that worked.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let bases = [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0];
        for base in bases {
            let d = backoff.next_delay().as_secs_f64();
            assert!(
                d >= base * 0.8 - 1e-9 && d <= (base * 1.2).min(30.0) + 1e-9,
                "{d} vs {base}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(1200));
    }
}
