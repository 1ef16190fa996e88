//! The two long lists of a round as they travel: a batch of [`Change`]s and a list of needs ([`ChunkAt`]),
//! each item said against the one before it, the whole batch one zstd frame.
//!
//! A round's list of changes is most of what a round sends besides chunks: in a fresh export (the same
//! bytes, every mtime new) it is all of it, one change for every file. Each change here carries its path
//! as the length it shares with the previous path and the rest; its kind, mode and owner only where
//! they differ from the previous entry's; its mtime as the difference from the previous one's; its
//! size and chunk list only when its content changed ([`Change::content_as_before`]: the destination
//! has them). zstd then takes what repeats across entries (the shape of the paths, runs of the same
//! fields). Decoding checks every path and bounds what it inflates.
//!
//! A need names a chunk by its file's place in the new manifest (as the distance from the previous
//! need's file: 0 for the same file), its offset (as the distance from where the previous need of that
//! file ended: 0 for the next chunk) and its length: a few bytes, which zstd shrinks further. Neither
//! its path nor its hash: the source has both in its manifest.

use std::io::Read;

use ferry_engine::{ChunkRef, Entry, EntryKind, RelPath};
use serde::{Deserialize, Serialize};

use crate::message::{Change, ChunkAt};

/// The most a batch may inflate to: four times the largest frame, far over what a sender's batch of
/// 1024 changes makes.
pub const MAX_UNPACKED: usize = 32 << 20;

/// The zstd level a batch is compressed at: metadata is text-like and small, and the level costs
/// little against the work of listing it.
const LEVEL: i32 = 3;

/// A list that could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Serialisation failed.
    #[error("cannot encode: {0}")]
    Postcard(#[from] postcard::Error),
    /// zstd could not compress it (it fails only without memory).
    #[error("cannot compress: {0}")]
    Compress(std::io::Error),
}

/// A batch that is not a valid packed list of changes.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// zstd could not read it.
    #[error("the changes do not decompress: {0}")]
    Zstd(std::io::Error),
    /// It inflates past [`MAX_UNPACKED`].
    #[error("the changes inflate past {MAX_UNPACKED} bytes")]
    TooLarge,
    /// The inflated bytes are not a list of changes.
    #[error("malformed changes: {0}")]
    Malformed(#[from] postcard::Error),
    /// A change is inconsistent (a path shares more than the previous one has, a path is invalid, an
    /// mtime overflows).
    #[error("bad change: {0}")]
    Bad(String),
}

/// One change as packed.
#[derive(Serialize, Deserialize)]
struct Packed {
    at: At,
    /// `None`: the path is gone at the source.
    body: Option<Body>,
}

/// Which path a change is about.
#[derive(Serialize, Deserialize)]
enum At {
    /// A path: how many bytes of the previous path said this way begin this one's, and the rest.
    Path { shared: u32, rest: Vec<u8> },
    /// An entry of the base round's manifest ([`Change::base`]): how many entries after the previous
    /// one said this way (the first: its place).
    Base { skip: u64 },
}

/// An entry, said against the previous entry of the batch (`None` fields: the same as its).
#[derive(Serialize, Deserialize)]
struct Body {
    kind: Option<EntryKind>,
    mode: Option<u32>,
    owner: Option<Owner>,
    /// The mtime minus the previous entry's (postcard writes it as a zigzag varint: a few bytes).
    mtime_delta: i64,
    /// `None`: the content is as before (size and chunks are the destination's).
    content: Option<Content>,
    link_target: Option<Vec<u8>>,
    hard_link_to: Option<RelPath>,
}

