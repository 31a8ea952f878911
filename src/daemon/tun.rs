//! The daemon's side of the tun: packets in and out of an already open tun
//! fd, the one simplevpn-helper created and sent over with `SCM_RIGHTS`.
//! Nothing here needs privilege; creating and configuring the tun is the
//! helper's ([`crate::privsep::netdev`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::offload::{self, GsoKind, VNET_HDR_LEN};
use crate::privsep::protocol::Offloads;
use crate::wire::{SuperPacket, SUPER_HEADER_LEN};
use crate::workers::WorkerPool;

/// What a read waits for: a packet, or an error. A tun whose device is
/// deleted polls as EPOLLERR only, never readable; without the error the
/// reader would wait for ever, and the failure would go unnoticed.
const READ_OR_ERROR: Interest = Interest::READABLE.add(Interest::ERROR);

/// The virtio-net header of a packet with nothing offloaded.
const PLAIN: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// Async packet I/O on a tun fd. One `recv` returns one IP packet; one `send`
/// writes one. Share it between a reader task and a writer task with `Arc`.
///
/// A tun opened with offloads ([`AsyncTun::with_offloads`]) reads and
/// writes a virtio-net header before every packet: `recv`, `recv_into`
/// and `try_recv` return it as read (the caller takes it apart with
/// [`crate::offload::from_tun`]); `send` and `try_send` put a header that
/// says "nothing offloaded" before the packet, `try_send_super` the header
/// of a super-packet.
#[derive(Debug)]
pub struct AsyncTun {
    fd: AsyncFd<OwnedFd>,
    offloads: Offloads,
    /// Reads so far, counted by [`AsyncTun::recv_into`] (a server's tun
    /// readers), for the metrics.
    reads: AtomicU64,
}

