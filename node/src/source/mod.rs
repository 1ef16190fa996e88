//! `ferry sync --round JOB`: the source's side of a round, pushed to the job's peer.

use tracing::Instrument;

use crate::config_dir::ConfigDir;

mod changes;
mod chunk_reader;
mod connection;
mod dry_run;
mod needs;
mod options;
mod outcome;
mod prepare;
mod progress;
mod report;
mod round;
mod scanning;
mod session;
mod stop;

pub use dry_run::{DryRunReport, dry_run, print_dry_run};
pub use options::PushOptions;
pub use outcome::{StoppedAtDeadline, StoppedBySignal, Unreachable};
pub use report::{PushReport, print_push_report};
use round::push_once;
use session::{BUSY_RETRY, is_busy};

use crate::state::SourceState;

/// Runs one round of `options.job`; with `wait_if_busy`, waits while the destination is busy with it.
pub async fn push(config_dir: &ConfigDir, options: &PushOptions) -> anyhow::Result<PushReport> {
    let span = tracing::info_span!("sync", job = %options.job, round = tracing::field::Empty);
    let result = async {
        let mut stop = stop::StopRequest::listen();
        loop {
            match push_once(config_dir, options, &mut stop).await {
                // The check before the export hook waits while the job is busy; this is for a round that
                // became busy after it.
                Err(e) if options.wait_if_busy && is_busy(&e) => {
                    tracing::info!("{e}; trying again in {} s (--wait)", BUSY_RETRY.as_secs());
                    tokio::select! {
                        () = tokio::time::sleep(BUSY_RETRY) => {}
                        signal = stop.requested() => {
                            let error = outcome::stopped_error(signal, &progress::Counters::default()).into();
                            record_unfinished(config_dir, options, &error);
                            return Err(error);
                        }
                    }
                }
                Err(e) => {
                    record_unfinished(config_dir, options, &e);
                    return Err(e);
                }
                other => return other,
            }
        }
    }
    .instrument(span)
    .await;
    crate::metrics::refresh(config_dir);
    result
}

/// Adds a round that ended without a commit to the job's history, so that `ferry status` does not
/// show the last night that went well as the latest. Its round is the one after the last this node
/// pushed. Best effort: a job that cannot be read (no config, no such job) has no history to add to.
fn record_unfinished(config_dir: &ConfigDir, options: &PushOptions, error: &anyhow::Error) {
    let Ok(config) = config_dir.load() else { return };
    if config.job(&options.job).is_none() {
        return;
    }
    let state = SourceState::new(&config_dir.data_dir(&config), &options.job);
    let stopped =
        error.downcast_ref::<StoppedAtDeadline>().is_some() || error.downcast_ref::<StoppedBySignal>().is_some();
    let event = if stopped {
        "stopped"
    } else if error.downcast_ref::<crate::refused::Refused>().is_some() {
        "refused"
    } else {
        "failed"
    };
    let round = state.base_round().map_or(1, |base| base.round + 1);
    let record = crate::history::Record {
        error: Some(crate::helpers::describe(error)),
        ..crate::history::Record::new(event, round)
    };
    let appended = std::fs::create_dir_all(&state.dir)
        .map_err(anyhow::Error::from)
        .and_then(|()| crate::history::append(&state.history(), &record));
    if let Err(e) = appended {
        tracing::warn!("cannot add the round to {}: {e:#}", state.history().display());
    }
}
