//! Micro-benchmarks of the chunk batch codec, what every chunk on the wire goes through: the 2 KiB
//! zstd probe, building a 1 MiB batch (zstd level 1 when it pays), and decoding it on the destination
//! with every chunk's hash checked. Two kinds of data: mail text (compresses) and random bytes (what a
//! gzip BLOB looks like to zstd).
//!
//! `cargo bench -p ferry-proto --bench batches`; `cargo test --benches` runs each once, as a check.
#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry_engine::ChunkHash;
use ferry_proto::batch::{compressible, decode_batch, encode_batch};
use rand::{RngExt, SeedableRng};
use std::hint::black_box;

const CHUNK: usize = 64 << 10;
const CHUNKS: usize = 16;

fn text() -> Vec<u8> {
    let line = "Received: from mta1.example.org (mta1.example.org [192.0.2.10]) by mail.example.org with ESMTP; \
                Subject: quarterly report, see attached\r\n";
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut out = Vec::with_capacity(CHUNK * CHUNKS);
    while out.len() < CHUNK * CHUNKS {
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(format!("Message-ID: <{}@example.org>\r\n", rng.random::<u64>()).as_bytes());
    }
    out.truncate(CHUNK * CHUNKS);
    out
}

fn random() -> Vec<u8> {
    let mut data = vec![0u8; CHUNK * CHUNKS];
    rand_chacha::ChaCha8Rng::seed_from_u64(4).fill(&mut data[..]);
    data
}

fn batches(c: &mut Criterion) {
    for (name, data) in [("mail text", text()), ("random (gzip-like)", random())] {
        let chunks: Vec<(u64, u32)> = (0..).zip(data.chunks(CHUNK).map(|chunk| chunk.len() as u32)).collect();
        let expected: Vec<Option<ChunkHash>> = data.chunks(CHUNK).map(|chunk| Some(ChunkHash::of(chunk))).collect();
        let mut compressor = zstd::bulk::Compressor::new(1).expect("zstd");
        let mut decompressor = zstd::bulk::Decompressor::new().expect("zstd");
        let compress = compressible(&data[..CHUNK], &mut compressor);
        let encoded = encode_batch(&chunks, data.clone(), compress, &mut compressor);
        println!(
            "{name}: probe says compressible = {compress}; 1 MiB batch encodes to {} bytes",
            encoded.payload.len()
        );

        let mut group = c.benchmark_group(format!("batch of {CHUNKS} x 64 KiB, {name}"));
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.sample_size(20);
        group.bench_function("probe every chunk", |b| {
            b.iter(|| data.chunks(CHUNK).filter(|chunk| compressible(black_box(chunk), &mut compressor)).count())
        });
        group.bench_function("encode", |b| {
            b.iter(|| encode_batch(&chunks, black_box(data.clone()), compress, &mut compressor))
        });
        group.bench_function("decode and check", |b| {
            b.iter(|| {
                let decoded = decode_batch(black_box(encoded.clone()), &expected, &mut decompressor).expect("decodes");
                assert!(decoded.bad.is_empty());
                decoded.good
            })
        });
        group.finish();
    }
}

criterion_group!(benches, batches);
criterion_main!(benches);
