//! Bounded mutation fuzzing of frame decoding and the destination's message-order check, on stable
//! Rust (cargo-fuzz needs a nightly toolchain, which these machines cannot fetch).
//!
//! A corpus of valid frames, one of each message with realistic content, is mutated (bit flips,
//! interesting bytes, insertions, deletions, truncation, splices of two frames, length-prefix edits)
//! and every result is decoded frame by frame: decoding never panics; whatever decodes encodes again
//! to a frame that decodes to the same message; and the decoded sequence goes through
//! `DestinationRound`, which never panics either. Inputs that decode are kept as new seeds.
//!
//! `FERRY_FUZZ_SECONDS` (default 10) bounds the run; `FERRY_FUZZ_SEED` replays one.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ferry_engine::{ChunkHash, ChunkRef, Entry, EntryKind, RelPath, RootHash};
use ferry_proto::{
    Change, ChangesEnd, Checked, ChunkAt, ChunkBatch, Codec, Committed, DestinationInput, DestinationRound, Hello,
    ImportMode, ImportResult, Message, Plan, RoundOptions, RoundRef, decode, encode,
};
use rand::{Rng, RngExt, SeedableRng};

fn entry(path: &str, kind: EntryKind) -> Entry {
    let data = b"chunk of a file";
    Entry {
        path: RelPath::new(path).unwrap(),
        kind,
        mode: 0o640,
        uid: 999,
        gid: 999,
        user: Some("zimbra".into()),
        group: Some("zimbra".into()),
        mtime_ns: 1_700_000_000_123_456_789,
        size: if kind == EntryKind::File { data.len() as u64 } else { 0 },
        chunks: if kind == EntryKind::File {
            vec![ChunkRef { hash: ChunkHash::of(data), len: data.len() as u32 }]
        } else {
            vec![]
        },
        link_target: (kind == EntryKind::Symlink).then(|| b"../items/1".to_vec()),
        hard_link_to: None,
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let root = RootHash::from_bytes([7; 32]);
    let messages = vec![
        Message::Hello(Hello {
            version: 1,
            job: "zimbra".into(),
            base: Some(RoundRef { round: 3, root }),
            delete: true,
            numeric_ids: false,
            source: 1,
        }),
        Message::RoundOptions(RoundOptions { import: ImportMode::Full }),
        Message::DryRun,
        Message::Welcome { holds: Some(RoundRef { round: 2, root }) },
        Message::Changes(vec![
            Change {
                path: RelPath::new("accounts").unwrap(),
                entry: Some(entry("accounts", EntryKind::Dir)),
                content_as_before: false,
                base: None,
            },
            Change {
                path: RelPath::new("accounts/a/items/1").unwrap(),
                entry: Some(entry("accounts/a/items/1", EntryKind::File)),
                content_as_before: false,
                base: None,
            },
            Change {
                path: RelPath::new("accounts/a/link").unwrap(),
                entry: Some(entry("accounts/a/link", EntryKind::Symlink)),
                content_as_before: false,
                base: None,
            },
            Change { path: RelPath::new("gone").unwrap(), entry: None, content_as_before: false, base: None },
        ]),
        Message::ChangesEnd(ChangesEnd { base: None, root, entries: 4 }),
        Message::Need(vec![ChunkAt { place: 1, offset: 65536, len: 15 }]),
        Message::ChunkBatch(ChunkBatch::new(Codec::Raw, [(0, 3), (1, 2)], Bytes::from_static(b"abcde"))),
        Message::ChunkBatch(ChunkBatch::new(Codec::Zstd, [(70_000, 1000)], Bytes::from(zstd_frame()))),
        Message::Missing(vec![2]),
        Message::Stop { reason: "deadline".into(), batches: 12 },
        Message::Done,
        Message::Committed(Committed {
            round: RoundRef { round: 4, root },
            files_written: 10,
            failures: vec!["x: failed".into()],
            failure_count: 1,
        }),
        Message::Failed { reason: "no space".into() },
        Message::Refused { refusal: ferry_proto::Refusal::Busy, reason: "busy".into() },
        Message::Notice { text: "import running".into() },
        Message::ImportStarted { round: 4, command: vec!["zxsuite".into(), "backup".into()] },
        Message::ImportDone(ImportResult {
            round: 4,
            success: false,
            exit_code: Some(3),
            tail: vec!["error".into()],
            duration_ms: 1200,
        }),
        Message::Planned(Plan { files: 3, need_bytes: 1 << 20, space_needed: 2 << 20, space_available: 1 << 30 }),
        Message::Check { job: "zimbra".into(), source: 1 },
        Message::Paused,
        Message::Scanning,
        Message::Passed(70_000),
        Message::Prefix(ferry_engine::FilePrefix {
            place: 70_001,
            path: ferry_engine::RelPath::new(&b"server/backup.tgz"[..]).unwrap(),
            offset: 4 << 20,
            chunks: vec![ferry_engine::ChunkRef { hash: ferry_engine::ChunkHash::of(b"c"), len: 65_536 }],
            size: 1 << 30,
        }),
        Message::PrefixPlanned(70_001),
        Message::Checked(Checked {
            entries: 200_000,
            missing: 3,
            changed: 1,
            foreign: 0,
            folders: 2,
            duration_ms: 580,
        }),
    ];
    messages
        .iter()
        .map(|m| {
            let mut out = BytesMut::new();
            encode(m, &mut out).unwrap();
            out.to_vec()
        })
        .collect()
}

/// A small zstd frame (1000 bytes of text), as a batch payload.
fn zstd_frame() -> Vec<u8> {
    // The frame a `zstd -1` of 1000 'a's gives: magic, header, one RLE block.
    let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x20, 0xe8, 0x3d, 0x00, 0x00, 0x08];
    frame.extend_from_slice(b"a");
    frame
}

