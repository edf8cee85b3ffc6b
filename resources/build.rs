//! Builds `guest-kernel/` freestanding and copies the ELF into `OUT_DIR`.
//!
//! The guest kernel is its own cargo workspace, built for the installed host
//! target with the flags in `guest-kernel/.cargo/config.toml` (no nightly, no
//! extra rustup target). We run a nested `cargo build` in that directory with a
//! target directory of our own (so it never waits on the outer build's lock)
//! and with the outer build's flag variables removed, so that they cannot leak
//! into the freestanding build.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let kernel_dir = manifest_dir.join("../guest-kernel");
    let abi_dir = manifest_dir.join("abi");

    for dir in [&kernel_dir.join("src"), &abi_dir.join("src")] {
        watch(dir);
    }
    for file in ["Cargo.toml", "build.rs", "linker.ld", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", kernel_dir.join(file).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        abi_dir.join("Cargo.toml").display()
    );

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("guest-target");
    let mut command = Command::new(cargo);
    command
        .current_dir(&kernel_dir)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        let leaks = key.starts_with("CARGO_")
            || key == "RUSTFLAGS"
            || key == "RUSTC_WRAPPER"
            || key == "RUSTC_WORKSPACE_WRAPPER"
            || key == "RUSTDOCFLAGS";
        if leaks && key != "CARGO_HOME" {
            command.env_remove(key.as_ref());
        }
    }
    let status = command
        .status()
        .expect("failed to run cargo for the guest kernel");
    assert!(
        status.success(),
        "building the guest kernel failed: {status}"
    );

    let built = target_dir.join("x86_64-unknown-linux-gnu/release/metronome-guest");
    std::fs::copy(&built, out_dir.join("metronome-guest.elf"))
        .unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
}

fn watch(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                watch(&path);
            } else {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