impl AsyncTun {
    /// Wraps a tun fd (received from simplevpn-helper, or from
    /// [`crate::privsep::netdev::create_tun`]), making
    /// it non-blocking. Must be called inside a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Self::with_offloads(fd, Offloads::NONE)
    }

    /// Wraps a tun fd opened with `offloads` (as the helper reported them).
    pub fn with_offloads(fd: OwnedFd, offloads: Offloads) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        // SAFETY: an OwnedFd is a valid open fd, and it stays open and
        // unchanged for as long as the AsyncFd that owns it.
        let fd = unsafe {
            AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE)
        }?;
        Ok(Self {
            fd,
            offloads,
            reads: AtomicU64::new(0),
        })
    }

    /// How many packets (or super-packets) [`AsyncTun::recv_into`] read.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The offloads the tun was opened with.
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// Whether the kernel hands over super-packets and partial checksums
    /// (as it was opened with), or segments and checksums itself (`false`):
    /// for a link that cannot carry super-packets, the kernel does that
    /// work faster than splitting in user space.
    pub fn hand_over_offloads(&self, on: bool) -> io::Result<()> {
        if !self.offloads.tso {
            return Ok(());
        }
        let offloads = match on {
            true => self.offloads,
            false => Offloads::HEADER_ONLY,
        };
        crate::privsep::netdev::set_offloads(self.fd.get_ref(), offloads)
    }

    /// Writes `packet` behind `header` (if the tun takes one) in one writev.
    fn write_with(&self, header: &[u8], packet: &[u8]) -> io::Result<usize> {
        let fd = self.fd.get_ref();
        if !self.offloads.vnet_hdr {
            return nix::unistd::write(fd, packet).map_err(io::Error::from);
        }
        let parts = [io::IoSlice::new(header), io::IoSlice::new(packet)];
        let written = nix::sys::uio::writev(fd, &parts).map_err(io::Error::from)?;
        Ok(written.saturating_sub(header.len()))
    }

    /// Receives one packet into `buf`, returning its length. A packet longer
    /// than `buf` is truncated.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd
            .async_io(READ_OR_ERROR, |fd| {
                nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from)
            })
            .await
    }

    /// Receives one packet into the spare capacity of `buf` (which must have
    /// room for the largest packet), appending it without zeroing or copying.
    pub async fn recv_into(&self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        use bytes::BufMut;
        let len = self
            .fd
            .async_io(READ_OR_ERROR, |fd| {
                let spare = buf.chunk_mut();
                // SAFETY: read(2) writes at most `spare.len()` bytes into the
                // spare capacity it is given, which is valid for writes.
                let n = unsafe {
                    nix::libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len())
                };
                match n {
                    n if n < 0 => Err(io::Error::last_os_error()),
                    n => Ok(n as usize),
                }
            })
            .await?;
        // SAFETY: read(2) initialized the first `len` bytes of the spare capacity.
        unsafe { buf.advance_mut(len) };
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(len)
    }

    /// Waits until the tun breaks for good (its device deleted, say) and
    /// returns the error; never returns while it works. For noticing a
    /// broken tun while nothing reads it (a client between connections).
    pub async fn broken(&self) -> io::Error {
        loop {
            let mut guard = match self.fd.ready(Interest::ERROR).await {
                Ok(guard) => guard,
                Err(e) => return e,
            };
            // A read of nothing: a detached tun answers it with EBADFD, a
            // working one with 0 bytes.
            match nix::unistd::read(self.fd.get_ref().as_raw_fd(), &mut []) {
                Err(e) if is_fatal(&io::Error::from(e)) => return e.into(),
                _ => guard.clear_ready(),
            }
        }
    }

    /// Receives one packet if one is waiting, without waiting: `WouldBlock`
    /// when there is none. For reading a burst of packets in one go.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        nix::unistd::read(self.fd.get_ref().as_raw_fd(), buf).map_err(io::Error::from)
    }

    /// Sends one packet without waiting. A tun accepts a packet at once (the
    /// kernel drops it if its backlog is full), so this never needs to
    /// wait; `WouldBlock` is passed on for the caller to count as a drop.
    pub fn try_send(&self, packet: &[u8]) -> io::Result<usize> {
        self.write_with(&PLAIN, packet)
    }

    /// Sends one super-packet without waiting, as [`AsyncTun::try_send`]
    /// does a packet: whole, with its offload header, on a tun with TSO
    /// (USO for UDP); else split into the packets it stands for.
    pub fn try_send_super(&self, packet: &SuperPacket) -> io::Result<usize> {
        let bytes = &packet.frame[SUPER_HEADER_LEN..];
        let whole = match packet.gso.kind {
            GsoKind::Udp => self.offloads.uso,
            GsoKind::TcpV4 | GsoKind::TcpV6 => self.offloads.tso,
        };
        if whole {
            let header = offload::to_tun(packet.gso, bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            return self.write_with(&header.encode(), bytes);
        }
        let mut pieces = Vec::new();
        offload::split(bytes, packet.gso, usize::MAX, &mut pieces)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut written = 0;
        for piece in pieces {
            written += self.try_send(&piece)?;
        }
        Ok(written)
    }

    /// Sends one packet, returning the number of bytes written.
    pub async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.fd
            .async_io(Interest::WRITABLE, |_| self.write_with(&PLAIN, packet))
            .await
    }
}

/// A server's tun and its queues (one per worker, see
/// [`crate::privsep::netdev::attach_tun_queues`]): one reader task per
/// queue, on the queue's own worker, so that packets routed into the tun are
/// read on as many threads as there are queues. A connection writes on its
/// worker's queue ([`TunQueues::local`]): the kernel steers a flow's answers
/// to the queue its last packet was written on, so a connection's return
/// traffic is read on the connection's own thread.
#[derive(Debug)]
pub struct TunQueues {
    queues: Vec<Arc<AsyncTun>>,
}

impl TunQueues {
    /// Wraps the tun's fds (its first queue, then the others), all opened
    /// with `offloads`. Queue k is registered with worker k's runtime if
    /// there is a `pool`, else with the current one (which must exist).
    pub fn new(
        first: OwnedFd,
        more: Vec<OwnedFd>,
        offloads: Offloads,
        pool: Option<&WorkerPool>,
    ) -> io::Result<Self> {
        let queues = std::iter::once(first)
            .chain(more)
            .enumerate()
            .map(|(index, fd)| {
                let _runtime = pool.map(|pool| pool.handle(index).enter());
                AsyncTun::with_offloads(fd, offloads).map(Arc::new)
            })
            .collect::<io::Result<_>>()?;
        Ok(Self { queues })
    }

    /// The queue of the worker the caller runs on (the first queue outside
    /// a worker pool).
    pub fn local(&self) -> &AsyncTun {
        // `queues` is never empty: `new` puts the first fd in.
        &self.queues[crate::workers::current_index() % self.queues.len()]
    }

