//! A read-ahead buffer under russh on the SSH socket.
//!
//! russh reads each packet with small `read_exact` calls: the first cipher
//! block, then the rest of the packet. Straight on the socket that is two
//! or three `recvfrom` per packet (the last one `EAGAIN`), and a wake-up of
//! the session task for each. [`ReadAhead`] takes whatever the kernel holds
//! in one read and serves russh's small reads from memory.
//!
//! Memory per idle tunnel is the concern: a thousand idle sessions must not
//! pin a thousand buffers. So the buffer is allocated only when the socket
//! is readable, and released as soon as it is drained and the socket has
//! nothing more: an idle session's reader waits for readiness with no
//! buffer at all. While data keeps coming, the one allocation is reused.
//! A read asking for at least the buffer's size bypasses it, so russh's
//! read of a large packet body costs no extra copy.
//!
//! Writes, flush and shutdown go straight to the socket: russh already
//! batches its writes (one `write_all` per session-loop turn).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read ahead at most in one read. Big enough for several full-size
/// packets of the default 32 KiB, and for the kernel's usual backlog on a
/// busy SSH socket; a read of a bigger packet's body bypasses the buffer.
pub const READ_AHEAD: usize = 128 * 1024;

/// A socket whose readiness can be awaited without handing it a buffer.
/// That is what lets an idle reader wait with no buffer allocated.
pub trait ReadinessSource: AsyncRead + AsyncWrite + Unpin {
    /// Ready when a read would not block (data, EOF or an error).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Reads without blocking into `buf`'s spare capacity (so the buffer
    /// needs no zero-fill); `WouldBlock` clears the readiness.
    fn try_read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize>;
    /// Clears the read readiness without a syscall, after a read that
    /// returned less than it asked for: on an edge-triggered reactor that
    /// already shows the socket drained (tokio's own `poll_read` does the
    /// same), and data that arrives later raises a new edge.
    fn clear_read_ready(&self);
}

impl ReadinessSource for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
    fn try_read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        tokio::net::TcpStream::try_read_buf(self, buf)
    }
    fn clear_read_ready(&self) {
        // `try_io` clears the readiness when its closure says WouldBlock.
        let _ = self.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }
}

impl ReadinessSource for tokio::net::UnixStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::UnixStream::poll_read_ready(self, cx)
    }
    fn try_read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        tokio::net::UnixStream::try_read_buf(self, buf)
    }
    fn clear_read_ready(&self) {
        // `try_io` clears the readiness when its closure says WouldBlock.
        let _ = self.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }
}

/// A socket with a read-ahead buffer that exists only while it holds data
/// or the socket is readable (see the module doc).
pub struct ReadAhead<S> {
    inner: S,
    /// No allocation while idle; `capacity` bytes otherwise. Unread bytes
    /// are `buf[pos..]`.
    buf: Vec<u8>,
    pos: usize,
    capacity: usize,
}

impl<S: ReadinessSource> ReadAhead<S> {
    /// Wraps `inner` with the default read-ahead size.
    pub fn new(inner: S) -> ReadAhead<S> {
        ReadAhead::with_capacity(READ_AHEAD, inner)
    }

    /// Wraps `inner`, reading ahead up to `capacity` bytes (at least 1).
    pub fn with_capacity(capacity: usize, inner: S) -> ReadAhead<S> {
        ReadAhead {
            inner,
            buf: Vec::new(),
            pos: 0,
            capacity: capacity.max(1),
        }
    }

    /// Bytes of buffer currently allocated: zero while idle.
    #[cfg(test)]
    pub fn allocated(&self) -> usize {
        self.buf.capacity()
    }

    fn release(&mut self) {
        self.buf = Vec::new();
        self.pos = 0;
    }
}

