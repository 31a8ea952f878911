//! Prometheus metrics of a server, served at `http://[metrics] listen/metrics`
//! in the OpenMetrics text format (which Prometheus scrapes natively).
//!
//! Events (grants, refusals, disconnects, handshake times) are counted as
//! they happen, once per connection. What changes per packet is not: the
//! peers' byte and packet counters are the atomics the packet path keeps
//! anyway ([`super::peers::PeerStats`]), read at scrape time by a
//! collector, as are the drop counters and the gauges.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::peers::PeerTable;
use crate::connection::AQM_TOTAL;
use crate::session::server::{DropReason, Ending};

/// Why a connection was refused before it got an address (a label value):
/// the same closed set the refusal summaries count.
pub use super::admission::RefusalReason;

/// Why a granted connection ended (a label value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    Shutdown,
    ClosedByPeer,
    Silent,
    Kicked,
    /// Closed because the memory budget was spent and it held the most.
    OverBudget,
    Protocol,
    Io,
}

impl DisconnectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::ClosedByPeer => "closed_by_peer",
            DisconnectReason::Silent => "silent",
            DisconnectReason::Kicked => "kicked",
            DisconnectReason::OverBudget => "over_budget",
            DisconnectReason::Protocol => "protocol",
            DisconnectReason::Io => "io",
        }
    }
}

/// How a connection ended, for the metrics: a disconnect of a granted
/// peer, or a refusal of one that got no address.
pub enum Outcome {
    Disconnected(DisconnectReason),
    Refused(RefusalReason),
}

impl Outcome {
    /// The outcome of `ending`; `granted`: whether it held an address.
    pub fn of(ending: &Ending, granted: bool) -> Outcome {
        let disconnect = match ending {
            Ending::Refused(_, refusal) => {
                return Outcome::Refused(RefusalReason::of_refusal(refusal))
            }
            Ending::HandshakeTimeout => return Outcome::Refused(RefusalReason::HandshakeTimeout),
            Ending::Shutdown => DisconnectReason::Shutdown,
            Ending::ClosedByPeer => DisconnectReason::ClosedByPeer,
            Ending::Silent => DisconnectReason::Silent,
            Ending::Kicked => DisconnectReason::Kicked,
            Ending::OverBudget => DisconnectReason::OverBudget,
            Ending::Protocol(_) => DisconnectReason::Protocol,
            Ending::Io(_) => DisconnectReason::Io,
        };
        match granted {
            true => Outcome::Disconnected(disconnect),
            // Gone before it asked for an address: not a disconnect of a peer.
            false => Outcome::Refused(match disconnect {
                DisconnectReason::Protocol => RefusalReason::ProtocolError,
                _ => RefusalReason::Io,
            }),
        }
    }
}

/// Why a packet was dropped (a label value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropKind {
    /// From a client, with a source that is not its own.
    Spoofed,
    /// From a client before it held an address.
    Unassigned,
    /// From a client, not IPv4.
    NotIpv4,
    /// For a client whose send queue was full.
    QueueFull,
    /// For the server's host, whose tun queue was full.
    TunFull,
    /// Too big for the client's MTU and not to be cut (answered with ICMP).
    TooBig,
    /// A super-packet that could not be split or written (malformed).
    Offload,
    /// From a client, for another client, with `client_to_client = "deny"`.
    ClientToClient,
    /// Waited in a client's queue past CoDel's target ([`crate::codel`]).
    Codel,
}

impl DropKind {
    const ALL: [DropKind; 9] = [
        DropKind::Spoofed,
        DropKind::Unassigned,
        DropKind::NotIpv4,
        DropKind::QueueFull,
        DropKind::TunFull,
        DropKind::TooBig,
        DropKind::Offload,
        DropKind::ClientToClient,
        DropKind::Codel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropKind::Spoofed => "spoofed",
            DropKind::Unassigned => "unassigned",
            DropKind::NotIpv4 => "not_ipv4",
            DropKind::QueueFull => "queue_full",
            DropKind::TunFull => "tun_full",
            DropKind::TooBig => "too_big",
            DropKind::Offload => "offload",
            DropKind::ClientToClient => "client_to_client",
            DropKind::Codel => "codel",
        }
    }
}

impl From<DropReason> for DropKind {
    fn from(reason: DropReason) -> DropKind {
        match reason {
            DropReason::Unassigned => DropKind::Unassigned,
            DropReason::Spoofed(_) => DropKind::Spoofed,
            DropReason::NotIpv4 => DropKind::NotIpv4,
        }
    }
}

macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}
label_value!(RefusalReason, DisconnectReason);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    reason: RefusalReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DisconnectLabels {
    reason: DisconnectReason,
}

/// One atomic per kind `K` of a closed set of `N`: a single relaxed add
/// when a packet is counted.
#[derive(Debug)]
pub struct KindCounters<K, const N: usize>([AtomicU64; N], std::marker::PhantomData<K>);

impl<K, const N: usize> Default for KindCounters<K, N> {
    fn default() -> Self {
        KindCounters(
            std::array::from_fn(|_| AtomicU64::new(0)),
            Default::default(),
        )
    }
}

impl<K: Into<usize>, const N: usize> KindCounters<K, N> {
    pub fn count(&self, kind: K) {
        self.0[kind.into()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, kind: K) -> u64 {
        self.0[kind.into()].load(Ordering::Relaxed)
    }
}

/// Drops, by [`DropKind`].
pub type DropCounters = KindCounters<DropKind, { DropKind::ALL.len() }>;

impl From<DropKind> for usize {
    fn from(kind: DropKind) -> usize {
        kind as usize
    }
}

/// What happened to super-packets (TUN offloads), one atomic each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuperKind {
    /// Received from a client in a super-packet frame.
    FromClient,
    /// Read from the server's tun.
    FromTun,
    /// Queued whole for a client that takes them.
    Whole,
    /// Split (or cut) for a client that does not.
    Split,
}

impl SuperKind {
    const ALL: [SuperKind; 4] = [
        SuperKind::FromClient,
        SuperKind::FromTun,
        SuperKind::Whole,
        SuperKind::Split,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SuperKind::FromClient => "from_client",
            SuperKind::FromTun => "from_tun",
            SuperKind::Whole => "to_client_whole",
            SuperKind::Split => "to_client_split",
        }
    }
}

/// Super-packets, by [`SuperKind`].
pub type SuperCounters = KindCounters<SuperKind, { SuperKind::ALL.len() }>;

impl From<SuperKind> for usize {
    fn from(kind: SuperKind) -> usize {
        kind as usize
    }
}

/// The server's event metrics; cheap to clone (the counters are shared).
#[derive(Debug, Clone)]
pub struct Metrics {
    grants: Counter,
    refusals: Family<RefusalLabels, Counter>,
    disconnects: Family<DisconnectLabels, Counter>,
    handshake: Histogram,
    pub drops: Arc<DropCounters>,
    pub supers: Arc<SuperCounters>,
    /// Connections that were not ours, handed to the port-share backend.
    pub port_share: Counter,
    /// Of those, the ones the backend did not answer (unreachable, timeout).
    pub port_share_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            grants: Counter::default(),
            refusals: Family::default(),
            disconnects: Family::default(),
            // 1 ms to ~16 s.
            handshake: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            drops: Arc::default(),
            supers: Arc::default(),
            port_share: Counter::default(),
            port_share_failures: Counter::default(),
        }
    }
}

impl Metrics {
    /// A grant, `seconds` after the connection was accepted.
    pub fn granted(&self, seconds: f64) {
        self.grants.inc();
        self.handshake.observe(seconds);
    }

    pub fn refused(&self, reason: RefusalReason) {
        self.refusals.get_or_create(&RefusalLabels { reason }).inc();
    }

    pub fn ended(&self, outcome: Outcome) {
        match outcome {
            Outcome::Disconnected(reason) => {
                self.disconnects
                    .get_or_create(&DisconnectLabels { reason })
                    .inc();
            }
            Outcome::Refused(reason) => self.refused(reason),
        }
    }

    /// A registry with these metrics and the collector over `table`.
    pub fn registry(&self, table: Arc<dyn PeerSource>) -> Registry {
        let mut registry = Registry::with_prefix("simplevpn");
        registry.register(
            "grants",
            "Addresses granted to clients",
            self.grants.clone(),
        );
        registry.register(
            "refusals",
            "Connections refused before they got an address, by reason",
            self.refusals.clone(),
        );
        registry.register(
            "disconnects",
            "Connections of granted peers that ended, by reason",
            self.disconnects.clone(),
        );
        registry.register(
            "handshake_duration_seconds",
            "Time from accepting a connection to granting it an address",
            self.handshake.clone(),
        );
        registry.register(
            "port_share_connections",
            "Connections that were not ours, handed to the port_share backend",
            self.port_share.clone(),
        );
        registry.register(
            "port_share_failures",
            "Connections for the port_share backend that it did not answer",
            self.port_share_failures.clone(),
        );
        registry.register_collector(Box::new(PeerCollector {
            table,
            drops: self.drops.clone(),
            supers: self.supers.clone(),
        }));
        registry
    }
}