fn mutate(input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut impl Rng) {
    const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xfe, 0xff, 0x20, 0x2e];
    for _ in 0..rng.random_range(1..8) {
        let len = input.len();
        match rng.random_range(0..9) {
            0 if len > 0 => {
                let at = rng.random_range(0..len);
                input[at] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let at = rng.random_range(0..len);
                input[at] = INTERESTING[rng.random_range(0..INTERESTING.len())];
            }
            2 => {
                let at = rng.random_range(0..=len);
                input.insert(at, rng.random());
            }
            3 if len > 0 => {
                input.remove(rng.random_range(0..len));
            }
            4 if len > 0 => input.truncate(rng.random_range(0..len)),
            5 => {
                let other = &corpus[rng.random_range(0..corpus.len())];
                input.extend_from_slice(other);
            }
            6 if len >= 4 => {
                // Rewrite the first frame's length prefix.
                let value: u32 = match rng.random_range(0..4) {
                    0 => 0,
                    1 => u32::MAX,
                    2 => (len as u32).saturating_sub(4).saturating_add(rng.random_range(0..8)),
                    _ => rng.random(),
                };
                input[..4].copy_from_slice(&value.to_be_bytes());
            }
            7 if len > 8 => {
                // Duplicate a range (repeated varints, lists).
                let start = rng.random_range(0..len - 4);
                let end = rng.random_range(start..len.min(start + 64));
                let piece = input[start..end].to_vec();
                let at = rng.random_range(0..=input.len());
                input.splice(at..at, piece);
            }
            _ => {
                // A varint made huge: absurd counts and lengths.
                if len > 5 {
                    let at = rng.random_range(4..len);
                    input.splice(at..at, [0xff, 0xff, 0xff, 0xff, 0x0f]);
                }
            }
        }
    }
}

/// Decodes `input` frame by frame; returns how many messages decoded.
fn exercise(input: &[u8]) -> usize {
    let mut buf = BytesMut::from(input);
    let mut round = DestinationRound::new(Duration::from_secs(120));
    let now = Instant::now();
    let mut decoded = 0;
    while let Ok(Some(message)) = decode(&mut buf) {
        decoded += 1;
        let mut again = BytesMut::new();
        encode(&message, &mut again).expect("a decoded message encodes again");
        assert_eq!(decode(&mut again).unwrap(), Some(message.clone()), "re-encoding changed a message");
        round.handle(DestinationInput::Message(message), now);
        while round.poll().is_some() {}
        while round.poll_transmit().is_some() {}
    }
    decoded
}

#[test]
fn frames_survive_bounded_mutation_fuzzing() {
    let seconds = std::env::var("FERRY_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let seed = std::env::var("FERRY_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_f0e5);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut corpus = corpus();
    let seeds = corpus.len();
    for frame in &corpus {
        assert_eq!(exercise(frame), 1);
    }
    let (started, mut runs, mut decoded_runs) = (Instant::now(), 0u64, 0u64);
    while started.elapsed() < Duration::from_secs(seconds) {
        let mut input = corpus[rng.random_range(0..corpus.len())].clone();
        mutate(&mut input, &corpus, &mut rng);
        let decoded = exercise(&input);
        runs += 1;
        if decoded > 0 {
            decoded_runs += 1;
            if corpus.len() < 4096 && rng.random_range(0..16) == 0 {
                corpus.push(input);
            }
        }
    }
    println!(
        "fuzzed frames for {seconds} s (seed {seed}): {runs} inputs, {decoded_runs} decoded at least one message, corpus {seeds} -> {}",
        corpus.len()
    );
    assert!(runs > 10_000, "too few runs to mean anything: {runs}");
}
