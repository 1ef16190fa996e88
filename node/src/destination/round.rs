//! A destination round, from its list of changes to its commit and import.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use ferry_engine::{
    Adopt, Applier, ApplyOptions, ApplyReport, CacheRecord, CheckOptions, ChunkIndex, ChunkLocation, Finding,
    IndexedFile, ManifestReader, ManifestWriter, RawEntry, RecordFileError, RecordReader, RecordWriter, RootHash,
    ScanOptions, Step, check_target, with_findings,
};
use ferry_proto::{
    Change, ChangesEnd, Checked, Committed, DestinationEnd, DestinationEvent, DestinationInput, Hello, NeedChunk,
    Refusal, RoundRef,
};
use tokio::sync::mpsc;

use super::early::{self, CheckThread, EarlyChecks};
use super::merge::{BaseNames, Held, changes_in, held, patch, placed};
use super::space;
use super::streamed::{Fitting, Incoming, Room, Streamed};
use super::transfer::{Steps, TransferEnd, Whole, transfer};
use super::window::{Window, WindowSource};
use crate::config::JobConfig;
use crate::refused::Refused;
use crate::state::TargetState;

/// The round's check of its target, running beside the list of changes; a round that ends before it
/// takes the check's report still waits for it (it writes the job's index).
pub(super) struct Check {
    thread: Option<CheckThread>,
    /// Begun when the source asked whether a round would be taken: its findings become the round's
    /// once it is done.
    early: bool,
}

impl Drop for Check {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How a destination round ended.
pub(super) enum RoundEnd {
    /// Committed as this round.
    Committed(RoundRef),
    /// The source stopped it (its deadline): what arrived was applied, nothing committed.
    Stopped(String),
    /// A dry run: planned, nothing written.
    Planned,
}

/// An import in progress.
#[derive(Debug, Clone)]
pub(super) struct RunningImport {
    pub(super) round: u64,
    pub(super) since: std::time::SystemTime,
    pub(super) command: Vec<String>,
}

pub(super) type Imports = Arc<Mutex<HashMap<String, RunningImport>>>;

/// What a destination round works with.
pub(super) struct Round<'a> {
    pub(super) job: &'a JobConfig,
    pub(super) data_dir: &'a Path,
    pub(super) hello: &'a Hello,
    pub(super) peer: &'a str,
    pub(super) imports: &'a Imports,
    pub(super) early_checks: &'a EarlyChecks,
}

