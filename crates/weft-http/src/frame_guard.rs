//! Frame floods on client HTTP/2 connections that the h2 crate absorbs one cheap frame at a time, for
//! ever: empty DATA frames (CVE-2019-9518) and header blocks split into endless CONTINUATION frames
//! (CVE-2024-27316). The guard reads the frame headers as the bytes pass on their way to h2 and ends
//! the connection when a client floods, as Envoy's codec does
//! (`max_consecutive_inbound_frames_with_empty_payload`, 1 by default).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Empty DATA frames in a row (without END_STREAM) past which a client is flooding (Envoy's default).
const MAX_CONSECUTIVE_EMPTY_DATA: u32 = 1;
/// CONTINUATION frames in one header block past which a client is flooding: a 60 KiB header block
/// needs four at the default frame size.
const MAX_CONTINUATIONS: u32 = 64;

const PREFACE_LEN: usize = 24;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// Where the scan is in the byte stream.
#[derive(Debug)]
struct Scan {
    /// Bytes of the client preface still to pass.
    preface: usize,
    /// The frame header being read.
    header: [u8; 9],
    filled: usize,
    /// Payload bytes of the current frame still to pass.
    payload: usize,
    empty_data: u32,
    continuations: u32,
}

impl Scan {
    fn new() -> Self {
        Self {
            preface: PREFACE_LEN,
            header: [0; 9],
            filled: 0,
            payload: 0,
            empty_data: 0,
            continuations: 0,
        }
    }

    /// Passes `bytes`; the flood found, if any.
    fn pass(&mut self, mut bytes: &[u8]) -> Option<&'static str> {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
            } else if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                self.payload -= n;
                bytes = &bytes[n..];
            } else {
                let n = (9 - self.filled).min(bytes.len());
                self.header[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
                self.filled += n;
                bytes = &bytes[n..];
                if self.filled == 9 {
                    self.filled = 0;
                    if let Some(flood) = self.frame() {
                        return Some(flood);
                    }
                }
            }
        }
        None
    }

    /// Counts the frame whose header was just read.
    fn frame(&mut self) -> Option<&'static str> {
        let [l0, l1, l2, kind, flags, ..] = self.header;
        self.payload = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
        if kind == DATA && self.payload == 0 && flags & END_STREAM == 0 {
            self.empty_data += 1;
            if self.empty_data > MAX_CONSECUTIVE_EMPTY_DATA {
                return Some("empty DATA frames");
            }
        } else {
            self.empty_data = 0;
        }
        match kind {
            HEADERS if flags & END_HEADERS == 0 => self.continuations = 0,
            CONTINUATION => {
                self.continuations += 1;
                if self.continuations > MAX_CONTINUATIONS {
                    return Some("CONTINUATION frames");
                }
            }
            _ => {}
        }
        None
    }
}

pin_project! {
    /// A client HTTP/2 connection whose inbound frames are watched for floods; on one, reads fail and
    /// `flooded` says so.
    #[derive(Debug)]
    pub(crate) struct FrameGuard<S> {
        #[pin]
        inner: S,
        scan: Scan,
        flooded: Arc<Flooded>,
    }
}

/// What a guard found, for whoever ends the connection.
#[derive(Debug, Default)]
pub(crate) struct Flooded(OnceLock<&'static str>);

impl Flooded {
    /// The frames the client flooded, once it has.
    pub(crate) fn what(&self) -> Option<&'static str> {
        self.0.get().copied()
    }
}

impl<S> FrameGuard<S> {
    pub(crate) fn new(inner: S, flooded: Arc<Flooded>) -> Self {
        Self {
            inner,
            scan: Scan::new(),
            flooded,
        }
    }
}

impl<S: AsyncRead> AsyncRead for FrameGuard<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if let Some(flood) = this.scan.pass(&buf.filled()[before..]) {
            let _ = this.flooded.0.set(flood);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, flood)));
        }
        polled
    }
}

impl<S: AsyncWrite> AsyncWrite for FrameGuard<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("small").to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn preface() -> Vec<u8> {
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()
    }

    #[test]
    fn a_second_empty_data_frame_in_a_row_is_a_flood_and_data_between_them_is_not() {
        let mut scan = Scan::new();
        let mut bytes = preface();
        for _ in 0..100 {
            bytes.extend(frame(DATA, 0, 1, b""));
            bytes.extend(frame(DATA, 0, 1, b"x"));
        }
        bytes.extend(frame(DATA, END_STREAM, 1, b""));
        assert_eq!(scan.pass(&bytes), None);
        let flood = [frame(DATA, 0, 3, b""), frame(DATA, 0, 3, b"")].concat();
        assert_eq!(scan.pass(&flood), Some("empty DATA frames"));
    }

    #[test]
    fn endless_continuation_frames_are_a_flood_and_a_large_header_block_is_not() {
        let mut scan = Scan::new();
        let mut bytes = preface();
        bytes.extend(frame(HEADERS, 0, 1, &[0x82]));
        for _ in 0..4 {
            bytes.extend(frame(CONTINUATION, 0, 1, &[0; 16_384]));
        }
        bytes.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x84]));
        assert_eq!(scan.pass(&bytes), None);
        let mut flood = frame(HEADERS, 0, 3, &[0x82]);
        for _ in 0..=MAX_CONTINUATIONS {
            flood.extend(frame(CONTINUATION, 0, 3, &[0x00, 1, b'x', 1, b'y']));
        }
        assert_eq!(scan.pass(&flood), Some("CONTINUATION frames"));
    }

    #[test]
    fn frames_split_across_reads_are_read_whole() {
        let mut scan = Scan::new();
        let bytes = [preface(), frame(DATA, 0, 1, b""), frame(DATA, 0, 1, b"")].concat();
        let (first, second) = bytes.split_at(30);
        assert_eq!(scan.pass(first), None);
        let mut found = None;
        for byte in second {
            found = found.or(scan.pass(std::slice::from_ref(byte)));
        }
        assert_eq!(found, Some("empty DATA frames"));
    }
}
