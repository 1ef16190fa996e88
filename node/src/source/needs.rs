//! The destination's needs, made whole: a need names a chunk by where it is in the round's manifest
//! (the file's place, an offset, a length); the path to read it from and the hash it must have, which
//! the reader checks and the batch names, are the scan's, read here from that manifest.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use ferry_engine::{Entry, ManifestReader};
use ferry_proto::{ChunkAt, NeedChunk};

use super::scanning::Gate;

/// A need that could not be made whole.
#[derive(Debug, thiserror::Error)]
pub(super) enum NeedError {
    /// The destination asked for something the round does not have: a protocol violation.
    #[error("it asked for {0}, which is no chunk of this round")]
    NotInRound(String),
    /// The destination went back in the manifest: a protocol violation (and a way to make this node
    /// read its manifest again and again, were it followed).
    #[error("it asked for a chunk of entry {place} after one of entry {after}: needs come in the manifest's order")]
    OutOfOrder { place: u64, after: u64 },
    /// The manifest could not be read.
    #[error(transparent)]
    Read(#[from] anyhow::Error),
}

/// Looks needs up in the round's manifest, reading it forward once: the destination asks in manifest
/// order (a connection's needs never go back; the next connection's start again), so each file is
/// found a little further on.
pub(super) struct Needs {
    reader: ManifestReader,
    /// While the manifest is still being written (the list streams): how far the list has gone.
    gate: Option<Arc<Gate>>,
    /// The place of the next entry `reader` gives.
    next_place: u64,
    /// The number of the next need (they count from 0 in the order they came: a chunk batch names
    /// each chunk by its need's number).
    next_need: u64,
    /// The last file a need named, and where in its chunk list the next need is likely to be.
    file: Option<File>,
}

struct File {
    place: u64,
    entry: Entry,
    /// The index of a chunk of `entry`, and where it starts.
    next: (usize, u64),
    /// `entry` is the file's first chunks, listed while the scan cut it ([`Gate::prefix_at`]).
    prefix: bool,
}

impl Needs {
    /// The needs of the round whose manifest is at `manifest`.
    pub(super) fn open(manifest: &Path) -> anyhow::Result<Self> {
        let reader = ManifestReader::open(manifest).with_context(|| format!("cannot read {}", manifest.display()))?;
        Ok(Self { reader, gate: None, next_place: 0, next_need: 0, file: None })
    }

    /// The needs of a round whose manifest the scan is still writing (open as `file`, at `path`),
    /// and whose list `gate` follows: a need can only name what the list has reached, which is in
    /// the file.
    pub(super) fn streamed(file: std::fs::File, path: &Path, gate: Arc<Gate>) -> anyhow::Result<Self> {
        let reader =
            ManifestReader::from_file(file, path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Self { reader, gate: Some(gate), next_place: 0, next_need: 0, file: None })
    }

    /// A list of needs made whole, in order, each with its number (see [`Self::resolve`]).
    pub(super) fn resolve_all(&mut self, needs: Vec<ChunkAt>) -> Result<Vec<(u64, NeedChunk)>, NeedError> {
        needs
            .into_iter()
            .map(|at| {
                let need = self.resolve(at)?;
                self.next_need += 1;
                Ok((self.next_need - 1, need))
            })
            .collect()
    }

    /// The chunk at `at`, with its path and hash. A need for something the manifest does not have (no
    /// such place, not a file, no chunk starting there, another length), or for an entry before the
    /// last one asked for, is the destination's error, and fails the round.
    fn resolve(&mut self, at: ChunkAt) -> Result<NeedChunk, NeedError> {
        if self.file.as_ref().is_none_or(|file| file.place != at.place) {
            self.file = Some(self.locate(at.place)?);
        }
        if let Some(found) = self.chunk_at(&at) {
            return Ok(found);
        }
        // A file listed as it is cut: its chunks listed since, or its entry.
        if self.file.as_ref().is_some_and(|file| file.prefix) {
            self.grow(at.place)?;
            if let Some(found) = self.chunk_at(&at) {
                return Ok(found);
            }
        }
        let Some(file) = &self.file else { unreachable!("found above") };
        Err(NeedError::NotInRound(format!(
            "{} bytes at {} of {} (entry {})",
            at.len, at.offset, file.entry.path, at.place
        )))
    }

    /// The file at `place`: the first chunks of one the scan is cutting, or the manifest's entry.
    fn locate(&mut self, place: u64) -> Result<File, NeedError> {
        if let Some((path, chunks)) = self.gate.as_ref().and_then(|gate| gate.prefix_at(place, 0)) {
            let entry = Entry { chunks, ..Entry::new(path, ferry_engine::EntryKind::File) };
            return Ok(File { place, entry, next: (0, 0), prefix: true });
        }
        Ok(File { place, entry: self.find(place)?, next: (0, 0), prefix: false })
    }

