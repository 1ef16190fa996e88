//! ferry's test kit: what tests, benchmarks and `ferry demo` need to build and check trees.
//!
//! - [`TreeGenerator`] makes trees shaped like a Zimbra Backup NG export (see `WORKLOAD.md` in the
//!   project's shared notes): gzip-like message BLOBs named by digest, per-account JSON metadata that
//!   grows, `server/` archives that come and go; then mutates them one day at a time, or rewrites them
//!   as a fresh export (same bytes, new mtimes). Seeded, so every run makes the same tree.
//! - [`UdpProxy`] impairs a UDP link (delay, loss, duplication, reordering, blackouts, NAT rebinding)
//!   and counts its bytes, for the network fault tests.
//! - [`ShapedLink`]: two network namespaces joined through a router namespace shaped by `tc tbf` (root), for the
//!   shaped-link test and `ferry-bench --shaped`.
//! - `evil` (feature `evil`): a peer on a real QUIC connection that sends any message sequence or
//!   bytes, for the hostile-peer tests.
//! - [`snapshot`] and [`compare_trees`] check that two trees are identical in content, kind, mode,
//!   owner, mtime, symlink targets and hard-link groups.
//!
//! It is a library of the workspace, not part of the ferry binary's logic; the binary links it only so
//! that `ferry demo` can make a tree to work on.
//!
//! ```no_run
//! use ferry_testkit::{TreeGenerator, TreeSpec};
//! let mut tree = TreeGenerator::create("/tmp/export".as_ref(), TreeSpec::with_files(5_000, 42))?;
//! tree.next_day()?;
//! # Ok::<(), std::io::Error>(())
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod compare;
#[cfg(feature = "evil")]
pub mod evil;
mod generate;
mod netns;
mod proxy;

pub use compare::{Node, NodeKind, Snapshot, compare_trees, snapshot};
pub use generate::{DayChanges, TreeGenerator, TreeSpec};
pub use netns::ShapedLink;
pub use proxy::{Impairment, UdpProxy};
