//! The allow-lists, one per [`ThreadKind`], each call with why it is
//! allowed. They were built from what each thread really calls (`strace -f`
//! of every run mode, split by thread name; README "Security") and hold
//! nothing more: a call missing here ends the VMM with its name.
//!
//! Arguments are checked where they choose what a call can do: `ioctl`
//! request numbers (the KVM ioctls of the thread, nothing that creates a VM
//! or vCPU or changes memory slots), `mmap`/`mprotect` protections (never
//! `PROT_EXEC`: no thread maps code once running), `tgkill` (only this
//! process's threads), `perf_event_open` (per thread, never system-wide),
//! `clone` (threads, not processes). No list has `socket`, `connect`,
//! `execve` or `fork`: the API socket is bound before any filter.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use vmm_sys_util::ioctl::ioctl_expr;
use vmm_sys_util::ioctl::{_IOC_NONE, _IOC_WRITE};

use super::ThreadKind;

/// `_IO(KVMIO, 0x80)`: enter the guest.
const KVM_RUN: u64 = ioctl_expr(_IOC_NONE, 0xAE, 0x80, 0);
/// `_IOW(KVMIO, 0x86, struct kvm_interrupt)`: inject a vector.
const KVM_INTERRUPT: u64 = ioctl_expr(_IOC_WRITE, 0xAE, 0x86, 4);
/// `PERF_EVENT_IOC_ENABLE` and `_DISABLE`.
const PERF_ENABLE: u32 = perf_event_open_sys::bindings::ENABLE;
const PERF_DISABLE: u32 = perf_event_open_sys::bindings::DISABLE;

/// A list under construction: system call number to the rules that allow
/// it (an empty vector: allowed whatever its arguments).
#[derive(Debug, Default)]
pub(super) struct List(BTreeMap<i64, Vec<SeccompRule>>);

/// `arg & mask == value`, on the argument's low 32 bits (the kernel reads
/// these arguments as `int`s).
fn masked(arg: u8, mask: u64, value: u64) -> SeccompCondition {
    // Cannot panic: arguments 0 to 5 are valid.
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
    .expect("a valid argument index")
}

/// `arg == value`, on the argument's low 32 bits.
fn eq(arg: u8, value: u64) -> SeccompCondition {
    // Cannot panic: arguments 0 to 5 are valid.
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .expect("a valid argument index")
}

impl List {
    /// Allows each of `calls` whatever their arguments.
    fn allow(mut self, calls: &[libc::c_long]) -> Self {
        for &nr in calls {
            self.0.insert(nr, Vec::new());
        }
        self
    }

    /// Allows `call` when every condition holds (an alternative to the
    /// call's other rules; nothing if it is allowed unconditionally).
    fn allow_if(mut self, call: libc::c_long, conditions: Vec<SeccompCondition>) -> Self {
        // Cannot panic: every caller gives at least one condition.
        let rule = SeccompRule::new(conditions).expect("a rule with conditions");
        match self.0.get_mut(&call) {
            Some(rules) if rules.is_empty() => {}
            Some(rules) => rules.push(rule),
            None => {
                self.0.insert(call, vec![rule]);
            }
        }
        self
    }

    /// Allows each `(call, arg, value)` with that argument equal to value.
    fn allow_eq(self, entries: &[(libc::c_long, u8, u64)]) -> Self {
        entries.iter().fold(self, |list, &(call, arg, value)| {
            list.allow_if(call, vec![eq(arg, value)])
        })
    }

    /// Everything `other` allows too (a thread spawned by a filtered thread
    /// runs under both filters).
    fn merge(mut self, other: List) -> Self {
        for (call, rules) in other.0 {
            if rules.is_empty() {
                self.0.insert(call, rules);
            } else {
                for rule in rules {
                    self = self.allow_if_rule(call, rule);
                }
            }
        }
        self
    }

