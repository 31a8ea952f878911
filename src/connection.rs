//! The I/O side of the wire codec: a reader that owns its buffer and yields
//! whole frames, and a writer that drains a queue of encoded frames, many per
//! syscall. Both are generic over any async byte stream, so plain TCP and
//! TLS share them.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
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
/// A connection that found nothing to read (or nothing to write) for this
/// long is idle: its reader and writer give their buffers back. A busy one
/// keeps them from one packet to the next rather than allocating for each.
/// Short, because below a few packets a second an allocation per packet
/// costs nothing worth keeping memory for, while every idle peer's
/// keepalive would otherwise hold its buffers for that long.
const IDLE_AFTER: Duration = Duration::from_millis(200);
/// What an idle reader reads into, on the stack, until bytes come: it holds
/// no buffer of its own while it waits.
const PROBE_LEN: usize = 512;
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
    /// How long a read finds nothing before the buffer goes back.
    idle_after: Duration,
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
            idle_after: IDLE_AFTER,
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
        // A frame longer than the chunk needs room for all of it.
        let wanted = match frame_len {
            Some(len) => len.saturating_sub(self.buffer.len()).max(self.chunk),
            None => self.chunk,
        };
        // Between frames, a buffer kept from the last read goes back once
        // nothing has come for `idle_after`.
        let idle = tokio::time::sleep(self.idle_after);
        tokio::pin!(idle);
        let (read, room) = std::future::poll_fn(|cx| {
            if self.buffer.capacity() == 0 {
                return self
                    .probe(cx, wanted)
                    .map(|read| read.map(|read| (read, usize::MAX)));
            }
            if self.buffer.capacity() - self.buffer.len() < wanted / 4 {
                self.buffer.reserve(wanted);
            }
            let room = self.buffer.capacity() - self.buffer.len();
            match poll_read_buf(Pin::new(&mut self.reader), cx, &mut self.buffer) {
                Poll::Ready(read) => Poll::Ready(read.map(|read| (read, room))),
                Poll::Pending if self.buffer.is_empty() && idle.as_mut().poll(cx).is_ready() => {
                    self.buffer = BytesMut::new();
                    self.chunk = MIN_READ_CHUNK;
                    self.probe(cx, wanted)
                        .map(|read| read.map(|read| (read, usize::MAX)))
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

    /// A read without a buffer of our own (an idle reader's): into the
    /// stack, the buffer made only once bytes arrive.
    fn probe(&mut self, cx: &mut std::task::Context<'_>, wanted: usize) -> Poll<io::Result<usize>> {
        let mut probe = [0u8; PROBE_LEN];
        let mut probe = ReadBuf::new(&mut probe);
        match Pin::new(&mut self.reader).poll_read(cx, &mut probe) {
            Poll::Ready(Ok(())) => {
                let read = probe.filled();
                if !read.is_empty() {
                    self.buffer.reserve(wanted.max(read.len()));
                    self.buffer.extend_from_slice(read);
                }
                Poll::Ready(Ok(read.len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A peer's send queue, bounded in frames and in bytes, counted in the
/// server's memory budget, and kept short in time by CoDel
/// ([`crate::codel`]) as its writer drains it.
pub fn queue(frames: usize, bytes: usize, budget: Option<Arc<MemoryBudget>>) -> (QueueTx, QueueRx) {
    let state = Arc::new(QueueState {
        frames: Mutex::new(VecDeque::new()),
        queued: AtomicUsize::new(0),
        frame_limit: frames.max(1),
        ready: Notify::new(),
        senders: AtomicUsize::new(1),
        receiver_gone: AtomicBool::new(false),
        bytes: AtomicUsize::new(0),
        byte_limit: bytes,
        budget,
        aqm: AqmCounts::new(),
    });
    (
        QueueTx {
            state: state.clone(),
        },
        QueueRx { state },
    )
}

/// A queue's frames and limits, shared by its senders and its writer. The
/// frames are a `VecDeque` that keeps its memory while the peer is busy
/// and holds none once it is idle (the writer gives it back when nothing
/// came for [`IDLE_AFTER`]): an idle peer's queue costs nothing but this
/// struct.
#[derive(Debug)]
struct QueueState {
    frames: Mutex<VecDeque<Queued>>,
    /// How many frames `frames` holds (changed under its lock): a sender
    /// reads it without the lock to decide whether to copy its frame.
    queued: AtomicUsize,
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
#[derive(Debug)]
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
        self.unbudget(len);
    }

    fn unbudget(&self, len: usize) {
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
        // The copy (see SHARED_QUEUE_FRAMES) is made before the lock is
        // taken: the count may be a frame or two off by then, which only
        // moves where copying starts.
        let frame = match state.queued.load(Ordering::Relaxed) >= SHARED_QUEUE_FRAMES {
            true => Bytes::copy_from_slice(&frame),
            false => frame,
        };
        let at = std::time::Instant::now();
        let mut frames = state.frames();
        if frames.len() >= state.frame_limit || state.receiver_gone.load(Ordering::Relaxed) {
            drop(frames);
            state.unbudget(len);
            return Err(PushError::Full);
        }
        state.bytes.fetch_add(len, Ordering::Relaxed);
        let was_empty = frames.is_empty();
        frames.push_back(Queued { frame, at });
        state.queued.store(frames.len(), Ordering::Release);
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
    /// Waits until a frame is queued: false once every sender is gone and
    /// the queue is empty.
    async fn wait(&self) -> bool {
        loop {
            if self.state.queued.load(Ordering::Acquire) > 0 {
                return true;
            }
            if self.state.senders.load(Ordering::Acquire) == 0 {
                // The last sender may have queued a frame since the check.
                return self.state.queued.load(Ordering::Acquire) > 0;
            }
            // A frame queued since the check left a permit: no lost wake-up.
            self.state.ready.notified().await;
        }
    }

    /// Moves the frames at the front of the queue, up to a write's worth
    /// ([`WRITE_BATCH`], [`WRITE_BATCH_FRAMES`]), into `into`, under one
    /// lock. Returns the bytes queued just before the take: CoDel judges
    /// each frame by the backlog behind it, which is that less the frames
    /// taken up to and including it.
    fn take_batch(&self, into: &mut Vec<Queued>) -> usize {
        let (backlog, len) = {
            let mut frames = self.state.frames();
            let backlog = self.state.bytes.load(Ordering::Relaxed);
            let mut len = 0;
            while len < WRITE_BATCH && into.len() < WRITE_BATCH_FRAMES {
                let Some(queued) = frames.pop_front() else {
                    break;
                };
                len += queued.frame.len();
                into.push(queued);
            }
            self.state.bytes.fetch_sub(len, Ordering::Relaxed);
            self.state.queued.store(frames.len(), Ordering::Release);
            (backlog, len)
        };
        self.state.unbudget(len);
        backlog
    }

    /// Gives the queue's memory back to the allocator if it is empty (the
    /// peer is idle).
    fn release(&self) {
        let mut frames = self.state.frames();
        if frames.is_empty() {
            *frames = VecDeque::new();
        }
    }

    fn try_recv_queued(&mut self) -> Option<Queued> {
        let queued = {
            let mut frames = self.state.frames();
            let queued = frames.pop_front()?;
            self.state.queued.store(frames.len(), Ordering::Release);
            queued
        };
        self.state.taken(queued.frame.len());
        Some(queued)
    }

    /// The next queued frame, if one is waiting.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        self.try_recv_queued().map(|queued| queued.frame)
    }

    /// What CoDel makes of a frame taken off the queue at `now`: the frame
    /// (its packet marked CE, perhaps), or `None`: dropped.
    /// `backlog`: the bytes queued behind it when it was taken.
    fn judged(
        &self,
        codel: &mut Codel,
        queued: Queued,
        now: std::time::Instant,
        backlog: usize,
    ) -> Option<Bytes> {
        let taken = Taken {
            queued: queued.at,
            len: queued.frame.len(),
            backlog,
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
            self.state.queued.store(0, Ordering::Release);
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
pub async fn write_frames<W: AsyncWrite + Unpin>(writer: W, queue: QueueRx) -> io::Result<()> {
    write_frames_idle(writer, queue, IDLE_AFTER).await
}

/// [`write_frames`], giving its buffers and the queue's back after finding
/// the queue empty for `idle_after`: a busy peer's writer allocates
/// nothing per frame.
async fn write_frames_idle<W: AsyncWrite + Unpin>(
    mut writer: W,
    queue: QueueRx,
    idle_after: Duration,
) -> io::Result<()> {
    let mut taken: Vec<Queued> = Vec::new();
    let mut batch: Vec<Bytes> = Vec::new();
    let mut codel = Codel::default();
    loop {
        let mut backlog = queue.take_batch(&mut taken);
        if taken.is_empty() {
            codel.empty();
            let more = match tokio::time::timeout(idle_after, queue.wait()).await {
                Ok(more) => more,
                Err(_) => {
                    taken = Vec::new();
                    batch = Vec::new();
                    queue.release();
                    queue.wait().await
                }
            };
            if !more {
                break;
            }
            continue;
        }
        let now = std::time::Instant::now();
        for queued in taken.drain(..) {
            backlog = backlog.saturating_sub(queued.frame.len());
            if let Some(frame) = queue.judged(&mut codel, queued, now, backlog) {
                batch.push(frame);
            }
        }
        if !batch.is_empty() {
            write_all_vectored(&mut writer, &mut batch).await?;
            batch.clear();
        }
    }
    writer.shutdown().await
}

/// Writes all of `frames` (at most [`WRITE_BATCH_FRAMES`] of them go into
/// one syscall), as few syscalls as the writer allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frames: &mut [Bytes],
) -> io::Result<()> {
    let mut first = 0;
    while first < frames.len() {
        // The slices are made on the stack at each poll: held across an
        // await they would sit in every writer task's future, idle or not.
        let mut written = std::future::poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); WRITE_BATCH_FRAMES];
            let mut count = 0;
            for (slice, frame) in slices.iter_mut().zip(&frames[first..]) {
                *slice = IoSlice::new(frame);
                count += 1;
            }
            Pin::new(&mut *writer).poll_write_vectored(cx, &slices[..count])
        })
        .await?;
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
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
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

    /// Counts the allocations each thread makes, so a test can tell how
    /// many a piece of code made (a `#[tokio::test]` runs its tasks on its
    /// own thread).
    struct Counting;

    thread_local! {
        static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    }

    fn count_one() {
        // A thread being torn down counts nothing.
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    }

    fn allocations() -> usize {
        ALLOCATIONS.with(Cell::get)
    }

    // SAFETY: every call goes to the system allocator with the caller's
    // arguments unchanged; counting touches only a thread-local counter.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count_one();
            // SAFETY: the caller's contract is the system allocator's.
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count_one();
            // SAFETY: as above.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count_one();
            // SAFETY: as above.
            unsafe { System.realloc(ptr, layout, new_size) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: as above.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    /// Polls `future` once: whether it was ready.
    async fn poll_once<F: Future>(future: F) -> bool {
        tokio::select! {
            biased;
            _ = future => true,
            () = std::future::ready(()) => false,
        }
    }

    #[tokio::test]
    async fn a_busy_reader_keeps_its_buffer_and_an_idle_one_gives_it_back() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(server, Decoder::default());
        reader.idle_after = Duration::from_secs(3600);
        let keepalive = Control::KEEPALIVE.encode();
        let mut frames = 0;
        let mut busy = async |reader: &mut FrameReader<_>, times: usize| {
            for _ in 0..times {
                // Half a frame, then nothing: the read waits for the rest.
                client.write_all(&keepalive[..5]).await.expect("write");
                assert!(!poll_once(reader.read_frame()).await);
                client.write_all(&keepalive[5..]).await.expect("write");
                assert_eq!(
                    reader.read_frame().await.expect("frame"),
                    Some(Frame::Control(Control::KEEPALIVE))
                );
                frames += 1;
                // Between frames: nothing to read, an empty buffer.
                assert!(!poll_once(reader.read_frame()).await);
            }
        };
        busy(&mut reader, 3).await;
        let before = allocations();
        busy(&mut reader, 200).await;
        let allocated = allocations() - before;
        assert!(allocated <= 2, "{allocated} allocations for 200 frames");
        assert!(reader.buffer.capacity() > 0);
        // Idle: a read that finds nothing for `idle_after` gives the buffer
        // back (and then waits holding none).
        reader.idle_after = Duration::ZERO;
        let waited = tokio::time::timeout(Duration::from_millis(50), reader.read_frame()).await;
        assert!(waited.is_err(), "{waited:?}");
        assert_eq!(reader.buffer.capacity(), 0);
        // It still reads what comes next, however it is cut.
        busy(&mut reader, 2).await;
        assert_eq!(frames, 205);
    }

    #[tokio::test]
    async fn a_busy_writer_allocates_nothing_a_frame_and_an_idle_one_gives_its_memory_back() {
        for idle in [Duration::from_secs(3600), Duration::ZERO] {
            let (client, mut server) = tokio::io::duplex(1 << 16);
            let (tx, rx) = queue(64, 1 << 20, None);
            let state = tx.state.clone();
            let writer = tokio::spawn(write_frames_idle(client, rx, idle));
            let mut got = [0u8; 10];
            let mut one = async |state: &QueueState| {
                tx.try_push(Bytes::from_static(b"0123456789"))
                    .expect("queued");
                server.read_exact(&mut got).await.expect("read");
                assert_eq!(&got, b"0123456789");
                state.frames().capacity()
            };
            for _ in 0..3 {
                one(&state).await;
            }
            let before = allocations();
            for _ in 0..200 {
                let kept = one(&state).await;
                if !idle.is_zero() {
                    assert!(kept > 0, "the queue gave its memory back while busy");
                }
            }
            let allocated = allocations() - before;
            if idle.is_zero() {
                // Idle after each frame: the writer gives everything back
                // (and allocates again for the next frame).
                let mut waits = 0;
                while state.frames().capacity() > 0 && waits < 5000 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    waits += 1;
                }
                assert_eq!(state.frames().capacity(), 0);
            } else {
                assert!(allocated <= 2, "{allocated} allocations for 200 frames");
            }
            drop(tx);
            writer.await.expect("join").expect("write");
        }
    }

    #[test]
    fn a_batch_is_taken_in_one_piece_with_the_backlog_before_it() {
        let (tx, rx) = queue(1000, 1 << 30, None);
        for i in 1..=100u8 {
            tx.try_push(Bytes::from(vec![i; usize::from(i)]))
                .expect("queued");
        }
        let total: usize = (1..=100).sum();
        let mut taken = Vec::new();
        assert_eq!(rx.take_batch(&mut taken), total);
        assert_eq!(taken.len(), WRITE_BATCH_FRAMES);
        assert!(taken.iter().zip(1..).all(|(q, i)| q.frame.len() == i));
        let first: usize = (1..=WRITE_BATCH_FRAMES).sum();
        assert_eq!(tx.queued_bytes(), total - first);
        taken.clear();
        assert_eq!(rx.take_batch(&mut taken), total - first);
        assert_eq!(taken.len(), 100 - WRITE_BATCH_FRAMES);
        // Empty now, and an empty queue gives its memory back.
        taken.clear();
        assert_eq!(rx.take_batch(&mut taken), 0);
        assert!(taken.is_empty());
        assert!(rx.state.frames().capacity() > 0);
        rx.release();
        assert_eq!(rx.state.frames().capacity(), 0);
    }

    #[tokio::test]
    async fn a_queue_closes_once_every_sender_is_gone() {
        let (tx, mut rx) = queue(64, 1 << 20, None);
        let other = tx.clone();
        drop(tx);
        other.try_push(Bytes::from_static(b"x")).expect("queued");
        drop(other);
        assert!(rx.wait().await);
        assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"x")));
        assert!(!rx.wait().await);
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
        let (tx, rx) = queue(1000, 16 << 20, None);
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
        let mut taken = Vec::new();
        loop {
            let mut backlog = rx.take_batch(&mut taken);
            if taken.is_empty() {
                break;
            }
            for queued in taken.drain(..) {
                let now = start + Duration::from_millis(i);
                i += 1;
                backlog -= queued.frame.len();
                out.extend(rx.judged(&mut codel, queued, now, backlog));
            }
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