impl<S: ReadinessSource> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.pos == this.buf.len() {
            // Nothing buffered. A read as big as the buffer gains nothing
            // from it: hand it to the socket directly.
            // The drained buffer is kept for the next small read (russh
            // alternates them with big ones), unless the socket is quiet
            // or at its end.
            if out.remaining() >= this.capacity {
                let before = out.filled().len();
                let read = Pin::new(&mut this.inner).poll_read(cx, out);
                if !matches!(read, Poll::Ready(Ok(()))) || out.filled().len() == before {
                    this.release();
                }
                return read;
            }
            loop {
                match this.inner.poll_read_ready(cx) {
                    // Drained and the socket has nothing more: drop the
                    // buffer before waiting, so a quiet socket holds none.
                    Poll::Pending => {
                        this.release();
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => {
                        this.release();
                        return Poll::Ready(Err(e));
                    }
                    Poll::Ready(Ok(())) => {}
                }
                this.pos = 0;
                this.buf.clear();
                if this.buf.capacity() < this.capacity {
                    this.buf = Vec::with_capacity(this.capacity);
                }
                let asked = this.buf.capacity();
                match this.inner.try_read_buf(&mut this.buf) {
                    // EOF: nothing more will come, keep nothing.
                    Ok(0) => {
                        this.release();
                        return Poll::Ready(Ok(()));
                    }
                    Ok(n) => {
                        // A short read drained the socket: the next look
                        // waits for new data instead of reading EAGAIN
                        // (one syscall fewer per burst of packets).
                        if n < asked {
                            this.inner.clear_read_ready();
                        }
                        break;
                    }
                    // Readiness is cleared; the next look waits.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        this.release();
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
        let n = out.remaining().min(this.buf.len() - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: ReadinessSource> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    /// Bounds every read of these tests: a bug that loses a byte makes a
    /// `read_exact` wait forever, and a test must fail instead.
    const LIMIT: Duration = Duration::from_secs(20);

    async fn bounded<T>(f: impl std::future::Future<Output = io::Result<T>>) -> T {
        tokio::time::timeout(LIMIT, f)
            .await
            .expect("read timed out: bytes lost?")
            .unwrap()
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random()).collect()
    }

    /// Every byte arrives once and in order, whatever the sizes of the
    /// writes and of the reads (small ones through the buffer, big ones
    /// past it), with the writer pausing so reads also find the socket
    /// empty mid-stream.
    #[tokio::test]
    async fn bytes_arrive_exactly_in_order_across_arbitrary_read_sizes() {
        for seed in 0..6u64 {
            let (a, mut b) = UnixStream::pair().unwrap();
            let capacity = [1, 7, 1000, 4096, 65536, READ_AHEAD][seed as usize];
            let mut r = ReadAhead::with_capacity(capacity, a);
            let data = pattern(1 << 20, seed);
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 100);
                let mut at = 0;
                while at < sent.len() {
                    let n = rng.random_range(1..=70_000).min(sent.len() - at);
                    b.write_all(&sent[at..at + n]).await.unwrap();
                    at += n;
                    if rng.random_range(0..8) == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                b.shutdown().await.unwrap();
            });
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 200);
            let mut got = Vec::with_capacity(data.len());
            loop {
                let want = match rng.random_range(0..4) {
                    0 => 4,
                    1 => rng.random_range(1..64),
                    2 => rng.random_range(1..=capacity * 2 + 1),
                    _ => rng.random_range(1..=200_000),
                };
                let mut buf = vec![0u8; want];
                let n = bounded(r.read(&mut buf)).await;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            writer.await.unwrap();
            assert_eq!(got.len(), data.len(), "capacity {capacity}");
            assert!(got == data, "bytes differ with capacity {capacity}");
            assert_eq!(r.allocated(), 0, "a buffer outlived EOF");
        }
    }

    /// An idle socket holds no buffer: once drained and quiet, the buffer
    /// is released, and a read bigger than the buffer never allocates one.
    #[tokio::test]
    async fn the_buffer_is_released_when_drained_and_never_taken_for_big_reads() {
        use futures_util::FutureExt;
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut r = ReadAhead::with_capacity(1000, a);
        b.write_all(b"0123456789").await.unwrap();
        let mut four = [0u8; 4];
        bounded(r.read_exact(&mut four)).await;
        assert_eq!(&four, b"0123");
        assert!(r.allocated() >= 1000, "small reads go through the buffer");
        let mut six = [0u8; 6];
        bounded(r.read_exact(&mut six)).await;
        assert_eq!(&six, b"456789");
        // Nothing more to read: the read waits, and the buffer is gone.
        assert!(r.read(&mut four).now_or_never().is_none());
        assert_eq!(r.allocated(), 0, "an idle reader kept its buffer");

        let big = pattern(5000, 9);
        b.write_all(&big).await.unwrap();
        let mut got = vec![0u8; 5000];
        bounded(r.read_exact(&mut got)).await;
        assert!(got == big);
        assert_eq!(r.allocated(), 0, "a read bigger than the buffer used it");
    }

    /// A short read clears the readiness without a syscall; data arriving
    /// afterwards, at once or later, must still wake the reader, and a
    /// full read must not clear it.
    #[tokio::test]
    async fn data_after_a_short_read_still_wakes_the_reader() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut r = ReadAhead::with_capacity(1000, a);
        for round in 0..50u64 {
            let msg = pattern(10 + round as usize, round);
            b.write_all(&msg).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            bounded(r.read_exact(&mut got)).await;
            assert_eq!(got, msg, "round {round}");
            // The next read starts before its data is written.
            let next = pattern(7, round + 100);
            let writer = async {
                if round % 2 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                b.write_all(&next).await
            };
            let mut seven = [0u8; 7];
            let (w, rd) = tokio::join!(writer, bounded(r.read_exact(&mut seven)));
            w.unwrap();
            assert_eq!(rd, 7);
            assert_eq!(&seven[..], &next[..], "round {round}");
        }
        // A read that fills the buffer proves nothing about the socket:
        // its readiness must stay, or the rest waits for an edge that never
        // comes. 2500 bytes through a 1000-byte buffer, 100 at a time.
        let big = pattern(2500, 7);
        b.write_all(&big).await.unwrap();
        let mut got = Vec::new();
        while got.len() < big.len() {
            let mut piece = [0u8; 100];
            bounded(r.read_exact(&mut piece)).await;
            got.extend_from_slice(&piece);
        }
        assert!(got == big, "bytes after a full read");
    }

    /// Writes (plain and vectored), flush and shutdown reach the socket
    /// unchanged while reads go through the buffer.
    #[tokio::test]
    async fn writes_flush_and_shutdown_pass_through() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut r = ReadAhead::with_capacity(64, a);
        b.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        bounded(r.read_exact(&mut got)).await;
        assert_eq!(&got, b"ping");

        r.write_all(b"hello ").await.unwrap();
        let parts = [io::IoSlice::new(b"vectored "), io::IoSlice::new(b"world")];
        // A Unix socket pair takes 14 bytes at once: no short write here.
        assert_eq!(r.write_vectored(&parts).await.unwrap(), 14);
        r.flush().await.unwrap();
        r.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        bounded(b.read_to_end(&mut echoed)).await;
        assert_eq!(echoed, b"hello vectored world");

        // Shutdown closed our write side only: reads still work.
        b.write_all(b"after").await.unwrap();
        drop(b);
        let mut rest = Vec::new();
        bounded(r.read_to_end(&mut rest)).await;
        assert_eq!(rest, b"after");
    }
}
