//! The I/O side of the wire codec: a reader that owns its buffer and yields
//! whole frames, and a writer that drains a queue of encoded frames, many per
//! syscall. Both are generic over any async byte stream, so plain TCP and
//! (later) TLS share them.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::wire::{Decoder, Frame, ProtocolError};

/// Read buffer size: room for a few maximum-size frames per read.
const READ_CHUNK: usize = 256 * 1024;
/// How much the writer gathers from its queue before one write.
const WRITE_BATCH: usize = 256 * 1024;

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
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R, decoder: Decoder) -> Self {
        FrameReader {
            reader,
            buffer: BytesMut::with_capacity(READ_CHUNK),
            decoder,
        }
    }

    /// The next frame, or `Ok(None)` when the peer closed the stream cleanly
    /// between frames. Cancel-safe: a frame half read stays in the buffer.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buffer)? {
                return Ok(Some(frame));
            }
            if self.buffer.capacity() - self.buffer.len() < READ_CHUNK / 4 {
                self.buffer.reserve(READ_CHUNK);
            }
            if self.reader.read_buf(&mut self.buffer).await? == 0 {
                return match self.buffer.len() {
                    0 => Ok(None),
                    pending => Err(ReadError::Truncated(pending)),
                };
            }
        }
    }
}

/// Writes every frame that arrives on `queue` to `writer`, gathering what is
/// already queued into one write. Returns when the queue is closed (after
/// flushing) or a write fails.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: mpsc::Receiver<Bytes>,
) -> io::Result<()> {
    let mut batch = BytesMut::with_capacity(WRITE_BATCH);
    while let Some(first) = queue.recv().await {
        if queue.is_empty() {
            writer.write_all(&first).await?;
            continue;
        }
        batch.extend_from_slice(&first);
        while batch.len() < WRITE_BATCH {
            match queue.try_recv() {
                Ok(frame) => batch.extend_from_slice(&frame),
                Err(_) => break,
            }
        }
        writer.write_all(&batch).await?;
        batch.clear();
    }
    writer.shutdown().await
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
