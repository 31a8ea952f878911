//! Several servers, one network: the state they share lives in etcd.
//!
//! Keys, under `/simplevpn/<network>/` (the network as `198.19.0.0_16`):
//!
//! ```text
//! members/<node>        {"node":..,"advertise":..,"key":..,"network6":..}  under the server's etcd lease
//! leases/<address>      "<node> key:<base64>" | "<node> remote:<ip>"  under the holder's lease
//!                       (an IPv4 address, or an IPv6 one of `network6`)
//! bans/<key:..|remote:..>  "<Unix time the ban ends> <reason>" (older servers wrote
//!                       the time alone: no reason); under a lease of the ban's length
//! peers/<base64 key>    a peer added live: {"key":..,"name":..,"address":..,"routes":[..]}
//! invites/<hash>        an invitation (svpnctl invite): {"name":..,"address":..,"created":..,"expires":..,"state":..}
//! ```
//!
//! Each value is wrapped in an envelope signed by the server that wrote it
//! ([`signed`]); a record not signed by a member pinned in the server's own
//! `[[cluster.member]]` (or, for `members/` and `leases/`, signed by
//! another member than the one it names) is ignored and counted. So etcd
//! is storage, not authority: a member's key is in its configuration, never
//! taken from etcd.
//!
//! Each server holds one etcd lease of `lease_ttl` and renews it every
//! third of that ([`Cluster::maintain`]). While etcd cannot be reached the
//! server is *degraded*: its sessions and forwarding go on, new grants are
//! refused (with the reason logged), since an address granted without etcd
//! could be granted twice. When etcd answers again the server re-asserts
//! every address it holds (a new lease if the old one ran out); an address
//! that another server took meanwhile is closed here.
//!
//! A server that has not renewed its lease for `lease_ttl` is *fenced*:
//! etcd may have let the lease run out and freed its addresses, so another
//! server could grant them. It closes its clients' sessions at once (they
//! fail over to a server that reaches etcd, keeping their addresses) and
//! grants nothing until etcd answers again. The time counts from when the
//! last successful renewal was sent, before etcd received it, so the
//! server is fenced no later than etcd frees its addresses.

pub mod config;
pub mod etcd;
pub mod holders;
pub mod invites;
pub mod leases;
pub mod membership;
pub mod peers;
pub mod signed;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::config::{ClusterConfig, EtcdTransport};
use self::etcd::{Change, Etcd, EtcdError};
use self::holders::Holders;
use self::leases::{ClaimError, Claimant, Family, Holder, Leases, Wanted};
use self::membership::Member;
use self::signed::{Records, RefusedCounts};
use crate::config::PeerSection;
use crate::keys::{NodeKey, PublicKey};
use crate::state::{Ban, Banned};

/// The longest TTL etcd grants a lease (etcd's `MaxLeaseTTL`): a longer
/// ban is written under a lease of this length (and read back as written).
const MAX_ETCD_LEASE_TTL: Duration = Duration::from_secs(9_000_000_000);

/// What the cluster tells the server it runs in.
pub trait ClusterHooks: Send + Sync {
    /// Another server now holds `address`, which a client of this one
    /// held: close that connection here.
    fn lost(&self, address: IpAddr, holder: &Holder);
    /// A ban made on any server.
    fn banned(&self, ban: Ban);
    /// A ban lifted (or ended) on any server.
    fn unbanned(&self, who: Banned);
    /// The peers added live changed (on any server): these are all of them.
    fn peers(&self, peers: Vec<PeerSection>);
    /// This server is fenced (its etcd lease not renewed for `lease_ttl`):
    /// close every client's session here.
    fn fenced(&self);
}

/// A change this server makes to the shared state, written by `maintain`.
enum Write {
    Ban(Ban),
    Unban(Banned),
    Peer(PeerSection),
    RemovePeer(PublicKey),
}

/// Whether etcd answers, as the server last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Reachable,
    /// New grants are refused until etcd answers again.
    Degraded,
    /// The lease was not renewed for `lease_ttl`: the clients' sessions
    /// were closed, and nothing is granted until etcd answers again.
    Fenced,
}