/// What the collector reads at scrape time.
pub trait PeerSource: Send + Sync + 'static {
    fn table(&self) -> &PeerTable;

    /// Reads from each of the tun's queues (one reader each), queue 0 first.
    fn tun_queue_reads(&self) -> Vec<u64> {
        Vec::new()
    }

    /// A cluster server's counts of what it refused from etcd and on its
    /// links; None outside a cluster.
    fn cluster_refusals(&self) -> Option<ClusterRefusals> {
        None
    }
}

/// What a cluster server refused: records in etcd not signed by a pinned
/// member (by reason), incoming links over the admission limits, packets
/// from a link whose source the sending member holds no lease for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterRefusals {
    pub records: [(&'static str, u64); 4],
    pub links: u64,
    pub spoofed: u64,
}

/// One of a peer's counters, read from its snapshot.
type PeerCounter = fn(&super::peers::PeerInfo) -> u64;

/// Reads the gauges and the per-peer and drop counters at scrape time.
struct PeerCollector {
    table: Arc<dyn PeerSource>,
    drops: Arc<DropCounters>,
    supers: Arc<SuperCounters>,
}

impl std::fmt::Debug for PeerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerCollector")
    }
}

impl Collector for PeerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let table = self.table.table();
        let gauge = |encoder: &mut DescriptorEncoder, name, help, value: u64| {
            let metric = ConstGauge::new(value as i64);
            let e = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(e)
        };
        gauge(
            &mut encoder,
            "peers_connected",
            "Clients that hold an address",
            table.len() as u64,
        )?;
        gauge(
            &mut encoder,
            "free_addresses",
            "Addresses of the pool still free",
            u64::from(table.free_count()),
        )?;
        if let Some(free6) = table.free_count6() {
            // A /64 holds 2^64 - 2: as a float, which a Prometheus sample is.
            let metric = ConstGauge::new(free6 as f64);
            let help = "IPv6 addresses of the pool still free (network6)";
            let e =
                encoder.encode_descriptor("free_addresses6", help, None, metric.metric_type())?;
            metric.encode(e)?;
        }

        let mut drops = encoder.encode_descriptor(
            "drops",
            "Packets dropped, by reason",
            None,
            MetricType::Counter,
        )?;
        for kind in DropKind::ALL {
            let value = match kind {
                DropKind::QueueFull => table.queue_full.load(Ordering::Relaxed),
                DropKind::Codel => AQM_TOTAL.dropped.load(Ordering::Relaxed),
                kind => self.drops.get(kind),
            };
            let labels = [("reason", kind.as_str())];
            ConstCounter::new(value).encode(drops.encode_family(&labels)?)?;
        }

        let marks = ConstCounter::new(AQM_TOTAL.marked.load(Ordering::Relaxed));
        let help = "Packets marked Congestion Experienced (ECN) instead of dropped by CoDel";
        let e = encoder.encode_descriptor("ecn_marks", help, None, marks.metric_type())?;
        marks.encode(e)?;

        let mut supers = encoder.encode_descriptor(
            "super_packets",
            "Super-packets (TUN offloads), by where they came from or went",
            None,
            MetricType::Counter,
        )?;
        for kind in SuperKind::ALL {
            let labels = [("way", kind.as_str())];
            ConstCounter::new(self.supers.get(kind)).encode(supers.encode_family(&labels)?)?;
        }

        let reads = self.table.tun_queue_reads();
        if !reads.is_empty() {
            let mut family = encoder.encode_descriptor(
                "tun_queue_reads",
                "Packets and super-packets read from each queue of the tun",
                None,
                MetricType::Counter,
            )?;
            for (queue, value) in reads.into_iter().enumerate() {
                let labels = [("queue", queue.to_string())];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }

        if let Some(cluster) = self.table.cluster_refusals() {
            {
                let mut records = encoder.encode_descriptor(
                    "cluster_records_refused",
                    "Records in etcd ignored: not signed by a pinned member, by reason",
                    None,
                    MetricType::Counter,
                )?;
                for (reason, value) in cluster.records {
                    let labels = [("reason", reason)];
                    ConstCounter::new(value).encode(records.encode_family(&labels)?)?;
                }
            }
            for (name, help, value) in [
                (
                    "cluster_links_refused",
                    "Incoming cluster links closed at once: too many waiting for their handshake",
                    cluster.links,
                ),
                (
                    "cluster_link_spoofed",
                    "Packets from a cluster link whose source the sending member holds no lease for",
                    cluster.spoofed,
                ),
            ] {
                let metric = ConstCounter::new(value);
                let e = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
                metric.encode(e)?;
            }
        }

        // Per peer: labelled by its name, else its address.
        let peers = table.peers();
        let per_peer: [(&str, &str, PeerCounter); 4] = [
            ("peer_rx_bytes", "Bytes received from a peer", |p| {
                p.rx_bytes
            }),
            ("peer_tx_bytes", "Bytes queued to a peer", |p| p.tx_bytes),
            ("peer_rx_packets", "Packets received from a peer", |p| {
                p.rx_packets
            }),
            ("peer_tx_packets", "Packets queued to a peer", |p| {
                p.tx_packets
            }),
        ];
        for (name, help, value) in per_peer {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for peer in &peers {
                let label = match peer.identity.name() {
                    Some(name) => name.to_string(),
                    None => peer.address.to_string(),
                };
                let labels = [("peer", label)];
                ConstCounter::new(value(peer)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the metrics endpoint (at start, so a bad address is an error then).
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Connections to /metrics open at once, at most.
pub const MAX_METRICS_CONNECTIONS: usize = 64;
/// How long a metrics request's headers may take to arrive.
pub const METRICS_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves GET /metrics on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, registry: Registry, shutdown: CancellationToken) {
    let registry = Arc::new(registry);
    if let Ok(address) = listener.local_addr() {
        info!(%address, "metrics at http://{address}/metrics");
    }
    // Scrapers hold a connection or two; anything beyond the cap is closed
    // at once (the first time logged, later ones at debug level).
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    let mut refused_logged = false;
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            match std::mem::replace(&mut refused_logged, true) {
                false => {
                    warn!(%remote, "metrics: {MAX_METRICS_CONNECTIONS} connections open; closing new ones")
                }
                true => {
                    debug!(%remote, "metrics: connection refused, {MAX_METRICS_CONNECTIONS} open")
                }
            }
            continue;
        };
        let registry = registry.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |request| {
                let registry = registry.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&registry, &request)) }
            });
            // A request's headers must arrive within the timeout: a
            // connection that sends nothing does not keep its place.
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                served = connection => if let Err(e) = served {
                    debug!(%remote, error = %e, "metrics connection");
                },
            }
        });
    }
}