pub(super) fn destination_round(
    round: &Round<'_>,
    mut inbox: mpsc::Receiver<DestinationEvent>,
    window: &Arc<Window>,
) -> anyhow::Result<RoundEnd> {
    let (job, hello) = (round.job, round.hello);
    let send = |input: DestinationInput| window.input(input).map(drop);
    let state = TargetState::new(round.data_dir, &job.name);
    std::fs::create_dir_all(&state.dir).with_context(|| format!("cannot create {}", state.dir.display()))?;
    let _lock = ferry_engine::lock_state(&state.dir)?;
    let holds = state.holds()?;
    state.settle_holds(holds)?;
    if let Some(why) = crate::adoption::unmounted(&state, &job.name, &job.path) {
        bail!("{why}");
    }
    std::fs::create_dir_all(&job.path)
        .with_context(|| format!("cannot create target folder {}", job.path.display()))?;
    tracing::Span::current().record("round", holds.map_or(1, |h| h.round + 1));
    // An import marker left behind means the daemon stopped during an import: say so, do not rerun it.
    if let Some(stale) = crate::history::read_marker(&state.import_marker()) {
        let text = format!(
            "the import of round {} of job {} started at {} was interrupted (the daemon stopped); it was not run again: check it, and run it by hand if needed",
            stale.round, job.name, stale.since
        );
        tracing::warn!("{text}");
        crate::history::append(&state.history(), &crate::history::Record::import_interrupted(stale.round))?;
        let _ = std::fs::remove_file(state.import_marker());
        send(DestinationInput::Notice(text))?;
    }
    crate::history::write_marker(
        &state.round_marker(),
        &crate::history::Marker::now(holds.map_or(1, |h| h.round + 1), vec![round.peer.to_owned()]),
    )?;
    let _round_marker = crate::history::MarkerGuard(state.round_marker());
    // A target folder that is not the one ferry filled (removed and made again, another disk mounted
    // there, a restored copy) is adopted whole, as a first round adopts what it finds.
    let identity = ferry_engine::FolderIdentity::read(&state.identity(), &job.path);
    let other_target = identity.changed;
    let adopt_whole = holds.is_none() || other_target;
    let early = early::take(round.early_checks, &job.name, holds, adopt_whole);
    let mut index = match &early {
        Some((_, index)) => index.clone(),
        None => state.open_index()?,
    };
    let indexed = state.existing_indexed();
    if other_target {
        tracing::warn!(
            "{} is not the folder ferry filled in the last round: it is indexed and adopted",
            job.path.display()
        );
        let _ = std::fs::remove_file(&indexed);
    }
    if adopt_whole && !indexed.exists() {
        // What is already in the target (a shipped disk, an earlier rsync) is indexed, so that only
        // what differs is asked for. Once: an interrupted first round keeps its index.
        let notify = |text: String| {
            tracing::info!("{text}");
            let _ = send(DestinationInput::Notice(text));
        };
        index_existing(&job.path, &state.dir, &mut index, (&notify, INDEXING_TOLD))?;
        std::fs::write(&indexed, b"")?;
    }
    // The target is checked against what ferry put there: while the source scanned (begun when it
    // asked whether a round would be taken), or now, while it sends its changes.
    let check = match early {
        Some((thread, _)) => {
            tracing::info!("the check of {} begun while the source scanned is this round's", job.path.display());
            Check { thread: Some(thread), early: true }
        }
        None => {
            let (target, committed, kept, findings) =
                (job.path.clone(), state.manifest(), state.kept(), state.findings());
            let mut index = index.clone();
            let options = CheckOptions { adopt: adopt_whole, read_only: false };
            let span = tracing::Span::current();
            let thread = std::thread::Builder::new().name("ferry-check".into()).spawn(move || {
                let _entered = span.enter();
                check_target(&target, (&committed, &kept), &mut index, &findings, options)
            })?;
            Check { thread: Some(thread), early: false }
        }
    };
    send(DestinationInput::Welcome { holds })?;

    // A list that streams (its first batch comes before its end) is planned and applied as it
    // comes; one that ends at once (nothing changed) or that a dry run plans is kept whole first.
    let mut first = inbox.blocking_recv();
    let dry_run = window.round(|round| round.dry_run())?;
    let streams = !dry_run && matches!(first, Some(DestinationEvent::Changes(_) | DestinationEvent::Prefix(_)));
    if streams && let Some(first) = first.take() {
        let check = joined(check, &state, &job.path)?;
        tell_the_source(&check, &job.path, &send)?;
        let (end, refused) = (Arc::new(Mutex::new(None)), Arc::new(Mutex::new(None)));
        let (steps, flush) = Streamed::channel(window.clone());
        let names = BaseNames::new(state.clone(), hello.base, holds);
        let taken_over = ferry_engine::taken_over(adopt_whole, &check, &index);
        let room = Room::new((&job.path, &index, taken_over), window.clone(), refused.clone())?;
        let incoming = Incoming::new(first, inbox, names, (flush.clone(), room.clone()), end.clone());
        // What the source's changes are against: its base, when this node holds it.
        let delta = hello.base.is_some() && hello.base == holds;
        let old = old_and_kept(&state)?;
        let steps_made = placed(patch(old, incoming, delta));
        Streamed::start(Fitting::new(steps_made, room), flush)?;
        let applying =
            Applying { state: &state, holds, adopt_whole, identity: &identity, check: &check, index: &mut index };
        let applied = apply_round(round, applying, steps, window, || {
            let end = end.lock().map_err(|_| anyhow!("lock poisoned"))?.take();
            let end = end.ok_or_else(|| anyhow!("the list of changes did not end"))?;
            if end.base != hello.base.filter(|_| delta) {
                bail!("the list of changes said it was against another round than it was sent against");
            }
            Ok(end)
        });
        // Refused for want of space as the list came: that is how the round ended, whatever the
        // transfer saw of the source leaving after it.
        if let Some(reason) = refused.lock().map_err(|_| anyhow!("lock poisoned"))?.take() {
            super::record_unfinished(&state, "refused", reason.clone(), round.peer);
            return Err(Refused::new(Refusal::NoSpace, reason).into());
        }
        return applied;
    }

    // The changes, to disk (a full manifest can be large).
    let changes_path = state.incoming_changes();
    let mut changes = RecordWriter::<Change>::create(&changes_path)?;
    let mut names = BaseNames::new(state.clone(), hello.base, holds);
    let end = loop {
        let next = match first.take() {
            Some(event) => Some(event),
            None => inbox.blocking_recv(),
        };
        match next {
            Some(DestinationEvent::Changes(batch)) => {
                for mut change in batch {
                    names.name(&mut change)?;
                    changes.push(&change)?;
                }
            }
            Some(DestinationEvent::ChangesEnd(end)) => break end,
            Some(other) => bail!("unexpected {other:?} while receiving changes"),
            None => match window.end() {
                Some(DestinationEnd::Cut(why)) => bail!("{why}"),
                Some(end) => bail!("{end:?} while receiving changes"),
                None => bail!("the connection closed while receiving changes"),
            },
        }
    };
    let import_mode = window.round(|round| round.import())?;
    let change_count = changes.count();
    changes.finish()?;
    let check = joined(check, &state, &job.path)?;
    tell_the_source(&check, &job.path, &send)?;
    if let Some(base) = end.base.filter(|_| end.base != holds) {
        let held =
            holds.map_or_else(|| "no round".to_owned(), |h| format!("round {} (root {})", h.round, h.root.short()));
        bail!("the source sent changes against round {}, but this node holds {held}", base.round);
    }
    // Nothing changed since the round this node holds, and it holds that round whole: its committed
    // manifest is the source's tree already. Applying would only read, hash and rewrite every entry
    // (most of a no-change round's time here). A staging folder left by a cut attempt takes the full
    // path, which empties it.
    let unchanged = change_count == 0
        && check.is_clean()
        && end.base.is_some()
        && holds.is_some_and(|h| h.root == end.root)
        && state.manifest().exists()
        && !job.path.join(ferry_engine::STAGING_DIR).exists();

    let open_steps =
        || -> anyhow::Result<_> { Ok(patch(old_and_kept(&state)?, changes_in(&changes_path)?, end.base.is_some())) };

    if unchanged && !dry_run {
        let _ = std::fs::remove_file(&changes_path);
        tracing::info!("nothing changed since round {}: its manifest stands", holds.map_or(0, |h| h.round));
        return commit_round(round, &state, holds, (end.root, end.root), ApplyReport::default(), import_mode, &send);
    }

    // Before any data moves: does the round fit? Changes against the committed manifest say it alone,
    // without another pass over that manifest (the transfer's merge checks them against it), unless
    // the check found entries gone or changed, which the round writes again though no change says so.
    let space = if end.base.is_some() && !check.entries_differ() {
        space::of_changes(RecordReader::<Change>::open(&changes_path)?, (&job.path, &index))?
    } else {
        space::of_round(open_steps()?, (&job.path, &index), ferry_engine::taken_over(adopt_whole, &check, &index))?
    };
    if dry_run {
        // As the round would: hints into what the operator adopted, or the check found gone or
        // changed, are not counted.
        let adopt = if adopt_whole { Adopt::All } else { crate::adoption::Pending::read(&state)?.adopt };
        let mut planner = ferry_engine::Planner::adopting(&adopt);
        planner.distrust(ferry_engine::stale_paths(&check, &state.findings())?);
        plan_only(placed(open_steps()?), (&index, planner), &space, &send)?;
        let _ = std::fs::remove_file(&changes_path);
        return Ok(RoundEnd::Planned);
    }
    if let Some(reason) = space.refusal(&job.path).map(|no_space| no_space.to_string()) {
        tracing::warn!("{reason}");
        // In the history before the source hears of it: `ferry status` right after says why.
        super::record_unfinished(&state, "refused", reason.clone(), round.peer);
        send(DestinationInput::Refuse { refusal: Refusal::NoSpace, reason: reason.clone() })?;
        return Err(Refused::new(Refusal::NoSpace, reason).into());
    }

    // The manifests are read and merged on a thread of their own: applying is this one's work.
    let steps = Whole(read_ahead(placed(open_steps()?))?);
    let applying =
        Applying { state: &state, holds, adopt_whole, identity: &identity, check: &check, index: &mut index };
    let applied = apply_round(round, applying, steps, window, || Ok(end));
    let _ = std::fs::remove_file(&changes_path);
    applied
}

