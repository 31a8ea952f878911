//! The I/O side of the wire codec: a reader that owns its buffer and yields
//! whole frames, and a writer that drains a queue of encoded frames, many per
//! syscall. Both are generic over any async byte stream, so plain TCP and
//! (later) TLS share them.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;

use crate::budget::{MemoryBudget, SMALL_FRAME};
use crate::wire::{Decoder, Frame};

/// A connection's read buffer starts this small (an idle peer costs little)
/// and grows, while reads keep filling it, up to `MAX_READ_CHUNK`: room for
/// a few maximum-size frames per read under load.
const MIN_READ_CHUNK: usize = 1024;
const MAX_READ_CHUNK: usize = 256 * 1024;
/// How much the writer gathers from its queue before one write.
const WRITE_BATCH: usize = 256 * 1024;
/// At most this many frames per write (IOV_MAX is 1024).
const WRITE_BATCH_FRAMES: usize = 64;
/// Frames queued for a peer beyond this many are copied into buffers of
/// their own size: a peer that does not drain must not pin the large read
/// buffers its senders' frames were cut from (a few small packets could
/// otherwise hold whole 256 KiB chunks). A draining peer's queue stays
/// short, so the fast path copies nothing.
const SHARED_QUEUE_FRAMES: usize = 32;

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

pub use simplevpn_proto::wire::ReadError;

/// Reads frames from a byte stream, however TCP splits or joins them.
pub struct FrameReader<R> {
    reader: R,
    buffer: BytesMut,
    decoder: Decoder,
    /// How much room to make before the next read.
    chunk: usize,
    /// Where a large frame's bytes are reserved before they are read.
    budget: Option<Arc<MemoryBudget>>,
    /// The reservation of the frame being read.
    reserved: Option<OwnedSemaphorePermit>,
    /// How long a frame may take from its first byte to its last.
    frame_timeout: Option<Duration>,
    /// When the frame at the front of the buffer began to arrive.
    partial_since: Option<Instant>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R, decoder: Decoder) -> Self {
        FrameReader {
            reader,
            buffer: BytesMut::new(),
            decoder,
            chunk: MIN_READ_CHUNK,
            budget: None,
            reserved: None,
            frame_timeout: None,
            partial_since: None,
        }
    }

    /// This reader, with frames larger than [`SMALL_FRAME`] reserved from
    /// `budget` before they are read, and every frame due whole within
    /// `frame_timeout` of its first byte.
    pub fn with_limits(mut self, budget: Arc<MemoryBudget>, frame_timeout: Duration) -> Self {
        self.budget = Some(budget);
        self.frame_timeout = Some(frame_timeout);
        self
    }

    /// Decodes the frames still to come with `decoder` (the connection
    /// agreed on extension frames, say); bytes already read but not yet
    /// decoded are decoded with it too.
    pub fn set_decoder(&mut self, decoder: Decoder) {
        self.decoder = decoder;
    }

    /// The next frame, or `Ok(None)` when the peer closed the stream cleanly
    /// between frames. Cancel-safe: a frame half read stays in the buffer.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buffer)? {
                self.reserved = None;
                self.partial_since = None;
                return Ok(Some(frame));
            }
            let frame_len = self.decoder.frame_len(&self.buffer)?;
            let deadline = match (self.frame_timeout, self.buffer.is_empty()) {
                (Some(timeout), false) => {
                    Some(*self.partial_since.get_or_insert_with(Instant::now) + timeout)
                }
                _ => None,
            };
            let frame_timeout = self.frame_timeout;
            let next = self.read_more(frame_len);
            let read =
                match (deadline, frame_timeout) {
                    (Some(deadline), Some(timeout)) => tokio::time::timeout_at(deadline, next)
                        .await
                        .map_err(|_| ReadError::FrameTimeout(timeout))??,
                    _ => next.await?,
                };
            if read == 0 {
                return match self.buffer.len() {
                    0 => Ok(None),
                    pending => Err(ReadError::Truncated(pending)),
                };
            }
        }
    }

    /// Reads what comes next into the buffer (first reserving a large
    /// frame's bytes from the budget); the number of bytes read.
    async fn read_more(&mut self, frame_len: Option<usize>) -> io::Result<usize> {
        if let (Some(budget), Some(len), None) = (&self.budget, frame_len, &self.reserved) {
            if len > SMALL_FRAME {
                self.reserved = budget.reserve_read(len).await;
            }
        }
        {
            // A frame longer than the chunk needs room for all of it.
            let wanted = match frame_len {
                Some(len) => len.saturating_sub(self.buffer.len()).max(self.chunk),
                None => self.chunk,
            };
            if self.buffer.capacity() - self.buffer.len() < wanted / 4 {
                self.buffer.reserve(wanted);
            }
            let room = self.buffer.capacity() - self.buffer.len();
            let read = self.reader.read_buf(&mut self.buffer).await?;
            // Reads that fill the room mean more is waiting: read more at once.
            if read == room {
                self.chunk = (self.chunk * 2).min(MAX_READ_CHUNK);
            }
            Ok(read)
        }
    }
}

