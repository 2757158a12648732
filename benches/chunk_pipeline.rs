//! Per-core throughput of each stage of the write path, and of the stages together:
//! FastCDC chunking, BLAKE3 hashing, zstd-3 compression, XChaCha20-Poly1305 sealing, and
//! chunk+hash+compress.
//!
//! Run: `cargo bench --bench chunk_pipeline`. Data is 64 MiB, half incompressible and half
//! text-like, so compression sees both kinds.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tresor::chunker::{Chunker, ChunkerParams, Mode};
use tresor::codec;
use tresor::crypto::{Cipher, MasterKey};
use tresor::id::ChunkId;

fn data() -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut out = Vec::with_capacity(64 << 20);
    while out.len() < 32 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    let words = [
        "tresor ",
        "backup ",
        "sovereign ",
        "chunk ",
        "layer ",
        "volume\n",
        "digest ",
    ];
    let mut i = 0usize;
    while out.len() < 64 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        i = i.wrapping_add((x % 7) as usize);
        out.extend_from_slice(words[i % words.len()].as_bytes());
    }
    out
}

fn chunks(data: &[u8]) -> Vec<bytes::Bytes> {
    let mut c = Chunker::new(ChunkerParams::default(), Mode::ContentDefined, 0);
    let mut out = Vec::new();
    let mut emit = |b| -> Result<(), ()> {
        out.push(b);
        Ok(())
    };
    for piece in data.chunks(1 << 20) {
        c.push(piece, &mut emit).unwrap();
    }
    c.finish(&mut emit).unwrap();
    out
}

fn bench(c: &mut Criterion) {
    let data = data();
    let pieces = chunks(&data);
    let mut g = c.benchmark_group("write_path_one_core");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("fastcdc", |b| b.iter(|| black_box(chunks(&data).len())));
    g.bench_function("blake3", |b| {
        b.iter(|| {
            pieces
                .iter()
                .map(|p| ChunkId::of(p).0[0] as usize)
                .sum::<usize>()
        })
    });
    g.bench_function("zstd3", |b| {
        b.iter(|| {
            pieces
                .iter()
                .map(|p| codec::encode(p, Some(3), None).len())
                .sum::<usize>()
        })
    });
    for cipher in [Cipher::XChaCha20Poly1305, Cipher::Aes256Gcm] {
        let key = MasterKey::generate(cipher);
        g.bench_function(format!("seal_{}", cipher.name()), |b| {
            b.iter(|| {
                pieces
                    .iter()
                    .map(|p| {
                        let mut out = Vec::new();
                        key.seal_into(b"chunks/aa/bb", p, &mut out);
                        out.len()
                    })
                    .sum::<usize>()
            })
        });
    }
    g.bench_function("chunk_hash_compress", |b| {
        b.iter(|| {
            chunks(&data)
                .iter()
                .map(|p| ChunkId::of(p).0[0] as usize + codec::encode(p, Some(3), None).len())
                .sum::<usize>()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
