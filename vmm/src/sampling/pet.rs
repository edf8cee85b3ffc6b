//! Traditional PET's sampler pass (PET-T-3 to PET-T-6): with the guest held
//! still, every guest thread (running, runnable or blocked) is sampled from
//! the thread table the guest kernel publishes ([`ThreadInfo`], AMB-9).
//!
//! The guest is one task. A thread that is running is sampled from its
//! vCPU's registers, which the vCPU thread published when it parked for the
//! hold ([`super::capture`], as an on-CPU sample); a thread that is not
//! running is sampled from the user context the guest saved when it switched
//! the thread out (`saved_rip`, `saved_rbp`), so a blocked thread shows the
//! place it blocks.
//!
//! The idle-rate rule (PET-T-5): a thread that context-switched since the
//! last pass ("dirty") is sampled whole and marked clean; a clean thread gets
//! its call stacks only when its PET sample count is a multiple of the idle
//! rate, otherwise an empty call stack. The count increments on every pass.
//!
//! The action's thread filter applies to the whole sample (AMB-10: XNU applies
//! it to the kernel part only; here both parts, so a filtered thread is left
//! out of the pass).

use kperf::{sample_flags, sampler, Action, PID_FILTER_ALL};
use kvm_bindings::{kvm_regs, kvm_sregs};
use metronome_abi::{exception, thread_state, ThreadInfo, MAX_THREADS};
use vm_memory::GuestMemoryMmap;

use super::capture::{capture, Capture, RawSample};
use super::samplers::{self, thread_table};
use super::walk::walk_stack;

/// What the host remembers of one thread-table slot between passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen {
    /// The slot's thread id when last seen (a new thread resets the rest).
    tid: u64,
    /// Its context-switch count when last sampled whole.
    switches: u64,
    /// PET samples taken of it (`kperf_pet_cnt`).
    samples: u64,
}

/// One thread's PET sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadSample {
    /// The sample (empty stacks when the idle-rate rule withheld them).
    pub raw: RawSample,
    /// The thread had context-switched since the previous pass.
    pub dirty: bool,
    /// The call stacks were taken (dirty, or a multiple of the idle rate).
    pub stacks: bool,
    /// Device time when its sampling ended (`raw.time_ns` is when it began).
    pub ended_ns: u64,
}

/// The PET sampler's memory of the guest's threads, across passes.
#[derive(Debug)]
pub struct PetSampler {
    seen: [Seen; MAX_THREADS],
    /// Thread-table entries found corrupt, over all passes.
    corrupt: u64,
}

impl Default for PetSampler {
    fn default() -> Self {
        Self {
            seen: [Seen::default(); MAX_THREADS],
            corrupt: 0,
        }
    }
}

impl PetSampler {
    /// Thread-table entries the passes found corrupt and left out, so far
    /// (see [`samplers::entry_is_sane`]).
    pub fn corrupt_entries(&self) -> u64 {
        self.corrupt
    }

    /// One pass over every live guest thread, at device times `now()`, with the
    /// guest held: `parked[v]` holds vCPU `v`'s registers (`None` for a vCPU
    /// whose thread has gone). `settings` is the PET action's.
    pub fn pass(
        &mut self,
        mem: &GuestMemoryMmap,
        parked: &[Option<(kvm_regs, kvm_sregs)>],
        settings: &Action,
        idle_rate: u32,
        now: &dyn Fn() -> u64,
    ) -> Vec<ThreadSample> {
        // One address space: any parked vCPU's CR3 translates user addresses.
        let Some(cr3) = parked.iter().flatten().map(|(_, sregs)| sregs.cr3).next() else {
            return Vec::new();
        };
        // A thread sample takes the thread samplers only (PET-T-5:
        // `THREAD_ONLY | IDLE_THREADS`, no `SYSTEM`); the PMC samplers count
        // the thread on a vCPU's own thread, so on-CPU samples carry them.
        let thread_samplers = sample_flags::sampled(
            settings.samplers,
            sample_flags::THREAD_ONLY | sample_flags::IDLE_THREADS,
        ) & !(sampler::PMC_THREAD
            | sampler::PMC_CPU
            | sampler::TH_INSCYC
            | sampler::PMC_CONFIG);
        if thread_samplers == 0 {
            return Vec::new();
        }
        let last_vcpu = parked.len().saturating_sub(1) as u64;
        let mut samples = Vec::new();
        for (slot, info) in thread_table(mem).iter().enumerate() {
            if info.tid == 0 {
                continue;
            }
            if !samplers::entry_is_sane(slot, info, parked.len()) {
                // A hostile or broken guest: nothing in it can be trusted.
                self.corrupt += 1;
                continue;
            }
            let state = info.state as u32;
            if state == thread_state::EXITED {
                continue;
            }
            if settings.pid_filter != PID_FILTER_ALL
                && i64::from(settings.pid_filter) != info.tid as i64
            {
                continue;
            }
            let seen = &mut self.seen[slot];
            // A new thread in the slot (or a switch count that went back).
            if seen.tid != info.tid || (seen.switches != u64::MAX && info.switches < seen.switches)
            {
                *seen = Seen {
                    tid: info.tid,
                    switches: u64::MAX,
                    samples: 0,
                };
            }
            let dirty = info.switches != seen.switches;
            let stacks = dirty || seen.samples.is_multiple_of(u64::from(idle_rate.max(1)));
            seen.samples += 1;
            if dirty {
                seen.switches = info.switches;
            }
            let mut action = Action {
                samplers: thread_samplers,
                ..*settings
            };
            // The guest says which vCPU owns the thread: keep it in range.
            let info = &ThreadInfo {
                vcpu: info.vcpu.min(last_vcpu),
                ..*info
            };
            if !stacks {
                action.samplers &= !(sampler::USTACK | sampler::KSTACK);
            }
            let started = now();
            let raw = if state == thread_state::RUNNING {
                // A running thread whose vCPU's registers cannot be read (not
                // parked, or not running it after all) keeps its place in
                // the pass, without stacks.
                running_sample(mem, parked, info, &action, started).unwrap_or_else(|| {
                    let no_stacks = Action {
                        samplers: action.samplers & !(sampler::USTACK | sampler::KSTACK),
                        ..action
                    };
                    saved_sample(mem, cr3, info, &no_stacks, started)
                })
            } else {
                saved_sample(mem, cr3, info, &action, started)
            };
            samples.push(ThreadSample {
                raw,
                dirty,
                stacks,
                ended_ns: now(),
            });
        }
        samples
    }
}