/// A peer's send queue, bounded in frames and in bytes, and counted in the
/// server's memory budget.
pub fn queue(frames: usize, bytes: usize, budget: Option<Arc<MemoryBudget>>) -> (QueueTx, QueueRx) {
    let (tx, rx) = mpsc::channel(frames.max(1));
    let state = Arc::new(QueueState {
        bytes: AtomicUsize::new(0),
        byte_limit: bytes,
        budget,
    });
    (
        QueueTx {
            tx,
            state: state.clone(),
        },
        QueueRx { rx, state },
    )
}

#[derive(Debug)]
struct QueueState {
    bytes: AtomicUsize,
    byte_limit: usize,
    budget: Option<Arc<MemoryBudget>>,
}

impl QueueState {
    fn taken(&self, len: usize) {
        self.bytes.fetch_sub(len, Ordering::Relaxed);
        if let Some(budget) = &self.budget {
            budget.unqueue(len);
        }
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The peer's queue is full (frames or bytes), or closed.
    Full,
    /// The server's memory budget for queued bytes is spent.
    OverBudget,
}

/// The sending side of a peer's queue; cheap to clone.
#[derive(Debug, Clone)]
pub struct QueueTx {
    tx: mpsc::Sender<Bytes>,
    state: Arc<QueueState>,
}

impl QueueTx {
    /// Queues `frame` without waiting.
    pub fn try_push(&self, frame: Bytes) -> Result<(), PushError> {
        let len = frame.len();
        let state = &self.state;
        if state.bytes.load(Ordering::Relaxed) + len > state.byte_limit {
            return Err(PushError::Full);
        }
        if let Some(budget) = &state.budget {
            if !budget.try_queue(len) {
                return Err(PushError::OverBudget);
            }
        }
        let waiting = self.tx.max_capacity() - self.tx.capacity();
        let frame = match waiting >= SHARED_QUEUE_FRAMES {
            true => Bytes::copy_from_slice(&frame),
            false => frame,
        };
        state.bytes.fetch_add(len, Ordering::Relaxed);
        match self.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(_) => {
                state.taken(len);
                Err(PushError::Full)
            }
        }
    }

    /// Bytes waiting in the queue now.
    pub fn queued_bytes(&self) -> usize {
        self.state.bytes.load(Ordering::Relaxed)
    }
}

/// The receiving side of a peer's queue, drained by its writer.
#[derive(Debug)]
pub struct QueueRx {
    rx: mpsc::Receiver<Bytes>,
    state: Arc<QueueState>,
}

impl QueueRx {
    async fn recv(&mut self) -> Option<Bytes> {
        let frame = self.rx.recv().await?;
        self.state.taken(frame.len());
        Some(frame)
    }

    /// The next queued frame, if one is waiting.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        let frame = self.rx.try_recv().ok()?;
        self.state.taken(frame.len());
        Some(frame)
    }
}

impl Drop for QueueRx {
    /// What is still queued goes back to the budget.
    fn drop(&mut self) {
        self.rx.close();
        while self.try_recv().is_some() {}
    }
}

