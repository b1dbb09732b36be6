//! Criterion benches for the sleeve's per-packet work: sealing and opening with both ciphers,
//! parsing bodies and segment metadata, and the Internet checksum used for offload fix-ups.
//! `cargo bench --bench sleeve`.
//!
//! The crate is a binary, so the pure modules are compiled in here by path.

#![allow(dead_code, unreachable_pub)]

// `crypto.rs` refers to `super::frame`, so the modules sit side by side at the root.
#[path = "../src/dataplane/sleeve/crypto.rs"]
mod crypto;
#[path = "../src/dataplane/sleeve/frame.rs"]
mod frame;
#[path = "../src/dataplane/sleeve/offload.rs"]
mod offload;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crypto::{Cipher, OpeningKey, SealingKey};
use frame::{push_frame, BodyHeader, Header, SegmentMeta, HEADER_LEN};
use mesh::PeerName;

const HEAD: [u8; HEADER_LEN] = [1, 1, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 42];

fn seal_open(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal_open");
    for cipher in [Cipher::ChaCha20Poly1305, Cipher::Aes256Gcm] {
        let sealing = SealingKey::with_cipher(cipher, &[7; 32]);
        let opening = OpeningKey::with_cipher(cipher, &[7; 32]);
        for len in [64usize, 1400] {
            g.throughput(Throughput::Bytes(len as u64));
            let id = BenchmarkId::new(format!("seal {}", cipher.name()), len);
            let mut buf = vec![0u8; len];
            g.bench_function(id, |b| {
                b.iter(|| black_box(sealing.seal_detached(&HEAD, 42, &mut buf)))
            });
            let mut sealed = vec![0u8; len];
            let tag = sealing.seal_detached(&HEAD, 42, &mut sealed);
            sealed.extend_from_slice(&tag);
            let id = BenchmarkId::new(format!("open {}", cipher.name()), len);
            let mut work = sealed.clone();
            g.bench_function(id, |b| {
                b.iter(|| {
                    work.copy_from_slice(&sealed);
                    black_box(opening.open(&HEAD, 42, &mut work).is_ok())
                })
            });
        }
    }
    g.finish();
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    let mut body = Vec::new();
    BodyHeader {
        src: PeerName(1),
        dst: Some(PeerName(2)),
        hop_limit: 16,
        frame_count: 20,
    }
    .emit(&mut body);
    for _ in 0..20 {
        push_frame(&mut body, &[0x02; 64]);
    }
    g.throughput(Throughput::Elements(20));
    g.bench_function("body of 20 frames", |b| {
        b.iter(|| {
            let (head, frames) = BodyHeader::parse(black_box(&body)).expect("valid body");
            black_box(head);
            frames.map(|f| f.len()).sum::<usize>()
        })
    });
    let mut datagram = HEAD.to_vec();
    datagram.extend_from_slice(&body);
    g.throughput(Throughput::Elements(1));
    g.bench_function("header", |b| {
        b.iter(|| black_box(Header::parse(black_box(&datagram)).is_ok()))
    });
    let mut seg = Vec::new();
    SegmentMeta {
        gso_type: 1,
        hdr_len: 66,
        gso_size: 1324,
        csum_start: 34,
        csum_offset: 16,
        group: 9,
        index: 3,
        count: 40,
    }
    .emit(&mut seg);
    seg.extend_from_slice(&[0u8; 66 + 1324]);
    g.bench_function("segment meta", |b| {
        b.iter(|| black_box(SegmentMeta::parse(black_box(&seg)).is_ok()))
    });
    g.finish();
}

fn checksum(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    let data = vec![0xa5u8; 1400];
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("sum 1400 bytes", |b| {
        b.iter(|| black_box(offload::fold(offload::sum(black_box(&data), 0))))
    });
    g.finish();
}

criterion_group!(benches, seal_open, parse, checksum);
criterion_main!(benches);
