//! Reading the chunks the destination asks for, into batches for the data streams.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, anyhow};
use ferry_engine::{ChunkHash, RootDir, SettledBefore};
use ferry_proto::NeedChunk;
use tokio::sync::mpsc;

use super::changes::PositionCursor;
use super::progress::Counters;

/// Reads the asked-for chunks and returns what they would weigh on the wire: compressed when the
/// round would compress them, else raw. Chunks that changed since the scan weigh nothing.
pub(super) fn estimate_chunks(root: &Path, settled: SettledBefore, chunks: &[NeedChunk]) -> anyhow::Result<u64> {
    let mut reader = SourceChunks::open(root, settled)?;
    let mut compressor = zstd::bulk::Compressor::new(1)?;
    let mut total = 0u64;
    for need in chunks {
        let Some(chunk) = reader.read(need) else { continue };
        total += if ferry_proto::batch::compressible(chunk, &mut compressor) {
            compressor.compress(chunk).map_or(chunk.len(), |c| c.len().min(chunk.len())) as u64
        } else {
            chunk.len() as u64
        };
    }
    Ok(total)
}

/// Reads asked-for chunks from the source tree, beneath its root, keeping the last file open
/// (requests come in file order).
pub(super) struct SourceChunks {
    pub(super) root: RootDir,
    pub(super) settled: SettledBefore,
    pub(super) open: Option<(ferry_engine::RelPath, std::fs::File)>,
    /// The bytes of the open file read so far, from the first chunk's start to the last one's end.
    pub(super) read: Option<(u64, u64)>,
    pub(super) buf: Vec<u8>,
}

impl SourceChunks {
    /// Reads beneath `root`. A chunk read from a file that the scan's `settled` still holds for is
    /// what the scan hashed, and is not hashed again. Other chunks are checked against the scan's
    /// hashes. The destination checks every chunk in any case.
    pub(super) fn open(root: &Path, settled: SettledBefore) -> anyhow::Result<Self> {
        let root = RootDir::open(root).with_context(|| format!("cannot open {}", root.display()))?;
        Ok(Self { root, settled, open: None, read: None, buf: Vec::new() })
    }

    /// The chunk's bytes, or `None` when it is too large, unreadable, or no longer hashes to what the
    /// scan saw.
    pub(super) fn read(&mut self, need: &NeedChunk) -> Option<&[u8]> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let read = self.read_into(need, &mut buf);
        self.buf = buf;
        read.then_some(&self.buf[..])
    }

    /// Like [`SourceChunks::read`], appending the chunk to `out`; `false` leaves `out` as it was.
    pub(super) fn read_into(&mut self, need: &NeedChunk, out: &mut Vec<u8>) -> bool {
        use std::os::unix::fs::FileExt;
        if need.len as usize > (16 << 20) {
            return false;
        }
        if self.open.as_ref().is_none_or(|(p, _)| *p != need.path) {
            self.drop_cached();
            self.open = self.root.open_file(&need.path).ok().map(|f| (need.path.clone(), f));
        }
        let Some((_, file)) = self.open.as_ref() else { return false };
        let start = out.len();
        out.resize(start + need.len as usize, 0);
        // The ctime is looked at after the read: unchanged then, the bytes read are the scan's.
        let read = file.read_exact_at(&mut out[start..], need.offset).is_ok()
            && (self.settled.holds(file) || ChunkHash::of(&out[start..]) == need.hash);
        if !read {
            out.truncate(start);
        }
        let end = need.offset + u64::from(need.len);
        self.read = Some(self.read.map_or((need.offset, end), |(first, last)| (first.min(need.offset), last.max(end))));
        read
    }

    /// Lets the page cache drop what was read of the open file: read for the last time (needs go
    /// forward), its pages would crowd out those the scan just read and this reads next, which would
    /// then come from the disk again (and a mail server's own cache is not flooded). Once per file.
    fn drop_cached(&mut self) {
        if let (Some((_, file)), Some((first, last))) = (&self.open, self.read.take()) {
            let len = std::num::NonZeroU64::new(last - first);
            let _ = rustix::fs::fadvise(file, first, len, rustix::fs::Advice::DontNeed);
        }
    }
}

impl Drop for SourceChunks {
    fn drop(&mut self) {
        self.drop_cached();
    }
}

/// A multi-consumer queue of batches for the data streams.
pub(super) fn async_channel() -> (BatchSender, BatchReceiver) {
    let (tx, rx) = mpsc::channel(8);
    (BatchSender(tx), BatchReceiver(Arc::new(tokio::sync::Mutex::new(rx))))
}