#[derive(Serialize, Deserialize, Clone, PartialEq)]
struct Owner {
    uid: u32,
    gid: u32,
    user: Option<String>,
    group: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Content {
    size: u64,
    chunks: Vec<ChunkRef>,
}

/// What the previous entry of the batch was, for the next one to be said against.
struct Previous {
    path: Vec<u8>,
    kind: EntryKind,
    mode: u32,
    owner: Owner,
    mtime_ns: i64,
}

impl Default for Previous {
    fn default() -> Self {
        let owner = Owner { uid: 0, gid: 0, user: None, group: None };
        Self { path: Vec::new(), kind: EntryKind::File, mode: 0, owner, mtime_ns: 0 }
    }
}

/// Packs a batch of changes: the bytes [`unpack_changes`] turns back into the same changes.
pub fn pack_changes(changes: &[Change]) -> Result<Vec<u8>, PackError> {
    let mut previous = Previous::default();
    let mut next_base = 0u64;
    let mut packed = Vec::with_capacity(changes.len());
    for change in changes {
        let at = match change.base {
            Some(place) => {
                let skip = place.wrapping_sub(next_base);
                next_base = place.wrapping_add(1);
                At::Base { skip }
            }
            None => {
                let path = change.path.as_bytes();
                let shared = shared_len(path, &previous.path);
                let at = At::Path { shared: shared as u32, rest: path[shared..].to_vec() };
                previous.path = path.to_vec();
                at
            }
        };
        let body = change.entry.as_ref().map(|entry| {
            let owner = Owner { uid: entry.uid, gid: entry.gid, user: entry.user.clone(), group: entry.group.clone() };
            let body = Body {
                kind: (entry.kind != previous.kind).then_some(entry.kind),
                mode: (entry.mode != previous.mode).then_some(entry.mode),
                owner: (owner != previous.owner).then(|| owner.clone()),
                mtime_delta: entry.mtime_ns.wrapping_sub(previous.mtime_ns),
                content: (!change.content_as_before)
                    .then(|| Content { size: entry.size, chunks: entry.chunks.clone() }),
                link_target: entry.link_target.clone(),
                hard_link_to: entry.hard_link_to.clone(),
            };
            (previous.kind, previous.mode, previous.owner, previous.mtime_ns) =
                (entry.kind, entry.mode, owner, entry.mtime_ns);
            body
        });
        packed.push(Packed { at, body });
    }
    compress(&packed)
}

/// Unpacks a batch made by [`pack_changes`].
pub fn unpack_changes(bytes: &[u8]) -> Result<Vec<Change>, UnpackError> {
    let raw = inflate(bytes)?;
    let packed: Vec<Packed> = postcard::from_bytes(&raw)?;
    let mut previous = Previous::default();
    let mut next_base = 0u64;
    let mut changes = Vec::with_capacity(packed.len());
    for Packed { at, body } in packed {
        let (path, base) = match at {
            At::Path { shared, rest } => {
                let path = unshare(&previous.path, shared, &rest)?;
                previous.path = path.as_bytes().to_vec();
                (path, None)
            }
            At::Base { skip } => {
                let place = next_base.checked_add(skip).ok_or_else(|| UnpackError::Bad("a place past 2^64".into()))?;
                next_base = place.saturating_add(1);
                (RelPath::root(), Some(place))
            }
        };
        let content_as_before = body.as_ref().is_some_and(|b| b.content.is_none());
        let entry = match body {
            Some(body) => {
                let kind = body.kind.unwrap_or(previous.kind);
                let mode = body.mode.unwrap_or(previous.mode);
                let owner = body.owner.unwrap_or_else(|| previous.owner.clone());
                let mtime_ns = previous.mtime_ns.wrapping_add(body.mtime_delta);
                let Content { size, chunks } = body.content.unwrap_or(Content { size: 0, chunks: Vec::new() });
                let entry = Entry {
                    path: path.clone(),
                    kind,
                    mode,
                    uid: owner.uid,
                    gid: owner.gid,
                    user: owner.user.clone(),
                    group: owner.group.clone(),
                    mtime_ns,
                    size,
                    chunks,
                    link_target: body.link_target,
                    hard_link_to: body.hard_link_to,
                };
                (previous.kind, previous.mode, previous.owner, previous.mtime_ns) = (kind, mode, owner, mtime_ns);
                Some(entry)
            }
            None => None,
        };
        changes.push(Change { path, entry, content_as_before, base });
    }
    Ok(changes)
}

/// One need as packed.
#[derive(Serialize, Deserialize)]
struct PackedNeed {
    /// The place minus the previous need's (wrapping; 0 for the same file), or the place itself for
    /// the first need of the list.
    place_delta: u64,
    /// The offset minus where the previous need of the same file ended (wrapping; 0 for the next
    /// chunk), or the offset itself for the first need of a file.
    offset_delta: u64,
    len: u32,
}

/// Packs a list of needs: the bytes [`unpack_needs`] turns back into the same list.
pub fn pack_needs(needs: &[ChunkAt]) -> Result<Vec<u8>, PackError> {
    let (mut place, mut end) = (0u64, 0u64);
    let mut packed = Vec::with_capacity(needs.len());
    for need in needs {
        let expected = if need.place == place { end } else { 0 };
        packed.push(PackedNeed {
            place_delta: need.place.wrapping_sub(place),
            offset_delta: need.offset.wrapping_sub(expected),
            len: need.len,
        });
        (place, end) = (need.place, need.offset.wrapping_add(u64::from(need.len)));
    }
    compress(&packed)
}

/// Unpacks a list made by [`pack_needs`].
pub fn unpack_needs(bytes: &[u8]) -> Result<Vec<ChunkAt>, UnpackError> {
    let raw = inflate(bytes)?;
    let packed: Vec<PackedNeed> = postcard::from_bytes(&raw)?;
    let (mut place, mut end) = (0u64, 0u64);
    let mut needs = Vec::with_capacity(packed.len());
    for PackedNeed { place_delta, offset_delta, len } in packed {
        if place_delta != 0 {
            (place, end) = (place.wrapping_add(place_delta), 0);
        }
        let offset = end.wrapping_add(offset_delta);
        needs.push(ChunkAt { place, offset, len });
        end = offset.wrapping_add(u64::from(len));
    }
    Ok(needs)
}

/// How many bytes `a` and `b` begin with alike.
fn shared_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The path made of the first `shared` bytes of `previous` and `rest`, checked.
fn unshare(previous: &[u8], shared: u32, rest: &[u8]) -> Result<RelPath, UnpackError> {
    let head = previous.get(..shared as usize).ok_or_else(|| {
        UnpackError::Bad(format!("a path shares {shared} bytes with a previous path of {}", previous.len()))
    })?;
    RelPath::new([head, rest].concat()).map_err(|e| UnpackError::Bad(e.to_string()))
}

/// A list as postcard writes it, then one zstd frame.
fn compress(list: &impl Serialize) -> Result<Vec<u8>, PackError> {
    let raw = postcard::to_allocvec(list)?;
    zstd::bulk::compress(&raw, LEVEL).map_err(PackError::Compress)
}

/// One zstd frame inflated, at most [`MAX_UNPACKED`] bytes of it.
fn inflate(bytes: &[u8]) -> Result<Vec<u8>, UnpackError> {
    let mut raw = Vec::new();
    let decoder = zstd::stream::read::Decoder::with_buffer(bytes).map_err(UnpackError::Zstd)?;
    decoder.take(MAX_UNPACKED as u64 + 1).read_to_end(&mut raw).map_err(UnpackError::Zstd)?;
    if raw.len() > MAX_UNPACKED {
        return Err(UnpackError::TooLarge);
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_engine::ChunkHash;
    use proptest::prelude::*;

    fn entry(path: &str, kind: EntryKind, mtime_ns: i64, chunks: usize) -> Entry {
        let chunks: Vec<ChunkRef> =
            (0..chunks).map(|i| ChunkRef { hash: ChunkHash::of(&[i as u8]), len: 1000 + i as u32 }).collect();
        Entry {
            path: RelPath::new(path.as_bytes()).unwrap(),
            kind,
            mode: 0o640,
            uid: 999,
            gid: 999,
            user: Some("zimbra".into()),
            group: Some("zimbra".into()),
            mtime_ns,
            size: chunks.iter().map(|c| u64::from(c.len)).sum(),
            chunks,
            link_target: (kind == EntryKind::Symlink).then(|| b"../target".to_vec()),
            hard_link_to: None,
        }
    }

    /// A fresh export: the same files, every mtime new: what each change costs.
    #[test]
    fn a_change_of_mtime_only_costs_a_few_bytes() {
        let changes: Vec<Change> = (0..1024)
            .map(|i| {
                let mut e = entry(
                    &format!("accounts/3f2c9a1e-{:04}/items/{:02}/{}", i / 40, i % 7, 10_000 + i),
                    EntryKind::File,
                    0,
                    0,
                );
                e.mtime_ns = 1_765_000_000_123_456_789 + i as i64 * 1_234_567;
                e.size = 0;
                Change { path: e.path.clone(), entry: Some(e), content_as_before: true, base: None }
            })
            .collect();
        let packed = pack_changes(&changes).unwrap();
        assert_eq!(unpack_changes(&packed).unwrap(), changes);
        let per_change = packed.len() as f64 / changes.len() as f64;
        assert!(per_change < 8.0, "{per_change:.1} bytes per change");

        // The same changes said by their places in the base round's manifest (a few folders between).
        let placed: Vec<Change> =
            changes.iter().enumerate().map(|(i, c)| Change { base: Some((i + i / 40) as u64), ..c.clone() }).collect();
        let packed = pack_changes(&placed).unwrap();
        let unpacked = unpack_changes(&packed).unwrap();
        assert_eq!(unpacked, placed.iter().map(unplaced).collect::<Vec<_>>());
        let per_change = packed.len() as f64 / changes.len() as f64;
        assert!(per_change < 5.0, "{per_change:.1} bytes per change");
    }

    /// A change as it is unpacked when it travels by its place: the root for its path.
    fn unplaced(change: &Change) -> Change {
        let mut change = change.clone();
        if change.base.is_some() {
            change.path = RelPath::root();
            if let Some(entry) = &mut change.entry {
                entry.path = RelPath::root();
            }
        }
        change
    }

    #[test]
    fn a_path_that_shares_more_than_there_was_is_refused() {
        let packed = vec![Packed { at: At::Path { shared: 3, rest: b"x".to_vec() }, body: None }];
        let bytes = zstd::bulk::compress(&postcard::to_allocvec(&packed).unwrap(), 1).unwrap();
        assert!(matches!(unpack_changes(&bytes), Err(UnpackError::Bad(_))));
        // A path made invalid by its parts (`..`) is refused as a path.
        let packed = vec![
            Packed { at: At::Path { shared: 0, rest: b"a".to_vec() }, body: None },
            Packed { at: At::Path { shared: 0, rest: b"../b".to_vec() }, body: None },
        ];
        let bytes = zstd::bulk::compress(&postcard::to_allocvec(&packed).unwrap(), 1).unwrap();
        assert!(matches!(unpack_changes(&bytes), Err(UnpackError::Bad(_))));
    }

    #[test]
    fn a_bomb_is_refused_before_it_is_all_inflated() {
        let zeros = vec![0u8; MAX_UNPACKED + 1024];
        let bytes = zstd::bulk::compress(&zeros, 19).unwrap();
        assert!(bytes.len() < 64 << 10);
        assert!(matches!(unpack_changes(&bytes), Err(UnpackError::TooLarge)));
    }

    /// The needs of a first round of small files, each file's chunks in order: what each costs.
    #[test]
    fn a_need_costs_a_few_bytes() {
        let mut needs = Vec::new();
        for file in 0..1000u32 {
            let mut offset = 0;
            for chunk in 0..(1 + file % 3) {
                let len = 20_000 + chunk * 777 + file;
                // Every third entry is a folder or a file held already: no need names it.
                needs.push(ChunkAt { place: u64::from(file) * 3 / 2, offset, len });
                offset += u64::from(len);
            }
        }
        let packed = pack_needs(&needs).unwrap();
        assert_eq!(unpack_needs(&packed).unwrap(), needs);
        let per_need = packed.len() as f64 / needs.len() as f64;
        assert!(per_need < 3.0, "{per_need:.1} bytes per need");
    }

    fn kinds() -> impl Strategy<Value = EntryKind> {
        prop_oneof![Just(EntryKind::File), Just(EntryKind::Dir), Just(EntryKind::Symlink)]
    }

    proptest! {
        #[test]
        fn packing_gives_back_the_same_changes(
            items in proptest::collection::vec(
                ("[a-c]{1,3}(/[a-c]{1,3}){0,3}", kinds(), any::<i64>(), 0usize..4, any::<u32>(), any::<bool>(), any::<bool>(), proptest::option::of(0u64..5)),
                0..40,
            )
        ) {
            let mut place = 0u64;
            let changes: Vec<Change> = items
                .into_iter()
                .map(|(path, kind, mtime, chunks, mode, removed, as_before, skip)| {
                    let base = skip.map(|skip| {
                        place += skip;
                        place += 1;
                        place - 1
                    });
                    let mut e = entry(&path, kind, mtime, chunks);
                    e.mode = mode & 0o7777;
                    if mode % 3 == 0 {
                        e.user = None;
                    }
                    let as_before = as_before && kind == EntryKind::File && !removed;
                    if as_before {
                        (e.size, e.chunks) = (0, Vec::new());
                    }
                    Change { path: e.path.clone(), entry: (!removed).then_some(e), content_as_before: as_before, base }
                })
                .collect();
            let expected: Vec<Change> = changes.iter().map(unplaced).collect();
            prop_assert_eq!(unpack_changes(&pack_changes(&changes).unwrap()).unwrap(), expected);
        }

        #[test]
        fn packing_gives_back_the_same_needs(
            items in proptest::collection::vec((0u64..4, any::<u64>(), any::<u64>(), any::<u32>(), any::<bool>()), 0..40)
        ) {
            let needs: Vec<ChunkAt> = items
                .into_iter()
                .map(|(near, far, offset, len, small)| ChunkAt {
                    place: if small { near } else { far },
                    offset: if small { offset % 1000 } else { offset },
                    len,
                })
                .collect();
            prop_assert_eq!(unpack_needs(&pack_needs(&needs).unwrap()).unwrap(), needs);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = unpack_changes(&bytes);
            let _ = unpack_changes(&zstd::bulk::compress(&bytes, 1).unwrap());
            let _ = unpack_needs(&bytes);
            let _ = unpack_needs(&zstd::bulk::compress(&bytes, 1).unwrap());
        }
    }
}
