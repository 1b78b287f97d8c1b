//! [`GuardedIo`]: makes unparsable or fragment-carrying HTTP/1 request targets reach the
//! router as ordinary bad ids.
//!
//! Two things happen to request targets before any handler sees them: hyper answers a
//! target with raw non-UTF-8 or control bytes with a bare, bodiless 400, and the `http`
//! crate silently cuts a raw `#fragment` off (so `/sessions/webinars/e/s#x` would be served
//! as if the fragment were not there). Neither gives the caller docs/DESIGN.md's JSON error.
//! This wrapper rewrites, in place and length for length, every such byte inside a request
//! target (`#`, bytes >= 0x80, control bytes) to `%`. A lone `%` is never a valid id, so
//! the router refuses the request with a JSON 400 before anything else happens.
//!
//! It follows request lines with a small state machine: request line, then headers until
//! the empty line, then the next request line. Requests with a body are refused by the
//! handler with `Connection: close`, so body bytes never need tracking. HTTP/2 (a
//! connection that opens with the `PRI * HTTP/2.0` preface) is passed through untouched;
//! there hyper receives `:path` already parsed, so a `#` in it cannot be seen (see the
//! README's limits).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a request line, before the method.
    Method,
    /// Inside the request target (after the first space).
    Target,
    /// After the target, up to the end of the request line.
    Version,
    /// After `PRI ` on the first line: `i` bytes of the HTTP/2 preface matched so far.
    Preface(usize),
    /// In the header block; `blank` tells whether the current line is empty so far.
    Headers { blank: bool },
    /// HTTP/2 or anything we do not understand: pass bytes through.
    PassThrough,
}

#[derive(Debug)]
pub struct GuardedIo<T> {
    inner: T,
    state: State,
    /// Bytes of the current request line's method, to recognise the HTTP/2 preface.
    method: [u8; 4],
    method_len: usize,
    /// Still on the connection's first request line: only there can the HTTP/2 preface
    /// start (a later `PRI` is just a bad HTTP/1 request and must not switch us off).
    first: bool,
}

impl<T> GuardedIo<T> {
    pub fn new(inner: T) -> GuardedIo<T> {
        GuardedIo {
            inner,
            state: State::Method,
            method: [0; 4],
            method_len: 0,
            first: true,
        }
    }

    /// Rewrites `bytes` (newly read) in place, advancing the state machine.
    fn scrub(&mut self, bytes: &mut [u8]) {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::PassThrough => return,
                // Header lines and the version hold nothing to rewrite: skip to the end of
                // the line instead of stepping byte by byte (most bytes are here).
                State::Headers { blank } => {
                    let rest = &bytes[i..];
                    match rest.iter().position(|&b| b == b'\n') {
                        None => {
                            if rest.iter().any(|&b| b != b'\r') {
                                self.state = State::Headers { blank: false };
                            }
                            return;
                        }
                        Some(end) => {
                            let line_blank = blank && rest[..end].iter().all(|&b| b == b'\r');
                            self.state = if line_blank {
                                self.method_len = 0;
                                State::Method
                            } else {
                                State::Headers { blank: true }
                            };
                            i += end + 1;
                        }
                    }
                }
                State::Version => match bytes[i..].iter().position(|&b| b == b'\n') {
                    None => return,
                    Some(end) => {
                        self.state = State::Headers { blank: true };
                        i += end + 1;
                    }
                },
                // The target: skip to its end or to the next byte to rewrite.
                State::Target => {
                    let rest = &mut bytes[i..];
                    match rest.iter().position(|&b| b == b' ' || must_rewrite(b)) {
                        None => return,
                        Some(at) => {
                            self.state = self.step(State::Target, &mut rest[at]);
                            i += at + 1;
                        }
                    }
                }
                state => {
                    self.state = self.step(state, &mut bytes[i]);
                    i += 1;
                }
            }
        }
    }

    /// The state after byte `b` in `state`, rewriting `b` when it must not reach hyper.
    fn step(&mut self, state: State, b: &mut u8) -> State {
        match state {
            State::PassThrough => State::PassThrough,
            State::Method => match *b {
                b' ' => {
                    if self.first && &self.method[..self.method_len] == b"PRI" {
                        State::Preface(0)
                    } else {
                        self.first = false;
                        State::Target
                    }
                }
                b'\r' | b'\n' => State::Method, // blank lines before a request are allowed
                other => {
                    if self.method_len < self.method.len() {
                        self.method[self.method_len] = other;
                        self.method_len += 1;
                    }
                    State::Method
                }
            },
            State::Preface(i) if PREFACE_REST.get(i) == Some(b) => {
                if i + 1 == PREFACE_REST.len() {
                    State::PassThrough
                } else {
                    State::Preface(i + 1)
                }
            }
            State::Preface(i) => {
                // Not the HTTP/2 preface after all: an HTTP/1 request whose target began
                // with the bytes matched so far (nothing in them needs rewriting).
                self.first = false;
                let resume = if i < 2 { State::Target } else { State::Version };
                self.step(resume, b)
            }
            State::Target => match *b {
                b' ' => State::Version,
                // `#`, DEL, non-ASCII and control bytes, bare CR and LF among them (a
                // well-formed line has its version, after a space, before the CRLF).
                c if must_rewrite(c) => {
                    *b = b'%';
                    State::Target
                }
                _ => State::Target,
            },
            State::Version => match *b {
                b'\n' => State::Headers { blank: true },
                _ => State::Version,
            },
            State::Headers { blank } => match *b {
                b'\r' => State::Headers { blank },
                b'\n' if blank => {
                    self.method_len = 0;
                    State::Method
                }
                b'\n' => State::Headers { blank: true },
                _ => State::Headers { blank: false },
            },
        }
    }
}