/// What a round applies with, once its list is known or begun.
struct Applying<'a> {
    state: &'a TargetState,
    holds: Option<RoundRef>,
    /// Entries found in the target that ferry did not write become its own.
    adopt_whole: bool,
    identity: &'a ferry_engine::FolderIdentity,
    check: &'a ferry_engine::CheckReport,
    index: &'a mut ChunkIndex,
}

/// Applies the round's steps as their chunks come, then commits it against the list's end (known
/// once the steps are all applied).
fn apply_round(
    round: &Round<'_>,
    applying: Applying<'_>,
    mut steps: impl Steps,
    window: &Arc<Window>,
    end: impl FnOnce() -> anyhow::Result<ChangesEnd>,
) -> anyhow::Result<RoundEnd> {
    let (job, hello, state) = (round.job, round.hello, applying.state);
    let send = |input: DestinationInput| window.input(input).map(drop);
    let mut committed = ManifestWriter::create(&state.next_manifest())?;
    let mut source = WindowSource { window: window.clone() };
    let asked = crate::adoption::Pending::read(state)?;
    if asked.adopt != Adopt::Nothing {
        tracing::info!("adopting as the operator asked (ferry job adopt): {:?}", asked.adopt);
    }
    let options = ApplyOptions {
        delete: hello.delete,
        numeric_ids: hello.numeric_ids,
        adopt: if applying.adopt_whole { Adopt::All } else { asked.adopt.clone() },
        kept: Some(state.kept()),
        ..ApplyOptions::default()
    };
    let mut applier = Applier::new(&job.path, &mut source, applying.index, &mut committed, &options)?;
    // The index's hints into what the check found gone or changed are stale: those chunks are asked for.
    applier.distrust(ferry_engine::stale_paths(applying.check, &state.findings())?);
    match transfer(&mut applier, &mut steps, window)? {
        TransferEnd::Complete => {}
        TransferEnd::Stopped(reason) => return Ok(RoundEnd::Stopped(reason)),
        TransferEnd::Cut(why) => bail!("{why} (what had arrived is kept for the next round)"),
    }
    let end = end()?;
    let report = applier.finish()?;
    let root = committed.finish()?;
    // Which round the manifest is goes first: one stopped between here and its record is found.
    state.will_hold(RoundRef { round: applying.holds.map_or(1, |h| h.round + 1), root })?;
    std::fs::rename(state.next_manifest(), state.manifest())?;
    asked.taken(state);
    applying.identity.record().with_context(|| format!("cannot record {}", state.identity().display()))?;
    let import_mode = window.round(|round| round.import())?;
    commit_round(round, state, applying.holds, (root, end.root), report, import_mode, &send)
}

