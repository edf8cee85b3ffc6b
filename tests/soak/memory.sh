#!/usr/bin/env bash
# Memory soak (issue 8 acceptance; a script, not a CI test): run the profile
# workload for MINUTES (default 10) with on-CPU sampling at 10 kHz and PET
# every 10 ms, read the VMM's resident memory every 10 s, and check that it
# stays within LIMIT_MIB (default 8) of what it was after the first minute.
#
#   tests/soak/memory.sh [MINUTES] [LIMIT_MIB]
#
# Writes the samples to target/soak-memory.csv (seconds,rss_kib) and exits
# non-zero when the growth is over the limit. Build first with
# `cargo build --release`; it runs target/release/metronome.
set -euo pipefail
cd "$(dirname "$0")/../.."

minutes=${1:-10}
limit_mib=${2:-8}
binary=target/release/metronome
csv=target/soak-memory.csv
profile_dir=$(mktemp -d)
trap 'rm -rf "$profile_dir"' EXIT

[ -x "$binary" ] || { echo "soak: build first: cargo build --release" >&2; exit 2; }

seconds=$((minutes * 60))
"$binary" run --workload profile --vcpus 2 \
    --duration "$seconds" --timeout $((seconds + 120)) \
    --sample-period-us 100 --pet-period-ms 10 \
    --profile-dir "$profile_dir" --console /dev/null --quiet &
pid=$!

echo "seconds,rss_kib" > "$csv"
baseline=""
elapsed=0
while kill -0 "$pid" 2>/dev/null; do
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    [ -n "$rss" ] || break
    echo "$elapsed,$rss" >> "$csv"
    if [ "$elapsed" -eq 60 ]; then
        baseline=$rss
    fi
    sleep 10
    elapsed=$((elapsed + 10))
done
wait "$pid" || { echo "soak: metronome exited with $?" >&2; exit 1; }

[ -n "$baseline" ] || { echo "soak: the run ended before the first minute" >&2; exit 2; }
# Only the sampling window counts: the last 20 s may already be the
# end-of-run report (symbolizing, writing the profiles and the trace).
peak=$(awk -F, -v end=$((seconds - 20)) 'NR > 1 && $1 >= 60 && $1 <= end && $2 > m { m = $2 } END { print m }' "$csv")
growth_kib=$((peak - baseline))
echo "soak: RSS after 1 min ${baseline} KiB, peak after that ${peak} KiB, growth ${growth_kib} KiB (limit ${limit_mib} MiB); samples in $csv"
[ "$growth_kib" -le $((limit_mib * 1024)) ]
