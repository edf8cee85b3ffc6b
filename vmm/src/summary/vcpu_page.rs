//! Reading a vCPU's shared page ([`VcpuShared`]) while its guest may be
//! writing it: the generation protocol of `sysctl_clockintr` (TR-C-2).
//!
//! The guest sets `clockintr_gen` to 0, writes its clockintr statistics and
//! pending events, then sets it to the previous value plus one (never 0). The
//! host reads the generation (an atomic load), copies the page, and reads the
//! generation again; the copy is consistent if both reads saw the same non-zero
//! value. x86 keeps stores in order, so a compiler fence on the guest side and
//! acquire loads here are all the ordering this needs.

use std::sync::atomic::Ordering;

use metronome_abi::{layout, VcpuShared};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::guestmem::read_plain;

/// How often a reader retries a page the guest is writing.
const TRIES: u32 = 1000;

/// A copy of one vCPU's shared page.
#[derive(Clone, Copy, Debug)]
pub struct VcpuPage {
    /// The copy.
    pub page: VcpuShared,
    /// Whether the clockintr part of the copy is consistent. `false` when the
    /// guest was writing it on every try: a vCPU stopped in the middle of a
    /// publish (only one that kept interrupts disabled for long is stopped
    /// there).
    pub consistent: bool,
}

/// Reads vCPU `id`'s shared page from `mem` consistently (see the module
/// docs); `None` if the page is not guest memory.
pub fn read_vcpu_page(mem: &GuestMemoryMmap, id: u32) -> Option<VcpuPage> {
    let addr = GuestAddress(layout::percpu_region(id) + layout::PERCPU_SHARED);
    let gen_addr = addr.0 + std::mem::offset_of!(VcpuShared, clockintr_gen) as u64;
    let generation = || {
        mem.load::<u64>(GuestAddress(gen_addr), Ordering::Acquire)
            .ok()
    };
    let mut page: VcpuShared = read_plain(mem, addr)?;
    if page.cpu_inits == 0 {
        // clockintr_cpu_init has not run: nothing is published (the sysctl
        // skips such CPUs too).
        return Some(VcpuPage {
            page,
            consistent: true,
        });
    }
    for _ in 0..TRIES {
        let before = generation()?;
        if before != 0 {
            page = read_plain(mem, addr)?;
            std::sync::atomic::fence(Ordering::Acquire);
            if generation()? == before {
                return Some(VcpuPage {
                    page,
                    consistent: true,
                });
            }
        }
        std::thread::yield_now();
    }
    Some(VcpuPage {
        page: read_plain(mem, addr)?,
        consistent: false,
    })
}

/// One vCPU's clock counts as its guest kernel last wrote them: how many
/// times hardclock ran, and the figures that show a resume's re-sync
/// (CI-CPU-6). Read without the generation protocol: each field is one
/// aligned word the guest only increases or overwrites.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct VcpuClock {
    /// The vCPU.
    pub id: u32,
    /// hardclock() calls so far.
    pub hardclock: u64,
    /// clockintr_cpu_init calls: 1 after boot, one more per re-synchronised
    /// resume.
    pub cpu_inits: u64,
    /// Most hardclock() calls one dispatch made (a catch-up burst shows here).
    pub max_hardclock_batch: u64,
    /// hardclock() calls of the first dispatch after the last re-init.
    pub resume_first_batch: u64,
}

