//! Hostile input never reaches outside the target: bad paths in a manifest, symlinks planted in the
//! target, symlinks and hard links that a peer's manifest uses to escape.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use ferry_engine::{
    ApplyError, ApplyOptions, ChunkBuf, ChunkHash, ChunkIndex, ChunkRef, ChunkSource, Entry, EntryKind, FetchError,
    Fetched, LocalRoundOptions, ManifestReader, ManifestWriter, RecordFileError, RecordWriter, RelPath, apply,
};
use serde::Serialize;

use crate::util::{Pair, sentinel, write};

/// Serves chunks from memory, as a hostile peer would send them.
#[derive(Default)]
struct Chunks(HashMap<ChunkHash, Vec<u8>>);

impl Chunks {
    fn file(&mut self, path: &str, content: &[u8]) -> Entry {
        let hash = ChunkHash::of(content);
        self.0.insert(hash, content.to_vec());
        let mut entry = entry(path, EntryKind::File);
        entry.size = content.len() as u64;
        entry.chunks = vec![ChunkRef { hash, len: content.len() as u32 }];
        entry
    }
}

impl ChunkSource for Chunks {
    fn fetch(&mut self, _: &Entry, _: u64, chunk: &ChunkRef, out: &mut ChunkBuf) -> Result<Fetched, FetchError> {
        let data = self.0.get(&chunk.hash).ok_or_else(|| FetchError("no such chunk".into()))?;
        let out = out.owned();
        out.clear();
        out.extend_from_slice(data);
        Ok(Fetched::Unchecked)
    }
}

fn entry(path: &str, kind: EntryKind) -> Entry {
    Entry { mtime_ns: 1_700_000_000_000_000_000, ..Entry::new(RelPath::new(path.as_bytes()).unwrap(), kind) }
}

fn symlink(path: &str, target: &[u8]) -> Entry {
    Entry { link_target: Some(target.to_vec()), ..entry(path, EntryKind::Symlink) }
}

/// Applies `new` over `old` (both already sorted) to the pair's target.
fn apply_entries(
    pair: &Pair,
    old: Vec<Entry>,
    new: Vec<Entry>,
    chunks: &mut Chunks,
    options: &ApplyOptions,
) -> Result<ferry_engine::ApplyReport, ApplyError> {
    let state = pair.state();
    let mut index = ChunkIndex::open(&state.join("chunks.redb")).unwrap();
    let mut committed = ManifestWriter::create(&state.join("committed")).unwrap();
    // Through manifest files, as rounds read them: what is stored alike on both sides is kept as it is.
    let stored = |name: &str, entries: Vec<Entry>| {
        let path = state.join(name);
        let mut writer = ManifestWriter::create(&path).unwrap();
        for entry in &entries {
            writer.push(entry).unwrap();
        }
        writer.finish().unwrap();
        ManifestReader::open(&path).unwrap().raw()
    };
    let old = stored("old", old).map(|raw| raw.map(ferry_engine::Checked::from));
    let steps = ferry_engine::checked_steps(old, stored("new", new));
    let report = apply(&pair.target(), steps, chunks, &mut index, &mut committed, options)?;
    committed.finish().unwrap();
    Ok(report)
}

/// The paths a committed manifest lists.
fn committed_paths(pair: &Pair) -> Vec<String> {
    let entries = ManifestReader::open(&pair.state().join("committed")).unwrap();
    entries.map(|e| e.unwrap().path.to_string()).collect()
}

fn outside_with_secret(pair: &Pair) -> std::path::PathBuf {
    let outside = pair.outside();
    write(&outside.join("secret"), b"do not touch");
    outside
}

