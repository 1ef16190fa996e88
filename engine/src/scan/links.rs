//! The inodes with several names that the scan has written, for the stages that read and write.

use std::collections::HashMap;
use std::sync::Mutex;

use rustix::fs::Stat;

use crate::manifest::ChunkRef;
use crate::path::RelPath;

/// The first path written of each inode with more than one link, and its chunks: the writing stage
/// fills it, and the examining stage asks it so as not to read an inode again.
#[derive(Default)]
pub(super) struct HardLinks(Mutex<Leaders>);

/// Each inode's (device, inode number) first path and its chunks.
type Leaders = HashMap<(u64, u64), (RelPath, Vec<ChunkRef>)>;

impl HardLinks {
    /// The map, for the writing stage to read and fill.
    pub(super) fn map(&self) -> std::sync::MutexGuard<'_, Leaders> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Was a file of this inode written already (its content is known)?
    pub(super) fn knows(&self, stat: &Stat) -> bool {
        stat.st_nlink > 1 && self.map().contains_key(&(stat.st_dev, stat.st_ino))
    }
}
