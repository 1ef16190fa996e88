//! The destination's check of its target: what the disk holds, not what ferry remembers writing.
//!
//! A round's verdict ("matches", `in_sync`, exit 0) is the committed manifest's root hash compared
//! with the source's. That manifest says what ferry wrote; the disk may since have lost it (a wiped
//! target, a deleted file) or been changed by someone else (an edit, a `chmod`, a file replaced by a
//! symlink). So before each round the destination `lstat`s every path of its committed manifest and
//! compares it with what the disk said right after ferry put it there (the chunk index's
//! [`PlacedStat`] records: inode and ctime, which the kernel moves on every change and nobody can set
//! back). What [`check_target`] finds goes to a findings file, sorted as manifests are, and
//! [`with_findings`] joins it to the committed manifest. The round then makes a missing entry again
//! (from chunks elsewhere in the target, re-hashed, or from the source); writes again an entry of
//! ferry's changed in place (same inode: an edit, a `chmod`), since its content and metadata are no
//! longer known; puts right a folder whose mode or mtime moved; and leaves alone what someone else
//! put at a path of ferry's (another inode: a file of the administrator's, a symlink), which is
//! theirs unless the operator adopts it, and keeps the round from being in sync.
//!
//! Without a record (a target filled before records were kept, or an entry ferry adopted) an entry
//! passes when its kind, size, mtime and mode are what ferry wrote, as rsync's quick check decides;
//! the record is taken then. Owners are not compared (they depend on the round's owner mapping). A
//! file with several hard links is compared by inode, size, mtime and mode when its ctime moved: the
//! linking of another of its names moves it too.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use rustix::fs::{FileType, Mode, OFlags, Statx};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::apply::Step;
use crate::index::{ChunkIndex, IndexError, PlacedStat, Recorded, look_at};
use crate::manifest::{
    Entry, EntryKind, Keyed, ManifestReader, MergeJoin, Pair, RawEntry, RecordFileError, RecordReader, RecordWriter,
};
use crate::path::RelPath;
use crate::rootdir::{NameExt, RootDir};

/// What the check found at a path of the committed manifest that is not as ferry left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Found {
    /// Nothing is there (or what holds it is no longer a folder).
    Missing,
    /// Ferry's entry, changed in place since (an edit, a `chmod`): why, for people.
    Changed(String),
    /// Ferry's file changed in place, its content still as ferry wrote it (read and hashed again):
    /// a `chown` or `chmod`. The round puts its owner, mode and mtime back and writes nothing.
    Intact,
    /// Something ferry did not put there (another inode, another kind): why, for people.
    Foreign(String),
    /// The folder is there, with another mode or mtime.
    Folder {
        /// Its permission bits now.
        mode: u32,
        /// Its mtime now.
        mtime_ns: i64,
    },
}

/// One path the check found not as ferry left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// The path.
    pub path: RelPath,
    /// What is there.
    pub found: Found,
}

impl Keyed for Finding {
    fn key(&self) -> &RelPath {
        &self.path
    }
}

/// What a check of the target found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Paths of the committed manifest looked at.
    pub entries: u64,
    /// Of those, not there.
    pub missing: u64,
    /// Ferry's entries changed in place behind its back: written again, or, a file whose content
    /// is intact, given back its owner, mode and mtime.
    pub changed: u64,
    /// Paths of ferry's where something else is now: left alone unless adopted.
    pub foreign: u64,
    /// Folders whose mode or mtime moved (put right by the round).
    pub folders: u64,
    /// Entries without a record that passed the quick check, recorded now.
    pub recorded: u64,
    /// The first differences, for people.
    pub differences: Vec<String>,
    /// Wall time.
    #[serde(serialize_with = "crate::timing::serialize_millis")]
    pub duration: Duration,
}

impl CheckReport {
    /// Did the target hold every entry as ferry left it?
    pub fn is_clean(&self) -> bool {
        self.missing + self.changed + self.foreign + self.folders == 0
    }

    /// Did files, symlinks or folders go missing or change? (Folders whose mtime moved are ordinary:
    /// the import writes its own files into them.)
    pub fn entries_differ(&self) -> bool {
        self.missing + self.changed + self.foreign > 0
    }

