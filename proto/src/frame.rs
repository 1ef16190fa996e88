//! Length-prefixed frames: a 4-byte big-endian length, then one postcard-encoded [`Message`].
//!
//! Chunk data is not copied on its way through: [`encode_chunk_batch`] leaves a batch's payload out
//! of the frame's head, to be written after it as it is, and [`decode`] hands a batch's payload out as
//! a slice of the frame it came in.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::message::{ChunkBatch, Codec, Message};
use crate::packed::{self, PackError, UnpackError};

/// The first byte of a [`Message::ChunkBatch`]'s body: postcard's index of that variant (frozen, like
/// every variant's, by the golden frames).
const CHUNK_BATCH_TAG: u8 = 6;

/// The first byte of a [`Message::Changes`]'s body, followed by the batch as
/// [`packed::pack_changes`] makes it (a byte string), not by postcard's encoding of the changes.
const CHANGES_TAG: u8 = 3;

/// The same for [`Message::Need`] and [`packed::pack_needs`].
const NEED_TAG: u8 = 5;

/// The largest frame accepted, checked before any allocation: a batch of 4 MiB of chunk data (the
/// sender's limit) plus its chunk list, or a few thousand manifest changes, fit with room.
pub const MAX_FRAME_LEN: usize = 8 << 20;

/// Bytes that are not a valid frame.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The declared length is over [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes is over the {MAX_FRAME_LEN}-byte limit")]
    TooLong(usize),
    /// The frame's bytes are not a message.
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
    /// A batch of changes that does not unpack.
    #[error("malformed changes: {0}")]
    Changes(#[from] UnpackError),
}

/// A message too large to send.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// Over [`MAX_FRAME_LEN`].
    #[error("message of {0} bytes is over the {MAX_FRAME_LEN}-byte limit")]
    TooLong(usize),
    /// Serialisation failed.
    #[error("cannot encode: {0}")]
    Postcard(#[from] postcard::Error),
    /// A list of changes or needs could not be packed.
    #[error(transparent)]
    Pack(#[from] PackError),
}

/// Appends one frame to `out`.
pub fn encode(message: &Message, out: &mut BytesMut) -> Result<(), EncodeError> {
    match message {
        Message::Changes(batch) => {
            encode_body(&(u32::from(CHANGES_TAG), packed::pack_changes(batch)?.as_slice()), 0, out)
        }
        Message::Need(needs) => encode_body(&(u32::from(NEED_TAG), packed::pack_needs(needs)?.as_slice()), 0, out),
        message => encode_body(message, 0, out),
    }
}

/// A chunk batch's frame in two pieces, to be written one after the other: the head (length, variant,
/// codec, chunk list, payload length), then the payload itself, not copied. The same bytes as
/// [`encode`] gives.
pub fn encode_chunk_batch(batch: &ChunkBatch) -> Result<(Bytes, Bytes), EncodeError> {
    // Postcard writes a variant's index as a varint, then its fields in order; the payload, last, as
    // its length (a varint) then its bytes.
    let head = (u32::from(CHUNK_BATCH_TAG), &batch.codec, &batch.chunks, batch.payload.len());
    let mut out = BytesMut::new();
    encode_body(&head, batch.payload.len(), &mut out)?;
    Ok((out.freeze(), batch.payload.clone()))
}

/// Appends the frame of `value`, whose body goes on for `more` bytes after it, to `out`.
fn encode_body(value: &impl Serialize, more: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    let body = postcard::to_extend(value, Vec::new())?;
    let len = body.len() + more;
    if len > MAX_FRAME_LEN {
        return Err(EncodeError::TooLong(len));
    }
    out.put_u32(len as u32);
    out.extend_from_slice(&body);
    Ok(())
}

/// A [`ChunkBatch`] as decoded in place: its payload borrowed from the frame.
#[derive(Deserialize)]
struct BorrowedBatch<'a> {
    codec: Codec,
    chunks: Vec<(u64, u32)>,
    payload: &'a [u8],
}

/// The body length the frame at the front of `buf` declares, once its 4-byte prefix is there.
fn declared_len(buf: &[u8]) -> Option<usize> {
    let prefix: [u8; 4] = buf.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(prefix) as usize)
}

/// How many more bytes the frame at the front of `buf` needs before [`decode`] can take it (0: none).
/// A reader that reads no more than this keeps each frame in a buffer of its own.
pub fn bytes_missing(buf: &[u8]) -> usize {
    match declared_len(buf) {
        Some(len) => (4 + len).saturating_sub(buf.len()),
        None => 4 - buf.len(),
    }
}

