//! The built-in workloads, chosen by the VMM in the boot-information block
//! (`metronome bench`'s are in [`bench`], the hostile guest in [`chaos`]).
//!
//! The thread bodies run at CPL3 (natively on kvm_pvm); the kernel hooks
//! (`start`, `on_tick`, `on_ipi`) run at CPL0 and stay short.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use metronome_abi::{boot_flags, exit, layout, report_key, GuestReport, VcpuShared, Workload};

use crate::drivers::{console, control, timer, vic};
use crate::percpu::{self, PerCpu};
use crate::text::Buf;
use crate::{arch, boot, sched, syscall};

mod bench;
mod chaos;

/// Total ping-pong round trips completed (vCPU 0's view).
static PINGPONG_DONE: AtomicU64 = AtomicU64::new(0);
static PINGPONG_STARTED: AtomicBool = AtomicBool::new(false);
/// Work units finished by demo threads.
static DEMO_WORK: AtomicU64 = AtomicU64::new(0);

fn workload() -> Option<Workload> {
    Workload::from_u32(boot::info().workload)
}

/// Creates this vCPU's threads (or runs a special boot-time workload).
pub fn start(cpu: &mut PerCpu) {
    let id = cpu.id;
    match workload() {
        Some(Workload::ExitNow) if id == 0 => exit_vm(cpu, exit::GUEST_OK),
        Some(Workload::SpinCpl0) if id == 0 => {
            console::write(b"spinning at CPL0 with interrupts off\n");
            arch::cli();
            loop {
                arch::pause();
            }
        }
        Some(Workload::Fault) if id == 0 => {
            spawn(cpu, b"faulter", faulter, 0);
        }
        Some(Workload::Profile) => spawn_profile(cpu),
        Some(Workload::BenchIdle) => {}
        Some(Workload::BenchCompute) => bench::spawn_compute(cpu),
        Some(Workload::Chaos) => chaos::spawn_chaos(cpu),
        Some(_) => spawn_demo(cpu),
        None => panic!("unknown workload in boot-information block"),
    }
}

fn spawn(cpu: &mut PerCpu, base: &[u8], entry: sched::Entry, arg: u64) {
    let mut name = Buf::<16>::new();
    name.push(base).push(b"/").num(u64::from(cpu.id));
    if sched::spawn(cpu, name.as_bytes(), entry, arg).is_none() {
        panic!("out of thread slots or stack memory");
    }
}

fn spawn_demo(cpu: &mut PerCpu) {
    let id = u64::from(cpu.id);
    spawn(cpu, b"spin", spinner, id);
    spawn(cpu, b"sleep", sleeper, id);
    spawn(cpu, b"mix", mixer, id);
    if id == 0 && boot::info().flags & boot_flags::PROFILE_MIDDLE_THIRD != 0 {
        spawn(cpu, b"profil", profiler, boot::info().duration_ns);
    }
}

fn spawn_profile(cpu: &mut PerCpu) {
    let vcpus = boot::info().vcpu_count;
    if vcpus >= 3 && cpu.id == vcpus - 1 {
        // With three or more vCPUs the last one mostly idles (halted), so
        // that host-side sampling can be seen to leave it alone (KT-I-1).
        spawn(cpu, b"sleepy", sleepy_thread, 0);
        return;
    }
    let id = u64::from(cpu.id);
    spawn(cpu, b"split", split_thread, 0);
    spawn(cpu, b"sleepy", sleepy_thread, 0);
    spawn(cpu, b"producer", producer_thread, id);
    spawn(cpu, b"consumer", consumer_thread, id);
}