/// Whether a request-target byte must not reach hyper: `#`, DEL, non-ASCII and control
/// bytes, bare CR and LF among them (a well-formed line has its version, after a space,
/// before the CRLF).
fn must_rewrite(c: u8) -> bool {
    c == b'#' || c == 0x7f || !(0x20..0x80).contains(&c)
}

/// What follows `PRI ` in the HTTP/2 connection preface's first line.
const PREFACE_REST: &[u8] = b"* HTTP/2.0\r\n";

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            this.scrub(&mut buf.filled_mut()[before..]);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrubbed(chunks: &[&[u8]]) -> Vec<u8> {
        let mut g = GuardedIo::new(());
        let mut out = Vec::new();
        for chunk in chunks {
            let mut c = chunk.to_vec();
            g.scrub(&mut c);
            out.extend_from_slice(&c);
        }
        out
    }

    #[test]
    fn fragments_and_raw_bytes_in_targets_become_percent() {
        let out = scrubbed(&[b"GET /s/w/e/s#frag HTTP/1.1\r\nHost: a#b\r\n\r\n"]);
        assert_eq!(out, b"GET /s/w/e/s%frag HTTP/1.1\r\nHost: a#b\r\n\r\n");
        let out = scrubbed(&[b"GET /a\xff\xc3\xa9\x01 HTTP/1.1\r\n\r\n"]);
        assert_eq!(out, b"GET /a%%%% HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn follows_keep_alive_requests_across_chunks() {
        let out = scrubbed(&[
            b"GET /a#1 HTTP/1.1\r\nX: #\r",
            b"\n\r\nGET /b",
            b"#2 HTTP/1.1\r\n\r\n",
        ]);
        assert_eq!(
            out,
            b"GET /a%1 HTTP/1.1\r\nX: #\r\n\r\nGET /b%2 HTTP/1.1\r\n\r\n"
        );
    }

    #[test]
    fn bare_cr_and_lf_in_targets_become_percent() {
        let out = scrubbed(&[b"GET /a\rb HTTP/1.1\r\n\r\nGET /c\nd HTTP/1.1\r\n\r\n"]);
        assert_eq!(out, b"GET /a%b HTTP/1.1\r\n\r\nGET /c%d HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn a_later_pri_does_not_switch_the_guard_off() {
        let out =
            scrubbed(&[b"GET /a HTTP/1.1\r\n\r\nPRI /x HTTP/1.1\r\n\r\nGET /b#f HTTP/1.1\r\n\r\n"]);
        assert_eq!(
            out,
            b"GET /a HTTP/1.1\r\n\r\nPRI /x HTTP/1.1\r\n\r\nGET /b%f HTTP/1.1\r\n\r\n"
        );
        // A first PRI line that is not the preface does not either.
        let out = scrubbed(&[b"PRI /x HTTP/1.1\r\n\r\nGET /b#f HTTP/1.1\r\n\r\n"]);
        assert_eq!(out, b"PRI /x HTTP/1.1\r\n\r\nGET /b%f HTTP/1.1\r\n\r\n");
        let out = scrubbed(&[b"PRI *#x HTTP/1.1\r\n\r\n"]);
        assert_eq!(out, b"PRI *%x HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn any_split_into_reads_scrubs_the_same() {
        let input: &[u8] = b"GET /a#1 HTTP/1.1\r\nHost: x\r\nX: #\xff\r\n\r\nGET /b\x01c HTTP/1.1\r\n\r\nPRI *#x HTTP/1.1\r\n\r\n";
        let whole = scrubbed(&[input]);
        assert_eq!(&whole[..9], b"GET /a%1 ");
        for a in 0..input.len() {
            for b in a..input.len() {
                let split = scrubbed(&[&input[..a], &input[a..b], &input[b..]]);
                assert_eq!(split, whole, "split at {a} and {b}");
            }
        }
    }

    #[test]
    fn http2_preface_passes_through() {
        let input: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00#\xff";
        assert_eq!(scrubbed(&[input]), input);
    }
}
