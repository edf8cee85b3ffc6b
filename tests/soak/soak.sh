#!/usr/bin/env bash
# Soak (issue 11): the profile workload on 2 vCPUs for SECONDS (default
# 3600) with on-CPU sampling at 10 kHz and PET every 10 ms, booted from a
# --config-file with the API socket up, and the API polled every second
# (GET /metrics). Each second it records the VMM's resident memory and the
# run's samples, drops and timer deliveries; at the end it reports RSS over
# time and checks that it stays within LIMIT_MIB (default 8) of what it was
# after BASELINE_S (default 60) seconds, and that samples and deliveries
# kept growing.
#
#   tests/soak/soak.sh [SECONDS] [LIMIT_MIB] [BASELINE_S]
#
# METRONOME (default target/release/metronome) is the binary; OUT (default
# target/soak.csv) the CSV: seconds,rss_kib,samples,sample_drops,trace_drops,
# timer_deliveries,api_requests. `cargo test` runs it for 60 s
# (tests/soak.rs, baseline 30 s: at 10 kHz the trace buffer, bounded at 1M
# records, fills in the first 20 s, after which memory is flat). The last
# 20 s are not judged: the end of the run writes the profiles and trace.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=${1:-3600}
limit_mib=${2:-8}
baseline_s=${3:-60}
binary=${METRONOME:-target/release/metronome}
csv=${OUT:-target/soak.csv}
work=$(mktemp -d)
socket=$work/api.sock
pid=""
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

[ -x "$binary" ] || { echo "soak: no binary $binary: cargo build --release" >&2; exit 2; }
[ "$seconds" -gt "$baseline_s" ] || { echo "soak: SECONDS must exceed BASELINE_S" >&2; exit 2; }
mkdir -p "$(dirname "$csv")"

cat > "$work/config.json" <<EOF
{
  "machine-config": {"vcpu_count": 2, "mem_size_mib": 128},
  "boot-source": {"workload": "profile", "duration_s": $seconds},
  "clock": {"hz": 100},
  "kperf": {
    "action_count": 1,
    "timer_count": 2,
    "actions": [{"id": 1, "samplers": ["th_info", "ustack", "kstack"]}],
    "timers": [{"id": 0, "period_ns": 100000, "action_id": 1},
               {"id": 1, "period_ns": 10000000, "action_id": 1}],
    "pet": {"timer_id": 1}
  }
}
EOF

"$binary" --config-file "$work/config.json" --api-sock "$socket" \
    --profile-dir "$work/profile" --console /dev/null --quiet &
pid=$!
for _ in $(seq 200); do [ -S "$socket" ] && break; sleep 0.05; done
[ -S "$socket" ] || { echo "soak: the API socket never appeared" >&2; exit 1; }

# metrics_line: state, samples, sample drops, trace drops, timer deliveries
# and API requests from GET /metrics (python3 reads the JSON).
metrics_line() {
    curl -s --max-time 10 --unix-socket "$socket" http://localhost/metrics | python3 -c '
import json, sys
try:
    m = json.load(sys.stdin)
except ValueError:
    # No answer: the run is ending (its report is being written).
    print("Ending 0 0 0 0 0")
    sys.exit()
v = m.get("vcpus", [])
drops = sum(x["sample_drops"] + x["pet_sample_drops"] for x in v)
trace = sum(x["trace_ring_drops"] for x in v) + m["kperf"]["trace_drops"]
print(m["state"], m["kperf"]["samples"], drops, trace, sum(x["timer_deliveries"] for x in v), sum(m["api_requests"].values()))
'
}

echo "seconds,rss_kib,samples,sample_drops,trace_drops,timer_deliveries,api_requests" > "$csv"
start=$(date +%s)
while :; do
    elapsed=$(( $(date +%s) - start ))
    read -r state samples drops trace deliveries requests < <(metrics_line) || break
    [ "$state" = Running ] || break
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    [ -n "$rss" ] || break
    echo "$elapsed,$rss,$samples,$drops,$trace,$deliveries,$requests" >> "$csv"
    sleep 1
done
# The run's summary: GET /summary waits for the end of the run's report.
summary=$(curl -s --max-time 600 --unix-socket "$socket" http://localhost/summary)
kill -TERM "$pid"
wait "$pid" || { echo "soak: metronome exited with $?" >&2; exit 1; }
pid=""
outcome=$(printf '%s' "$summary" | python3 -c 'import json, sys; s = json.load(sys.stdin); print(s.get("outcome"), s.get("exit_code"))')
[ "$outcome" = "guest_exit 0" ] || { echo "soak: the guest did not exit normally: $outcome" >&2; exit 1; }

python3 - "$csv" "$baseline_s" "$limit_mib" "$seconds" <<'EOF'
import csv, sys
path, baseline_s, limit_mib, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = [{k: int(v) for k, v in r.items()} for r in csv.DictReader(open(path))]
if not rows or rows[-1]["seconds"] < baseline_s:
    sys.exit(f"soak: the run ended before {baseline_s} s")
base = next(r for r in rows if r["seconds"] >= baseline_s)
# The last 20 s may already be the end of the run: its report.
window = [r for r in rows if base["seconds"] <= r["seconds"] <= seconds - 20] or [base]
peak = max(r["rss_kib"] for r in window)
growth = peak - base["rss_kib"]
marks = sorted({baseline_s, seconds // 2, rows[-1]["seconds"]} | {m * 60 for m in (1, 30, 60) if m * 60 <= rows[-1]["seconds"]})
print("soak: seconds  rss_MiB    samples  sample_drops  trace_drops  timer_deliveries  api_requests")
for m in marks:
    r = min(rows, key=lambda r: abs(r["seconds"] - m))
    print(f"soak: {r['seconds']:7d}  {r['rss_kib'] / 1024:7.1f}  {r['samples']:9d}  {r['sample_drops']:12d}  {r['trace_drops']:11d}  {r['timer_deliveries']:16d}  {r['api_requests']:12d}")
print(f"soak: RSS at {base['seconds']} s {base['rss_kib']} KiB, peak after {peak} KiB, growth {growth} KiB (limit {limit_mib} MiB); {len(rows)} polls in {path}")
last, first = rows[-1], base
if last["samples"] <= first["samples"] or last["timer_deliveries"] <= first["timer_deliveries"]:
    sys.exit("soak: samples or timer deliveries stopped growing")
if growth > limit_mib * 1024:
    sys.exit(f"soak: resident memory grew {growth} KiB after {baseline_s} s, over {limit_mib} MiB")
EOF
