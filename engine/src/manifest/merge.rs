//! Merging two sorted streams by path, and the diff of two manifests.

use super::entry::{Entry, Keyed};
use super::record::{RawEntry, RecordFileError};
use crate::path::RelPath;

/// One step of a [`MergeJoin`]: the item at a path on each side, when there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair<A, B> {
    /// The item from the left (older) stream.
    pub old: Option<A>,
    /// The item from the right (newer) stream.
    pub new: Option<B>,
}

impl<A: Keyed, B: Keyed> Pair<A, B> {
    /// The path both sides share.
    pub fn path(&self) -> &RelPath {
        match (&self.new, &self.old) {
            (Some(n), _) => n.key(),
            (None, Some(o)) => o.key(),
            (None, None) => unreachable!("a Pair always has one side"),
        }
    }
}

/// Merges two streams sorted by path into a stream of pairs, one per path.
pub struct MergeJoin<L: Iterator, R: Iterator> {
    left: std::iter::Peekable<L>,
    right: std::iter::Peekable<R>,
}

impl<A, B, E, L, R> MergeJoin<L, R>
where
    L: Iterator<Item = Result<A, E>>,
    R: Iterator<Item = Result<B, E>>,
{
    /// Merges `left` (older) with `right` (newer).
    pub fn new(left: L, right: R) -> Self {
        Self { left: left.peekable(), right: right.peekable() }
    }
}

impl<A, B, E, L, R> Iterator for MergeJoin<L, R>
where
    A: Keyed,
    B: Keyed,
    L: Iterator<Item = Result<A, E>>,
    R: Iterator<Item = Result<B, E>>,
{
    type Item = Result<Pair<A, B>, E>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::cmp::Ordering;
        let order = match (self.left.peek(), self.right.peek()) {
            (None, None) => return None,
            (Some(Err(_)), _) => return self.left.next().map(|r| r.map(|_| unreachable!())),
            (_, Some(Err(_))) => return self.right.next().map(|r| r.map(|_| unreachable!())),
            (Some(Ok(_)), None) => Ordering::Less,
            (None, Some(Ok(_))) => Ordering::Greater,
            (Some(Ok(l)), Some(Ok(r))) => l.key().cmp(r.key()),
        };
        let take_left = |s: &mut Self| s.left.next().and_then(Result::ok);
        let take_right = |s: &mut Self| s.right.next().and_then(Result::ok);
        Some(Ok(match order {
            Ordering::Less => Pair { old: take_left(self), new: None },
            Ordering::Greater => Pair { old: None, new: take_right(self) },
            Ordering::Equal => Pair { old: take_left(self), new: take_right(self) },
        }))
    }
}

/// The entries that differ between two sorted manifests (added, removed or changed), read as stored
/// (see [`RecordReader::raw`](crate::RecordReader::raw)): an entry stored with the same bytes on both sides is unchanged and
/// skipped without being decoded.
pub fn diff<L, R>(old: L, new: R) -> impl Iterator<Item = Result<Pair<Entry, Entry>, RecordFileError>>
where
    L: Iterator<Item = Result<RawEntry, RecordFileError>>,
    R: Iterator<Item = Result<RawEntry, RecordFileError>>,
{
    diff_numbered(old, new).map(|item| item.map(|(_, pair)| pair))
}

/// Where a pair of [`diff_numbered`] is in its manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Places {
    /// The old entry's place in `old` (counted from 0), when it has one.
    pub old: Option<u64>,
    /// The new entry's place in `new`; for an entry only `old` has, the place the next new entry
    /// takes.
    pub new: u64,
}

/// Like [`diff`], with where each pair is in the two manifests.
pub fn diff_numbered<L, R>(
    old: L,
    new: R,
) -> impl Iterator<Item = Result<(Places, Pair<Entry, Entry>), RecordFileError>>
where
    L: Iterator<Item = Result<RawEntry, RecordFileError>>,
    R: Iterator<Item = Result<RawEntry, RecordFileError>>,
{
    let old = old.enumerate().map(|(i, raw)| raw.map(|raw| Numbered { position: i as u64, raw }));
    let new = new.enumerate().map(|(i, raw)| raw.map(|raw| Numbered { position: i as u64, raw }));
    let mut next_new = 0;
    MergeJoin::new(old, new).filter_map(move |pair| {
        let pair = match pair {
            Ok(pair) => pair,
            Err(e) => return Some(Err(e)),
        };
        let place = pair.new.as_ref().map_or(next_new, |n| n.position);
        next_new = place + u64::from(pair.new.is_some());
        if let Pair { old: Some(o), new: Some(n) } = &pair
            && o.raw.bytes == n.raw.bytes
        {
            return None;
        }
        // Equal entries are equal bytes (the encoding is canonical); compared decoded, in case one was not.
        let places = Places { old: pair.old.as_ref().map(|o| o.position), new: place };
        let pair = decoded(Pair { old: pair.old.map(|o| o.raw), new: pair.new.map(|n| n.raw) });
        pair.map(|p| (p.old != p.new).then_some((places, p))).transpose()
    })
}

/// A stored entry and its place in its manifest.
struct Numbered {
    position: u64,
    raw: RawEntry,
}

impl Keyed for Numbered {
    fn key(&self) -> &RelPath {
        self.raw.key()
    }
}

/// Both sides of `pair`, decoded.
pub(super) fn decoded(pair: Pair<RawEntry, RawEntry>) -> Result<Pair<Entry, Entry>, RecordFileError> {
    Ok(Pair {
        old: pair.old.as_ref().map(RawEntry::decode).transpose()?,
        new: pair.new.as_ref().map(RawEntry::decode).transpose()?,
    })
}