/// Takes one frame from the front of `buf`: `Ok(None)` when more bytes are needed.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
    let Some(len) = declared_len(buf) else {
        return Ok(None);
    };
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLong(len));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let body = buf.split_to(len).freeze();
    if body.first() == Some(&CHUNK_BATCH_TAG) {
        let batch: BorrowedBatch<'_> = postcard::from_bytes(&body[1..])?;
        let payload = body.slice_ref(batch.payload);
        return Ok(Some(Message::ChunkBatch(ChunkBatch { codec: batch.codec, chunks: batch.chunks, payload })));
    }
    if body.first() == Some(&CHANGES_TAG) {
        let bytes: &[u8] = postcard::from_bytes(&body[1..])?;
        return Ok(Some(Message::Changes(packed::unpack_changes(bytes)?)));
    }
    if body.first() == Some(&NEED_TAG) {
        let bytes: &[u8] = postcard::from_bytes(&body[1..])?;
        return Ok(Some(Message::Need(packed::unpack_needs(bytes)?)));
    }
    Ok(Some(postcard::from_bytes(&body)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;
    use crate::refusal::Refusal;
    use ferry_engine::{RelPath, RootHash};
    use proptest::prelude::*;

    fn frame(message: &Message) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(message, &mut out).unwrap();
        out.to_vec()
    }

    /// The wire format, frozen: a change here breaks every deployed peer, so it needs a new ALPN.
    #[test]
    fn golden_frames() {
        let root = RootHash::from_bytes([7; 32]);
        let cases: Vec<(Message, &str)> = vec![
            (
                Message::Hello(Hello {
                    version: 1,
                    job: "zimbra".into(),
                    base: Some(RoundRef { round: 3, root }),
                    delete: false,
                    numeric_ids: true,
                    source: 1,
                }),
                "0000002e0001067a696d62726101030707070707070707070707070707070707070707070707070707070707070707000101",
            ),
            (Message::Welcome { holds: None }, "000000020100"),
            (Message::Refused { refusal: Refusal::Busy, reason: "no".into() }, "000000050202026e6f"),
            (
                Message::Changes(vec![Change {
                    path: RelPath::new(&b"a/b"[..]).unwrap(),
                    entry: None,
                    content_as_before: false,
                    base: None,
                }]),
                // The tag, the packed batch's length, then a zstd frame (whose bytes may differ with
                // another zstd: this one is checked by decoding it).
                "00000013 03 11 28b52ffd200841000001000003612f6200",
            ),
            (
                Message::Need(vec![ChunkAt { place: 3, offset: 65536, len: 15 }]),
                // The tag, the packed list's length, then a zstd frame (checked by decoding it).
                "00000011 05 0f 28b52ffd200631000001038080040f",
            ),
            (Message::Missing(vec![1, 300]), "00000005070201ac02"),
            (Message::Done, "0000000108"),
            (Message::RoundOptions(RoundOptions { import: ImportMode::ProvisioningOnly }), "000000020b02"),
            (Message::Stop { reason: "t".into(), batches: 300 }, "000000050f0174ac02"),
            (Message::DryRun, "0000000110"),
            (
                Message::ChunkBatch(ChunkBatch::new(
                    Codec::Raw,
                    [(300, 2), (301, 1)],
                    bytes::Bytes::from_static(b"xyz"),
                )),
                "0000000c060002ac020200010378797a",
            ),
            (Message::Check { job: "zimbra".into(), source: 1 }, "0000000912067a696d62726101"),
            (Message::Scanning, "0000000114"),
            (Message::Passed(300), "0000000315ac02"),
            (
                Message::Checked(Checked {
                    entries: 1,
                    missing: 2,
                    changed: 3,
                    foreign: 0,
                    folders: 0,
                    duration_ms: 300,
                }),
                "0000000816010203 0000ac02",
            ),
        ];
        let mut checked = 0;
        for (message, golden) in cases {
            let golden = golden.replace(' ', "");
            let compressed = matches!(message, Message::Changes(_) | Message::Need(_));
            if !compressed && hex::encode(frame(&message)) != golden {
                eprintln!("GOLDEN {} {message:?}", hex::encode(frame(&message)));
                continue;
            }
            let mut buf = BytesMut::from(&hex::decode(&golden).unwrap()[..]);
            assert_eq!(decode(&mut buf).unwrap(), Some(message));
            assert!(buf.is_empty());
            checked += 1;
        }
        assert_eq!(checked, 15, "wire format changed");
    }

    #[test]
    fn oversize_frames_are_refused_before_allocation() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0][..]);
        assert!(matches!(decode(&mut buf), Err(DecodeError::TooLong(_))));
        assert!(buf.capacity() < 1024);
        let huge = Message::Refused { refusal: Refusal::NoSpace, reason: "x".repeat(MAX_FRAME_LEN + 1) };
        assert!(matches!(encode(&huge, &mut BytesMut::new()), Err(EncodeError::TooLong(_))));
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let bytes = frame(&Message::Done);
        assert_eq!(bytes_missing(&[]), 4);
        assert_eq!(bytes_missing(&bytes[..2]), 2);
        assert_eq!(bytes_missing(&bytes[..4]), bytes.len() - 4);
        assert_eq!(bytes_missing(&bytes), 0);
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 1]);
        assert_eq!(bytes_missing(&buf), 1);
        assert_eq!(decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(&bytes[bytes.len() - 1..]);
        assert_eq!(decode(&mut buf).unwrap(), Some(Message::Done));
    }

    #[test]
    fn hostile_paths_do_not_decode() {
        // A Changes message whose one change has the path "../x" (said as a path: no shared bytes, the
        // rest; no entry).
        let packed = zstd::bulk::compress(&[1, 0, 0, 4, b'.', b'.', b'/', b'x', 0], 1).unwrap();
        let mut body = vec![3u8, packed.len() as u8];
        body.extend_from_slice(&packed);
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.extend_from_slice(&body);
        assert!(matches!(decode(&mut buf), Err(DecodeError::Changes(_))));
    }

    /// `encode_chunk_batch`'s two pieces are `encode`'s frame, and a decoded batch's payload lies in
    /// the frame's own buffer.
    #[test]
    fn chunk_batches_travel_without_copies() {
        use rand::{RngExt, SeedableRng};
        let mut random = vec![0u8; 1 << 20];
        rand_chacha::ChaCha8Rng::seed_from_u64(1).fill(&mut random[..]);
        let batches = [
            ChunkBatch { codec: Codec::Raw, chunks: vec![], payload: Bytes::new() },
            ChunkBatch { codec: Codec::Zstd, chunks: vec![(0, 1), (2, 2)], payload: Bytes::from_static(b"compressed") },
            ChunkBatch { codec: Codec::Raw, chunks: vec![(70_000, 1 << 20)], payload: random.into() },
        ];
        for batch in batches {
            let whole = frame(&Message::ChunkBatch(batch.clone()));
            let (head, payload) = encode_chunk_batch(&batch).unwrap();
            assert_eq!([&head[..], &payload[..]].concat(), whole);
            assert_eq!(payload.as_ptr(), batch.payload.as_ptr(), "the payload was copied on the way out");

            let mut buf = BytesMut::from(&whole[..]);
            let (start, end) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len());
            let Some(Message::ChunkBatch(decoded)) = decode(&mut buf).unwrap() else { panic!("not a batch") };
            assert_eq!(decoded, batch);
            let at = decoded.payload.as_ptr() as usize;
            assert!(decoded.payload.is_empty() || (start..end).contains(&at), "the payload was copied on the way in");
        }
        let too_long = ChunkBatch { codec: Codec::Raw, chunks: vec![], payload: vec![0; MAX_FRAME_LEN].into() };
        assert!(matches!(encode_chunk_batch(&too_long), Err(EncodeError::TooLong(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn split_batches_are_whole_frames(
            lens in proptest::collection::vec(any::<u32>(), 0..20),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            zstd in any::<bool>(),
        ) {
            let chunks = lens.iter().map(|len| (u64::from(*len % 7), *len)).collect();
            let codec = if zstd { Codec::Zstd } else { Codec::Raw };
            let batch = ChunkBatch { codec, chunks, payload: payload.into() };
            let (head, payload) = encode_chunk_batch(&batch).unwrap();
            let whole = [&head[..], &payload[..]].concat();
            prop_assert_eq!(&whole, &frame(&Message::ChunkBatch(batch.clone())));
            prop_assert_eq!(decode(&mut BytesMut::from(&whole[..])).unwrap(), Some(Message::ChunkBatch(batch)));
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut buf) {}
        }

        #[test]
        fn decoding_framed_garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32);
            buf.extend_from_slice(&body);
            let _ = decode(&mut buf);
        }
    }
}
