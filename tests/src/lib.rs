//! ferry's test kit: what the integration tests and benchmarks need around a round.
//!
//! - [`TreeGenerator`], [`snapshot`] and [`compare_trees`], re-exported from `ferry-treegen` (the one
//!   part of the kit the shipped binary links, for `ferry demo`).
//! - [`UdpProxy`] impairs a UDP link (delay, loss, duplication, reordering, blackouts, NAT rebinding)
//!   and counts its bytes, for the network fault tests.
//! - [`ShapedLink`]: two network namespaces joined through a router namespace shaped by `tc tbf` (root), for the
//!   shaped-link test and `ferry-bench --shaped`.
//! - `evil` (feature `evil`): a peer on a real QUIC connection that sends any message sequence or
//!   bytes, for the hostile-peer tests.
//!
//! The ferry binary does not link this crate (`cargo tree -p ferry -e normal`).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

#[cfg(feature = "evil")]
pub mod evil;
mod netns;
mod proxy;

pub use ferry_treegen::{DayChanges, Node, NodeKind, Snapshot, TreeGenerator, TreeSpec, compare_trees, snapshot};
pub use netns::ShapedLink;
pub use proxy::{Impairment, UdpProxy};
