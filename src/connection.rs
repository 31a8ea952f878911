//! The I/O side of the wire codec: a reader that owns its buffer and yields
//! whole frames, and a writer that drains a queue of encoded frames, many per
//! syscall. Both are generic over any async byte stream, so plain TCP and
//! TLS share them.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;

use crate::budget::{MemoryBudget, SMALL_FRAME};
use crate::codel::{self, Codel, Taken, Verdict};
use crate::limits::NOTSENT_LOWAT;
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
            let (read, room) = std::future::poll_fn(|cx| {
                if self.buffer.capacity() - self.buffer.len() < wanted / 4 {
                    self.buffer.reserve(wanted);
                }
                let room = self.buffer.capacity() - self.buffer.len();
                match poll_read_buf(Pin::new(&mut self.reader), cx, &mut self.buffer) {
                    Poll::Ready(read) => Poll::Ready(read.map(|read| (read, room))),
                    // Nothing to read and nothing kept: an idle peer holds
                    // no read buffer while it waits.
                    Poll::Pending if self.buffer.is_empty() => {
                        self.buffer = BytesMut::new();
                        Poll::Pending
                    }
                    Poll::Pending => Poll::Pending,
                }
            })
            .await?;
            // Reads that fill the room mean more is waiting: read more at once.
            if read == room {
                self.chunk = (self.chunk * 2).min(MAX_READ_CHUNK);
            }
            Ok(read)
        }
    }
}

/// A peer's send queue, bounded in frames and in bytes, counted in the
/// server's memory budget, and kept short in time by CoDel
/// ([`crate::codel`]) as its writer drains it.
pub fn queue(frames: usize, bytes: usize, budget: Option<Arc<MemoryBudget>>) -> (QueueTx, QueueRx) {
    let state = Arc::new(QueueState {
        frames: Mutex::new(VecDeque::new()),
        frame_limit: frames.max(1),
        ready: Notify::new(),
        senders: AtomicUsize::new(1),
        receiver_gone: AtomicBool::new(false),
        bytes: AtomicUsize::new(0),
        byte_limit: bytes,
        budget,
        aqm: AqmCounts::default(),
    });
    (
        QueueTx {
            state: state.clone(),
        },
        QueueRx { state },
    )
}

/// A queue's frames and limits, shared by its senders and its writer. The
/// frames are a `VecDeque` that holds no memory while the queue is empty
/// (the writer gives it back before it waits): an idle peer's queue costs
/// nothing but this struct.
#[derive(Debug)]
struct QueueState {
    frames: Mutex<VecDeque<Queued>>,
    frame_limit: usize,
    /// Woken when a frame is queued or the last sender is gone.
    ready: Notify,
    senders: AtomicUsize,
    receiver_gone: AtomicBool,
    bytes: AtomicUsize,
    byte_limit: usize,
    budget: Option<Arc<MemoryBudget>>,
    aqm: AqmCounts,
}

/// Packets CoDel dropped from a queue, and packets it marked CE instead.
#[derive(Debug, Default)]
pub struct AqmCounts {
    pub dropped: AtomicU64,
    pub marked: AtomicU64,
}

impl AqmCounts {
    const fn new() -> AqmCounts {
        AqmCounts {
            dropped: AtomicU64::new(0),
            marked: AtomicU64::new(0),
        }
    }
}

/// What CoDel dropped and marked in all of this process's queues (the
/// metrics' `simplevpn_drops_total{reason="codel"}` and
/// `simplevpn_ecn_marks_total`).
pub static AQM_TOTAL: AqmCounts = AqmCounts::new();

/// A frame in a queue, with the time it was queued.
#[derive(Debug)]
struct Queued {
    frame: Bytes,
    at: std::time::Instant,
}

impl QueueState {
    /// The frames, whatever a panicking holder of the lock left (a frame
    /// queue has no invariant a half-done push or pop could break).
    fn frames(&self) -> MutexGuard<'_, VecDeque<Queued>> {
        self.frames.lock().unwrap_or_else(PoisonError::into_inner)
    }

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

/// The sending side of a peer's queue; cheap to clone. The queue closes
/// (its writer finishes) when the last one is dropped.
#[derive(Debug)]
pub struct QueueTx {
    state: Arc<QueueState>,
}

impl Clone for QueueTx {
    fn clone(&self) -> Self {
        self.state.senders.fetch_add(1, Ordering::Relaxed);
        QueueTx {
            state: self.state.clone(),
        }
    }
}

