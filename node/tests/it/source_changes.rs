//! The source changes while it is read: nothing torn is ever written.

use std::sync::{Arc, Mutex};

use ferry_engine::{
    ApplyOptions, ChunkIndex, LocalChunkSource, LocalRoundOptions, ManifestReader, ManifestWriter, MergeJoin, RelPath,
    ScanOptions, Step, apply, scan,
};

use crate::util::{Pair, random_bytes, write};

#[test]
fn a_file_modified_while_read_is_left_for_the_next_round() {
    let pair = Pair::new();
    let src = pair.source();
    let v1 = random_bytes(3 << 20, 1);
    write(&src.join("busy"), &v1);
    write(&src.join("calm"), b"calm");
    pair.round(&LocalRoundOptions::default());
    assert_eq!(std::fs::read(pair.target().join("busy")).unwrap(), v1);

    // Round 2: both files change before the scan, and again right after each is read.
    let v2 = random_bytes(3 << 20, 2);
    write(&src.join("busy"), &v2);
    write(&src.join("new-busy"), &random_bytes(1 << 20, 3));
    let v3 = random_bytes(3 << 20 | 77, 4);
    let (busy, new_busy) = (src.join("busy"), src.join("new-busy"));
    let touched = Arc::new(Mutex::new(Vec::new()));
    let log = touched.clone();
    let v3_hook = v3.clone();
    let mut options = LocalRoundOptions::default();
    options.scan.after_read = Some(Arc::new(move |path: &RelPath| {
        match path.as_bytes() {
            b"busy" => std::fs::write(&busy, &v3_hook).unwrap(),
            b"new-busy" => std::fs::write(&new_busy, b"rewritten").unwrap(),
            _ => return,
        }
        log.lock().unwrap().push(path.to_string());
    }));
    let second = pair.round(&options);
    assert_eq!(touched.lock().unwrap().len(), 2);
    assert_eq!(second.scan.changed_while_read_count, 2, "{:?}", second.scan.changed_while_read);
    assert!(second.scan.changed_while_read.contains(&"busy".to_owned()));
    assert!(!second.in_sync, "the source holds files the target does not");
    // The old version stays, whole; the new file is not there at all.
    assert_eq!(std::fs::read(pair.target().join("busy")).unwrap(), v1);
    assert!(!pair.target().join("new-busy").exists());

    // Next round, without interference: both arrive as they now are.
    let third = pair.round(&LocalRoundOptions::default());
    assert_eq!(third.scan.changed_while_read_count, 0);
    assert_eq!(std::fs::read(pair.target().join("busy")).unwrap(), v3);
    assert_eq!(std::fs::read(pair.target().join("new-busy")).unwrap(), b"rewritten");
    assert!(third.in_sync);
}

#[test]
fn a_file_changed_between_scan_and_copy_is_not_written() {
    // The scan sees one version; by the time its chunks are copied, the file holds another. The chunk
    // hash check catches it: the entry is reported and not written, the rest of the round goes on.
    let pair = Pair::new();
    let src = pair.source();
    write(&src.join("steady"), b"steady");
    write(&src.join("victim"), &random_bytes(200_000, 5));
    let (report, committed) = scan_then_apply(&pair, || write(&src.join("victim"), &random_bytes(200_000, 6)));
    assert_eq!(report.failure_count, 1, "{:?}", report.failures);
    assert!(report.failures[0].contains("victim") && report.failures[0].contains("changed since"));
    assert!(!pair.target().join("victim").exists());
    assert_eq!(std::fs::read(pair.target().join("steady")).unwrap(), b"steady");
    committed.finish().unwrap();
    let recorded: Vec<String> =
        ManifestReader::open(&pair.state().join("committed")).unwrap().map(|e| e.unwrap().path.to_string()).collect();
    assert_eq!(recorded, [".", "steady"], "the committed manifest lists only what is really there");
}

#[test]
fn a_file_swapped_for_a_symlink_between_scan_and_copy_is_never_followed() {
    // CVE-2024-12747's shape: after the scan, a file becomes a symlink to a file outside the source
    // with the very same bytes. Following it would pass the hash check; the source must not follow it.
    let pair = Pair::new();
    let src = pair.source();
    let content = random_bytes(200_000, 7);
    write(&src.join("victim"), &content);
    let outside = pair.outside();
    write(&outside.join("secret"), &content);
    let (report, _) = scan_then_apply(&pair, || {
        std::fs::remove_file(src.join("victim")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), src.join("victim")).unwrap();
    });
    assert_eq!(report.failure_count, 1, "{:?}", report.failures);
    // ELOOP: the open refused the symlink; the bytes outside were never read.
    assert!(report.failures[0].contains("victim: cannot open the source file"), "{:?}", report.failures);
    assert!(!pair.target().join("victim").exists(), "the symlink was followed");
}

/// Scans the pair's source, runs `between` (the source changing under ferry), then applies the
/// scanned manifest to the target with chunks read from the source as it now is.
fn scan_then_apply(pair: &Pair, between: impl FnOnce()) -> (ferry_engine::ApplyReport, ManifestWriter) {
    let (src, state) = (pair.source(), pair.state());
    let (manifest, cache) = (state.join("manifest"), state.join("cache"));
    let scanned = scan(&src, None, &manifest, &cache, &ScanOptions::default()).unwrap();
    assert!(scanned.files > 0);
    between();
    let mut index = ChunkIndex::open(&state.join("chunks.redb")).unwrap();
    let mut committed = ManifestWriter::create(&state.join("committed")).unwrap();
    let mut source = LocalChunkSource::new(&src).unwrap();
    let pairs = MergeJoin::new(std::iter::empty(), ManifestReader::open(&manifest).unwrap()).map(|p| p.map(Step::from));
    let report =
        apply(&pair.target(), pairs, &mut source, &mut index, &mut committed, &ApplyOptions::default()).unwrap();
    (report, committed)
}