fn respond<B>(registry: &Registry, request: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status, content_type, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n".into(),
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => reply(StatusCode::OK, CONTENT_TYPE, body),
        Err(e) => {
            let mut message = String::new();
            let _ = writeln!(message, "encoding the metrics failed: {e}");
            reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Table(PeerTable);
    impl PeerSource for Table {
        fn table(&self) -> &PeerTable {
            &self.0
        }
    }

    #[test]
    fn every_metric_is_encoded_with_closed_reasons() {
        let metrics = Metrics::default();
        let table = Arc::new(Table(
            PeerTable::new(
                "198.19.0.0/16".parse().expect("net"),
                [],
                crate::budget::MemoryBudget::new(1 << 20),
            )
            .with_ipv6(
                Some("2001:2:0:100::/120".parse().expect("net")),
                Default::default(),
            ),
        ));
        metrics.granted(0.004);
        metrics.refused(RefusalReason::Banned);
        metrics.ended(Outcome::Disconnected(DisconnectReason::Kicked));
        metrics.drops.count(DropKind::Spoofed);
        let registry = metrics.registry(table);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "simplevpn_grants_total 1",
            "simplevpn_refusals_total{reason=\"banned\"} 1",
            "simplevpn_disconnects_total{reason=\"kicked\"} 1",
            "simplevpn_drops_total{reason=\"spoofed\"} 1",
            "simplevpn_drops_total{reason=\"queue_full\"} 0",
            "simplevpn_peers_connected 0",
            "simplevpn_free_addresses 65533",
            "simplevpn_free_addresses6 254.0",
            "simplevpn_handshake_duration_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // Process-wide: other tests in this process may have counted some.
        for name in [
            "simplevpn_drops_total{reason=\"codel\"} ",
            "simplevpn_ecn_marks_total ",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "{name} missing:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