impl Drop for QueueTx {
    fn drop(&mut self) {
        if self.state.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.state.ready.notify_one();
        }
    }
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
        let at = std::time::Instant::now();
        let mut frames = state.frames();
        if frames.len() >= state.frame_limit || state.receiver_gone.load(Ordering::Relaxed) {
            drop(frames);
            if let Some(budget) = &state.budget {
                budget.unqueue(len);
            }
            return Err(PushError::Full);
        }
        let frame = match frames.len() >= SHARED_QUEUE_FRAMES {
            true => Bytes::copy_from_slice(&frame),
            false => frame,
        };
        state.bytes.fetch_add(len, Ordering::Relaxed);
        let was_empty = frames.is_empty();
        frames.push_back(Queued { frame, at });
        drop(frames);
        if was_empty {
            state.ready.notify_one();
        }
        Ok(())
    }

    /// Bytes waiting in the queue now.
    pub fn queued_bytes(&self) -> usize {
        self.state.bytes.load(Ordering::Relaxed)
    }

    /// What CoDel dropped and marked in this queue so far.
    pub fn aqm(&self) -> &AqmCounts {
        &self.state.aqm
    }
}

/// The receiving side of a peer's queue, drained by its writer.
#[derive(Debug)]
pub struct QueueRx {
    state: Arc<QueueState>,
}

impl QueueRx {
    /// The next frame, waiting for one; `None` once every sender is gone
    /// and the queue is empty. Before it waits, the queue's memory goes
    /// back to the allocator.
    async fn recv(&mut self) -> Option<Queued> {
        loop {
            {
                let mut frames = self.state.frames();
                if let Some(queued) = frames.pop_front() {
                    drop(frames);
                    self.state.taken(queued.frame.len());
                    return Some(queued);
                }
                *frames = VecDeque::new();
            }
            if self.state.senders.load(Ordering::Acquire) == 0 {
                // The last sender may have queued a frame since the check.
                return self.try_recv_queued();
            }
            // A frame queued since the check left a permit: no lost wake-up.
            self.state.ready.notified().await;
        }
    }

    fn try_recv_queued(&mut self) -> Option<Queued> {
        let queued = self.state.frames().pop_front()?;
        self.state.taken(queued.frame.len());
        Some(queued)
    }

    /// The next queued frame, if one is waiting.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        self.try_recv_queued().map(|queued| queued.frame)
    }

    /// What CoDel makes of a frame taken off the queue at `now`: the frame
    /// (its packet marked CE, perhaps), or `None`: dropped.
    fn judged(&self, codel: &mut Codel, queued: Queued, now: std::time::Instant) -> Option<Bytes> {
        let taken = Taken {
            queued: queued.at,
            len: queued.frame.len(),
            backlog: self.state.bytes.load(Ordering::Relaxed),
            ecn: codel::ecn_of_frame(&queued.frame),
        };
        match codel.judge(now, taken) {
            Verdict::Pass => Some(queued.frame),
            Verdict::Drop => {
                self.state.aqm.dropped.fetch_add(1, Ordering::Relaxed);
                AQM_TOTAL.dropped.fetch_add(1, Ordering::Relaxed);
                None
            }
            Verdict::Mark => {
                let mut frame = BytesMut::from(&queued.frame[..]);
                codel::mark_ce(&mut frame);
                self.state.aqm.marked.fetch_add(1, Ordering::Relaxed);
                AQM_TOTAL.marked.fetch_add(1, Ordering::Relaxed);
                Some(frame.freeze())
            }
        }
    }
}

impl Drop for QueueRx {
    /// What is still queued goes back to the budget; later pushes fail.
    fn drop(&mut self) {
        let frames = {
            let mut frames = self.state.frames();
            self.state.receiver_gone.store(true, Ordering::Relaxed);
            std::mem::take(&mut *frames)
        };
        for queued in frames {
            self.state.taken(queued.frame.len());
        }
    }
}

