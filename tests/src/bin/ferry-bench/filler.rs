//! `--fill-memory`: the page cache filled first, as on a server that has been up a while.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use crate::args::Result;

/// A file that fills the machine's free memory with page cache, so that the tools write into memory
/// the kernel takes back from that cache rather than into free pages.
///
/// On a virtual machine whose balloon reports free pages to its host (`virtio_balloon` with
/// `page_reporting`, as here), a free page, once reported, costs a fault on the host the next time it
/// is written: writing 4 GiB into the page cache took 8 s of system time then, against 1.2 s
/// when the same memory had just been used. Whichever tool
/// wrote first after the generator paid for it. A server that has been up for a while has its memory
/// full of cache; this is that state.
pub(crate) struct MemoryFiller {
    /// Unnamed (removed as soon as created), so that nothing is left on the disk however the run
    /// ends; its pages stay cached while it is open.
    pub(crate) _file: std::fs::File,
}

impl MemoryFiller {
    /// Writes a file in `dir` as large as the free memory less 2 GiB (at most what `dir`'s disk has
    /// free less 2 GiB), and syncs it, so that its pages are clean cache the kernel can drop at once.
    pub(crate) fn fill(dir: &Path) -> Result<Self> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")?;
        let free_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemFree:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or("--fill-memory: no MemFree in /proc/meminfo")?;
        let disk = rustix::fs::statvfs(dir)?;
        let room = disk.f_bavail * disk.f_frsize;
        let size = (free_kib << 10).min(room).saturating_sub(2 << 30);
        let started = Instant::now();
        let mut file = tempfile::tempfile_in(dir)?;
        let block = vec![0u8; 8 << 20];
        let mut written = 0;
        while written < size {
            let n = block.len().min((size - written) as usize);
            file.write_all(&block[..n])?;
            written += n as u64;
        }
        file.sync_all()?;
        eprintln!(
            "filled the page cache with {:.1} GiB (an unnamed file in {}) in {:.1} s",
            size as f64 / f64::from(1 << 30),
            dir.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(Self { _file: file })
    }
}
