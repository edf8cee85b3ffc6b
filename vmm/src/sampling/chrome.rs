//! The trace as Chrome trace-event JSON (`trace.json`): one timeline that the
//! Perfetto UI (ui.perfetto.dev) and `chrome://tracing` open, with timer
//! fires, samples, clock dispatches and thread switches side by side.
//!
//! The object format of the Trace Event Format: `{"traceEvents": [...],
//! "displayTimeUnit": "ns"}`; `ts` and `dur` are microseconds (floats) of
//! guest uptime (device time). Three processes, each named by `M` events:
//!
//! | pid | process | threads (tracks) | events |
//! |---|---|---|---|
//! | 1 | `vCPUs` | `vCPU n` (tid n + 1) | `TM_FIRE` and `thread switch` instants, `TM_HNDLR` and `clockintr dispatch` slices |
//! | 2 | `guest threads` | each guest thread by name (its guest tid), `idle (vCPU n)` (tid 1000000 + n) | `running` slices, switch in to switch out |
//! | 3 | `PET sampler` | `kperf-pet-sampling` (tid 1) | `PET_IDLE`, `PET_RUN`, `PET_SCHED`, `PET_ERROR` instants; `PET_SAMPLE`, `PET_SAMPLE_TASK`, `PET_SAMPLE_THREAD` slices |
//!
//! A `DBG_FUNC_START` record and the next `DBG_FUNC_END` record of the same
//! event on the same track become one complete (`X`) event; any other record
//! is an instant (`i`, thread scope): a start without an end (`TM_HNDLR` at
//! trace level 0) keeps its name, an end without a start is named
//! `"<name> end"`. kdebug ids other than the named ones are named by their
//! hex value.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;

use kperf::trace::{self as kt, DBG_FUNC_END, DBG_FUNC_START};
use serde_json::{json, Map, Value};

use super::trace::{TraceRecord, GUEST_DISPATCH, GUEST_SWITCH};

/// pid of the vCPU tracks.
pub const PID_VCPUS: u32 = 1;
/// pid of the guest thread tracks.
pub const PID_THREADS: u32 = 2;
/// pid of the PET sampler track.
pub const PID_PET: u32 = 3;
/// The guest-thread track of vCPU `n`'s idle context is `IDLE_TID_BASE + n`.
pub const IDLE_TID_BASE: u64 = 1_000_000;
/// The name of a guest dispatch slice.
pub const DISPATCH_NAME: &str = "clockintr dispatch";
/// The name of a guest context-switch instant.
pub const SWITCH_NAME: &str = "thread switch";
/// The name of a guest thread's slices on its track.
pub const RUNNING_NAME: &str = "running";

/// What the tracks are: the vCPUs and the guest's threads (tid, name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tracks {
    /// vCPUs in the VM.
    pub vcpus: u32,
    /// Guest threads from the guest's thread table: id and name.
    pub threads: Vec<(u64, String)>,
}

/// The name of event `id` (qualifier ignored).
pub fn event_name(id: u32) -> Cow<'static, str> {
    let name = match id & !0x3 {
        kt::TM_FIRE => "TM_FIRE",
        kt::TM_HNDLR => "TM_HNDLR",
        kt::PET_THREAD => "PET_THREAD",
        kt::PET_ERROR => "PET_ERROR",
        kt::PET_RUN => "PET_RUN",
        kt::PET_PAUSE => "PET_PAUSE",
        kt::PET_IDLE => "PET_IDLE",
        kt::PET_SAMPLE => "PET_SAMPLE",
        kt::PET_SCHED => "PET_SCHED",
        kt::PET_END => "PET_END",
        kt::PET_SAMPLE_TASK => "PET_SAMPLE_TASK",
        kt::PET_SAMPLE_THREAD => "PET_SAMPLE_THREAD",
        GUEST_DISPATCH => DISPATCH_NAME,
        GUEST_SWITCH => SWITCH_NAME,
        other => return format!("{other:#010x}").into(),
    };
    Cow::Borrowed(name)
}

