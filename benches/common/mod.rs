//! What the benchmarks share: test images with a realistic mix of data, and the figures
//! every table prints. Included by each benchmark with `#[path]`; not every one uses all.

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const MIB: u64 = 1 << 20;

/// A small deterministic generator for the image layout, the text and the changed blocks.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn fill_random(buf: &mut [u8], seed: u64) {
    blake3::Hasher::new()
        .update(b"fluidcloud bench")
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(buf);
}

/// Log-like text: compresses about 4:1, as a service's logs and documents do.
pub fn fill_text(buf: &mut [u8], rng: &mut XorShift) {
    const WORDS: &[&str] = &[
        "GET",
        "POST",
        "/v1/orders",
        "/v1/basket",
        "200",
        "404",
        "customer",
        "order",
        "shipped",
        "payment",
        "accepted",
        "latency_ms=",
        "12",
        "250",
        "2026-11-25T10:00:00Z",
        "INFO",
        "WARN",
        "request",
        "id",
        "the",
        "and",
        "of",
        "session",
        "cache",
        "miss",
    ];
    let mut pos = 0;
    while pos < buf.len() {
        let w = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
        let sep: &[u8] = if rng.below(10) == 0 { b"\n" } else { b" " };
        for b in w.iter().chain(sep) {
            if pos == buf.len() {
                break;
            }
            buf[pos] = *b;
            pos += 1;
        }
    }
}

/// Writes a sparse raw image of `size` bytes with `allocated` bytes of data, in runs of 1 to
/// 32 MiB scattered over the image by `seed`: a sixth allocated zeros, the rest half random,
/// half text.
pub fn build_image(path: &Path, size: u64, allocated: u64, seed: u64) -> std::io::Result<()> {
    #[derive(Clone, Copy)]
    enum Kind {
        Hole,
        Random,
        Text,
        Zero,
    }
    let blocks = size / MIB;
    let alloc_blocks = (allocated / MIB).min(blocks);
    let zero = alloc_blocks / 6;
    let random = (alloc_blocks - zero) / 2;
    let text = alloc_blocks - zero - random;
    let mut rng = XorShift(seed);
    let mut runs = Vec::new();
    for (kind, mut left) in [
        (Kind::Random, random),
        (Kind::Text, text),
        (Kind::Zero, zero),
        (Kind::Hole, blocks - alloc_blocks),
    ] {
        while left > 0 {
            let n = (1 + rng.below(32)).min(left);
            runs.push((kind, n));
            left -= n;
        }
    }
    for i in (1..runs.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        runs.swap(i, j);
    }
    let f = File::create(path)?;
    f.set_len(size)?;
    let mut buf = vec![0u8; MIB as usize];
    let mut block = 0u64;
    for (kind, n) in runs {
        for _ in 0..n {
            let data = match kind {
                Kind::Hole => false,
                Kind::Random => {
                    fill_random(&mut buf, block);
                    true
                }
                Kind::Text => {
                    fill_text(&mut buf, &mut rng);
                    true
                }
                Kind::Zero => {
                    buf.fill(0);
                    true
                }
            };
            if data {
                f.write_all_at(&buf, block * MIB)?;
            }
            block += 1;
        }
    }
    f.sync_all()
}

/// The median of `v` (the mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The load averages over 1, 5 and 15 minutes, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A port nobody listens on at the moment, on the loopback interface. (The servers of
/// `tests/it/common/servers.rs` find theirs through this, as `super::free_port`.)
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// What `cargo bench` passes every benchmark besides its own flags: `--bench`, and the filter
/// words of `cargo bench -- WORD`, which these benchmarks (each one measurement) ignore.
/// Flattened into each benchmark's arguments.
#[derive(clap::Args, Debug)]
pub struct CargoBench {
    #[arg(long, hide = true)]
    bench: bool,
    #[arg(hide = true)]
    filters: Vec<String>,
}

/// Fails the way clap fails (usage, exit 2) on a check across several arguments.
pub fn invalid<P: clap::CommandFactory>(message: impl std::fmt::Display) -> ! {
    P::command()
        .error(clap::error::ErrorKind::ValueValidation, message)
        .exit()
}

/// Parses a number of 1 or more (`--repeat`, `--size-gib`), for `value_parser`.
pub fn at_least_one<T>(text: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + From<u8>,
    T::Err: std::fmt::Display,
{
    let n: T = text.parse().map_err(|e: T::Err| e.to_string())?;
    if n < T::from(1) {
        return Err("must be at least 1".into());
    }
    Ok(n)
}
