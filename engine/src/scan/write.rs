//! Writing what the scan found to the new manifest and cache, in order.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use rustix::fs::Stat;

use super::examine::{Outcome, read_file};
use super::links::HardLinks;
use super::options::{CacheRecord, FilePrefix, PREFIX_EVERY, ScanError, ScanOptions, ScanReport, Teed};
use super::stored::StoredRecord;
use super::times::{settled, stat_ctime_ns};
use super::walk::WalkItem;
use crate::manifest::{Entry, EntryKind, ManifestWriter, RawEntry, RecordFileError, RecordWriter};
use crate::owner::OwnerNames;

/// What the writing stage keeps from one entry to the next.
pub(super) struct WriteState<'a> {
    pub(super) report: &'a mut ScanReport,
    pub(super) names: &'a mut OwnerNames,
    /// The first path seen of each inode with more than one link, and its chunks.
    pub(super) hard_links: &'a HardLinks,
    pub(super) manifest: &'a mut ManifestWriter,
    pub(super) cache: &'a mut RecordWriter<CacheRecord>,
    /// The last scan's cache (for errors).
    pub(super) cache_in: &'a Path,
    pub(super) racy_after_ns: i64,
    /// The entries written since the last batch went to the tee, and the manifest's path.
    pub(super) teed: Option<(Vec<RawEntry>, Arc<Path>)>,
    /// Where they go, until its receiver is gone.
    pub(super) tee: Option<SyncSender<Teed>>,
    pub(super) options: &'a ScanOptions,
}

impl WriteState<'_> {
    /// Hands the entries written since the last time to the tee, once they are in the manifest
    /// file: a reader of the file finds every entry it was told of.
    pub(super) fn tee_written(&mut self) -> Result<(), ScanError> {
        if let Some((entries, _)) = &mut self.teed
            && !entries.is_empty()
        {
            self.manifest.flush()?;
            let entries = Teed::Entries(std::mem::take(entries));
            self.send(entries);
        }
        Ok(())
    }

    fn send(&mut self, teed: Teed) {
        if self.tee.as_ref().is_some_and(|tee| tee.send(teed).is_err()) {
            self.tee = None;
            self.teed = None;
        }
    }

    /// Reads the large file `item` here, in manifest order, teeing its chunks as they are cut
    /// ([`Teed::Prefix`]) after the entries before it.
    fn read_in_order(&mut self, item: &WalkItem, entry: Entry, stat: &Stat) -> Result<Outcome, ScanError> {
        self.tee_written()?;
        let (options, place, path, size) = (self.options, self.report.entries, entry.path.clone(), stat.st_size as u64);
        let read_before = self.report.bytes_read;
        // What the tee was told of the file so far: its chunks and their bytes.
        let (mut told, mut offset) = (0, 0u64);
        let outcome = read_file(item, entry, stat, options, |chunks, read| {
            if let Some(progress) = &options.progress {
                progress.set(place, read_before + read);
            }
            let new = &chunks[told..];
            let bytes: u64 = new.iter().map(|chunk| u64::from(chunk.len)).sum();
            if bytes < PREFIX_EVERY || self.tee.is_none() {
                return;
            }
            let prefix = FilePrefix { place, path: path.clone(), offset, chunks: new.to_vec(), size };
            (told, offset) = (chunks.len(), offset + bytes);
            self.send(Teed::Prefix(prefix));
        });
        Ok(outcome)
    }
}

/// Keeps a copy of the entry just written (encoded as `bytes`) for the tee, if there is one.
fn tee(teed: &mut Option<(Vec<RawEntry>, Arc<Path>)>, bytes: &[u8]) {
    if let Some((entries, file)) = teed
        && let Some(raw) = RawEntry::from_bytes(bytes, file.clone())
    {
        entries.push(raw);
    }
}

