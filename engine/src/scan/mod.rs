//! The source side: walk a tree in sorted order, reuse what the last scan knew, read and chunk the rest.
//!
//! The walk is depth-first with each folder's children sorted by name, which is manifest order, so the
//! new manifest is written as it goes and last scan's cache is merged in one pass: memory depends on
//! the depth and width of folders and on the batch size, not on the number of files. Batches of entries
//! are stat'ed, read and hashed in parallel (rayon) and written out in order.
//!
//! A file whose size, mtime, ctime and inode match the last scan's record is not read: its chunk list is
//! reused, and when the record describes the file exactly, the record's stored bytes are copied to the
//! new cache and manifest without being decoded. A file that changes while it is read (its `fstat`
//! before and after differ) or that is swapped for something else between the walk and the read is
//! never recorded torn: its previous version (if any) stays in the manifest, and it is reported so that
//! the next round picks it up.

use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use rayon::prelude::*;
use rustix::fs::{Mode, OFlags};

use crate::manifest::{ManifestWriter, RecordWriter};
use crate::owner::OwnerNames;
use examine::{Outcome, examine};
use links::HardLinks;
use walk::{WalkItem, Walker, walk_in_batches};
use write::{WriteState, write_outcome};

mod examine;
mod links;
mod options;
mod stored;
mod times;
mod walk;
mod write;

pub use options::{
    AfterReadHook, CacheRecord, FilePrefix, PREFIX_EVERY, ScanError, ScanOptions, ScanReport, SettledBefore, Teed,
};