/// The named arguments of a record of event `id`.
fn args_of(record: &TraceRecord) -> Map<String, Value> {
    let [a, b, c, d] = record.args;
    let mut args = match (record.id & !0x3, record.id & 0x3) {
        (kt::TM_FIRE, _) => json!({"timer": a, "pet": b, "period_ns": c, "action": d,
                                   "deadline_ns": record.deadline_ns}),
        (kt::TM_HNDLR, _) => json!({"timer": a, "flags": b}),
        (kt::PET_SCHED, _) => json!({"period_ns": a, "adjusted_period_ns": b,
                                     "sample_duration_ns": c, "deadline_ns": d}),
        (kt::PET_ERROR, _) => json!({"kind": a, "code": b}),
        (kt::PET_SAMPLE_THREAD, _) => json!({"thread": a, "dirty": b}),
        (kt::PET_SAMPLE_TASK, DBG_FUNC_END) => json!({"threads": a}),
        (kt::PET_SAMPLE, DBG_FUNC_END) => json!({"tasks": a}),
        (GUEST_DISPATCH, DBG_FUNC_START) => json!({"outcome": outcome_name(a)}),
        (GUEST_DISPATCH, _) => json!({"hardclock": a, "statclock": b,
                                      "outcome": outcome_name(c)}),
        (GUEST_SWITCH, _) => json!({"from": a, "to": b}),
        _ => json!({"args": [a, b, c, d]}),
    };
    let Value::Object(map) = &mut args else {
        unreachable!("every arm builds an object")
    };
    map.insert("tid".into(), record.tid.into());
    std::mem::take(map)
}

fn outcome_name(code: u64) -> &'static str {
    match code {
        0 => "prompt",
        1 => "early",
        2 => "spurious",
        _ => "unknown",
    }
}

/// The track a record goes on: (pid, tid).
fn track_of(record: &TraceRecord) -> (u32, u64) {
    if record.vcpu == u32::MAX {
        (PID_PET, 1)
    } else {
        (PID_VCPUS, u64::from(record.vcpu) + 1)
    }
}

/// The guest-thread track of thread `tid` running on vCPU `vcpu`.
fn thread_track(tid: u64, vcpu: u32) -> u64 {
    if tid == 0 {
        IDLE_TID_BASE + u64::from(vcpu)
    } else {
        tid
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// The `M` events naming a process (`tid` None) or a thread, and placing it.
fn metadata(pid: u32, tid: Option<u64>, name: &str, sort: u64) -> [Value; 2] {
    match tid {
        None => [
            json!({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}),
            json!({"name": "process_sort_index", "ph": "M", "pid": pid,
                   "args": {"sort_index": sort}}),
        ],
        Some(tid) => [
            json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                   "args": {"name": name}}),
            json!({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                   "args": {"sort_index": sort}}),
        ],
    }
}

/// An event on the timeline, compact until it is written (a `Value` tree of
/// millions of events would cost gigabytes; each is built as it is written).
struct Event {
    ts_ns: u64,
    /// `Some` for a complete (`X`) event.
    dur_ns: Option<u64>,
    name: Cow<'static, str>,
    track: (u32, u64),
    args: EventArgs,
}

/// Where an event's `args` come from.
enum EventArgs {
    /// One record's.
    Record(usize),
    /// A start record's, then its end record's.
    Pair(usize, usize),
    /// A `running` slice: the vCPU and the thread.
    Running { vcpu: u32, tid: u64 },
}

impl Event {
    fn instant(records: &[TraceRecord], i: usize, name: Cow<'static, str>) -> Self {
        Self {
            ts_ns: records[i].time_ns,
            dur_ns: None,
            name,
            track: track_of(&records[i]),
            args: EventArgs::Record(i),
        }
    }

    /// The JSON of this event.
    fn to_json(&self, records: &[TraceRecord]) -> Value {
        let args = match self.args {
            EventArgs::Record(i) => args_of(&records[i]),
            EventArgs::Pair(start, end) => {
                let mut args = args_of(&records[start]);
                args.extend(args_of(&records[end]));
                args
            }
            EventArgs::Running { vcpu, tid } => {
                Map::from_iter([("vcpu".into(), vcpu.into()), ("tid".into(), tid.into())])
            }
        };
        let (pid, tid) = self.track;
        let mut event = json!({"name": self.name, "ts": us(self.ts_ns), "pid": pid, "tid": tid,
                               "args": args});
        match self.dur_ns {
            Some(dur) => {
                event["ph"] = "X".into();
                event["dur"] = us(dur).into();
            }
            None => {
                event["ph"] = "i".into();
                event["s"] = "t".into();
            }
        }
        event
    }
}