/// What this node holds of the round before: its committed manifest and the entries it kept, each
/// with what the check found of it.
fn old_and_kept(
    state: &TargetState,
) -> anyhow::Result<impl Iterator<Item = Result<Held, RecordFileError>> + Send + use<>> {
    let old: Box<dyn Iterator<Item = Result<RawEntry, RecordFileError>> + Send> = if state.manifest().exists() {
        Box::new(ManifestReader::open(&state.manifest())?.raw())
    } else {
        Box::new(std::iter::empty())
    };
    let old = with_findings(old, RecordReader::<Finding>::open(&state.findings())?);
    let kept: Box<dyn Iterator<Item = Result<RawEntry, RecordFileError>> + Send> = if state.kept().exists() {
        Box::new(ManifestReader::open(&state.kept())?.raw())
    } else {
        Box::new(std::iter::empty())
    };
    let kept = with_findings(kept, RecordReader::<Finding>::open(&state.findings())?);
    Ok(held(old, kept))
}

/// The round's check of its target, once it is done.
fn joined(mut check: Check, state: &TargetState, target: &Path) -> anyhow::Result<ferry_engine::CheckReport> {
    let thread = check.thread.take().ok_or_else(|| anyhow!("the check of the target was taken twice"))?;
    let report = thread.join().map_err(|_| anyhow!("the check of the target panicked"))??;
    if check.early {
        // It said how long it took as it ended.
        std::fs::rename(state.early_findings(), state.findings())?;
    } else {
        let ms = report.duration.as_millis();
        tracing::info!("checked {} entries of {} in {ms} ms", report.entries, target.display());
    }
    Ok(report)
}

