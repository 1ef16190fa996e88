//! Micro-benchmarks of the wire codec: a 1 MiB chunk batch and a 4096-chunk `Need` through
//! `encode` and `decode` (length prefix, postcard, limits), and the batch through `encode_chunk_batch`
//! (the head alone: the payload is not copied).
//!
//! `cargo bench -p ferry-proto`; `cargo test --benches` runs each once, as a check that they work.
#![allow(missing_docs)]

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry_proto::{ChunkAt, ChunkBatch, Codec, Message, decode, encode, encode_chunk_batch};
use std::hint::black_box;

fn batch() -> Message {
    let payload = Bytes::from(vec![7u8; 1 << 20]);
    Message::ChunkBatch(ChunkBatch::new(Codec::Raw, (70_000..70_016).map(|need| (need, 65536)), payload))
}

fn need() -> Message {
    Message::Need((0..4096u64).map(|i| ChunkAt { place: 1000 + i / 4, offset: (i % 4) * 65536, len: 65536 }).collect())
}

fn frames(c: &mut Criterion) {
    for (name, message) in [("chunk batch, 1 MiB", batch()), ("need, 4096 chunks", need())] {
        let mut encoded = BytesMut::new();
        encode(&message, &mut encoded).expect("encode");
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_function("encode", |b| {
            let mut out = BytesMut::with_capacity(encoded.len());
            b.iter(|| {
                out.clear();
                encode(black_box(&message), &mut out).expect("encode");
            })
        });
        if let Message::ChunkBatch(batch) = &message {
            group.bench_function("encode in two pieces", |b| {
                b.iter(|| encode_chunk_batch(black_box(batch)).expect("encode"))
            });
        }
        group.bench_function("decode", |b| {
            b.iter(|| {
                let mut buf = encoded.clone();
                decode(black_box(&mut buf)).expect("decode").expect("one whole frame")
            })
        });
        group.finish();
    }
}

criterion_group!(benches, frames);
criterion_main!(benches);
