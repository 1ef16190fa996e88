//! Live counters a caller watches while a long step runs (a scan, an apply), for a progress line.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How far a step has come: entries done and bytes moved (read by a scan, written by an apply).
/// The step stores; a watcher on another thread loads. Relaxed: the figures are for people.
#[derive(Debug, Default)]
pub struct Progress {
    entries: AtomicU64,
    bytes: AtomicU64,
    /// When the step first said where it was.
    started: OnceLock<Instant>,
}

impl Progress {
    /// Says where the step is.
    pub fn set(&self, entries: u64, bytes: u64) {
        self.started.get_or_init(Instant::now);
        self.entries.store(entries, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    /// Entries done so far.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// How long since the step first said where it was (zero before): what a rate divides by.
    pub fn elapsed(&self) -> Duration {
        self.started.get().map_or(Duration::ZERO, Instant::elapsed)
    }

    /// Bytes read or written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}
