//! A connection's stream with a write deadline: a client that stops reading
//! an answer (its receive window full, so every write waits) has the
//! connection closed after [`super::write_timeout`] without progress, and
//! frees its slot of [`super::MAX_CONNECTIONS`] for other clients. Progress
//! (any byte written) restarts the deadline, so a slow reader of a large
//! answer is not cut off while it keeps reading.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `S` whose writes fail with [`io::ErrorKind::TimedOut`] once one has
/// waited longer than the timeout without progress.
#[derive(Debug)]
pub struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    /// Armed while a write waits; `None` once it made progress.
    waiting: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    /// `inner` with writes bounded by `timeout` without progress.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            waiting: None,
        }
    }

    /// What a write that returned `poll` means for the deadline: progress
    /// (or an error) disarms it; a wait arms it, and fails once it expired.
    fn bound<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.waiting = None;
            return poll;
        }
        let timeout = self.timeout;
        let sleep = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.waiting = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the client read nothing for {} ms: connection closed",
                        timeout.as_millis()
                    ),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bound(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bound(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.bound(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::routes::tests::run;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn test_a_reader_that_stops_fails_the_write_after_the_timeout() {
        run(async {
            // A 1 KiB pipe that nobody reads: the writes wait once it is full.
            let (client, server) = tokio::io::duplex(1024);
            let mut stream = WriteDeadline::new(server, Duration::from_millis(50));
            let start = std::time::Instant::now();
            let error = stream
                .write_all(&vec![0u8; 64 * 1024])
                .await
                .expect_err("the write cannot finish");
            assert_eq!(error.kind(), io::ErrorKind::TimedOut);
            assert!(start.elapsed() >= Duration::from_millis(50));
            drop(client);
        });
    }

    #[test]
    fn test_a_slow_reader_that_keeps_reading_is_served() {
        run(async {
            let (mut client, server) = tokio::io::duplex(1024);
            let mut stream = WriteDeadline::new(server, Duration::from_millis(200));
            let reader = tokio::spawn(async move {
                let mut total = 0;
                let mut chunk = [0u8; 512];
                loop {
                    // Slower than the writer, faster than the deadline.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    match tokio::io::AsyncReadExt::read(&mut client, &mut chunk).await {
                        Ok(0) | Err(_) => return total,
                        Ok(n) => total += n,
                    }
                }
            });
            stream.write_all(&vec![1u8; 32 * 1024]).await.unwrap();
            stream.shutdown().await.unwrap();
            drop(stream);
            assert_eq!(reader.await.unwrap(), 32 * 1024);
        });
    }
}
