//! The trace: kdebug-style records kept in memory while the VM runs and
//! written at the end as JSON lines or as Chrome trace-event JSON
//! ([`super::chrome`]).
//!
//! The records are kperf's (`PERF_TM_FIRE`, `PERF_TM_HNDLR`, the PET
//! sampler's `PERF_PET_*`, [`kperf::trace`]) and the guest's own, drained from
//! its per-vCPU event rings ([`super::guest_events`]): [`GUEST_DISPATCH`] and
//! [`GUEST_SWITCH`]. kperf's are appended as they happen; the guest's when
//! drained, so the buffer is in time order per source, not overall.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use metronome_abi::{layout, VcpuShared};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Trace records kept at most; later ones are counted as dropped.
pub const TRACE_LIMIT: usize = 1_000_000;
/// Records a snapshot copies per hold of the buffer's lock, so that a
/// snapshot of a full buffer never keeps a recording vCPU waiting for long.
const SNAPSHOT_CHUNK: usize = 16_384;

/// kdebug class `DBG_MACH`.
const DBG_MACH: u8 = 1;
/// `DBG_MACH_EXCP_DECI`: XNU's timer-interrupt subclass (its `DECR_TRAP`).
const DBG_MACH_EXCP_DECI: u8 = 0x09;
/// `DBG_MACH_SCHED`: XNU's scheduler subclass (its `MACH_SCHED` switch event).
const DBG_MACH_SCHED: u8 = 0x40;

/// A guest clockintr dispatch (`0x01090000`, as XNU's `DECR_TRAP`): a
/// `DBG_FUNC_START` record at the uptime the dispatch cached at entry, args
/// (outcome: 0 prompt, 1 early, 2 spurious), and a `DBG_FUNC_END` record at
/// its last cached uptime, args (hardclock calls, statclock calls, outcome).
/// `tid` is the thread it interrupted (0 = idle). Data level.
pub const GUEST_DISPATCH: u32 =
    kperf::trace::kdebug_id(DBG_MACH, DBG_MACH_EXCP_DECI, 0, kperf::trace::DBG_FUNC_NONE);
/// A guest context switch (`0x01400000`, as XNU's `MACH_SCHED`): args (thread
/// switched out, thread switched in; 0 = idle); `tid` is the one switched
/// in. Data level.
pub const GUEST_SWITCH: u32 =
    kperf::trace::kdebug_id(DBG_MACH, DBG_MACH_SCHED, 0, kperf::trace::DBG_FUNC_NONE);

/// The guest thread current on vCPU `id`, from its shared page (0 = idle, or
/// the page unreadable): one 4-byte read of guest memory.
pub fn current_tid(mem: &GuestMemoryMmap, id: u32) -> u64 {
    let at = layout::percpu_region(id)
        + layout::PERCPU_SHARED
        + std::mem::offset_of!(VcpuShared, current_tid) as u64;
    mem.read_obj::<u32>(GuestAddress(at)).map_or(0, u64::from)
}

/// One kdebug-style trace record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceRecord {
    /// Device time, ns.
    pub time_ns: u64,
    /// Event id ([`kperf::trace`]), with its `DBG_FUNC_*` qualifier.
    pub id: u32,
    /// The vCPU that recorded it; `u32::MAX` for the PET sampler thread.
    pub vcpu: u32,
    /// The guest thread current on that vCPU when recorded (0 = idle); for
    /// `PET_SAMPLE_THREAD`, the thread sampled; 0 for the PET sampler's other
    /// records.
    pub tid: u64,
    /// Arguments.
    pub args: [u64; 4],
    /// For `PERF_TM_FIRE`: the deadline that fired (so readers can take the
    /// host's delivery latency out of the spacing); 0 otherwise.
    pub deadline_ns: u64,
}

/// The trace buffer: bounded, in recording order (which is the order of
/// TR-P-5: a fire's `PERF_TM_FIRE` precedes every handler answering it).
#[derive(Debug, Default)]
pub struct TraceBuffer {
    records: Mutex<Vec<TraceRecord>>,
    dropped: AtomicU64,
}

impl TraceBuffer {
    /// Appends a record, or counts it as dropped when the buffer is full.
    pub fn record(&self, record: TraceRecord) {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() < TRACE_LIMIT {
            records.push(record);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Appends `records` under one lock, counting those past the limit.
    pub fn record_all(&self, records: impl IntoIterator<Item = TraceRecord>) {
        let mut kept = self.records.lock().unwrap_or_else(|p| p.into_inner());
        for record in records {
            if kept.len() < TRACE_LIMIT {
                kept.push(record);
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records not kept.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Copies every record kept so far and leaves them: the lock is taken
    /// once per 16384 records, so recording goes on between
    /// chunks (records only arrive at the end, so the copy is the buffer as
    /// it was at some moment, plus perhaps some later records).
    pub fn snapshot(&self) -> Vec<TraceRecord> {
        let mut copy = Vec::new();
        loop {
            let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
            let from = copy.len();
            let to = records.len().min(from + SNAPSHOT_CHUNK);
            if from >= to {
                return copy;
            }
            copy.extend_from_slice(&records[from..to]);
        }
    }

    /// Takes every record kept so far.
    pub fn take(&self) -> Vec<TraceRecord> {
        std::mem::take(&mut *self.records.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Writes `trace` to `out` as JSON lines, one record a line:
/// `{"t":..,"id":..,"vcpu":..,"tid":..,"args":[..4],"deadline":..}`.
pub fn write_json_lines(trace: &[TraceRecord], out: impl Write) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(out);
    for r in trace {
        let [a, b, c, d] = r.args;
        writeln!(
            out,
            "{{\"t\":{},\"id\":{},\"vcpu\":{},\"tid\":{},\"args\":[{a},{b},{c},{d}],\"deadline\":{}}}",
            r.time_ns, r.id, r.vcpu, r.tid, r.deadline_ns
        )?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_trace_lines_are_json_in_recording_order() {
        let buffer = TraceBuffer::default();
        for t in [5, 3] {
            buffer.record(TraceRecord {
                time_ns: t,
                id: kperf::trace::TM_FIRE,
                vcpu: 1,
                args: [1, 2, 3, 4],
                deadline_ns: 2,
                ..Default::default()
            });
        }
        let mut out = Vec::new();
        write_json_lines(&buffer.take(), &mut out).unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["t"], 5);
        assert_eq!(lines[1]["t"], 3);
        assert_eq!(lines[0]["args"][3], 4);
        assert_eq!(lines[0]["id"], kperf::trace::TM_FIRE);
        assert!(buffer.take().is_empty());
        assert_eq!(buffer.dropped(), 0);
    }

    #[test]
    fn test_a_snapshot_copies_in_chunks_and_does_not_take() {
        let buffer = TraceBuffer::default();
        assert!(buffer.snapshot().is_empty());
        let n = SNAPSHOT_CHUNK * 2 + 3;
        buffer.record_all((0..n as u64).map(|t| TraceRecord {
            time_ns: t,
            ..Default::default()
        }));
        let copy = buffer.snapshot();
        assert_eq!(copy.len(), n);
        assert!(copy.iter().enumerate().all(|(i, r)| r.time_ns == i as u64));
        assert_eq!(buffer.snapshot(), copy);
        assert_eq!(buffer.take(), copy);
    }
}
