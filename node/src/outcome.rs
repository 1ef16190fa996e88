//! How a command that failed ends: the one place an error becomes an exit code, and the document
//! `--json` prints for it.

use crate::exit::{DEADLINE, ERROR, REFUSED, STOPPED, UNREACHABLE};
use crate::refused::Refused;
use crate::source::{StoppedAtDeadline, StoppedBySignal, Unreachable};

/// The exit code of a command that ended with `error`.
pub fn of_error(error: &anyhow::Error) -> i32 {
    if error.downcast_ref::<StoppedAtDeadline>().is_some() {
        DEADLINE
    } else if error.downcast_ref::<StoppedBySignal>().is_some() {
        STOPPED
    } else if error.downcast_ref::<Unreachable>().is_some() {
        UNREACHABLE
    } else if error.downcast_ref::<Refused>().is_some() {
        REFUSED
    } else {
        ERROR
    }
}

/// What `--json` prints when a round ends without its own report (exit 1, 6, 7, 8 or 9): how it ended,
/// its exit code and the error, so that a monitor reading stdout always finds a document.
#[derive(Debug, serde::Serialize)]
pub struct ErrorReport {
    /// [`crate::REPORT_SCHEMA`].
    pub schema: u32,
    /// `deadline`, `stopped`, `unreachable`, `refused` or `error`.
    pub outcome: &'static str,
    /// The process's exit code.
    pub exit_code: i32,
    /// The error, on one line.
    pub error: String,
}

impl ErrorReport {
    /// The report of `error`.
    pub fn of(error: &anyhow::Error) -> Self {
        let exit_code = of_error(error);
        let outcome = match exit_code {
            DEADLINE => "deadline",
            STOPPED => "stopped",
            UNREACHABLE => "unreachable",
            REFUSED => "refused",
            _ => "error",
        };
        Self { schema: crate::helpers::REPORT_SCHEMA, outcome, exit_code, error: crate::helpers::describe(error) }
    }
}
