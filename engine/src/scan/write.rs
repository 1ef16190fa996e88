//! Writing what the scan found to the new manifest and cache, in order.

use std::path::Path;
use std::sync::Arc;

use rustix::fs::Stat;

use super::examine::Outcome;
use super::links::HardLinks;
use super::options::{CacheRecord, ScanError, ScanReport};
use super::stored::StoredRecord;
use super::times::{settled, stat_ctime_ns};
use super::walk::WalkItem;
use crate::manifest::{EntryKind, ManifestWriter, RawEntry, RecordFileError, RecordWriter};
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
    let report = &mut *state.report;
    let record = match outcome {
        Outcome::Kept { stat } => return keep_stored(item, stat, state),
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
