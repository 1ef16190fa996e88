//! Manifests: the sorted entries of a tree at one round, stored as a stream of records with a root hash.
//!
//! A manifest file never has to fit in memory: [`RecordWriter`] appends entries one by one and
//! [`RecordReader`] reads them back one by one, checking the trailer (count and root hash) at the end,
//! so a truncated or altered file is an error, not a smaller tree. Two sorted manifests are compared in
//! one pass with [`MergeJoin`]; [`diff`] keeps only what changed, comparing entries as stored.

mod entry;
mod merge;
mod record;

pub(crate) use entry::check_order;
pub use entry::{ChunkRef, Entry, EntryError, EntryKind, Keyed};
pub use merge::{MergeJoin, Pair, Places, diff, diff_numbered};
pub use record::{
    MAX_RECORD_LEN, ManifestReader, ManifestWriter, RawEntry, RecordFileError, RecordReader, RecordWriter,
    ends_as_written, same_records, sync_record_file,
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    use crate::hash::{ChunkHash, RootHash};
    use crate::path::RelPath;

    pub(crate) fn entry(path: &str, kind: EntryKind, content: &[u8]) -> Entry {
        let chunks = if kind == EntryKind::File && !content.is_empty() {
            vec![ChunkRef { hash: ChunkHash::of(content), len: content.len() as u32 }]
        } else {
            vec![]
        };
        Entry {
            mode: 0o644,
            mtime_ns: 1,
            size: if kind == EntryKind::File { content.len() as u64 } else { 0 },
            chunks,
            link_target: (kind == EntryKind::Symlink).then(|| content.to_vec()),
            ..Entry::new(RelPath::new(path.as_bytes()).unwrap(), kind)
        }
    }

    fn write(dir: &Path, name: &str, entries: &[Entry]) -> (PathBuf, RootHash) {
        let path = dir.join(name);
        let mut w = ManifestWriter::create(&path).unwrap();
        for e in entries {
            w.push(e).unwrap();
        }
        let root = w.finish().unwrap();
        (path, root)
    }

    #[test]
    fn round_trip_and_root_hash() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![
            entry("", EntryKind::Dir, b""),
            entry("a", EntryKind::File, b"hello"),
            entry("b", EntryKind::Symlink, b"a"),
        ];
        let (path, root) = write(dir.path(), "m", &entries);
        let mut reader = ManifestReader::open(&path).unwrap();
        let read: Vec<Entry> = reader.by_ref().collect::<Result<_, _>>().unwrap();
        assert_eq!(read, entries);
        assert_eq!(reader.root_hash(), Some(root));
        let (_, other) = write(dir.path(), "m2", &entries[..2]);
        assert_ne!(root, other);
    }

    /// The same records: the file in place stays (same inode, no write) and the new one goes; other
    /// records replace it. An unsynced file reads back whole.
    #[test]
    fn a_writer_keeps_the_file_in_place_when_its_records_are_the_same() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![entry("", EntryKind::Dir, b""), entry("a", EntryKind::File, b"hello")];
        let (path, root) = write(dir.path(), "m", &entries);
        let inode = std::fs::metadata(&path).unwrap().ino();
        let rewrite = |entries: &[Entry]| {
            let mut w = ManifestWriter::create(&path).unwrap();
            entries.iter().for_each(|e| w.push(e).unwrap());
            w.finish_or_keep().unwrap()
        };
        assert_eq!(rewrite(&entries), root);
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "rewritten though the same");
        assert!(!dir.path().join("m.tmp").exists());
        let changed = vec![entries[0].clone(), entry("a", EntryKind::File, b"hello!")];
        let new_root = rewrite(&changed);
        assert_ne!(new_root, root);
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode, "kept though changed");
        assert_eq!(ManifestReader::open(&path).unwrap().collect::<Result<Vec<_>, _>>().unwrap(), changed);

        let unsynced = dir.path().join("u");
        let mut w = ManifestWriter::create(&unsynced).unwrap();
        changed.iter().for_each(|e| w.push(e).unwrap());
        assert_eq!(w.finish_unsynced().unwrap(), new_root);
        sync_record_file(&unsynced).unwrap();
        assert!(same_records(&unsynced, &path));
        assert!(!same_records(&unsynced, &dir.path().join("absent")));
        let (other, _) = write(dir.path(), "o", &entries);
        assert!(!same_records(&unsynced, &other));
    }

    #[test]
    fn truncated_or_altered_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![entry("", EntryKind::Dir, b""), entry("a", EntryKind::File, b"hello")];
        let (path, root) = write(dir.path(), "m", &entries);
        assert!(ends_as_written(&path, &root));
        let (_, other_root) = write(dir.path(), "o", &entries[..1]);
        assert!(!ends_as_written(&path, &other_root), "another file's root");
        let bytes = std::fs::read(&path).unwrap();
        for cut in [bytes.len() - 1, bytes.len() - 41, 12] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(!ends_as_written(&path, &root), "cut at {cut}: its trailer is gone");
            let result: Result<Vec<Entry>, _> = ManifestReader::open(&path).unwrap().collect();
            assert!(matches!(result, Err(RecordFileError::Corrupt { .. })), "cut at {cut}: {result:?}");
        }
        let mut altered = bytes.clone();
        let i = altered.len() - 45;
        altered[i] ^= 1;
        std::fs::write(&path, &altered).unwrap();
        let result: Result<Vec<Entry>, _> = ManifestReader::open(&path).unwrap().collect();
        assert!(result.is_err());
    }

    /// Records across many read blocks (and one larger than a block) read back whole, with the root
    /// the writer computed; a file cut anywhere is an error.
    #[test]
    fn a_manifest_larger_than_the_read_block_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut entries = vec![entry("", EntryKind::Dir, b"")];
        for i in 0..40_000u32 {
            entries.push(entry(&format!("f{i:06}"), EntryKind::File, &i.to_le_bytes()));
        }
        let mut big = entry("g", EntryKind::File, b"x");
        big.chunks = vec![ChunkRef { hash: ChunkHash::of(b"x"), len: 1 }; 100_000];
        big.size = 100_000;
        entries.push(big);
        let (path, root) = write(dir.path(), "m", &entries);
        assert!(std::fs::metadata(&path).unwrap().len() > 3 << 20);
        let mut reader = ManifestReader::open(&path).unwrap();
        let read: Vec<Entry> = reader.by_ref().collect::<Result<_, _>>().unwrap();
        assert!(read == entries);
        assert_eq!(reader.root_hash(), Some(root));
        let mut raw = ManifestReader::open(&path).unwrap();
        let count = std::iter::from_fn(|| raw.next_raw().unwrap()).count();
        assert_eq!((count, raw.root_hash()), (entries.len(), Some(root)));
        let bytes = std::fs::read(&path).unwrap();
        for cut in [1 << 20, (1 << 20) + 1, bytes.len() / 2, bytes.len() - 41] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let result: Result<Vec<Entry>, _> = ManifestReader::open(&path).unwrap().collect();
            assert!(matches!(result, Err(RecordFileError::Corrupt { .. })), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        let result: Result<Vec<Entry>, _> = ManifestReader::open(&path).unwrap().collect();
        assert!(
            matches!(&result, Err(RecordFileError::Corrupt { reason, .. }) if reason.contains("after the trailer"))
        );
    }

    #[test]
    fn diff_finds_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a =
            vec![entry("", EntryKind::Dir, b""), entry("a", EntryKind::File, b"1"), entry("b", EntryKind::File, b"2")];
        let b =
            vec![entry("", EntryKind::Dir, b""), entry("a", EntryKind::File, b"1"), entry("c", EntryKind::File, b"3")];
        let (old, _) = write(dir.path(), "old", &a);
        let (new, _) = write(dir.path(), "new", &b);
        let changes = diff(ManifestReader::open(&old).unwrap().raw(), ManifestReader::open(&new).unwrap().raw());
        let changes: Vec<Pair<Entry, Entry>> = changes.map(Result::unwrap).collect();
        let paths: Vec<String> = changes.iter().map(|p| p.path().to_string()).collect();
        assert_eq!(paths, ["b", "c"]);
        assert!(changes[0].new.is_none() && changes[1].old.is_none());
        // The old side's place in its manifest: "b" is its third entry; "c" has no old side. On the
        // new side "c" is the third entry, and "b" would have come right before it.
        let numbered =
            diff_numbered(ManifestReader::open(&old).unwrap().raw(), ManifestReader::open(&new).unwrap().raw());
        let places: Vec<Places> = numbered.map(|r| r.unwrap().0).collect();
        assert_eq!(places, [Places { old: Some(2), new: 2 }, Places { old: None, new: 2 }]);
    }

    #[test]
    fn raw_entries_copy_to_the_same_manifest_and_decode_to_the_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut named = entry("a/x", EntryKind::File, b"hello");
        named.user = Some("zimbra".into());
        named.hard_link_to = Some(RelPath::new(&b"a/b"[..]).unwrap());
        let entries = vec![
            entry("", EntryKind::Dir, b""),
            entry("a", EntryKind::Dir, b""),
            entry("a/b", EntryKind::Symlink, b"../x"),
            named,
        ];
        let (path, root) = write(dir.path(), "m", &entries);
        let raw: Vec<RawEntry> = ManifestReader::open(&path).unwrap().raw().collect::<Result<_, _>>().unwrap();
        let heads: Vec<(String, EntryKind)> = raw.iter().map(|r| (r.path().to_string(), r.kind())).collect();
        let expected: Vec<(String, EntryKind)> = entries.iter().map(|e| (e.path.to_string(), e.kind)).collect();
        assert_eq!(heads, expected);
        let decoded: Vec<Entry> = raw.iter().map(|r| r.decode().unwrap()).collect();
        assert_eq!(decoded, entries);
        let copy = dir.path().join("copy");
        let mut writer = ManifestWriter::create(&copy).unwrap();
        for r in &raw {
            writer.push_raw(r).unwrap();
        }
        assert_eq!(writer.finish().unwrap(), root);
        assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&path).unwrap());
        // An entry whose head reads but whose rest does not: the error names the manifest and the entry.
        let mut broken = raw[3].clone();
        broken.bytes.truncate(broken.bytes.len() - 4);
        match broken.decode() {
            Err(RecordFileError::Corrupt { path: file, reason }) => {
                assert_eq!(file, path);
                assert!(reason.contains("a/x"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // The raw reader checks the trailer like the decoding one.
        let mut bytes = std::fs::read(&path).unwrap();
        let i = bytes.len() - 45;
        bytes[i] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(ManifestReader::open(&path).unwrap().raw().any(|r| r.is_err()));
    }

    #[test]
    fn diff_finds_what_comparing_decoded_entries_finds() {
        let dir = tempfile::tempdir().unwrap();
        let mut touched = entry("a", EntryKind::File, b"1");
        touched.mtime_ns = 2;
        let a = vec![
            entry("", EntryKind::Dir, b""),
            entry("a", EntryKind::File, b"1"),
            entry("b", EntryKind::File, b"2"),
            entry("d", EntryKind::Dir, b""),
            entry("d/e", EntryKind::File, b"4"),
        ];
        let b = vec![
            entry("", EntryKind::Dir, b""),
            touched,
            entry("c", EntryKind::File, b"3"),
            entry("d", EntryKind::Dir, b""),
            entry("d/e", EntryKind::File, b"4"),
        ];
        let (old, _) = write(dir.path(), "old", &a);
        let (new, _) = write(dir.path(), "new", &b);
        let raw = diff(ManifestReader::open(&old).unwrap().raw(), ManifestReader::open(&new).unwrap().raw());
        let raw: Vec<Pair<Entry, Entry>> = raw.collect::<Result<_, _>>().unwrap();
        let ok = |v: Vec<Entry>| v.into_iter().map(Ok::<_, ()>);
        let decoded: Vec<Pair<Entry, Entry>> =
            MergeJoin::new(ok(a), ok(b)).map(Result::unwrap).filter(|p| p.old != p.new).collect();
        assert_eq!(raw, decoded);
        assert_eq!(raw.iter().map(|p| p.path().to_string()).collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn validation() {
        let mut e = entry("a", EntryKind::File, b"xyz");
        assert!(e.validate(None).is_ok());
        assert!(e.validate(Some(&RelPath::new(&b"b"[..]).unwrap())).is_err());
        e.size = 4;
        assert!(matches!(e.validate(None), Err(EntryError::BadChunks(_))));
        let mut l = entry("a", EntryKind::File, b"xyz");
        l.hard_link_to = Some(RelPath::new(&b"b"[..]).unwrap());
        assert!(matches!(l.validate(None), Err(EntryError::BadHardLink(_))));
        let mut m = entry("a", EntryKind::Dir, b"");
        m.mode = 0o170000;
        assert!(m.validate(None).is_err());
        assert!(matches!(entry("", EntryKind::File, b"x").validate(None), Err(EntryError::RootNotDir)));
    }
}