/// A batch on its way to a data stream, and how far into the changed bytes the round is once it is
/// sent (see [`Positions`]).
pub(super) struct Outgoing {
    pub(super) batch: ferry_proto::ChunkBatch,
    pub(super) covered: u64,
}

#[derive(Clone)]
pub(super) struct BatchSender(pub(super) mpsc::Sender<Outgoing>);

#[derive(Clone)]
pub(super) struct BatchReceiver(pub(super) Arc<tokio::sync::Mutex<mpsc::Receiver<Outgoing>>>);

impl BatchReceiver {
    pub(super) async fn recv(&self) -> Result<Outgoing, ()> {
        self.0.lock().await.recv().await.ok_or(())
    }
}

/// Chunks gathered for one batch: the numbers of the needs they answer and their lengths, their bytes
/// end to end, how far into the changed bytes they reach, and how many bytes the reader had read when
/// the first of them came.
pub(super) struct PendingBatch {
    pub(super) list: Vec<(u64, u32)>,
    pub(super) data: Vec<u8>,
    /// Room made for `data` each time: a full batch, plus the chunk that fills it.
    pub(super) capacity: usize,
    pub(super) covered: u64,
    pub(super) opened_at: u64,
}

impl PendingBatch {
    pub(super) fn new(batch_bytes: usize) -> Self {
        let capacity = batch_bytes + (256 << 10);
        Self { list: Vec::new(), data: Vec::with_capacity(capacity), capacity, covered: 0, opened_at: 0 }
    }

    /// Records a chunk whose bytes were just appended to `data`.
    pub(super) fn push(&mut self, number: u64, need: &NeedChunk, reached: Option<u64>, read: u64) {
        if self.list.is_empty() {
            self.opened_at = read;
        }
        self.list.push((number, need.len));
        if let Some(reached) = reached {
            self.covered = self.covered.max(reached);
        }
    }

    /// Sends what is gathered, if anything.
    pub(super) fn send(
        &mut self,
        compress: bool,
        compressor: &mut zstd::bulk::Compressor<'_>,
        tx: &BatchSender,
    ) -> anyhow::Result<()> {
        if self.list.is_empty() {
            return Ok(());
        }
        let list = std::mem::take(&mut self.list);
        let data = std::mem::replace(&mut self.data, Vec::with_capacity(self.capacity));
        let batch = ferry_proto::batch::encode_batch(&list, data, compress, compressor);
        tx.0.blocking_send(Outgoing { batch, covered: self.covered }).map_err(|_| anyhow!("connection closed"))
    }
}