    fn allow_if_rule(mut self, call: libc::c_long, rule: SeccompRule) -> Self {
        match self.0.get_mut(&call) {
            Some(rules) if rules.is_empty() => {}
            Some(rules) => {
                if !rules.contains(&rule) {
                    rules.push(rule);
                }
            }
            None => {
                self.0.insert(call, vec![rule]);
            }
        }
        self
    }

    /// The allowed calls and their rules.
    pub(super) fn into_map(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
    }
}

/// What every thread may call: the Rust runtime, the allocator, locks and
/// thread exit, and the SIGSYS report. `pid` is this process's id.
fn common(pid: libc::pid_t) -> List {
    use libc::*;
    let no_exec = || vec![masked(2, PROT_EXEC as u64, 0)];
    List::default()
        // Locks, condition variables, channels, joins.
        .allow(&[SYS_futex])
        // The allocator and thread stacks: memory, never executable.
        .allow(&[SYS_munmap, SYS_mremap, SYS_brk])
        .allow_if(SYS_mmap, no_exec())
        .allow_if(SYS_mprotect, no_exec())
        // glibc frees an exited thread's stack and trims its heap with it.
        .allow_eq(&[(SYS_madvise, 2, MADV_DONTNEED as u64)])
        // Signal masks (kick and stop signals), a handler's return, and
        // std's stack-overflow guard, taken down at thread exit.
        .allow(&[SYS_rt_sigprocmask, SYS_rt_sigreturn, SYS_sigaltstack])
        // Spin-wait backoff; std's available_parallelism.
        .allow(&[SYS_sched_yield, SYS_sched_getaffinity])
        // The clocks where the vDSO cannot answer (host clock sources
        // without a vDSO path), and sleeps.
        .allow(&[SYS_clock_gettime, SYS_clock_nanosleep, SYS_nanosleep])
        // Ids for kicks and log lines; hash-map seeds.
        .allow(&[SYS_gettid, SYS_getpid, SYS_getrandom])
        // Kicks (pthread_kill) and abort's raise: this process's threads only.
        .allow_eq(&[(SYS_tgkill, 0, pid as u64)])
        // Log lines, panic messages and the SIGSYS report on stderr; the
        // eventfd writes that wake a thread.
        .allow(&[SYS_write])
        // Descriptors dropped (thread-locals at thread exit); std's debug
        // check that a descriptor it drops is open.
        .allow(&[SYS_close])
        .allow_eq(&[(SYS_fcntl, 1, F_GETFD as u64)])
        // The thread's name, for the SIGSYS report.
        .allow_eq(&[(SYS_prctl, 0, PR_GET_NAME as u64)])
        .allow(&[SYS_exit, SYS_exit_group])
}

/// What a thread needs to spawn threads once filtered: `clone3` (answered
/// `ENOSYS` by the filter such threads stack on this one, `mod.rs`
/// `compile_no_clone3`: its flags are in memory, out of a filter's reach, so
/// glibc falls back to `clone`), `clone` for threads only, and what the new
/// thread does before its own filter (glibc's robust list and rseq, std's
/// name).
fn spawner() -> List {
    use libc::*;
    List::default()
        .allow(&[SYS_clone3, SYS_set_robust_list, SYS_rseq])
        .allow_if(
            SYS_clone,
            vec![masked(0, CLONE_THREAD as u64, CLONE_THREAD as u64)],
        )
        .allow_eq(&[
            (SYS_prctl, 0, PR_SET_NAME as u64),
            // The new PET thread's timer slack (before its filter).
            (SYS_prctl, 0, PR_SET_TIMERSLACK as u64),
            // The new thread installs its own filter, which can only
            // narrow what this one allows: no_new_privs, then the filter
            // for the calling thread alone (flags 0: no TSYNC).
            (SYS_prctl, 0, PR_SET_NO_NEW_PRIVS as u64),
        ])
        .allow_if(
            SYS_seccomp,
            vec![eq(0, u64::from(SECCOMP_SET_MODE_FILTER)), eq(1, 0)],
        )
}