/// Tells the source what the check found, for its report, and the operator on both sides what it
/// found not as ferry left it.
fn tell_the_source(
    check: &ferry_engine::CheckReport,
    target: &Path,
    send: &impl Fn(DestinationInput) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if check.entries_differ() {
        let text = format!(
            "{} is not as ferry left it: {}; this round puts right what it can (e.g. {})",
            target.display(),
            check.summary(),
            check.differences.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
        );
        tracing::warn!("{text}");
        send(DestinationInput::Notice(text))?;
    }
    send(DestinationInput::Checked(Checked {
        entries: check.entries,
        missing: check.missing,
        changed: check.changed,
        foreign: check.foreign,
        folders: check.folders,
        duration_ms: check.duration.as_millis() as u64,
    }))
}

/// Ends a round whose files are all in place and durable, and whose manifest is committed: records
/// it, tells the source, and runs the import. `(root, expected)`: the committed manifest's root hash
/// and the source's (they differ when entries failed).
pub(super) fn commit_round(
    round: &Round<'_>,
    state: &TargetState,
    holds: Option<RoundRef>,
    (root, expected): (RootHash, RootHash),
    report: ApplyReport,
    import_mode: ferry_proto::ImportMode,
    send: &impl Fn(DestinationInput) -> anyhow::Result<()>,
) -> anyhow::Result<RoundEnd> {
    let job = round.job;
    tracing::info!(
        "applied {} ({}) in {:.1} s, {:.1} s of it waiting for the disk's syncs",
        crate::human::counted(report.files_written, "file"),
        crate::human::bytes(report.bytes_written),
        report.duration.as_secs_f64(),
        report.sync_wait.as_secs_f64()
    );
    tracing::debug!(
        "{:.2} s waiting for the small files of a batch to be made, {:.2} s for synced batches to be put into place",
        report.make_wait.as_secs_f64(),
        report.place_wait.as_secs_f64()
    );
    let done = RoundRef { round: holds.map_or(1, |h| h.round + 1), root };
    state.set_holds(done)?;
    let _ = std::fs::remove_file(state.round_marker());
    if root != expected {
        let failed = crate::human::counted(report.failure_count, "entry");
        tracing::warn!("round {} is incomplete: {failed} failed", done.round);
    }
    crate::history::append(
        &state.history(),
        &crate::history::Record::committed(done, round.peer, &report, root == expected),
    )?;
    send(DestinationInput::Committed(Committed {
        round: done,
        files_written: report.files_written,
        failures: report.failures.clone(),
        failure_count: report.failure_count,
    }))?;
    // The import runs once per committed round that brought something new, here, whether or not the
    // source still listens. A round that leaves the same tree as the one before (nothing changed, or
    // only what was put right) has nothing new to import, unless the source asks for one explicitly.
    let same_tree = holds.is_some_and(|h| h.root == root);
    if same_tree && import_mode == ferry_proto::ImportMode::Default && job.import_cmd.is_some() {
        let text = format!(
            "import skipped: nothing changed since round {} (run the round with --import full to import anyway)",
            done.round - 1
        );
        tracing::info!("{text}");
        let _ = send(DestinationInput::Notice(text));
    } else if let Some(argv) = import_command(job, import_mode, done.round)? {
        let running = RunningImport { round: done.round, since: std::time::SystemTime::now(), command: argv.clone() };
        round.imports.lock().map_err(|_| anyhow!("lock poisoned"))?.insert(job.name.clone(), running);
        let result = (|| {
            crate::history::write_marker(
                &state.import_marker(),
                &crate::history::Marker::now(done.round, argv.clone()),
            )?;
            let _ = send(DestinationInput::ImportStarted { round: done.round, command: argv.clone() });
            let timeout = match &job.import_timeout {
                Some(t) => humantime::parse_duration(t).with_context(|| format!("import_timeout {t:?}"))?,
                None => Duration::from_secs(24 * 3600),
            };
            let log = state.import_log();
            let result = crate::import::run(&argv, job.import_user.as_deref(), done.round, timeout, &log);
            crate::history::append(&state.history(), &crate::history::Record::imported(&result))?;
            let _ = std::fs::remove_file(state.import_marker());
            anyhow::Ok(result)
        })();
        if let Ok(mut imports) = round.imports.lock() {
            imports.remove(&job.name);
        }
        let result = result?;
        if result.success {
            tracing::info!("import of round {} succeeded in {} ms", done.round, result.duration_ms);
        } else {
            tracing::warn!(
                "import of round {} failed (exit code {}): {}",
                done.round,
                crate::import::exit_code_text(result.exit_code),
                result.tail.join(" / ")
            );
        }
        let _ = send(DestinationInput::ImportDone(result));
    }
    Ok(RoundEnd::Committed(done))
}