#[test]
fn a_symlink_in_the_manifest_is_never_written_through() {
    for batch_files in [1, 1000] {
        let pair = Pair::new();
        let outside = outside_with_secret(&pair);
        let before = sentinel(&outside);
        let mut chunks = Chunks::default();
        let outside_bytes = outside.as_os_str().as_encoded_bytes();
        let new = vec![
            entry("", EntryKind::Dir),
            symlink("d", outside_bytes),
            chunks.file("d/secret", b"pwned"),
            chunks.file("d/x", b"pwned"),
        ];
        let options = ApplyOptions { batch_files, ..ApplyOptions::default() };
        let report = apply_entries(&pair, vec![], new, &mut chunks, &options).unwrap();
        assert_eq!(report.failure_count, 2, "{:?}", report.failures);
        assert_eq!(sentinel(&outside), before, "something was written outside the target");
        assert_eq!(std::fs::read_link(pair.target().join("d")).unwrap(), outside, "the link itself is kept verbatim");
    }
}

/// rsync CVE-2024-12087: a folder in one round becomes a symlink to outside in the next, and a file
/// is then written "inside" it, with `second` as its content (new, or the same as in the first round).
/// Checks that nothing outside changed; returns the pair and the second round's report.
fn folder_turned_symlink(second: &[u8]) -> (Pair, ferry_engine::ApplyReport) {
    let pair = Pair::new();
    let outside = outside_with_secret(&pair);
    let before = sentinel(&outside);
    let mut chunks = Chunks::default();
    let round1 = vec![entry("", EntryKind::Dir), entry("d", EntryKind::Dir), chunks.file("d/secret", b"v1")];
    let report = apply_entries(&pair, vec![], round1.clone(), &mut chunks, &ApplyOptions::default()).unwrap();
    assert_eq!(report.failure_count, 0);
    let round2 = vec![
        entry("", EntryKind::Dir),
        symlink("d", outside.as_os_str().as_encoded_bytes()),
        chunks.file("d/secret", second),
    ];
    let report = apply_entries(&pair, round1, round2, &mut chunks, &ApplyOptions::default()).unwrap();
    assert_eq!(sentinel(&outside), before);
    (pair, report)
}

#[test]
fn a_folder_turned_symlink_between_rounds_is_not_written_through() {
    let (pair, report) = folder_turned_symlink(b"pwned");
    assert!(report.failure_count >= 1, "{:?}", report.failures);
    assert_eq!(std::fs::read(pair.target().join("d/secret")).unwrap(), b"v1");
}

/// The same with the file inside stored exactly as before: it is kept without being decoded, and still
/// fails, as a path inside what is no longer a folder (and leaves the new manifest).
#[test]
fn an_unchanged_file_inside_a_folder_turned_symlink_is_refused() {
    let (pair, report) = folder_turned_symlink(b"v1");
    let refused = "d/secret: is listed inside a path that is no longer a folder";
    assert!(report.failures.iter().any(|f| f.contains(refused)), "{:?}", report.failures);
    assert!(!committed_paths(&pair).contains(&"d/secret".to_owned()), "{:?}", committed_paths(&pair));
}

#[test]
fn a_hard_link_to_a_symlink_pointing_outside_is_refused() {
    let pair = Pair::new();
    let outside = outside_with_secret(&pair);
    let before = sentinel(&outside);
    let mut chunks = Chunks::default();
    let secret = outside.join("secret");
    let mut member = chunks.file("b", b"do not touch");
    member.hard_link_to = Some(RelPath::new(&b"a"[..]).unwrap());
    let new = vec![entry("", EntryKind::Dir), symlink("a", secret.as_os_str().as_encoded_bytes()), member];
    let report = apply_entries(&pair, vec![], new, &mut chunks, &ApplyOptions::default()).unwrap();
    assert_eq!(report.failure_count, 1, "{:?}", report.failures);
    assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1, "the outside file got a new link");
    assert_eq!(sentinel(&outside), before);
}

/// The manifest entry as it is on the wire, with a path that is not checked.
#[derive(Serialize)]
enum RawKind {
    Dir,
    File,
}

