//! Writes the seed corpus of every fuzz target (`vmm::fuzz::seeds`) into
//! `DIR/<target>/seed-<n>`: `cargo run -p vmm --features fuzzing --example
//! fuzz_seeds -- DIR` (fuzz/run.sh does).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .unwrap_or_else(|| "corpus".into()),
    );
    for (name, _) in vmm::fuzz::TARGETS {
        let target = dir.join(name);
        std::fs::create_dir_all(&target)?;
        for (i, seed) in vmm::fuzz::seeds(name).iter().enumerate() {
            std::fs::write(target.join(format!("seed-{i}")), seed)?;
        }
    }
    Ok(())
}
