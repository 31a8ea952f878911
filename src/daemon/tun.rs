//! The daemon's side of the tun: packets in and out of an already open tun
//! fd, the one simplevpn-helper created and sent over with `SCM_RIGHTS`.
//! Nothing here needs privilege; creating and configuring the tun is the
//! helper's ([`crate::privsep::netdev`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Async packet I/O on a tun fd. One `recv` returns one IP packet; one `send`
/// writes one. Share it between a reader task and a writer task with `Arc`.
#[derive(Debug)]
pub struct AsyncTun {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncTun {
    /// Wraps a tun fd (received from simplevpn-helper, or from
    /// [`crate::privsep::netdev::create_tun`]), making
    /// it non-blocking. Must be called inside a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        // SAFETY: an OwnedFd is a valid open fd, and it stays open and
        // unchanged for as long as the AsyncFd that owns it.
        let fd = unsafe {
            AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE)
        }?;
        Ok(Self { fd })
    }

    /// Receives one packet into `buf`, returning its length. A packet longer
    /// than `buf` is truncated.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd
            .async_io(Interest::READABLE, |fd| {
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
            .async_io(Interest::READABLE, |fd| {
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
        Ok(len)
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
        nix::unistd::write(self.fd.get_ref(), packet).map_err(io::Error::from)
    }

    /// Sends one packet, returning the number of bytes written.
    pub async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.fd
            .async_io(Interest::WRITABLE, |fd| {
                nix::unistd::write(fd, packet).map_err(io::Error::from)
            })
            .await
    }
}

/// Sets `O_NONBLOCK` on `fd`, keeping its other status flags.
pub(crate) fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    let flags = OFlag::from_bits_retain(fcntl(raw, FcntlArg::F_GETFL)?);
    fcntl(raw, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}
