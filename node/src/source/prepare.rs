//! Before the round: the readiness check, the export hook, and the start of the scan.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use ferry_certs::Identity;

use super::options::PushOptions;
use super::scanning::Scanning;
use super::session::{BUSY_RETRY, check_peer, is_busy};
use crate::config_dir::ConfigDir;
use crate::net::{self};
use crate::state::SourceState;

/// A round's source side, ready to connect: the job, its peer and the new scan.
pub(super) struct Prepared {
    /// Where the round's connections go out from: the check's, the round's and any reconnection's.
    pub(super) client: net::Client,
    pub(super) job: crate::config::JobConfig,
    pub(super) peer: crate::config::PeerConfig,
    pub(super) addr: String,
    pub(super) identity: Identity,
    pub(super) state: SourceState,
    /// The scan, begun: it runs beside the round's first connection.
    pub(super) scan: Scanning,
    pub(super) _lock: ferry_engine::StateLock,
    /// Which source this is for the job ([`ferry_proto::Hello::source`]).
    pub(super) source_id: u64,
    /// Which folder the scan reads, recorded once the round is committed.
    pub(super) folder: ferry_engine::FolderIdentity,
}

/// Loads the job, asks the destination whether it would take a round now, runs the export hook, and
/// starts the scan.
pub(super) async fn prepare(config_dir: &ConfigDir, options: &PushOptions) -> anyhow::Result<Prepared> {
    let job_name = &options.job;
    let config = config_dir.load()?;
    let identity = Identity::load(config_dir.path()).context("cannot load this node's identity (run `ferry init`)")?;
    let job = config
        .job(job_name)
        .ok_or_else(|| anyhow!("no job {job_name:?} here (ferry job add {job_name} --path SOURCE --peer PEER)"))?
        .clone();
    let peer = config
        .peer(&job.peer)
        .ok_or_else(|| anyhow!("job {} names peer {:?}, which is not trusted here (ferry trust)", job.name, job.peer))?
        .clone();
    let addr = peer.addr.clone().ok_or_else(|| {
        anyhow!("peer {} has no address: ferry trust {} --name {} --addr HOST:PORT", peer.name, peer.id, peer.name)
    })?;
    let state = SourceState::new(&config_dir.data_dir(&config), &job.name);
    std::fs::create_dir_all(&state.dir).with_context(|| format!("cannot create {}", state.dir.display()))?;
    let lock = ferry_engine::lock_state(&state.dir)?;
    let source_id = state.source_id()?;
    let client = net::Client::default();

    loop {
        match check_peer(&client, (&job, source_id), &peer, &addr, &identity, options).await {
            Err(e) if options.wait_if_busy && is_busy(&e) => {
                tracing::info!("{e}; asking again in {} s (--wait)", BUSY_RETRY.as_secs());
                tokio::time::sleep(BUSY_RETRY).await;
            }
            other => break other?,
        }
    }

    if let Some(command) = &job.export_cmd {
        let argv = crate::config::export_argv(command, &job.path, &job.name)?;
        let log = state.export_log();
        let user = job.export_user.clone();
        let run = tokio::task::spawn_blocking(move || {
            crate::import::run(&argv, user.as_deref(), 0, Duration::from_secs(24 * 3600), &log)
        });
        let result = run.await.context("the export hook panicked")?;
        if !result.success {
            let code = crate::import::exit_code_text(result.exit_code);
            bail!(
                "the export command of job {} failed (exit code {code}), so no round was started; the last lines of its output:\n  | {}",
                job.name,
                result.tail.join("\n  | ")
            );
        }
        // Asked again right before the scan: the destination checks its target while this node
        // scans, and the export may have taken hours.
        check_peer(&client, (&job, source_id), &peer, &addr, &identity, options).await?;
    }

    // An export folder whose disk is not mounted is an empty tree: listed, it would tell the
    // destination that every file went (and with --delete, remove them).
    let folder = ferry_engine::FolderIdentity::read(&state.identity(), &job.path);
    if let Some(why) = folder.looks_unmounted() {
        bail!(
            "the source folder {why} No round was started. If it is meant to be empty, remove {} and run the round again",
            state.identity().display()
        );
    }
    let streams = !options.dry_run;
    let scan = Scanning::start(job.path.clone(), state.cache(), state.scanned(), options.progress, streams)?;
    Ok(Prepared { client, job, peer, addr, identity, state, scan, _lock: lock, source_id, folder })
}

/// The bandwidth timetable of a round: `--bwlimit`, else the job's, else the peer's, else none.
pub(super) fn timetable(
    config_dir: &ConfigDir,
    options: &PushOptions,
    job: &str,
) -> anyhow::Result<ferry_engine::Timetable> {
    if let Some(timetable) = &options.bwlimit {
        return Ok(timetable.clone());
    }
    let config = config_dir.load()?;
    let job = config.job(job).ok_or_else(|| anyhow!("job {job} is no longer in ferry.toml"))?;
    Ok(crate::config::job_bwlimit(&config, job)?.unwrap_or_else(crate::helpers::unlimited))
}
