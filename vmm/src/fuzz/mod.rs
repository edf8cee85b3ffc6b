//! Fuzz targets: every edge where outside input enters the VMM, each a
//! function of bytes that panics when an invariant breaks.
//!
//! The same functions run in two harnesses:
//!
//! - bounded property tests in `cargo test` (this module's tests and each
//!   target's): the seeds of [`seeds`], then a fixed number of mutations of
//!   them from a seeded generator, so a failure is reproducible;
//! - the coverage-guided harness in `fuzz/` (its own workspace, libFuzzer on
//!   the stable toolchain), one thin wrapper per target; this module is
//!   compiled for it with the `fuzzing` feature.
//!
//! | target | edge | invariants beyond "no panic" |
//! |---|---|---|
//! | `api_request` | an HTTP request (method, path and query, body) into the router, by `oneshot` on an instance not started | every refusal is a 4xx with a JSON `fault_message`; no 5xx; the configuration stays valid |
//! | `api_http` | raw bytes through hyper's HTTP/1.1 server and the router, in process | the connection ends; every answer is an HTTP/1.1 status line |
//! | `kperf_json` | the `--kperf` file | re-serialised, re-parses to the same value; an accepted engine reads back to a fixed point |
//! | `config_file_json` | the `--config-file` | re-serialised, re-parses to the same value; applying never panics |
//! | `kernel_elf` | the `--kernel` ELF loader | an accepted kernel lies in the kernel window, loads, and the load agrees with the check |
//! | `symbolize` | ELF symbols and DWARF of the guest kernel | every address symbolizes to at least one named frame |
//! | `device_models` | the interrupt controller and timer models, time an input | VT-1..VT-6, the controller's counter identity and priority rule |
//! | `device_bus` | the UART, debug-exit, interrupt-controller, timer and control pages on their buses | accesses off a device miss; `VIC_ID` reads the vCPU; misbehaviour is counted |
//! | `guest_walk` | page tables, stacks and registers of a hostile guest | the walks stay within their depth bounds; translation is checked against RAM |

use std::cell::RefCell;

use arbitrary::Unstructured;

pub mod api;
pub mod config;
pub mod devices;
pub mod elf;
pub mod walk;

/// A fuzz target: panics when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target, by name (the names of the `fuzz/` harness's binaries).
pub const TARGETS: [(&str, Target); 9] = [
    ("api_request", api::api_request),
    ("api_http", api::api_http),
    ("kperf_json", config::kperf_json),
    ("config_file_json", config::config_file_json),
    ("kernel_elf", elf::kernel_elf),
    ("symbolize", elf::symbolize),
    ("device_models", devices::device_models),
    ("device_bus", devices::device_bus),
    ("guest_walk", walk::guest_walk),
];

/// The seed inputs of target `name` (none for an unknown name): valid
/// inputs that reach deep into the parser, for the fuzzer to mutate.
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    match name {
        "api_request" => api::seeds(),
        "api_http" => api::http_seeds(),
        "kperf_json" => config::kperf_seeds(),
        "config_file_json" => config::config_file_seeds(),
        "kernel_elf" => elf::kernel_seeds(),
        "symbolize" => elf::symbolize_seeds(),
        "device_models" | "device_bus" | "guest_walk" => structured_seeds(),
        _ => Vec::new(),
    }
}

/// `texts` as seed inputs.
fn texts(texts: &[&str]) -> Vec<Vec<u8>> {
    texts.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// Seeds of the targets that decode their input with [`Unstructured`]: a
/// few byte patterns that decode to long operation lists.
fn structured_seeds() -> Vec<Vec<u8>> {
    (0..8u8)
        .map(|k| {
            (0..512u32)
                .map(|i| (i.wrapping_mul(31).wrapping_add(u32::from(k) * 97) % 251) as u8)
                .collect()
        })
        .collect()
}

thread_local! {
    /// One current-thread runtime per thread, as the API thread has.
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Runs `future` on this thread's current-thread runtime.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    RUNTIME.with(|cell| {
        let mut runtime = cell.borrow_mut();
        // Cannot panic: building a current-thread runtime only fails when
        // the process is out of file descriptors.
        runtime
            .get_or_insert_with(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime")
            })
            .block_on(future)
    })
}

