//! ferry's engine: everything a round does to files, and nothing about networks.
//!
//! It owns content-defined chunking ([`Chunker`]), chunk and manifest hashes ([`ChunkHash`],
//! [`RootHash`]), validated tree paths ([`RelPath`]), scanning a source tree with a quick-check cache
//! ([`scan`]), manifests and their diff ([`ManifestWriter`], [`ManifestReader`], [`diff`]), the
//! destination's chunk index ([`ChunkIndex`]), applying a new manifest to a target safely ([`apply`]),
//! and the local round that ties them together ([`local_round`]). It knows nothing of sockets, tokio or
//! QUIC: the network round (in `ferry`, the node crate) feeds the same [`apply`] through a
//! [`ChunkSource`] of its own.
//!
//! ```no_run
//! use ferry_engine::{LocalRoundOptions, local_round};
//! use std::path::Path;
//!
//! let report = local_round(
//!     Path::new("/opt/zimbra/backup/ng"),
//!     Path::new("/mnt/shipped-disk/ng"),
//!     Path::new("/var/lib/ferry/local"),
//!     &LocalRoundOptions::default(),
//! )?;
//! println!("{} files written, in sync: {}", report.apply.files_written, report.in_sync);
//! # Ok::<(), ferry_engine::RoundError>(())
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod apply;
mod check;
mod chunker;
mod hash;
mod held;
pub mod human;
mod index;
mod manifest;
mod owner;
mod path;
mod progress;
mod rate;
mod rootdir;
mod round;
mod scan;
mod space;
mod spill;
mod timing;

pub use apply::{
    Adopt, Applier, ApplyError, ApplyOptions, ApplyReport, ChunkBuf, ChunkSource, FetchError, Fetched, LARGE_FILE,
    Needed, Planner, Step, apply,
};
pub use check::{
    CheckError, CheckOptions, CheckReport, Checked, Finding, FolderIdentity, Found, check_target, checked_steps,
    held_entries, stale_paths, with_findings,
};
pub use chunker::{Chunker, ChunkerConfig, ChunkerConfigError, ReadBuffers, hash_reader, hash_reader_telling};
pub use hash::{ChunkHash, ParseHashError, RootHash};
pub use index::{ChunkIndex, ChunkLocation, IndexError, IndexedFile, PartialSeal, PlacedStat, Recorded};
pub use manifest::{
    ChunkRef, Entry, EntryError, EntryKind, Keyed, MAX_RECORD_LEN, ManifestReader, ManifestWriter, MergeJoin, Pair,
    Places, RawEntry, RecordFileError, RecordReader, RecordWriter, diff, diff_numbered, ends_as_written, same_records,
    sync_record_file,
};
pub use owner::{OwnerMap, OwnerNames};
pub use path::{MAX_NAME_LEN, MAX_PATH_LEN, PathError, RelPath, STAGING_DIR};
pub use progress::Progress;
pub use rate::{Rate, RateError, SendTime, Timetable, TimetableError, TokenBucket};
pub use rootdir::RootDir;
pub use round::{
    LocalChunkSource, LocalPlan, LocalRoundOptions, LocalRoundReport, RoundError, StateLock, local_plan, local_round,
    lock_state,
};
pub use scan::{
    AfterReadHook, CacheRecord, FilePrefix, PREFIX_EVERY, ScanError, ScanOptions, ScanReport, SettledBefore, Teed, scan,
};
pub use space::{NoSpace, Space, taken_over};
pub use timing::lap;
