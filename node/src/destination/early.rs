//! The target check begun when the source asks whether a round would be taken, for the round to take.

use std::collections::HashMap;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_engine::{CheckOptions, ChunkIndex, check_target};
use ferry_proto::RoundRef;

use crate::config::JobConfig;
use crate::state::TargetState;

/// A check of a job's target begun when its source asked whether it would take a round (before the
/// source's export hook, and again right before its scan): it runs while the source scans, and the
/// round that follows takes it instead of checking at its own start, if it began at most
/// [`EARLY_CHECK_MAX_AGE`] before and against the round the destination still holds.
pub(super) struct EarlyCheck {
    pub(super) started: Instant,
    pub(super) holds: Option<RoundRef>,
    pub(super) adopt: bool,
    /// The job's chunk index, once the check's thread opened it: the round that takes the check works
    /// with the same handle (a redb file opens once in a process), without waiting for the check.
    pub(super) index: Receiver<ChunkIndex>,
    pub(super) thread: CheckThread,
}

/// A check of a job's target, on a thread of its own.
pub(super) type CheckThread = std::thread::JoinHandle<Result<ferry_engine::CheckReport, ferry_engine::CheckError>>;

pub(super) type EarlyChecks = Arc<Mutex<HashMap<String, EarlyCheck>>>;

/// How old a check begun before the round may be for the round to take it: what changes in the
/// target between the check and the round is found by the next round's check.
pub(super) const EARLY_CHECK_MAX_AGE: Duration = Duration::from_secs(10 * 60);

/// Begins checking `job`'s target on a thread of its own, unless a check of it runs already or it
/// has never had a round (nothing to check).
pub(super) fn begin(checks: &EarlyChecks, job: &JobConfig, state: &TargetState, holds: Option<RoundRef>) {
    if holds.is_none() {
        return;
    }
    let Ok(mut checks) = checks.lock() else { return };
    if checks.get(&job.name).is_some_and(|c| !c.thread.is_finished()) {
        return;
    }
    // A check begun earlier and done (the source asks again after its export hook) lets go of the
    // index before this one opens it.
    if let Some(done) = checks.remove(&job.name) {
        let _ = done.thread.join();
    }
    let adopt = ferry_engine::FolderIdentity::read(&state.identity(), &job.path).changed;
    let (target, committed, kept, findings) =
        (job.path.clone(), state.manifest(), state.kept(), state.early_findings());
    let index_path = state.chunk_index();
    let (opened, index) = std::sync::mpsc::sync_channel(1);
    let span = tracing::Span::current();
    let thread = std::thread::Builder::new().name("ferry-early-check".into()).spawn(move || {
        let _entered = span.enter();
        let mut index = ChunkIndex::open(&index_path).map_err(ferry_engine::CheckError::from)?;
        let _ = opened.send(index.clone());
        let options = CheckOptions { adopt, read_only: false };
        let report = check_target(&target, (&committed, &kept), &mut index, &findings, options)?;
        let ms = report.duration.as_millis();
        tracing::info!("checked {} entries of {} in {ms} ms", report.entries, target.display());
        Ok(report)
    });
    match thread {
        Ok(thread) => {
            checks.insert(job.name.clone(), EarlyCheck { started: Instant::now(), holds, adopt, index, thread });
        }
        Err(e) => tracing::warn!("cannot begin checking {} early: {e}", job.path.display()),
    }
}

/// The early check of `job`, finished or still running, and the index it opened, if the round can
/// take it (see [`EarlyCheck`]); one it cannot take is waited for (it writes the job's index) and
/// dropped.
pub(super) fn take(
    checks: &EarlyChecks,
    job: &str,
    holds: Option<RoundRef>,
    adopt: bool,
) -> Option<(CheckThread, ChunkIndex)> {
    let early = checks.lock().ok()?.remove(job)?;
    if early.holds == holds && early.adopt == adopt && early.started.elapsed() < EARLY_CHECK_MAX_AGE {
        // Waits for the index to be open, not for the check.
        if let Ok(index) = early.index.recv() {
            return Some((early.thread, index));
        }
    }
    if let Ok(Err(e)) = early.thread.join() {
        tracing::warn!("the check begun before the round failed ({e}); checking again");
    }
    None
}
