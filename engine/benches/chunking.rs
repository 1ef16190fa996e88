//! Micro-benchmarks of the engine's hot paths: content-defined chunking with BLAKE3 naming (what the
//! source's scan does to every byte it reads; on one thread, and pipelined on two as the scan does),
//! BLAKE3 alone, and chunk index lookups (what the destination's planner does for every chunk of
//! every changed file).
//!
//! `cargo bench -p ferry-engine`; `cargo test --benches` runs each once, as a check that they work.
#![allow(missing_docs)]

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ferry_engine::{ChunkHash, ChunkIndex, ChunkLocation, Chunker, ChunkerConfig, ReadBuffers, RelPath, hash_reader};
use rand::{RngExt, SeedableRng};
use std::hint::black_box;

const DATA: usize = 16 << 20;

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill(&mut data[..]);
    data
}

fn chunking(c: &mut Criterion) {
    let data = random(DATA, 1);
    let mut group = c.benchmark_group("chunk");
    group.throughput(Throughput::Bytes(DATA as u64));
    group.sample_size(20);
    group.bench_function("fastcdc only, 16 MiB", |b| {
        b.iter(|| {
            let mut chunker = Chunker::new(ChunkerConfig::default());
            let mut count = 0usize;
            let mut emit = |chunk: &[u8]| -> Result<(), ()> {
                count += chunk.len();
                Ok(())
            };
            let _ = chunker.push(black_box(&data), &mut emit);
            let _ = chunker.finish(&mut emit);
            count
        })
    });
    group.bench_function("fastcdc + blake3, 16 MiB", |b| {
        b.iter(|| {
            let mut chunker = Chunker::new(ChunkerConfig::default());
            let mut hashes = Vec::new();
            let mut emit = |chunk: &[u8]| -> Result<(), ()> {
                hashes.push(ChunkHash::of(chunk));
                Ok(())
            };
            let _ = chunker.push(black_box(&data), &mut emit);
            let _ = chunker.finish(&mut emit);
            hashes
        })
    });
    let mut bufs = ReadBuffers::default();
    group.bench_function("hash_reader (what the scan runs: hashing beside reading and cutting), 16 MiB", |b| {
        b.iter(|| hash_reader(ChunkerConfig::default(), black_box(&data[..]), &mut bufs).expect("in memory"))
    });
    group.finish();

    let chunk = random(64 << 10, 2);
    let mut group = c.benchmark_group("hash");
    group.throughput(Throughput::Bytes(chunk.len() as u64));
    group.bench_function("blake3, one 64 KiB chunk", |b| b.iter(|| ChunkHash::of(black_box(&chunk))));
    group.finish();
}

fn index(c: &mut Criterion) {
    const CHUNKS: u64 = 100_000;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let mut index = ChunkIndex::open(&dir.path().join("chunks.redb")).expect("a new index");
    let hash = |i: u64| ChunkHash::of(&i.to_le_bytes());
    let path = RelPath::new("opt/zimbra/backup/accounts/1234/blobs/5678.msg").expect("a valid path");
    let location = ChunkLocation { path, offset: 0, len: 65536 };
    let hashes: Vec<ChunkHash> = (0..CHUNKS).map(hash).collect();
    for part in hashes.chunks(10_000) {
        index.insert(part.iter().map(|h| (h, &location)), false).expect("insert");
    }
    index.sync().expect("sync");

    let mut group = c.benchmark_group("index");
    group.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    group.bench_function("get, present (100k chunks)", |b| {
        b.iter(|| {
            i = (i + 7919) % CHUNKS;
            index.get(black_box(&hashes[i as usize])).expect("get")
        })
    });
    let mut j = CHUNKS;
    group.bench_function("get, absent (100k chunks)", |b| {
        b.iter(|| {
            j += 1;
            index.get(black_box(&hash(j))).expect("get")
        })
    });
    group.throughput(Throughput::Elements(1000));
    let mut k = 10 * CHUNKS;
    group.bench_function("insert 1000, not durable", |b| {
        b.iter_batched(
            || {
                k += 1000;
                (k..k + 1000).map(hash).collect::<Vec<_>>()
            },
            |new| index.insert(new.iter().map(|h| (h, &location)), false).expect("insert"),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, chunking, index);
criterion_main!(benches);