/// One of `choices`, or `None` when the input has run out.
fn pick<T: Copy>(u: &mut Unstructured<'_>, choices: &[T]) -> Option<T> {
    u.choose(choices).ok().copied()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small deterministic generator (SplitMix64): the property tests'
    /// inputs depend on the seed only.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Self(seed)
        }

        pub(crate) fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Interesting values a mutation writes (boundaries of the widths).
    const MAGIC: [u64; 10] = [
        0,
        1,
        0x7f,
        0x80,
        0xff,
        0xffff,
        0x7fff_ffff,
        0xffff_ffff,
        u64::MAX,
        1 << 63,
    ];

    /// One to four mutations of `input`: bit flips, bytes and words set to
    /// boundary values, insertions, deletions, truncation, a splice from
    /// `other`, or JSON-ish tokens.
    pub(crate) fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..=rng.below(4) {
            let at = rng.below(out.len() + 1);
            match rng.below(9) {
                0 if !out.is_empty() => {
                    let i = at.min(out.len() - 1);
                    out[i] ^= 1 << rng.below(8);
                }
                1 if !out.is_empty() => {
                    let i = at.min(out.len() - 1);
                    out[i] = rng.next() as u8;
                }
                2 => {
                    let value = MAGIC[rng.below(MAGIC.len())].to_le_bytes();
                    let width = [1, 2, 4, 8][rng.below(4)];
                    let end = (at + width).min(out.len());
                    out.splice(at..end, value[..width].iter().copied());
                }
                3 => {
                    let n = rng.below(16) + 1;
                    let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                    out.splice(at..at, bytes);
                }
                4 => {
                    let end = (at + rng.below(32) + 1).min(out.len());
                    out.drain(at..end);
                }
                5 => out.truncate(at),
                6 if !other.is_empty() => {
                    let from = rng.below(other.len());
                    let to = (from + rng.below(64) + 1).min(other.len());
                    out.splice(at..at, other[from..to].iter().copied());
                }
                7 => {
                    const TOKENS: [&str; 12] = [
                        "{",
                        "}",
                        "[",
                        "]",
                        "\"",
                        ",",
                        ":",
                        "null",
                        "-1",
                        "1e999",
                        "18446744073709551616",
                        "\\u0000",
                    ];
                    let token = TOKENS[rng.below(TOKENS.len())];
                    out.splice(at..at, token.bytes());
                }
                _ => {
                    let n = rng.below(8) + 1;
                    let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                    out.extend(bytes);
                }
            }
        }
        out
    }

    /// The bounded property test of `name`: its seeds, then `iterations`
    /// mutations of them (generator seeded with `seed`), each through the
    /// target.
    pub(crate) fn check_target(name: &str, iterations: usize, seed: u64) {
        let target = TARGETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .unwrap();
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name} has no seeds");
        for input in &seeds {
            target(input);
        }
        let mut rng = Rng::new(seed);
        let mut pool = seeds.clone();
        for i in 0..iterations {
            let base = &pool[rng.below(pool.len())];
            let other = &pool[rng.below(pool.len())];
            let input = mutate(&mut rng, base, other);
            let run = std::panic::catch_unwind(|| target(&input));
            if let Err(panic) = run {
                panic!(
                    "{name}: iteration {i} (seed {seed}) broke an invariant on input {:?}: {:?}",
                    String::from_utf8_lossy(&input),
                    panic.downcast_ref::<String>().map(String::as_str)
                );
            }
            // Keep some mutants: later mutations build on them.
            if pool.len() < 256 && rng.below(4) == 0 {
                pool.push(input);
            }
        }
    }

    #[test]
    fn test_every_target_has_seeds_and_accepts_empty_and_random_input() {
        let mut rng = Rng::new(7);
        for (name, target) in TARGETS {
            assert!(!seeds(name).is_empty(), "{name}");
            target(&[]);
            let noise: Vec<u8> = (0..300).map(|_| rng.next() as u8).collect();
            target(&noise);
        }
        assert!(seeds("no-such-target").is_empty());
    }

    #[test]
    fn test_mutations_are_reproducible_from_the_seed() {
        let (mut a, mut b) = (Rng::new(3), Rng::new(3));
        let input = b"{\"action_count\": 1}";
        for _ in 0..100 {
            assert_eq!(mutate(&mut a, input, input), mutate(&mut b, input, input));
        }
    }
}
