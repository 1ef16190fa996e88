//! Small files built on a thread beside the applier.
//!
//! In a round of many small files the applying thread spent most of its time in the system calls that
//! make each file (create it unnamed, write it, set its owner, mode and mtime), one file after the
//! other, while a core stood idle. The applier now decides everything, gathers a small file's verified
//! bytes and hands the rest to a [`Maker`]: the file comes back as a descriptor before its batch is
//! synced. What is decided, reported and made visible, and in which order, does not change.

use std::fs::File;
use std::io::{self, IoSlice, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

use bytes::Bytes;
use rustix::io::Errno;

use super::options::ApplyError;
use super::sys::{create_staged, no_tmpfile, open_unnamed, set_metadata};

/// What a small file is made of, decided by the applier.
pub(super) struct Job {
    /// Its place in the batch being staged.
    pub(super) slot: usize,
    /// The folder that will hold it, to create it unnamed there (`None`: in the staging folder).
    pub(super) dir: Option<Arc<OwnedFd>>,
    /// Its name in the staging folder, should it be built there.
    pub(super) tmp: Vec<u8>,
    /// Its chunks' bytes, in order, already checked against their hashes.
    pub(super) pieces: Vec<Bytes>,
    pub(super) owner: Option<(u32, u32)>,
    pub(super) mode: u32,
    pub(super) mtime_ns: i64,
    /// How errors name it.
    pub(super) shown: String,
}

/// A file made: unnamed in its folder (`Some`), or named in the staging folder (`None`).
pub(super) struct Made {
    pub(super) unnamed: Option<OwnedFd>,
    /// Its folder's filesystem has no `O_TMPFILE`: the next files go to the staging folder directly.
    pub(super) no_tmpfile: bool,
}

/// A thread that makes small files, in the order it is given them.
pub(super) struct Maker {
    jobs: Sender<Job>,
    made: Receiver<(usize, Result<Made, ApplyError>)>,
    /// Jobs given and not yet collected.
    pending: usize,
}

impl Maker {
    /// Starts the thread; `None` when no thread can be spawned (the applier then makes files itself).
    pub(super) fn start(staging: &OwnedFd) -> Option<Self> {
        let staging = staging.try_clone().ok()?;
        let (jobs, inbox) = channel::<Job>();
        let (outbox, made) = channel();
        std::thread::Builder::new()
            .name("ferry-make".into())
            .spawn(move || {
                for job in inbox {
                    let slot = job.slot;
                    if outbox.send((slot, make(job, &staging))).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(Self { jobs, made, pending: 0 })
    }

    /// Queues a file to make. If the thread is gone, the job is dropped and [`Maker::collect`] says so.
    pub(super) fn give(&mut self, job: Job) {
        self.pending += 1;
        let _ = self.jobs.send(job);
    }

    /// Jobs given and not yet collected.
    pub(super) fn pending(&self) -> usize {
        self.pending
    }

    /// Waits for the next file made, in the order the jobs were given.
    pub(super) fn collect(&mut self) -> Result<(usize, Made), ApplyError> {
        let (slot, made) = self.made.recv().map_err(|_| ApplyError::Io {
            op: "make files on",
            path: "their thread".into(),
            source: io::Error::other("stopped"),
        })?;
        self.pending -= 1;
        Ok((slot, made?))
    }
}

/// Makes one file: unnamed in its folder where the filesystem allows it, else in the staging folder
/// under the name the applier reserved; then its bytes and its metadata.
fn make(job: Job, staging: &OwnedFd) -> Result<Made, ApplyError> {
    let err = |op: &'static str| {
        let path = job.shown.clone();
        move |e: Errno| ApplyError::Io { op, path, source: e.into() }
    };
    let mut unsupported = false;
    let unnamed = match job.dir.as_deref().map(open_unnamed) {
        Some(Ok(fd)) => Some(fd),
        Some(Err(e)) => {
            unsupported = no_tmpfile(e);
            None
        }
        None => None,
    };
    let named = unnamed.is_none();
    let fd = match unnamed {
        Some(fd) => fd,
        None => create_staged(staging, &job.tmp).map_err(err("create"))?,
    };
    let file = File::from(fd);
    write_pieces(&file, &job.pieces).map_err(|e| ApplyError::Io { op: "write", path: job.shown.clone(), source: e })?;
    set_metadata(&file.as_fd(), job.owner, job.mode, job.mtime_ns).map_err(err("set metadata of"))?;
    Ok(Made { unnamed: (!named).then(|| OwnedFd::from(file)), no_tmpfile: unsupported })
}

/// The most bytes one `writev` of [`write_pieces`] carries (16 average chunks). With the memory
/// full of page cache, as on a server that has been up a while, groups of 1 MiB took a third less
/// kernel time than a `write` per chunk, groups of 256 KiB a tenth less, and one `writev` for a whole
/// 8 MB file about as much as 1 MiB groups (`tests/profile/write-pieces.py`). The bound keeps
/// the list of slices short and the page-cache folios ext4 sizes to each write moderate.
pub(super) const WRITE_GROUP: usize = 1 << 20;

/// Writes `pieces` one after the other from the file's position, with one `writev` for each run of
/// them that fits in [`WRITE_GROUP`] (at least one piece). A piece of zeros a block or more long is
/// not written but left a hole (the file is written from its end: a hole reads as zeros), so that a
/// sparse file stays sparse.
///
/// A `write` per chunk ends most writes inside a block, and ext4 zeroes the rest of a new block before
/// a write that does not cover it: each chunk boundary cost a partly zeroed block and a system call.
pub(super) fn write_pieces(file: &File, pieces: &[Bytes]) -> io::Result<()> {
    let mut rest = pieces;
    let mut ends_in_hole = false;
    while !rest.is_empty() {
        let holes = rest.iter().take_while(|piece| is_hole(piece)).count();
        if holes > 0 {
            let len: usize = rest[..holes].iter().map(|piece| piece.len()).sum();
            let len = i64::try_from(len).map_err(io::Error::other)?;
            (&*file).seek(SeekFrom::Current(len))?;
            rest = &rest[holes..];
            ends_in_hole = true;
            continue;
        }
        let (group, after) = rest.split_at(group_len(rest));
        write_all_vectored(file, group)?;
        rest = after;
        ends_in_hole = false;
    }
    if ends_in_hole {
        // Nothing was written past the last hole: the file reaches its end only once told.
        let end = (&*file).stream_position()?;
        if file.metadata()?.len() < end {
            file.set_len(end)?;
        }
    }
    Ok(())
}

/// A piece of zeros at least a block long: left a hole rather than written.
fn is_hole(piece: &[u8]) -> bool {
    const BLOCK: usize = 4096;
    piece.len() >= BLOCK && piece.first() == Some(&0) && piece.last() == Some(&0) && piece.iter().all(|b| *b == 0)
}

/// How many of the first `pieces` one `writev` carries: as many as fit in [`WRITE_GROUP`] up to a
/// hole, at least one.
fn group_len(pieces: &[Bytes]) -> usize {
    let mut len = 0;
    let fit = pieces.iter().take_while(|piece| {
        len += piece.len();
        len <= WRITE_GROUP && !is_hole(piece)
    });
    fit.count().max(1).min(pieces.len())
}

/// Writes every byte of `pieces`, in order, with as few `writev` as the kernel allows.
fn write_all_vectored(file: &File, pieces: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = pieces.iter().map(|piece| IoSlice::new(piece)).collect();
    let mut rest = &mut slices[..];
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match (&*file).write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut rest, written),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use rustix::fs::{Mode, OFlags};

    use super::*;
    use crate::apply::sys::link_unnamed;

    fn open_dir(path: &std::path::Path) -> OwnedFd {
        rustix::fs::open(path, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).unwrap()
    }

    fn job(slot: usize, dir: Option<Arc<OwnedFd>>, tmp: &[u8], pieces: &[&'static [u8]]) -> Job {
        Job {
            slot,
            dir,
            tmp: tmp.to_vec(),
            pieces: pieces.iter().map(|p| Bytes::from_static(p)).collect(),
            owner: None,
            mode: 0o640,
            mtime_ns: 1_500_000_000_123_456_789,
            shown: String::from_utf8_lossy(tmp).into_owned(),
        }
    }

    /// Files come back in the order given, unnamed in their folder (or, where the filesystem has no
    /// `O_TMPFILE`, named in the staging folder), with their bytes and metadata; a file that cannot be
    /// created is an error for the round, and the files after it are still made.
    #[test]
    fn files_are_made_in_order_with_their_bytes_and_metadata() {
        let root = tempfile::tempdir().unwrap();
        let (folder_path, staging_path) = (root.path().join("folder"), root.path().join("staging"));
        std::fs::create_dir(&folder_path).unwrap();
        std::fs::create_dir(&staging_path).unwrap();
        std::fs::write(staging_path.join("taken"), b"").unwrap();
        let (folder, staging) = (Arc::new(open_dir(&folder_path)), open_dir(&staging_path));
        let mut maker = Maker::start(&staging).unwrap();

        maker.give(job(0, Some(folder.clone()), b"t1", &[b"hello ", b"world"]));
        maker.give(job(1, None, b"t2", &[b"named"]));
        maker.give(job(2, None, b"taken", &[b"x"]));
        maker.give(job(3, None, b"t4", &[]));
        assert_eq!(maker.pending(), 4);

        let (slot, made) = maker.collect().unwrap();
        assert_eq!(slot, 0);
        match made.unnamed {
            Some(fd) => {
                // Nothing has a name until it is linked into place.
                assert_eq!(std::fs::read_dir(&folder_path).unwrap().count(), 0);
                link_unnamed(&fd, &*folder, b"a").unwrap();
                assert!(!made.no_tmpfile);
            }
            None => {
                assert!(made.no_tmpfile);
                std::fs::rename(staging_path.join("t1"), folder_path.join("a")).unwrap();
            }
        }
        let made_path = folder_path.join("a");
        assert_eq!(std::fs::read(&made_path).unwrap(), b"hello world");
        let meta = std::fs::metadata(&made_path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!((meta.mtime(), meta.mtime_nsec()), (1_500_000_000, 123_456_789));

        let (slot, made) = maker.collect().unwrap();
        assert_eq!(slot, 1);
        assert!(made.unnamed.is_none());
        assert_eq!(std::fs::read(staging_path.join("t2")).unwrap(), b"named");

        let error = maker.collect().err().unwrap().to_string();
        assert!(error.starts_with("create taken: "), "{error}");
        assert_eq!(std::fs::read(staging_path.join("taken")).unwrap(), b"");

        let (slot, _) = maker.collect().unwrap();
        assert_eq!(slot, 3);
        assert_eq!(std::fs::read(staging_path.join("t4")).unwrap(), b"");
        assert_eq!(maker.pending(), 0);
    }

    /// Every piece lands once and in order: more pieces than one `writev` takes (1024), empty ones
    /// among them, and more bytes than one group, with a piece larger than a group.
    #[test]
    fn pieces_are_written_whole_and_in_order() {
        let mut pieces: Vec<Bytes> =
            (0..3000u32).map(|i| Bytes::from(vec![(i % 251) as u8; (i as usize * 7919) % 300])).collect();
        pieces.extend((0..40u32).map(|i| Bytes::from(vec![i as u8; 100_003])));
        pieces.insert(1500, Bytes::from(vec![7u8; WRITE_GROUP + 1]));
        let expected: Vec<u8> = pieces.iter().flat_map(|piece| piece.iter().copied()).collect();
        assert!(expected.len() > 5 * WRITE_GROUP);

        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("f")).unwrap();
        write_pieces(&file, &pieces).unwrap();
        assert!(std::fs::read(dir.path().join("f")).unwrap() == expected, "the file holds the pieces in order");
    }

    /// Zeros a block long or more are holes, in the middle of a file and at its end; shorter runs of
    /// zeros and pieces with one byte set are written.
    #[test]
    fn runs_of_zeros_are_left_holes_and_read_back_as_zeros() {
        let zeros = |len: usize| Bytes::from(vec![0u8; len]);
        let mut almost = vec![0u8; 1 << 20];
        almost[1 << 19] = 9;
        let pieces = vec![
            Bytes::from_static(b"head"),
            zeros(4 << 20),
            zeros(100),
            Bytes::from(almost),
            zeros(1 << 20),
            zeros(8192),
        ];
        let expected: Vec<u8> = pieces.iter().flat_map(|piece| piece.iter().copied()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let file = File::create(&path).unwrap();
        write_pieces(&file, &pieces).unwrap();
        drop(file);
        assert!(std::fs::read(&path).unwrap() == expected, "the file reads as its pieces");
        // Allocated: "head" and the 100 zeros (a block or two), the almost-zero MiB; not the holes.
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated < 2 << 20, "{allocated} bytes allocated for {} with 5 MiB of holes", expected.len());
    }

    /// A `writev` carries as many whole pieces as fit in a group, and at least one.
    #[test]
    fn a_group_is_the_pieces_that_fit_and_at_least_one() {
        let pieces = |lens: &[usize]| lens.iter().map(|&len| Bytes::from(vec![1u8; len])).collect::<Vec<_>>();
        assert_eq!(group_len(&pieces(&[300_000; 5])), 3);
        assert_eq!(group_len(&pieces(&[WRITE_GROUP / 2; 3])), 2);
        assert_eq!(group_len(&pieces(&[WRITE_GROUP + 1, 10])), 1);
        assert_eq!(group_len(&pieces(&[10, 20])), 2);
        assert_eq!(group_len(&pieces(&[])), 0);
    }
}
