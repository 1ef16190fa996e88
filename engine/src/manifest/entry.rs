//! An entry of a manifest: a path, its kind and metadata, its chunks; and the order entries keep.

use serde::{Deserialize, Serialize};

use crate::hash::ChunkHash;
use crate::path::RelPath;

/// What an entry is. Postcard encodes the variant's index: never reorder, only append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A folder.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link, stored verbatim and never followed.
    Symlink,
}

impl std::fmt::Display for EntryKind {
    /// The kind in words, for messages: "folder", "file", "symlink".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EntryKind::Dir => "folder",
            EntryKind::File => "file",
            EntryKind::Symlink => "symlink",
        })
    }
}

/// One chunk of a file: its name and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The BLAKE3 hash of the chunk's bytes.
    pub hash: ChunkHash,
    /// Its length in bytes.
    pub len: u32,
}

/// One path of a tree with everything needed to recreate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Where it is in the tree.
    pub path: RelPath,
    /// File, folder or symlink.
    pub kind: EntryKind,
    /// Permission bits, including setuid, setgid and sticky (`0o7777` at most).
    pub mode: u32,
    /// Numeric owner on the source.
    pub uid: u32,
    /// Numeric group on the source.
    pub gid: u32,
    /// Owner's name on the source, when it has one: used to map owners by name.
    pub user: Option<String>,
    /// Group's name on the source, when it has one.
    pub group: Option<String>,
    /// Modification time in nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Size in bytes (files), 0 otherwise.
    pub size: u64,
    /// The file's chunks in order (files and hard links), empty otherwise.
    pub chunks: Vec<ChunkRef>,
    /// The link's target bytes (symlinks).
    pub link_target: Option<Vec<u8>>,
    /// For the second and later paths of a hard-link group: the group's first path (in manifest order).
    pub hard_link_to: Option<RelPath>,
}

impl Entry {
    /// A file whose content equals `other`'s (same chunks)?
    pub fn same_content(&self, other: &Entry) -> bool {
        self.kind == other.kind
            && self.size == other.size
            && self.chunks == other.chunks
            && self.link_target == other.link_target
    }
}

/// A manifest entry that breaks the rules a peer's manifest must follow.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// Entries must be strictly sorted.
    #[error("entry {path} is out of order (after {previous})")]
    OutOfOrder {
        /// The offending entry.
        path: RelPath,
        /// The entry before it.
        previous: RelPath,
    },
    /// The chunk lengths do not add up to the size, or a non-file has chunks.
    #[error("entry {0}: size and chunk list disagree")]
    BadChunks(RelPath),
    /// A symlink without a target, or a non-symlink with one.
    #[error("entry {0}: link target does not match its kind")]
    BadLink(RelPath),
    /// A hard link that does not point to an earlier file.
    #[error("entry {0}: hard link must point to an earlier path and be a file")]
    BadHardLink(RelPath),
    /// Mode bits beyond `0o7777`.
    #[error("entry {0}: mode has bits beyond 0o7777")]
    BadMode(RelPath),
    /// The root must be a folder.
    #[error("the root of a tree must be a folder")]
    RootNotDir,
}

/// Manifests are strictly sorted: `path` must come after `previous`.
pub(crate) fn check_order(path: &RelPath, previous: Option<&RelPath>) -> Result<(), EntryError> {
    match previous {
        Some(previous) if previous >= path => {
            Err(EntryError::OutOfOrder { path: path.clone(), previous: previous.clone() })
        }
        _ => Ok(()),
    }
}

impl Entry {
    /// An entry of `kind` at `path` with everyday metadata and no content: mode 0644 (0755 for a
    /// folder), owner and group 0 without names, mtime 0. Tests and tools start from it and set what
    /// matters to them.
    pub fn new(path: RelPath, kind: EntryKind) -> Entry {
        Entry {
            path,
            kind,
            mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            user: None,
            group: None,
            mtime_ns: 0,
            size: 0,
            chunks: Vec::new(),
            link_target: None,
            hard_link_to: None,
        }
    }

    /// Checks the entry on its own and against the previous one (manifests are strictly sorted).
    pub fn validate(&self, previous: Option<&RelPath>) -> Result<(), EntryError> {
        check_order(&self.path, previous)?;
        if self.path.is_root() && self.kind != EntryKind::Dir {
            return Err(EntryError::RootNotDir);
        }
        if self.mode & !0o7777 != 0 {
            return Err(EntryError::BadMode(self.path.clone()));
        }
        let total: u64 = self.chunks.iter().map(|c| u64::from(c.len)).sum();
        let chunks_ok = match self.kind {
            EntryKind::File => total == self.size && self.chunks.iter().all(|c| c.len > 0),
            _ => self.chunks.is_empty() && self.size == 0,
        };
        if !chunks_ok {
            return Err(EntryError::BadChunks(self.path.clone()));
        }
        if (self.kind == EntryKind::Symlink) != self.link_target.is_some()
            || self.link_target.as_ref().is_some_and(|t| t.is_empty() || t.contains(&0))
        {
            return Err(EntryError::BadLink(self.path.clone()));
        }
        if let Some(leader) = &self.hard_link_to
            && (self.kind != EntryKind::File || *leader >= self.path || leader.is_root())
        {
            return Err(EntryError::BadHardLink(self.path.clone()));
        }
        Ok(())
    }
}

/// Something with a path, so that sorted streams of it can be merged.
pub trait Keyed {
    /// The sort key.
    fn key(&self) -> &RelPath;
}

impl Keyed for Entry {
    fn key(&self) -> &RelPath {
        &self.path
    }
}