#[derive(Serialize)]
struct RawEntry {
    path: Vec<u8>,
    kind: RawKind,
    mode: u32,
    uid: u32,
    gid: u32,
    user: Option<String>,
    group: Option<String>,
    mtime_ns: i64,
    size: u64,
    chunks: Vec<([u8; 32], u32)>,
    link_target: Option<Vec<u8>>,
    hard_link_to: Option<Vec<u8>>,
}

impl RawEntry {
    fn file(path: &[u8], content: &[u8]) -> Self {
        RawEntry {
            path: path.to_vec(),
            kind: RawKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            user: None,
            group: None,
            mtime_ns: 0,
            size: content.len() as u64,
            chunks: vec![(*ChunkHash::of(content).as_bytes(), content.len() as u32)],
            link_target: None,
            hard_link_to: None,
        }
    }
}

/// A manifest refused part-way (a hostile path after 500 good files) stops the apply while its first
/// batch is being synced and put into place on another thread: the apply waits for that thread
/// before it returns, so the batch is whole in place, its chunks are in the index, and nothing holds
/// the index open any more (a new round can open it).
#[test]
fn a_manifest_refused_part_way_leaves_its_last_batch_whole() {
    let pair = Pair::new();
    let path = pair.state().join("refused-late");
    let mut writer = RecordWriter::<RawEntry>::create(&path).unwrap();
    writer.push(&RawEntry { kind: RawKind::Dir, size: 0, chunks: Vec::new(), ..RawEntry::file(b"", b"") }).unwrap();
    let mut chunks = Chunks::default();
    let content = |i: usize| format!("file {i} of the first batch").into_bytes();
    for i in 0..500 {
        let name = format!("f{i:04}");
        chunks.file(&name, &content(i));
        writer.push(&RawEntry::file(name.as_bytes(), &content(i))).unwrap();
    }
    writer.push(&RawEntry::file(b"z/../escape", b"pwned")).unwrap();
    writer.finish().unwrap();
    let index_path = pair.state().join("chunks.redb");
    let mut index = ChunkIndex::open(&index_path).unwrap();
    let mut committed = ManifestWriter::create(&pair.state().join("committed")).unwrap();
    let steps = ferry_engine::checked_steps(std::iter::empty(), ManifestReader::open(&path).unwrap().raw());
    let options = ApplyOptions { batch_files: 500, ..ApplyOptions::default() };
    let result = apply(&pair.target(), steps, &mut chunks, &mut index, &mut committed, &options);
    assert!(matches!(result, Err(ApplyError::Manifest(RecordFileError::Corrupt { .. }))), "{result:?}");
    drop(index);
    let index = ChunkIndex::open(&index_path).expect("the index is still held open after the apply returned");
    for i in 0..500 {
        assert_eq!(std::fs::read(pair.target().join(format!("f{i:04}"))).unwrap(), content(i));
        let location = index.get(&ChunkHash::of(&content(i))).unwrap().expect("a chunk of the batch is in the index");
        assert_eq!(location.path.to_string(), format!("f{i:04}"));
    }
}

#[test]
fn a_manifest_with_a_hostile_path_is_refused_whole() {
    let long = "a/".repeat(2100) + "b";
    let bad_paths: [&[u8]; 8] = [
        b"../escape",
        b"/etc/ferry-pwned",
        b"a//b",
        b"a/./b",
        b"a/\0b",
        b".ferry-staging/t1",
        b"x/../../escape",
        long.as_bytes(),
    ];
    for bad in bad_paths {
        let pair = Pair::new();
        let outside = outside_with_secret(&pair);
        let before = sentinel(&outside);
        let path = pair.state().join("hostile");
        let mut writer = RecordWriter::<RawEntry>::create(&path).unwrap();
        let content = b"pwned";
        writer.push(&RawEntry::file(bad, content)).unwrap();
        writer.finish().unwrap();
        let mut chunks = Chunks::default();
        chunks.file("unused", content);
        let mut index = ChunkIndex::open(&pair.state().join("chunks.redb")).unwrap();
        let mut committed = ManifestWriter::create(&pair.state().join("committed")).unwrap();
        let steps = ferry_engine::checked_steps(std::iter::empty(), ManifestReader::open(&path).unwrap().raw());
        let result = apply(&pair.target(), steps, &mut chunks, &mut index, &mut committed, &ApplyOptions::default());
        assert!(
            matches!(result, Err(ApplyError::Manifest(RecordFileError::Corrupt { .. }))),
            "{:?} was not refused: {result:?}",
            bad.escape_ascii().to_string()
        );
        assert_eq!(sentinel(&outside), before);
        assert!(!pair.dir.path().join("escape").exists() && !std::path::Path::new("/etc/ferry-pwned").exists());
    }
}

