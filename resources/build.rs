//! Builds `guest-kernel/` freestanding and copies the ELF into `OUT_DIR`.
//!
//! The guest kernel is its own cargo workspace, built for the installed host
//! target with the flags in `guest-kernel/.cargo/config.toml` (no nightly, no
//! extra rustup target). We run a nested `cargo build` in that directory with a
//! target directory of our own (so it never waits on the outer build's lock)
//! and with the outer build's flag variables removed, so that they cannot leak
//! into the freestanding build.
//!
//! Any change on the guest side rebuilds it: every file under `guest-kernel/`
//! (the kernel, `clockintr`, manifests, `Cargo.lock`, linker script, cargo
//! config) and under `resources/abi/`, build output directories excepted.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let kernel_dir = manifest_dir.join("../guest-kernel");
    let abi_dir = manifest_dir.join("abi");

    watch(&kernel_dir);
    watch(&abi_dir);

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

/// Asks cargo to rerun this script when a file under `dir` changes, is added
/// or is removed, skipping build output (`target/`, at any depth).
///
/// Cargo scans a directory given to `rerun-if-changed` recursively, so a
/// directory that holds a `target/` is not named itself (its build output
/// changes on every build); its files and clean subdirectories are.
fn watch(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut holds_target = false;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if entry.file_name() == "target" {
                holds_target = true;
            } else {
                watch(&path);
            }
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    if !holds_target {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
}
