//! Content-defined chunking (FastCDC, the 2020 variant of the `fastcdc` crate) as a push state machine.
//!
//! [`Chunker`] takes bytes as they come (`push`), and hands out each chunk as soon as its end is known;
//! `finish` hands out the last one. Boundaries depend only on content, never on how the input was split
//! into pushes, so inserting bytes into a file changes only the chunks around the insertion.
//! [`hash_reader`] cuts and names everything a `Read` gives: what the scan does to every file it
//! reads. It cuts where a [`Chunker`] would, and hashes one piece while it reads and cuts the next;
//! a large file's pieces are also cut and hashed in segments side by side, so that one file keeps
//! every core busy.

use std::io::{self, Read};

use fastcdc::v2020::{Normalization, cut, select_masks};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::hash::ChunkHash;
use crate::manifest::ChunkRef;

/// Chunk-size parameters, checked once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerConfig {
    min: u32,
    avg: u32,
    max: u32,
}

/// Chunk sizes that FastCDC cannot work with.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid chunk sizes {min}/{avg}/{max}: need even sizes with 64 <= min <= avg <= max, \
     min at most 1 MiB, avg from 256 bytes to 4 MiB, max from 1 KiB to 16 MiB"
)]
pub struct ChunkerConfigError {
    min: u32,
    avg: u32,
    max: u32,
}

impl ChunkerConfig {
    /// 16 KiB / 64 KiB / 256 KiB: `cargo run --release -p ferry-testkit --example chunk_sizes` measures the choice.
    pub const DEFAULT: ChunkerConfig = ChunkerConfig { min: 16 << 10, avg: 64 << 10, max: 256 << 10 };

    /// Checks sizes against what FastCDC supports.
    pub fn new(min: u32, avg: u32, max: u32) -> Result<Self, ChunkerConfigError> {
        use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN};
        let err = ChunkerConfigError { min, avg, max };
        let (mn, av, mx) = (min as usize, avg as usize, max as usize);
        let in_range = (MINIMUM_MIN..=MINIMUM_MAX).contains(&mn)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&av)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&mx);
        let even = min.is_multiple_of(2) && avg.is_multiple_of(2) && max.is_multiple_of(2);
        if !in_range || !even || min > avg || avg > max {
            return Err(err);
        }
        Ok(Self { min, avg, max })
    }

    /// The smallest chunk (except a file's last one).
    pub fn min(&self) -> u32 {
        self.min
    }

    /// The target average chunk size.
    pub fn avg(&self) -> u32 {
        self.avg
    }

    /// The largest chunk.
    pub fn max(&self) -> u32 {
        self.max
    }
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Where FastCDC cuts, for one configuration.
#[derive(Debug, Clone, Copy)]
struct Cutter {
    config: ChunkerConfig,
    masks: [u64; 4],
}

impl Cutter {
    fn new(config: ChunkerConfig) -> Self {
        let (mask_s, mask_l) = select_masks(config.avg as usize, Normalization::Level1);
        Self { config, masks: [mask_s, mask_l, mask_s << 1, mask_l << 1] }
    }

    /// The length of the chunk that starts `window`. `window` must hold at least `max` bytes, or run
    /// to the end of the input: a cut point only ever depends on the next `max` bytes.
    fn next_len(&self, window: &[u8]) -> usize {
        let [mask_s, mask_l, mask_s_ls, mask_l_ls] = self.masks;
        let (_, len) = cut(
            window,
            self.config.min as usize,
            self.config.avg as usize,
            self.config.max as usize,
            mask_s,
            mask_l,
            mask_s_ls,
            mask_l_ls,
        );
        // `cut` returns at least one byte for non-empty input; guard anyway so that a surprise can
        // never loop forever.
        len.clamp(1, window.len())
    }

    /// Whether [`Cutter::cut_all`] cuts a chunk starting at `start`: while a whole maximum chunk is
    /// left, or anything at all at the end of the input.
    fn cuts_at(&self, buf: &[u8], at_end: bool, start: usize) -> bool {
        buf.len() - start >= self.config.max as usize || (at_end && start < buf.len())
    }

