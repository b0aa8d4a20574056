//! The wire format: versioned, length-delimited frames with a JSON payload.
//!
//! ```text
//! +----------------------+-----------+-------------------------------+
//! | length: u32, BE      | version   | payload: JSON Envelope        |
//! | = 1 + payload bytes  | u8 = 1    | (length - 1 bytes, UTF-8)     |
//! +----------------------+-----------+-------------------------------+
//! ```
//!
//! `length` counts the version byte and the payload, never itself; it is at most
//! [`MAX_FRAME_LEN`]. Decoding never panics on arbitrary bytes: every defect is a typed
//! [`Error`].

use super::message::Envelope;
use crate::protocol::error::{Error, Result};

/// The wire-format version this implementation speaks.
pub const WIRE_VERSION: u8 = 1;

/// Maximum value of a frame's length prefix (version byte + payload): 4 MiB, room for a
/// `LIST` of tens of thousands of registrations.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Encodes one envelope as a complete frame.
///
/// Fails with [`Error::FrameTooLarge`] if the payload would exceed [`MAX_FRAME_LEN`].
///
/// ```
/// use unacloud_snapshot::protocol::*;
/// let env = Envelope::new(ClusterId(7), ParticipantId(0), ParticipantId(3),
///                         Message::TakeSnapshot { gs: GlobalSnapshotId(1) });
/// let frame = encode_frame(&env)?;
/// assert_eq!(frame[4], WIRE_VERSION);
/// assert_eq!(decode_frame(&frame)?, env);
/// # Ok::<(), unacloud_snapshot::protocol::Error>(())
/// ```
pub fn encode_frame(envelope: &Envelope) -> Result<Vec<u8>> {
    let mut frame = Vec::with_capacity(128);
    encode_frame_into(envelope, &mut frame)?;
    Ok(frame)
}

/// Appends one frame to `out` (for drivers that batch frames in one buffer). On error
/// `out` is left as it was.
pub fn encode_frame_into(envelope: &Envelope, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, WIRE_VERSION]);
    if let Err(source) = serde_json::to_writer(&mut *out, envelope) {
        out.truncate(start);
        return Err(Error::MalformedPayload { source });
    }
    let len = out.len() - start - LENGTH_PREFIX_LEN;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(Error::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    // len <= MAX_FRAME_LEN < u32::MAX, so the conversion cannot fail.
    let prefix = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    out[start..start + LENGTH_PREFIX_LEN].copy_from_slice(&prefix);
    Ok(())
}

/// Decodes exactly one complete frame; trailing bytes are an error
/// ([`Error::TrailingBytes`]). Use [`FrameDecoder`] or [`decode_frame_prefix`] for streams.
pub fn decode_frame(bytes: &[u8]) -> Result<Envelope> {
    match decode_frame_prefix(bytes)? {
        Some((envelope, used)) if used == bytes.len() => Ok(envelope),
        Some((_, used)) => Err(Error::TrailingBytes {
            extra: bytes.len() - used,
        }),
        None => Err(Error::TruncatedFrame {
            needed: needed_len(bytes),
            available: bytes.len(),
        }),
    }
}

fn needed_len(bytes: &[u8]) -> usize {
    match bytes.get(..LENGTH_PREFIX_LEN) {
        Some(p) => LENGTH_PREFIX_LEN + u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize,
        None => LENGTH_PREFIX_LEN + 1,
    }
}

/// Decodes the frame at the start of `bytes`, if it is complete.
///
/// Returns `Ok(None)` when more bytes are needed, `Ok(Some((envelope, consumed)))` when a
/// frame was decoded. Header defects (oversize, empty, unknown version) are detected as soon
/// as the first five bytes are there, before the payload arrives.
pub fn decode_frame_prefix(bytes: &[u8]) -> Result<Option<(Envelope, usize)>> {
    let Some(prefix) = bytes.get(..LENGTH_PREFIX_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len == 0 {
        return Err(Error::EmptyFrame);
    }
    if len > MAX_FRAME_LEN {
        return Err(Error::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let Some(&version) = bytes.get(LENGTH_PREFIX_LEN) else {
        return Ok(None);
    };
    if version != WIRE_VERSION {
        return Err(Error::UnsupportedVersion {
            version,
            supported: WIRE_VERSION,
        });
    }
    let end = LENGTH_PREFIX_LEN + len;
    let Some(payload) = bytes.get(LENGTH_PREFIX_LEN + 1..end) else {
        return Ok(None);
    };
    let envelope =
        serde_json::from_slice(payload).map_err(|source| Error::MalformedPayload { source })?;
    Ok(Some((envelope, end)))
}

/// Incremental decoder for a byte stream (a TCP connection): feed bytes as they arrive,
/// take out complete envelopes.
///
/// After a malformed payload the decoder skips that frame (its boundary is known) and can
/// continue; after a header defect (oversize, empty frame, unknown version) the stream
/// cannot be resynchronised and every further call returns the same kind of error — close
/// the connection.
///
/// ```
/// use unacloud_snapshot::protocol::*;
/// let env = Envelope::new(ClusterId(1), ParticipantId(2), ParticipantId(0),
///                         Message::PrecheckOk { gs: GlobalSnapshotId(4) });
/// let frame = encode_frame(&env)?;
/// let mut decoder = FrameDecoder::new();
/// decoder.extend(&frame[..3]);
/// assert_eq!(decoder.next_envelope()?, None);
/// decoder.extend(&frame[3..]);
/// assert_eq!(decoder.next_envelope()?, Some(env));
/// # Ok::<(), unacloud_snapshot::protocol::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    broken: Option<BrokenStream>,
}

#[derive(Debug, Clone, Copy)]
enum BrokenStream {
    Empty,
    TooLarge(usize),
    Version(u8),
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet consumed as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete envelope, `Ok(None)` if more bytes are needed.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>> {
        if let Some(broken) = self.broken {
            return Err(match broken {
                BrokenStream::Empty => Error::EmptyFrame,
                BrokenStream::TooLarge(len) => Error::FrameTooLarge {
                    len,
                    max: MAX_FRAME_LEN,
                },
                BrokenStream::Version(version) => Error::UnsupportedVersion {
                    version,
                    supported: WIRE_VERSION,
                },
            });
        }
        let pending = &self.buf[self.start..];
        match decode_frame_prefix(pending) {
            Ok(Some((envelope, used))) => {
                self.consume(used);
                Ok(Some(envelope))
            }
            Ok(None) => {
                self.compact();
                Ok(None)
            }
            Err(err @ Error::MalformedPayload { .. }) => {
                let used = needed_len(pending);
                self.consume(used);
                Err(err)
            }
            Err(err) => {
                self.broken = match &err {
                    Error::EmptyFrame => Some(BrokenStream::Empty),
                    Error::FrameTooLarge { len, .. } => Some(BrokenStream::TooLarge(*len)),
                    Error::UnsupportedVersion { version, .. } => {
                        Some(BrokenStream::Version(*version))
                    }
                    _ => None,
                };
                Err(err)
            }
        }
    }

    fn consume(&mut self, used: usize) {
        self.start += used;
        if self.start >= self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}
