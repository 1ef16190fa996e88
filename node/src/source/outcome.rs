//! How a source's round can end besides a report: unreachable, stopped at its deadline, lost.

use std::sync::atomic::Ordering;

use super::options::PushOptions;
use super::progress::Counters;

/// The peer could not be reached, or was lost and did not come back in time.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// `--max-duration` ran out: the round stopped cleanly and the next one goes on from there.
#[derive(Debug, thiserror::Error)]
#[error(
    "stopped at the deadline (--max-duration {limit}) after sending {sent} in {chunks}; what arrived is kept (the files that arrived whole in place, the arrived part of a file of 8 MiB or more still in progress for the next round): run the round again to go on"
)]
pub struct StoppedAtDeadline {
    pub(super) limit: String,
    pub(super) sent: String,
    pub(super) chunks: String,
}

/// The connection was lost in the middle of the round: worth reconnecting.
/// A signal (SIGTERM, SIGINT) stopped the round cleanly: what arrived is kept.
#[derive(Debug, thiserror::Error)]
#[error(
    "stopped by {signal} after sending {sent} in {chunks}; what arrived is kept (the files that arrived whole in place, the arrived part of a file of 8 MiB or more still in progress for the next round): run the round again to go on"
)]
pub struct StoppedBySignal {
    pub(super) signal: &'static str,
    pub(super) sent: String,
    pub(super) chunks: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Lost(pub(super) String);

/// `--max-duration` as the operator wrote it, for messages.
pub(super) fn max_duration_text(options: &PushOptions) -> String {
    options.max_duration.map(|d| humantime::format_duration(d).to_string()).unwrap_or_default()
}

pub(super) fn deadline_error(options: &PushOptions, sent: &Counters) -> StoppedAtDeadline {
    StoppedAtDeadline {
        limit: max_duration_text(options),
        sent: crate::human::bytes(sent.bytes.load(Ordering::Relaxed)),
        chunks: crate::human::counted(sent.chunks.load(Ordering::Relaxed), "chunk"),
    }
}

pub(super) fn stopped_error(signal: &'static str, sent: &Counters) -> StoppedBySignal {
    StoppedBySignal {
        signal,
        sent: crate::human::bytes(sent.bytes.load(Ordering::Relaxed)),
        chunks: crate::human::counted(sent.chunks.load(Ordering::Relaxed), "chunk"),
    }
}