/// A dry run: asks for the chunks the round would need (the source sizes them instead of sending
/// them), then says what the round would write.
pub(super) fn plan_only(
    steps: impl Iterator<Item = anyhow::Result<(u64, Step)>>,
    (index, mut planner): (&ChunkIndex, ferry_engine::Planner),
    space: &ferry_engine::Space,
    send: &impl Fn(DestinationInput) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut needed = Vec::new();
    let mut need_bytes = 0u64;
    for step in steps {
        let (place, step) = step?;
        let Some(pair) = step.pair() else { continue };
        for need in planner.plan(index, pair)? {
            need_bytes += u64::from(need.chunk.len);
            let (offset, len, hash) = (need.offset, need.chunk.len, need.chunk.hash);
            needed.push(NeedChunk { path: need.path, place, offset, len, hash });
            if needed.len() == 4096 {
                send(DestinationInput::Need(std::mem::take(&mut needed)))?;
            }
        }
    }
    if !needed.is_empty() {
        send(DestinationInput::Need(needed))?;
    }
    send(DestinationInput::Planned(ferry_proto::Plan {
        files: space.files,
        need_bytes,
        space_needed: space.needed.saturating_add(space.margin()),
        space_available: space.available,
    }))
}

/// The import command to run for this round, if any.
pub(super) fn import_command(
    job: &JobConfig,
    mode: ferry_proto::ImportMode,
    round: u64,
) -> anyhow::Result<Option<Vec<String>>> {
    use ferry_proto::ImportMode;
    let command = match mode {
        ImportMode::None => return Ok(None),
        ImportMode::Default => job.import_cmd.as_ref(),
        ImportMode::Full => {
            Some(job.import_cmd.as_ref().ok_or_else(|| anyhow!("job {} has no import command on this node (ferry job set {} --import-cmd CMD)", job.name, job.name))?)
        }
        ImportMode::ProvisioningOnly => Some(job.import_provisioning_cmd.as_ref().ok_or_else(|| {
            anyhow!("job {} has no provisioning-only import command on this node (ferry job set {} --import-provisioning-cmd CMD)", job.name, job.name)
        })?),
    };
    command.map(|c| crate::config::import_argv(c, &job.path, &job.name, round)).transpose()
}

