//! [`RelPath`]: a validated path inside a tree, the only kind of path a manifest can hold.
//!
//! Paths come from peers, so every one is checked once, when it is built or decoded: relative, made of
//! non-empty components that are not `.` or `..`, no NUL byte, bounded lengths, and not ferry's own
//! staging folder. Names are raw bytes: Backup NG names are ASCII, but a tree may hold any byte.

use std::cmp::Ordering;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The longest path ferry accepts, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// The longest file name ferry accepts, in bytes (Linux's `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// The folder at the top of a target where ferry builds files before it renames them into place.
/// No entry of a tree may use this name at the top level.
pub const STAGING_DIR: &str = ".ferry-staging";

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path starts with `/`.
    #[error("path {0:?} is absolute; only paths relative to the tree are allowed")]
    Absolute(String),
    /// A component is empty (`a//b` or a trailing `/`).
    #[error("path {0:?} has an empty component")]
    EmptyComponent(String),
    /// A component is `.` or `..`.
    #[error("path {0:?} has a '.' or '..' component")]
    DotComponent(String),
    /// A NUL byte.
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    /// Over [`MAX_PATH_LEN`] bytes, or a component over [`MAX_NAME_LEN`].
    #[error("path {0:?} is too long")]
    TooLong(String),
    /// The path is ferry's own staging folder or inside it.
    #[error("path {0:?} is reserved for ferry's staging folder")]
    Reserved(String),
}

/// A validated relative path: `/`-separated components of raw bytes. The empty path is the tree's root.
///
/// Ordering is component-wise (`a/x` sorts before `a.b`), which is the order of a depth-first walk that
/// visits each folder's children sorted by name: manifests are sorted this way, so two of them can be
/// merged in one streaming pass.
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct RelPath(Vec<u8>);

impl RelPath {
    /// The root of the tree.
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// Checks and wraps raw path bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        validate(&bytes)?;
        Ok(Self(bytes))
    }

    /// The file `name` in the target's staging folder, where only ferry reads and writes: a path no
    /// manifest may hold, made only inside the engine. `None` unless `name` is one plain component.
    pub(crate) fn staged(name: &[u8]) -> Option<Self> {
        let plain = Self::root().join(name).ok().filter(|path| path.components().count() == 1)?;
        Some(Self([STAGING_DIR.as_bytes(), b"/", plain.as_bytes()].concat()))
    }

    /// Is this the root of the tree?
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The path's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The path as an OS path, relative.
    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// The components, first to last (none for the root).
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    /// The last component, or `None` for the root.
    pub fn file_name(&self) -> Option<&[u8]> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        })
    }

    /// The parent folder, or `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Self(self.0[..i].to_vec()),
            None => Self::root(),
        })
    }

    /// This path with one more component. When `name` is one plain component, only it and the new
    /// length are checked (`self` was checked when it was made); anything else is checked whole.
    pub fn join(&self, name: &[u8]) -> Result<RelPath, PathError> {
        let mut bytes = Vec::with_capacity(self.0.len() + 1 + name.len());
        bytes.extend_from_slice(&self.0);
        if !self.is_root() {
            bytes.push(b'/');
        }
        bytes.extend_from_slice(name);
        let plain = !name.is_empty()
            && name != b"."
            && name != b".."
            && name.len() <= MAX_NAME_LEN
            && bytes.len() <= MAX_PATH_LEN
            && !name.iter().any(|&b| b == b'/' || b == 0)
            && !(self.is_root() && name == STAGING_DIR.as_bytes());
        if plain { Ok(Self(bytes)) } else { Self::new(bytes) }
    }

    /// Is `self` a strict ancestor of `other` (the root is an ancestor of every other path)?
    pub fn is_ancestor_of(&self, other: &RelPath) -> bool {
        if self.is_root() {
            return !other.is_root();
        }
        other.0.len() > self.0.len() && other.0.starts_with(&self.0) && other.0[self.0.len()] == b'/'
    }
}