/// PET's one task-only sample of the guest (the one task) per pass, when the
/// action has task samplers (PET-T-4: `meminfo`, `tk_snapshot`, `tk_info`);
/// `None` otherwise.
pub fn task_sample(mem: &GuestMemoryMmap, settings: &Action, now: u64) -> Option<RawSample> {
    let task = sample_flags::sampled(settings.samplers, sample_flags::TASK_ONLY);
    (task != 0).then(|| RawSample {
        time_ns: now,
        samplers: Box::new(samplers::gather(
            mem,
            now,
            &ThreadInfo::default(),
            task,
            None,
        )),
        ..Default::default()
    })
}

/// A running thread: an on-CPU sample of its vCPU, if that vCPU is parked
/// and really runs it.
fn running_sample(
    mem: &GuestMemoryMmap,
    parked: &[Option<(kvm_regs, kvm_sregs)>],
    info: &ThreadInfo,
    action: &Action,
    now: u64,
) -> Option<RawSample> {
    let vcpu = u32::try_from(info.vcpu).ok()?;
    let (regs, sregs) = parked.get(vcpu as usize)?.as_ref()?;
    match capture(mem, vcpu, now, (regs, sregs), action) {
        Capture::Sample(raw) if raw.tid == info.tid => Some(raw),
        _ => None,
    }
}