/// Records what examining `item` found: in the manifest and the cache, or in the report.
pub(super) fn write_outcome(item: WalkItem, outcome: Outcome, state: &mut WriteState<'_>) -> Result<(), ScanError> {
    if let Outcome::InOrder { entry, stat } = outcome {
        let outcome = state.read_in_order(&item, entry, &stat)?;
        return write_outcome(item, outcome, state);
    }
    let report = &mut *state.report;
    let record = match outcome {
        Outcome::Kept { stat } => return keep_stored(item, stat, state),
        Outcome::InOrder { .. } => unreachable!("read above"),
        Outcome::Found { mut entry, stat, was_read, bytes_read } => {
            if was_read {
                report.files_read += 1;
                report.bytes_read += bytes_read;
            }
            entry.user = state.names.user(entry.uid);
            entry.group = state.names.group(entry.gid);
            if entry.kind == EntryKind::File && stat.st_nlink > 1 {
                let key = (stat.st_dev, stat.st_ino);
                let mut hard_links = state.hard_links.map();
                match hard_links.get(&key) {
                    // Its content is its group's first path's, read once (see [`HardLinks::knows`]).
                    Some((leader, chunks)) => {
                        entry.hard_link_to = Some(leader.clone());
                        entry.chunks.clone_from(chunks);
                        entry.size = chunks.iter().map(|chunk| u64::from(chunk.len)).sum();
                    }
                    None => {
                        hard_links.insert(key, (entry.path.clone(), entry.chunks.clone()));
                    }
                }
            }
            let ctime_ns = stat_ctime_ns(&stat);
            let trusted = settled(state.racy_after_ns, entry.mtime_ns, ctime_ns);
            Some(CacheRecord { entry, ino: stat.st_ino, ctime_ns, trusted })
        }
        Outcome::Changed => {
            report.changed(&item.path);
            tracing::warn!("{} changed while it was read; it is left for the next round", item.path);
            item.cached_record()
                .filter(|c| c.entry.kind == EntryKind::File)
                .map(|c| CacheRecord { trusted: false, ..c })
        }
        Outcome::Vanished => None,
        Outcome::Skipped(why) => {
            report.skip(&item.path, why);
            report.skipped_special += 1;
            None
        }
        Outcome::Unreadable(why) => {
            report.skip(&item.path, &why);
            item.cached_record().map(|c| CacheRecord { trusted: false, ..c })
        }
    };
    if let Some(record) = record {
        report.entries += 1;
        if record.entry.kind == EntryKind::File {
            report.files += 1;
            report.file_bytes += record.entry.size;
        }
        state.manifest.push(&record.entry)?;
        tee(&mut state.teed, state.manifest.last_pushed());
        state.cache.push(&record)?;
    }
    Ok(())
}

/// Records a file found as the last scan left it ([`Outcome::Kept`]): its stored record is copied to
/// the new cache, and the entry that begins it to the manifest, without decoding its chunks or
/// encoding them again. Only when the record is exactly what a new one would be: the owner's names
/// are looked up anew (a renamed user changes the entry, not the file) and the record must still be
/// trusted; otherwise it is decoded and written as any other found file.
pub(super) fn keep_stored(item: WalkItem, stat: Stat, state: &mut WriteState<'_>) -> Result<(), ScanError> {
    let bytes = item.cached.as_deref().unwrap_or_default();
    if let Some(stored) = StoredRecord::decode(bytes)
        && stored.entry.user == state.names.user_name(stored.entry.uid)
        && stored.entry.group == state.names.group_name(stored.entry.gid)
        && settled(state.racy_after_ns, stored.entry.mtime_ns, stored.ctime_ns)
    {
        let report = &mut *state.report;
        report.entries += 1;
        report.files += 1;
        report.file_bytes += stored.entry.size;
        state.manifest.push_bytes(&bytes[..stored.entry_len])?;
        tee(&mut state.teed, &bytes[..stored.entry_len]);
        state.cache.push_bytes(bytes)?;
        return Ok(());
    }
    // Examining the file decoded this record; only a bug could make the whole of it undecodable.
    let Some(record) = item.cached_record() else {
        return Err(ScanError::Output(RecordFileError::Corrupt {
            path: state.cache_in.to_owned(),
            reason: format!("undecodable record for {}", item.path),
        }));
    };
    let outcome = Outcome::Found { entry: record.entry, stat, was_read: false, bytes_read: 0 };
    write_outcome(item, outcome, state)
}
