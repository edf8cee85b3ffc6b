//! What each kperf sampler other than the call stacks captures in this VM
//! ([`SamplerData`], attached to every [`super::RawSample`]), its trace
//! records, and the run's totals.
//!
//! The guest is one task (pid [`GUEST_PID`]) whose threads the guest kernel
//! publishes in its thread table ([`ThreadInfo`], AMB-9); the current thread
//! of a vCPU is the one its shared page names. What each sampler takes:
//!
//! | sampler | source | record (TR-P-4 order) |
//! |---|---|---|
//! | `sys_mem` (leader only, KT-SM-1) | the VMM process: `/proc/self/statm`; guest RAM | `MI_SYS_DATA` |
//! | `th_info` | the thread table: tid, state as CFG-A-6's run mode, owning vCPU | `TI_DATA` |
//! | `th_scheduling` | the guest's own accounting: statclock ticks by state, priority, estcpu | `TI_SCHEDDATA_2` |
//! | `th_snapshot` | the thread table: state, vCPU, context switches onto it, how it last entered the kernel | `TI_SNAPDATA` |
//! | `th_inscyc` | guest-only host PMU counters of the vCPU thread | `TI_INSCYCDATA` |
//! | `tk_snapshot` | uptime, context switches and statclock ticks of every thread | `TK_SNAP_DATA` |
//! | `tk_info` | pid, threads created and alive, vCPUs | `TK_INFO_DATA` |
//! | `meminfo` | guest memory handed out: boot pages and kernel image, per-vCPU regions, thread stacks | `MI_DATA` |
//! | `pmc_config`, `pmc_thread`, `pmc_cpu` | the counters' events; guest-only counters of the vCPU thread (a vCPU is a CPU) | `KPC_CONFIG`, `KPC_DATA_THREAD`, `KPC_DATA` |
//!
//! The guest keeps no per-thread timestamps (one would put a clock read on
//! the context-switch path, interpreted CPL0 code), so `th_snapshot` tells
//! how often a thread ran (its context switches) rather than when it last
//! did. `meminfo` derives the heap in use from the highest thread stack in
//! the table: thread stacks are the guest heap's only allocations.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use kperf::{sampler, trace};
use metronome_abi::{layout, thread_state, BootInfo, ThreadInfo, VcpuShared, MAX_THREADS};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::capture::RawSample;
use super::trace::TraceRecord;
use crate::guestmem::{read_plain, read_plain_slice};
use crate::summary::MemoryFigures;

/// The guest's pid in the records: the guest is one task.
pub const GUEST_PID: u64 = 1;

/// The PMC samplers: taken only where the host counts guest events.
const PMC: u32 = sampler::PMC_THREAD | sampler::PMC_CPU | sampler::TH_INSCYC;

/// `th_info`: the thread-info record (CFG-A-6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadInfoRecord {
    /// [`GUEST_PID`].
    pub pid: u64,
    /// Thread id (0: the vCPU's idle context).
    pub tid: u64,
    /// State bits in the low 16 bits, their complement in the high 16
    /// (CFG-A-6; the guest's [`thread_state`] values are XNU's bits).
    pub runmode: u64,
    /// The vCPU that owns the thread.
    pub vcpu: u64,
}

/// `th_scheduling`: the guest scheduler's accounting of the thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadSchedulingRecord {
    /// Statclock ticks in user mode.
    pub user_ticks: u64,
    /// Statclock ticks in the kernel on its behalf.
    pub system_ticks: u64,
    /// Statclock ticks in interrupt context while it was current.
    pub interrupt_ticks: u64,
    /// Priority recomputed by schedclock.
    pub priority: u64,
    /// Estimated CPU use (estcpu).
    pub estcpu: u64,
}

/// `th_snapshot`: the thread's scheduling state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadSnapshotRecord {
    /// Run mode, as [`ThreadInfoRecord::runmode`].
    pub runmode: u64,
    /// The vCPU that owns the thread.
    pub vcpu: u64,
    /// Context switches onto it.
    pub switches: u64,
    /// The vector through which it last entered the kernel before a switch
    /// away: 3 (the system-call door: it blocked or yielded), the timer's
    /// (preempted), 0 (never switched away).
    pub last_entry_vector: u64,
}

/// `tk_snapshot`: the guest as one task, its activity so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskSnapshotRecord {
    /// Guest uptime, ns (the device clock at the sample).
    pub uptime_ns: u64,
    /// Context switches onto the guest's threads.
    pub context_switches: u64,
    /// Statclock ticks of its threads in user mode.
    pub user_ticks: u64,
    /// Statclock ticks of its threads in the kernel and interrupts.
    pub system_ticks: u64,
}