/// Every vCPU's [`VcpuClock`] in `mem` (a vCPU whose page is not guest
/// memory reads as zeros).
pub fn vcpu_clocks(mem: &GuestMemoryMmap, vcpus: u32) -> Vec<VcpuClock> {
    (0..vcpus)
        .map(|id| {
            let page = read_vcpu_page(mem, id).map(|p| p.page).unwrap_or_default();
            VcpuClock {
                id,
                hardclock: page.hardclock,
                cpu_inits: page.cpu_inits,
                max_hardclock_batch: page.max_hardclock_batch,
                resume_first_batch: page.resume_first_batch,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guestmem::write_plain;
    use metronome_abi::ClockintrStat;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn shared_addr(id: u32) -> GuestAddress {
        GuestAddress(layout::percpu_region(id) + layout::PERCPU_SHARED)
    }

    fn stat_addr(id: u32) -> GuestAddress {
        GuestAddress(shared_addr(id).0 + std::mem::offset_of!(VcpuShared, clockintr) as u64)
    }

    fn gen_addr(id: u32) -> GuestAddress {
        GuestAddress(shared_addr(id).0 + std::mem::offset_of!(VcpuShared, clockintr_gen) as u64)
    }

    fn memory() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let page = VcpuShared {
            cpu_inits: 1,
            clockintr_gen: 1,
            ..Default::default()
        };
        write_plain(&mem, shared_addr(0), &page).unwrap();
        mem
    }

    /// Every field `k`: a record a torn read would show with mixed values.
    fn record(k: u64) -> ClockintrStat {
        ClockintrStat {
            dispatched_ns: k,
            early: k,
            earliness_ns: k,
            lateness_ns: k,
            prompt: k,
            run: k,
            spurious: k,
        }
    }

    fn uniform(s: &ClockintrStat) -> bool {
        [
            s.early,
            s.earliness_ns,
            s.lateness_ns,
            s.prompt,
            s.run,
            s.spurious,
        ]
        .iter()
        .all(|&v| v == s.dispatched_ns)
    }

    #[test]
    fn test_tr_c_2_reads_are_consistent_while_the_guest_publishes() {
        let mem = Arc::new(memory());
        let done = Arc::new(AtomicBool::new(false));
        let (m, d) = (mem.clone(), done.clone());
        // The guest's publish protocol, as fast as it can go.
        let writer = std::thread::spawn(move || {
            let mut k = 1u64;
            while !d.load(Ordering::Relaxed) {
                m.store(0u64, gen_addr(0), Ordering::Release).unwrap();
                // Field by field, as the guest writes them.
                let r = record(k);
                for (i, v) in [
                    r.dispatched_ns,
                    r.early,
                    r.earliness_ns,
                    r.lateness_ns,
                    r.prompt,
                    r.run,
                    r.spurious,
                ]
                .into_iter()
                .enumerate()
                {
                    m.write_obj(v, GuestAddress(stat_addr(0).0 + 8 * i as u64))
                        .unwrap();
                }
                k += 1;
                m.store(k, gen_addr(0), Ordering::Release).unwrap();
            }
        });
        let mut consistent = 0;
        let mut last = 0;
        for _ in 0..2_000 {
            let read = read_vcpu_page(&mem, 0).unwrap();
            if read.consistent {
                consistent += 1;
                let stat = read.page.clockintr;
                assert!(uniform(&stat), "torn read accepted: {stat:?}");
                assert!(stat.dispatched_ns >= last, "went backwards");
                last = stat.dispatched_ns;
            }
        }
        done.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(consistent > 0, "no consistent read in 2000");
    }

    #[test]
    fn test_tr_c_2_a_writer_stopped_mid_publish_is_reported() {
        let mem = memory();
        let mut page: VcpuShared = read_plain(&mem, shared_addr(0)).unwrap();
        page.clockintr = record(3);
        write_plain(&mem, shared_addr(0), &page).unwrap();
        assert!(read_vcpu_page(&mem, 0).unwrap().consistent);
        // Stopped between gen = 0 and gen = k + 1.
        mem.store(0u64, gen_addr(0), Ordering::Release).unwrap();
        let read = read_vcpu_page(&mem, 0).unwrap();
        assert!(!read.consistent);
        assert_eq!(read.page.clockintr, record(3));
        // Not initialised: nothing published, nothing to wait for.
        let fresh = read_vcpu_page(&mem, 1).unwrap();
        assert!(fresh.consistent);
        assert_eq!(fresh.page.cpu_inits, 0);
    }
}