    /// The lengths of the chunks that `buf` holds whole: all of it at the end of the input, else up
    /// to where less than `max` bytes are left.
    fn cut_all(&self, buf: &[u8], at_end: bool, lens: &mut Vec<usize>) {
        let mut start = 0;
        while self.cuts_at(buf, at_end, start) {
            let len = self.next_len(&buf[start..]);
            lens.push(len);
            start += len;
        }
    }

    /// What [`Cutter::cut_all`] gives, the work shared among rayon's threads: `buf` is split into
    /// `segments`, and each is cut from its own start as if a chunk began there, up to the first cut
    /// at or past the next segment's start. A cut point depends only on where its chunk starts, so
    /// from the first cut that the chunks before a segment and the segment's own cuts share, the two
    /// agree; on random data that is one or two chunks in. Where they share none (a run of bytes
    /// with no cut point but the maximum chunk size, zeros say), the segment is cut again from the
    /// true chunks' end, as `cut_all` would.
    fn cut_all_parallel(&self, buf: &[u8], at_end: bool, segments: usize, lens: &mut Vec<usize>) {
        if segments <= 1 {
            return self.cut_all(buf, at_end, lens);
        }
        let bounds: Vec<usize> = (0..=segments).map(|i| buf.len() * i / segments).collect();
        let parts: Vec<Vec<usize>> = (0..segments)
            .into_par_iter()
            .map(|i| {
                let (mut start, next) = (bounds[i], bounds[i + 1]);
                let mut ends = Vec::new();
                while start < next && self.cuts_at(buf, at_end, start) {
                    start += self.next_len(&buf[start..]);
                    ends.push(start);
                }
                ends
            })
            .collect();
        // The true chunks' ends, and where the next one starts.
        let mut ends: Vec<usize> = Vec::new();
        let mut at = 0;
        for (i, part) in parts.iter().enumerate() {
            let next = bounds[i + 1];
            // `at` is the first true cut at or past this segment's start; from where the segment's own
            // cuts meet it, they are the true ones.
            let mut joined = at == bounds[i];
            while !joined && at < next && self.cuts_at(buf, at_end, at) {
                if part.binary_search(&at).is_ok() {
                    joined = true;
                    break;
                }
                at += self.next_len(&buf[at..]);
                ends.push(at);
            }
            if joined {
                let from = part.partition_point(|&end| end <= at);
                ends.extend_from_slice(&part[from..]);
                at = ends.last().copied().unwrap_or(at);
            }
        }
        let mut start = 0;
        lens.extend(ends.iter().map(|&end| {
            let len = end - start;
            start = end;
            len
        }));
    }
}

/// A push-style content-defined chunker. Holds at most `max` bytes of input it has not yet handed out.
#[derive(Debug)]
pub struct Chunker {
    cutter: Cutter,
    buf: Vec<u8>,
    start: usize,
}

impl Chunker {
    /// A chunker at the start of a stream.
    pub fn new(config: ChunkerConfig) -> Self {
        Self { cutter: Cutter::new(config), buf: Vec::with_capacity(2 * config.max as usize), start: 0 }
    }