/// The timeline's events from `records` (any order; sorted here by time,
/// ties in recording order). `end_ns` closes the slices still open (the
/// threads running when the run ended).
fn events(records: &[TraceRecord], end_ns: u64) -> Vec<Event> {
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by_key(|&i| records[i].time_ns);
    let mut out = Vec::with_capacity(records.len());
    // Open START records per (track, event), innermost last.
    let mut open: BTreeMap<((u32, u64), u32), Vec<usize>> = BTreeMap::new();
    // Per vCPU: the guest thread running since when.
    let mut running: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    let close_running = |out: &mut Vec<Event>, vcpu: u32, until: u64, (tid, since): (u64, u64)| {
        out.push(Event {
            ts_ns: since,
            dur_ns: Some(until.max(since) - since),
            name: Cow::Borrowed(RUNNING_NAME),
            track: (PID_THREADS, thread_track(tid, vcpu)),
            args: EventArgs::Running { vcpu, tid },
        });
    };
    for &i in &order {
        let r = &records[i];
        let base = r.id & !0x3;
        let track = track_of(r);
        if base == GUEST_SWITCH {
            if let Some(previous) = running.insert(r.vcpu, (r.args[1], r.time_ns)) {
                close_running(&mut out, r.vcpu, r.time_ns, previous);
            }
            out.push(Event::instant(records, i, event_name(r.id)));
            continue;
        }
        match r.id & 0x3 {
            DBG_FUNC_START => open.entry((track, base)).or_default().push(i),
            DBG_FUNC_END => match open.get_mut(&(track, base)).and_then(Vec::pop) {
                Some(s) => out.push(Event {
                    ts_ns: records[s].time_ns,
                    dur_ns: Some(r.time_ns - records[s].time_ns),
                    name: event_name(r.id),
                    track,
                    args: EventArgs::Pair(s, i),
                }),
                None => out.push(Event::instant(
                    records,
                    i,
                    format!("{} end", event_name(r.id)).into(),
                )),
            },
            _ => out.push(Event::instant(records, i, event_name(r.id))),
        }
    }
    for starts in open.into_values() {
        for s in starts {
            out.push(Event::instant(records, s, event_name(records[s].id)));
        }
    }
    for (vcpu, now) in running {
        close_running(&mut out, vcpu, end_ns, now);
    }
    // By time; at equal times the longer slice first, so that slices nest.
    out.sort_by(|a, b| {
        a.ts_ns
            .cmp(&b.ts_ns)
            .then(b.dur_ns.unwrap_or(0).cmp(&a.dur_ns.unwrap_or(0)))
    });
    out
}

/// The `M` events naming the processes and their tracks.
fn metadata_events(tracks: &Tracks, thread_ids: &[u64]) -> Vec<Value> {
    let mut out = Vec::new();
    out.extend(metadata(PID_VCPUS, None, "vCPUs", 0));
    for n in 0..tracks.vcpus {
        let tid = u64::from(n) + 1;
        out.extend(metadata(PID_VCPUS, Some(tid), &format!("vCPU {n}"), tid));
    }
    out.extend(metadata(PID_THREADS, None, "guest threads", 1));
    let names: BTreeMap<u64, &str> = tracks
        .threads
        .iter()
        .map(|(tid, name)| (*tid, name.as_str()))
        .collect();
    let mut tids: Vec<u64> = tracks.threads.iter().map(|(tid, _)| *tid).collect();
    tids.extend(thread_ids);
    tids.extend((0..tracks.vcpus).map(|n| IDLE_TID_BASE + u64::from(n)));
    tids.sort_unstable();
    tids.dedup();
    for tid in tids {
        let name = if tid >= IDLE_TID_BASE {
            format!("idle (vCPU {})", tid - IDLE_TID_BASE)
        } else {
            names
                .get(&tid)
                .map_or_else(|| format!("thread {tid}"), |n| format!("{n} ({tid})"))
        };
        out.extend(metadata(PID_THREADS, Some(tid), &name, tid));
    }
    out.extend(metadata(PID_PET, None, "PET sampler", 2));
    out.extend(metadata(PID_PET, Some(1), "kperf-pet-sampling", 1));
    out
}

