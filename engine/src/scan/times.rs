//! Timestamps in nanoseconds, and whether a file has settled since its last change.

use std::time::SystemTime;

use rustix::fs::Stat;

/// Were both times before `racy_after_ns`? Then a record of them is trusted next time.
pub(super) fn settled(racy_after_ns: i64, mtime_ns: i64, ctime_ns: i64) -> bool {
    mtime_ns < racy_after_ns && ctime_ns < racy_after_ns
}

pub(super) fn to_ns(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

pub(crate) fn stat_mtime_ns(stat: &Stat) -> i64 {
    stat.st_mtime.saturating_mul(1_000_000_000).saturating_add(stat.st_mtime_nsec as i64)
}

/// The mtime in nanoseconds, if 64 bits hold it (1677 to 2262).
pub(super) fn exact_mtime_ns(stat: &Stat) -> Option<i64> {
    stat.st_mtime.checked_mul(1_000_000_000)?.checked_add(stat.st_mtime_nsec as i64)
}

pub(super) fn stat_ctime_ns(stat: &Stat) -> i64 {
    stat.st_ctime.saturating_mul(1_000_000_000).saturating_add(stat.st_ctime_nsec as i64)
}