#[test]
fn symlinks_planted_in_the_target_are_not_followed() {
    let pair = Pair::new();
    let outside = outside_with_secret(&pair);
    let before = sentinel(&outside);
    let src = pair.source();
    write(&src.join("map_keep"), b"source has one too");
    // A first round adopts what it finds at the source's paths; from the next one on, what ferry did
    // not put there is left alone.
    assert!(pair.round(&LocalRoundOptions::default()).in_sync);
    write(&src.join("accounts/u1/account_info"), b"{}");
    write(&src.join("items/ab/blob1"), b"blob1");
    // Planted at the top: the source has a folder there.
    std::os::unix::fs::symlink(&outside, pair.target().join("accounts")).unwrap();
    let first = pair.round(&LocalRoundOptions::default());
    assert!(first.apply.failure_count >= 1, "{:?}", first.apply.failures);
    assert!(first.apply.failures.iter().any(|f| f.starts_with("accounts")), "{:?}", first.apply.failures);
    assert!(!first.in_sync);
    // Said in words, not in Rust's debug forms (`Some(Symlink)`).
    assert!(
        first.apply.failures.iter().all(|f| f.contains("holds a symlink") && !f.contains("Some(")),
        "{:?}",
        first.apply.failures
    );
    assert_eq!(std::fs::read(pair.target().join("items/ab/blob1")).unwrap(), b"blob1");

    // Planted deeper, in a folder that an earlier round created.
    std::fs::remove_dir_all(pair.target().join("items/ab")).unwrap();
    std::os::unix::fs::symlink(&outside, pair.target().join("items/ab")).unwrap();
    write(&src.join("items/ab/blob2"), b"blob2");
    let second = pair.round(&LocalRoundOptions::default());
    // The check finds a symlink where ferry's folder was: someone else's, left alone.
    assert!(
        second.apply.failures.iter().any(|f| f.starts_with("items/ab: holds a symlink")),
        "{:?}",
        second.apply.failures
    );
    assert!(!outside.join("blob2").exists());

    // Planted where the source's folder looks unchanged (its mtime put back after a new file
    // arrived): the check still finds the symlink, and nothing goes through it.
    let items = pair.target().join("items");
    std::fs::remove_file(items.join("ab")).unwrap();
    std::fs::create_dir(items.join("ab")).unwrap();
    let third = pair.round(&LocalRoundOptions::default());
    assert_eq!(third.apply.failure_count, 1, "{:?}", third.apply.failures); // `accounts` still
    let src_ab = src.join("items/ab");
    let mtime = std::fs::metadata(&src_ab).unwrap().modified().unwrap();
    write(&src_ab.join("blob3"), b"blob3");
    std::fs::File::open(&src_ab).unwrap().set_modified(mtime).unwrap();
    std::fs::remove_dir_all(items.join("ab")).unwrap();
    std::os::unix::fs::symlink(&outside, items.join("ab")).unwrap();
    let fourth = pair.round(&LocalRoundOptions::default());
    assert!(
        fourth.apply.failures.iter().any(|f| f.starts_with("items/ab: holds a symlink")),
        "{:?}",
        fourth.apply.failures
    );
    assert!(!outside.join("blob3").exists());
    assert_eq!(sentinel(&outside), before, "something was written outside the target");
    assert!(std::fs::symlink_metadata(pair.target().join("accounts")).unwrap().file_type().is_symlink());
}
