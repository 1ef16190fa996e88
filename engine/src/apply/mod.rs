//! The destination side: bring a target folder from the state of one manifest to the next, safely.
//!
//! [`apply`] walks the merged old and new manifests (both sorted, so one pass) and for each path that
//! changed creates, replaces or removes what is in the target. Every operation goes through a
//! [`RootDir`], so nothing outside the target is ever touched and no symlink is followed.
//!
//! A new or changed file is built in `.ferry-staging/` at the top of the target, from chunks the chunk
//! index says the target already holds (re-hashed before use) and from chunks the caller's
//! [`ChunkSource`] hands in (hashed too). Files are staged in batches: one `syncfs` makes a whole batch
//! durable, then each file is renamed over its final path. A final path therefore always holds either
//! the old file or the complete new one, at the cost of one sync per batch instead of one per file.
//! A batch's sync runs on another thread while the next batch is staged ([`Applier::begin_flush`]);
//! the same thread then renames the batch into place, sets the metadata of the folders it finished
//! (after their contents are in place) and records its chunks in the index, all before the next sync
//! begins.
//!
//! Destination-only content (anything the old manifest does not list) is never removed. A path the
//! source deleted is kept unless [`ApplyOptions::delete`] is set. When a path changes kind and the
//! target holds content ferry did not write there, that entry fails with a message and the round goes
//! on; the failed entry keeps its old record in the new manifest, which always describes what is
//! really in the target.

use std::path::Path;

use crate::index::ChunkIndex;
use crate::manifest::{ManifestWriter, RecordFileError};

mod applier;
mod batch;
mod building;
mod make;
mod options;
mod partial;
mod place;
mod plan;
mod source;
mod stage;
mod sys;

pub use applier::Applier;
pub use options::{Adopt, ApplyError, ApplyOptions, ApplyReport};
pub use plan::{Needed, Planner, Step};
pub use source::{ChunkBuf, ChunkSource, FetchError, Fetched, LARGE_FILE};
pub(crate) use sys::partial_name;

/// Applies the pairs (old manifest × new manifest, sorted) to `target`, writing to `committed` the
/// manifest of what the target then holds.
pub fn apply(
    target: &Path,
    steps: impl Iterator<Item = Result<Step, RecordFileError>>,
    source: &mut dyn ChunkSource,
    index: &mut ChunkIndex,
    committed: &mut ManifestWriter,
    options: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    let mut applier = Applier::new(target, source, index, committed, options)?;
    for step in steps {
        applier.step(step?)?;
    }
    applier.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{BorrowedFd, OwnedFd};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use rustix::io::Errno;

    use super::sys::BackgroundSync;

    /// The applier writes what the source handed in last: bytes shared from the source, or its own
    /// buffer once the next chunk is read into it (never a stale shared chunk).
    #[test]
    fn a_chunk_buffer_holds_the_last_chunk_handed_in() {
        let mut buf = ChunkBuf::default();
        buf.owned().extend_from_slice(b"read");
        assert_eq!(&*buf, b"read");
        buf.share(Bytes::from_static(b"shared"));
        assert_eq!(&*buf, b"shared");
        let owned = buf.owned();
        owned.clear();
        owned.extend_from_slice(b"read again");
        assert_eq!(&*buf, b"read again");
    }

    #[test]
    fn a_background_sync_reports_back_what_the_disk_said() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        std::io::Write::write_all(&mut &*file, b"some data").unwrap();
        BackgroundSync::sync(file, |fd| rustix::fs::fdatasync(fd)).synced().unwrap();
        // A socket cannot be synced: the error comes back from the thread to the waiter.
        let (socket, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let socket = Arc::new(OwnedFd::from(socket));
        assert_eq!(BackgroundSync::sync(socket, |fd| rustix::fs::fdatasync(fd)).synced(), Err(Errno::INVAL));
    }

    /// The applying loop applies on while a sync runs and flushes once it is done: `is_done` must
    /// say which, without waiting.
    #[test]
    fn a_background_sync_says_whether_it_is_done_without_waiting() {
        static RELEASED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        fn slow_sync(_: BorrowedFd<'_>) -> Result<(), Errno> {
            while !RELEASED.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        }
        let sync = BackgroundSync::sync(Arc::new(tempfile::tempfile().unwrap()), slow_sync);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!sync.is_done(), "done before the disk answered");
        RELEASED.store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sync.is_done() {
            assert!(Instant::now() < deadline, "still syncing 10 s after the disk answered");
            std::thread::sleep(Duration::from_millis(1));
        }
        sync.synced().unwrap();
    }
}
