//! [`RootDir`]: an opened folder under which every file operation stays, never following a symlink.
//!
//! Every path handed in is a validated [`RelPath`]; folders along it are opened with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, so neither `..` nor a symlink planted anywhere along the way
//! can lead outside (on kernels without `openat2`, each component is opened in turn with `O_NOFOLLOW`,
//! which the validated components make equally safe). The last component is then used with the
//! `*at` system calls and `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Mode, OFlags, ResolveFlags, openat, openat2};
use rustix::io::Errno;

use crate::path::RelPath;

/// An opened folder that bounds every operation made through it.
#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
    path: PathBuf,
}

static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

const DIR_FLAGS: OFlags = OFlags::DIRECTORY.union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC).union(OFlags::RDONLY);

impl RootDir {
    /// Opens the folder at `path` (which itself may be reached through symlinks: it is the operator's).
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = openat(rustix::fs::CWD, path, OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::RDONLY, Mode::empty())?;
        Ok(Self { fd, path: path.to_owned() })
    }

    /// The path it was opened with, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder's own descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens `rel` with `flags`, refusing to leave the root or to follow any symlink on the way.
    pub fn open_beneath(&self, rel: &RelPath, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        if rel.is_root() {
            return Ok(openat(&self.fd, ".", flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, mode)?);
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match openat2(&self.fd, rel.as_path(), flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, mode, resolve) {
                Err(Errno::NOSYS) | Err(Errno::PERM) if !NO_OPENAT2.load(Ordering::Relaxed) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                other => return Ok(other?),
            }
        }
        // Fallback: one component at a time, none followed if it is a symlink.
        let mut dir = openat(&self.fd, ".", DIR_FLAGS, Mode::empty())?;
        let mut components = rel.components().peekable();
        while let Some(name) = components.next() {
            let name = name.os();
            if components.peek().is_some() {
                dir = openat(&dir, name, DIR_FLAGS, Mode::empty())?;
            } else {
                return Ok(openat(&dir, name, flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, mode)?);
            }
        }
        Ok(dir)
    }

    /// Opens the folder `rel` (the root when empty).
    pub fn open_dir(&self, rel: &RelPath) -> io::Result<OwnedFd> {
        self.open_beneath(rel, DIR_FLAGS, Mode::empty())
    }

    /// Opens the regular file `rel` for reading. Refuses anything that is not a regular file.
    pub fn open_file(&self, rel: &RelPath) -> io::Result<File> {
        let fd = self.open_beneath(rel, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY, Mode::empty())?;
        let stat = rustix::fs::fstat(&fd)?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(io::Error::other(format!("{rel} is not a regular file")));
        }
        Ok(File::from(fd))
    }
}

/// Turns raw name bytes into something the `*at` calls take.
pub(crate) trait NameExt {
    fn os(&self) -> &std::ffi::OsStr;
}

impl NameExt for [u8] {
    fn os(&self) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_on_the_way_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("d")).unwrap();
        std::fs::write(root.path().join("d/f"), b"ok").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        std::os::unix::fs::symlink("d/f", root.path().join("link")).unwrap();
        let dir = RootDir::open(root.path()).unwrap();
        let rel = |s: &str| RelPath::new(s.as_bytes()).unwrap();
        assert!(dir.open_file(&rel("d/f")).is_ok());
        assert!(dir.open_file(&rel("escape/secret")).is_err());
        assert!(dir.open_file(&rel("link")).is_err());
        assert!(dir.open_dir(&rel("escape")).is_err());
        assert!(dir.open_file(&rel("d")).is_err());
    }
}