/// `tk_info`: the guest as one task, its shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskInfoRecord {
    /// [`GUEST_PID`].
    pub pid: u64,
    /// Threads created (thread-table slots in use).
    pub threads: u64,
    /// Of those, threads that have not exited.
    pub alive: u64,
    /// vCPUs.
    pub vcpus: u64,
}

/// `meminfo`: guest memory in use, as the guest kernel publishes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemInfoRecord {
    /// Bytes handed out: everything up to the end of the kernel image, the
    /// per-vCPU regions, and the heap up to the highest thread stack.
    pub in_use_bytes: u64,
    /// Of those, the heap's (thread stacks).
    pub heap_bytes: u64,
    /// Guest RAM.
    pub ram_bytes: u64,
}

/// `sys_mem`: memory of the system the guest runs on: the VMM process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SysMemRecord {
    /// The VMM's resident memory (`/proc/self/statm`), bytes.
    pub vmm_resident_bytes: u64,
    /// The VMM's virtual memory, bytes.
    pub vmm_virtual_bytes: u64,
    /// Guest RAM the VMM maps, bytes.
    pub guest_ram_bytes: u64,
}

/// Guest-only hardware counters of the vCPU thread, so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Guest instructions retired.
    pub instructions: u64,
    /// Guest cycles.
    pub cycles: u64,
}

/// What the samplers of one sample captured; `None` for a sampler not
/// asked for (or, for the PMC samplers, a host that cannot count).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SamplerData {
    /// The sampler bits this sample took (the action's, reduced by the
    /// sample's flags, KT-SM-4).
    pub sampled: u32,
    /// `th_info`.
    pub th_info: Option<ThreadInfoRecord>,
    /// `th_scheduling`.
    pub th_scheduling: Option<ThreadSchedulingRecord>,
    /// `th_snapshot`.
    pub th_snapshot: Option<ThreadSnapshotRecord>,
    /// `th_inscyc`.
    pub th_inscyc: Option<Counters>,
    /// `tk_snapshot`.
    pub tk_snapshot: Option<TaskSnapshotRecord>,
    /// `tk_info`.
    pub tk_info: Option<TaskInfoRecord>,
    /// `meminfo`.
    pub meminfo: Option<MemInfoRecord>,
    /// `sys_mem`.
    pub sys_mem: Option<SysMemRecord>,
    /// `pmc_config`: the events counted, [`crate::pmu::EVENTS`].
    pub pmc_config: bool,
    /// `pmc_thread` or `pmc_cpu`.
    pub pmc: Option<Counters>,
}

/// CFG-A-6's run mode of a [`thread_state`].
fn runmode(state: u64) -> u64 {
    let bits = state & 0xffff;
    bits | (!bits & 0xffff) << 16
}

/// The guest's thread table, read from its page in one copy (unused slots
/// included).
pub(super) fn thread_table(mem: &GuestMemoryMmap) -> Vec<ThreadInfo> {
    read_plain_slice(mem, GuestAddress(layout::THREAD_TABLE), MAX_THREADS).unwrap_or_default()
}

/// Whether the thread-table entry `info` in slot `slot` of a guest with
/// `vcpus` vCPUs is one the guest kernel could have written (a used slot:
/// `tid` not 0): its thread id is the slot's (`slot + 1`), its vCPU exists,
/// its state is a [`thread_state`] a thread can be in, and its stack does
/// not end below its start. The guest owns the table, so a hostile guest can
/// write anything there; an entry that fails is left out, not believed.
pub fn entry_is_sane(slot: usize, info: &ThreadInfo, vcpus: usize) -> bool {
    const STATES: [u32; 4] = [
        thread_state::RUNNING,
        thread_state::RUNNABLE,
        thread_state::WAITING,
        thread_state::EXITED,
    ];
    (slot as u64).checked_add(1) == Some(info.tid)
        && info.vcpu < vcpus as u64
        && u32::try_from(info.state).is_ok_and(|s| STATES.contains(&s))
        && info.stack_lo <= info.stack_hi
}

/// The name the guest gives its idle context.
const IDLE_NAME: [u8; 16] = *b"idle\0\0\0\0\0\0\0\0\0\0\0\0";

