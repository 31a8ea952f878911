//! Admission before authentication: what a connection that has not proved
//! anything yet may hold, and how its refusals are logged.
//!
//! - A connection holds one of `max_unauthenticated_per_source` per-source
//!   slots (a source is an IPv4 address, or an IPv6 /64: one host usually
//!   holds a whole /64) from accept until it is granted an address, and
//!   either one of `max_unauthenticated` global permits together with one of
//!   `max_unauthenticated_per_network` slots of its network (an IPv4 /24, or
//!   an IPv6 /48: many addresses of one attacker), or one of the
//!   `unauthenticated_reserve` places. All are released by dropping the
//!   [`Pending`] guard.
//! - The reserve is for sources that were granted an address after a TLS
//!   handshake within [`RECENT_FOR`] ([`RecentSources`], at most
//!   [`RECENT_SOURCES`] of them): they get in when strangers have filled the
//!   global places or those of their network.
//! - A granted original-protocol session holds one of its source's
//!   `legacy_max_per_source` slots for its whole life ([`Admission::legacy`]):
//!   an unauthenticated host cannot take the whole pool.
//! - Refusals before authentication are counted, not logged one by one: the
//!   first one of each reason after a quiet spell is logged in full (so a
//!   single unknown key shows up at once), the rest go into a summary line
//!   per interval with the counts by [`RefusalReason`] and the top sources
//!   ([`RefusalSummary`]).
//!
//! No I/O here: the time comes in as an argument, so it is unit-tested.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How often at most a summary of refusals is logged.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// Sources named in a summary line, the most refused first.
pub const SUMMARY_TOP_SOURCES: usize = 5;
/// Distinct sources counted per interval; more are counted together, so a
/// flood from many addresses cannot grow the summary without bound.
const SUMMARY_MAX_SOURCES: usize = 4096;
/// How long after its last grant (after a TLS handshake) a source may use
/// the reserve.
pub const RECENT_FOR: Duration = Duration::from_secs(24 * 3600);
/// Sources remembered for the reserve, at most (about 8 MiB); the one
/// granted longest ago is forgotten first.
pub const RECENT_SOURCES: usize = 65_536;

/// Why a connection was refused before it was authenticated (a closed set:
/// each is one counter of the summary line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalReason {
    /// `max_unauthenticated` connections were already waiting.
    GlobalCap,
    /// Its source already held `max_unauthenticated_per_source` of them.
    PerSource,
    /// Its network (IPv4 /24, IPv6 /48) already held
    /// `max_unauthenticated_per_network` of them.
    PerNetwork,
    /// An original-protocol client whose source already holds
    /// `legacy_max_per_source` granted sessions.
    LegacyPerSource,
    /// No ClientHello, or no whole address request, within
    /// `first_bytes_timeout`.
    FirstBytesTimeout,
    /// Its first 20 bytes looked like IP but are no address request.
    NotAnAddressRequest,
    /// Its first byte is neither TLS nor IP.
    UnknownProtocol,
    /// An original-protocol client, and legacy is off.
    LegacyOff,
    /// An original-protocol client from outside `legacy_allow`.
    LegacyNotAllowed,
    /// A TLS client, and the server has no key.
    NoTls,
    /// The TLS handshake failed (an unknown key, say).
    Handshake,
    /// The handshake did not finish within `handshake_timeout`.
    HandshakeTimeout,
    /// Its key or address is banned.
    Banned,
    /// The connection failed while it was read.
    Io,
    /// After the gate: a frame broke the protocol before a grant.
    ProtocolError,
    /// After the gate: the address asked for is taken or outside the pool.
    AddressTaken,
    /// After the gate: no address is free.
    PoolExhausted,
    /// After the gate: its key took over its own session too often.
    KeyFlapping,
    /// After the gate: the cluster's shared state (etcd) is unreachable.
    ClusterUnavailable,
    /// A joining host's request was refused (an unknown, used, expired or
    /// revoked invitation, or a malformed request).
    JoinRefused,
}

impl RefusalReason {
    /// The reason's name in summary lines.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::GlobalCap => "global_cap",
            RefusalReason::PerSource => "per_source_cap",
            RefusalReason::PerNetwork => "per_network_cap",
            RefusalReason::LegacyPerSource => "legacy_per_source_cap",
            RefusalReason::FirstBytesTimeout => "first_bytes_timeout",
            RefusalReason::NotAnAddressRequest => "not_an_address_request",
            RefusalReason::UnknownProtocol => "unknown_protocol",
            RefusalReason::LegacyOff => "legacy_off",
            RefusalReason::LegacyNotAllowed => "legacy_not_allowed",
            RefusalReason::NoTls => "no_tls",
            RefusalReason::Handshake => "handshake_failed",
            RefusalReason::HandshakeTimeout => "handshake_timeout",
            RefusalReason::Banned => "banned",
            RefusalReason::Io => "io_error",
            RefusalReason::ProtocolError => "protocol_error",
            RefusalReason::AddressTaken => "address_taken",
            RefusalReason::PoolExhausted => "pool_exhausted",
            RefusalReason::KeyFlapping => "key_flapping",
            RefusalReason::ClusterUnavailable => "cluster_unavailable",
            RefusalReason::JoinRefused => "join_refused",
        }
    }

    /// The logged reason of a refusal by one of the limits here.
    pub fn limit_text(self) -> &'static str {
        match self {
            RefusalReason::GlobalCap => {
                "too many connections not yet granted an address (max_unauthenticated)"
            }
            RefusalReason::PerSource => {
                "too many connections from this source not yet granted an address \
                 (max_unauthenticated_per_source)"
            }
            RefusalReason::PerNetwork => {
                "too many connections from this network not yet granted an address \
                 (max_unauthenticated_per_network)"
            }
            RefusalReason::LegacyPerSource => {
                "too many original-protocol sessions from this source (legacy_max_per_source)"
            }
            other => other.as_str(),
        }
    }

    /// The reason of the peer table's refusal of a request.
    pub fn of_refusal(refusal: &crate::pool::Refusal) -> RefusalReason {
        use crate::pool::Refusal;
        match refusal {
            Refusal::NotInPool(_) | Refusal::Taken(_) => RefusalReason::AddressTaken,
            Refusal::Exhausted => RefusalReason::PoolExhausted,
            Refusal::KeyFlapping { .. } => RefusalReason::KeyFlapping,
            Refusal::ClusterUnavailable(_) => RefusalReason::ClusterUnavailable,
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a per-source limit counts: an IPv4 address, or the /64 of an IPv6
/// one (an IPv4-mapped IPv6 address counts as its IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    V4(Ipv4Addr),
    /// The first 64 bits of the address.
    V6(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(v4) => write!(f, "{v4}"),
            Source::V6(prefix) => write!(f, "{}/64", Ipv6Addr::from(u128::from(*prefix) << 64)),
        }
    }
}

/// Who a per-network limit counts: an IPv4 /24, or an IPv6 /48 (an
/// IPv4-mapped IPv6 address counts as its IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Network {
    /// The address with its last 8 bits cleared.
    V4(Ipv4Addr),
    /// The first 48 bits of the address.
    V6(u64),
}

impl From<IpAddr> for Network {
    fn from(ip: IpAddr) -> Network {
        match Source::from(ip) {
            Source::V4(v4) => Network::V4(Ipv4Addr::from(u32::from(v4) & 0xFFFF_FF00)),
            Source::V6(prefix) => Network::V6(prefix >> 16),
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Network::V4(v4) => write!(f, "{v4}/24"),
            Network::V6(prefix) => write!(f, "{}/48", Ipv6Addr::from(u128::from(*prefix) << 80)),
        }
    }
}

/// Counts of connections by key (a [`Source`], a [`Network`]), each key at
/// most `limit` at once.
#[derive(Debug)]
pub struct Slots<K> {
    limit: usize,
    counts: Mutex<HashMap<K, usize>>,
}

/// The per-source counts of unauthenticated connections.
#[cfg(test)]
pub type SourceLimits = Slots<Source>;

/// One connection of a key; its slot is freed on drop.
#[derive(Debug)]
pub struct SlotGuard<K: Copy + Eq + Hash> {
    slots: Arc<Slots<K>>,
    key: K,
}

/// One connection of a source.
pub type SourceGuard = SlotGuard<Source>;

impl<K: Copy + Eq + Hash + From<IpAddr>> Slots<K> {
    pub fn new(limit: usize) -> Arc<Slots<K>> {
        Arc::new(Slots {
            limit,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or None if its key holds all of
    /// its slots.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<SlotGuard<K>> {
        let key = K::from(ip);
        let mut counts = self.lock();
        let count = counts.entry(key).or_insert(0);
        if *count >= self.limit {
            if *count == 0 {
                counts.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(SlotGuard {
            slots: self.clone(),
            key,
        })
    }

    /// How many slots `ip`'s key holds.
    #[cfg(test)]
    pub fn held(&self, ip: IpAddr) -> usize {
        self.lock().get(&K::from(ip)).copied().unwrap_or(0)
    }

    /// How many keys hold a slot.
    #[cfg(test)]
    pub fn sources(&self) -> usize {
        self.lock().len()
    }
}

impl<K> Slots<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, usize>> {
        // Every change is one map operation: a poisoned lock is consistent.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K: Copy + Eq + Hash> Drop for SlotGuard<K> {
    fn drop(&mut self) {
        let mut counts = self.slots.lock();
        if let Some(count) = counts.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// The sources granted an address after a TLS handshake, with the time of
/// their last grant: at most `capacity`, the oldest grant forgotten first.
#[derive(Debug)]
pub struct RecentSources {
    capacity: usize,
    by_source: HashMap<Source, Instant>,
    by_time: BTreeSet<(Instant, Source)>,
}

impl RecentSources {
    pub fn new(capacity: usize) -> RecentSources {
        RecentSources {
            capacity,
            by_source: HashMap::new(),
            by_time: BTreeSet::new(),
        }
    }

    /// Remembers that `source` was granted an address at `now`.
    pub fn granted(&mut self, source: Source, now: Instant) {
        if let Some(before) = self.by_source.insert(source, now) {
            self.by_time.remove(&(before, source));
        }
        self.by_time.insert((now, source));
        while let Some(&(at, oldest)) = self.by_time.first() {
            let expired = now.saturating_duration_since(at) >= RECENT_FOR;
            if !expired && self.by_source.len() <= self.capacity {
                break;
            }
            self.by_time.pop_first();
            self.by_source.remove(&oldest);
        }
    }

    /// Whether `source` was granted an address within [`RECENT_FOR`].
    pub fn is_recent(&self, source: Source, now: Instant) -> bool {
        self.by_source
            .get(&source)
            .is_some_and(|at| now.saturating_duration_since(*at) < RECENT_FOR)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_source.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.by_source.is_empty()
    }
}

/// The limits on connections not yet granted an address, and on granted
/// original-protocol sessions (see the module's description).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_unauthenticated: usize,
    pub per_source: usize,
    pub per_network: usize,
    pub reserve: usize,
    pub legacy_per_source: usize,
}

impl From<&crate::config::ServerConfig> for Limits {
    fn from(config: &crate::config::ServerConfig) -> Limits {
        Limits {
            max_unauthenticated: config.max_unauthenticated,
            per_source: config.max_unauthenticated_per_source,
            per_network: config.max_unauthenticated_per_network,
            reserve: config.unauthenticated_reserve,
            legacy_per_source: config.legacy_max_per_source,
        }
    }
}

/// The limits on connections not yet granted an address, and the count of
/// granted original-protocol sessions by source.
#[derive(Debug, Clone)]
pub struct Admission {
    global: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    sources: Arc<Slots<Source>>,
    networks: Arc<Slots<Network>>,
    legacy: Arc<Slots<Source>>,
    recent: Arc<Mutex<RecentSources>>,
}

/// One of the `max_unauthenticated` global places, held before a
/// connection is accepted.
#[derive(Debug)]
pub struct Place(OwnedSemaphorePermit);

/// Where a pending connection waits: a global place and its network's slot,
/// or a place of the reserve.
#[derive(Debug)]
enum Held {
    Global {
        _place: OwnedSemaphorePermit,
        _network: SlotGuard<Network>,
    },
    Reserve {
        _place: OwnedSemaphorePermit,
    },
}

/// What a connection holds until it is granted an address: dropping it
/// frees its places and its source's slot.
#[derive(Debug)]
pub struct Pending {
    _held: Held,
    source: SourceGuard,
    recent: Arc<Mutex<RecentSources>>,
}

impl Pending {
    /// Frees what it held, at its grant at `now`; a source that proved a
    /// key (TLS) is remembered for the reserve. An original-protocol grant
    /// proves nothing, and earns nothing.
    pub fn granted(self, protocol: crate::session::Protocol, now: Instant) {
        if protocol == crate::session::Protocol::Tls {
            lock(&self.recent).granted(self.source.key, now);
        }
    }

    /// Whether it holds a place of the reserve.
    #[cfg(test)]
    fn reserved(&self) -> bool {
        matches!(self._held, Held::Reserve { .. })
    }
}

fn lock(recent: &Mutex<RecentSources>) -> std::sync::MutexGuard<'_, RecentSources> {
    // Every change leaves the two maps in step: a poisoned lock is consistent.
    recent.lock().unwrap_or_else(|e| e.into_inner())
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        Admission {
            global: Arc::new(Semaphore::new(limits.max_unauthenticated)),
            reserve: Arc::new(Semaphore::new(limits.reserve)),
            sources: Slots::new(limits.per_source),
            networks: Slots::new(limits.per_network),
            legacy: Slots::new(limits.legacy_per_source),
            recent: Arc::new(Mutex::new(RecentSources::new(RECENT_SOURCES))),
        }
    }

    /// Lets a new connection from `ip` wait for its handshake, or says why
    /// not (the server takes its place first: [`Admission::place`]).
    #[cfg(test)]
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<Pending, RefusalReason> {
        let place = self.global.clone().try_acquire_owned().ok().map(Place);
        self.admit_placed(place, ip, now)
    }

    /// A global place, at once or within `wait` (none if it stays full):
    /// taken before `accept`, so that while every place is held a new
    /// connection waits in the kernel's listen queue instead of being
    /// accepted and closed. A burst (every client reconnecting after a
    /// restart) frees places at the handshake rate, and is served in turn
    /// rather than sent into its backoff.
    pub async fn place(&self, wait: Duration) -> Option<Place> {
        if let Ok(place) = self.global.clone().try_acquire_owned() {
            return Some(Place(place));
        }
        if wait.is_zero() {
            return None;
        }
        match tokio::time::timeout(wait, self.global.clone().acquire_owned()).await {
            Ok(Ok(place)) => Some(Place(place)),
            _ => None,
        }
    }

    /// Lets an accepted connection from `ip` wait for its handshake, or
    /// says why not: with the global `place` it took before `accept` (from
    /// [`Admission::place`]) if its network has room, else (no place, or
    /// its network full) with a place of the reserve if its source was
    /// granted an address recently (at `now`).
    pub fn admit_placed(
        &self,
        place: Option<Place>,
        ip: IpAddr,
        now: Instant,
    ) -> Result<Pending, RefusalReason> {
        let source = self
            .sources
            .try_acquire(ip)
            .ok_or(RefusalReason::PerSource)?;
        let refused = match place {
            Some(Place(place)) => match self.networks.try_acquire(ip) {
                Some(network) => {
                    let held = Held::Global {
                        _place: place,
                        _network: network,
                    };
                    return Ok(self.pending(held, source));
                }
                None => RefusalReason::PerNetwork,
            },
            None => RefusalReason::GlobalCap,
        };
        if !lock(&self.recent).is_recent(source.key, now) {
            return Err(refused);
        }
        let reserve = self
            .reserve
            .clone()
            .try_acquire_owned()
            .map_err(|_| refused)?;
        Ok(self.pending(Held::Reserve { _place: reserve }, source))
    }

    fn pending(&self, held: Held, source: SourceGuard) -> Pending {
        Pending {
            _held: held,
            source,
            recent: self.recent.clone(),
        }
    }

    /// A slot for a granted original-protocol session from `ip`, held for
    /// its whole life.
    pub fn legacy(&self, ip: IpAddr) -> Result<SourceGuard, RefusalReason> {
        self.legacy
            .try_acquire(ip)
            .ok_or(RefusalReason::LegacyPerSource)
    }

    /// Connections waiting now.
    #[cfg(test)]
    pub fn waiting(&self, max_unauthenticated: usize) -> usize {
        max_unauthenticated.saturating_sub(self.global.available_permits())
    }

    #[cfg(test)]
    pub fn sources(&self) -> &Slots<Source> {
        &self.sources
    }
}

/// What the caller should log for a refusal just recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    /// The first refusal for its reason since a quiet spell: log it in
    /// full (it is not counted in the summary).
    pub full_line: bool,
    /// The summary line of the interval that just ended, now due.
    pub summary: Option<Summary>,
}

/// The refusals of one interval, for one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// How long the interval lasted.
    pub elapsed: Duration,
    pub total: u64,
    /// Counts by reason, in the reasons' order.
    pub by_reason: Vec<(RefusalReason, u64)>,
    /// The most refused sources, most first (ties by source).
    pub top: Vec<(Source, u64)>,
    /// Distinct sources (at most the number counted per interval).
    pub sources: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refused {} connections in the last {}s from {} sources:",
            self.total,
            self.elapsed.as_secs().max(1),
            self.sources
        )?;
        for (reason, count) in &self.by_reason {
            write!(f, " {reason}={count}")?;
        }
        f.write_str("; top sources:")?;
        for (source, count) in &self.top {
            write!(f, " {source} ({count})")?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Window {
    start: Instant,
    total: u64,
    by_reason: BTreeMap<RefusalReason, u64>,
    sources: HashMap<Source, u64>,
}

impl Window {
    fn new(start: Instant) -> Window {
        Window {
            start,
            total: 0,
            by_reason: BTreeMap::new(),
            sources: HashMap::new(),
        }
    }

    fn count(&mut self, reason: RefusalReason, source: Source) {
        self.total += 1;
        *self.by_reason.entry(reason).or_insert(0) += 1;
        if self.sources.len() < SUMMARY_MAX_SOURCES || self.sources.contains_key(&source) {
            *self.sources.entry(source).or_insert(0) += 1;
        }
    }

    fn summary(&self, now: Instant) -> Summary {
        let mut top: Vec<(Source, u64)> = self.sources.iter().map(|(s, n)| (*s, *n)).collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        top.truncate(SUMMARY_TOP_SOURCES);
        Summary {
            elapsed: now.saturating_duration_since(self.start),
            total: self.total,
            by_reason: self.by_reason.iter().map(|(r, n)| (*r, *n)).collect(),
            top,
            sources: self.sources.len(),
        }
    }
}

/// Rate-limits the log lines of refusals: the first of each reason after a
/// quiet spell in full, then at most one summary per interval while they
/// go on. A quiet spell is an interval without a refusal.
#[derive(Debug)]
pub struct RefusalSummary {
    interval: Duration,
    /// Open since the first refusal after a quiet spell, or the last summary.
    window: Option<Window>,
    /// The reasons logged in full since the quiet spell.
    logged: BTreeSet<RefusalReason>,
}

impl RefusalSummary {
    pub fn new(interval: Duration) -> RefusalSummary {
        RefusalSummary {
            interval,
            window: None,
            logged: BTreeSet::new(),
        }
    }

    /// Records a refusal of a connection from `source` at `now`, and says
    /// what to log.
    pub fn record(&mut self, reason: RefusalReason, source: IpAddr, now: Instant) -> Emit {
        let summary = self.flush(now);
        let window = self.window.get_or_insert_with(|| Window::new(now));
        let full_line = self.logged.insert(reason);
        if !full_line {
            window.count(reason, Source::from(source));
        }
        Emit { full_line, summary }
    }

    /// The summary of the interval if it has ended with refusals counted
    /// (call it now and then, so the last interval of a flood is logged
    /// too). An interval that ended without any is a quiet spell: the next
    /// refusal of each reason is logged in full again.
    pub fn flush(&mut self, now: Instant) -> Option<Summary> {
        let window = self.window.as_ref()?;
        if now.saturating_duration_since(window.start) < self.interval {
            return None;
        }
        if window.total == 0 {
            self.window = None;
            self.logged.clear();
            return None;
        }
        let summary = window.summary(now);
        self.window = Some(Window::new(now));
        Some(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Limits with no per-network limit of note and no reserve.
    fn limits(max_unauthenticated: usize, per_source: usize) -> Limits {
        Limits {
            max_unauthenticated,
            per_source,
            per_network: max_unauthenticated,
            reserve: 0,
            legacy_per_source: 1,
        }
    }

    #[tokio::test]
    async fn a_place_is_waited_for_until_one_frees_or_the_wait_ends() {
        let admission = Admission::new(limits(1, 1));
        let ip: IpAddr = "198.18.0.1".parse().expect("ip");
        let first = admission.place(Duration::ZERO).await.expect("free");
        let first = admission
            .admit_placed(Some(first), ip, Instant::now())
            .expect("admitted");
        // Full: no place at once, none within a short wait.
        assert!(admission.place(Duration::ZERO).await.is_none());
        assert!(admission.place(Duration::from_millis(20)).await.is_none());
        // A place freed while waiting is taken.
        let waiter = admission.clone();
        let waiting =
            tokio::spawn(async move { waiter.place(Duration::from_secs(5)).await.is_some() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        assert!(waiting.await.expect("joins"));
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, 1, last))
    }

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let a: IpAddr = "2001:2::1".parse().expect("ip");
        let b: IpAddr = "2001:2::ffff:1".parse().expect("ip");
        let c: IpAddr = "2001:2:0:1::1".parse().expect("ip");
        let mapped: IpAddr = "::ffff:198.18.1.1".parse().expect("ip");
        assert_eq!(Source::from(a), Source::from(b));
        assert_ne!(Source::from(a), Source::from(c));
        assert_eq!(Source::from(mapped), Source::from(v4(1)));
        assert_ne!(Source::from(v4(1)), Source::from(v4(2)));
        assert_eq!(Source::from(a).to_string(), "2001:2::/64");
        assert_eq!(Source::from(v4(1)).to_string(), "198.18.1.1");
    }

    #[test]
    fn each_source_holds_at_most_its_share_until_its_guards_drop() {
        let limits = SourceLimits::new(2);
        let one = limits.try_acquire(v4(1)).expect("first");
        let two = limits.try_acquire(v4(1)).expect("second");
        assert!(limits.try_acquire(v4(1)).is_none());
        let other = limits.try_acquire(v4(2)).expect("another source");
        // The same /64 is one source.
        let v6a = limits.try_acquire("2001:2::1".parse().expect("ip"));
        let v6b = limits.try_acquire("2001:2::2".parse().expect("ip"));
        assert!(v6a.is_some() && v6b.is_some());
        assert!(limits
            .try_acquire("2001:2::3".parse().expect("ip"))
            .is_none());
        assert_eq!(limits.held(v4(1)), 2);
        drop(one);
        assert_eq!(limits.held(v4(1)), 1);
        let three = limits.try_acquire(v4(1)).expect("a slot again");
        drop((two, three, other, v6a, v6b));
        assert_eq!(limits.sources(), 0, "no entry outlives its guards");
    }

    #[test]
    fn the_global_cap_binds_before_the_per_source_one() {
        let admission = Admission::new(limits(3, 2));
        let now = Instant::now();
        let a1 = admission.admit(v4(1), now).expect("a1");
        let _a2 = admission.admit(v4(1), now).expect("a2");
        assert_eq!(
            admission.admit(v4(1), now).map(|_| ()),
            Err(RefusalReason::PerSource)
        );
        let _b1 = admission.admit(v4(2), now).expect("b1");
        assert_eq!(
            admission.admit(v4(3), now).map(|_| ()),
            Err(RefusalReason::GlobalCap)
        );
        assert_eq!(admission.waiting(3), 3);
        drop(a1);
        assert!(
            admission.admit(v4(3), now).is_ok(),
            "a freed permit is reused"
        );
        assert_eq!(admission.sources().held(v4(3)), 0, "dropped at once");
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn a_network_is_an_ipv4_slash_24_or_an_ipv6_slash_48() {
        assert_eq!(Network::from(v4(1)), Network::from(v4(250)));
        assert_ne!(
            Network::from(v4(1)),
            Network::from(ip("198.18.2.1")),
            "another /24"
        );
        assert_eq!(
            Network::from(ip("2001:2::1")),
            Network::from(ip("2001:2:0:ffff::1"))
        );
        assert_ne!(
            Network::from(ip("2001:2::1")),
            Network::from(ip("2001:2:1::1"))
        );
        assert_eq!(Network::from(ip("::ffff:198.18.1.9")), Network::from(v4(1)));
        assert_eq!(Network::from(v4(7)).to_string(), "198.18.1.0/24");
        assert_eq!(Network::from(ip("2001:2::1")).to_string(), "2001:2::/48");
    }

    #[test]
    fn the_per_network_limit_binds_for_an_ipv4_slash_24_and_an_ipv6_slash_48() {
        let admission = Admission::new(Limits {
            per_network: 3,
            ..limits(100, 2)
        });
        let now = Instant::now();
        // Three addresses of one /24 fill it; a fourth address is refused.
        let held: Vec<Pending> = (1..=3)
            .map(|i| admission.admit(v4(i), now).expect("within the /24"))
            .collect();
        assert_eq!(
            admission.admit(v4(4), now).map(|_| ()),
            Err(RefusalReason::PerNetwork)
        );
        // Another /24 still gets in.
        let other = admission.admit(ip("198.18.2.1"), now).expect("another /24");
        // The same for the /64s of one IPv6 /48.
        let six: Vec<Pending> = ["2001:2:0:1::1", "2001:2:0:2::1", "2001:2:0:3::1"]
            .iter()
            .map(|a| admission.admit(ip(a), now).expect("within the /48"))
            .collect();
        assert_eq!(
            admission.admit(ip("2001:2:0:4::1"), now).map(|_| ()),
            Err(RefusalReason::PerNetwork)
        );
        let _another48 = admission
            .admit(ip("2001:2:1::1"), now)
            .expect("another /48");
        // A refused connection gave its global place back.
        assert_eq!(admission.waiting(100), 3 + 1 + 3 + 1);
        drop(held);
        assert!(admission.admit(v4(4), now).is_ok(), "freed on drop");
        drop((other, six));
    }

    #[test]
    fn the_reserve_admits_a_recent_source_within_its_size_only() {
        let admission = Admission::new(Limits {
            per_network: 2,
            reserve: 2,
            ..limits(4, 1)
        });
        let t0 = Instant::now();
        // 198.18.1.1 and 2001:2::1 were granted after a TLS handshake; an
        // original-protocol grant earns nothing.
        let known = admission.admit(v4(1), t0).expect("known");
        known.granted(crate::session::Protocol::Tls, t0);
        let known6 = admission.admit(ip("2001:2::1"), t0).expect("known6");
        known6.granted(crate::session::Protocol::Tls, t0);
        let legacy = admission.admit(v4(9), t0).expect("legacy");
        legacy.granted(crate::session::Protocol::Original, t0);
        let now = t0 + Duration::from_secs(3600);
        // Strangers fill 198.18.1.0/24 ...
        let strangers: Vec<Pending> = (2..=3)
            .map(|i| admission.admit(v4(i), now).expect("stranger"))
            .collect();
        assert_eq!(
            admission.admit(v4(4), now).map(|_| ()),
            Err(RefusalReason::PerNetwork)
        );
        // The recent source gets in by the reserve, its /24 being full.
        let early = admission.admit(v4(1), now).expect("recent, its /24 full");
        assert!(early.reserved());
        drop(early);
        // ... and then the global places.
        let more: Vec<Pending> = (1..=2)
            .map(|i| {
                admission
                    .admit(ip(&format!("198.18.{}.1", i + 4)), now)
                    .expect("stranger")
            })
            .collect();
        assert_eq!(
            admission.admit(ip("198.18.9.1"), now).map(|_| ()),
            Err(RefusalReason::GlobalCap)
        );
        // The recent source still gets in, by the reserve.
        let back = admission.admit(v4(1), now).expect("recent, by the reserve");
        assert!(back.reserved());
        // Its per-source limit still holds.
        assert_eq!(
            admission.admit(v4(1), now).map(|_| ()),
            Err(RefusalReason::PerSource)
        );
        assert_eq!(
            admission.admit(v4(9), now).map(|_| ()),
            Err(RefusalReason::GlobalCap),
            "an original-protocol grant does not count"
        );
        let back6 = admission.admit(ip("2001:2::2"), now).expect("its /64");
        assert!(back6.reserved());
        // The reserve is full: no third one.
        let known3 = Source::from(ip("2001:2:5::1"));
        lock(&admission.recent).granted(known3, now);
        assert_eq!(
            admission.admit(ip("2001:2:5::1"), now).map(|_| ()),
            Err(RefusalReason::GlobalCap)
        );
        drop(back);
        assert!(admission.admit(ip("2001:2:5::1"), now).is_ok());
        // A day after its grant a source is a stranger again.
        drop(back6);
        let later = t0 + RECENT_FOR;
        assert_eq!(
            admission.admit(ip("2001:2::3"), later).map(|_| ()),
            Err(RefusalReason::GlobalCap)
        );
        drop((strangers, more));
    }

    #[test]
    fn recent_sources_are_bounded_and_the_oldest_grant_goes_first() {
        let mut recent = RecentSources::new(3);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        for i in 1..=3u8 {
            recent.granted(Source::from(v4(i)), at(u64::from(i)));
        }
        // 1 is granted again: 2 is now the oldest.
        recent.granted(Source::from(v4(1)), at(4));
        recent.granted(Source::from(v4(4)), at(5));
        assert_eq!(recent.len(), 3);
        assert!(!recent.is_recent(Source::from(v4(2)), at(5)));
        for i in [1, 3, 4] {
            assert!(recent.is_recent(Source::from(v4(i)), at(5)), "{i}");
        }
        for i in 0..10_000u32 {
            let source = Source::from(IpAddr::V4(Ipv4Addr::from(0xC612_0000 + i)));
            recent.granted(source, at(10));
        }
        assert_eq!(recent.len(), 3, "never more than its capacity");
        assert_eq!(recent.by_time.len(), 3);
        // Expired entries go at the next grant.
        recent.granted(Source::from(v4(5)), at(10) + RECENT_FOR);
        assert_eq!(recent.len(), 1);
        assert!(!recent.is_empty());
    }

    #[test]
    fn legacy_sessions_are_counted_per_source_until_they_end() {
        let admission = Admission::new(Limits {
            legacy_per_source: 2,
            ..limits(10, 10)
        });
        let one = admission.legacy(v4(1)).expect("one");
        let two = admission.legacy(v4(1)).expect("two");
        assert_eq!(
            admission.legacy(v4(1)).map(|_| ()),
            Err(RefusalReason::LegacyPerSource)
        );
        // The same IPv6 /64 is one source.
        let _a = admission.legacy(ip("2001:2::1")).expect("a");
        let _b = admission.legacy(ip("2001:2::2")).expect("b");
        assert!(admission.legacy(ip("2001:2::3")).is_err());
        let _other = admission.legacy(v4(2)).expect("another source");
        drop(one);
        let three = admission.legacy(v4(1)).expect("freed when a session ends");
        drop((two, three));
        assert_eq!(admission.legacy.held(v4(1)), 0);
    }

    fn line() -> Emit {
        Emit {
            full_line: true,
            summary: None,
        }
    }

    fn nothing() -> Emit {
        Emit {
            full_line: false,
            summary: None,
        }
    }

    #[test]
    fn the_first_refusal_of_each_reason_is_a_line_then_one_summary_per_interval() {
        let t0 = Instant::now();
        let mut summary = RefusalSummary::new(Duration::from_secs(10));
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(
            summary.record(RefusalReason::Handshake, v4(9), at(0)),
            line()
        );
        // 300 refusals from 300 sources within the interval: the first of
        // each reason in full, the rest counted.
        for i in 0..300u64 {
            let source = IpAddr::V4(Ipv4Addr::from(0xC612_0100 + i as u32));
            let reason = match i % 3 {
                0 => RefusalReason::GlobalCap,
                _ => RefusalReason::PerSource,
            };
            let expected = match i {
                0 | 1 => line(),
                _ => nothing(),
            };
            assert_eq!(summary.record(reason, source, at(100 + i)), expected, "{i}");
        }
        // Ten more from one source, the most refused.
        for i in 0..10 {
            assert_eq!(
                summary.record(RefusalReason::PerSource, v4(7), at(500 + i)),
                nothing()
            );
        }
        assert_eq!(summary.flush(at(9_999)), None, "not before the interval");
        let due = summary.record(RefusalReason::GlobalCap, v4(8), at(10_000));
        assert!(!due.full_line);
        let due = due.summary.expect("a summary is due");
        assert_eq!(due.total, 308);
        assert_eq!(
            due.by_reason,
            vec![
                (RefusalReason::GlobalCap, 99),
                (RefusalReason::PerSource, 209)
            ]
        );
        assert_eq!(due.top.len(), SUMMARY_TOP_SOURCES);
        assert_eq!(due.top[0], (Source::from(v4(7)), 11));
        assert_eq!(due.sources, 298);
        let text = due.to_string();
        assert!(
            text.starts_with(
                "refused 308 connections in the last 10s from 298 sources: \
                 global_cap=99 per_source_cap=209; top sources: 198.18.1.7 (11)"
            ),
            "{text}"
        );
        // The refusal that was due went into the next interval, flushed by
        // the timer when nothing else comes.
        let next = summary.flush(at(20_000)).expect("the next summary");
        assert_eq!(next.total, 1);
        assert_eq!(next.by_reason, vec![(RefusalReason::GlobalCap, 1)]);
        // A quiet interval: the next of each reason is a full line again.
        assert_eq!(summary.flush(at(30_000)), None);
        assert_eq!(
            summary.record(RefusalReason::GlobalCap, v4(1), at(30_001)),
            line()
        );
    }

    #[test]
    fn a_lone_refusal_after_a_quiet_interval_is_a_full_line() {
        let t0 = Instant::now();
        let mut summary = RefusalSummary::new(Duration::from_secs(10));
        assert_eq!(summary.record(RefusalReason::Handshake, v4(1), t0), line());
        // Nothing counted in that interval: no summary, the next is a line.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(
            summary.record(RefusalReason::Handshake, v4(1), later),
            line()
        );
    }

    #[test]
    fn the_sources_of_a_summary_are_bounded() {
        let t0 = Instant::now();
        let mut summary = RefusalSummary::new(Duration::from_secs(10));
        summary.record(RefusalReason::GlobalCap, v4(1), t0);
        for i in 1..=(SUMMARY_MAX_SOURCES as u32 + 100) {
            let source = IpAddr::V4(Ipv4Addr::from(0xC612_0000 + i));
            summary.record(RefusalReason::GlobalCap, source, t0);
        }
        let line = summary
            .flush(t0 + Duration::from_secs(10))
            .expect("a summary");
        assert_eq!(line.total, SUMMARY_MAX_SOURCES as u64 + 100);
        assert_eq!(line.sources, SUMMARY_MAX_SOURCES);
    }
}
