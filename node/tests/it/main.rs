//! ferry's integration tests: one binary, one module per area.

mod util;

mod cli;
mod disk;
mod evil;
mod faults;
mod hostile;
mod netns;
mod network;
mod operator;
mod properties;
mod resume;
mod reuse;
mod rounds;
mod source_changes;
mod truth;
mod walkthrough;