/// A vCPU thread.
fn vcpu(pid: libc::pid_t) -> List {
    use libc::*;
    common(pid)
        // Enter the guest and inject interrupts; nothing else on the vCPU
        // fd (registers come in kvm_run's sync regs). KVM_SET_SIGNAL_MASK
        // is set before the filter.
        .allow_eq(&[(SYS_ioctl, 1, KVM_RUN), (SYS_ioctl, 1, KVM_INTERRUPT)])
        // Consume the kick and timer signals after KVM_RUN's EINTR.
        .allow(&[SYS_rt_sigtimedwait])
        // The device timer's and the sampling timer's POSIX timers
        // (SIGEV_THREAD_ID), made when sampling starts.
        .allow_eq(&[(SYS_timer_create, 0, CLOCK_MONOTONIC as u64)])
        .allow(&[SYS_timer_settime, SYS_timer_gettime, SYS_timer_delete])
        // The PMC samplers: guest-only counters of this thread (pid 0,
        // any CPU), read with read(2).
        .allow_if(
            SYS_perf_event_open,
            vec![eq(1, 0), eq(2, u64::from(u32::MAX))],
        )
        // Counter values; /proc/self/statm (sys_mem), opened before the filter.
        .allow(&[SYS_read, SYS_pread64])
}

/// The API thread and its runtime's blocking pool.
fn api(pid: libc::pid_t) -> List {
    use libc::*;
    common(pid)
        .merge(spawner())
        // The tokio reactor and its wake-ups.
        .allow(&[
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_epoll_wait,
            SYS_epoll_pwait,
        ])
        .allow(&[SYS_eventfd2, SYS_read])
        // Connections on the bound socket: accept, read, answer, close.
        .allow(&[
            SYS_accept4,
            SYS_recvfrom,
            SYS_sendto,
            SYS_sendmsg,
            SYS_writev,
        ])
        .allow(&[SYS_shutdown, SYS_getsockopt])
        .allow_eq(&[
            (SYS_fcntl, 1, F_GETFL as u64),
            (SYS_fcntl, 1, F_SETFL as u64),
            (SYS_fcntl, 1, F_SETFD as u64),
            (SYS_fcntl, 1, F_DUPFD_CLOEXEC as u64),
            (SYS_ioctl, 1, FIONBIO),
        ])
        // PUT /metrics: the metrics file, appended to.
        .allow(&[SYS_openat, SYS_newfstatat, SYS_statx, SYS_fstat, SYS_lseek])
}

/// The PET sampler: samples and kicks, timed on a condition variable.
fn pet(pid: libc::pid_t) -> List {
    use libc::*;
    // /proc/self/statm (sys_mem), opened before the filter.
    common(pid).allow(&[SYS_read, SYS_pread64])
}

/// The perf reader of the no-exit tier.
fn perf_reader(pid: libc::pid_t) -> List {
    use libc::*;
    common(pid)
        // A cpu-clock event on each vCPU thread: per thread, never
        // per CPU (cpu -1); its ring is mapped without PROT_EXEC (common).
        .allow_if(SYS_perf_event_open, vec![eq(2, u64::from(u32::MAX))])
        .allow_eq(&[
            (SYS_ioctl, 1, u64::from(PERF_ENABLE)),
            (SYS_ioctl, 1, u64::from(PERF_DISABLE)),
        ])
}

