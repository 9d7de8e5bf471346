//! The fuzz targets (`src/fuzzing.rs`, run at length with `cargo fuzz`: see fuzz/README.md)
//! over their seeds in `fuzz/seeds/` and a fixed set of mutations of them, so that CI
//! checks on every run that the targets build and that their properties hold there. Every
//! input that once failed goes into the seeds, and stays a test here.

use std::path::Path;

use tm_agent::fuzzing;

/// Mutations per seed: enough to leave the seeds' happy paths, few enough for a debug build.
const MUTATIONS: usize = 400;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(
        seeds.len() >= 2,
        "{target}: too few seeds in {}",
        dir.display()
    );
    seeds
}

/// xorshift64: the same mutations on every run, so a failure here reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that matter to the parsers, for insertions.
const INTERESTING: &[u8] = b"{}[]\",:\\\n\r\t .-_=0123456789eEaz\x00\x7f\xc3\xa9\xff";

/// One to four edits of `input`: flip a bit, replace, insert or delete a byte, duplicate or
/// cut a span, or splice in a span of another seed; the first byte (a target's selector)
/// is mutated like any other.
fn mutate(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if at < out.len() => out[at] ^= 1 << rng.below(8),
            1 if at < out.len() => out[at] = INTERESTING[rng.below(INTERESTING.len())],
            2 => out.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
            3 if at < out.len() => {
                out.remove(at);
            }
            4 => {
                let end = (at + rng.below(64)).min(out.len());
                let span = out[at..end].to_vec();
                out.splice(at..at, span);
            }
            5 => {
                let end = (at + rng.below(64)).min(out.len());
                out.drain(at..end);
            }
            _ => {
                let from = rng.below(other.len() + 1);
                let end = (from + rng.below(64)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
        }
    }
    out
}

fn run(target: &str, body: fn(&[u8])) {
    let seeds = seeds(target);
    let mut rng = Rng(0x5EED_0000 + target.len() as u64);
    for (i, seed) in seeds.iter().enumerate() {
        body(seed);
        let other = &seeds[(i + 1) % seeds.len()];
        for _ in 0..MUTATIONS {
            let input = mutate(seed, other, &mut rng);
            let caught = std::panic::catch_unwind(|| body(&input));
            if caught.is_err() {
                panic!("{target}: a property failed for the input {input:?}");
            }
        }
    }
}

#[test]
fn request_stream() {
    run("request_stream", fuzzing::request_stream);
}

#[test]
fn api_response() {
    run("api_response", fuzzing::api_response);
}

#[test]
fn jwt() {
    run("jwt", fuzzing::jwt);
}

#[test]
fn config() {
    run("config", fuzzing::config);
}

#[test]
fn key_material() {
    run("key_material", fuzzing::key_material);
}