/// Scans `root`, writing its manifest to `manifest_out` and the quick-check cache for next time to
/// `cache_out`. `cache_in` is the last scan's cache, if any (a damaged one is ignored with a warning).
///
/// The manifest is whole at `manifest_out` but not fsynced: it is a working file until the caller
/// keeps it ([`crate::sync_record_file`]). The cache is durable; when it holds the same records as the
/// one already at `cache_out` (nothing changed), that one is kept and nothing is written.
pub fn scan(
    root: &Path,
    cache_in: Option<&Path>,
    manifest_out: &Path,
    cache_out: &Path,
    options: &ScanOptions,
) -> Result<ScanReport, ScanError> {
    let started = Instant::now();
    let settled_before = SettledBefore::scan_at(options.started.unwrap_or_else(SystemTime::now));
    // Anything modified after that may change again without its timestamps moving: such records are
    // not trusted next time.
    let racy_after_ns = settled_before.0;
    let root_fd = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| ScanError::OpenRoot { path: root.display().to_string(), source: e.into() })?;
    let walker = Walker::new(Arc::new(root_fd), cache_in);
    let mut manifest = ManifestWriter::create(manifest_out)?;
    let mut cache = RecordWriter::<CacheRecord>::create(cache_out)?;
    let mut report = ScanReport { settled_before, ..ScanReport::default() };
    let mut tee = options.tee.clone();
    if let Some(sender) = &tee {
        let file = manifest.open_reader()?;
        if sender.send(Teed::Manifest(file, manifest_out.to_owned())).is_err() {
            tee = None;
        }
    }
    let teed = tee.as_ref().map(|_| (Vec::new(), Arc::from(manifest_out)));
    let mut names = OwnerNames::default();
    let hard_links = HardLinks::default();

    // Three stages, each on its own thread, so that they overlap: the walk (listing folders, reading
    // the last scan's cache), the examination of each entry (stat, and reading what changed; in
    // parallel), and here the writing of the new manifest and cache. Batches keep manifest order.
    // When a stage stops (an error here), the channel it held closes and the stages before it stop.
    let (walked_tx, walked_rx) = std::sync::mpsc::sync_channel::<Vec<WalkItem>>(2);
    let (examined_tx, examined_rx) = std::sync::mpsc::sync_channel::<Vec<(WalkItem, Outcome)>>(2);
    let written = std::thread::scope(|scope| {
        let thread = |name: &str| std::thread::Builder::new().name(name.into());
        let walk = thread("ferry-walk")
            .spawn_scoped(scope, move || walk_in_batches(walker, options.batch, &walked_tx))
            .map_err(ScanError::Threads)?;
        let linked = &hard_links;
        thread("ferry-examine")
            .spawn_scoped(scope, move || {
                for batch in walked_rx {
                    let outcomes: Vec<(WalkItem, Outcome)> = batch
                        .into_par_iter()
                        .map(|mut item| {
                            let outcome = examine(&mut item, options, linked);
                            (item, outcome)
                        })
                        .collect();
                    if examined_tx.send(outcomes).is_err() {
                        break;
                    }
                }
            })
            .map_err(ScanError::Threads)?;
        let mut state = WriteState {
            report: &mut report,
            names: &mut names,
            hard_links: &hard_links,
            manifest: &mut manifest,
            cache: &mut cache,
            cache_in: cache_in.unwrap_or(Path::new("")),
            racy_after_ns,
            teed,
            tee,
            options,
        };
        // What the tee was last handed, by the bytes read until then.
        let mut read_when_teed = 0;
        // Each batch written says how far the scan is, for whoever watches.
        let written = examined_rx.into_iter().try_for_each(|batch| -> Result<(), ScanError> {
            if options.cancel.as_ref().is_some_and(|cancel| cancel.load(std::sync::atomic::Ordering::Relaxed)) {
                return Err(ScanError::Cancelled);
            }
            batch.into_iter().try_for_each(|(item, outcome)| write_outcome(item, outcome, &mut state))?;
            if let Some(progress) = &options.progress {
                progress.set(state.report.entries, state.report.bytes_read);
            }
            // A batch that read files goes to the tee at once, while they are in memory; entries
            // only looked at (unchanged since the last scan) wait for a fuller batch.
            let read = state.report.bytes_read != read_when_teed;
            if state.teed.as_ref().is_some_and(|(entries, _)| read || entries.len() >= TEE_UNREAD) {
                read_when_teed = state.report.bytes_read;
                state.tee_written()?;
            }
            Ok(())
        });
        if written.is_ok() {
            state.tee_written()?;
        }
        // The walk's own findings (folders it could not list) join the report.
        let walked = walk.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        report.absorb_skips(walked);
        written
    });
    written?;
    report.root_hash = Some(manifest.finish_unsynced()?);
    cache.finish_or_keep()?;
    report.duration = started.elapsed();
    Ok(report)
}