/// The VMM thread: the event loop, the API's requests, the end of the run
/// (profiles, trace, summary); it may start the PET sampler and the perf
/// reader at run time, so their lists are part of it.
fn vmm(pid: libc::pid_t) -> List {
    use libc::*;
    common(pid)
        .merge(spawner())
        .merge(pet(pid))
        .merge(perf_reader(pid))
        // The event manager: epoll, the request and exit eventfds, the
        // --timeout timerfd.
        .allow(&[
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_epoll_wait,
            SYS_epoll_pwait,
        ])
        .allow(&[
            SYS_eventfd2,
            SYS_read,
            SYS_timerfd_create,
            SYS_timerfd_settime,
        ])
        // Output files, written whole or not at all: a temporary name,
        // data, sync, rename; the profile directory made if missing.
        .allow(&[SYS_openat, SYS_mkdir, SYS_mkdirat, SYS_rename, SYS_renameat])
        .allow(&[SYS_unlink, SYS_unlinkat, SYS_fsync, SYS_fdatasync])
        .allow(&[SYS_newfstatat, SYS_statx, SYS_fstat, SYS_lseek, SYS_writev])
        // Whether stdout is a terminal (the human summary).
        .allow_eq(&[(SYS_ioctl, 1, TCGETS)])
}

/// The main thread in API mode, after it spawned the API and VMM threads.
fn main_thread(pid: libc::pid_t) -> List {
    use libc::*;
    // The socket file removed at the end.
    common(pid).allow(&[SYS_unlink, SYS_newfstatat, SYS_statx])
}

/// The SIGINT/SIGTERM thread.
fn signal(pid: libc::pid_t) -> List {
    use libc::*;
    common(pid)
        // Wait for the stop signals.
        .allow(&[SYS_rt_sigtimedwait])
        // With no watcher: restore the default action and die of the signal.
        .allow_eq(&[
            (SYS_rt_sigaction, 0, SIGINT as u64),
            (SYS_rt_sigaction, 0, SIGTERM as u64),
        ])
}

/// The allow-list of `kind`, for process `pid`.
pub(super) fn rules(kind: ThreadKind, pid: libc::pid_t) -> BTreeMap<i64, Vec<SeccompRule>> {
    match kind {
        ThreadKind::Vcpu => vcpu(pid),
        ThreadKind::Api => api(pid),
        ThreadKind::Vmm => vmm(pid),
        ThreadKind::Main => main_thread(pid),
        ThreadKind::Pet => pet(pid),
        ThreadKind::PerfReader => perf_reader(pid),
        ThreadKind::Signal => signal(pid),
        // Raises stress vectors and kicks, sleeping between (common).
        ThreadKind::Stress => common(pid),
    }
    .into_map()
}

#[cfg(test)]
pub(super) mod tests {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

    use super::*;

    const PID: libc::pid_t = 4242;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_TRAP: u32 = 0x0003_0000;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

