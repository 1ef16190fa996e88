//! Bounded mutation fuzzing of manifest files as the destination reads them (record framing, the
//! count-and-hash trailer, each entry's own rules). A valid manifest is written, then mutated and read
//! back: reading never panics; a file that reads to its end with a good trailer holds only entries
//! that pass validation, in order. `FERRY_FUZZ_SECONDS` (default 5) bounds the run.

use std::time::{Duration, Instant};

use ferry_engine::{ChunkHash, ChunkRef, Entry, EntryKind, ManifestReader, ManifestWriter, RelPath};
use rand::{RngExt, SeedableRng};

fn entries() -> Vec<Entry> {
    let mut out = Vec::new();
    let dir = |path: &str| Entry {
        path: RelPath::new(path).unwrap(),
        kind: EntryKind::Dir,
        mode: 0o755,
        uid: 999,
        gid: 999,
        user: Some("zimbra".into()),
        group: None,
        mtime_ns: 1_700_000_000_000_000_000,
        size: 0,
        chunks: vec![],
        link_target: None,
        hard_link_to: None,
    };
    out.push(dir("a"));
    for i in 0..20u32 {
        let data = format!("message {i}").into_bytes();
        out.push(Entry {
            kind: EntryKind::File,
            size: data.len() as u64,
            chunks: vec![ChunkRef { hash: ChunkHash::of(&data), len: data.len() as u32 }],
            ..dir(&format!("a/{i:02}"))
        });
    }
    out.push(Entry { kind: EntryKind::Symlink, link_target: Some(b"a/00".to_vec()), ..dir("b") });
    out.push(Entry { hard_link_to: Some(RelPath::new("a/00").unwrap()), ..out[1].clone().with_path("c") });
    out
}

trait WithPath {
    fn with_path(self, path: &str) -> Self;
}

impl WithPath for Entry {
    fn with_path(mut self, path: &str) -> Self {
        self.path = RelPath::new(path).unwrap();
        self
    }
}

#[test]
fn mutated_manifests_never_panic_and_never_pass_bad_entries() {
    let seconds = std::env::var("FERRY_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let mut writer = ManifestWriter::create(&good).unwrap();
    for entry in entries() {
        writer.push(&entry).unwrap();
    }
    writer.finish().unwrap();
    let original = std::fs::read(&good).unwrap();
    let path = dir.path().join("mutated");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (started, mut runs, mut whole) = (Instant::now(), 0u64, 0u64);
    while started.elapsed() < Duration::from_secs(seconds) {
        let mut bytes = original.clone();
        for _ in 0..rng.random_range(1..5) {
            let len = bytes.len();
            if len <= 8 {
                break;
            }
            match rng.random_range(0..4) {
                0 => {
                    let at = rng.random_range(0..len);
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
                1 => bytes.truncate(rng.random_range(0..len)),
                2 => {
                    let at = rng.random_range(8..len);
                    bytes.splice(at..at, [0xff, 0xff, 0xff, 0xff, 0x0f]);
                }
                _ => {
                    let at = rng.random_range(0..len);
                    bytes[at] = rng.random();
                }
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(mut reader) = ManifestReader::open(&path) {
            let mut read = Vec::new();
            let complete = loop {
                match reader.next_record() {
                    Ok(Some(entry)) => read.push(entry),
                    Ok(None) => break true,
                    Err(_) => break false,
                }
            };
            if complete {
                whole += 1;
                let mut previous: Option<RelPath> = None;
                for entry in &read {
                    entry.validate(previous.as_ref()).expect("a manifest that reads whole holds valid entries");
                    previous = Some(entry.path.clone());
                }
            }
        }
        runs += 1;
    }
    println!("fuzzed manifests for {seconds} s: {runs} files, {whole} read whole");
    assert!(runs > 500, "{runs}");
}
