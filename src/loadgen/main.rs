//! simplevpn-loadgen: many peers of the original protocol at once, for the
//! scale benchmark (bench/run).
//!
//! Opens N TCP connections to a server, each sending the original client's
//! dynamic address request and waiting for its 20-byte grant; then keeps them
//! all open with keepalives for `--hold` seconds (or until SIGINT/SIGTERM).
//! Prints one JSON line when every attempt has ended (`"phase":"granted"`:
//! grants per second, time to all granted, handshake latencies) and one when
//! it stops (`"phase":"done"`: keepalives sent and echoed, connections lost).
//! Progress goes to stderr. Exit code 0 when every connection was granted a
//! distinct address and none was lost before the end, 1 otherwise.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::BytesMut;
use clap::Parser;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use serde_json::json;
use simplevpn::wire::{Control, Decoder, Frame, Reply, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Load generator: N original-protocol peers, each granted a dynamic address.
#[derive(Debug, Parser)]
#[command(name = "simplevpn-loadgen", version)]
struct Args {
    /// The server to load
    #[arg(long, value_name = "ADDR:PORT")]
    server: SocketAddr,
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
    let args = Args::parse();
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
        let (server, n, rate, sources) = (
            args.server,
            args.connections,
            args.rate,
            args.sources.clone(),
        );
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
                    handshake,
                    keepalive,
                    stats: stats.clone(),
                    stop: stop.clone(),
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
        "server": args.server.to_string(),
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
    let reason = loop {
        tokio::select! {
            _ = signal.cancelled() => break "signal",
            _ = sleep_until(hold_end) => break "hold over",
            _ = check.tick() => if stats.open.load(Ordering::Relaxed) == 0 {
                break "every connection closed";
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
    });
    println!("{done}");
    Ok(granted == args.connections
        && addresses.len() == granted
        && lost_before_end == 0
        && open_at_end == granted as u64)
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

/// One peer: connect, ask, get the grant, then keepalives until `stop`.
struct Peer {
    server: SocketAddr,
    source: Option<IpAddr>,
    handshake: Duration,
    keepalive: Duration,
    stats: Arc<HoldStats>,
    stop: CancellationToken,
}

impl Peer {
    /// Runs the peer; `report` is called once, when the handshake has ended.
    async fn run(self, report: impl FnOnce(Outcome)) {
        let began = Instant::now();
        let mut buffer = BytesMut::with_capacity(64);
        let handshake = tokio::select! {
            _ = self.stop.cancelled() => return,
            result = timeout(self.handshake, self.handshake(&mut buffer)) => result,
        };
        let (mut stream, address) = match handshake {
            Ok(Ok(granted)) => granted,
            Ok(Err(e)) => return report(Outcome::Failed(format!("{e:#}"))),
            Err(_) => return report(Outcome::Failed("no grant within the timeout".into())),
        };
        report(Outcome::Granted {
            latency: began.elapsed(),
            address,
        });
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        let ended_by_stop = self.hold(&mut stream, &mut buffer).await;
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        if !ended_by_stop {
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
        }
        let _ = stream.shutdown().await;
    }

    /// Connects, sends the dynamic request, and reads the grant.
    async fn handshake(&self, buffer: &mut BytesMut) -> anyhow::Result<(TcpStream, Ipv4Addr)> {
        let mut stream = match self.source {
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
        stream
            .write_all(&Control::request(Request::Dynamic).encode())
            .await
            .context("send the request")?;
        loop {
            match next_frame(&mut stream, buffer).await? {
                Some(Frame::Control(control)) => match control.as_reply() {
                    Ok(Reply::Grant { address, .. }) => return Ok((stream, address)),
                    Ok(Reply::Keepalive) => continue,
                    Err(e) => bail!("bad reply: {e}"),
                },
                Some(Frame::Packet(_)) => bail!("a data packet before the grant"),
                // Not negotiated: unreachable with its decoder.
                Some(Frame::Extension(_)) => continue,
                None => bail!("closed by the server before a grant"),
            }
        }
    }

    /// Sends keepalives and counts their echoes. Returns true when `stop`
    /// ended it, false when the connection closed or failed first.
    async fn hold(&self, stream: &mut TcpStream, buffer: &mut BytesMut) -> bool {
        let keepalive = Control::KEEPALIVE.encode();
        let mut tick = tokio::time::interval_at(Instant::now() + self.keepalive, self.keepalive);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return true,
                _ = tick.tick() => {
                    if stream.write_all(&keepalive).await.is_err() {
                        return false;
                    }
                    self.stats.keepalives_sent.fetch_add(1, Ordering::Relaxed);
                }
                frame = next_frame(stream, buffer) => match frame {
                    Ok(Some(Frame::Control(control))) => {
                        if control == Control::KEEPALIVE {
                            self.stats.echoes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Some(Frame::Packet(_) | Frame::Extension(_))) => {}
                    Ok(None) | Err(_) => return false,
                },
            }
        }
    }
}

/// The next frame from `stream`, or None at a clean close. Cancel-safe: a
/// partial frame stays in `buffer`.
async fn next_frame(
    stream: &mut TcpStream,
    buffer: &mut BytesMut,
) -> anyhow::Result<Option<Frame>> {
    let decoder = Decoder::default();
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
