//! ferry's tree generator and tree comparison: what tests, benchmarks and `ferry demo` need to build and
//! check trees.
//!
//! - [`TreeGenerator`] makes trees shaped like a Zimbra Backup NG export (see `WORKLOAD.md` in the
//!   project's shared notes): gzip-like message BLOBs named by digest, per-account JSON metadata that
//!   grows, `server/` archives that come and go; then mutates them one day at a time, or rewrites them
//!   as a fresh export (same bytes, new mtimes). Seeded, so every run makes the same tree.
//! - [`snapshot`] and [`compare_trees`] check that two trees are identical in content, kind, mode,
//!   owner, mtime, symlink targets and hard-link groups.
//!
//! The ferry binary links it only so that `ferry demo` can make a tree to work on; the rest of the
//! test kit (`ferry-testkit`: the UDP proxy, network namespaces, the evil peer) stays out of it.
//!
//! ```no_run
//! use ferry_treegen::{TreeGenerator, TreeSpec};
//! let mut tree = TreeGenerator::create("/tmp/export".as_ref(), TreeSpec::with_files(5_000, 42))?;
//! tree.next_day()?;
//! # Ok::<(), std::io::Error>(())
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod compare;
mod generate;

pub use compare::{Node, NodeKind, Snapshot, compare_trees, snapshot};
pub use generate::{DayChanges, TreeGenerator, TreeSpec};