/// Writes every frame that arrives on `queue` to `writer`, gathering what is
/// already queued into one vectored write (no copying), and dropping or
/// marking packets that waited too long ([`crate::codel`]). Returns when the
/// queue is closed (after flushing) or a write fails.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: QueueRx,
) -> io::Result<()> {
    let mut batch: Vec<Bytes> = Vec::new();
    let mut codel = Codel::default();
    loop {
        let first = match queue.try_recv_queued() {
            Some(queued) => queued,
            None => {
                codel.empty();
                // Idle: the batch's memory goes back too.
                batch = Vec::new();
                match queue.recv().await {
                    Some(queued) => queued,
                    None => break,
                }
            }
        };
        let now = std::time::Instant::now();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(queued) = next {
            if let Some(frame) = queue.judged(&mut codel, queued, now) {
                bytes += frame.len();
                batch.push(frame);
            }
            if bytes >= WRITE_BATCH || batch.len() >= WRITE_BATCH_FRAMES {
                break;
            }
            next = queue.try_recv_queued();
        }
        if !batch.is_empty() {
            write_all_vectored(&mut writer, &mut batch).await?;
            batch.clear();
        }
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
    use tokio::io::AsyncReadExt;

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
    async fn an_idle_reader_and_queue_hold_no_buffers() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(server, Decoder::default());
        client
            .write_all(&Control::KEEPALIVE.encode())
            .await
            .expect("write");
        assert_eq!(
            reader.read_frame().await.expect("frame"),
            Some(Frame::Control(Control::KEEPALIVE))
        );
        // The next read finds nothing: polled once, it gives its buffer back.
        tokio::select! {
            biased;
            read = reader.read_frame() => panic!("read {read:?}"),
            () = std::future::ready(()) => {}
        }
        assert_eq!(reader.buffer.capacity(), 0);
        // And it still reads the frames that follow.
        client
            .write_all(&Control::KEEPALIVE.encode()[..5])
            .await
            .expect("write");
        client
            .write_all(&Control::KEEPALIVE.encode()[5..])
            .await
            .expect("write");
        assert_eq!(
            reader.read_frame().await.expect("frame"),
            Some(Frame::Control(Control::KEEPALIVE))
        );
        // A queue that was used and drained keeps no frames' memory once
        // its writer waits.
        let (tx, mut rx) = queue(64, 1 << 20, None);
        for _ in 0..40 {
            tx.try_push(Bytes::from_static(b"0123456789"))
                .expect("queued");
        }
        while rx.try_recv().is_some() {}
        tokio::select! {
            biased;
            got = rx.recv() => panic!("got {got:?}"),
            () = std::future::ready(()) => {}
        }
        assert_eq!(rx.state.frames().capacity(), 0);
        // Closed once every sender is gone.
        let other = tx.clone();
        drop(tx);
        other.try_push(Bytes::from_static(b"x")).expect("queued");
        drop(other);
        assert_eq!(
            rx.recv().await.map(|q| q.frame),
            Some(Bytes::from_static(b"x"))
        );
        assert!(rx.recv().await.is_none());
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

    #[test]
    fn frames_that_stand_in_the_queue_are_dropped_or_marked_and_control_passes() {
        // An IPv4 packet of 4,000 bytes, ECN-capable or not, with a valid
        // header checksum.
        let packet = |ect: bool| {
            let mut p = vec![0u8; 4000];
            p[0] = 0x45;
            p[1] = if ect { 0x02 } else { 0 };
            p[2..4].copy_from_slice(&4000u16.to_be_bytes());
            p[9] = 17;
            Bytes::from(p)
        };
        let (tx, mut rx) = queue(1000, 16 << 20, None);
        for i in 0..400 {
            tx.try_push(packet(i % 2 == 1)).expect("queued");
            if i == 150 {
                tx.try_push(Bytes::copy_from_slice(&Control::KEEPALIVE.encode()))
                    .expect("queued");
            }
        }
        // Taken off long after they were queued (no sleeping: the time is
        // passed in), one every millisecond.
        let start = std::time::Instant::now() + Duration::from_secs(1);
        let mut codel = Codel::default();
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(queued) = rx.try_recv_queued() {
            let now = start + Duration::from_millis(i);
            i += 1;
            out.extend(rx.judged(&mut codel, queued, now));
        }
        let (dropped, marked) = (
            tx.aqm().dropped.load(Ordering::Relaxed),
            tx.aqm().marked.load(Ordering::Relaxed),
        );
        assert!(
            dropped >= 1 && marked >= 1,
            "{dropped} dropped, {marked} marked"
        );
        assert_eq!(out.len() as u64, 401 - dropped);
        // Nothing in the first interval; the keepalive is never dropped.
        assert_eq!(
            out[..100],
            (0..100).map(|i| packet(i % 2 == 1)).collect::<Vec<_>>()[..]
        );
        assert!(out.contains(&Bytes::copy_from_slice(&Control::KEEPALIVE.encode())));
        let ce: Vec<&Bytes> = out.iter().filter(|f| f[1] & 0b11 == 0b11).collect();
        assert_eq!(ce.len() as u64, marked);
        assert!(ce.iter().all(|f| f[20..] == packet(true)[20..]));
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