fn validate(bytes: &[u8]) -> Result<(), PathError> {
    let shown = || String::from_utf8_lossy(bytes).into_owned();
    if bytes.is_empty() {
        return Ok(());
    }
    if bytes.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(shown()));
    }
    if bytes.contains(&0) {
        return Err(PathError::Nul(shown()));
    }
    if bytes[0] == b'/' {
        return Err(PathError::Absolute(shown()));
    }
    for (i, component) in bytes.split(|&b| b == b'/').enumerate() {
        match component {
            b"" => return Err(PathError::EmptyComponent(shown())),
            b"." | b".." => return Err(PathError::DotComponent(shown())),
            c if c.len() > MAX_NAME_LEN => return Err(PathError::TooLong(shown())),
            c if i == 0 && c == STAGING_DIR.as_bytes() => return Err(PathError::Reserved(shown())),
            _ => {}
        }
    }
    Ok(())
}

impl TryFrom<Vec<u8>> for RelPath {
    type Error = PathError;

    fn try_from(bytes: Vec<u8>) -> Result<Self, Self::Error> {
        Self::new(bytes)
    }
}

impl From<RelPath> for Vec<u8> {
    fn from(path: RelPath) -> Self {
        path.0
    }
}

impl Ord for RelPath {
    fn cmp(&self, other: &Self) -> Ordering {
        // Component-wise order equals byte order with '/' ranked below every other byte (NUL, the only
        // smaller byte, never occurs in a path). Sorted neighbours share long prefixes: those are
        // stepped over eight bytes at a time, and the first differing byte decides.
        let (a, b) = (&self.0[..], &other.0[..]);
        let common = a.len().min(b.len());
        let mut i = 0;
        while i + 8 <= common && a[i..i + 8] == b[i..i + 8] {
            i += 8;
        }
        while i < common && a[i] == b[i] {
            i += 1;
        }
        let key = |b: u8| if b == b'/' { 0u8 } else { b };
        match (a.get(i), b.get(i)) {
            (Some(&x), Some(&y)) => key(x).cmp(&key(y)),
            _ => a.len().cmp(&b.len()),
        }
    }
}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            return f.write_str(".");
        }
        match std::str::from_utf8(&self.0) {
            Ok(s) => f.write_str(s),
            Err(_) => write!(f, "{}", self.0.escape_ascii()),
        }
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_hostile_paths() {
        for bad in [
            &b"/etc/passwd"[..],
            b"../x",
            b"a/../../x",
            b"a/./b",
            b".",
            b"a//b",
            b"a/",
            b"a\0b",
            b".ferry-staging",
            b".ferry-staging/t1",
        ] {
            assert!(RelPath::new(bad.to_vec()).is_err(), "{:?} accepted", bad.escape_ascii());
        }
        assert!(matches!(RelPath::new(vec![b'a'; 256]), Err(PathError::TooLong(_))));
        let long: Vec<u8> = std::iter::repeat_n(&b"abcdefgh/"[..], 600).flatten().copied().collect();
        assert!(matches!(RelPath::new(long), Err(PathError::TooLong(_))));
        assert!(RelPath::new(&b"a/.ferry-staging"[..]).is_ok(), "only the top-level name is reserved");
        assert!(RelPath::new(&b"items/Ab/x,y=#z \xff"[..]).is_ok());
    }

    #[test]
    fn decoding_validates() {
        let bytes = postcard::to_allocvec(&b"../etc".to_vec()).unwrap();
        assert!(postcard::from_bytes::<RelPath>(&bytes).is_err());
    }

    #[test]
    fn parent_name_join() {
        let p = RelPath::new(&b"a/b/c"[..]).unwrap();
        assert_eq!(p.file_name(), Some(&b"c"[..]));
        assert_eq!(p.parent().unwrap().as_bytes(), b"a/b");
        assert_eq!(RelPath::new(&b"a"[..]).unwrap().parent(), Some(RelPath::root()));
        assert_eq!(RelPath::root().join(b"x").unwrap().as_bytes(), b"x");
        assert!(RelPath::root().join(b"..").is_err());
        assert!(RelPath::new(&b"a"[..]).unwrap().is_ancestor_of(&p));
        assert!(!RelPath::new(&b"a/b/c"[..]).unwrap().is_ancestor_of(&p));
        assert!(!RelPath::new(&b"a/b/cd"[..]).unwrap().is_ancestor_of(&p));
    }

    #[test]
    fn order_is_depth_first() {
        let mut paths: Vec<RelPath> =
            ["a.b", "a/x", "a", "", "a/x/y", "b", "a-"].iter().map(|s| RelPath::new(s.as_bytes()).unwrap()).collect();
        paths.sort();
        let shown: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown, [".", "a", "a/x", "a/x/y", "a-", "a.b", "b"]);
    }

    proptest! {
        #[test]
        fn order_matches_component_order(a in "[a-c./-]{0,8}", b in "[a-c./-]{0,8}") {
            if let (Ok(pa), Ok(pb)) = (RelPath::new(a.as_bytes()), RelPath::new(b.as_bytes())) {
                let ca: Vec<&[u8]> = pa.components().collect();
                let cb: Vec<&[u8]> = pb.components().collect();
                prop_assert_eq!(pa.cmp(&pb), ca.cmp(&cb));
            }
        }

        /// Long shared prefixes, as sorted neighbours in a tree have: the first difference may fall
        /// anywhere in or after an eight-byte step.
        #[test]
        fn order_matches_component_order_past_long_prefixes(
            prefix in "[a-c/]{0,30}", a in "[a-c./-]{0,12}", b in "[a-c./-]{0,12}"
        ) {
            let (a, b) = (format!("x{prefix}{a}"), format!("x{prefix}{b}"));
            if let (Ok(pa), Ok(pb)) = (RelPath::new(a.as_bytes()), RelPath::new(b.as_bytes())) {
                let ca: Vec<&[u8]> = pa.components().collect();
                let cb: Vec<&[u8]> = pb.components().collect();
                prop_assert_eq!(pa.cmp(&pb), ca.cmp(&cb));
            }
        }

        /// Joining checks as much as building the joined path whole does.
        #[test]
        fn join_accepts_what_new_accepts(parent in "[a.b/]{0,10}", name in "[a.b/\\x00]{0,6}") {
            if let Ok(parent) = RelPath::new(parent.as_bytes()) {
                let mut whole = parent.as_bytes().to_vec();
                if !parent.is_root() {
                    whole.push(b'/');
                }
                whole.extend_from_slice(name.as_bytes());
                prop_assert_eq!(parent.join(name.as_bytes()), RelPath::new(whole));
            }
        }
    }

    #[test]
    fn join_refuses_what_new_refuses() {
        let root = RelPath::root();
        let a = RelPath::new(&b"a"[..]).unwrap();
        for name in [&b""[..], b".", b"..", b"x\0y", b"x/", b"/x", b"x//y", b"../x"] {
            assert!(a.join(name).is_err(), "{:?} accepted", name.escape_ascii());
        }
        assert!(matches!(root.join(STAGING_DIR.as_bytes()), Err(PathError::Reserved(_))));
        assert!(a.join(STAGING_DIR.as_bytes()).is_ok(), "only the top-level name is reserved");
        assert!(matches!(a.join(&[b'n'; 256]), Err(PathError::TooLong(_))));
        let deep: Vec<u8> = std::iter::repeat_n(&b"abcdefgh/"[..], 454).flatten().copied().chain(*b"abc").collect();
        let deep = RelPath::new(deep).unwrap();
        assert_eq!(deep.join(b"123456").unwrap().as_bytes().len(), MAX_PATH_LEN);
        assert!(matches!(deep.join(b"1234567"), Err(PathError::TooLong(_))));
        assert_eq!(a.join(b"b/c").unwrap().as_bytes(), b"a/b/c", "several components are checked whole");
    }
}