/// This server's membership in the cluster and its view of the shared state.
pub struct Cluster {
    config: ClusterConfig,
    etcd: Etcd,
    prefix: String,
    /// This server's `network6`, which every member must share.
    network6: Option<Ipv6Net>,
    leases: Leases,
    /// This server's etcd lease; 0 while it has none.
    lease: AtomicI64,
    /// The etcd revision the state below was last read afresh at: the
    /// watch goes on from the revision after it, so that no change made
    /// between the read and the watch is missed.
    loaded: AtomicI64,
    reachable: AtomicBool,
    /// Set when the lease went unrenewed for `lease_ttl`; cleared when etcd
    /// answers again.
    fenced: AtomicBool,
    /// When the last successful renewal (or the lease's grant) was sent.
    renewed: Mutex<tokio::time::Instant>,
    /// The addresses this server's clients hold: re-asserted when etcd
    /// comes back.
    held: Mutex<HashMap<IpAddr, Claimant>>,
    /// This server's key and the pinned members': what it signs its
    /// records with and checks the others' against.
    records: Arc<Records>,
    /// Which server holds each address for whom, and the members by name
    /// (the watch keeps both current): where packets for other servers'
    /// clients go, and which addresses a grant need not try.
    holders: RwLock<Holders>,
    members: RwLock<HashMap<String, Arc<Member>>>,
    /// Bans seen in the cluster (the watch keeps it current).
    bans: Mutex<HashMap<Banned, (SystemTime, String)>>,
    /// The peers added live, by key (the watch keeps it current).
    live: Mutex<std::collections::BTreeMap<String, PeerSection>>,
    /// This server's changes, for `maintain` to write.
    writes: mpsc::UnboundedSender<Write>,
    pending: Mutex<Option<mpsc::UnboundedReceiver<Write>>>,
}

/// How long after a watch ends (etcd unreachable, say) it is made again.
const WATCH_RETRY: Duration = Duration::from_secs(1);
/// Why a fenced server grants nothing.
const FENCED: &str = "this server is fenced: its lease was not renewed for lease_ttl";
/// How often a fenced server looks whether a renewal ended it.
const FENCE_POLL: Duration = Duration::from_millis(200);

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn banned_text(who: &Banned) -> String {
    match who {
        Banned::Key(key) => format!("key:{key}"),
        Banned::Remote(ip) => format!("remote:{ip}"),
    }
}

fn banned_parse(text: &str) -> Option<Banned> {
    match text.parse().ok()? {
        Claimant::Key(key) => Some(Banned::Key(key)),
        Claimant::Remote(ip) => Some(Banned::Remote(ip)),
    }
}

/// The value of a `bans/` record: the end of the ban (Unix seconds), a
/// space and the reason.
fn ban_value(until: SystemTime, reason: &str) -> String {
    format!("{} {reason}", unix_secs(until))
}

/// The end of a ban and its reason as a `bans/` record holds them
/// ([`ban_value`]); a record of an older server holds the time alone (no
/// reason). Any number, however large, is a time (at most
/// [`crate::wallclock::far_future`]).
fn ban_parse(value: &[u8]) -> Option<(SystemTime, String)> {
    let text = std::str::from_utf8(value).ok()?.trim_start();
    let (secs, reason) = text.split_once(' ').unwrap_or((text, ""));
    let secs: u64 = secs.trim_end().parse().ok()?;
    Some((
        crate::wallclock::from_unix_secs(secs),
        reason.trim().to_string(),
    ))
}