/// The thread-table entry of vCPU `vcpu`'s current thread (`page`): its
/// slot when it holds that thread; for the idle context (or a slot that
/// does not match) what the page says, without counters.
///
/// The name is the table's, or `idle` for tid 0, never the page's for a
/// thread the table knows: the guest publishes a switch in the page field by
/// field (tid, state, name), and a sample can stop it between two of them
/// (the host stops a vCPU at any instruction, interrupts masked or not), so
/// the page's name can still be the previous thread's.
pub fn current_thread(mem: &GuestMemoryMmap, vcpu: u32, page: &VcpuShared) -> ThreadInfo {
    let tid = u64::from(page.current_tid);
    let slot = (tid as usize).wrapping_sub(1);
    let offset = (slot.min(MAX_THREADS) * std::mem::size_of::<ThreadInfo>()) as u64;
    let entry: Option<ThreadInfo> = (slot < MAX_THREADS)
        .then(|| read_plain(mem, GuestAddress(layout::THREAD_TABLE + offset)))
        .flatten();
    entry
        .filter(|t| t.tid == tid && tid != 0)
        .unwrap_or(ThreadInfo {
            tid,
            vcpu: u64::from(vcpu),
            state: u64::from(page.current_state),
            name: if tid == 0 {
                IDLE_NAME
            } else {
                page.current_name
            },
            ..ThreadInfo::default()
        })
}

/// The host's page size.
fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the system; no memory is passed.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(size).unwrap_or(4096)
    })
}

thread_local! {
    /// `/proc/self/statm`, opened once per sampling thread and re-read in
    /// place (an open and a close per sample cost more than the read).
    static STATM: Option<std::fs::File> = std::fs::File::open("/proc/self/statm").ok();
}

/// Opens the calling thread's `/proc/self/statm` now: a sampling thread
/// does before its seccomp filter, which has no `open`.
pub fn open_statm() {
    STATM.with(|_| ());
}

/// The VMM's (virtual, resident) bytes from `/proc/self/statm`.
fn vmm_memory() -> (u64, u64) {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 128];
    let len = STATM.with(|statm| {
        statm
            .as_ref()
            .and_then(|f| f.read_at(&mut buf, 0).ok())
            .unwrap_or(0)
    });
    let statm = std::str::from_utf8(&buf[..len]).unwrap_or_default();
    let mut pages = statm
        .split_whitespace()
        .map(|n| n.parse::<u64>().unwrap_or(0));
    let size = pages.next().unwrap_or(0);
    let resident = pages.next().unwrap_or(0);
    (size * page_size(), resident * page_size())
}

/// Captures the samplers of `sampled` other than the call stacks, for
/// `thread` ([`current_thread`] for an on-CPU sample), at device time
/// `time_ns`. `pmc` is the vCPU thread's guest counters for an on-CPU
/// sample ([`crate::pmu::read_current_thread`]), `None` otherwise.
pub fn gather(
    mem: &GuestMemoryMmap,
    time_ns: u64,
    thread: &ThreadInfo,
    sampled: u32,
    pmc: Option<[u64; 2]>,
) -> SamplerData {
    let wants = |bit: u32| sampled & bit != 0;
    let mut data = SamplerData {
        sampled,
        ..SamplerData::default()
    };
    if wants(sampler::TH_INFO) {
        data.th_info = Some(ThreadInfoRecord {
            pid: GUEST_PID,
            tid: thread.tid,
            runmode: runmode(thread.state),
            vcpu: thread.vcpu,
        });
    }
    if wants(sampler::TH_SCHEDULING) {
        data.th_scheduling = Some(ThreadSchedulingRecord {
            user_ticks: thread.user_ticks,
            system_ticks: thread.sys_ticks,
            interrupt_ticks: thread.intr_ticks,
            priority: thread.priority,
            estcpu: thread.estcpu,
        });
    }
    if wants(sampler::TH_SNAPSHOT) {
        data.th_snapshot = Some(ThreadSnapshotRecord {
            runmode: runmode(thread.state),
            vcpu: thread.vcpu,
            switches: thread.switches,
            last_entry_vector: thread.saved_vector,
        });
    }
    let counters = pmc.map(|[instructions, cycles]| Counters {
        instructions,
        cycles,
    });
    if wants(sampler::TH_INSCYC) {
        data.th_inscyc = counters;
    }
    if wants(sampler::PMC_THREAD | sampler::PMC_CPU) {
        data.pmc = counters;
    }
    data.pmc_config = wants(sampler::PMC_CONFIG) && pmc.is_some();
    if wants(sampler::TASK_MASK) {
        task(mem, time_ns, sampled, &mut data);
    }
    if wants(sampler::SYS_MEM) {
        let (virtual_bytes, resident) = vmm_memory();
        data.sys_mem = Some(SysMemRecord {
            vmm_resident_bytes: resident,
            vmm_virtual_bytes: virtual_bytes,
            guest_ram_bytes: mem.iter().map(|r| r.len()).sum(),
        });
    }
    data
}

