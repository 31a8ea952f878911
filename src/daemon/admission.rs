//! Admission before authentication: what a connection that has not proved
//! anything yet may hold, and how its refusals are logged.
//!
//! - A connection holds one of `max_unauthenticated` global permits and one
//!   of `max_unauthenticated_per_source` per-source slots (a source is an
//!   IPv4 address, or an IPv6 /64: one host usually holds a whole /64) from
//!   accept until it is granted an address; both are released by dropping
//!   the [`Pending`] guard.
//! - Refusals before authentication are counted, not logged one by one: the
//!   first one of each reason after a quiet spell is logged in full (so a
//!   single unknown key shows up at once), the rest go into a summary line
//!   per interval with the counts by [`RefusalReason`] and the top sources
//!   ([`RefusalSummary`]).
//!
//! No I/O here: the time comes in as an argument, so it is unit-tested.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
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

/// Why a connection was refused before it was authenticated (a closed set:
/// each is one counter of the summary line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalReason {
    /// `max_unauthenticated` connections were already waiting.
    GlobalCap,
    /// Its source already held `max_unauthenticated_per_source` of them.
    PerSource,
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
}

impl RefusalReason {
    /// The reason's name in summary lines.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::GlobalCap => "global_cap",
            RefusalReason::PerSource => "per_source_cap",
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

/// The per-source counts of unauthenticated connections.
#[derive(Debug)]
pub struct SourceLimits {
    per_source: usize,
    counts: Mutex<HashMap<Source, usize>>,
}

/// One unauthenticated connection of a source; its slot is freed on drop.
#[derive(Debug)]
pub struct SourceGuard {
    limits: Arc<SourceLimits>,
    source: Source,
}

impl SourceLimits {
    pub fn new(per_source: usize) -> Arc<SourceLimits> {
        Arc::new(SourceLimits {
            per_source,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or None if its source holds all
    /// of its slots.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<SourceGuard> {
        let source = Source::from(ip);
        let mut counts = self.lock();
        let count = counts.entry(source).or_insert(0);
        if *count >= self.per_source {
            return None;
        }
        *count += 1;
        Some(SourceGuard {
            limits: self.clone(),
            source,
        })
    }

    /// How many slots `ip`'s source holds.
    #[cfg(test)]
    pub fn held(&self, ip: IpAddr) -> usize {
        self.lock().get(&Source::from(ip)).copied().unwrap_or(0)
    }

    /// How many sources hold a slot.
    #[cfg(test)]
    pub fn sources(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Source, usize>> {
        // Every change is one map operation: a poisoned lock is consistent.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut counts = self.limits.lock();
        if let Some(count) = counts.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

/// The global and per-source limits on connections not yet granted an
/// address.
#[derive(Debug, Clone)]
pub struct Admission {
    global: Arc<Semaphore>,
    sources: Arc<SourceLimits>,
}

/// One of the `max_unauthenticated` global places, held before a
/// connection is accepted.
#[derive(Debug)]
pub struct Place(OwnedSemaphorePermit);

/// What a connection holds until it is granted an address: dropping it
/// frees its global permit and its source's slot.
#[derive(Debug)]
pub struct Pending {
    _global: OwnedSemaphorePermit,
    _source: SourceGuard,
}

impl Admission {
    pub fn new(max_unauthenticated: usize, per_source: usize) -> Admission {
        Admission {
            global: Arc::new(Semaphore::new(max_unauthenticated)),
            sources: SourceLimits::new(per_source),
        }
    }

    /// Lets a new connection from `ip` wait for its handshake, or says why
    /// not (the server takes its place first: [`Admission::place`]).
    #[cfg(test)]
    pub fn admit(&self, ip: IpAddr) -> Result<Pending, RefusalReason> {
        let global = self
            .global
            .clone()
            .try_acquire_owned()
            .map_err(|_| RefusalReason::GlobalCap)?;
        self.admit_with(global, ip)
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

    /// [`Admission::admit`] for a connection that already holds a global
    /// `place` (from [`Admission::place`]).
    pub fn admit_placed(&self, place: Place, ip: IpAddr) -> Result<Pending, RefusalReason> {
        self.admit_with(place.0, ip)
    }

    fn admit_with(
        &self,
        global: OwnedSemaphorePermit,
        ip: IpAddr,
    ) -> Result<Pending, RefusalReason> {
        let source = self
            .sources
            .try_acquire(ip)
            .ok_or(RefusalReason::PerSource)?;
        Ok(Pending {
            _global: global,
            _source: source,
        })
    }

    /// Connections waiting now.
    #[cfg(test)]
    pub fn waiting(&self, max_unauthenticated: usize) -> usize {
        max_unauthenticated.saturating_sub(self.global.available_permits())
    }

    #[cfg(test)]
    pub fn sources(&self) -> &SourceLimits {
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

    #[tokio::test]
    async fn a_place_is_waited_for_until_one_frees_or_the_wait_ends() {
        let admission = Admission::new(1, 1);
        let ip: IpAddr = "198.18.0.1".parse().expect("ip");
        let first = admission.place(Duration::ZERO).await.expect("free");
        let first = admission.admit_placed(first, ip).expect("admitted");
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
        let admission = Admission::new(3, 2);
        let a1 = admission.admit(v4(1)).expect("a1");
        let _a2 = admission.admit(v4(1)).expect("a2");
        assert_eq!(
            admission.admit(v4(1)).map(|_| ()),
            Err(RefusalReason::PerSource)
        );
        let _b1 = admission.admit(v4(2)).expect("b1");
        assert_eq!(
            admission.admit(v4(3)).map(|_| ()),
            Err(RefusalReason::GlobalCap)
        );
        assert_eq!(admission.waiting(3), 3);
        drop(a1);
        assert!(admission.admit(v4(3)).is_ok(), "a freed permit is reused");
        assert_eq!(admission.sources().held(v4(3)), 0, "dropped at once");
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