impl Cluster {
    /// Joins the cluster: connects to etcd, takes a lease, registers this
    /// server, and reads the bans. Fails if etcd does not answer: a
    /// cluster server does not start without it (systemd starts it again).
    /// Every server of a cluster has the same `network` (it names the
    /// keys) and the same `network6`.
    pub async fn join(
        config: ClusterConfig,
        network: Ipv4Net,
        network6: Option<Ipv6Net>,
        key: Arc<NodeKey>,
    ) -> Result<Arc<Cluster>, EtcdError> {
        if config.transport == EtcdTransport::Insecure {
            warn!(etcd = ?config.etcd, "etcd_insecure: the cluster's state goes to etcd in clear text over http://, and etcd is not authenticated");
        }
        let etcd = Etcd::connect(&config)?;
        let prefix = format!("/simplevpn/{}_{}/", network.network(), network.prefix_len());
        let records = Arc::new(Records::new(&config.node, key, config.members.clone()));
        let leases = Leases::new(etcd.clone(), &prefix, records.clone(), network, network6);
        let (writes, pending) = mpsc::unbounded_channel();
        let cluster = Arc::new(Cluster {
            etcd,
            leases,
            prefix,
            network6,
            lease: AtomicI64::new(0),
            loaded: AtomicI64::new(0),
            reachable: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            renewed: Mutex::new(tokio::time::Instant::now()),
            held: Mutex::new(HashMap::new()),
            records,
            bans: Mutex::new(HashMap::new()),
            holders: RwLock::new(Holders::default()),
            members: RwLock::new(HashMap::new()),
            live: Mutex::new(Default::default()),
            writes,
            pending: Mutex::new(Some(pending)),
            config,
        });
        cluster.register().await?;
        cluster.load().await.map(drop)?;
        cluster.reachable.store(true, Ordering::Relaxed);
        Ok(cluster)
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub fn health(&self) -> Health {
        if self.fenced.load(Ordering::Relaxed) {
            return Health::Fenced;
        }
        match self.reachable.load(Ordering::Relaxed) {
            true => Health::Reachable,
            false => Health::Degraded,
        }
    }

    /// The lease was renewed by a call sent at `sent`.
    fn renewed_at(&self, sent: tokio::time::Instant) {
        let mut renewed = self.renewed.lock().unwrap_or_else(|e| e.into_inner());
        *renewed = (*renewed).max(sent);
    }

    /// When this server is fenced unless its lease is renewed before.
    fn fence_at(&self) -> tokio::time::Instant {
        *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) + self.config.lease_ttl
    }

    /// A new etcd lease, with this server's membership under it.
    async fn register(&self) -> Result<(), EtcdError> {
        let sent = tokio::time::Instant::now();
        let lease = self.etcd.grant(self.config.lease_ttl).await?;
        let own = self.config.members.get(&self.config.node);
        let member = Member {
            node: self.config.node.clone(),
            advertise: self.config.advertise,
            key: own.map(ToString::to_string),
            network6: self.network6,
        };
        let at = member.etcd_key(&self.prefix);
        self.etcd
            .put(&at, self.records.seal(&at, &member.encode()), lease)
            .await?;
        self.lease.store(lease, Ordering::Relaxed);
        self.renewed_at(sent);
        info!(node = %self.config.node, lease, ttl = self.config.lease_ttl.as_secs(), "joined the cluster");
        Ok(())
    }

    /// Reads the bans, the address holders, the members and the live
    /// peers afresh; returns etcd's revision from before the reads (every
    /// read is at least that new; a watch from the revision after it
    /// replays anything newer, which comes to the same state).
    async fn load(&self) -> Result<i64, EtcdError> {
        let revision = self.etcd.revision(&self.prefix).await?;
        self.load_bans().await?;
        let live = peers::list(&self.etcd, &self.prefix, &self.records)
            .await?
            .into_iter()
            .map(|p| (p.key.to_string(), p))
            .collect();
        *self.live.lock().unwrap_or_else(|e| e.into_inner()) = live;
        let holders = Holders::from_all(self.leases.all().await?);
        *self.holders.write().unwrap_or_else(|e| e.into_inner()) = holders;
        let members: HashMap<String, Arc<Member>> = self
            .members()
            .await?
            .into_iter()
            .map(|m| (m.node.clone(), Arc::new(m)))
            .collect();
        members
            .values()
            .filter(|m| m.node != self.config.node)
            .for_each(|m| self.check_network6(m));
        *self.members.write().unwrap_or_else(|e| e.into_inner()) = members;
        self.loaded.store(revision, Ordering::Relaxed);
        Ok(revision)
    }

    /// The other server whose client holds `address`, if one does. Asked
    /// per forwarded packet: a shared handle, no copy.
    pub fn holder(&self, address: IpAddr) -> Option<Arc<Member>> {
        let holders = self.holders.read().unwrap_or_else(|e| e.into_inner());
        let node = holders.node(address)?;
        if node == self.config.node {
            return None;
        }
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .cloned()
    }

