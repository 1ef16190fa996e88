//! The walk: folders listed in sorted order, each path paired with its last cache record.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::options::{CacheRecord, ScanReport};
use crate::manifest::RecordReader;
use crate::path::{RelPath, STAGING_DIR};
use crate::rootdir::NameExt;

/// The walk's stage: hands out batches of `batch` items in manifest order until the tree is walked or
/// the next stage stops listening. Returns what it had to skip.
pub(super) fn walk_in_batches(
    mut walker: Walker,
    batch: usize,
    out: &std::sync::mpsc::SyncSender<Vec<WalkItem>>,
) -> ScanReport {
    let mut report = ScanReport::default();
    loop {
        let mut items = Vec::with_capacity(batch);
        while items.len() < batch {
            match walker.next_item(&mut report) {
                Some(item) => items.push(item),
                None => break,
            }
        }
        if items.is_empty() || out.send(items).is_err() {
            return report;
        }
    }
}

/// One path found by the walk, not yet examined.
pub(super) struct WalkItem {
    /// The folder that holds it (for the root: the root itself, with an empty name).
    pub(super) parent: Arc<OwnedFd>,
    pub(super) name: Vec<u8>,
    pub(super) path: RelPath,
    /// The last scan's record of this path, as it is stored ([`StoredRecord`] reads it).
    pub(super) cached: Option<Vec<u8>>,
}

impl WalkItem {
    /// The last scan's record of this path, decoded whole.
    pub(super) fn cached_record(&self) -> Option<CacheRecord> {
        postcard::from_bytes(self.cached.as_deref()?).ok()
    }
}

pub(super) struct Frame {
    pub(super) fd: Arc<OwnedFd>,
    pub(super) path: RelPath,
    pub(super) children: std::vec::IntoIter<(Vec<u8>, FileType)>,
}

pub(super) struct Walker {
    pub(super) stack: Vec<Frame>,
    pub(super) root: Option<Arc<OwnedFd>>,
    pub(super) cache: Option<RecordReader<CacheRecord>>,
    /// The cache's next record, read ahead: its path, and its bytes.
    pub(super) next_cached: Option<(RelPath, Vec<u8>)>,
    /// Room for folder listings ([`read_children`]).
    pub(super) listing: Vec<u8>,
}

impl Walker {
    pub(super) fn new(root: Arc<OwnedFd>, cache_in: Option<&Path>) -> Self {
        let cache = cache_in.filter(|p| p.exists()).and_then(|p| match RecordReader::open(p) {
            Ok(reader) => Some(reader),
            Err(e) => {
                tracing::warn!("ignoring the scan cache ({e}); every file will be read");
                None
            }
        });
        Self {
            stack: Vec::new(),
            root: Some(root),
            cache,
            next_cached: None,
            listing: Vec::with_capacity(LISTING_BUFFER),
        }
    }

    /// The last scan's record for `path` as it is stored, if any. The cache is sorted, as the walk is.
    pub(super) fn cached(&mut self, path: &RelPath) -> Option<Vec<u8>> {
        loop {
            if self.next_cached.is_none() {
                match self.cache.as_mut()?.next_headed() {
                    Ok(Some(record)) => self.next_cached = Some((record.path, record.bytes.to_vec())),
                    Ok(None) => {
                        self.cache = None;
                        return None;
                    }
                    Err(e) => {
                        tracing::warn!("scan cache unreadable from here on ({e}); the rest will be read");
                        self.cache = None;
                        return None;
                    }
                }
            }
            let (key, _) = self.next_cached.as_ref()?;
            match key.cmp(path) {
                std::cmp::Ordering::Less => self.next_cached = None,
                std::cmp::Ordering::Equal => return self.next_cached.take().map(|(_, bytes)| bytes),
                std::cmp::Ordering::Greater => return None,
            }
        }
    }

    pub(super) fn push_dir(&mut self, fd: Arc<OwnedFd>, path: RelPath, report: &mut ScanReport) {
        let children = match read_children(&fd, &mut self.listing) {
            Ok(children) => children,
            Err(e) => {
                report.skip(&path, format_args!("cannot list folder: {e}"));
                Vec::new()
            }
        };
        self.stack.push(Frame { fd, path, children: children.into_iter() });
    }

    pub(super) fn next_item(&mut self, report: &mut ScanReport) -> Option<WalkItem> {
        if let Some(root) = self.root.take() {
            let path = RelPath::root();
            let cached = self.cached(&path);
            self.push_dir(root.clone(), path.clone(), report);
            return Some(WalkItem { parent: root, name: Vec::new(), path, cached });
        }
        loop {
            let frame = self.stack.last_mut()?;
            let Some((name, file_type)) = frame.children.next() else {
                self.stack.pop();
                continue;
            };
            if frame.path.is_root() && name == STAGING_DIR.as_bytes() {
                report.skip(
                    &RelPath::root(),
                    format_args!("holds {STAGING_DIR}, a name ferry keeps for its own use; not copied"),
                );
                continue;
            }
            let parent = frame.fd.clone();
            let path = match frame.path.join(&name) {
                Ok(path) => path,
                Err(e) => {
                    let shown = RelPath::new(frame.path.as_bytes().to_vec()).unwrap_or_default();
                    report.skip(&shown, e);
                    continue;
                }
            };
            let cached = self.cached(&path);
            let is_dir = match file_type {
                FileType::Directory => true,
                FileType::Unknown => rustix::fs::statat(&*parent, name.os(), AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory),
                _ => false,
            };
            if is_dir {
                match rustix::fs::openat(
                    &*parent,
                    name.os(),
                    OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => self.push_dir(Arc::new(fd), path.clone(), report),
                    Err(e) => report.skip(&path, format_args!("cannot open folder: {e}")),
                }
            }
            return Some(WalkItem { parent, name, path, cached });
        }
    }
}

/// Room for the folder entries one `getdents64` returns: at least one of the longest name.
pub(super) const LISTING_BUFFER: usize = 32 << 10;

/// The names and types in the folder `fd` (opened for this), sorted by name. `buf` is room for the
/// kernel's listing, reused from one folder to the next.
pub(super) fn read_children(fd: &OwnedFd, buf: &mut Vec<u8>) -> io::Result<Vec<(Vec<u8>, FileType)>> {
    let mut dir = rustix::fs::RawDir::new(fd, buf.spare_capacity_mut());
    let mut children = Vec::new();
    while let Some(entry) = dir.next() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        children.push((name.to_vec(), entry.file_type()));
    }
    children.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(children)
}
