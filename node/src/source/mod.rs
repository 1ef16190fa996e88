//! `ferry sync --round JOB`: the source's side of a round, pushed to the job's peer.

use tracing::Instrument;

use crate::config_dir::ConfigDir;

mod changes;
mod chunk_reader;
mod dry_run;
mod options;
mod outcome;
mod prepare;
mod progress;
mod report;
mod round;
mod session;

pub use dry_run::{DryRunReport, dry_run, print_dry_run};
pub use options::PushOptions;
pub use outcome::{StoppedAtDeadline, Unreachable};
pub use report::{PushReport, REPORT_SCHEMA, print_push_report};
use round::push_once;
use session::{BUSY_RETRY, is_busy};

/// Runs one round of `options.job`; with `wait_if_busy`, waits while the destination is busy with it.
pub async fn push(config_dir: &ConfigDir, options: &PushOptions) -> anyhow::Result<PushReport> {
    let span = tracing::info_span!("sync", job = %options.job, round = tracing::field::Empty);
    async {
        loop {
            match push_once(config_dir, options).await {
                // The check before the export hook waits while the job is busy; this is for a round that
                // became busy after it.
                Err(e) if options.wait_if_busy && is_busy(&e) => {
                    tracing::info!("{e}; trying again in {} s (--wait)", BUSY_RETRY.as_secs());
                    tokio::time::sleep(BUSY_RETRY).await;
                }
                other => return other,
            }
        }
    }
    .instrument(span)
    .await
}