    /// One line for people: what differed.
    pub fn summary(&self) -> String {
        format!(
            "{} missing, {} changed in place, {} replaced by something ferry did not put there, {} with \
             another mode or mtime",
            self.missing,
            self.changed,
            self.foreign,
            crate::human::counted(self.folders, "folder")
        )
    }
}

/// How to check.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// An entry whose record does not match passes when its quick check does, and is recorded again:
    /// for a target ferry adopts whole (another disk mounted in its place, a restored copy).
    pub adopt: bool,
    /// Write nothing, not even records of entries that passed without one (a dry run).
    pub read_only: bool,
}

/// A check that could not run.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The target folder could not be opened.
    #[error("target folder {path}: {source}")]
    Target {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Reading the committed manifest or writing the findings failed.
    #[error(transparent)]
    Manifest(#[from] RecordFileError),
    /// The chunk index (its records of what was placed) failed.
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// How many entries are looked at together (in parallel, with one read of the index's records).
const BATCH: usize = 4096;
/// How many differences a report names.
const SAMPLE: usize = 20;

/// Looks at every path of the committed manifest at `committed` (if there is one) in `target`, and
/// writes what differs to `findings`, in manifest order.
pub fn check_target(
    target: &Path,
    (committed, kept): (&Path, &Path),
    index: &mut ChunkIndex,
    findings: &Path,
    options: CheckOptions,
) -> Result<CheckReport, CheckError> {
    let started = Instant::now();
    let mut report = CheckReport::default();
    let mut out = RecordWriter::<Finding>::create(findings)?;
    if !committed.exists() && !kept.exists() {
        out.finish_unsynced()?;
        return Ok(report);
    }
    // A target folder that is gone holds nothing: every entry is missing.
    let root = match RootDir::open(target) {
        Ok(root) => Some(root),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(CheckError::Target { path: target.to_owned(), source: e }),
    };
    let mut entries = held_entries(committed, kept)?;
    let mut folders = Folders { root, stack: Vec::new() };
    // A folder that is not there as a folder: everything beneath it is missing too.
    let mut broken: Option<RelPath> = None;
    loop {
        let batch = entries.by_ref().take(BATCH).collect::<Result<Vec<_>, _>>()?;
        if batch.is_empty() {
            break;
        }
        // Each entry is looked at from its folder's descriptor: one name to resolve, not the whole path.
        let places: Vec<_> = batch.iter().map(|entry| folders.place_of(entry)).collect();
        // The records are read beside the stats, a part at a time, each part in one read of the index.
        let looked = batch
            .par_chunks(256)
            .zip(places.par_chunks(256))
            .map(|(entries, places)| {
                let records = index.placed(entries.iter().map(RawEntry::path))?;
                let stats = places.iter().map(|(dir, name)| match dir {
                    Some(dir) => lstat(dir, name),
                    None => Ok(None),
                });
                Ok(stats.zip(records).collect::<Vec<_>>())
            })
            .collect::<Result<Vec<_>, IndexError>>()?;
        let (mut to_record, mut foreign) = (Vec::new(), Vec::new());
        let mut verdicts = Vec::with_capacity(batch.len());
        for (entry, (stat, record)) in batch.iter().zip(looked.into_iter().flatten()) {
            let verdict = if broken.as_ref().is_some_and(|b| b.is_ancestor_of(entry.path())) {
                Verdict::Found(Found::Missing)
            } else {
                judge(entry, stat, record, options)?
            };
            if entry.kind() == EntryKind::Dir && matches!(verdict, Verdict::Found(Found::Missing | Found::Foreign(_))) {
                broken = Some(entry.path().clone());
            }
            verdicts.push(verdict);
        }
        // A file changed in place whose content is still ferry's (a chown, a chmod) is read and
        // hashed here, in parallel, rather than sent again whole.
        verdicts
            .par_iter_mut()
            .zip(batch.par_iter().zip(places.par_iter()))
            .filter(|(verdict, (entry, _))| {
                entry.kind() == EntryKind::File && matches!(verdict, Verdict::Found(Found::Changed(_)))
            })
            .for_each(|(verdict, (entry, (dir, name)))| {
                if let Some(dir) = dir
                    && entry.decode().is_ok_and(|wrote| crate::held::holds(dir, name, &wrote))
                {
                    *verdict = Verdict::Found(Found::Intact);
                }
            });
        for (entry, verdict) in batch.iter().zip(verdicts) {
            report.entries += 1;
            let path = entry.path();
            let found = match verdict {
                Verdict::Same => continue,
                Verdict::SameUnrecorded(stat) => {
                    to_record.push((path.clone(), stat));
                    continue;
                }
                Verdict::Found(found) => found,
            };
            let shown = match &found {
                Found::Missing => {
                    report.missing += 1;
                    format!("{path}: missing")
                }
                Found::Changed(why) => {
                    report.changed += 1;
                    format!("{path}: {why}")
                }
                Found::Intact => {
                    report.changed += 1;
                    format!("{path}: its owner, mode or times changed (its content is ferry's: not sent again)")
                }
                Found::Foreign(why) => {
                    report.foreign += 1;
                    // No longer ferry's: the round drops it from its manifest, and its record goes.
                    foreign.push(path.clone());
                    format!("{path}: {why}")
                }
                Found::Folder { .. } => {
                    report.folders += 1;
                    format!("{path}: folder's mode or mtime changed")
                }
            };
            if report.differences.len() < SAMPLE {
                report.differences.push(shown);
            }
            out.push(&Finding { path: path.clone(), found })?;
        }
        report.recorded += to_record.len() as u64;
        if !options.read_only && (!to_record.is_empty() || !foreign.is_empty()) {
            index.record([], to_record.iter().map(|(p, s)| (p, *s)), &foreign, false)?;
        }
    }
    out.finish_unsynced()?;
    report.duration = started.elapsed();
    Ok(report)
}

enum Verdict {
    /// As ferry left it.
    Same,
    /// As ferry wrote it by the quick check, with no record (or, adopting, another one): record this.
    SameUnrecorded(PlacedStat),
    Found(Found),
}

/// The folders above the entries being looked at, each opened (`O_PATH`, no symlink followed) from
/// the one above it: manifest order puts a folder before its contents.
struct Folders {
    /// The target (`None`: it is gone).
    root: Option<RootDir>,
    /// The folders open, each inside the one before (`None`: not a folder there).
    stack: Vec<(RelPath, Option<Arc<OwnedFd>>)>,
}

impl Folders {
    /// Where to look at `entry`: the folder that holds it (`None`: there is none, so the entry is
    /// missing) and its name there (empty for the target itself). A folder entry is opened too, for
    /// what comes inside it.
    fn place_of(&mut self, entry: &RawEntry) -> (Option<Arc<OwnedFd>>, Vec<u8>) {
        let path = entry.path();
        let Some(root) = &self.root else { return (None, Vec::new()) };
        if path.is_root() {
            let fd = rustix::io::fcntl_dupfd_cloexec(root.fd(), 0).ok().map(Arc::new);
            return (fd, Vec::new());
        }
        let parent = path.parent().unwrap_or_default();
        while self.stack.last().is_some_and(|(top, _)| !top.is_ancestor_of(path)) {
            self.stack.pop();
        }
        let dir = match self.stack.last() {
            Some((top, fd)) if *top == parent => fd.clone(),
            // The target itself, or a folder the manifest does not list (it lists every one).
            _ => root.open_beneath(&parent, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).ok().map(Arc::new),
        };
        let name = path.file_name().unwrap_or_default().to_vec();
        if entry.kind() == EntryKind::Dir {
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let opened = dir.as_ref().and_then(|d| rustix::fs::openat(&**d, name.os(), flags, Mode::empty()).ok());
            self.stack.push((path.clone(), opened.map(Arc::new)));
        }
        (dir, name)
    }
}

fn lstat(dir: &OwnedFd, name: &[u8]) -> Result<Option<Statx>, Errno> {
    // An empty name is the folder itself.
    match look_at(dir, name.os()) {
        Ok(stat) => Ok(Some(stat)),
        Err(Errno::NOENT | Errno::NOTDIR) => Ok(None),
        Err(e) => Err(e),
    }
}

fn judge(
    entry: &RawEntry,
    stat: Result<Option<Statx>, Errno>,
    recorded: Recorded,
    options: CheckOptions,
) -> Result<Verdict, RecordFileError> {
    let stat = match stat {
        Ok(Some(stat)) => stat,
        Ok(None) => return Ok(Verdict::Found(Found::Missing)),
        Err(e) => return Ok(Verdict::Found(Found::Foreign(format!("cannot be looked at: {e}")))),
    };
    let kind = FileType::from_raw_mode(stat.stx_mode.into());
    let expected = match entry.kind() {
        EntryKind::Dir => FileType::Directory,
        EntryKind::File => FileType::RegularFile,
        EntryKind::Symlink => FileType::Symlink,
    };
    if kind != expected {
        return Ok(Verdict::Found(Found::Foreign(format!("is now {}", describe(kind)))));
    }
    let mode = u32::from(stat.stx_mode) & 0o7777;
    let mtime_ns = stat.stx_mtime.tv_sec * 1_000_000_000 + i64::from(stat.stx_mtime.tv_nsec);
    if entry.kind() == EntryKind::Dir {
        let wrote = entry.decode()?;
        return Ok(if wrote.mode == mode && wrote.mtime_ns == mtime_ns {
            Verdict::Same
        } else {
            Verdict::Found(Found::Folder { mode, mtime_ns })
        });
    }
    let now = PlacedStat::of(&stat);
    let record = recorded.for_stat(&stat);
    // Only the inode was recorded when a round stopped right after putting the entry in place.
    let ctime_known = record.is_some_and(|r| r.ctime_ns.is_some());
    let as_written = || -> Result<bool, RecordFileError> {
        let wrote = entry.decode()?;
        Ok(wrote.mtime_ns == mtime_ns
            && (wrote.kind == EntryKind::Symlink || (wrote.mode == mode && wrote.size == stat.stx_size)))
    };
    Ok(match record {
        Some(record) if ctime_known && record.matches(&stat) => Verdict::Same,
        Some(record) if record.same_inode(&stat) && !ctime_known && as_written()? => Verdict::SameUnrecorded(now),
        Some(record) if record.same_inode(&stat) && stat.stx_nlink > 1 && as_written()? => Verdict::Same,
        Some(_) if options.adopt && as_written()? => Verdict::SameUnrecorded(now),
        Some(record) if !record.same_inode(&stat) => {
            Verdict::Found(Found::Foreign("was replaced by a file ferry did not put there".to_owned()))
        }
        Some(_) => Verdict::Found(Found::Changed("was changed in place since ferry put it there".to_owned())),
        None if as_written()? => Verdict::SameUnrecorded(now),
        // No record to tell whose it is: ferry's, as it always took what it listed.
        None => Verdict::Found(Found::Changed("differs from what ferry wrote there".to_owned())),
    })
}

fn describe(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "a file",
        FileType::Directory => "a folder",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a fifo",
        FileType::Socket => "a socket",
        FileType::CharacterDevice | FileType::BlockDevice => "a device",
        FileType::Unknown => "something of unknown kind",
    }
}

/// The most paths found gone or changed whose index hints a round avoids one by one; past it (a
/// target mostly wiped), it trusts no hint.
const DISTRUSTED_MAX: u64 = 100_000;

/// The paths whose index hints are stale after a check (`report`, with its findings at `findings`):
/// what it found missing or changed. `None` when there are too many to hold: trust no hint. See
/// [`Planner::distrust`](crate::Planner::distrust).
pub fn stale_paths(
    report: &CheckReport,
    findings: &Path,
) -> Result<Option<std::collections::HashSet<RelPath>>, RecordFileError> {
    if report.missing + report.changed + report.foreign > DISTRUSTED_MAX {
        return Ok(None);
    }
    let mut paths = std::collections::HashSet::new();
    if report.entries_differ() {
        for finding in RecordReader::<Finding>::open(findings)? {
            let finding = finding?;
            if !matches!(finding.found, Found::Folder { .. } | Found::Intact) {
                paths.insert(finding.path);
            }
        }
    }
    Ok(Some(paths))
}

/// An entry of the committed manifest with what the check found at its path.
#[derive(Debug)]
pub struct Checked {
    /// The entry as ferry committed it.
    pub raw: RawEntry,
    /// What is there instead, when it is not as ferry left it.
    pub found: Option<Found>,
}

impl Keyed for Checked {
    fn key(&self) -> &RelPath {
        self.raw.path()
    }
}

impl From<RawEntry> for Checked {
    /// An entry as ferry left it (nothing found at its path).
    fn from(raw: RawEntry) -> Self {
        Self { raw, found: None }
    }
}

impl Checked {
    /// The entry as the target holds it, for the old side of a round's merge: `None` when nothing of
    /// ferry's is there (missing, or someone else's now). An entry of ferry's changed in place comes
    /// with no content and no metadata, so that whatever the round does with it writes it whole.
    pub fn on_disk(&self) -> Result<Option<Entry>, RecordFileError> {
        Ok(match &self.found {
            None => Some(self.raw.decode()?),
            Some(Found::Missing | Found::Foreign(_)) => None,
            Some(Found::Changed(_)) => Some(Entry {
                size: 0,
                chunks: Vec::new(),
                link_target: None,
                hard_link_to: None,
                mtime_ns: i64::MIN,
                ..self.raw.decode()?
            }),
            Some(Found::Folder { mode, mtime_ns }) => {
                Some(Entry { mode: *mode, mtime_ns: *mtime_ns, ..self.raw.decode()? })
            }
            // Its content as ferry wrote it, its metadata unknown: put back whole, nothing written.
            Some(Found::Intact) => Some(Entry { mtime_ns: i64::MIN, ..self.raw.decode()? }),
        })
    }
}

/// What ferry holds in the target, in manifest order: the committed manifest, and what the source
/// removed and the target keeps (a record file of the same form, written by the apply when it is not
/// to delete: [`crate::ApplyOptions::kept`]). Either file may be absent. The check looks at both, and
/// a round with `delete` removes what is kept, if it is still as ferry left it.
pub fn held_entries(
    committed: &Path,
    kept: &Path,
) -> Result<Box<dyn Iterator<Item = Result<RawEntry, RecordFileError>> + Send>, RecordFileError> {
    let open = |path: &Path| -> Result<Box<dyn Iterator<Item = Result<RawEntry, RecordFileError>> + Send>, _> {
        Ok(if path.exists() { Box::new(ManifestReader::open(path)?.raw()) } else { Box::new(std::iter::empty()) })
    };
    let (committed, kept) = (open(committed)?, open(kept)?);
    // A path in both (kept, then the source had it again) is the committed one.
    Ok(Box::new(MergeJoin::new(committed, kept).filter_map(|pair| pair.map(|p| p.old.or(p.new)).transpose())))
}

/// The committed manifest joined with the check's findings (both sorted).
pub fn with_findings(
    committed: impl Iterator<Item = Result<RawEntry, RecordFileError>>,
    findings: RecordReader<Finding>,
) -> impl Iterator<Item = Result<Checked, RecordFileError>> {
    MergeJoin::new(committed, findings).filter_map(|pair| match pair {
        Ok(Pair { old: Some(raw), new: finding }) => Some(Ok(Checked { raw, found: finding.map(|f| f.found) })),
        // A finding for a path the manifest does not list (a findings file of another round): nothing.
        Ok(Pair { old: None, .. }) => None,
        Err(e) => Some(Err(e)),
    })
}

/// The steps from the checked committed manifest to a new one (a local round's full manifest): an
/// entry the check found as ferry left it and stored with the same bytes on both sides is kept
/// undecoded; every other path is decoded, its old side as the disk holds it.
pub fn checked_steps(
    old: impl Iterator<Item = Result<Checked, RecordFileError>>,
    new: impl Iterator<Item = Result<RawEntry, RecordFileError>>,
) -> impl Iterator<Item = Result<Step, RecordFileError>> {
    MergeJoin::new(old, new).filter_map(|pair| {
        let step = match pair {
            Ok(Pair { old: Some(old), new: Some(new) })
                if old.found.is_none() && old.raw.same_bytes(&new) && new.kind() != EntryKind::Dir =>
            {
                Ok(Step::Keep(new))
            }
            Ok(Pair { old, new }) => (|| {
                Ok(Pair {
                    old: old.map(|o| o.on_disk()).transpose()?.flatten(),
                    new: new.map(|n| n.decode()).transpose()?,
                })
            })()
            .map(Step::from),
            Err(e) => Err(e),
        };
        // Gone at the source and not ferry's here: nothing to do.
        match step {
            Ok(Step::Apply(pair)) if pair.old.is_none() && pair.new.is_none() => None,
            step => Some(step),
        }
    })
}

/// Which folder a round's target (or source) is: its device and inode, against those ferry recorded
/// in the last round it committed. A target folder that is not the one ferry last filled (removed
/// and made again, another disk mounted there, a restored copy) is adopted whole.
#[derive(Debug)]
pub struct FolderIdentity {
    file: PathBuf,
    target: PathBuf,
    now: Option<String>,
    /// The device the folder was on in the last committed round, when it was at the same path (a
    /// job moved elsewhere is another matter: see [`Self::looks_unmounted`]).
    recorded_device: Option<u64>,
    /// Another folder than the one recorded.
    pub changed: bool,
}

impl FolderIdentity {
    /// The identity of `target` now, against the one recorded in `file` (none recorded: unchanged).
    /// The file holds `DEVICE:INODE`, then the folder's path on a line of its own (files written
    /// before the path was kept have none, and stand for the same path).
    pub fn read(file: &Path, target: &Path) -> Self {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::metadata(target).ok().map(|meta| format!("{}:{}", meta.dev(), meta.ino()));
        let bytes = std::fs::read(file).unwrap_or_default();
        let mut lines = bytes.splitn(2, |&byte| byte == b'\n');
        let known = lines.next().and_then(|id| std::str::from_utf8(id).ok()).map(str::trim).filter(|id| !id.is_empty());
        let same_path = lines.next().is_none_or(|path| path == target.as_os_str().as_bytes());
        let changed = known.is_some_and(|known| now.as_deref().is_some_and(|now| now != known));
        let recorded_device = known.filter(|_| same_path).and_then(|known| known.split_once(':')?.0.parse().ok());
        Self { file: file.to_owned(), target: target.to_owned(), now, recorded_device, changed }
    }

    /// Why the folder looks like a disk that is not mounted: it was on one filesystem in the last
    /// committed round, and it is now missing, or empty (but for `lost+found`), on another (its
    /// mount point's, or the folder above's). A target filled then would fill that other
    /// filesystem with the whole tree; a source read then would be an empty tree. `None` when it
    /// does not.
    pub fn looks_unmounted(&self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let (target, recorded) = (&self.target, self.recorded_device?);
        let (what, device) = match std::fs::read_dir(target) {
            Ok(mut entries) => {
                if entries.any(|entry| entry.map_or(true, |entry| entry.file_name() != "lost+found")) {
                    return None;
                }
                ("empty", std::fs::metadata(target).ok()?.dev())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                ("missing", target.ancestors().skip(1).find_map(|above| std::fs::metadata(above).ok())?.dev())
            }
            Err(_) => return None,
        };
        (device != recorded).then(|| {
            format!(
                "{} is {what}, and on another filesystem than in the last round: is its disk mounted?",
                target.display()
            )
        })
    }

    /// Records the identity read, once a round is committed.
    pub fn record(&self) -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        match &self.now {
            Some(now) => {
                std::fs::write(&self.file, [now.as_bytes(), b"\n", self.target.as_os_str().as_bytes()].concat())
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ManifestWriter;

    /// A committed manifest of one file `f` as written now in `target`, and the check's verdict on it
    /// given `record`.
    fn verdict_with(record: impl Fn(&Statx) -> Recorded, before_check: impl Fn(&Path)) -> CheckReport {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("f"), b"content").unwrap();
        let dir_fd = std::fs::File::open(&target).unwrap();
        let stat = look_at(&dir_fd, "f".as_ref()).unwrap();
        let path = RelPath::new(&b"f"[..]).unwrap();
        let entry = Entry {
            mode: u32::from(stat.stx_mode) & 0o7777,
            mtime_ns: stat.stx_mtime.tv_sec * 1_000_000_000 + i64::from(stat.stx_mtime.tv_nsec),
            size: 7,
            ..Entry::new(path.clone(), EntryKind::File)
        };
        let committed = dir.path().join("manifest");
        let mut writer = ManifestWriter::create(&committed).unwrap();
        writer.push(&entry).unwrap();
        writer.finish().unwrap();
        let mut index = ChunkIndex::open(&dir.path().join("index.redb")).unwrap();
        let recorded = record(&stat);
        if let Some(placed) = recorded.placed {
            index.record([], [(&path, placed)], [], false).unwrap();
        }
        for placing in recorded.placing {
            index.record_placing([(&path, placing)]).unwrap();
        }
        before_check(&target);
        let findings = dir.path().join("findings");
        check_target(
            &target,
            (&committed, &committed.with_extension("kept")),
            &mut index,
            &findings,
            CheckOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn an_inode_recorded_before_its_name_passes_on_the_quick_check_and_is_recorded() {
        let placing = |stat: &Statx| Recorded { placed: None, placing: vec![PlacedStat::placing(stat)] };
        let report = verdict_with(placing, |_| {});
        assert!(report.is_clean() && report.recorded == 1, "{report:?}");
        // The same inode, edited behind the mtime: found changed, since only the quick check can tell.
        let report = verdict_with(placing, |target| std::fs::write(target.join("f"), b"CONTENT+").unwrap());
        assert_eq!(report.changed, 1, "{report:?}");
    }

    #[test]
    fn a_round_stopped_before_its_rename_leaves_the_record_of_what_is_still_there() {
        // What was put there earlier is there; the inode a stopped round was about to put there never
        // got the name.
        let stopped = |stat: &Statx| Recorded {
            placed: Some(PlacedStat::of(stat)),
            placing: vec![PlacedStat { ino: stat.stx_ino + 1, btime_ns: None, ctime_ns: None }],
        };
        let report = verdict_with(stopped, |_| {});
        assert!(report.is_clean() && report.recorded == 0, "{report:?}");
        // Two rounds stopped: the first after its rename, the second before. What the first put there
        // is ferry's.
        let stopped = |stat: &Statx| Recorded {
            placed: None,
            placing: vec![
                PlacedStat::placing(stat),
                PlacedStat { ino: stat.stx_ino + 1, btime_ns: None, ctime_ns: None },
            ],
        };
        let report = verdict_with(stopped, |_| {});
        assert!(report.is_clean() && report.recorded == 1, "{report:?}");
    }

    /// Filled on one device (here a made-up one), the target now missing or empty on another looks
    /// unmounted; with files in it, or on the device recorded, it does not.
    #[test]
    fn a_target_missing_or_empty_on_another_device_looks_unmounted() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (target, file) = (dir.path().join("mnt/target"), dir.path().join("identity"));
        let looks = |recorded: &str| {
            std::fs::write(&file, recorded).unwrap();
            FolderIdentity::read(&file, &target).looks_unmounted()
        };
        assert!(looks("4242424242:7").unwrap().contains("is missing"));
        let recorded_here = format!("4242424242:7\n{}", target.display());
        assert!(looks(&recorded_here).unwrap().contains("is missing"), "recorded with its path");
        assert_eq!(looks("4242424242:7\n/elsewhere"), None, "the job's folder moved: not this one's disk");
        std::fs::create_dir_all(target.join("lost+found")).unwrap();
        assert!(looks("4242424242:7").unwrap().contains("is empty"));
        let here = format!("{}:7", std::fs::metadata(dir.path()).unwrap().dev());
        assert_eq!(looks(&here), None, "on the device it was filled on");
        std::fs::write(target.join("mail"), b"x").unwrap();
        assert_eq!(looks("4242424242:7"), None, "files in it: another disk mounted there");
        std::fs::remove_file(&file).unwrap();
        assert_eq!(FolderIdentity::read(&file, &target).looks_unmounted(), None, "never filled");
    }

    #[test]
    fn a_moved_ctime_is_a_change_unless_another_name_was_linked() {
        let moved = |target: &Path| {
            std::thread::sleep(Duration::from_millis(20));
            std::fs::set_permissions(target.join("f"), std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        };
        let report = verdict_with(|stat| Recorded { placed: Some(PlacedStat::of(stat)), placing: vec![] }, moved);
        assert_eq!(report.changed, 1, "{report:?}");
        let linked = |target: &Path| {
            std::thread::sleep(Duration::from_millis(20));
            std::fs::hard_link(target.join("f"), target.join("g")).unwrap();
        };
        let report = verdict_with(|stat| Recorded { placed: Some(PlacedStat::of(stat)), placing: vec![] }, linked);
        assert!(report.is_clean(), "{report:?}");
        // Another inode at the path: someone else's.
        let replaced = |target: &Path| {
            std::fs::remove_file(target.join("f")).unwrap();
            std::fs::write(target.join("f"), b"content").unwrap();
        };
        let report = verdict_with(|stat| Recorded { placed: Some(PlacedStat::of(stat)), placing: vec![] }, replaced);
        assert_eq!(report.foreign, 1, "{report:?}");
    }
}
