//! Fuzz targets: one function per kind of input the proxy or its control plane takes from outside the
//! process, each checking what must hold for any input (no panic, no hang, and the invariant the target
//! names), with seeds that are real inputs of that kind.
//!
//! Stable Rust has no coverage-guided fuzzer, so [`Mutator`] drives the targets: the replay test
//! (`tests/replay.rs`, part of the test suite) runs each target on its seeds, on every input saved under
//! `fuzz/corpus/<target>/` (inputs that once failed stay there as regressions) and on a fixed number of
//! mutations of them; `cargo run -p weft-fuzz --release -- <target> --seconds N` mutates for longer and
//! saves any input that fails under `fuzz/corpus/<target>/`.

use std::path::PathBuf;

pub mod targets;

/// A fuzz target: what it is called, what it does with one input, and real inputs to start from.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target.
pub fn all() -> &'static [Target] {
    targets::ALL
}

pub fn find(name: &str) -> Option<&'static Target> {
    all().iter().find(|t| t.name == name)
}

/// Where a target's saved inputs live.
pub fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// A target's seeds followed by its saved inputs.
pub fn starting_inputs(target: &Target) -> Vec<Vec<u8>> {
    let mut inputs = (target.seeds)();
    if let Ok(entries) = std::fs::read_dir(corpus_dir(target.name)) {
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        inputs.extend(files.iter().filter_map(|f| std::fs::read(f).ok()));
    }
    inputs
}

/// A deterministic mutator (xorshift64*): the same seed gives the same inputs, so a failure found by
/// the replay test is found again.
#[derive(Debug, Clone)]
pub struct Mutator {
    state: u64,
}

/// Values that sit on boundaries parsers get wrong.
const INTERESTING: &[&[u8]] = &[
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x00",
    b"\x7f\xff\xff\xff",
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b":",
    b" ",
    b"%",
    b"%2F",
    b"%00",
    b"/../",
    b"//",
    b"\\",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 4\r\n",
    b"Connection: x-custom\r\n",
];

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Self { state: seed.max(1) }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % u64::try_from(n.max(1)).unwrap_or(u64::MAX)).unwrap_or(0)
    }

    /// One to four mutations of `input`, sometimes spliced with `other`.
    pub fn mutate(&mut self, input: &[u8], other: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..=self.below(4) {
            self.mutate_once(&mut out, other);
        }
        out
    }

    fn mutate_once(&mut self, out: &mut Vec<u8>, other: &[u8]) {
        let len = out.len();
        match self.below(8) {
            0 if len > 0 => {
                let at = self.below(len);
                out[at] ^= 1 << self.below(8);
            }
            1 if len > 0 => {
                let at = self.below(len);
                out[at] = u8::try_from(self.below(256)).unwrap_or(0);
            }
            2 => {
                let at = self.below(len + 1);
                let value = INTERESTING[self.below(INTERESTING.len())];
                out.splice(at..at, value.iter().copied());
            }
            3 if len > 0 => {
                let from = self.below(len);
                let to = (from + 1 + self.below(16)).min(len);
                out.drain(from..to);
            }
            4 if len > 0 => {
                let from = self.below(len);
                let to = (from + 1 + self.below(64)).min(len);
                let copy = out[from..to].to_vec();
                let at = self.below(len + 1);
                out.splice(at..at, copy);
            }
            5 if !other.is_empty() => {
                let cut = self.below(len + 1);
                let from = self.below(other.len());
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            6 if len > 0 => out.truncate(self.below(len)),
            _ => {
                let at = self.below(len + 1);
                let n = 1 + self.below(8);
                let bytes: Vec<u8> = (0..n)
                    .map(|_| u8::try_from(self.below(256)).unwrap_or(0))
                    .collect();
                out.splice(at..at, bytes);
            }
        }
    }
}

/// Runs `target` on its starting inputs and `iterations` mutations of them; the first input that
/// fails (panics) is returned with the panic's message.
pub fn replay(target: &Target, seed: u64, iterations: usize) -> Result<usize, (Vec<u8>, String)> {
    let inputs = starting_inputs(target);
    let mut ran = 0;
    for input in &inputs {
        run_caught(target, input)?;
        ran += 1;
    }
    let mut mutator = Mutator::new(seed);
    let mut pool = inputs;
    for _ in 0..iterations {
        let base = &pool[mutator.below(pool.len())];
        let other = &pool[mutator.below(pool.len())];
        let input = mutator.mutate(base, other);
        run_caught(target, &input)?;
        ran += 1;
        // Keep some mutants to mutate further, so that inputs drift away from the seeds.
        if pool.len() < 256 && mutator.below(4) == 0 {
            pool.push(input);
        }
    }
    Ok(ran)
}

/// Runs one input, turning a panic into an error carrying the input.
pub fn run_caught(target: &Target, input: &[u8]) -> Result<(), (Vec<u8>, String)> {
    std::panic::catch_unwind(|| (target.run)(input)).map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic without a message".to_owned());
        (input.to_vec(), message)
    })
}