/// Whether a round ended because this node refused it (its reason went to the source as `Refused`).
pub(super) fn is_refusal(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Refused>().is_some()
}

/// Runs `items` on a thread of its own, up to a few thousand items ahead of the caller. The thread
/// stops when `items` ends or the returned iterator is dropped; if it fails, the last item says so
/// (the items must never just stop short: a round would commit a manifest without the rest).
pub(super) fn read_ahead<T: Send + 'static>(
    items: impl Iterator<Item = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<impl Iterator<Item = anyhow::Result<T>>> {
    const BATCH: usize = 1024;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<anyhow::Result<T>>>(4);
    let reader = std::thread::Builder::new()
        .name("ferry-manifests".into())
        .spawn(move || {
            let mut items = items.fuse();
            loop {
                let batch: Vec<_> = items.by_ref().take(BATCH).collect();
                if batch.is_empty() || tx.send(batch).is_err() {
                    return;
                }
            }
        })
        .context("cannot start the thread that reads the manifests")?;
    let mut reader = Some(reader);
    Ok(rx.into_iter().flatten().chain(std::iter::from_fn(move || {
        let failed = reader.take()?.join().is_err();
        failed.then(|| Err(anyhow!("the thread reading the manifests failed")))
    })))
}

/// How long the indexing of what is already in a target may run before the source is told, and how
/// often it is told again: a shipped disk of terabytes takes hours to read, and the source would
/// otherwise wait with nothing to show.
pub(super) const INDEXING_TOLD: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(300));

/// Records where the chunks of files already in `target` are, before a first round. Past
/// `told.0`, and every `told.1` after, `notify` is given how far it is; then how it ended.
pub(super) fn index_existing(
    target: &Path,
    state: &Path,
    index: &mut ChunkIndex,
    (notify, told): (&(dyn Fn(String) + Sync), (Duration, Duration)),
) -> anyhow::Result<()> {
    let (manifest, cache) = (state.join("existing.manifest"), state.join("existing.cache"));
    let started = Instant::now();
    let progress = Arc::new(ferry_engine::Progress::default());
    let options = ScanOptions { progress: Some(progress.clone()), ..ScanOptions::default() };
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let shown = target.display();
    let (report, long) = std::thread::scope(|scope| {
        let (progress, shown) = (&progress, &shown);
        let ticker = scope.spawn(move || {
            tell_until(finished, told, || {
                notify(format!(
                    "indexing what is already in {shown} before its first round, so that it is not sent again \
                     (every file there is read once): {}, {} read in {}",
                    crate::human::counted(progress.entries(), "entry"),
                    ferry_engine::human::bytes(progress.bytes()),
                    crate::human::duration(started.elapsed())
                ));
            })
        });
        let report = ferry_engine::scan(target, None, &manifest, &cache, &options);
        drop(done);
        (report, ticker.join().unwrap_or(true))
    });
    let report = report?;
    // The scan's cache has each entry with what it saw of its file (inode, ctime): a file taken
    // over in place and unchanged since is not read again.
    let (mut batch, mut files) = (Vec::new(), Vec::new());
    let mut records = RecordReader::<CacheRecord>::open(&cache)?;
    while let Some(record) = records.next_record()? {
        let entry = &record.entry;
        let mut offset = 0u64;
        for chunk in &entry.chunks {
            batch.push((chunk.hash, ChunkLocation { path: entry.path.clone(), offset, len: chunk.len }));
            offset += u64::from(chunk.len);
        }
        files.extend(IndexedFile::of(&record).map(|file| (entry.path.clone(), file)));
        if batch.len() >= 50_000 {
            index.insert(batch.iter().map(|(h, l)| (h, l)), false)?;
            index.record_indexed(files.iter().map(|(path, file)| (path, *file)), false)?;
            (batch, files) = (Vec::new(), Vec::new());
        }
    }
    index.record_indexed(files.iter().map(|(path, file)| (path, *file)), false)?;
    index.insert(batch.iter().map(|(h, l)| (h, l)), true)?;
    let _ = std::fs::remove_file(&manifest);
    let _ = std::fs::remove_file(&cache);
    if report.files > 0 {
        let text = format!(
            "indexed {} ({}) already in {shown} in {}: what they hold is not sent again",
            crate::human::counted(report.files, "file"),
            ferry_engine::human::bytes(report.file_bytes),
            crate::human::duration(started.elapsed())
        );
        tracing::info!("{text}");
        if long {
            notify(text);
        }
    }
    Ok(())
}