/// Kernel hook on every scheduler tick (a dispatch that ran hardclock) of `cpu`.
pub fn on_tick(cpu: &mut PerCpu, now: u64) {
    if cpu.id != 0 {
        return;
    }
    let boot = boot::info();
    if workload() == Some(Workload::PingPong)
        && !PINGPONG_STARTED.load(Ordering::Relaxed)
        && percpu::online() == boot.vcpu_count
    {
        PINGPONG_STARTED.store(true, Ordering::Relaxed);
        if boot.vcpu_count < 2 || boot.workload_arg == 0 {
            console::write(b"ping-pong needs at least 2 vCPUs and 1 round\n");
            exit_vm(cpu, exit::GUEST_CHECK_FAILED);
            return;
        }
        vic::send_ipi(1);
    }
    if boot.duration_ns != 0 && now >= boot.duration_ns && workload() != Some(Workload::PingPong) {
        syscall::report(report_key::DEMO_WORK, DEMO_WORK.load(Ordering::Relaxed));
        if workload() == Some(Workload::Chaos) {
            syscall::report(report_key::CHAOS_ACTIONS, chaos::actions());
            syscall::report(report_key::CHAOS_ALIVE_NS, chaos::alive_ns(boot.vcpu_count));
        }
        exit_vm(cpu, exit::GUEST_OK);
    }
}

/// Kernel hook on every IPI taken by `cpu`: the ping-pong protocol.
///
/// vCPU 0 pings partners 1..n-1 in turn; a partner answers each ping with a
/// pong; vCPU 0 counts a round trip per pong and sends the next ping until every
/// partner has done `workload_arg` round trips.
pub fn on_ipi(cpu: &mut PerCpu, shared: &mut VcpuShared) {
    if workload() != Some(Workload::PingPong) {
        return;
    }
    shared.pingpong += 1;
    if cpu.id != 0 {
        vic::send_ipi(0);
        return;
    }
    let boot = boot::info();
    let done = PINGPONG_DONE.fetch_add(1, Ordering::Relaxed) + 1;
    let partners = u64::from(boot.vcpu_count - 1);
    if done >= boot.workload_arg * partners {
        syscall::report(report_key::PINGPONG_ROUNDS, done);
        exit_vm(cpu, exit::GUEST_OK);
    } else {
        vic::send_ipi((done % partners) as u32 + 1);
    }
}

/// Ends the VM with `code`: records the uptime, writes the debug-exit port and
/// leaves this vCPU idle (interrupts on) until the VMM stops it.
pub fn exit_vm(cpu: &mut PerCpu, code: u32) {
    // SAFETY: the report page is fixed and identity mapped; only the exiting
    // vCPU writes this field, through a raw place.
    unsafe {
        let page = layout::GUEST_REPORT as *mut GuestReport;
        (*page).uptime_at_exit_ns = timer::uptime_ns();
    }
    cpu.exiting = true;
    control::debug_exit(code);
}

// --- CPL3 thread bodies -------------------------------------------------------

#[inline(never)]
fn work(units: u64) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..units * 1000 {
        x = core::hint::black_box(x.rotate_left(5) ^ i).wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    DEMO_WORK.fetch_add(units, Ordering::Relaxed);
    x
}

extern "C" fn spinner(vcpu: u64) -> ! {
    let mut line = Buf::<64>::new();
    let _ = writeln!(
        line,
        "spinner on vCPU {vcpu} started at {} ns",
        syscall::uptime_ns()
    );
    syscall::write(line.as_bytes());
    loop {
        work(200);
    }
}

extern "C" fn sleeper(_vcpu: u64) -> ! {
    loop {
        work(20);
        syscall::sleep_ns(15_000_000);
    }
}

extern "C" fn mixer(_vcpu: u64) -> ! {
    loop {
        work(50);
        syscall::yield_now();
    }
}

// --- The designed profile ------------------------------------------------------
//
// split_thread -> split_outer -> leaf_sixty            60 %
//                             -> mid_thirty -> leaf_thirty   30 %
//                             -> leaf_ten              10 %
// Every leaf runs the same loop per unit, so time follows the unit counts.

/// The leaves' loop as a function of its own (the sampled frame of the
/// sleepy, producer and consumer threads).
#[inline(never)]
fn spin_units(units: u64) -> u64 {
    spin_units_inline(units)
}