/// Writes `records` to `out` as Chrome trace-event JSON (see the module
/// docs), with a track for every vCPU and guest thread of `tracks`; slices
/// still open at `end_ns` (device time) end there.
pub fn write_chrome(
    records: &[TraceRecord],
    tracks: &Tracks,
    end_ns: u64,
    out: impl Write,
) -> std::io::Result<()> {
    let timeline = events(records, end_ns);
    let thread_ids: Vec<u64> = records
        .iter()
        .filter(|r| r.id & !0x3 == GUEST_SWITCH)
        .flat_map(|r| [r.args[0], r.args[1]])
        .filter(|&tid| tid != 0 && tid < IDLE_TID_BASE)
        .collect();
    let mut out = std::io::BufWriter::new(out);
    // One event at a time: `{"traceEvents":[e,e,...],"displayTimeUnit":"ns"}`.
    out.write_all(b"{\"traceEvents\":[")?;
    let metadata = metadata_events(tracks, &thread_ids);
    let all = metadata
        .into_iter()
        .chain(timeline.iter().map(|e| e.to_json(records)));
    for (n, event) in all.enumerate() {
        if n > 0 {
            out.write_all(b",")?;
        }
        serde_json::to_writer(&mut out, &event)?;
    }
    out.write_all(b"],\"displayTimeUnit\":\"ns\"}")?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(time_ns: u64, id: u32, vcpu: u32, tid: u64, args: [u64; 4]) -> TraceRecord {
        TraceRecord {
            time_ns,
            id,
            vcpu,
            tid,
            args,
            deadline_ns: 0,
        }
    }

    fn chrome(records: &[TraceRecord], end_ns: u64) -> Value {
        let tracks = Tracks {
            vcpus: 2,
            threads: vec![(1, "worker".into()), (2, "sleeper".into())],
        };
        let mut out = Vec::new();
        write_chrome(records, &tracks, end_ns, &mut out).unwrap();
        serde_json::from_slice(&out).expect("valid JSON")
    }

    fn named<'a>(trace: &'a Value, name: &str) -> Vec<&'a Value> {
        trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == name)
            .collect()
    }

    #[test]
    fn test_metadata_names_every_process_and_track() {
        let trace = chrome(&[], 0);
        assert_eq!(trace["displayTimeUnit"], "ns");
        let processes: Vec<&Value> = named(&trace, "process_name")
            .into_iter()
            .map(|e| &e["args"]["name"])
            .collect();
        assert_eq!(processes, ["vCPUs", "guest threads", "PET sampler"]);
        let threads: Vec<(u64, u64, String)> = named(&trace, "thread_name")
            .into_iter()
            .map(|e| {
                (
                    e["pid"].as_u64().unwrap(),
                    e["tid"].as_u64().unwrap(),
                    e["args"]["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            threads,
            [
                (1, 1, "vCPU 0".to_string()),
                (1, 2, "vCPU 1".to_string()),
                (2, 1, "worker (1)".to_string()),
                (2, 2, "sleeper (2)".to_string()),
                (2, IDLE_TID_BASE, "idle (vCPU 0)".to_string()),
                (2, IDLE_TID_BASE + 1, "idle (vCPU 1)".to_string()),
                (3, 1, "kperf-pet-sampling".to_string()),
            ]
        );
        assert!(trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["ph"] == "M"));
    }

    #[test]
    fn test_start_and_end_pair_per_track_into_complete_events() {
        let hndlr = kt::TM_HNDLR;
        let records = [
            // Recorded out of time order: the guest's are drained late.
            rec(5_000, hndlr | DBG_FUNC_START, 0, 1, [0, 1, 0, 0]),
            rec(2_000, GUEST_DISPATCH | DBG_FUNC_START, 0, 1, [0; 4]),
            rec(9_000, GUEST_DISPATCH | DBG_FUNC_END, 0, 1, [1, 2, 0, 0]),
            rec(5_500, hndlr | DBG_FUNC_START, 1, 0, [0, 1, 0, 0]),
            rec(6_000, hndlr | DBG_FUNC_END, 0, 1, [0, 1, 0, 0]),
            rec(6_500, hndlr | DBG_FUNC_END, 1, 0, [0, 1, 0, 0]),
            rec(4_000, kt::TM_FIRE, 0, 1, [0, 0, 1_000_000, 1]),
            rec(7_000, hndlr | DBG_FUNC_END, 1, 0, [0; 4]),
        ];
        let trace = chrome(&records, 10_000);
        let slices = named(&trace, "TM_HNDLR");
        assert_eq!(slices.len(), 2);
        for (slice, (tid, ts, dur)) in slices.iter().zip([(1, 5.0, 1.0), (2, 5.5, 1.0)]) {
            assert_eq!(slice["ph"], "X");
            assert_eq!(slice["pid"], PID_VCPUS);
            assert_eq!(slice["tid"], tid);
            assert_eq!(
                (slice["ts"].as_f64(), slice["dur"].as_f64()),
                (Some(ts), Some(dur))
            );
        }
        let dispatch = named(&trace, DISPATCH_NAME);
        assert_eq!(dispatch.len(), 1);
        assert_eq!(dispatch[0]["dur"].as_f64(), Some(7.0));
        assert_eq!(dispatch[0]["args"]["hardclock"], 1);
        assert_eq!(dispatch[0]["args"]["outcome"], "prompt");
        // The end without a start stays, as an instant.
        let stray = named(&trace, "TM_HNDLR end");
        assert_eq!((stray.len(), &stray[0]["ph"]), (1, &json!("i")));
        let fire = named(&trace, "TM_FIRE");
        assert_eq!((&fire[0]["ph"], &fire[0]["s"]), (&json!("i"), &json!("t")));
        assert_eq!(fire[0]["args"]["period_ns"], 1_000_000);
        // Events come out in time order, the longer slice first at a tie.
        let ts: Vec<f64> = trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["ts"].as_f64())
            .collect();
        assert!(ts.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn test_switches_are_instants_and_running_slices_per_thread() {
        let records = [
            rec(1_000, GUEST_SWITCH, 0, 1, [0, 1, 0, 0]),
            rec(3_000, GUEST_SWITCH, 0, 2, [1, 2, 0, 0]),
            rec(4_000, GUEST_SWITCH, 0, 0, [2, 0, 0, 0]),
            rec(2_000, GUEST_SWITCH, 1, 7, [0, 7, 0, 0]),
        ];
        let trace = chrome(&records, 10_000);
        let switches = named(&trace, SWITCH_NAME);
        assert_eq!(switches.len(), 4);
        assert!(switches
            .iter()
            .all(|s| s["ph"] == "i" && s["pid"] == PID_VCPUS));
        let running: Vec<(u64, f64, f64)> = named(&trace, RUNNING_NAME)
            .into_iter()
            .map(|e| {
                assert_eq!(e["pid"], PID_THREADS);
                (
                    e["tid"].as_u64().unwrap(),
                    e["ts"].as_f64().unwrap(),
                    e["dur"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            running,
            [
                (1, 1.0, 2.0),
                (7, 2.0, 8.0),
                (2, 3.0, 1.0),
                (IDLE_TID_BASE, 4.0, 6.0)
            ]
        );
        // A thread seen only in a switch still gets a named track.
        assert!(named(&trace, "thread_name")
            .iter()
            .any(|e| e["tid"] == 7 && e["args"]["name"] == "thread 7"));
    }

    #[test]
    fn test_pet_records_go_on_the_pet_track() {
        let records = [
            rec(1_000, kt::PET_SAMPLE | DBG_FUNC_START, u32::MAX, 0, [0; 4]),
            rec(
                1_100,
                kt::PET_SAMPLE_THREAD | DBG_FUNC_START,
                u32::MAX,
                3,
                [3, 1, 0, 0],
            ),
            rec(
                1_100,
                kt::PET_SAMPLE_THREAD | DBG_FUNC_END,
                u32::MAX,
                3,
                [3, 1, 0, 0],
            ),
            rec(
                1_200,
                kt::PET_SAMPLE | DBG_FUNC_END,
                u32::MAX,
                0,
                [1, 0, 0, 0],
            ),
            rec(1_300, kt::PET_SCHED, u32::MAX, 0, [10, 9, 1, 20]),
        ];
        let trace = chrome(&records, 2_000);
        for name in ["PET_SAMPLE", "PET_SAMPLE_THREAD", "PET_SCHED"] {
            let e = named(&trace, name);
            assert_eq!(e.len(), 1, "{name}");
            assert_eq!((&e[0]["pid"], &e[0]["tid"]), (&json!(PID_PET), &json!(1)));
        }
        assert_eq!(named(&trace, "PET_SAMPLE")[0]["args"]["tasks"], 1);
        assert_eq!(named(&trace, "PET_SAMPLE_THREAD")[0]["args"]["thread"], 3);
        assert_eq!(named(&trace, "PET_SCHED")[0]["ph"], "i");
    }
}