    /// Feeds bytes; calls `emit` with every chunk whose end is now known.
    pub fn push<E>(&mut self, mut data: &[u8], emit: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        let max = self.cutter.config.max as usize;
        while !data.is_empty() {
            // Fill up to two maximum chunks, then cut while a whole maximum chunk is buffered: a cut
            // point only ever depends on the next `max` bytes.
            let room = (2 * max).saturating_sub(self.buf.len() - self.start).max(1);
            let take = room.min(data.len());
            if self.start > 0 && self.buf.len() + take > self.buf.capacity() {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            while self.buf.len() - self.start >= max {
                self.cut_one(emit)?;
            }
        }
        Ok(())
    }

    /// Ends the stream: hands out what is left.
    pub fn finish<E>(mut self, emit: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        while self.buf.len() > self.start {
            self.cut_one(emit)?;
        }
        Ok(())
    }

    fn cut_one<E>(&mut self, emit: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        let window = &self.buf[self.start..];
        let len = self.cutter.next_len(window);
        emit(&window[..len])?;
        self.start += len;
        Ok(())
    }
}

/// Bytes [`hash_reader`] reads at a time.
const READ_SIZE: usize = 4 << 20;

/// The least input that one thread cuts or hashes on its own when [`hash_reader`] shares a piece's
/// work among rayon's threads: less, and what the threads cut twice to agree on a cut (a chunk or
/// two per segment) weighs more than what they gain.
const SEGMENT_MIN: usize = 1 << 20;

/// How many segments [`Cutter::cut_all_parallel`] splits `len` bytes into: enough for each of
/// rayon's threads to take a turn beside the hashing of the piece before.
fn segments(len: usize) -> usize {
    (len / SEGMENT_MIN).clamp(1, 2 * rayon::current_num_threads())
}

/// The buffers [`hash_reader`] reads into, kept from one call to the next.
#[derive(Debug, Default)]
pub struct ReadBuffers {
    current: Vec<u8>,
    next: Vec<u8>,
    lens: Vec<usize>,
    next_lens: Vec<usize>,
}

/// Reads `reader` to its end, cuts what it gives into chunks and names each one; returns the chunks in
/// order and the number of bytes read. The chunks are those of a [`Chunker`] fed the same bytes.
///
/// Input that one read does not hold is pipelined: the chunks of one piece are hashed while the next
/// piece is read and cut, on rayon's pool. A piece of 2 MiB or more is also cut and hashed
/// a segment per thread, so that one large file keeps every core busy.
pub fn hash_reader<R: Read + Send>(
    config: ChunkerConfig,
    reader: R,
    bufs: &mut ReadBuffers,
) -> io::Result<(Vec<ChunkRef>, u64)> {
    hash_reader_telling(config, reader, bufs, |_, _| {})
}

/// [`hash_reader`], telling `cut` the chunks named so far (from the first) and the bytes read so far
/// each time a piece of the input is named: about every 4 MiB read, while the file is
/// still being read. The chunks it is told of are the first of those returned.
pub fn hash_reader_telling<R: Read + Send>(
    config: ChunkerConfig,
    mut reader: R,
    bufs: &mut ReadBuffers,
    mut cut: impl FnMut(&[ChunkRef], u64),
) -> io::Result<(Vec<ChunkRef>, u64)> {
    let cutter = Cutter::new(config);
    let ReadBuffers { current, next, lens, next_lens } = bufs;
    let mut chunks = Vec::new();
    current.clear();
    lens.clear();
    let mut total = 0;
    let mut at_end = fill(&mut reader, current, &mut total)?;
    cutter.cut_all_parallel(current, at_end, segments(current.len()), lens);
    loop {
        let whole: usize = lens.iter().sum();
        if at_end {
            hash_into(&current[..whole], lens, &mut chunks);
            return Ok((chunks, total));
        }
        // What is left after the last whole chunk starts the next piece.
        next.clear();
        next.extend_from_slice(&current[whole..]);
        next_lens.clear();
        let (_, read) = rayon::join(
            || hash_into(&current[..whole], lens, &mut chunks),
            || -> io::Result<bool> {
                let at_end = fill(&mut reader, next, &mut total)?;
                cutter.cut_all_parallel(next, at_end, segments(next.len()), next_lens);
                Ok(at_end)
            },
        );
        at_end = read?;
        cut(&chunks, total);
        std::mem::swap(current, next);
        std::mem::swap(lens, next_lens);
    }
}

/// Appends up to [`READ_SIZE`] bytes of `reader` to `buf`; true when the reader is at its end.
fn fill(reader: &mut impl Read, buf: &mut Vec<u8>, total: &mut u64) -> io::Result<bool> {
    buf.reserve(READ_SIZE);
    let n = reader.by_ref().take(READ_SIZE as u64).read_to_end(buf)?;
    *total += n as u64;
    Ok(n < READ_SIZE)
}

/// Names the chunks of `data`, `lens` long each, in order; on several threads when there is enough.
fn hash_into(data: &[u8], lens: &[usize], chunks: &mut Vec<ChunkRef>) {
    let mut start = 0;
    let spans = lens.iter().map(|&len| {
        start += len;
        start - len..start
    });
    let name = |span: std::ops::Range<usize>| ChunkRef { len: span.len() as u32, hash: ChunkHash::of(&data[span]) };
    if segments(data.len()) == 1 {
        chunks.extend(spans.map(name));
    } else {
        let spans: Vec<_> = spans.collect();
        chunks.par_extend(spans.into_par_iter().map(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn chunks_of(config: ChunkerConfig, data: &[u8], piece: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut emit = |c: &[u8]| -> Result<(), ()> {
            out.push(c.to_vec());
            Ok(())
        };
        let mut chunker = Chunker::new(config);
        for p in data.chunks(piece.max(1)) {
            chunker.push(p, &mut emit).unwrap();
        }
        chunker.finish(&mut emit).unwrap();
        out
    }

    fn seeded(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        data
    }

    /// Pins the boundaries: a change here changes every chunk name, so it must be deliberate.
    #[test]
    fn boundaries_snapshot() {
        let data = seeded(4 << 20, 7);
        let lens: Vec<usize> = chunks_of(ChunkerConfig::DEFAULT, &data, 100_000).iter().map(Vec::len).collect();
        assert_eq!(lens.iter().sum::<usize>(), data.len());
        let digest = blake3::hash(format!("{lens:?}").as_bytes());
        assert_eq!(
            (lens.len(), &lens[..4], digest.to_hex().as_str()),
            (SNAPSHOT_COUNT, &SNAPSHOT_FIRST[..], SNAPSHOT_DIGEST),
            "chunk boundaries changed: {lens:?}"
        );
    }
    const SNAPSHOT_COUNT: usize = 54;
    const SNAPSHOT_FIRST: [usize; 4] = [127485, 80440, 66911, 23350];
    const SNAPSHOT_DIGEST: &str = "526a6af1d63aa3c191016e70f5df8bf96e5f0fba552082a8a90f133ca0cbfe63";

    /// Our push machine cuts exactly where the crate's own one-shot chunker does.
    #[test]
    fn matches_fastcdc_one_shot() {
        let data = seeded(3 << 20, 11);
        let config = ChunkerConfig::DEFAULT;
        let ours: Vec<usize> = chunks_of(config, &data, 77_777).iter().map(Vec::len).collect();
        let theirs: Vec<usize> =
            fastcdc::v2020::FastCDC::new(&data, config.min() as usize, config.avg() as usize, config.max() as usize)
                .map(|c| c.length)
                .collect();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn insertion_changes_few_chunks() {
        let data = seeded(8 << 20, 1);
        let mut shifted = b"inserted at the start".to_vec();
        shifted.extend_from_slice(&data);
        let before: std::collections::HashSet<_> =
            chunks_of(ChunkerConfig::DEFAULT, &data, 1 << 20).into_iter().collect();
        let after = chunks_of(ChunkerConfig::DEFAULT, &shifted, 1 << 20);
        let new = after.iter().filter(|c| !before.contains(*c)).count();
        assert!(after.len() > 50);
        assert!(new <= 2, "{new} new chunks of {}", after.len());
    }

    /// A reader that gives at most `piece` bytes per read, as pipes and some filesystems do.
    struct Dribble<'a> {
        data: &'a [u8],
        piece: usize,
    }

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.piece.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn named(config: ChunkerConfig, data: &[u8]) -> Vec<ChunkRef> {
        chunks_of(config, data, data.len().max(1))
            .iter()
            .map(|c| ChunkRef { hash: ChunkHash::of(c), len: c.len() as u32 })
            .collect()
    }

    /// Inputs around the size of one read: the pieces' seams fall in every place a chunk can be.
    #[test]
    fn hash_reader_names_what_the_chunker_cuts() {
        let mut bufs = ReadBuffers::default();
        for len in [0, 1, READ_SIZE - 1, READ_SIZE, READ_SIZE + 1, 3 * READ_SIZE + 12345] {
            let data = seeded(len, len as u64);
            let (chunks, read) = hash_reader(ChunkerConfig::DEFAULT, &data[..], &mut bufs).unwrap();
            assert_eq!(read, len as u64);
            assert_eq!(chunks, named(ChunkerConfig::DEFAULT, &data), "{len} bytes");
        }
    }

    #[test]
    fn hash_reader_reports_read_errors() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("the disk is gone"));
                }
                let n = self.0.min(buf.len());
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let mut bufs = ReadBuffers::default();
        let err = hash_reader(ChunkerConfig::DEFAULT, Failing(2 * READ_SIZE + 5), &mut bufs).unwrap_err();
        assert_eq!(err.to_string(), "the disk is gone");
        // The buffers are fit for the next file.
        let data = seeded(READ_SIZE + 7, 3);
        let (chunks, _) = hash_reader(ChunkerConfig::DEFAULT, &data[..], &mut bufs).unwrap();
        assert_eq!(chunks, named(ChunkerConfig::DEFAULT, &data));
    }

    /// Input on which segments cut on their own agree with the true cuts at once, late, or never: random
    /// bytes, zeros (no cut point but the maximum size: a segment's cuts never meet the true ones
    /// unless it starts on one), and random bytes with long runs of zeros.
    fn awkward_inputs(len: usize, seed: u64) -> [Vec<u8>; 3] {
        let mut runs = seeded(len, seed);
        for run in runs.chunks_mut(len / 5 + 1).step_by(2) {
            run.fill(0);
        }
        [seeded(len, seed), vec![0; len], runs]
    }

    #[test]
    fn cutting_in_segments_cuts_where_one_pass_does() {
        let config = ChunkerConfig::new(2048, 8192, 32768).unwrap();
        let cutter = Cutter::new(config);
        for (n, data) in awkward_inputs(700_000, 5).iter().enumerate() {
            for at_end in [false, true] {
                let mut one_pass = Vec::new();
                cutter.cut_all(data, at_end, &mut one_pass);
                for segments in [2, 3, 7, 64, 1000] {
                    let mut shared = Vec::new();
                    cutter.cut_all_parallel(data, at_end, segments, &mut shared);
                    assert_eq!(shared, one_pass, "input {n}, {segments} segments, at end: {at_end}");
                }
            }
        }
    }

    #[test]
    fn rejects_bad_config() {
        assert!(ChunkerConfig::new(16 << 10, 64 << 10, 256 << 10).is_ok());
        assert!(ChunkerConfig::new(64 << 10, 16 << 10, 256 << 10).is_err());
        assert!(ChunkerConfig::new(3, 64, 128).is_err());
        assert!(ChunkerConfig::new(1023, 4096, 8192).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn streaming_equals_one_shot(len in 0usize..600_000, seed: u64, piece in 1usize..200_000) {
            let config = ChunkerConfig::new(2048, 8192, 32768).unwrap();
            let data = seeded(len, seed);
            let one_shot = chunks_of(config, &data, data.len().max(1));
            let streamed = chunks_of(config, &data, piece);
            prop_assert_eq!(&one_shot, &streamed);
            prop_assert_eq!(one_shot.concat(), data);
            for c in &one_shot[..one_shot.len().saturating_sub(1)] {
                prop_assert!(c.len() >= 2048 && c.len() <= 32768);
            }
        }

        #[test]
        fn cutting_in_any_segments_cuts_where_one_pass_does(
            len in 0usize..400_000, seed: u64, segments in 2usize..40, kind in 0usize..3, at_end: bool
        ) {
            let cutter = Cutter::new(ChunkerConfig::new(1024, 4096, 16384).unwrap());
            let data = &awkward_inputs(len, seed)[kind];
            let (mut one_pass, mut shared) = (Vec::new(), Vec::new());
            cutter.cut_all(data, at_end, &mut one_pass);
            cutter.cut_all_parallel(data, at_end, segments, &mut shared);
            prop_assert_eq!(shared, one_pass);
        }

        #[test]
        fn hash_reader_equals_the_chunker(len in 0usize..(3 * READ_SIZE), seed: u64, piece in 1usize..400_000) {
            let config = ChunkerConfig::new(2048, 8192, 32768).unwrap();
            let data = seeded(len, seed);
            let mut bufs = ReadBuffers::default();
            let (chunks, read) = hash_reader(config, Dribble { data: &data, piece }, &mut bufs).unwrap();
            prop_assert_eq!(read, len as u64);
            prop_assert_eq!(chunks, named(config, &data));
        }
    }
}
