//! The socket between simplevpnd and simplevpn-helper: a `SOCK_SEQPACKET`
//! Unix socketpair, so one `sendmsg` is one `recvmsg` (one frame, whole) and
//! a passed fd arrives with the frame it belongs to. The peer closing its end
//! reads as an empty message.
//!
//! Both functions make a single system call, so they work on blocking sockets
//! (the helper) and, inside `AsyncFd::async_io`, on non-blocking ones (the
//! daemon), where `WouldBlock` means "try again when ready".

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};

use super::protocol::MAX_FRAME;
use crate::limits::MAX_TUN_QUEUES;

/// The most fds one message may carry: a tun's queues.
pub const MAX_FDS: usize = MAX_TUN_QUEUES;

/// A connected pair of sockets, both close-on-exec.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// One received message.
#[derive(Debug)]
pub struct Message {
    /// The frame; empty when the peer has closed its end.
    pub frame: Vec<u8>,
    /// The fds that came with it, in order (close-on-exec).
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// Whether the peer closed its end.
    pub fn is_eof(&self) -> bool {
        self.frame.is_empty()
    }
}

/// Sends `frame` as one message, with `fds` attached (at most [`MAX_FDS`]).
pub fn send(socket: BorrowedFd<'_>, frame: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} fds in one message: at most {MAX_FDS}", fds.len()),
        ));
    }
    let fds: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<UnixAddr>(
        socket.as_raw_fd(),
        &[IoSlice::new(frame)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    match sent == frame.len() {
        true => Ok(()),
        false => Err(io::Error::other(format!(
            "sent {sent} of {} bytes of a message",
            frame.len()
        ))),
    }
}

/// Receives one message. More than [`MAX_FDS`] fds, or a truncated message
/// or control data, is an error (any fds that came are closed).
pub fn recv(socket: BorrowedFd<'_>) -> io::Result<Message> {
    let mut buf = vec![0u8; MAX_FRAME + 1];
    // Room for one fd more than allowed, so that too many is told apart.
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS + 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<UnixAddr>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let len = msg.bytes;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = c {
            // SAFETY: the kernel just installed these fds in this process
            // for us; nothing else owns them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let flags = msg.flags;
    if flags.contains(MsgFlags::MSG_TRUNC) || len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message longer than {MAX_FRAME} bytes"),
        ));
    }
    if flags.contains(MsgFlags::MSG_CTRUNC) || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_FDS} fds came with a message"),
        ));
    }
    buf.truncate(len);
    Ok(Message { frame: buf, fds })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn frames_and_an_fd_cross_whole_and_eof_reads_empty() {
        let (a, b) = pair().expect("socketpair");
        send(a.as_fd(), b"first", &[]).expect("send");
        let (r, w) = nix::unistd::pipe().expect("pipe");
        send(a.as_fd(), b"second", &[r.as_fd(), w.as_fd()]).expect("send with fds");

        let first = recv(b.as_fd()).expect("recv");
        assert_eq!(first.frame, b"first");
        assert!(first.fds.is_empty());
        let second = recv(b.as_fd()).expect("recv");
        assert_eq!(second.frame, b"second");
        assert_eq!(second.fds.len(), 2, "both fds came along");
        for fd in &second.fds {
            let flags =
                nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
            assert_ne!(flags & nix::libc::FD_CLOEXEC, 0, "received fd is CLOEXEC");
        }
        // In order: what is written to the second end is read from the first.
        nix::unistd::write(&second.fds[1], b"x").expect("write the pipe");
        let mut byte = [0u8; 1];
        nix::unistd::read(second.fds[0].as_raw_fd(), &mut byte).expect("read the pipe");
        assert_eq!(&byte, b"x");

        drop(a);
        assert!(recv(b.as_fd()).expect("recv at EOF").is_eof());
    }

    #[test]
    fn too_many_fds_are_refused_on_both_sides() {
        let (a, b) = pair().expect("socketpair");
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        let many = vec![r.as_fd(); MAX_FDS + 1];
        let refused = send(a.as_fd(), b"many", &many).expect_err("too many to send");
        assert_eq!(refused.kind(), io::ErrorKind::InvalidInput);
        // A peer that sends more anyway (not through `send`): the message is
        // an error, and the fds that came are closed.
        let raw: Vec<RawFd> = many.iter().map(|fd| fd.as_raw_fd()).collect();
        sendmsg::<UnixAddr>(
            a.as_raw_fd(),
            &[IoSlice::new(b"many")],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        assert_eq!(
            recv(b.as_fd()).expect_err("too many fds").kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn an_oversized_message_is_an_error() {
        let (a, b) = pair().expect("socketpair");
        send(a.as_fd(), &vec![1u8; MAX_FRAME + 10], &[]).expect("send");
        assert_eq!(
            recv(b.as_fd()).expect_err("too long").kind(),
            io::ErrorKind::InvalidData
        );
    }
}