    /// Runs a classic BPF program over `struct seccomp_data` for call `nr`
    /// with `args` (the subset of cBPF seccompiler emits: word loads,
    /// AND, the conditional and unconditional jumps, returns).
    pub(in crate::seccomp) fn evaluate(
        program: &BpfProgram,
        nr: libc::c_long,
        args: [u64; 6],
    ) -> u32 {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&(nr as u32).to_ne_bytes());
        data.extend_from_slice(&AUDIT_ARCH_X86_64.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes());
        for arg in args {
            data.extend_from_slice(&arg.to_ne_bytes());
        }
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let insn = &program[pc];
            let k = insn.k;
            pc += 1;
            match insn.code {
                // BPF_LD | BPF_W | BPF_ABS
                0x20 => {
                    let at = k as usize;
                    a = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
                }
                // BPF_ALU | BPF_AND | BPF_K
                0x54 => a &= k,
                // BPF_JMP | BPF_JA
                0x05 => pc += k as usize,
                // BPF_JMP | BPF_JEQ / JGT / JGE / JSET, BPF_K
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let taken = match insn.code {
                        0x15 => a == k,
                        0x25 => a > k,
                        0x35 => a >= k,
                        _ => a & k != 0,
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
                // BPF_RET | BPF_K
                0x06 => return k,
                code => panic!("unexpected BPF opcode {code:#x}"),
            }
        }
    }

    fn program(kind: ThreadKind) -> BpfProgram {
        SeccompFilter::new(
            rules(kind, PID),
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .unwrap()
        .try_into()
        .unwrap()
    }

    fn allowed(kind: ThreadKind, nr: libc::c_long, args: [u64; 6]) -> bool {
        match evaluate(&program(kind), nr, args) {
            RET_ALLOW => true,
            RET_TRAP => false,
            other => panic!("unexpected action {other:#x}"),
        }
    }

    fn args(first: &[u64]) -> [u64; 6] {
        let mut all = [0; 6];
        all[..first.len()].copy_from_slice(first);
        all
    }

    #[test]
    fn test_no_list_allows_the_calls_that_leave_the_sandbox() {
        use libc::*;
        for kind in ThreadKind::ALL {
            for nr in [
                SYS_getpgid,
                SYS_socket,
                SYS_connect,
                SYS_execve,
                SYS_execveat,
                SYS_fork,
                SYS_vfork,
                SYS_ptrace,
                SYS_kill,
                SYS_setuid,
                SYS_mount,
            ] {
                assert!(!allowed(kind, nr, args(&[])), "{kind:?} allows {nr}");
            }
        }
    }

    #[test]
    fn test_no_list_maps_executable_memory() {
        use libc::*;
        let rw = (PROT_READ | PROT_WRITE) as u64;
        let rx = (PROT_READ | PROT_EXEC) as u64;
        for kind in ThreadKind::ALL {
            assert!(allowed(kind, SYS_mmap, args(&[0, 4096, rw])), "{kind:?}");
            assert!(!allowed(kind, SYS_mmap, args(&[0, 4096, rx])), "{kind:?}");
            assert!(
                allowed(kind, SYS_mprotect, args(&[0, 4096, rw])),
                "{kind:?}"
            );
            assert!(
                !allowed(kind, SYS_mprotect, args(&[0, 4096, rx])),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn test_signals_reach_only_this_process() {
        use libc::*;
        for kind in ThreadKind::ALL {
            let own = args(&[PID as u64, 7, SIGUSR1 as u64]);
            let other = args(&[PID as u64 + 1, 7, SIGUSR1 as u64]);
            assert!(allowed(kind, SYS_tgkill, own), "{kind:?}");
            assert!(!allowed(kind, SYS_tgkill, other), "{kind:?}");
        }
    }

    #[test]
    fn test_only_the_vcpus_enter_the_guest() {
        use libc::*;
        for kind in ThreadKind::ALL {
            let run = allowed(kind, SYS_ioctl, args(&[9, KVM_RUN]));
            assert_eq!(run, kind == ThreadKind::Vcpu, "{kind:?}");
        }
        // KVM_CREATE_VM, KVM_SET_USER_MEMORY_REGION, KVM_SET_REGS: never
        // once running.
        let create_vm = ioctl_expr(_IOC_NONE, 0xAE, 0x01, 0);
        let set_memory = ioctl_expr(_IOC_WRITE, 0xAE, 0x46, 32);
        for kind in ThreadKind::ALL {
            for request in [create_vm, set_memory] {
                assert!(!allowed(kind, SYS_ioctl, args(&[9, request])), "{kind:?}");
            }
        }
        assert!(allowed(
            ThreadKind::Vcpu,
            SYS_ioctl,
            args(&[9, KVM_INTERRUPT])
        ));
        assert!(!allowed(ThreadKind::Vcpu, SYS_ioctl, args(&[9, TCGETS])));
    }

    #[test]
    fn test_perf_events_are_per_thread() {
        use libc::*;
        let any_cpu = u64::from(u32::MAX);
        // The vCPU thread: only on itself, any CPU.
        assert!(allowed(
            ThreadKind::Vcpu,
            SYS_perf_event_open,
            args(&[1, 0, any_cpu])
        ));
        assert!(!allowed(
            ThreadKind::Vcpu,
            SYS_perf_event_open,
            args(&[1, 77, any_cpu])
        ));
        assert!(!allowed(
            ThreadKind::Vcpu,
            SYS_perf_event_open,
            args(&[1, 0, 0])
        ));
        // The perf reader: on a vCPU thread, never system-wide on a CPU.
        let reader = ThreadKind::PerfReader;
        assert!(allowed(
            reader,
            SYS_perf_event_open,
            args(&[1, 77, any_cpu])
        ));
        assert!(!allowed(
            reader,
            SYS_perf_event_open,
            args(&[1, u64::from(u32::MAX), 0])
        ));
        assert!(!allowed(
            ThreadKind::Api,
            SYS_perf_event_open,
            args(&[1, 0, any_cpu])
        ));
    }

    #[test]
    fn test_clone_makes_threads_not_processes() {
        use libc::*;
        let thread = (CLONE_VM | CLONE_THREAD | CLONE_SIGHAND) as u64;
        for kind in [ThreadKind::Api, ThreadKind::Vmm] {
            assert!(allowed(kind, SYS_clone, args(&[thread])), "{kind:?}");
            assert!(
                !allowed(kind, SYS_clone, args(&[SIGCHLD as u64])),
                "{kind:?}"
            );
        }
        // The threads that spawn nothing once filtered.
        for kind in [ThreadKind::Vcpu, ThreadKind::Signal, ThreadKind::Stress] {
            assert!(!allowed(kind, SYS_clone3, args(&[])), "{kind:?}");
            assert!(!allowed(kind, SYS_clone, args(&[thread])), "{kind:?}");
        }
    }

    #[test]
    fn test_only_the_file_writers_open_files() {
        use libc::*;
        for kind in ThreadKind::ALL {
            let opens = allowed(kind, SYS_openat, args(&[]));
            let writes_files = matches!(kind, ThreadKind::Vmm | ThreadKind::Api);
            assert_eq!(opens, writes_files, "{kind:?}");
        }
    }

    #[test]
    fn test_the_vmm_list_holds_what_its_children_need() {
        // A PET or perf reader thread spawned by the filtered VMM thread
        // runs under both filters.
        let vmm = rules(ThreadKind::Vmm, PID);
        for child in [ThreadKind::Pet, ThreadKind::PerfReader] {
            for (call, child_rules) in rules(child, PID) {
                let parent = vmm
                    .get(&call)
                    .unwrap_or_else(|| panic!("{child:?}: {call}"));
                assert!(
                    parent.is_empty() || child_rules.iter().all(|r| parent.contains(r)),
                    "{child:?}: {call}"
                );
            }
        }
    }

    #[test]
    fn test_a_spawned_thread_can_install_its_own_filter() {
        use libc::*;
        let mode = u64::from(SECCOMP_SET_MODE_FILTER);
        let no_new_privs = PR_SET_NO_NEW_PRIVS as u64;
        for kind in [ThreadKind::Api, ThreadKind::Vmm] {
            assert!(
                allowed(kind, SYS_prctl, args(&[no_new_privs, 1])),
                "{kind:?}"
            );
            assert!(allowed(kind, SYS_seccomp, args(&[mode, 0, 0])), "{kind:?}");
            // Not for every thread of the process at once (TSYNC).
            let tsync = u64::from(SECCOMP_FILTER_FLAG_TSYNC as u32);
            assert!(
                !allowed(kind, SYS_seccomp, args(&[mode, tsync, 0])),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn test_the_signal_thread_changes_only_the_stop_signals() {
        use libc::*;
        let signal = ThreadKind::Signal;
        assert!(allowed(signal, SYS_rt_sigaction, args(&[SIGTERM as u64])));
        assert!(allowed(signal, SYS_rt_sigaction, args(&[SIGINT as u64])));
        assert!(!allowed(signal, SYS_rt_sigaction, args(&[SIGSYS as u64])));
        assert!(!allowed(
            ThreadKind::Vcpu,
            SYS_rt_sigaction,
            args(&[SIGSYS as u64])
        ));
    }
}
