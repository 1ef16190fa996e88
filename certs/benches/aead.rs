//! What every byte of a round costs in QUIC's packet protection: sealing one 6500-byte packet (the
//! largest datagram ferry sends on loopback) with each TLS 1.3 AEAD that `crypto_provider` offers,
//! through ring, the provider rustls and quinn use. Opening costs the same.
//!
//! `cargo bench -p ferry-certs --bench aead`; `cargo test --benches` runs each once, as a check.
#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

const PACKET: usize = 6500;

fn seal(c: &mut Criterion) {
    let mut group = c.benchmark_group("seal");
    group.throughput(Throughput::Bytes(PACKET as u64));
    let algorithms: [(&str, &'static Algorithm); 3] =
        [("aes128gcm", &AES_128_GCM), ("aes256gcm", &AES_256_GCM), ("chacha20poly1305", &CHACHA20_POLY1305)];
    for (name, algorithm) in algorithms {
        let key = LessSafeKey::new(UnboundKey::new(algorithm, &vec![7; algorithm.key_len()]).unwrap());
        let mut packet = vec![0x5a; PACKET];
        let mut number = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                number += 1;
                let mut nonce = [0; 12];
                nonce[4..].copy_from_slice(&number.to_be_bytes());
                key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&[1, 2, 3]), &mut packet)
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, seal);
criterion_main!(benches);
