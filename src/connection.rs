//! The I/O side of the wire codec: a reader that owns its buffer and yields
//! whole frames, and a writer that drains a queue of encoded frames, many per
//! syscall. Both are generic over any async byte stream, so plain TCP and
//! (later) TLS share them.

use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::wire::{Decoder, Frame, ProtocolError};

/// A connection's read buffer starts this small (an idle peer costs little)
/// and grows, while reads keep filling it, up to `MAX_READ_CHUNK`: room for
/// a few maximum-size frames per read under load.
const MIN_READ_CHUNK: usize = 1024;
const MAX_READ_CHUNK: usize = 256 * 1024;
/// How much the writer gathers from its queue before one write.
const WRITE_BATCH: usize = 256 * 1024;
/// At most this many frames per write (IOV_MAX is 1024).
const WRITE_BATCH_FRAMES: usize = 64;

/// Unsent bytes a connection's kernel send buffer may hold before the
/// socket stops being writable: enough to keep the link busy between two
/// writes, small enough that a packet never waits behind megabytes of bulk
/// data (the buffer otherwise grows to 4 MiB).
const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Sets up a tunnel's TCP connection for low latency: no Nagle delay, and a
/// shallow send queue. Failures are logged, not fatal.
pub fn tune_tcp(stream: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    let value = NOTSENT_LOWAT;
    // SAFETY: setsockopt reads an int-sized value from a valid pointer.
    let set = unsafe {
        nix::libc::setsockopt(
            stream.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_NOTSENT_LOWAT,
            (&value as *const u32).cast(),
            std::mem::size_of::<u32>() as nix::libc::socklen_t,
        )
    };
    if set != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "TCP_NOTSENT_LOWAT not set");
    }
}

/// The read half of a connection, whatever its transport (TCP, TLS).
pub type Reader = Box<dyn AsyncRead + Unpin + Send>;
/// The write half of a connection, whatever its transport.
pub type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("connection closed in the middle of a frame ({0} bytes pending)")]
    Truncated(usize),
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads frames from a byte stream, however TCP splits or joins them.
pub struct FrameReader<R> {
    reader: R,
    buffer: BytesMut,
    decoder: Decoder,
    /// How much room to make before the next read.
    chunk: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R, decoder: Decoder) -> Self {
        FrameReader {
            reader,
            buffer: BytesMut::new(),
            decoder,
            chunk: MIN_READ_CHUNK,
        }
    }

    /// The next frame, or `Ok(None)` when the peer closed the stream cleanly
    /// between frames. Cancel-safe: a frame half read stays in the buffer.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buffer)? {
                return Ok(Some(frame));
            }
            // A frame longer than the chunk needs room for all of it.
            let wanted = match self.decoder.frame_len(&self.buffer)? {
                Some(len) => len.saturating_sub(self.buffer.len()).max(self.chunk),
                None => self.chunk,
            };
            if self.buffer.capacity() - self.buffer.len() < wanted / 4 {
                self.buffer.reserve(wanted);
            }
            let room = self.buffer.capacity() - self.buffer.len();
            let read = self.reader.read_buf(&mut self.buffer).await?;
            if read == 0 {
                return match self.buffer.len() {
                    0 => Ok(None),
                    pending => Err(ReadError::Truncated(pending)),
                };
            }
            // Reads that fill the room mean more is waiting: read more at once.
            if read == room {
                self.chunk = (self.chunk * 2).min(MAX_READ_CHUNK);
            }
        }
    }
}

/// Writes every frame that arrives on `queue` to `writer`, gathering what is
/// already queued into one vectored write (no copying). Returns when the
/// queue is closed (after flushing) or a write fails.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: mpsc::Receiver<Bytes>,
) -> io::Result<()> {
    let mut batch: Vec<Bytes> = Vec::new();
    while let Some(first) = queue.recv().await {
        let mut bytes = first.len();
        batch.push(first);
        while bytes < WRITE_BATCH && batch.len() < WRITE_BATCH_FRAMES {
            match queue.try_recv() {
                Ok(frame) => {
                    bytes += frame.len();
                    batch.push(frame);
                }
                Err(_) => break,
            }
        }
        write_all_vectored(&mut writer, &mut batch).await?;
        batch.clear();
    }
    writer.shutdown().await
}

/// Writes all of `frames`, as few syscalls as the writer allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frames: &mut [Bytes],
) -> io::Result<()> {
    let mut first = 0;
    while first < frames.len() {
        let slices: Vec<IoSlice<'_>> = frames[first..].iter().map(|f| IoSlice::new(f)).collect();
        let mut written = writer.write_vectored(&slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let len = frames[first].len();
            if written >= len {
                written -= len;
                first += 1;
            } else {
                frames[first].advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Control;

    #[tokio::test]
    async fn reads_frames_across_tiny_writes() {
        let (client, server) = tokio::io::duplex(7);
        let mut reader = FrameReader::new(server, Decoder::default());
        let frames = [Control::KEEPALIVE.encode(); 3].concat();
        let writer = tokio::spawn(async move {
            let mut client = client;
            client.write_all(&frames).await.expect("write");
        });
        for _ in 0..3 {
            assert_eq!(
                reader.read_frame().await.expect("frame"),
                Some(Frame::Control(Control::KEEPALIVE))
            );
        }
        writer.await.expect("writer");
        assert!(reader.read_frame().await.expect("eof").is_none());
    }

    #[tokio::test]
    async fn eof_mid_frame_is_an_error() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(server, Decoder::default());
        client
            .write_all(&Control::KEEPALIVE.encode()[..10])
            .await
            .expect("write");
        drop(client);
        assert!(matches!(
            reader.read_frame().await,
            Err(ReadError::Truncated(10))
        ));
    }

    #[tokio::test]
    async fn partial_vectored_writes_lose_nothing() {
        // A 7-byte pipe forces writes that stop in the middle of frames.
        let (client, mut server) = tokio::io::duplex(7);
        let (tx, rx) = mpsc::channel(64);
        let frames: Vec<Bytes> = (0..40u8)
            .map(|i| Bytes::from(vec![i; 1 + i as usize]))
            .collect();
        for frame in &frames {
            tx.send(frame.clone()).await.expect("queue");
        }
        drop(tx);
        let writer = tokio::spawn(write_frames(client, rx));
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        writer.await.expect("join").expect("write");
        assert_eq!(got, frames.concat());
    }

    #[tokio::test]
    async fn writer_sends_everything_queued_in_order() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (tx, rx) = mpsc::channel(16);
        for i in 0..10u8 {
            tx.send(Bytes::from(vec![i; 100])).await.expect("queue");
        }
        drop(tx);
        write_frames(client, rx).await.expect("write");
        let mut got = Vec::new();
        let mut server = server;
        server.read_to_end(&mut got).await.expect("read");
        let want: Vec<u8> = (0..10u8).flat_map(|i| vec![i; 100]).collect();
        assert_eq!(got, want);
    }
}