/// Reads the asked-for chunks from the source tree and queues them in batches; returns (the numbers
/// of) the needs whose chunks no longer hash to what the scan saw. Each need comes with its number
/// (needs count from 0 on a connection, in the order they came: batches name chunks by them).
///
/// Two batches fill side by side: chunks sent as they are, and chunks that compress. A batch is sent
/// when it is full, or when `2 × batch_bytes` have been read since its first chunk: the destination
/// applies files in the order it asked for them, so a text chunk must not wait behind megabytes of
/// BLOBs for its batch to fill (with a 48 MiB request, that wait held up the whole window for seconds
/// on a 100 Mbit/s link).
pub(super) fn read_chunks(
    reader: &mut SourceChunks,
    chunks: Vec<(u64, NeedChunk)>,
    tx: &BatchSender,
    counters: &Counters,
    cursor: &mut PositionCursor,
    stop: &std::sync::atomic::AtomicBool,
    batch_bytes: usize,
) -> anyhow::Result<Vec<u64>> {
    let mut compressor = zstd::bulk::Compressor::new(1)?;
    let mut missing = Vec::new();
    let mut batches = [PendingBatch::new(batch_bytes), PendingBatch::new(batch_bytes)];
    let mut read = 0u64;
    for (number, need) in chunks {
        if stop.load(Ordering::Relaxed) {
            return Ok(missing);
        }
        // Each chunk is read into the raw batch; one that compresses moves to the other.
        let [raw, text] = &mut batches;
        let start = raw.data.len();
        if !reader.read_into(&need, &mut raw.data) {
            missing.push(number);
            continue;
        }
        counters.chunks.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(u64::from(need.len), Ordering::Relaxed);
        read += u64::from(need.len);
        let compress = ferry_proto::batch::compressible(&raw.data[start..], &mut compressor);
        if compress {
            text.data.extend_from_slice(&raw.data[start..]);
            raw.data.truncate(start);
        }
        let reached = cursor.advance(&need);
        batches[usize::from(compress)].push(number, &need, reached, read);
        for (which, batch) in batches.iter_mut().enumerate() {
            let full = batch.data.len() >= batch_bytes;
            let overdue = !batch.list.is_empty() && read - batch.opened_at >= 2 * batch_bytes as u64;
            if full || overdue {
                batch.send(which == 1, &mut compressor, tx)?;
            }
        }
    }
    for (which, batch) in batches.iter_mut().enumerate() {
        batch.send(which == 1, &mut compressor, tx)?;
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use std::time::Duration;

    fn need(path: &str, data: &[u8], offset: usize, len: usize) -> NeedChunk {
        let chunk = &data[offset..offset + len];
        NeedChunk {
            path: ferry_engine::RelPath::new(path).unwrap(),
            place: 0,
            offset: offset as u64,
            len: len as u32,
            hash: ChunkHash::of(chunk),
        }
    }

    /// A chunk of a file untouched since before the scan is taken as the scan hashed it; a chunk of a
    /// file changed since is checked, and is missing when it no longer matches.
    #[test]
    fn only_files_changed_since_the_scan_are_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"Subject: minutes\r\n\r\nAs agreed.\r\n".to_vec();
        std::fs::write(dir.path().join("mail"), &content).unwrap();
        let good = need("mail", &content, 0, content.len());
        // What the scan would have named, had the file held other bytes of the same length then.
        let stale = NeedChunk { hash: ChunkHash::of(b"something else"), ..good.clone() };

        // The scan began a minute after the file's last change.
        let later = SettledBefore::scan_at(std::time::SystemTime::now() + Duration::from_secs(60));
        let mut reader = SourceChunks::open(dir.path(), later).unwrap();
        assert_eq!(reader.read(&stale), Some(&content[..]), "a settled file's chunk is not hashed again");

        // The scan began before it.
        let mut reader = SourceChunks::open(dir.path(), SettledBefore::default()).unwrap();
        assert_eq!(reader.read(&stale), None, "a changed file's chunk is checked");
        assert_eq!(reader.read(&good), Some(&content[..]));
    }

    /// A text chunk asked for before megabytes of BLOB goes out after at most two batches of them, not
    /// at the end of the request: the destination applies files in the order it asked for them.
    #[test]
    fn a_text_chunk_does_not_wait_behind_the_blobs_for_its_batch_to_fill() {
        const BATCH: usize = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let text = "Subject: the quarterly report\r\n\r\nPlease find it attached.\r\n".repeat(100).into_bytes();
        let mut blob = vec![0u8; 6 * BATCH];
        rand_chacha::ChaCha8Rng::seed_from_u64(7).fill(&mut blob[..]);
        std::fs::write(dir.path().join("text"), &text).unwrap();
        std::fs::write(dir.path().join("blob"), &blob).unwrap();

        let mut needs = vec![need("text", &text, 0, text.len())];
        needs.extend((0..6).map(|i| need("blob", &blob, i * BATCH, BATCH)));
        let (tx, rx) = async_channel();
        let mut cursor = PositionCursor { positions: Arc::default(), at: 0 };
        let stop = std::sync::atomic::AtomicBool::new(false);
        let mut reader = SourceChunks::open(dir.path(), SettledBefore::default()).unwrap();
        let needs = (0..).zip(needs).collect();
        let missing = read_chunks(&mut reader, needs, &tx, &Counters::default(), &mut cursor, &stop, BATCH).unwrap();
        assert!(missing.is_empty());
        drop(tx);

        let mut rx = rx.0.try_lock().unwrap();
        let mut sent = Vec::new();
        while let Ok(Outgoing { batch, .. }) = rx.try_recv() {
            sent.push(batch.numbered().map(|(need, _)| need).collect::<Vec<_>>());
        }
        // The text's chunk answers need 0.
        let text_at = sent.iter().position(|batch| batch.contains(&0)).expect("the text chunk was sent");
        assert_eq!(sent.len(), 7, "six BLOB batches and the text's: {sent:?}");
        // Its batch opens at about 6 KiB read and is overdue 128 KiB later: after the second BLOB batch.
        assert_eq!(text_at, 2, "the text chunk went out in batch {text_at} of {}", sent.len());
    }
}