/// Calls `tell` once `told.0` has passed, then every `told.1`, until `finished` ends; says whether
/// it did.
fn tell_until(finished: std::sync::mpsc::Receiver<()>, told: (Duration, Duration), tell: impl Fn()) -> bool {
    let mut wait = told.0;
    let mut told_once = false;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(wait) {
        tell();
        (wait, told_once) = (told.1, true);
    }
    told_once
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_indexing_is_told_while_it_runs_and_a_short_one_is_not() {
        use std::sync::atomic::Ordering;
        let told = |alive: Duration, told: (Duration, Duration)| {
            let (done, finished) = std::sync::mpsc::channel::<()>();
            let count = std::sync::atomic::AtomicU32::new(0);
            std::thread::scope(|scope| {
                let tell = || {
                    count.fetch_add(1, Ordering::Relaxed);
                };
                let ticker = scope.spawn(move || tell_until(finished, told, tell));
                std::thread::sleep(alive);
                drop(done);
                (ticker.join().unwrap(), count.load(Ordering::Relaxed))
            })
        };
        let (long, times) = told(Duration::from_millis(300), (Duration::from_millis(10), Duration::from_millis(50)));
        assert!(long && (2..=8).contains(&times), "told {times} times in 300 ms");
        assert_eq!(told(Duration::from_millis(20), (Duration::from_secs(60), Duration::from_secs(60))), (false, 0));
    }

    #[test]
    fn what_is_already_in_a_target_is_indexed_with_what_its_files_were() {
        let dir = tempfile::tempdir().unwrap();
        let (target, state) = (dir.path().join("target"), dir.path().join("state"));
        std::fs::create_dir_all(target.join("a")).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(target.join("a/f"), b"already there").unwrap();
        // Well before the indexing: what its scan sees of the file can be trusted.
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options().write(true).open(target.join("a/f")).unwrap().set_modified(old).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let mut index = ChunkIndex::open(&state.join("index.redb")).unwrap();
        let notices = Mutex::new(Vec::new());
        let notify = |text: String| notices.lock().unwrap().push(text);
        let never = (Duration::from_secs(3600), Duration::from_secs(3600));
        index_existing(&target, &state, &mut index, (&notify, never)).unwrap();
        assert!(notices.lock().unwrap().is_empty(), "a short indexing is not told: {:?}", notices.lock().unwrap());
        let location = index.get(&ferry_engine::ChunkHash::of(b"already there")).unwrap().unwrap();
        assert_eq!(location.path.to_string(), "a/f");
        let path = ferry_engine::RelPath::new(&b"a/f"[..]).unwrap();
        assert_eq!(index.indexed(&path).unwrap().map(|file| file.size), Some(13));
        assert!(!state.join("existing.manifest").exists() && !state.join("existing.cache").exists());
    }

    #[test]
    fn read_ahead_yields_every_item_in_order() {
        let got: Vec<u32> = read_ahead((0..5000u32).map(Ok)).unwrap().collect::<anyhow::Result<_>>().unwrap();
        assert_eq!(got, (0..5000).collect::<Vec<_>>());
    }

    #[test]
    fn read_ahead_ends_with_an_error_when_its_thread_fails() {
        let items = (0..3000u32).map(|i| if i == 2500 { panic!("a reader bug") } else { Ok(i) });
        let got: Vec<anyhow::Result<u32>> = read_ahead(items).unwrap().collect();
        assert!(got.len() <= 2501, "{} items", got.len());
        assert!(got.last().is_some_and(|last| last.is_err()), "the items stopped short without an error");
    }
}
