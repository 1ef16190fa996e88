//! The `ferry` binary's library: the command line, and the commands it runs.
//!
//! It owns the CLI (clap), where state lives on disk, the human and JSON reports, and `ferry demo`.
//! Sync logic belongs to `ferry-engine`; this crate only wires it to the operator.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod adoption;
pub mod cli;
pub mod commands;
pub mod config;
pub mod config_check;
pub mod config_dir;
mod demo;
mod destination;
pub mod exit;
mod helpers;
pub mod history;
mod human;
mod hystart;
mod import;
mod ledbat;
mod limit;
mod local;
pub mod log;
mod lossy;
mod memory;
pub mod meter;
mod metrics;
mod net;
pub mod outcome;
mod refused;
mod source;
mod state;
pub mod status;
mod toml_keep;
pub mod verify;

pub use demo::{DemoOptions, run_demo};
pub use destination::{Daemon, serve};
pub use local::{LocalSyncOptions, run_local_sync};
pub use net::Congestion;
pub use refused::Refused;
pub use source::{
    DryRunReport, PushOptions, PushReport, StoppedAtDeadline, StoppedBySignal, Unreachable, dry_run, print_dry_run,
    print_push_report, push,
};

pub use helpers::{REPORT_SCHEMA, default_data_dir, describe, unlimited};
