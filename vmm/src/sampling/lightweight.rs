//! Lightweight PET (spec 4.4): the PET timer is an ordinary on-CPU timer
//! whose leader bumps a generation (PET-L-1, in the engine), and a thread
//! switched onto a vCPU samples itself when its generation is stale
//! (PET-L-2). The guest's scheduler cannot call into the host for free, so
//! the two sides meet in the PET page ([`metronome_abi::PetPage`]):
//!
//! 1. The VMM publishes the generation in the page whenever it changes,
//!    under the engine lock: after each expiry (the leader's bump), at start
//!    and at stop (0: not active) ([`LightweightPet::publish`]).
//! 2. The guest's `sched::load` reads it when it switches a thread on; if it
//!    is not 0 and differs from the generation at which the VMM last sampled
//!    the thread (`sampled[slot]`), it writes the thread id to
//!    `CTL_PET_SELF_SAMPLE`: one MMIO exit.
//! 3. The control page notes the request for that vCPU
//!    ([`LightweightPet::request`]); at the vCPU's next loop top, with the
//!    guest stopped in its scheduler and the incoming thread's context in the
//!    interrupt frame, [`LightweightPet::admit`] decides under the engine lock
//!    and stamps the thread; the vCPU thread samples itself with the PET
//!    action (`NON_INTERRUPT | PEND_USER`) between `PET_SAMPLE_THREAD` start
//!    and end, into the PET profile.
//! 4. Every on-CPU timer sample also stamps the thread it samples
//!    ([`LightweightPet::stamp_current`], KT-SM-6), so a thread that was
//!    running at a fire does not sample itself again for that generation.
//!
//! The guest is untrusted: a request is admitted only for the thread the
//! vCPU's shared page says is current, and at most one is pending per vCPU;
//! anything else is counted in `bad_requests` and ignored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use kperf::{sample_flags, Kperf, SampleRequest};
use metronome_abi::{layout, PetPage, ThreadInfo, MAX_THREADS};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::trace::current_tid;

/// Lightweight PET's state shared by the vCPU threads and the control page.
#[derive(Debug)]
pub struct LightweightPet {
    /// The guest memory holding the PET page (attached when the VM is built).
    mem: OnceLock<GuestMemoryMmap>,
    /// The generation the PET page holds (0: lightweight PET not active).
    published: AtomicU64,
    /// Per vCPU: the thread id of a pending self-sample request (0 = none).
    pending: Vec<AtomicU64>,
    /// Self-samples taken (`lightweight_self_samples`).
    pub self_samples: AtomicU64,
    /// Requests that took no sample though well formed: lightweight PET was
    /// no longer active (a stop raced the request), PET has no action, or
    /// the thread had been sampled in this generation meanwhile.
    pub refused: AtomicU64,
    /// Guest misbehaviour: a thread id that is not a thread-table slot or
    /// not the vCPU's current thread, or a second request before the first
    /// was served.
    pub bad_requests: AtomicU64,
}

/// What [`LightweightPet::admit`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Sample: the request, and the `PET_SAMPLE_THREAD` start arguments
    /// (generation, the thread's previous generation, its switch count, 0).
    Sample(SampleRequest, [u64; 4]),
    /// The thread was already sampled in this generation: `PET_SAMPLE_THREAD`
    /// without a qualifier, arguments (generation, the thread's generation).
    Matched([u64; 4]),
    /// Not active or no PET action: nothing recorded.
    Refused,
    /// Not the vCPU's current thread: nothing recorded.
    Bad,
}

/// Guest address of `field` (an offset into the PET page).
fn page_addr(offset: usize) -> GuestAddress {
    GuestAddress(layout::PET_PAGE + offset as u64)
}

/// Guest address of thread-table slot `slot`'s `sampled` generation.
fn sampled_addr(slot: usize) -> GuestAddress {
    page_addr(std::mem::offset_of!(PetPage, sampled) + slot * 8)
}

/// The thread-table slot of thread id `tid` (ids are slot + 1).
fn slot_of(tid: u64) -> Option<usize> {
    let slot = usize::try_from(tid.checked_sub(1)?).ok()?;
    (slot < MAX_THREADS).then_some(slot)
}

impl LightweightPet {
    /// The state for `vcpus` vCPUs, with no guest memory yet.
    pub fn new(vcpus: usize) -> Self {
        Self {
            mem: OnceLock::new(),
            published: AtomicU64::new(0),
            pending: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            self_samples: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            bad_requests: AtomicU64::new(0),
        }
    }

