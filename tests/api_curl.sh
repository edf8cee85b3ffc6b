#!/usr/bin/env bash
# The API's happy path with curl, as README's quick start does it: start
# `metronome --api-sock`, configure (kperf too), boot, pause, resume, read
# clockintr, sample with kperf, fetch the profile and the summary so far, read
# the metrics in both formats, exit, stop the server with SIGTERM; check each
# answer's status.
# Run by tests/api.rs (test_api_curl_script) with METRONOME (the binary) and
# SOCKET (a fresh path) set.
set -euo pipefail

: "${METRONOME:?the metronome binary}" "${SOCKET:?a fresh socket path}"

"$METRONOME" --api-sock "$SOCKET" --console /dev/null --quiet &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 200); do [ -S "$SOCKET" ] && break; sleep 0.05; done

# api METHOD PATH EXPECTED_STATUS [BODY]: prints the answer's body.
api() {
    local method=$1 path=$2 expected=$3 body=${4:-}
    local args=(-s --max-time 30 --unix-socket "$SOCKET" -X "$method" -w '\n%{http_code}')
    [ -n "$body" ] && args+=(-H 'Content-Type: application/json' -d "$body")
    local answer status
    answer=$(curl "${args[@]}" "http://localhost$path")
    status=${answer##*$'\n'}
    if [ "$status" != "$expected" ]; then
        echo "api_curl.sh: $method $path: status $status, expected $expected: $answer" >&2
        exit 1
    fi
    printf '%s\n' "${answer%$'\n'*}"
}

# has PATTERN: whether stdin matches, reading all of it (grep -q would stop
# at the first match and the writer could die of SIGPIPE under pipefail).
has() { grep -e "$1" >/dev/null; }

state() { api GET / 200 | grep -o '"state":"[^"]*"'; }

[ "$(state)" = '"state":"Not started"' ]
api PUT /machine-config 204 '{"vcpu_count": 2, "mem_size_mib": 128}'
api PUT /boot-source 204 '{"workload": "demo", "duration_s": 600}'
api PUT /clock 204 '{"hz": 100}'
api PUT /kperf/action-count 204 '{"count": 1}'
api PUT /kperf/timer-count 204 '{"count": 1}'
api PUT /kperf/actions/1 204 '{"samplers": ["th_info", "kstack"]}'
api PUT /kperf/timers/0 204 '{"period_ns": 1000000, "action_id": 1}'
api PUT /actions 204 '{"action_type": "InstanceStart"}'
[ "$(state)" = '"state":"Running"' ]
api PUT /actions 204 '{"action_type": "Pause"}'
[ "$(state)" = '"state":"Paused"' ]
api PUT /actions 204 '{"action_type": "Resume"}'
api GET /clockintr 200 | has '"total"'
api PUT /kperf/sampling 204 '{"on": true}'
for _ in $(seq 100); do
    api GET /kperf/counters 200 | has '"samples":0,' || break
    sleep 0.05
done
api GET /kperf/counters 200 | has '"sampling":"on"'
! api GET /kperf/counters 200 | has '"samples":0,'
# The profile and the summary so far, while the guest runs.
api GET '/profile?format=folded' 200 >/dev/null
pprof=$(mktemp)
[ "$(curl -s --max-time 60 --unix-socket "$SOCKET" -o "$pprof" -w '%{http_code} %{content_type}' \
    'http://localhost/profile?format=pprof')" = '200 application/octet-stream' ]
[ "$(head -c 2 "$pprof" | od -An -tx1 | tr -d ' ')" = 1f8b ]
rm -f "$pprof"
api GET /summary 200 | has '"state":"Running"'
api PUT /kperf/sampling 204 '{"on": false}'
api GET /kperf/sampling 200 | has '"on":false'
api GET /metrics 200 | has '"state":"Running"'
api GET '/metrics?format=prometheus' 200 | has '^metronome_kperf_samples_total [1-9]'
api GET '/metrics?format=yaml' 400 | has 'format=prometheus'
api PUT /actions 204 '{"action_type": "SendExit"}'
[ "$(state)" = '"state":"Exited"' ]
api GET /summary 200 | has '"outcome":"stopped"'

kill -TERM "$pid"
wait "$pid"
trap - EXIT
[ ! -e "$SOCKET" ]
echo "api_curl.sh: ok"
