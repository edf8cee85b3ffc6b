#!/usr/bin/env bash
# Builds the libFuzzer harness on the stable toolchain and runs fuzz targets.
#
#   fuzz/run.sh build                 build every target
#   fuzz/run.sh run TARGET [RUNS]     fuzz TARGET for RUNS executions (default
#                                     1000000), from the seeds and the corpus
#                                     kept in fuzz/corpus/TARGET
#   fuzz/run.sh all [RUNS]            every target in turn
#
# libFuzzer needs the coverage instrumentation that cargo-fuzz turns on with
# nightly-only -Zsanitizer; stable rustc has the same LLVM pass
# (sancov-module) behind -C passes and -C llvm-args, so this uses those. No
# sanitizer (ASan) is possible on stable: the targets are safe Rust, where a
# panic, an abort, a timeout or running out of memory is what libFuzzer
# catches. Crashing inputs land in fuzz/artifacts/TARGET/.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
targets=(api_request api_http kperf_json config_file_json kernel_elf symbolize
    device_models device_bus guest_walk)
triple=x86_64-unknown-linux-gnu

flags=(
    -Cpasses=sancov-module
    -Cllvm-args=-sanitizer-coverage-level=4
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
    -Cllvm-args=-sanitizer-coverage-pc-table
    -Cllvm-args=-sanitizer-coverage-trace-compares
    -Cllvm-args=-sanitizer-coverage-stack-depth
    -Cdebug-assertions
    -Coverflow-checks
    --cfg fuzzing
)

build() {
    # --target keeps build scripts and proc macros uninstrumented.
    RUSTFLAGS="${flags[*]}" cargo build --release --manifest-path "$here/Cargo.toml" \
        --target "$triple" --bins
    cargo run --quiet -p vmm --features fuzzing --example fuzz_seeds \
        --manifest-path "$root/Cargo.toml" -- "$here/corpus"
}

run() {
    local target="$1" runs="${2:-1000000}"
    mkdir -p "$here/artifacts/$target" "$here/corpus/$target"
    "$here/target/$triple/release/$target" "$here/corpus/$target" \
        -runs="$runs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$here/artifacts/$target/" -print_final_stats=1
}

case "${1:-}" in
build) build ;;
run) run "$2" "${3:-1000000}" ;;
all)
    for target in "${targets[@]}"; do run "$target" "${2:-1000000}"; done
    ;;
*)
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac
