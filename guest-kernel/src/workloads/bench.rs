//! `metronome bench`'s workloads.
//!
//! - [`Workload::BenchIdle`](metronome_abi::Workload::BenchIdle): no thread;
//!   each vCPU waits in HLT between its clock interrupts.
//! - [`Workload::BenchCompute`](metronome_abi::Workload::BenchCompute): one
//!   CPL3 compute thread per vCPU that stores its running operation count in
//!   its vCPU's slot of the bench page every [`BENCH_OPS_PER_UPDATE`]
//!   operations: a plain store from CPL3, so the VMM reads the guest's
//!   progress without stopping it, and the count costs no exit.

use metronome_abi::{layout, BenchPage, BENCH_OPS_PER_UPDATE};

use super::spawn;
use crate::percpu::PerCpu;

/// Creates this vCPU's compute thread.
pub fn spawn_compute(cpu: &mut PerCpu) {
    spawn(cpu, b"bench", compute_thread, u64::from(cpu.id));
}

/// One operation of the compute loop: a multiply and a rotate, kept by
/// `black_box` so that the loop is not folded away.
#[inline(always)]
fn op(x: u64, i: u64) -> u64 {
    core::hint::black_box(x.rotate_left(5) ^ i).wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// [`BENCH_OPS_PER_UPDATE`] operations.
#[inline(never)]
fn compute_batch(seed: u64) -> u64 {
    let mut x = seed;
    for i in 0..BENCH_OPS_PER_UPDATE {
        x = op(x, i);
    }
    x
}

extern "C" fn compute_thread(vcpu: u64) -> ! {
    let page = layout::BENCH_PAGE as *mut BenchPage;
    let mut done: u64 = 0;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    loop {
        x = compute_batch(x);
        done += BENCH_OPS_PER_UPDATE;
        // SAFETY: the bench page is fixed, identity mapped and user
        // accessible; this thread is the only writer of its vCPU's slot
        // (`vcpu` < MAX_VCPUS: it is the id of the vCPU that created it), and
        // the store is an aligned u64 the VMM reads as a whole.
        unsafe {
            core::ptr::addr_of_mut!((*page).ops[vcpu as usize]).write_volatile(done);
        }
    }
}