/// Writes every frame that arrives on `queue` to `writer`, gathering what is
/// already queued into one vectored write (no copying). Returns when the
/// queue is closed (after flushing) or a write fails.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: QueueRx,
) -> io::Result<()> {
    let mut batch: Vec<Bytes> = Vec::new();
    while let Some(first) = queue.recv().await {
        let mut bytes = first.len();
        batch.push(first);
        while bytes < WRITE_BATCH && batch.len() < WRITE_BATCH_FRAMES {
            match queue.try_recv() {
                Some(frame) => {
                    bytes += frame.len();
                    batch.push(frame);
                }
                None => break,
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
        let (tx, rx) = queue(64, 1 << 20, None);
        let frames: Vec<Bytes> = (0..40u8)
            .map(|i| Bytes::from(vec![i; 1 + i as usize]))
            .collect();
        for frame in &frames {
            tx.try_push(frame.clone()).expect("queue");
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
        let (tx, rx) = queue(16, 1 << 20, None);
        for i in 0..10u8 {
            tx.try_push(Bytes::from(vec![i; 100])).expect("queue");
        }
        drop(tx);
        write_frames(client, rx).await.expect("write");
        let mut got = Vec::new();
        let mut server = server;
        server.read_to_end(&mut got).await.expect("read");
        let want: Vec<u8> = (0..10u8).flat_map(|i| vec![i; 100]).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn queues_are_bounded_in_bytes_and_in_the_budget() {
        let budget = MemoryBudget::new(4 << 20);
        let (tx, mut rx) = queue(100, 3000, Some(budget.clone()));
        tx.try_push(Bytes::from(vec![1; 2000])).expect("fits");
        assert_eq!(
            tx.try_push(Bytes::from(vec![2; 1001])),
            Err(PushError::Full)
        );
        tx.try_push(Bytes::from(vec![3; 1000]))
            .expect("fits exactly");
        assert_eq!((tx.queued_bytes(), budget.queued()), (3000, 3000));
        assert_eq!(rx.try_recv().map(|f| f.len()), Some(2000));
        assert_eq!((tx.queued_bytes(), budget.queued()), (1000, 1000));
        // Another queue finds the budget spent.
        let (other, other_rx) = queue(100, 8 << 20, Some(budget.clone()));
        let huge = Bytes::from(vec![0; 3 << 20]);
        assert_eq!(other.try_push(huge), Err(PushError::OverBudget));
        // A dropped receiver gives back what was still queued.
        drop(rx);
        drop(other_rx);
        assert_eq!(budget.queued(), 0);
    }

    #[test]
    fn a_lagging_peers_frames_do_not_pin_their_senders_buffer() {
        let (tx, mut rx) = queue(1000, 1 << 30, None);
        let mut chunk = BytesMut::from(&[7u8; 256 * 1024][..]);
        let mut first = Vec::new();
        for _ in 0..SHARED_QUEUE_FRAMES + 4 {
            let frame = chunk.split_to(40).freeze();
            first.push(frame.as_ptr());
            tx.try_push(frame).expect("queued");
        }
        let got: Vec<Bytes> = std::iter::from_fn(|| rx.try_recv()).collect();
        // The first frames share the chunk (no copy while the queue is short);
        // later ones are copies of their own size.
        assert!(got[..SHARED_QUEUE_FRAMES]
            .iter()
            .zip(&first)
            .all(|(f, p)| f.as_ptr() == *p));
        assert!(got[SHARED_QUEUE_FRAMES..]
            .iter()
            .zip(&first[SHARED_QUEUE_FRAMES..])
            .all(|(f, p)| f.as_ptr() != *p && f.len() == 40));
    }

    #[tokio::test]
    async fn a_frame_must_complete_within_the_frame_timeout() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let budget = MemoryBudget::new(4 << 20);
        let mut reader = FrameReader::new(server, Decoder::default())
            .with_limits(budget.clone(), Duration::from_secs(1));
        // The header of a 60,000-byte packet and a little of its body.
        let mut start = vec![0u8; 1000];
        start[0] = 0x45;
        start[2..4].copy_from_slice(&60_000u16.to_be_bytes());
        client.write_all(&start).await.expect("write");
        let read = reader.read_frame().await;
        assert!(matches!(read, Err(ReadError::FrameTimeout(_))), "{read:?}");
        // It held its reservation while it waited; a new reader may reserve.
        assert_eq!(budget.reading(), 60_000);
        drop(reader);
        assert_eq!(budget.reading(), 0);
    }
}