/// The task samplers (`tk_snapshot`, `tk_info`, `meminfo`), from one read of
/// the thread table and the boot-information block.
fn task(mem: &GuestMemoryMmap, time_ns: u64, sampled: u32, data: &mut SamplerData) {
    let table = thread_table(mem);
    let threads = table.iter().filter(|t| t.tid != 0);
    let boot: BootInfo = read_plain(mem, GuestAddress(layout::BOOT_INFO)).unwrap_or_default();
    if sampled & sampler::TK_SNAPSHOT != 0 {
        let mut snapshot = TaskSnapshotRecord {
            uptime_ns: time_ns,
            ..TaskSnapshotRecord::default()
        };
        for t in threads.clone() {
            // Guest-written counters: saturate rather than overflow.
            snapshot.context_switches = snapshot.context_switches.saturating_add(t.switches);
            snapshot.user_ticks = snapshot.user_ticks.saturating_add(t.user_ticks);
            snapshot.system_ticks = snapshot
                .system_ticks
                .saturating_add(t.sys_ticks.saturating_add(t.intr_ticks));
        }
        data.tk_snapshot = Some(snapshot);
    }
    if sampled & sampler::TK_INFO != 0 {
        data.tk_info = Some(TaskInfoRecord {
            pid: GUEST_PID,
            threads: threads.clone().count() as u64,
            alive: threads
                .clone()
                .filter(|t| t.state != u64::from(thread_state::EXITED))
                .count() as u64,
            vcpus: u64::from(boot.vcpu_count),
        });
    }
    if sampled & sampler::MEMINFO != 0 {
        let heap_top = threads.map(|t| t.stack_hi).max().unwrap_or(0);
        let heap_bytes = heap_top.saturating_sub(layout::HEAP_BASE);
        let percpu = u64::from(boot.vcpu_count) * layout::PERCPU_STRIDE;
        data.meminfo = Some(MemInfoRecord {
            in_use_bytes: boot
                .kernel_end
                .min(layout::KERNEL_LIMIT)
                .saturating_add(percpu)
                .saturating_add(heap_bytes),
            heap_bytes,
            ram_bytes: boot.mem_bytes,
        });
    }
}

impl SamplerData {
    /// The sample's records, in TR-P-4's order: system memory, thread info,
    /// scheduling, snapshot, inscyc, task snapshot, task info, meminfo, PMC
    /// configuration, PMC counters. `raw` gives the time, vCPU and thread.
    pub fn trace_records(&self, raw: &RawSample) -> Vec<TraceRecord> {
        let record = |id: u32, args: [u64; 4]| TraceRecord {
            time_ns: raw.time_ns,
            id,
            vcpu: raw.vcpu,
            tid: raw.tid,
            args,
            deadline_ns: 0,
        };
        let mut records = Vec::new();
        if let Some(m) = self.sys_mem {
            let args = [
                m.vmm_resident_bytes,
                m.vmm_virtual_bytes,
                m.guest_ram_bytes,
                0,
            ];
            records.push(record(trace::MI_SYS_DATA, args));
        }
        if let Some(t) = self.th_info {
            // CFG-A-6: (pid, tid, dispatch queue: none, run mode).
            records.push(record(trace::TI_DATA, [t.pid, t.tid, 0, t.runmode]));
        }
        if let Some(s) = self.th_scheduling {
            let args = [
                s.user_ticks,
                s.system_ticks,
                s.interrupt_ticks,
                s.priority << 32 | (s.estcpu & 0xffff_ffff),
            ];
            records.push(record(trace::TI_SCHEDDATA_2, args));
        }
        if let Some(s) = self.th_snapshot {
            let args = [s.runmode, s.vcpu, s.switches, s.last_entry_vector];
            records.push(record(trace::TI_SNAPDATA, args));
        }
        if let Some(c) = self.th_inscyc {
            records.push(record(
                trace::TI_INSCYCDATA,
                [c.instructions, c.cycles, 0, 0],
            ));
        }
        if let Some(t) = self.tk_snapshot {
            let args = [
                t.uptime_ns,
                t.context_switches,
                t.user_ticks,
                t.system_ticks,
            ];
            records.push(record(trace::TK_SNAP_DATA, args));
        }
        if let Some(t) = self.tk_info {
            records.push(record(
                trace::TK_INFO_DATA,
                [t.pid, t.threads, t.alive, t.vcpus],
            ));
        }
        if let Some(m) = self.meminfo {
            let args = [m.in_use_bytes, m.heap_bytes, m.ram_bytes, 0];
            records.push(record(trace::MI_DATA, args));
        }
        if self.pmc_config {
            let [(first, _), (second, _)] = crate::pmu::EVENTS;
            records.push(record(trace::KPC_CONFIG, [2, first, second, 0]));
        }
        if let Some(c) = self.pmc {
            let id = if self.sampled & sampler::PMC_CPU != 0 {
                trace::KPC_DATA
            } else {
                trace::KPC_DATA_THREAD
            };
            records.push(record(id, [2, c.instructions, c.cycles, 0]));
        }
        records
    }