    /// Gives the state the guest memory that holds the PET page (once).
    pub fn attach(&self, mem: GuestMemoryMmap) {
        let _ = self.mem.set(mem);
    }

    /// The generation the PET page holds (0: lightweight PET not active).
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// Publishes the engine's generation if lightweight PET is active, else
    /// 0. Call with the engine lock held (so that a stop's 0 wins) after
    /// anything that may change it: an expiry, start, stop.
    pub fn publish(&self, engine: &Kperf) {
        let generation = if engine.lightweight_pet_active() {
            engine.pet_generation()
        } else {
            0
        };
        if self.published.swap(generation, Ordering::AcqRel) == generation {
            return;
        }
        if let Some(mem) = self.mem.get() {
            let at = page_addr(std::mem::offset_of!(PetPage, generation));
            // An aligned 64-bit store: the guest reads it with one load.
            let _ = mem.store(generation, at, Ordering::Release);
        }
    }

    /// The control page's `CTL_PET_SELF_SAMPLE` from vCPU `vcpu` with
    /// `value` (a thread id): noted for the vCPU's next loop top. A value
    /// that is no thread id, a vCPU that does not exist or a second request
    /// before the first was served is counted and ignored.
    pub fn request(&self, vcpu: u32, value: u64) {
        let noted = slot_of(value).is_some()
            && self.pending.get(vcpu as usize).is_some_and(|slot| {
                slot.compare_exchange(0, value, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            });
        if !noted {
            self.bad_requests.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The thread id of vCPU `vcpu`'s pending request, if any (cheap when none).
    pub fn take_request(&self, vcpu: u32) -> Option<u64> {
        let slot = self.pending.get(vcpu as usize)?;
        if slot.load(Ordering::Acquire) == 0 {
            return None;
        }
        Some(slot.swap(0, Ordering::AcqRel)).filter(|&tid| tid != 0)
    }

    /// Decides, under the engine lock, vCPU `vcpu`'s request for thread
    /// `tid` (PET-L-2): sample it with PET's action if lightweight PET is
    /// active and the thread's generation is stale, stamping the thread with
    /// the current generation (KT-SM-6). Counts refusals and bad requests.
    pub fn admit(&self, engine: &Kperf, mem: &GuestMemoryMmap, vcpu: u32, tid: u64) -> Admission {
        let action = engine.pet_action();
        if !engine.lightweight_pet_active() || action == 0 {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Admission::Refused;
        }
        let Some(slot) = slot_of(tid).filter(|_| current_tid(mem, vcpu) == tid) else {
            self.bad_requests.fetch_add(1, Ordering::Relaxed);
            return Admission::Bad;
        };
        let generation = engine.pet_generation();
        let previous = mem
            .load::<u64>(sampled_addr(slot), Ordering::Acquire)
            .unwrap_or(0);
        if previous == generation {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Admission::Matched([generation, previous, 0, 0]);
        }
        let _ = mem.store(generation, sampled_addr(slot), Ordering::Release);
        let switches = mem
            .read_obj::<u64>(GuestAddress(
                layout::THREAD_TABLE
                    + (slot * std::mem::size_of::<ThreadInfo>()
                        + std::mem::offset_of!(ThreadInfo, switches)) as u64,
            ))
            .unwrap_or(0);
        let request = SampleRequest {
            action,
            settings: engine.action(action),
            flags: sample_flags::NON_INTERRUPT | sample_flags::PEND_USER,
            timer: engine.pet_timer(),
        };
        Admission::Sample(request, [generation, previous, switches, 0])
    }

    /// KT-SM-6: a timer sample of vCPU `vcpu` stamps its current thread with
    /// the current generation, which suppresses that thread's self-sample in
    /// this generation. Call under the engine lock; nothing when lightweight
    /// PET is not active or the vCPU is idle.
    pub fn stamp_current(&self, engine: &Kperf, mem: &GuestMemoryMmap, vcpu: u32) {
        if !engine.lightweight_pet_active() {
            return;
        }
        if let Some(slot) = slot_of(current_tid(mem, vcpu)) {
            let _ = mem.store(
                engine.pet_generation(),
                sampled_addr(slot),
                Ordering::Release,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guestmem::write_plain;
    use kperf::{sampler, CpuExpiry};
    use metronome_abi::VcpuShared;

    const MS: u64 = 1_000_000;

    /// 64 MiB of guest memory; vCPU 0 runs thread `tid`, switched on 3 times.
    fn guest(tid: u32) -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        set_current(&mem, tid);
        if let Some(slot) = slot_of(u64::from(tid)) {
            let info = ThreadInfo {
                tid: u64::from(tid),
                switches: 3,
                ..Default::default()
            };
            let at = layout::THREAD_TABLE + (slot * std::mem::size_of::<ThreadInfo>()) as u64;
            write_plain(&mem, GuestAddress(at), &info).unwrap();
        }
        mem
    }

    fn set_current(mem: &GuestMemoryMmap, tid: u32) {
        let page = VcpuShared {
            current_tid: tid,
            ..Default::default()
        };
        let at = layout::percpu_region(0) + layout::PERCPU_SHARED;
        write_plain(mem, GuestAddress(at), &page).unwrap();
    }

    fn page(mem: &GuestMemoryMmap) -> PetPage {
        let mut page = PetPage {
            generation: mem.read_obj(page_addr(0)).unwrap(),
            ..Default::default()
        };
        for (slot, value) in page.sampled.iter_mut().enumerate() {
            *value = mem.read_obj(sampled_addr(slot)).unwrap();
        }
        page
    }

    /// One vCPU, action 2 (thread info and user stack), the lightweight PET
    /// timer 0 every 10 ms.
    fn engine() -> Kperf {
        let mut k = Kperf::new();
        k.set_action_count(2).unwrap();
        k.set_action_samplers(2, sampler::TH_INFO | sampler::USTACK)
            .unwrap();
        k.set_timer_count(1).unwrap();
        k.set_timer_period(0, 10 * MS).unwrap();
        k.set_timer_action(0, 2).unwrap();
        k.set_pet_timer(0).unwrap();
        k.set_lightweight_pet(true).unwrap();
        k
    }

    /// Runs vCPU 0's expiry at `now` and publishes, as the vCPU thread does.
    fn fire(k: &mut Kperf, lw: &LightweightPet, now: u64) {
        assert!(matches!(k.expire(0, now), CpuExpiry::Handled { .. }));
        lw.publish(k);
    }

    fn lightweight(mem: &GuestMemoryMmap) -> LightweightPet {
        let lw = LightweightPet::new(1);
        lw.attach(mem.clone());
        lw
    }

    /// vCPU 0 runs thread `tid`, sampling is on and the PET timer fired once.
    fn after_one_fire(tid: u32) -> (GuestMemoryMmap, LightweightPet, Kperf) {
        let mem = guest(tid);
        let lw = lightweight(&mem);
        let mut k = engine();
        k.set_sampling(true, 0, 1).unwrap();
        fire(&mut k, &lw, 10 * MS + 1);
        (mem, lw, k)
    }

    #[test]
    fn test_pet_l1_the_page_holds_the_generation_only_while_active() {
        let mem = guest(1);
        let lw = lightweight(&mem);
        let mut k = engine();
        lw.publish(&k);
        assert_eq!(page(&mem).generation, 0);
        k.set_sampling(true, 0, 1).unwrap();
        lw.publish(&k);
        // No fire yet: generation 0, so no thread asks.
        assert_eq!(page(&mem).generation, 0);
        fire(&mut k, &lw, 10 * MS + 1);
        assert_eq!((page(&mem).generation, lw.published()), (1, 1));
        fire(&mut k, &lw, 20 * MS + 1);
        assert_eq!(page(&mem).generation, 2);
        // Stopping publishes 0: the guest stops asking.
        k.set_sampling(false, 0, 1).unwrap();
        lw.publish(&k);
        assert_eq!(page(&mem).generation, 0);
        // PET-L-3: the engine refused a change while sampling, allows it off.
        k.set_sampling(true, 30 * MS, 1).unwrap();
        assert_eq!(k.set_lightweight_pet(false), Err(kperf::KperfError::Busy));
        assert!(k.lightweight_pet());
        k.set_sampling(false, 0, 1).unwrap();
        assert_eq!(k.set_lightweight_pet(false), Ok(()));
        // Traditional PET never publishes a generation.
        k.set_sampling(true, 40 * MS, 1).unwrap();
        lw.publish(&k);
        assert_eq!(page(&mem).generation, 0);
    }

    #[test]
    fn test_pet_l2_a_stale_thread_samples_once_per_generation() {
        let mem = guest(5);
        let lw = lightweight(&mem);
        let mut k = engine();
        k.set_sampling(true, 0, 1).unwrap();
        // Three fires while thread 5 is away.
        for n in 1..=3 {
            fire(&mut k, &lw, n * 10 * MS + 1);
        }
        lw.request(0, 5);
        let tid = lw.take_request(0).unwrap();
        assert_eq!(lw.take_request(0), None);
        let Admission::Sample(request, args) = lw.admit(&k, &mem, 0, tid) else {
            panic!("no sample");
        };
        assert_eq!(request.action, 2);
        assert_eq!(request.settings, k.action(2));
        assert_eq!(
            request.flags,
            sample_flags::NON_INTERRUPT | sample_flags::PEND_USER
        );
        assert_eq!(request.timer, 0);
        // (generation, previous generation, switches, 0).
        assert_eq!(args, [3, 0, 3, 0]);
        // Stamped: the guest's next switch-on finds the generation matching.
        assert_eq!(page(&mem).sampled[4], 3);
        // A request anyway (a guest that did not look) samples nothing.
        assert_eq!(lw.admit(&k, &mem, 0, 5), Admission::Matched([3, 3, 0, 0]));
        assert_eq!(lw.refused.load(Ordering::Relaxed), 1);
        // The next fire makes it stale again, and it samples once more.
        fire(&mut k, &lw, 40 * MS + 1);
        assert!(matches!(
            lw.admit(&k, &mem, 0, 5),
            Admission::Sample(_, [4, 3, 3, 0])
        ));
        assert_eq!(lw.bad_requests.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn test_kt_sm_6_a_timer_sample_stamps_the_running_thread() {
        let (mem, lw, k) = after_one_fire(7);
        lw.stamp_current(&k, &mem, 0);
        assert_eq!(page(&mem).sampled[6], 1);
        assert!(matches!(lw.admit(&k, &mem, 0, 7), Admission::Matched(_)));
        // Idle: nothing to stamp.
        set_current(&mem, 0);
        lw.stamp_current(&k, &mem, 0);
        assert_eq!(page(&mem).sampled.iter().filter(|&&g| g != 0).count(), 1);
    }

    #[test]
    fn test_pet_l2_no_sample_when_not_active_or_without_a_pet_action() {
        let mem = guest(1);
        let lw = lightweight(&mem);
        let mut k = engine();
        assert_eq!(lw.admit(&k, &mem, 0, 1), Admission::Refused);
        // A PET timer without an action: PET has none.
        let mut no_action = Kperf::new();
        no_action.set_action_count(1).unwrap();
        no_action.set_timer_count(1).unwrap();
        no_action.set_pet_timer(0).unwrap();
        no_action.set_lightweight_pet(true).unwrap();
        no_action.set_sampling(true, 0, 1).unwrap();
        assert_eq!(lw.admit(&no_action, &mem, 0, 1), Admission::Refused);
        k.set_sampling(true, 0, 1).unwrap();
        fire(&mut k, &lw, 10 * MS + 1);
        assert!(matches!(lw.admit(&k, &mem, 0, 1), Admission::Sample(..)));
        assert_eq!(lw.refused.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn test_a_misbehaving_guest_is_counted_and_contained() {
        let (mem, lw, k) = after_one_fire(2);
        // Not thread ids, or no such vCPU: never pending.
        for value in [0, MAX_THREADS as u64 + 1, u64::MAX] {
            lw.request(0, value);
            assert_eq!(lw.take_request(0), None);
        }
        lw.request(9, 2);
        assert_eq!(lw.take_request(9), None);
        // A flood: one pending per vCPU, the rest counted.
        for _ in 0..100 {
            lw.request(0, 2);
        }
        assert_eq!(lw.take_request(0), Some(2));
        assert_eq!(lw.take_request(0), None);
        assert_eq!(lw.bad_requests.load(Ordering::Relaxed), 4 + 99);
        // A thread that is not the current one: no sample, no stamp.
        assert_eq!(lw.admit(&k, &mem, 0, 3), Admission::Bad);
        assert_eq!(page(&mem).sampled[2], 0);
        assert_eq!(lw.bad_requests.load(Ordering::Relaxed), 104);
        // Without guest memory attached, publishing still tracks the value.
        let detached = LightweightPet::new(1);
        detached.publish(&k);
        assert_eq!(detached.published(), 1);
    }
}