/// A thread that is not running: its saved user context.
fn saved_sample(
    mem: &GuestMemoryMmap,
    cr3: u64,
    info: &ThreadInfo,
    action: &Action,
    now: u64,
) -> RawSample {
    let name_len = info.name.iter().position(|&b| b == 0).unwrap_or(16);
    let mut raw = RawSample {
        vcpu: info.vcpu as u32,
        time_ns: now,
        tid: info.tid,
        thread_name: String::from_utf8_lossy(&info.name[..name_len]).into_owned(),
        thread_state: info.state as u32,
        cpl: 3,
        // The thread samplers from its table entry; the PMC samplers count
        // only the thread on a vCPU (on-CPU samples).
        samplers: Box::new(samplers::gather(mem, now, info, action.samplers, None)),
        ..Default::default()
    };
    if action.samplers & sampler::USTACK != 0 && info.saved_rip != 0 {
        raw.user_leaf_after_trap = info.saved_vector == u64::from(exception::BREAKPOINT);
        raw.user_stack = walk_stack(
            mem,
            cr3,
            info.saved_rip,
            info.saved_rbp,
            action.ucallstack_depth as usize,
        );
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guestmem::{read_plain, write_plain};
    use metronome_abi::{layout, VcpuShared};
    use vm_memory::{Bytes, GuestAddress};

    const CR3: u64 = 0x8000;
    const STACK: u64 = 0x300_0000;

    /// 64 MiB identity-mapped by one 1 GiB page; vCPU 0 runs thread 1
    /// ("runner", at CPL3); thread 2 ("sleeper") waits with a saved context
    /// two frames deep; slot 2 held thread 3, which exited.
    fn guest() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let w = |addr: u64, value: u64| mem.write_obj(value, GuestAddress(addr)).unwrap();
        w(CR3, 0x9000 | 1);
        w(0x9000, 1 | 1 << 7);
        let mut page = VcpuShared {
            current_tid: 1,
            current_state: thread_state::RUNNING,
            ..Default::default()
        };
        page.current_name[..6].copy_from_slice(b"runner");
        write_plain(
            &mem,
            GuestAddress(layout::percpu_region(0) + layout::PERCPU_SHARED),
            &page,
        )
        .unwrap();
        let thread = |slot: u64, tid: u64, state: u32, name: &[u8], rip: u64, rbp: u64| {
            let mut info = ThreadInfo {
                tid,
                vcpu: 0,
                state: u64::from(state),
                saved_rip: rip,
                saved_rbp: rbp,
                // A waiting thread blocked in a system call.
                saved_vector: if state == thread_state::WAITING {
                    u64::from(exception::BREAKPOINT)
                } else {
                    0
                },
                ..Default::default()
            };
            info.name[..name.len()].copy_from_slice(name);
            let at = layout::THREAD_TABLE + slot * std::mem::size_of::<ThreadInfo>() as u64;
            write_plain(&mem, GuestAddress(at), &info).unwrap();
        };
        thread(0, 1, thread_state::RUNNING, b"runner", 0, 0);
        thread(1, 2, thread_state::WAITING, b"sleeper", 0x40_0500, STACK);
        thread(2, 3, thread_state::EXITED, b"gone", 0, 0);
        w(STACK, STACK + 0x100);
        w(STACK + 8, 0x40_1111);
        w(STACK + 0x100, 0);
        w(STACK + 0x108, 0x40_2222);
        w(STACK + 0x200, 0);
        w(STACK + 0x208, 0x40_3333);
        mem
    }

    fn parked() -> Vec<Option<(kvm_regs, kvm_sregs)>> {
        let regs = kvm_regs {
            rip: 0x40_0900,
            rbp: STACK + 0x200,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr0: 1 << 31,
            cr3: CR3,
            ..Default::default()
        };
        sregs.cs.selector = 0x20 | 3;
        vec![Some((regs, sregs))]
    }

    fn action() -> Action {
        Action {
            samplers: sampler::TH_INFO | sampler::USTACK | sampler::KSTACK,
            ..Action::default()
        }
    }

    #[test]
    fn test_pet_t_4_every_live_thread_is_sampled_running_or_not() {
        let mem = guest();
        let mut pet = PetSampler::default();
        let samples = pet.pass(&mem, &parked(), &action(), 15, &|| 9);
        let by_tid: Vec<(u64, &str, Vec<u64>)> = samples
            .iter()
            .map(|s| {
                (
                    s.raw.tid,
                    s.raw.thread_name.as_str(),
                    s.raw.user_stack.frames.clone(),
                )
            })
            .collect();
        assert_eq!(
            by_tid,
            [
                (1, "runner", vec![0x40_0900, 0x40_3333]),
                (2, "sleeper", vec![0x40_0500, 0x40_1111, 0x40_2222]),
            ]
        );
        assert!(samples
            .iter()
            .all(|s| s.dirty && s.stacks && s.raw.time_ns == 9));
        // The sleeper's leaf is where its system call returns to.
        let leaf_after_trap: Vec<bool> =
            samples.iter().map(|s| s.raw.user_leaf_after_trap).collect();
        assert_eq!(leaf_after_trap, [false, true]);
        // The thread samplers describe each thread from its table entry.
        let states: Vec<Option<u64>> = samples
            .iter()
            .map(|s| s.raw.samplers.th_info.map(|t| t.runmode & 0xffff))
            .collect();
        assert_eq!(
            states,
            [
                Some(u64::from(thread_state::RUNNING)),
                Some(u64::from(thread_state::WAITING))
            ]
        );
        // Without a parked vCPU there is no address space to read: no pass.
        assert!(pet.pass(&mem, &[None], &action(), 15, &|| 10).is_empty());
    }

    #[test]
    fn test_corrupt_thread_entries_are_left_out_and_counted() {
        let mem = guest();
        let at = |slot: u64| layout::THREAD_TABLE + slot * std::mem::size_of::<ThreadInfo>() as u64;
        let write = |slot: u64, info: ThreadInfo| write_plain(&mem, GuestAddress(at(slot)), &info);
        let sleeper: ThreadInfo = read_plain(&mem, GuestAddress(at(1))).unwrap();
        // The sleeper's frame pointer now points at itself: a loop.
        let looping = STACK + 0x400;
        mem.write_obj(looping, GuestAddress(looping)).unwrap();
        mem.write_obj(0x40_7777u64, GuestAddress(looping + 8))
            .unwrap();
        write(
            1,
            ThreadInfo {
                saved_rbp: looping,
                ..sleeper
            },
        )
        .unwrap();
        // Garbage in free slots: a tid that is not the slot's, a vCPU
        // that does not exist, a state no thread has, a stack upside down.
        let garbage = ThreadInfo {
            tid: 12,
            state: u64::from(thread_state::RUNNABLE),
            ..sleeper
        };
        write(3, garbage).unwrap();
        write(
            4,
            ThreadInfo {
                tid: 5,
                vcpu: u64::MAX,
                ..garbage
            },
        )
        .unwrap();
        write(
            5,
            ThreadInfo {
                tid: 6,
                state: u64::MAX,
                ..garbage
            },
        )
        .unwrap();
        write(
            6,
            ThreadInfo {
                tid: 7,
                stack_lo: 2,
                stack_hi: 1,
                ..garbage
            },
        )
        .unwrap();
        let mut pet = PetSampler::default();
        let samples = pet.pass(&mem, &parked(), &action(), 15, &|| 1);
        let tids: Vec<u64> = samples.iter().map(|s| s.raw.tid).collect();
        assert_eq!(tids, [1, 2]);
        assert_eq!(pet.corrupt_entries(), 4);
        // The loop ends at once, as an error, not at the depth limit.
        let sleeper = &samples[1].raw.user_stack;
        assert_eq!(sleeper.frames, [0x40_0500, 0x40_7777]);
        assert!(sleeper.error.is_some() && !sleeper.truncated);
        pet.pass(&mem, &parked(), &action(), 15, &|| 2);
        assert_eq!(pet.corrupt_entries(), 8, "counted on every pass");
    }

    #[test]
    fn test_pet_t_4_a_running_thread_without_registers_keeps_its_place() {
        let mem = guest();
        let mut pet = PetSampler::default();
        // vCPU 0 parked but its registers say paging is off: unusable.
        let mut regs = parked();
        if let Some((_, sregs)) = regs[0].as_mut() {
            sregs.cr0 = 0;
        }
        // Some other parked vCPU gives the address space.
        regs.push(parked()[0]);
        let samples = pet.pass(&mem, &regs, &action(), 15, &|| 0);
        let runner = samples.iter().find(|s| s.raw.tid == 1).expect("runner");
        assert_eq!(runner.raw.thread_name, "runner");
        assert!(runner.raw.user_stack.frames.is_empty());
        assert_eq!(samples.len(), 2);
    }

    #[test]
    fn test_pet_t_5_a_clean_thread_gets_stacks_every_idle_rate_passes() {
        let mem = guest();
        let mut pet = PetSampler::default();
        let mut with_stacks = Vec::new();
        for pass in 0..45u64 {
            let samples = pet.pass(&mem, &parked(), &action(), 15, &|| pass);
            let sleeper = samples.iter().find(|s| s.raw.tid == 2).unwrap();
            assert_eq!(sleeper.stacks, !sleeper.raw.user_stack.frames.is_empty());
            if sleeper.stacks {
                with_stacks.push(pass);
            }
        }
        // Dirty on the first pass (never seen), then clean: passes 0, 15, 30.
        assert_eq!(with_stacks, [0, 15, 30]);
        // A context switch makes it dirty again: whole at once.
        let at = layout::THREAD_TABLE + std::mem::size_of::<ThreadInfo>() as u64;
        let mut info: ThreadInfo = read_plain(&mem, GuestAddress(at)).unwrap();
        info.switches += 1;
        write_plain(&mem, GuestAddress(at), &info).unwrap();
        let samples = pet.pass(&mem, &parked(), &action(), 15, &|| 45);
        let sleeper = samples.iter().find(|s| s.raw.tid == 2).unwrap();
        assert!(sleeper.dirty && sleeper.stacks);
    }

    #[test]
    fn test_pet_t_6_the_filter_leaves_other_threads_out() {
        let mem = guest();
        let mut pet = PetSampler::default();
        let only_two = Action {
            pid_filter: 2,
            ..action()
        };
        let samples = pet.pass(&mem, &parked(), &only_two, 15, &|| 0);
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].raw.tid, 2);
    }

    #[test]
    fn test_pet_t_4_a_task_sampler_takes_one_task_sample_not_thread_ones() {
        let mem = guest();
        let task_only = Action {
            samplers: sampler::TK_INFO,
            ..action()
        };
        let mut pet = PetSampler::default();
        assert!(pet.pass(&mem, &parked(), &task_only, 15, &|| 0).is_empty());
        let task = task_sample(&mem, &task_only, 5).expect("a task sample");
        assert_eq!(task.samplers.sampled, sampler::TK_INFO);
        assert!(task.samplers.tk_info.is_some());
        assert!(!task.in_profile());
        // An action without task samplers takes none.
        assert!(task_sample(&mem, &action(), 5).is_none());
    }
}