    /// Every queue, for a reader task each (queue k on worker k).
    pub fn all(&self) -> &[Arc<AsyncTun>] {
        &self.queues
    }
}

/// Sets `O_NONBLOCK` on `fd`, keeping its other status flags.
pub(crate) fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    let flags = OFlag::from_bits_retain(fcntl(raw, FcntlArg::F_GETFL)?);
    fcntl(raw, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Whether a tun read or write error means the tun is gone or broken for
/// good (the device was deleted, the fd is bad, the driver fails), rather
/// than a packet dropped (a full queue, no memory, a malformed packet).
pub fn is_fatal(e: &io::Error) -> bool {
    use nix::libc::{EBADF, EBADFD, EFAULT, EIO, ENODEV, ENXIO};
    matches!(
        e.raw_os_error(),
        Some(ENODEV | ENXIO | EBADF | EBADFD | EIO | EFAULT)
    )
}

/// What the daemon was doing with the tun when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunOp {
    Read,
    Write,
    /// Waiting for the device to become readable.
    Poll,
}

impl std::fmt::Display for TunOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TunOp::Read => "read",
            TunOp::Write => "write",
            TunOp::Poll => "poll",
        })
    }
}

/// Why the tun failed for good: the operation and its error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {error}")]
pub struct TunFailure {
    pub op: TunOp,
    pub error: String,
}

/// The tun's state, as `svpnctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunState {
    Up,
    Failed(TunFailure),
}

impl std::fmt::Display for TunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TunState::Up => f.write_str("up"),
            TunState::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// The tun's state as the daemon sees it: up until a read or write fails
/// for good ([`is_fatal`]); then failed, with the first such error, once.
/// The role watches [`TunHealth::failed`] and ends the daemon with an error,
/// so that the helper cleans up and systemd restarts it.
#[derive(Debug, Default)]
pub struct TunHealth {
    failure: OnceLock<TunFailure>,
    failed: CancellationToken,
}

impl TunHealth {
    /// Records that `op` failed with `e`: logged as an error and the tun
    /// marked failed if the error is fatal; else nothing (the caller counts
    /// a drop). Returns whether it was fatal.
    pub fn check(&self, op: TunOp, e: &io::Error) -> bool {
        if !is_fatal(e) {
            return false;
        }
        let failure = TunFailure {
            op,
            error: e.to_string(),
        };
        if self.failure.set(failure).is_ok() {
            error!(error = %e, "tun {op} failed for good: stopping, so that the service manager restarts simplevpnd");
            self.failed.cancel();
        }
        true
    }

    /// Up, or failed and why.
    pub fn state(&self) -> TunState {
        match self.failure.get() {
            None => TunState::Up,
            Some(why) => TunState::Failed(why.clone()),
        }
    }

    /// Waits until the tun has failed, and says why.
    pub async fn failed(&self) -> TunFailure {
        self.failed.cancelled().await;
        match self.failure.get() {
            Some(why) => why.clone(),
            // `failed` is cancelled only after `failure` is set.
            None => TunFailure {
                op: TunOp::Poll,
                error: "unknown".to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_tun_is_fatal_and_a_full_queue_is_a_drop() {
        let health = TunHealth::default();
        assert_eq!(health.state(), TunState::Up);
        let full = io::Error::from_raw_os_error(nix::libc::EAGAIN);
        let nobufs = io::Error::from_raw_os_error(nix::libc::ENOBUFS);
        let bad_packet = io::Error::from_raw_os_error(nix::libc::EINVAL);
        for e in [&full, &nobufs, &bad_packet] {
            assert!(!health.check(TunOp::Write, e), "{e}");
        }
        assert_eq!(health.state(), TunState::Up);
        let gone = io::Error::from_raw_os_error(nix::libc::EBADFD);
        assert!(health.check(TunOp::Read, &gone));
        let read_failed = TunState::Failed(TunFailure {
            op: TunOp::Read,
            error: gone.to_string(),
        });
        assert_eq!(health.state(), read_failed);
        assert!(health.state().to_string().starts_with("failed: read: "));
        // The first failure is the one reported.
        let io = io::Error::from_raw_os_error(nix::libc::EIO);
        assert!(health.check(TunOp::Write, &io));
        assert_eq!(health.state(), read_failed);
        assert!(health.failed.is_cancelled());
    }
}