    /// The names of the samplers whose data `raw` holds (call stacks: a
    /// stack with at least one frame).
    pub fn captured(&self, raw: &RawSample) -> Vec<&'static str> {
        let stack = |bit: u32, frames: &[u64]| self.sampled & bit != 0 && !frames.is_empty();
        let held = [
            (sampler::TH_INFO, self.th_info.is_some()),
            (sampler::TH_SNAPSHOT, self.th_snapshot.is_some()),
            (
                sampler::KSTACK,
                stack(sampler::KSTACK, &raw.kernel_stack.frames),
            ),
            (
                sampler::USTACK,
                stack(sampler::USTACK, &raw.user_stack.frames),
            ),
            (
                sampler::PMC_THREAD,
                self.pmc.is_some() && self.sampled & sampler::PMC_THREAD != 0,
            ),
            (
                sampler::PMC_CPU,
                self.pmc.is_some() && self.sampled & sampler::PMC_CPU != 0,
            ),
            (sampler::PMC_CONFIG, self.pmc_config),
            (sampler::MEMINFO, self.meminfo.is_some()),
            (sampler::TH_SCHEDULING, self.th_scheduling.is_some()),
            (sampler::TK_SNAPSHOT, self.tk_snapshot.is_some()),
            (sampler::SYS_MEM, self.sys_mem.is_some()),
            (sampler::TH_INSCYC, self.th_inscyc.is_some()),
            (sampler::TK_INFO, self.tk_info.is_some()),
        ];
        sampler::NAMES
            .iter()
            .filter(|(_, bit)| held.iter().any(|(b, yes)| b == bit && *yes))
            .map(|(name, _)| *name)
            .collect()
    }
}

/// Whether the action behind `sampled` asks for PMC counters (so the vCPU
/// thread's counters are read).
pub fn wants_counters(sampled: u32) -> bool {
    sampled & (PMC | sampler::PMC_CONFIG) != 0
}

/// The run's sampler totals: captures per sampler, and the memory figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Samples holding each sampler's data, by sampler name.
    pub captured: BTreeMap<String, u64>,
    /// `sys_mem`: the VMM's resident bytes.
    pub vmm_resident: Option<MemoryFigures>,
    /// `meminfo`: guest bytes in use.
    pub guest_in_use: Option<MemoryFigures>,
    /// Device time of the sample behind each figure's `last`.
    vmm_resident_at: u64,
    guest_in_use_at: u64,
}

impl Totals {
    /// Adds `samples` (in their time order per vCPU).
    pub fn add(&mut self, samples: &[RawSample]) {
        let mut ordered: Vec<&RawSample> = samples.iter().collect();
        ordered.sort_by_key(|s| s.time_ns);
        for raw in ordered {
            self.add_one(raw);
        }
    }

    /// Adds one sample, later than every sample of its vCPU added before.
    pub fn add_one(&mut self, raw: &RawSample) {
        for name in raw.samplers.captured(raw) {
            *self.captured.entry(name.to_string()).or_default() += 1;
        }
        if let Some(m) = raw.samplers.sys_mem {
            MemoryFigures::add(&mut self.vmm_resident, m.vmm_resident_bytes);
            self.vmm_resident_at = raw.time_ns;
        }
        if let Some(m) = raw.samplers.meminfo {
            MemoryFigures::add(&mut self.guest_in_use, m.in_use_bytes);
            self.guest_in_use_at = raw.time_ns;
        }
    }