    /// Member `node` as last seen (its own signed record).
    pub fn member(&self, node: &str) -> Option<Arc<Member>> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .cloned()
    }

    /// The members as last seen (this one included), by name.
    pub fn known_members(&self) -> Vec<Member> {
        let mut members: Vec<Member> = self
            .members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|m| Member::clone(m))
            .collect();
        members.sort_by(|a, b| a.node.cmp(&b.node));
        members
    }

    /// The members this server's configuration pins, by name, with their
    /// keys: the only servers it trusts, whatever etcd says.
    pub fn pinned(&self) -> &signed::Pinned {
        &self.config.members
    }

    /// The records in etcd refused (not signed by a pinned member), by
    /// reason.
    pub fn refused(&self) -> &RefusedCounts {
        &self.records.refused
    }

    /// Whether member `node` holds `address` for one of its clients (a
    /// signed lease, as this server last saw it).
    pub fn holds(&self, node: &str, address: IpAddr) -> bool {
        self.view().node(address) == Some(node)
    }

    /// Whether member `node` holds an address (of either family) for the
    /// client with `key`.
    pub fn holds_for(&self, node: &str, key: &PublicKey) -> bool {
        let view = self.view();
        [Family::V4, Family::V6].into_iter().any(|family| {
            view.of_key(key, family)
                .is_some_and(|address| view.node(address) == Some(node))
        })
    }

    async fn load_bans(&self) -> Result<(), EtcdError> {
        let dir = format!("{}bans/", self.prefix);
        let mut bans = HashMap::new();
        for kv in self.etcd.prefix(&dir).await? {
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            let Some(opened) = self.records.open(&key, &kv.value) else {
                continue;
            };
            if let Some(ban) = self.ban_of(&key, &opened.value) {
                bans.insert(ban.who, (ban.until, ban.reason));
            }
        }
        *self.bans.lock().unwrap_or_else(|e| e.into_inner()) = bans;
        Ok(())
    }

    /// The ban a verified `bans/` record holds.
    fn ban_of(&self, key: &str, value: &[u8]) -> Option<Ban> {
        let who = banned_parse(key.strip_prefix(&format!("{}bans/", self.prefix))?)?;
        let (until, reason) = ban_parse(value)?;
        Some(Ban { who, until, reason })
    }

    /// The pinned members registered now (their records signed by
    /// themselves).
    pub async fn members(&self) -> Result<Vec<Member>, EtcdError> {
        membership::list(&self.etcd, &self.prefix, &self.records).await
    }

    /// Claims an address for `claimant` (see [`Leases::claim`]); refused at
    /// once while degraded. A TLS key asking for any address gets the one
    /// it holds on any server back, if it still does; free addresses are
    /// proposed by this server's view of the cluster ([`Holders`]) and
    /// `usable`, so a grant reads nothing from etcd.
    pub async fn claim(
        &self,
        claimant: &Claimant,
        wanted: Wanted,
        usable: impl Fn(IpAddr) -> bool,
    ) -> Result<IpAddr, ClaimError> {
        let lease = self.lease.load(Ordering::Relaxed);
        if self.fenced.load(Ordering::SeqCst) {
            return Err(ClaimError::Unreachable(EtcdError::Protocol(FENCED)));
        }
        if !self.reachable.load(Ordering::Relaxed) || lease == 0 {
            return Err(ClaimError::Unreachable(EtcdError::Protocol(
                "not reachable since the last renewal of this server's lease",
            )));
        }
        let wanted = match (wanted, claimant) {
            (Wanted::Any(family), Claimant::Key(key)) => self
                .view()
                .of_key(key, family)
                .map_or(Wanted::Any(family), Wanted::Again),
            // An original-protocol client is known by its remote address
            // only, which several behind one NAT share: each of those gets
            // an address of its own.
            (wanted, _) => wanted,
        };
        let free = |address| !self.view().is_held(address) && usable(address);
        let address = self.leases.claim(claimant, wanted, lease, free).await?;
        self.hold(address, claimant);
        // Fenced while it was claimed: the fence closed the others and
        // would miss this one.
        if self.fenced.load(Ordering::SeqCst) {
            self.release(claimant, address).await;
            return Err(ClaimError::Unreachable(EtcdError::Protocol(FENCED)));
        }
        Ok(address)
    }

    fn view(&self) -> std::sync::RwLockReadGuard<'_, Holders> {
        self.holders.read().unwrap_or_else(|e| e.into_inner())
    }

    fn hold(&self, address: IpAddr, claimant: &Claimant) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(address, claimant.clone());
    }

    /// The client that held `address` here has gone: the address is free
    /// in the cluster. If etcd cannot be reached now, the key stays until
    /// the next reconciliation removes it.
    pub async fn release(&self, claimant: &Claimant, address: IpAddr) {
        let was = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            match held.get(&address) == Some(claimant) {
                true => held.remove(&address),
                false => None,
            }
        };
        if was.is_none() {
            return;
        }
        if let Err(e) = self.leases.release(claimant, address).await {
            warn!(addr = %address, error = %e, "address not released in the cluster yet: it is when etcd answers again");
        }
    }

    /// Renews this server's lease, notices when etcd stops and starts
    /// answering, reconciles, writes queued bans, and applies what the
    /// other servers change, until `shutdown`; then leaves the cluster.
    pub async fn maintain(
        self: Arc<Self>,
        hooks: Arc<dyn ClusterHooks>,
        shutdown: CancellationToken,
    ) {
        let watch = tokio::spawn(self.clone().watch(hooks.clone(), shutdown.clone()));
        let guard = tokio::spawn(self.clone().guard(hooks.clone(), shutdown.clone()));
        let mut writes = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let renew = self.config.lease_ttl / 3;
        let mut next = tokio::time::Instant::now() + renew;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(next) => {}
                Some(write) = async {
                    match writes.as_mut() {
                        Some(w) => w.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match write {
                        Write::Ban(ban) => self.write_ban(&ban).await,
                        Write::Unban(who) => {
                            let key = format!("{}bans/{}", self.prefix, banned_text(&who));
                            if let Err(e) = self.etcd.delete(&key).await {
                                warn!(who = %banned_text(&who), error = %e, "ban lifted here only: the cluster still has it");
                            }
                        }
                        Write::Peer(peer) => {
                            if let Err(e) = peers::put(&self.etcd, &self.prefix, &self.records, &peer).await {
                                warn!(key = %peer.key, error = %e, "peer added here only: not shared with the cluster");
                            }
                        }
                        Write::RemovePeer(key) => {
                            if let Err(e) = peers::remove(&self.etcd, &self.prefix, &key).await {
                                warn!(%key, error = %e, "peer removed here only: the cluster still has it");
                            }
                        }
                    }
                    continue;
                }
            }
            let ok = self.renew(&hooks).await;
            next = tokio::time::Instant::now()
                + match ok {
                    true => renew,
                    false => Duration::from_secs(1),
                };
        }
        watch.abort();
        guard.abort();
        // Leaving: the addresses go at once, not after the TTL.
        let lease = self.lease.load(Ordering::Relaxed);
        if lease != 0 {
            match self.etcd.revoke(lease).await {
                Ok(()) => info!(node = %self.config.node, "left the cluster"),
                Err(e) => {
                    warn!(error = %e, "left the cluster without revoking the lease: its addresses are freed after the TTL")
                }
            }
        }
    }

    /// One renewal; false while etcd does not answer.
    async fn renew(&self, hooks: &Arc<dyn ClusterHooks>) -> bool {
        let lease = self.lease.load(Ordering::Relaxed);
        let sent = tokio::time::Instant::now();
        let renewed = match lease {
            0 => Ok(false),
            lease => self.etcd.keep_alive(lease).await,
        };
        if let Ok(true) = renewed {
            self.renewed_at(sent);
        }
        let result = match renewed {
            Ok(true) => Ok(()),
            Ok(false) => {
                if lease != 0 {
                    warn!(lease, "this server's etcd lease ran out: its addresses were freed; taking a new lease and claiming them again");
                }
                self.lease.store(0, Ordering::Relaxed);
                self.register().await
            }
            Err(e) => Err(e),
        };
        let was = self.reachable.load(Ordering::Relaxed);
        match result {
            Ok(()) => {
                if !was || lease == 0 {
                    self.reconcile(hooks).await;
                }
                if !was {
                    info!("etcd reachable again: new grants are served");
                }
                self.reachable.store(true, Ordering::Relaxed);
                if self.fenced.swap(false, Ordering::Relaxed) {
                    info!(node = %self.config.node, "no longer fenced: this server's lease is renewed again");
                }
                true
            }
            Err(e) => {
                if was {
                    warn!(error = %e, "etcd unreachable: established sessions and forwarding go on; new grants are refused until it answers again");
                }
                self.reachable.store(false, Ordering::Relaxed);
                false
            }
        }
    }

    /// Fences this server when its lease goes unrenewed for `lease_ttl`
    /// (see the module's documentation), until `shutdown`. A timer of its
    /// own: a renewal may hang on an etcd that does not answer.
    async fn guard(self: Arc<Self>, hooks: Arc<dyn ClusterHooks>, shutdown: CancellationToken) {
        loop {
            let at = match self.fenced.load(Ordering::Relaxed) {
                // Until a renewal ends it.
                true => tokio::time::Instant::now() + FENCE_POLL,
                false => self.fence_at(),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(at) => {}
            }
            if !self.fenced.load(Ordering::Relaxed)
                && self.fence_at() <= tokio::time::Instant::now()
            {
                self.fence(&hooks);
            }
        }
    }

    fn fence(&self, hooks: &Arc<dyn ClusterHooks>) {
        self.fenced.store(true, Ordering::SeqCst);
        self.reachable.store(false, Ordering::Relaxed);
        // Closed here, and maybe granted elsewhere: not re-asserted when
        // etcd answers again.
        let held = std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner()));
        warn!(
            node = %self.config.node,
            ttl = self.config.lease_ttl.as_secs(),
            clients = held.len(),
            "fenced: this server's etcd lease was not renewed for lease_ttl, so its addresses may be granted elsewhere; its clients' sessions are closed and nothing is granted until etcd answers again"
        );
        hooks.fenced();
    }

    /// Makes etcd agree with this server: each address its clients hold is
    /// held under its current lease (an address another client took
    /// meanwhile is closed here), and no other address is held by it.
    async fn reconcile(&self, hooks: &Arc<dyn ClusterHooks>) {
        let held: Vec<(IpAddr, Claimant)> = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(a, c)| (*a, c.clone()))
            .collect();
        let lease = self.lease.load(Ordering::Relaxed);
        let mut kept = 0;
        for (address, claimant) in &held {
            match self
                .leases
                .claim(claimant, Wanted::Exactly(*address), lease, |_| true)
                .await
            {
                Ok(_) => kept += 1,
                Err(ClaimError::Taken(_)) => {
                    self.held
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(address);
                    let holder = self.view().holder(*address).cloned();
                    let holder = holder.unwrap_or(Holder {
                        node: "?".into(),
                        claimant: claimant.clone(),
                    });
                    hooks.lost(*address, &holder);
                }
                Err(e) => {
                    warn!(addr = %address, error = %e, "not reconciled yet");
                    return;
                }
            }
        }
        // Addresses etcd says are ours that no client of ours holds.
        if let Ok(all) = self.leases.all().await {
            for (address, holder) in all {
                let ours = held.iter().any(|(a, _)| *a == address);
                if holder.node == self.config.node && !ours {
                    let _ = self.leases.release(&holder.claimant, address).await;
                }
            }
        }
        info!(
            addresses = kept,
            "reconciled this server's addresses with etcd"
        );
    }

    async fn write_ban(&self, ban: &Ban) {
        let remaining = ban
            .until
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if remaining.is_zero() {
            return;
        }
        let key = format!("{}bans/{}", self.prefix, banned_text(&ban.who));
        let value = self.records.seal(&key, &ban_value(ban.until, &ban.reason));
        // The ban's own lease deletes it when it ends.
        let ttl = remaining
            .saturating_add(Duration::from_secs(1))
            .min(MAX_ETCD_LEASE_TTL);
        let written = match self.etcd.grant(ttl).await {
            Ok(lease) => self.etcd.put(&key, value, lease).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            warn!(who = %banned_text(&ban.who), error = %e, "ban not shared with the cluster: it holds on this server only");
        }
    }

    /// Applies what other servers change, as etcd reports it, from the
    /// revision after the one the state was read at (in `join`), so nothing
    /// written meanwhile is missed. A watch that ends is made again from
    /// the revision after the last change applied; if etcd no longer has
    /// those changes (compacted) or went back in time (its data lost), the
    /// state is read afresh and the watch goes on from there.
    async fn watch(self: Arc<Self>, hooks: Arc<dyn ClusterHooks>, shutdown: CancellationToken) {
        let mut from = self.loaded.load(Ordering::Relaxed) + 1;
        let mut reload = false;
        loop {
            if reload {
                match self.load().await {
                    Ok(revision) => {
                        info!(revision, "read the cluster's state afresh");
                        from = revision + 1;
                        reload = false;
                        self.reapply(&hooks);
                    }
                    Err(e) => {
                        debug!(error = %e, "the cluster's state not read yet");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(WATCH_RETRY) => continue,
                        }
                    }
                }
            }
            let (tx, mut rx) = mpsc::channel(64);
            let etcd = self.etcd.clone();
            let prefix = self.prefix.clone();
            let watching = tokio::spawn(async move { etcd.watch(&prefix, from, &tx).await });
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        watching.abort();
                        return;
                    }
                    event = rx.recv() => match event {
                        Some(event) => {
                            self.apply(event.change, &hooks);
                            from = from.max(event.revision + 1);
                        }
                        None => break,
                    },
                }
            }
            match watching.await {
                Ok(EtcdError::Compacted(upto)) => {
                    warn!(from, compacted = upto, "etcd no longer has the changes this server missed: reading the cluster's state afresh");
                    reload = true;
                }
                Ok(why) => debug!(error = %why, from, "etcd watch ended; watching again"),
                Err(_) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(WATCH_RETRY) => {}
            }
            if let Ok(now) = self.etcd.revision(&self.prefix).await {
                if now + 1 < from {
                    warn!(from, now, "etcd's revision went back (its data was replaced): reading the cluster's state afresh");
                    reload = true;
                }
            }
        }
    }

    /// After the state was read afresh: the bans and live peers it holds
    /// are applied again (changes to them may have been missed).
    fn reapply(&self, hooks: &Arc<dyn ClusterHooks>) {
        let bans: Vec<Ban> = self
            .bans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(who, (until, reason))| Ban {
                who: who.clone(),
                until: *until,
                reason: reason.clone(),
            })
            .collect();
        for ban in bans {
            hooks.banned(ban);
        }
        hooks.peers(self.live_peers());
    }

    fn apply(&self, change: Change, hooks: &Arc<dyn ClusterHooks>) {
        let members_dir = format!("{}members/", self.prefix);
        let peers_dir = format!("{}peers/", self.prefix);
        let (key, value) = match change {
            Change::Put { key, value } => (key, value),
            Change::Delete { key } => {
                let bans_dir = format!("{}bans/", self.prefix);
                if let Some(who) = key.strip_prefix(&bans_dir).and_then(banned_parse) {
                    self.bans
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&who);
                    hooks.unbanned(who);
                    return;
                }
                if let Some(peer) = key.strip_prefix(&peers_dir) {
                    let removed = self
                        .live
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(peer);
                    if removed.is_some() {
                        hooks.peers(self.live_peers());
                    }
                    return;
                }
                if let Some(address) = self.leases.address_of(&key) {
                    self.holders
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(address);
                } else if let Some(node) = key.strip_prefix(&members_dir) {
                    info!(node, "a server left the cluster");
                    self.members
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(node);
                }
                return;
            }
        };
        if key.starts_with(&peers_dir) {
            // Refused records are counted and logged (summarised) by
            // `records`; a signed one that does not parse is a bug.
            match peers::verified(&self.records, &key, &value) {
                Some(peer) => {
                    let changed = self
                        .live
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(peer.key.to_string(), peer.clone())
                        .as_ref()
                        != Some(&peer);
                    if changed {
                        hooks.peers(self.live_peers());
                    }
                }
                None => debug!(%key, "a live peer in etcd not taken: ignored"),
            }
        } else if let Some(node) = key.strip_prefix(&members_dir) {
            if let Some(member) = membership::verified(&self.records, &key, node, &value) {
                if node != self.config.node {
                    info!(node, advertise = %member.advertise, "a server joined the cluster");
                    self.check_network6(&member);
                }
                self.members
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(node.to_string(), Arc::new(member));
            }
        } else if let Some(address) = self.leases.address_of(&key) {
            let Some(holder) = self.leases.holder_of(&key, &value) else {
                return;
            };
            self.holders
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .put(address, holder.clone());
            if holder.node == self.config.node {
                return;
            }
            let lost = self
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&address);
            if lost.is_some() {
                hooks.lost(address, &holder);
            }
        } else if let Some(ban) = self
            .records
            .open(&key, &value)
            .and_then(|opened| self.ban_of(&key, &opened.value))
        {
            self.bans
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ban.who.clone(), (ban.until, ban.reason.clone()));
            hooks.banned(ban);
        }
    }

    /// Warns when `member` has another `network6` than this server: its
    /// clients' IPv6 addresses are claimed in etcd as every one is (never
    /// two holders), but clients of one server cannot reach those of the
    /// other over IPv6 as they expect, and a server without `network6`
    /// grants none.
    fn check_network6(&self, member: &Member) {
        if member.network6 != self.network6 {
            let text = |n: Option<Ipv6Net>| n.map_or("none".to_string(), |n| n.to_string());
            warn!(
                node = %member.node,
                theirs = %text(member.network6),
                ours = %text(self.network6),
                "a member has another network6 than this server: every server of a cluster must use the same network6"
            );
        }
    }

    /// Shares `ban` with the other servers (written by `maintain`).
    pub fn share_ban(&self, ban: Ban) {
        self.bans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ban.who.clone(), (ban.until, ban.reason.clone()));
        let _ = self.writes.send(Write::Ban(ban));
    }

    /// Lifts a ban on every server (deleted by `maintain`); false if there
    /// was none in force here.
    pub fn unshare_ban(&self, who: &Banned) -> bool {
        let removed = self
            .bans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(who)
            .is_some_and(|(until, _)| until > SystemTime::now());
        let _ = self.writes.send(Write::Unban(who.clone()));
        removed
    }

    /// Shares a peer added live here (written by `maintain`).
    pub fn share_peer(&self, peer: PeerSection) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer.key.to_string(), peer.clone());
        let _ = self.writes.send(Write::Peer(peer));
    }

    /// Shares the removal of a peer added live.
    pub fn unshare_peer(&self, key: PublicKey) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key.to_string());
        let _ = self.writes.send(Write::RemovePeer(key));
    }

    /// The peers added live on any server, by key.
    pub fn live_peers(&self) -> Vec<PeerSection> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The bans in force at `now`.
    pub fn bans(&self, now: SystemTime) -> Vec<Ban> {
        self.bans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, (until, _))| *until > now)
            .map(|(who, (until, reason))| Ban {
                who: who.clone(),
                until: *until,
                reason: reason.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ban_of_any_length_read_from_etcd_is_a_time() {
        let far = crate::wallclock::far_future();
        let until = |value: &[u8]| ban_parse(value).map(|(until, _)| until);
        for huge in [1u64 << 63, u64::MAX, (1 << 63) + 1] {
            assert_eq!(until(huge.to_string().as_bytes()), Some(far), "{huge}");
        }
        assert_eq!(
            until(b"1700000000"),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        for bad in [
            &b"-1"[..],
            b"18446744073709551616",
            b"",
            b"soon",
            b"soon 1700000000",
        ] {
            assert_eq!(until(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_ban_record_carries_its_reason_and_an_older_one_has_none() {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let value = ban_value(at, "kicked by uid 0: spam, again");
        assert_eq!(value, "1700000000 kicked by uid 0: spam, again");
        assert_eq!(
            ban_parse(value.as_bytes()),
            Some((at, "kicked by uid 0: spam, again".to_string()))
        );
        // As a server without reasons wrote it: the time alone.
        assert_eq!(ban_parse(b"1700000000"), Some((at, String::new())));
        assert_eq!(
            ban_parse(ban_value(at, "").as_bytes()),
            Some((at, String::new()))
        );
    }
}
