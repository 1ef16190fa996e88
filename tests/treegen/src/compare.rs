//! Tree snapshots and their comparison.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What a path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A folder.
    Dir,
    /// A regular file, with the BLAKE3 hash of its content.
    File(blake3::Hash),
    /// A symlink and its target.
    Symlink(Vec<u8>),
    /// Anything else.
    Other,
}

/// One path of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Kind and content.
    pub kind: NodeKind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time in nanoseconds (folders and symlinks included).
    pub mtime_ns: i64,
    /// For hard-linked files: the first path of the group, in sorted order.
    pub link_group: Option<Vec<u8>>,
}

/// Every path of a tree, keyed by its relative path bytes (the root is the empty path).
pub type Snapshot = BTreeMap<Vec<u8>, Node>;

/// Reads a whole tree, skipping top-level names in `skip`.
pub fn snapshot(root: &Path, skip: &[&str]) -> io::Result<Snapshot> {
    let mut out = Snapshot::new();
    let mut inodes: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    walk(root, Vec::new(), skip, &mut out)?;
    // Hard-link groups: the smallest path of each multiply-linked inode names the group.
    let mut by_inode: Vec<(Vec<u8>, (u64, u64))> = Vec::new();
    for path in out.keys() {
        let meta = std::fs::symlink_metadata(root.join(std::ffi::OsStr::from_bytes(path)))?;
        if meta.is_file() && meta.nlink() > 1 {
            by_inode.push((path.clone(), (meta.dev(), meta.ino())));
        }
    }
    for (path, key) in by_inode {
        let leader = inodes.entry(key).or_insert_with(|| path.clone()).clone();
        if let Some(node) = out.get_mut(&path) {
            node.link_group = Some(leader);
        }
    }
    Ok(out)
}

fn walk(root: &Path, rel: Vec<u8>, skip: &[&str], out: &mut Snapshot) -> io::Result<()> {
    let full = root.join(std::ffi::OsStr::from_bytes(&rel));
    let meta = std::fs::symlink_metadata(&full)?;
    let kind = if meta.is_dir() {
        NodeKind::Dir
    } else if meta.is_file() {
        NodeKind::File(blake3::hash(&std::fs::read(&full)?))
    } else if meta.file_type().is_symlink() {
        NodeKind::Symlink(std::fs::read_link(&full)?.as_os_str().as_bytes().to_vec())
    } else {
        NodeKind::Other
    };
    let is_dir = kind == NodeKind::Dir;
    out.insert(
        rel.clone(),
        Node {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            link_group: None,
        },
    );
    if is_dir {
        for child in std::fs::read_dir(&full)? {
            let name = child?.file_name();
            if rel.is_empty() && skip.iter().any(|s| s.as_bytes() == name.as_bytes()) {
                continue;
            }
            let mut path = rel.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name.as_bytes());
            walk(root, path, skip, out)?;
        }
    }
    Ok(())
}

/// Checks that `target` holds exactly `source` (every path, with content and metadata), allowing
/// extra paths in the target only where `target_only` says so. Returns a description of the first
/// differences.
pub fn compare_trees(source: &Snapshot, target: &Snapshot, target_only: impl Fn(&[u8]) -> bool) -> Result<(), String> {
    let mut problems = Vec::new();
    for (path, want) in source {
        match target.get(path) {
            None => problems.push(format!("missing in target: {}", path.escape_ascii())),
            Some(got) if got != want => {
                problems.push(format!("differs: {}\n  source {want:?}\n  target {got:?}", path.escape_ascii()))
            }
            Some(_) => {}
        }
    }
    for path in target.keys() {
        if !source.contains_key(path) && !target_only(path) {
            problems.push(format!("only in target: {}", path.escape_ascii()));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let total = problems.len();
    problems.truncate(20);
    Err(format!("{total} differences:\n{}", problems.join("\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_differences() {
        let a = tempfile::tempdir().unwrap();
        std::fs::write(a.path().join("f"), b"1").unwrap();
        std::fs::hard_link(a.path().join("f"), a.path().join("g")).unwrap();
        let snap = snapshot(a.path(), &[]).unwrap();
        assert_eq!(snap[&b"g".to_vec()].link_group.as_deref(), Some(&b"f"[..]));
        assert!(compare_trees(&snap, &snap, |_| false).is_ok());
        let mut other = snap.clone();
        other.get_mut(b"f".as_slice()).unwrap().mode ^= 0o100;
        assert!(compare_trees(&snap, &other, |_| false).unwrap_err().contains("differs: f"));
        other.insert(b"extra".to_vec(), snap[&b"f".to_vec()].clone());
        let err = compare_trees(&snap, &other, |p| p == b"extra").unwrap_err();
        assert!(!err.contains("extra"));
    }
}