    /// Adds another vCPU's (or PET's) totals: counts summed, memory figures
    /// combined, `last` from whichever sample was later.
    pub fn merge(&mut self, other: &Self) {
        for (name, count) in &other.captured {
            *self.captured.entry(name.clone()).or_default() += count;
        }
        let combine = |mine: &mut Option<MemoryFigures>,
                       at: &mut u64,
                       theirs: Option<MemoryFigures>,
                       their_at: u64| {
            let Some(t) = theirs else { return };
            match mine {
                None => {
                    *mine = Some(t);
                    *at = their_at;
                }
                Some(m) => {
                    m.min = m.min.min(t.min);
                    m.max = m.max.max(t.max);
                    if their_at >= *at {
                        m.last = t.last;
                        *at = their_at;
                    }
                }
            }
        };
        combine(
            &mut self.vmm_resident,
            &mut self.vmm_resident_at,
            other.vmm_resident,
            other.vmm_resident_at,
        );
        combine(
            &mut self.guest_in_use,
            &mut self.guest_in_use_at,
            other.guest_in_use,
            other.guest_in_use_at,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guestmem::write_plain;

    #[test]
    fn test_entry_is_sane_refuses_what_the_guest_kernel_never_writes() {
        let good = ThreadInfo {
            tid: 3,
            vcpu: 1,
            state: u64::from(thread_state::WAITING),
            stack_lo: 0x10_0000,
            stack_hi: 0x11_0000,
            ..ThreadInfo::default()
        };
        assert!(entry_is_sane(2, &good, 2));
        let bad = [
            ThreadInfo { tid: 4, ..good },
            ThreadInfo {
                tid: u64::MAX,
                ..good
            },
            ThreadInfo { vcpu: 2, ..good },
            ThreadInfo {
                state: u64::from(thread_state::IDLE),
                ..good
            },
            ThreadInfo {
                state: 1 << 32 | 1,
                ..good
            },
            ThreadInfo {
                stack_lo: 0x12_0000,
                ..good
            },
        ];
        for info in bad {
            assert!(!entry_is_sane(2, &info, 2), "{info:?}");
        }
        // The last slot's tid cannot wrap around to 0.
        assert!(!entry_is_sane(
            usize::MAX,
            &ThreadInfo { tid: 0, ..good },
            2
        ));
    }

    const RAM: u64 = 64 << 20;

    /// 64 MiB of guest RAM: a boot block for 2 vCPUs; thread 1 ("runner")
    /// running on vCPU 0 with some accounting, thread 2 waiting, thread 3
    /// exited; vCPU 0's page names thread 1.
    fn guest() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let boot = BootInfo {
            vcpu_count: 2,
            mem_bytes: RAM,
            kernel_end: layout::KERNEL_BASE + 0x8_0000,
            ..BootInfo::default()
        };
        write_plain(&mem, GuestAddress(layout::BOOT_INFO), &boot).unwrap();
        let stack = |i: u64| layout::HEAP_BASE + i * 0x1_0000;
        for (slot, (state, switches, user, vector)) in [
            (thread_state::RUNNING, 7, 40, 0xf0),
            (thread_state::WAITING, 3, 5, 3),
            (thread_state::EXITED, 1, 1, 3),
        ]
        .into_iter()
        .enumerate()
        {
            let info = ThreadInfo {
                tid: slot as u64 + 1,
                vcpu: 0,
                state: u64::from(state),
                user_ticks: user,
                sys_ticks: 1,
                intr_ticks: 2,
                estcpu: 12,
                priority: 53,
                switches,
                saved_vector: vector,
                stack_lo: stack(slot as u64),
                stack_hi: stack(slot as u64 + 1),
                ..ThreadInfo::default()
            };
            let at = layout::THREAD_TABLE + (slot * std::mem::size_of::<ThreadInfo>()) as u64;
            write_plain(&mem, GuestAddress(at), &info).unwrap();
        }
        mem
    }

    fn page(tid: u32, state: u32) -> VcpuShared {
        VcpuShared {
            current_tid: tid,
            current_state: state,
            ..VcpuShared::default()
        }
    }

    /// Vcpu 0's sample at 5 ms of `bits`, with `pmc` counters.
    fn sample(bits: u32, pmc: Option<[u64; 2]>) -> SamplerData {
        let mem = guest();
        let thread = current_thread(&mem, 0, &page(1, thread_state::RUNNING));
        gather(&mem, 5_000_000, &thread, bits, pmc)
    }

    /// Nothing but the field a sampler owns changes: `bits` alone holds
    /// exactly what `expected` says, and no sampler holds nothing.
    fn only(bits: u32, expected: &SamplerData) {
        let got = sample(bits, None);
        assert_eq!(&got, expected);
        assert_ne!(
            got,
            SamplerData {
                sampled: bits,
                ..SamplerData::default()
            }
        );
    }

    #[test]
    fn test_th_info_holds_the_thread_and_its_run_mode() {
        only(
            sampler::TH_INFO,
            &SamplerData {
                sampled: sampler::TH_INFO,
                th_info: Some(ThreadInfoRecord {
                    pid: GUEST_PID,
                    tid: 1,
                    // CFG-A-6: running (1) low, its complement high.
                    runmode: 0xfffe_0001,
                    vcpu: 0,
                }),
                ..SamplerData::default()
            },
        );
    }

    #[test]
    fn test_th_scheduling_holds_the_guest_accounting() {
        only(
            sampler::TH_SCHEDULING,
            &SamplerData {
                sampled: sampler::TH_SCHEDULING,
                th_scheduling: Some(ThreadSchedulingRecord {
                    user_ticks: 40,
                    system_ticks: 1,
                    interrupt_ticks: 2,
                    priority: 53,
                    estcpu: 12,
                }),
                ..SamplerData::default()
            },
        );
    }

    #[test]
    fn test_th_snapshot_holds_state_vcpu_and_switches() {
        only(
            sampler::TH_SNAPSHOT,
            &SamplerData {
                sampled: sampler::TH_SNAPSHOT,
                th_snapshot: Some(ThreadSnapshotRecord {
                    runmode: 0xfffe_0001,
                    vcpu: 0,
                    switches: 7,
                    last_entry_vector: 0xf0,
                }),
                ..SamplerData::default()
            },
        );
    }

    #[test]
    fn test_tk_snapshot_holds_uptime_and_every_threads_activity() {
        only(
            sampler::TK_SNAPSHOT,
            &SamplerData {
                sampled: sampler::TK_SNAPSHOT,
                tk_snapshot: Some(TaskSnapshotRecord {
                    uptime_ns: 5_000_000,
                    context_switches: 7 + 3 + 1,
                    user_ticks: 40 + 5 + 1,
                    system_ticks: 3 * 3,
                }),
                ..SamplerData::default()
            },
        );
    }

    #[test]
    fn test_tk_info_counts_threads_created_and_alive() {
        only(
            sampler::TK_INFO,
            &SamplerData {
                sampled: sampler::TK_INFO,
                tk_info: Some(TaskInfoRecord {
                    pid: GUEST_PID,
                    threads: 3,
                    alive: 2,
                    vcpus: 2,
                }),
                ..SamplerData::default()
            },
        );
    }

    #[test]
    fn test_meminfo_holds_guest_memory_handed_out() {
        let heap = 3 * 0x1_0000;
        only(
            sampler::MEMINFO,
            &SamplerData {
                sampled: sampler::MEMINFO,
                meminfo: Some(MemInfoRecord {
                    in_use_bytes: layout::KERNEL_BASE + 0x8_0000 + 2 * layout::PERCPU_STRIDE + heap,
                    heap_bytes: heap,
                    ram_bytes: RAM,
                }),
                ..SamplerData::default()
            },
        );
    }

    #[test]
    fn test_sys_mem_holds_the_vmms_resident_memory_and_guest_ram() {
        let got = sample(sampler::SYS_MEM, None);
        let m = got.sys_mem.expect("sys_mem");
        assert!(m.vmm_resident_bytes > 0 && m.vmm_virtual_bytes >= m.vmm_resident_bytes);
        assert_eq!(m.guest_ram_bytes, RAM);
        assert_eq!(
            got,
            SamplerData {
                sampled: sampler::SYS_MEM,
                sys_mem: Some(m),
                ..SamplerData::default()
            }
        );
    }

    #[test]
    fn test_pmc_samplers_hold_the_counters_where_the_host_counts() {
        let bits = sampler::PMC_THREAD | sampler::PMC_CONFIG | sampler::TH_INSCYC;
        let counted = Counters {
            instructions: 1000,
            cycles: 1500,
        };
        assert_eq!(
            sample(bits, Some([1000, 1500])),
            SamplerData {
                sampled: bits,
                th_inscyc: Some(counted),
                pmc_config: true,
                pmc: Some(counted),
                ..SamplerData::default()
            }
        );
        // No counters (a host without a guest PMU): nothing is pretended.
        assert_eq!(
            sample(bits, None),
            SamplerData {
                sampled: bits,
                ..SamplerData::default()
            }
        );
        assert!(wants_counters(sampler::PMC_CONFIG) && !wants_counters(sampler::TH_INFO));
    }

    #[test]
    fn test_the_idle_context_is_described_by_its_page() {
        let mem = guest();
        let idle = current_thread(&mem, 1, &page(0, thread_state::IDLE));
        assert_eq!((idle.tid, idle.vcpu, idle.state), (0, 1, 64));
        let got = gather(
            &mem,
            1,
            &idle,
            sampler::TH_INFO | sampler::TH_SCHEDULING,
            None,
        );
        assert_eq!(got.th_info.map(|t| t.runmode), Some(0xffbf_0040));
        assert_eq!(got.th_scheduling, Some(ThreadSchedulingRecord::default()));
        // A page naming a thread its slot does not hold: the page wins.
        let stale = current_thread(&mem, 0, &page(9, thread_state::RUNNING));
        assert_eq!((stale.tid, stale.switches), (9, 0));
    }

    #[test]
    fn test_tr_p_4_records_come_in_the_sample_order() {
        let all = sampler::ALL & !sampler::TH_DISPATCH;
        let data = sample(all, Some([10, 20]));
        let raw = RawSample {
            vcpu: 1,
            time_ns: 77,
            tid: 1,
            ..RawSample::default()
        };
        let records = data.trace_records(&raw);
        let ids: Vec<u32> = records.iter().map(|r| r.id).collect();
        assert_eq!(
            ids,
            [
                trace::MI_SYS_DATA,
                trace::TI_DATA,
                trace::TI_SCHEDDATA_2,
                trace::TI_SNAPDATA,
                trace::TI_INSCYCDATA,
                trace::TK_SNAP_DATA,
                trace::TK_INFO_DATA,
                trace::MI_DATA,
                trace::KPC_CONFIG,
                trace::KPC_DATA,
            ]
        );
        assert!(records
            .iter()
            .all(|r| (r.time_ns, r.vcpu, r.tid) == (77, 1, 1)));
        assert_eq!(records[1].args, [GUEST_PID, 1, 0, 0xfffe_0001]);
        assert_eq!(records[2].args[3], 53 << 32 | 12);
        assert_eq!(records[6].args, [GUEST_PID, 3, 2, 2]);
        // Every record is data level (TR-E-3): kept at any trace level.
        assert!(ids.iter().all(|&id| trace::level(id) == trace::Level::Data));
    }

    #[test]
    fn test_totals_count_captures_per_sampler_and_track_memory() {
        let mut totals = Totals::default();
        let raw = |time_ns: u64, resident: u64| RawSample {
            time_ns,
            samplers: Box::new(SamplerData {
                sampled: sampler::SYS_MEM | sampler::USTACK,
                sys_mem: Some(SysMemRecord {
                    vmm_resident_bytes: resident,
                    ..SysMemRecord::default()
                }),
                ..SamplerData::default()
            }),
            ..RawSample::default()
        };
        let mut with_stack = raw(3, 500);
        with_stack.user_stack.frames = vec![0x40_0000];
        totals.add(&[raw(2, 300), with_stack, raw(1, 400)]);
        assert_eq!(
            totals.captured,
            BTreeMap::from([("sys_mem".to_string(), 3), ("ustack".to_string(), 1)])
        );
        assert_eq!(
            totals.vmm_resident,
            Some(MemoryFigures {
                last: 500,
                min: 300,
                max: 500
            })
        );
        assert_eq!(totals.guest_in_use, None);
    }

    #[test]
    fn test_totals_merge_sums_counts_and_keeps_the_latest_last() {
        let at = |time_ns: u64, resident: u64| RawSample {
            time_ns,
            samplers: Box::new(SamplerData {
                sampled: sampler::SYS_MEM,
                sys_mem: Some(SysMemRecord {
                    vmm_resident_bytes: resident,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (mut vcpu0, mut vcpu1) = (Totals::default(), Totals::default());
        vcpu0.add_one(&at(10, 500));
        vcpu0.add_one(&at(30, 700));
        vcpu1.add_one(&at(20, 100));
        vcpu1.add_one(&at(40, 600));
        let mut all = Totals::default();
        all.merge(&vcpu0);
        all.merge(&vcpu1);
        assert_eq!(all.captured.get("sys_mem"), Some(&4));
        assert_eq!(
            all.vmm_resident,
            Some(MemoryFigures {
                last: 600,
                min: 100,
                max: 700
            })
        );
    }
}
