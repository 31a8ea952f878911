//! simplevpn-loadgen: many peers at once, for the scale benchmark (bench/run).
//!
//! Opens N TCP connections to a server, each sending the original client's
//! dynamic address request and waiting for its 20-byte grant; then keeps them
//! all open with keepalives for `--hold` seconds (or until SIGINT/SIGTERM).
//! With `--tls`, each peer first speaks TLS 1.3 with a key of its own,
//! derived from `--seed` ([`NodeKey::from_seed`]; `simplevpn-loadgen keys`
//! prints the public keys for the server's config), through the library's
//! [`tls::client_config`], exactly as our client does. With `--reconnect`,
//! a peer whose connection is lost dials again with the client's own backoff
//! ([`Backoff`]), and the time until every lost peer is granted again is
//! reported.
//!
//! Prints one JSON line when every attempt has ended (`"phase":"granted"`:
//! grants per second, time to all granted, handshake latencies), with
//! `--reconnect` one each time every lost peer is back
//! (`"phase":"reconnected"`), and one when it stops (`"phase":"done"`:
//! keepalives sent and echoed, connections lost). Progress goes to stderr.
//! Exit code 0 when every connection was granted a distinct address and none
//! was lost before the end (with `--reconnect`: all were back at the end), 1
//! otherwise.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::BytesMut;
use clap::{Parser, Subcommand};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use serde_json::json;
use simplevpn::keys::{NodeKey, PublicKey};
use simplevpn::session::client::{Backoff, BACKOFF_INITIAL, BACKOFF_MAX};
use simplevpn::tls;
use simplevpn::wire::{Control, Decoder, Frame, Reply, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Load generator: N peers (original protocol, or TLS with --tls), each
/// granted a dynamic address.
#[derive(Debug, Parser)]
#[command(
    name = "simplevpn-loadgen",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints the public keys of the TLS peers of a seed, one a line (for
    /// the server's [[server.peer]] tables)
    Keys {
        /// The seed the keys are derived from (as given to --seed)
        #[arg(long)]
        seed: String,
        /// How many keys (peers 0 to N-1)
        #[arg(long, value_name = "N")]
        count: u64,
    },
}

#[derive(Debug, clap::Args)]
struct Args {
    /// The server to load
    #[arg(long, value_name = "ADDR:PORT", required = true)]
    server: Option<SocketAddr>,
    /// Speak TLS 1.3, peer i with the key i of --seed
    #[arg(long, requires_all = ["seed", "server_key"])]
    tls: bool,
    /// The seed of the peers' keys (with --tls)
    #[arg(long, requires = "tls")]
    seed: Option<String>,
    /// The server's public key, pinned (with --tls)
    #[arg(long, value_name = "PUBKEY", requires = "tls")]
    server_key: Option<PublicKey>,
    /// A peer whose connection is lost dials again, with the client's
    /// backoff, until the run ends; reports when all are back
    #[arg(long)]
    reconnect: bool,
    /// How many connections (peers) to open
    #[arg(long, default_value_t = 1000, value_name = "N")]
    connections: usize,
    /// New connections per second; 0 for as fast as --concurrency allows
    #[arg(long, default_value_t = 0, value_name = "R")]
    rate: u64,
    /// Connections that may be between connect and grant at once
    #[arg(long, default_value_t = 256, value_name = "N")]
    concurrency: usize,
    /// Seconds between the keepalives each granted peer sends
    #[arg(long, default_value_t = 15, value_name = "SECS")]
    keepalive: u64,
    /// Seconds to keep every peer open once all attempts have ended
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    hold: u64,
    /// Seconds one connection may take from connect to grant
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    timeout: u64,
    /// Source address to connect from (repeat to spread connections over
    /// several; default: the kernel's choice)
    #[arg(long = "source", value_name = "IP")]
    sources: Vec<IpAddr>,
}

/// What a peer reports while it holds, with --reconnect.
enum Event {
    /// Its connection was lost; it will dial again.
    Lost,
    /// Granted again, after `failed` attempts that did not get a grant.
    Back { failed: u32 },
}

/// How one connection's handshake ended.
enum Outcome {
    Granted {
        latency: Duration,
        address: Ipv4Addr,
    },
    Failed(String),
}

/// Counters shared by the connection tasks while they hold.
#[derive(Default)]
struct HoldStats {
    keepalives_sent: AtomicU64,
    echoes: AtomicU64,
    /// Connections closed by the server, or failed, before the end.
    lost: AtomicU64,
    /// Granted connections still open.
    open: AtomicU64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Keys { seed, count }) = cli.command {
        return print_keys(&seed, count);
    }
    let args = cli.run;
    if args.connections == 0 || args.concurrency == 0 || args.keepalive == 0 {
        eprintln!(
            "simplevpn-loadgen: --connections, --concurrency and --keepalive must be above 0"
        );
        return ExitCode::from(2);
    }
    let nofile = match raise_nofile() {
        Ok(limit) => limit,
        Err(e) => {
            eprintln!("simplevpn-loadgen: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // Each connection takes one fd; leave room for stdio and the runtime.
    if nofile < args.connections as u64 + 64 {
        eprintln!(
            "simplevpn-loadgen: warning: the open-file limit is {nofile}, too low for {} connections (raise the hard limit: ulimit -Hn)",
            args.connections
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("simplevpn-loadgen: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, nofile)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("simplevpn-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `simplevpn-loadgen keys`: the public keys of the peers of `seed`.
fn print_keys(seed: &str, count: u64) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for i in 0..count {
        let line = NodeKey::from_seed(seed.as_bytes(), i)
            .map_err(anyhow::Error::from)
            .and_then(|key| Ok(writeln!(out, "{}", key.public())?));
        if let Err(e) = line {
            eprintln!("simplevpn-loadgen: key {i}: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    match out.flush() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("simplevpn-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The TLS connector of each peer (its own key, the server's pinned), made
/// before the clock starts: what is measured is the handshakes, not our
/// certificates.
fn tls_connectors(args: &Args) -> anyhow::Result<Option<Vec<TlsConnector>>> {
    let (true, Some(seed), Some(server_key)) = (args.tls, &args.seed, args.server_key) else {
        return Ok(None);
    };
    let began = std::time::Instant::now();
    let connectors = (0..args.connections as u64)
        .map(|i| {
            let key = NodeKey::from_seed(seed.as_bytes(), i)?;
            Ok(TlsConnector::from(tls::client_config(&key, server_key)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .context("the TLS peers' keys")?;
    eprintln!(
        "loadgen: {} TLS identities made in {:.2} s",
        connectors.len(),
        began.elapsed().as_secs_f64()
    );
    Ok(Some(connectors))
}

/// Raises the soft open-file limit to the hard one; returns the new soft limit.
fn raise_nofile() -> anyhow::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    }
    Ok(hard)
}

/// Returns whether every connection was granted a distinct address and held.
async fn run(args: Args, nofile: u64) -> anyhow::Result<bool> {
    let server = args.server.context("--server is required")?;
    let mut connectors = tls_connectors(&args)?.map(Vec::into_iter);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let events_tx = args.reconnect.then_some(events_tx);
    // `signal` ends the run; `stop` tells the connection tasks to close,
    // after the counters were read.
    let signal = CancellationToken::new();
    tokio::spawn(cancel_on_signal(signal.clone()));
    let stop = CancellationToken::new();
    let stats = Arc::new(HoldStats::default());
    let tasks = TaskTracker::new();
    let (outcomes_tx, mut outcomes) = mpsc::unbounded_channel();
    let start = Instant::now();

    // Opens the connections at the asked rate, at most --concurrency in handshake.
    let opener = {
        let permits = Arc::new(Semaphore::new(args.concurrency));
        let tasks = tasks.clone();
        let stats = stats.clone();
        let stop = stop.clone();
        let (n, rate, sources) = (args.connections, args.rate, args.sources.clone());
        let (handshake, keepalive) = (
            Duration::from_secs(args.timeout),
            Duration::from_secs(args.keepalive),
        );
        tokio::spawn(async move {
            for i in 0..n {
                if rate > 0 {
                    sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64)).await;
                }
                let permit = tokio::select! {
                    _ = stop.cancelled() => return,
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                };
                let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
                let peer = Peer {
                    server,
                    source,
                    tls: connectors.as_mut().and_then(Iterator::next),
                    handshake,
                    keepalive,
                    stats: stats.clone(),
                    stop: stop.clone(),
                    events: events_tx.clone(),
                };
                let outcomes = outcomes_tx.clone();
                tasks.spawn(async move {
                    peer.run(move |outcome| {
                        drop(permit);
                        let _ = outcomes.send(outcome);
                    })
                    .await
                });
            }
        })
    };

    // Collects the outcomes, with a progress line each second.
    let mut granted = 0usize;
    let mut latencies = Vec::with_capacity(args.connections);
    let mut addresses = HashSet::with_capacity(args.connections);
    let mut failures: Vec<String> = Vec::new();
    let mut last_grant = start;
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    progress.tick().await;
    while granted + failures.len() < args.connections {
        tokio::select! {
            _ = signal.cancelled() => break,
            _ = progress.tick() => eprintln!(
                "loadgen: {granted}/{} granted, {} failed, {:.1} s",
                args.connections,
                failures.len(),
                start.elapsed().as_secs_f64()
            ),
            outcome = outcomes.recv() => match outcome {
                Some(Outcome::Granted { latency, address }) => {
                    granted += 1;
                    latencies.push(latency);
                    addresses.insert(address);
                    last_grant = Instant::now();
                }
                Some(Outcome::Failed(why)) => failures.push(why),
                None => break,
            },
        }
    }
    let opened_in = start.elapsed();
    let to_all = last_grant.duration_since(start).as_secs_f64();
    latencies.sort();
    let pct = |p: f64| -> f64 {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let mut failure_kinds: Vec<(String, usize)> = Vec::new();
    for why in &failures {
        match failure_kinds.iter_mut().find(|(w, _)| w == why) {
            Some((_, count)) => *count += 1,
            None => failure_kinds.push((why.clone(), 1)),
        }
    }
    let summary = json!({
        "phase": "granted",
        "server": server.to_string(),
        "tls": args.tls,
        "connections": args.connections,
        "granted": granted,
        "distinct_addresses": addresses.len(),
        "failed": failures.len(),
        "failures": failure_kinds.iter().map(|(w, n)| json!({"reason": w, "count": n})).collect::<Vec<_>>(),
        "time_to_all_granted_s": to_all,
        "grants_per_s": if to_all > 0.0 { granted as f64 / to_all } else { 0.0 },
        "handshake_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
        "rate": args.rate,
        "concurrency": args.concurrency,
        "nofile_limit": nofile,
        "attempts_ended_after_s": opened_in.as_secs_f64(),
    });
    println!("{summary}");
    eprintln!(
        "loadgen: {granted}/{} granted in {to_all:.2} s ({:.0}/s), {} failed; holding {} s",
        args.connections,
        summary["grants_per_s"].as_f64().unwrap_or(0.0),
        failures.len(),
        args.hold
    );

    // Holds every granted peer open, sending keepalives, until --hold is over,
    // a signal comes, or no peer is left.
    let hold_end = Instant::now() + Duration::from_secs(args.hold);
    let mut check = tokio::time::interval(Duration::from_millis(200));
    let mut outages = Outages::default();
    let reason = loop {
        tokio::select! {
            _ = signal.cancelled() => break "signal",
            _ = sleep_until(hold_end) => break "hold over",
            _ = check.tick() => if stats.open.load(Ordering::Relaxed) == 0 && !args.reconnect {
                break "every connection closed";
            },
            _ = progress.tick(), if outages.down > 0 => eprintln!(
                "loadgen: {} of {} lost peers back, {:.1} s",
                outages.lost - outages.down,
                outages.lost,
                outages.began.elapsed().as_secs_f64()
            ),
            Some(event) = events.recv() => if let Some(line) = outages.record(event) {
                println!("{line}");
                eprintln!("loadgen: all lost peers back: {line}");
            },
        }
    };
    let lost_before_end = stats.lost.load(Ordering::Relaxed);
    let open_at_end = stats.open.load(Ordering::Relaxed);
    stop.cancel();
    opener.abort();
    tasks.close();
    if timeout(Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        eprintln!("loadgen: some connections did not close within 10 s");
    }
    let done = json!({
        "phase": "done",
        "reason": reason,
        "open_at_end": open_at_end,
        "lost_before_end": lost_before_end,
        "keepalives_sent": stats.keepalives_sent.load(Ordering::Relaxed),
        "keepalive_echoes": stats.echoes.load(Ordering::Relaxed),
        "held_s": start.elapsed().as_secs_f64() - to_all,
        "reconnect": args.reconnect,
        "outages": outages.count,
        "down_at_end": outages.down,
    });
    println!("{done}");
    let held = match args.reconnect {
        true => outages.down == 0,
        false => lost_before_end == 0,
    };
    Ok(granted == args.connections
        && addresses.len() == granted
        && held
        && open_at_end == granted as u64)
}

/// With --reconnect: the peers lost and not yet back, and how long they took.
struct Outages {
    /// Peers lost and not granted again yet.
    down: usize,
    /// Peers lost since the outage began (down went from 0 to 1).
    lost: usize,
    began: Instant,
    /// Failed attempts of the peers back so far in this outage.
    failed: Vec<u32>,
    /// Outages over (every lost peer back).
    count: u32,
}

impl Default for Outages {
    fn default() -> Outages {
        Outages {
            down: 0,
            lost: 0,
            began: Instant::now(),
            failed: Vec::new(),
            count: 0,
        }
    }
}

impl Outages {
    /// Counts `event`; returns the JSON line of an outage that just ended.
    fn record(&mut self, event: Event) -> Option<serde_json::Value> {
        match event {
            Event::Lost => {
                if self.down == 0 {
                    self.began = Instant::now();
                    self.lost = 0;
                    self.failed.clear();
                }
                self.down += 1;
                self.lost += 1;
                None
            }
            Event::Back { failed } => {
                self.down = self.down.saturating_sub(1);
                self.failed.push(failed);
                if self.down > 0 {
                    return None;
                }
                self.count += 1;
                self.failed.sort_unstable();
                let pct = |p: f64| {
                    self.failed
                        .get(((self.failed.len() as f64 - 1.0) * p).round() as usize)
                        .copied()
                        .unwrap_or(0)
                };
                Some(json!({
                    "phase": "reconnected",
                    "outage": self.count,
                    "lost": self.lost,
                    "time_to_all_back_s": self.began.elapsed().as_secs_f64(),
                    "failed_attempts": {
                        "total": self.failed.iter().map(|&n| u64::from(n)).sum::<u64>(),
                        "p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0),
                    },
                }))
            }
        }
    }
}

async fn cancel_on_signal(signal_seen: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    signal_seen.cancel();
}

/// A peer's connection: TCP, or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

/// A granted connection, and how to read it: with extension frames when
/// TLS negotiated them (the server then pushes session parameters).
struct Granted {
    stream: Box<dyn Stream>,
    address: Ipv4Addr,
    decoder: Decoder,
}

/// One peer: connect, ask, get the grant, then keepalives until `stop`;
/// with `events` (--reconnect), the same again whenever it is lost.
struct Peer {
    server: SocketAddr,
    source: Option<IpAddr>,
    tls: Option<TlsConnector>,
    handshake: Duration,
    keepalive: Duration,
    stats: Arc<HoldStats>,
    stop: CancellationToken,
    events: Option<mpsc::UnboundedSender<Event>>,
}

impl Peer {
    /// Runs the peer; `report` is called once, when the first handshake
    /// has ended.
    async fn run(self, report: impl FnOnce(Outcome)) {
        let began = Instant::now();
        let mut buffer = BytesMut::with_capacity(64);
        let mut granted = match self.attempt(&mut buffer).await {
            None => return,
            Some(Ok(granted)) => granted,
            Some(Err(why)) => return report(Outcome::Failed(format!("{why:#}"))),
        };
        report(Outcome::Granted {
            latency: began.elapsed(),
            address: granted.address,
        });
        // The client's own backoff: after a session that worked, the
        // initial delay (with jitter), doubling while attempts fail.
        let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
        loop {
            self.stats.open.fetch_add(1, Ordering::Relaxed);
            let ended_by_stop = self.hold(&mut granted, &mut buffer).await;
            self.stats.open.fetch_sub(1, Ordering::Relaxed);
            if ended_by_stop {
                let _ = granted.stream.shutdown().await;
                return;
            }
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
            drop(granted);
            let Some(events) = &self.events else { return };
            let _ = events.send(Event::Lost);
            backoff.reset();
            let mut failed = 0u32;
            granted = loop {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay(fastrand::f64())) => {}
                }
                buffer.clear();
                match self.attempt(&mut buffer).await {
                    None => return,
                    Some(Ok(granted)) => break granted,
                    Some(Err(_)) => failed += 1,
                }
            };
            let _ = events.send(Event::Back { failed });
        }
    }

    /// One attempt within the handshake timeout: the granted connection, or
    /// why not; None when `stop` came first.
    async fn attempt(&self, buffer: &mut BytesMut) -> Option<anyhow::Result<Granted>> {
        let handshake = tokio::select! {
            _ = self.stop.cancelled() => return None,
            result = timeout(self.handshake, self.handshake(buffer)) => result,
        };
        Some(handshake.unwrap_or_else(|_| Err(anyhow::anyhow!("no grant within the timeout"))))
    }

    /// Connects (with TLS, authenticates both ways), sends the dynamic
    /// request, and reads the grant.
    async fn handshake(&self, buffer: &mut BytesMut) -> anyhow::Result<Granted> {
        let stream = match self.source {
            None => TcpStream::connect(self.server).await,
            Some(source) => {
                let socket = match source {
                    IpAddr::V4(_) => TcpSocket::new_v4(),
                    IpAddr::V6(_) => TcpSocket::new_v6(),
                }
                .context("socket")?;
                socket
                    .bind(SocketAddr::new(source, 0))
                    .with_context(|| format!("bind to {source}"))?;
                socket.connect(self.server).await
            }
        }
        .context("connect")?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let (mut stream, decoder): (Box<dyn Stream>, _) = match &self.tls {
            None => (Box::new(stream), Decoder::default()),
            Some(connector) => {
                let stream = connector
                    .connect(tls::server_name(), stream)
                    .await
                    .context("TLS handshake")?;
                let decoder = match tls::speaks_extension(stream.get_ref().1) {
                    true => Decoder::default().with_extensions(),
                    false => Decoder::default(),
                };
                (Box::new(stream), decoder)
            }
        };
        stream
            .write_all(&Control::request(Request::Dynamic).encode())
            .await
            .context("send the request")?;
        stream.flush().await.context("send the request")?;
        loop {
            match next_frame(&mut stream, buffer, &decoder).await? {
                Some(Frame::Control(control)) => match control.as_reply() {
                    Ok(Reply::Grant { address, .. }) => {
                        return Ok(Granted {
                            stream,
                            address,
                            decoder,
                        })
                    }
                    Ok(Reply::Keepalive) => continue,
                    Err(e) => bail!("bad reply: {e}"),
                },
                Some(Frame::Packet(_) | Frame::Super(_)) => bail!("a data packet before the grant"),
                // Extension frames (session parameters over TLS): not ours to use.
                Some(Frame::Extension(_)) => continue,
                None => bail!("closed by the server before a grant"),
            }
        }
    }

    /// Sends keepalives and counts their echoes. Returns true when `stop`
    /// ended it, false when the connection closed or failed first.
    async fn hold(&self, granted: &mut Granted, buffer: &mut BytesMut) -> bool {
        let Granted {
            stream, decoder, ..
        } = granted;
        let keepalive = Control::KEEPALIVE.encode();
        let mut tick = tokio::time::interval_at(Instant::now() + self.keepalive, self.keepalive);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return true,
                _ = tick.tick() => {
                    if stream.write_all(&keepalive).await.is_err() || stream.flush().await.is_err() {
                        return false;
                    }
                    self.stats.keepalives_sent.fetch_add(1, Ordering::Relaxed);
                }
                frame = next_frame(stream, buffer, decoder) => match frame {
                    Ok(Some(Frame::Control(control))) => {
                        if control == Control::KEEPALIVE {
                            self.stats.echoes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Some(Frame::Packet(_) | Frame::Extension(_) | Frame::Super(_))) => {}
                    Ok(None) | Err(_) => return false,
                },
            }
        }
    }
}

/// The next frame from `stream`, or None at a clean close. Cancel-safe: a
/// partial frame stays in `buffer`.
async fn next_frame(
    stream: &mut (impl AsyncRead + Unpin),
    buffer: &mut BytesMut,
    decoder: &Decoder,
) -> anyhow::Result<Option<Frame>> {
    loop {
        if let Some(frame) = decoder
            .decode(buffer)
            .context("bad frame from the server")?
        {
            return Ok(Some(frame));
        }
        if buffer.capacity() - buffer.len() < 32 {
            buffer.reserve(64);
        }
        if stream.read_buf(buffer).await.context("read")? == 0 {
            if buffer.is_empty() {
                return Ok(None);
            }
            bail!("closed in the middle of a frame");
        }
    }
}