/// Entries the scan gathers for its tee while it reads no file (see [`ScanOptions::tee`]): fewer,
/// fuller batches where nothing changed; a batch that read a file goes at once.
const TEE_UNREAD: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use super::stored::StoredRecord;
    use crate::hash::ChunkHash;
    use crate::hash::RootHash;
    use crate::manifest::{ChunkRef, Entry, EntryKind, RecordReader};
    use crate::path::RelPath;

    fn record(user: Option<&str>, chunks: usize, links: bool) -> CacheRecord {
        let entry = Entry {
            path: RelPath::new(&b"accounts/0001/meta.json"[..]).unwrap(),
            kind: EntryKind::File,
            mode: 0o4751,
            uid: 1001,
            gid: 70_000,
            user: user.map(str::to_owned),
            group: Some("zimbra".into()),
            mtime_ns: -1_234_567_890_123,
            size: 300_000 * chunks as u64,
            chunks: (0..chunks)
                .map(|i| ChunkRef { hash: ChunkHash::of(&i.to_le_bytes()), len: 300_000 + i as u32 })
                .collect(),
            link_target: links.then(|| b"../elsewhere".to_vec()),
            hard_link_to: links.then(|| RelPath::new(&b"accounts/0000/meta.json"[..]).unwrap()),
        };
        CacheRecord { entry, ino: u64::MAX - 3, ctime_ns: 1_700_000_000_123_456_789, trusted: true }
    }

    #[test]
    fn a_stored_record_reads_as_the_record_it_stores() {
        for (user, chunks, links) in [(Some("zimbra"), 3, true), (None, 0, false), (Some(""), 1, false)] {
            let original = record(user, chunks, links);
            let bytes = postcard::to_allocvec(&original).unwrap();
            let stored = StoredRecord::decode(&bytes).unwrap();
            let entry = &original.entry;
            assert_eq!(&bytes[..stored.entry_len], &postcard::to_allocvec(entry).unwrap()[..]);
            assert_eq!(stored.entry.kind, entry.kind);
            assert_eq!((stored.entry.mode, stored.entry.uid, stored.entry.gid), (entry.mode, entry.uid, entry.gid));
            assert_eq!(stored.entry.user, entry.user.as_deref());
            assert_eq!(stored.entry.group, entry.group.as_deref());
            assert_eq!((stored.entry.mtime_ns, stored.entry.size), (entry.mtime_ns, entry.size));
            assert_eq!(stored.entry.link_target, entry.link_target.as_deref());
            assert_eq!(stored.entry.hard_link_to, entry.hard_link_to.as_ref().map(RelPath::as_bytes));
            assert_eq!((stored.ino, stored.ctime_ns, stored.trusted), (original.ino, original.ctime_ns, true));
            // Cut short or followed by more, it is not a record.
            assert!(StoredRecord::decode(&bytes[..bytes.len() - 1]).is_none());
            assert!(StoredRecord::decode(&[&bytes[..], &[0]].concat()).is_none());
        }
    }

    /// Scans `root` against the cache at `cache_in`, into `out`: the new manifest's root hash and the
    /// report.
    fn scan_into(root: &Path, cache_in: &Path, out: &Path) -> (RootHash, ScanReport) {
        std::fs::create_dir_all(out).unwrap();
        let report =
            scan(root, Some(cache_in), &out.join("manifest"), &out.join("cache"), &ScanOptions::default()).unwrap();
        (report.root_hash.unwrap(), report)
    }

    #[test]
    fn the_tee_gives_every_entry_in_order_and_each_is_in_the_file_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        for folder in 0..5 {
            std::fs::create_dir_all(root.join(format!("d{folder}"))).unwrap();
            for i in 0..40 {
                std::fs::write(root.join(format!("d{folder}/f{i}")), vec![i as u8; 100 * i]).unwrap();
            }
        }
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let options = ScanOptions { tee: Some(tx), batch: 16, ..ScanOptions::default() };
        let (manifest, cache) = (out.join("manifest"), out.join("cache"));
        let reading = std::thread::spawn(move || {
            let Ok(Teed::Manifest(file, path)) = rx.recv() else { panic!("the manifest comes first") };
            let mut reader = crate::manifest::ManifestReader::from_file(file, &path).unwrap();
            let mut teed = Vec::new();
            for told in rx {
                let Teed::Entries(entries) = told else { panic!("one manifest") };
                // Each entry told of can be read from the file being written, before the scan ends.
                for entry in entries {
                    let read = reader.next_raw().unwrap().expect("in the file when told");
                    assert_eq!(read.path(), entry.path());
                    teed.push(entry.decode().unwrap());
                }
            }
            teed
        });
        let report = scan(&root, None, &manifest, &cache, &options).unwrap();
        drop(options);
        let teed = reading.join().unwrap();
        let written: Vec<Entry> =
            crate::manifest::ManifestReader::open(&manifest).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(teed, written);
        assert_eq!(teed.len() as u64, report.entries);
        assert_eq!(report.entries, 206, "the root, 5 folders and their 200 files");
    }

    #[test]
    fn a_large_file_is_teed_as_it_is_cut_after_the_entries_before_it_and_before_its_own() {
        use rand::{RngExt, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(root.join("m")).unwrap();
        let mut large = vec![0u8; (13 << 20) + 12_345];
        rand_chacha::ChaCha8Rng::seed_from_u64(7).fill(&mut large[..]);
        std::fs::write(root.join("a/0"), b"before").unwrap();
        std::fs::write(root.join("a/large"), &large).unwrap();
        std::fs::write(root.join("a/small"), &large[..1 << 20]).unwrap();
        std::fs::write(root.join("m/after"), b"after").unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let options = ScanOptions { tee: Some(tx), batch: 2, stream_from: Some(8 << 20), ..ScanOptions::default() };
        let reading = std::thread::spawn(move || {
            let Ok(Teed::Manifest(..)) = rx.recv() else { panic!("the manifest comes first") };
            // In order: each entry's path, or a prefix.
            rx.into_iter()
                .flat_map(|teed| match teed {
                    Teed::Entries(entries) => entries.into_iter().map(|raw| Ok(raw.path().to_string())).collect(),
                    Teed::Prefix(prefix) => vec![Err(prefix)],
                    Teed::Manifest(..) => panic!("one manifest"),
                })
                .collect::<Vec<_>>()
        });
        scan(&root, None, &out.join("manifest"), &out.join("cache"), &options).unwrap();
        drop(options);
        let teed = reading.join().unwrap();
        let entries: Vec<Entry> =
            crate::manifest::ManifestReader::open(&out.join("manifest")).unwrap().collect::<Result<_, _>>().unwrap();
        let place = entries.iter().position(|entry| entry.path.to_string() == "a/large").unwrap();
        let first = teed.iter().position(Result::is_err).expect("prefixes teed");
        let told: Vec<&String> = teed[..first].iter().map(|t| t.as_ref().unwrap()).collect();
        assert_eq!(told.len(), place, "every entry before the file, and no other, before its first prefix: {told:?}");
        let prefixes: Vec<&FilePrefix> = teed.iter().filter_map(|t| t.as_ref().err()).collect();
        assert!(prefixes.len() >= 3, "13 MiB in pieces of 4: {}", prefixes.len());
        let mut offset = 0;
        let mut chunks = Vec::new();
        for prefix in &prefixes {
            assert_eq!(
                (prefix.place, prefix.path.to_string(), prefix.size),
                (place as u64, "a/large".into(), large.len() as u64)
            );
            assert_eq!(prefix.offset, offset, "prefixes follow each other");
            offset += prefix.chunks.iter().map(|chunk| u64::from(chunk.len)).sum::<u64>();
            chunks.extend_from_slice(&prefix.chunks);
        }
        assert!(offset >= PREFIX_EVERY && offset < large.len() as u64);
        assert!(entries[place].chunks.starts_with(&chunks), "the prefixes begin the file's entry");
        let last = teed.iter().rposition(Result::is_err).unwrap();
        assert_eq!(teed[last + 1].as_ref().unwrap(), "a/large", "its entry follows its last prefix");
        assert_eq!(teed.iter().filter(|t| t.is_ok()).count(), entries.len());
    }

    #[test]
    fn another_name_of_a_file_written_already_is_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(root.join("m")).unwrap();
        let content: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(root.join("a/f"), &content).unwrap();
        // Enough entries between the two names that the first is written before the second is looked
        // at (the stages hold a few batches each).
        for i in 0..40 {
            std::fs::write(root.join(format!("m/{i:02}")), [i as u8]).unwrap();
        }
        std::fs::hard_link(root.join("a/f"), root.join("z")).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let options = ScanOptions { batch: 2, ..ScanOptions::default() };
        let report = scan(&root, None, &out.join("manifest"), &out.join("cache"), &options).unwrap();
        assert_eq!((report.files_read, report.bytes_read), (41, 300_040), "{report:?}");
        let entries: Vec<Entry> =
            crate::manifest::ManifestReader::open(&out.join("manifest")).unwrap().collect::<Result<_, _>>().unwrap();
        let (leader, member) = (&entries[2], entries.last().unwrap());
        assert_eq!((leader.path.to_string(), member.path.to_string()), ("a/f".into(), "z".into()));
        assert_eq!(member.hard_link_to.as_ref(), Some(&leader.path));
        assert_eq!((member.size, &member.chunks), (300_000, &leader.chunks));
    }

    #[test]
    fn a_file_whose_mtime_a_manifest_cannot_hold_is_not_carried_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("ok"), b"ok").unwrap();
        let far = root.join("far");
        std::fs::write(&far, b"from the year 2300").unwrap();
        // 2300-01-01, past 2262's i64 nanoseconds; ext4 (with 256-byte inodes) and tmpfs keep it.
        let year_2300 = std::time::UNIX_EPOCH + Duration::from_secs(10_413_792_000);
        std::fs::File::options().write(true).open(&far).unwrap().set_modified(year_2300).unwrap();
        assert_eq!(std::fs::metadata(&far).unwrap().modified().unwrap(), year_2300, "this filesystem clamps");
        let (_, report) = scan_into(&root, &dir.path().join("none"), &dir.path().join("out"));
        assert_eq!(report.files, 1, "{report:?}");
        assert_eq!(report.skipped_count, 1, "{report:?}");
        assert!(report.skipped[0].contains("far") && report.skipped[0].contains("1677 to 2262"), "{report:?}");
        assert_eq!(report.not_carried(true), 1, "not carried, whatever --skip-special says");
    }

    #[test]
    fn an_unchanged_file_keeps_its_records_and_its_owners_name_is_looked_up_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("a")).unwrap();
        for i in 0..50 {
            std::fs::write(root.join(format!("a/f{i}")), vec![i as u8; 1000 + i]).unwrap();
        }
        // Records of files changed within the last second are not trusted; let the tree age.
        std::thread::sleep(Duration::from_millis(1100));
        let first = dir.path().join("first");
        let (first_root, report) = scan_into(&root, &dir.path().join("none"), &first);
        assert_eq!(report.files_read, 50);

        // Kept as stored: the same manifest and the same cache, byte for byte, nothing read.
        let second = dir.path().join("second");
        let (second_root, report) = scan_into(&root, &first.join("cache"), &second);
        assert_eq!((second_root, report.files_read, report.files), (first_root, 0, 50));
        assert_eq!(std::fs::read(second.join("cache")).unwrap(), std::fs::read(first.join("cache")).unwrap());
        assert_eq!(std::fs::read(second.join("manifest")).unwrap(), std::fs::read(first.join("manifest")).unwrap());

        // A cache whose records name another owner (a user renamed since): the files are not read
        // again, but their entries carry the name the system gives now.
        let renamed = dir.path().join("renamed-cache");
        let mut writer = RecordWriter::<CacheRecord>::create(&renamed).unwrap();
        for record in RecordReader::<CacheRecord>::open(&first.join("cache")).unwrap() {
            let mut record = record.unwrap();
            if record.entry.kind == EntryKind::File {
                record.entry.user = Some("someone-renamed".into());
            }
            writer.push(&record).unwrap();
        }
        writer.finish().unwrap();
        let third = dir.path().join("third");
        let (third_root, report) = scan_into(&root, &renamed, &third);
        assert_eq!((third_root, report.files_read), (first_root, 0));
        assert_eq!(std::fs::read(third.join("cache")).unwrap(), std::fs::read(first.join("cache")).unwrap());
        for entry in RecordReader::<Entry>::open(&third.join("manifest")).unwrap() {
            assert_ne!(entry.unwrap().user.as_deref(), Some("someone-renamed"));
        }

        // A file changed in place with its size and mtime restored: its ctime moved, so it is read.
        let path = root.join("a/f7");
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, vec![0xee; 1007]).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
        let fourth = dir.path().join("fourth");
        let (fourth_root, report) = scan_into(&root, &first.join("cache"), &fourth);
        assert_eq!(report.files_read, 1);
        assert_ne!(fourth_root, first_root);
    }
}
