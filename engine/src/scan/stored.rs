//! A cache record read in place: the fields the quick check needs, without decoding its chunk list.

use rustix::fs::Stat;
use serde::Deserialize;

use super::times::{stat_ctime_ns, stat_mtime_ns};
use crate::manifest::{ChunkRef, EntryKind};

/// The fields of a stored [`CacheRecord`] that tell whether its file changed, read in place: the
/// chunk list is stepped over, not collected. Postcard encodes a struct's fields in order, so the
/// record's bytes begin with its entry's, as a manifest stores it.
pub(super) struct StoredRecord<'a> {
    pub(super) entry: StoredEntry<'a>,
    /// How many of the record's bytes are its entry's.
    pub(super) entry_len: usize,
    pub(super) ino: u64,
    pub(super) ctime_ns: i64,
    pub(super) trusted: bool,
}

/// [`Entry`]'s fields, in its order and with its encodings, borrowed.
#[derive(Deserialize)]
pub(super) struct StoredEntry<'a> {
    /// Stepped over: the walk matched it already.
    #[serde(borrow)]
    pub(super) _path: &'a [u8],
    pub(super) kind: EntryKind,
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    #[serde(borrow)]
    pub(super) user: Option<&'a str>,
    #[serde(borrow)]
    pub(super) group: Option<&'a str>,
    pub(super) mtime_ns: i64,
    pub(super) size: u64,
    pub(super) _chunks: SteppedOver,
    #[serde(borrow)]
    pub(super) link_target: Option<&'a [u8]>,
    #[serde(borrow)]
    pub(super) hard_link_to: Option<&'a [u8]>,
}

/// [`CacheRecord`]'s fields after its entry.
#[derive(Deserialize)]
pub(super) struct StoredTail {
    pub(super) ino: u64,
    pub(super) ctime_ns: i64,
    pub(super) trusted: bool,
}

/// A sequence of [`ChunkRef`]s, checked but not kept.
pub(super) struct SteppedOver;

impl<'de> Deserialize<'de> for SteppedOver {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = SteppedOver;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of chunks")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<SteppedOver, A::Error> {
                while seq.next_element::<ChunkRef>()?.is_some() {}
                Ok(SteppedOver)
            }
        }
        deserializer.deserialize_seq(Visitor)
    }
}

impl<'a> StoredRecord<'a> {
    /// Reads a record as [`RecordWriter`] stored it; `None` when it is not a whole [`CacheRecord`].
    pub(super) fn decode(bytes: &'a [u8]) -> Option<Self> {
        let (entry, rest) = postcard::take_from_bytes::<StoredEntry<'a>>(bytes).ok()?;
        let entry_len = bytes.len() - rest.len();
        let (tail, rest) = postcard::take_from_bytes::<StoredTail>(rest).ok()?;
        rest.is_empty().then_some(Self {
            entry,
            entry_len,
            ino: tail.ino,
            ctime_ns: tail.ctime_ns,
            trusted: tail.trusted,
        })
    }

    /// The quick check: is the regular file of `stat` unchanged since this trusted record was
    /// made? Then its content is the record's chunks and it is not read again.
    pub(super) fn unchanged(&self, stat: &Stat) -> bool {
        self.trusted
            && self.entry.kind == EntryKind::File
            && self.entry.size == stat.st_size as u64
            && self.entry.mtime_ns == stat_mtime_ns(stat)
            && self.ctime_ns == stat_ctime_ns(stat)
            && self.ino == stat.st_ino
    }

    /// Beyond [`StoredRecord::unchanged`], does the record describe the file exactly as a new one
    /// would (its mode and owner ids, one link, no hard-link leader)? Then it stands as it is.
    pub(super) fn describes(&self, stat: &Stat) -> bool {
        let entry = &self.entry;
        self.unchanged(stat)
            && stat.st_nlink == 1
            && entry.mode == stat.st_mode & 0o7777
            && entry.uid == stat.st_uid
            && entry.gid == stat.st_gid
            && entry.link_target.is_none()
            && entry.hard_link_to.is_none()
    }
}