    /// The file at `place`, known by its first chunks, with the chunks listed since; or its entry,
    /// once listed (it begins with the same chunks: where the next need is stays). A need of the
    /// entry that took the place of a file that changed while it was cut is looked up in that
    /// file's chunks first: if one is at the same offset and as long, the chunk read is not the
    /// one the destination asked for, and fails its check there (the file is left for the next
    /// round, as one that changed since the scan).
    fn grow(&mut self, place: u64) -> Result<(), NeedError> {
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        let listed = file.entry.chunks.len();
        if let Some((_, more)) = self.gate.as_ref().and_then(|gate| gate.prefix_at(place, listed))
            && !more.is_empty()
        {
            file.entry.chunks.extend(more);
            return Ok(());
        }
        let entry = self.find(place)?;
        if let Some(file) = self.file.as_mut() {
            (file.entry, file.prefix) = (entry, false);
        }
        Ok(())
    }

    /// The chunk at `at` of the file found last, if it has one there.
    fn chunk_at(&mut self, at: &ChunkAt) -> Option<NeedChunk> {
        let file = self.file.as_mut()?;
        if at.offset < file.next.1 {
            file.next = (0, 0);
        }
        let (mut index, mut offset) = file.next;
        while let Some(chunk) = file.entry.chunks.get(index) {
            if offset >= at.offset {
                break;
            }
            offset += u64::from(chunk.len);
            index += 1;
        }
        let chunk = file.entry.chunks.get(index).filter(|chunk| offset == at.offset && chunk.len == at.len)?;
        file.next = (index + 1, offset + u64::from(chunk.len));
        Some(NeedChunk { path: file.entry.path.clone(), place: at.place, offset, len: at.len, hash: chunk.hash })
    }

    /// The entry at `place`, reading on from the last one found.
    fn find(&mut self, place: u64) -> Result<Entry, NeedError> {
        if place < self.next_place {
            return Err(NeedError::OutOfOrder { place, after: self.next_place - 1 });
        }
        if let Some(gate) = &self.gate
            && place >= gate.reach()
        {
            return Err(NeedError::NotInRound(format!("entry {place}, which the list has not reached")));
        }
        while let Some(raw) = self.reader.next_raw().context("cannot read the round's manifest")? {
            self.next_place += 1;
            if self.next_place > place {
                return Ok(raw.decode().context("cannot read the round's manifest")?);
            }
        }
        Err(NeedError::NotInRound(format!("entry {place}, past the end of its manifest")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_engine::{ChunkHash, ChunkRef, EntryKind, ManifestWriter, RelPath};

    fn file(path: &str, lens: &[u32]) -> Entry {
        let chunks: Vec<ChunkRef> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| ChunkRef { hash: ChunkHash::of(format!("{path} {i}").as_bytes()), len })
            .collect();
        Entry {
            size: lens.iter().map(|&l| u64::from(l)).sum(),
            chunks,
            ..Entry::new(RelPath::new(path).unwrap(), EntryKind::File)
        }
    }

    fn at(place: u64, offset: u64, len: u32) -> ChunkAt {
        ChunkAt { place, offset, len }
    }

    #[test]
    fn a_need_is_found_with_its_path_and_hash_and_a_wrong_or_backward_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("manifest");
        let mut writer = ManifestWriter::create(&manifest).unwrap();
        for entry in [file("a", &[10, 20, 30]), file("b", &[5]), file("c/d", &[7, 8])] {
            writer.push(&entry).unwrap();
        }
        writer.finish().unwrap();
        let hash = |path: &str, i: usize| ChunkHash::of(format!("{path} {i}").as_bytes());

        let mut needs = Needs::open(&manifest).unwrap();
        // In order, skipping chunks and files; back within a file.
        for (place, path, offset, len, index) in
            [(0, "a", 10, 20, 1), (0, "a", 30, 30, 2), (0, "a", 0, 10, 0), (2, "c/d", 7, 8, 1), (2, "c/d", 0, 7, 0)]
        {
            let need = needs.resolve(at(place, offset, len)).unwrap();
            assert_eq!(
                (need.path.to_string(), need.offset, need.len, need.hash),
                (path.to_string(), offset, len, hash(path, index)),
                "{path} at {offset}"
            );
        }
        // Needs are numbered in the order they came, list after list.
        let numbered = needs.resolve_all(vec![at(2, 7, 8)]).unwrap();
        assert_eq!(numbered.iter().map(|(n, need)| (*n, need.offset)).collect::<Vec<_>>(), [(0, 7)]);
        let mut fresh = Needs::open(&manifest).unwrap();
        let numbered = fresh.resolve_all(vec![at(0, 0, 10), at(1, 0, 5)]).unwrap();
        let numbered_next = fresh.resolve_all(vec![at(2, 0, 7)]).unwrap();
        assert_eq!([numbered[0].0, numbered[1].0, numbered_next[0].0], [0, 1, 2]);
        // Back to an entry before: refused, not read again.
        assert!(matches!(needs.resolve(at(1, 0, 5)), Err(NeedError::OutOfOrder { place: 1, after: 2 })));
        let mut needs = Needs::open(&manifest).unwrap();
        // Not a chunk's start, not its length, no such entry, past the file's end.
        for wrong in [at(0, 5, 10), at(0, 10, 21), at(3, 0, 5), at(0, 60, 1)] {
            assert!(matches!(needs.resolve(wrong.clone()), Err(NeedError::NotInRound(_))), "{wrong:?}");
        }
    }
}