#[inline(never)]
fn leaf_sixty(units: u64) -> u64 {
    core::hint::black_box(spin_units_inline(units))
}

#[inline(never)]
fn leaf_thirty(units: u64) -> u64 {
    core::hint::black_box(spin_units_inline(units))
}

#[inline(never)]
fn leaf_ten(units: u64) -> u64 {
    core::hint::black_box(spin_units_inline(units))
}

/// The leaves' loop, inlined into each leaf so the leaf itself is the sampled function.
#[inline(always)]
fn spin_units_inline(units: u64) -> u64 {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in 0..units * 20_000 {
        x = core::hint::black_box(x.rotate_left(7) ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    x
}

#[inline(never)]
fn mid_thirty(units: u64) -> u64 {
    core::hint::black_box(leaf_thirty(units))
}

/// Units per tenth of one pass of [`split_outer`]: one pass is 2500 units,
/// tens of milliseconds, many sampling periods long. A pass about as long as
/// the period (as 10 units, about 0.3 ms, was against 1 ms) aliases with it:
/// the fires fall on the same few points of every pass and the shares drift
/// from the design by whatever those points hit.
const SPLIT_TENTH: u64 = 250;

#[inline(never)]
fn split_outer() -> u64 {
    leaf_sixty(6 * SPLIT_TENTH) ^ mid_thirty(3 * SPLIT_TENTH) ^ leaf_ten(SPLIT_TENTH)
}

extern "C" fn split_thread(_arg: u64) -> ! {
    loop {
        core::hint::black_box(split_outer());
    }
}

extern "C" fn sleepy_thread(_arg: u64) -> ! {
    loop {
        core::hint::black_box(spin_units(1));
        syscall::sleep_ns(50_000_000);
    }
}

/// Per-vCPU counters the producer bumps and the consumer waits on.
static PRODUCED: [AtomicU64; metronome_abi::MAX_VCPUS as usize] =
    [const { AtomicU64::new(0) }; metronome_abi::MAX_VCPUS as usize];

extern "C" fn producer_thread(vcpu: u64) -> ! {
    let word = &PRODUCED[vcpu as usize];
    loop {
        core::hint::black_box(spin_units(1));
        word.fetch_add(1, Ordering::Release);
        syscall::wake(word);
        syscall::sleep_ns(20_000_000);
    }
}

extern "C" fn consumer_thread(vcpu: u64) -> ! {
    let word = &PRODUCED[vcpu as usize];
    let mut seen = 0;
    loop {
        // Blocks on the producer: runs only after each of its wakes.
        syscall::wait(word, seen);
        seen = word.load(Ordering::Acquire);
        core::hint::black_box(spin_units(1));
    }
}

/// Switches statclock profiling on for the middle third of the run.
extern "C" fn profiler(duration_ns: u64) -> ! {
    let sleep_until = |t: u64| {
        let now = syscall::uptime_ns();
        if t > now {
            syscall::sleep_ns(t - now);
        }
    };
    sleep_until(duration_ns / 3);
    syscall::profil(true);
    syscall::report_value(report_key::PROFIL_ON_NS, syscall::uptime_ns());
    sleep_until(2 * duration_ns / 3);
    syscall::profil(false);
    syscall::report_value(report_key::PROFIL_OFF_NS, syscall::uptime_ns());
    syscall::exit()
}

/// The address the fault workload reads: canonical, user range, never mapped.
pub const UNMAPPED_ADDRESS: u64 = 0x7f00_0000_0000;

extern "C" fn faulter(_arg: u64) -> ! {
    syscall::write(b"faulter: reading an unmapped address\n");
    // SAFETY: deliberately unsound: this read faults, which is the point of the workload.
    let value = unsafe { core::ptr::read_volatile(UNMAPPED_ADDRESS as *const u64) };
    syscall::report_value(0xdead, value);
    syscall::exit()
}
