#!/usr/bin/env bash
# Per-sample cost of the kick tier, two builds side by side in one session
# (not a CI test): 1 vCPU, the demo workload (CPL3 compute), sampling at
# 10 kHz, guest work completed (the guest's `demo_work` report) as the
# measure. Each round runs, for each build, a run without sampling and one
# with, interleaved, so both see the same host noise.
#
#   tests/soak/kick_cost.sh OLD_METRONOME NEW_METRONOME [ROUNDS] [SECONDS]
#
# Per build: the work lost to sampling (1 - sampled/unsampled work) and the
# guest time each sample costs (lost fraction x guest seconds / samples).
# Then the host-side breakdown of one sampled run of each build: tracepoint
# counts per sample (perf stat: system calls, context switches, signals),
# when perf is installed.
set -euo pipefail

old=${1:?usage: kick_cost.sh OLD_METRONOME NEW_METRONOME [ROUNDS] [SECONDS]}
new=${2:?usage: kick_cost.sh OLD_METRONOME NEW_METRONOME [ROUNDS] [SECONDS]}
rounds=${3:-5}
seconds=${4:-3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

run() { # BIN TAG ROUND [sampling options...]
    local bin=$1 tag=$2 round=$3
    shift 3
    "$bin" run --vcpus 1 --workload demo --duration "$seconds" --quiet \
        --console /dev/null --summary-json "$out/$tag-$round.json" "$@"
}

for round in $(seq "$rounds"); do
    for build in old new; do
        bin=$old
        [ "$build" = new ] && bin=$new
        run "$bin" "$build-base" "$round"
        run "$bin" "$build-10k" "$round" --sample-period-us 100
    done
done

python3 - "$out" "$rounds" "$seconds" <<'EOF'
import json, statistics, sys
out, rounds, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def load(tag, r):
    return json.load(open(f"{out}/{tag}-{r}.json"))
rows = {}
for build in ("old", "new"):
    lost, cost, hz = [], [], []
    for r in range(1, rounds + 1):
        base = load(f"{build}-base", r)["reports"]["demo_work"]
        s = load(f"{build}-10k", r)
        work, samples = s["reports"]["demo_work"], s["sampling"]["samples"]
        uptime = s["guest_uptime_ns"] / 1e9
        frac = 1 - work / base
        lost.append(100 * frac)
        cost.append(frac * uptime * 1e6 / samples)
        hz.append(samples / uptime)
    rows[build] = (statistics.median(lost), statistics.median(cost), statistics.median(hz))
    print(f"{build}: work lost {rows[build][0]:.1f} %, {rows[build][1]:.1f} us of guest time per sample, "
          f"{rows[build][2]:.0f} samples/s  (medians of {rounds}; per round lost % "
          + ", ".join(f"{x:.1f}" for x in lost) + ")")
print(f"new/old: work lost x{rows['new'][0] / rows['old'][0]:.2f}, "
      f"cost per sample x{rows['new'][1] / rows['old'][1]:.2f}")
EOF

if ! command -v perf >/dev/null; then
    echo "perf is not installed: no breakdown"
    exit 0
fi
events=sched:sched_switch,signal:signal_generate,signal:signal_deliver
events=$events,raw_syscalls:sys_enter,syscalls:sys_enter_rt_sigreturn
events=$events,syscalls:sys_enter_rt_sigtimedwait,syscalls:sys_enter_timer_settime
events=$events,syscalls:sys_enter_ioctl,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_read
for build in old new; do
    bin=$old
    [ "$build" = new ] && bin=$new
    perf stat -x, -o "$out/$build.perf" -e "$events" -- \
        "$bin" run --vcpus 1 --workload demo --duration "$seconds" --quiet \
        --console /dev/null --summary-json "$out/$build-perf.json" --sample-period-us 100
done
python3 - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
print(f"{'per sample':36} {'old':>8} {'new':>8}")
counts = {}
for build in ("old", "new"):
    samples = json.load(open(f"{out}/{build}-perf.json"))["sampling"]["samples"]
    for line in open(f"{out}/{build}.perf"):
        f = line.strip().split(",")
        if len(f) > 2 and f[0].replace(".", "").isdigit():
            counts.setdefault(f[2], {})[build] = float(f[0]) / samples
for event, per in counts.items():
    print(f"{event:36} {per.get('old', 0):8.2f} {per.get('new', 0):8.2f}")
EOF
