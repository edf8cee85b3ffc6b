//! The hostile guest ([`Workload::Chaos`](metronome_abi::Workload::Chaos)):
//! vCPU 0 runs the demo threads and stays well-behaved; every other vCPU
//! runs one CPL3 `chaos/N` thread that misbehaves for the whole run, so
//! that the VMM can be seen to contain, count and survive it.
//!
//! Each round the thread draws one action from a xorshift64* generator
//! seeded from [`BootInfo::stat_seed`](metronome_abi::BootInfo::stat_seed)
//! and its vCPU id (a fixed seed replays the same actions):
//!
//! | action | what it does | how the VMM sees it |
//! |---|---|---|
//! | MMIO write | a random value (or 0, 1, `u64::MAX`) of a random width (1, 2, 4, 8 bytes) to a register, or a random offset, of the interrupt-controller, timer or control page, or to an unmapped address of the MMIO window | bad accesses per device, unmapped MMIO |
//! | MMIO read | a random width at a random (aligned) address of the window | bad accesses, unmapped MMIO |
//! | port write | a random value and width to a COM1 register, a debug-exit port or a random port, through [`syscall::chaos_out`] (port I/O needs CPL0) | UART and debug-exit bad accesses, unmapped ports |
//! | absent IPI | a well-formed IPI to a vCPU that does not exist | IPIs to absent vCPUs |
//! | extreme rearm | `TIMER_REARM_NS` with 0, 1 or `u64::MAX` | rearms of 0, clamped rearms |
//! | mask | interrupts off for 1 to 20 ms, spinning at CPL0 ([`syscall::chaos_mask`]) | late timer interrupts on this vCPU |
//! | frame pointers | computes with a hostile RBP (random, non-canonical, misaligned, in the MMIO window, a frame pointing at itself, a descending frame, the last word of RAM, the kernel's data) | walk errors of the samples |
//! | thread table | a random word into its own thread-table entry or an unused one | corrupt thread-table entries |
//!
//! What is *not* drawn, because it is a legitimate request that ends the VM
//! (the chaos must last the whole run): a 4-byte write to the debug-exit
//! port's first port (a guest exit), an 8-byte write to `CTL_FAULT` or
//! `CTL_PANIC` (a fault or panic report), and a well-formed IPI to a vCPU
//! that exists (a real interrupt; it would disturb the well-behaved vCPU
//! with vectors it does not expect). A drawn write that would be one of
//! these is changed into a misbehaving one (a narrower width, an absent
//! target). The thread never touches the kernel's private per-vCPU data or
//! its own vCPU page (the kernel trusts them), and never faults.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use metronome_abi::mmio::{
    CTL_BASE, CTL_FAULT, CTL_PANIC, CTL_PET_SELF_SAMPLE, TIMER_BASE, TIMER_CANCEL, TIMER_DEADLINE,
    TIMER_NOW, TIMER_REARM_NS, TIMER_RESUMES, TIMER_TRIGGER, VIC_BASE, VIC_EOI, VIC_ID, VIC_IPI,
};
use metronome_abi::{layout, port, ThreadInfo, VcpuShared, Vector, MAX_THREADS, MAX_VCPUS};

use super::spawn;
use crate::percpu::PerCpu;
use crate::{boot, syscall};

/// Chaos actions done, every chaos thread together.
static ACTIONS: AtomicU64 = AtomicU64::new(0);
/// Per vCPU: the uptime at the end of its chaos thread's last action.
static ALIVE_NS: [AtomicU64; MAX_VCPUS as usize] =
    [const { AtomicU64::new(0) }; MAX_VCPUS as usize];

/// The longest stretch with interrupts masked, ns: below the 50 ms a pause
/// waits for a vCPU to enable them, so that the end of the run stops this
/// vCPU at a clean point.
pub const MAX_MASK_NS: u64 = 20_000_000;

/// Size of the MMIO window the page tables map (one 2 MiB page): every
/// address in it past the three device pages exits to the VMM and finds no
/// device.
const WINDOW: u64 = 0x20_0000;

/// Creates this vCPU's threads: the demo threads on vCPU 0, one chaos
/// thread on every other vCPU.
pub fn spawn_chaos(cpu: &mut PerCpu) {
    if cpu.id == 0 {
        super::spawn_demo(cpu);
    } else {
        spawn(cpu, b"chaos", chaos_thread, u64::from(cpu.id));
    }
}

/// Chaos actions done so far, every chaos thread together.
pub fn actions() -> u64 {
    ACTIONS.load(Ordering::Relaxed)
}

/// The uptime up to which every chaos vCPU (1 to `vcpus - 1`) was still
/// acting: the smallest end of a last action (0 if one never acted).
pub fn alive_ns(vcpus: u32) -> u64 {
    (1..vcpus.min(MAX_VCPUS))
        .map(|v| ALIVE_NS[v as usize].load(Ordering::Relaxed))
        .min()
        .unwrap_or(0)
}

/// xorshift64* (Vigna): small, fast, and good enough to pick actions.
struct Rng(u64);

impl Rng {
    /// Seeded from the run's seed and the vCPU (splitmix64 of both, never 0).
    fn new(seed: u64, vcpu: u64) -> Self {
        let mut z = seed ^ vcpu.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Self(if z == 0 { 1 } else { z })
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// A random width: 1, 2, 4 or 8 bytes.
    fn width(&mut self) -> u64 {
        1 << self.below(4)
    }

    /// A random value, or one of the extremes.
    fn value(&mut self) -> u64 {
        match self.below(4) {
            0 => self.pick(&[0, 1, u64::MAX, u64::from(u32::MAX)]),
            _ => self.next(),
        }
    }
}

/// The thread's state: its generator, where it is, and two scratch frames.
struct Chaos {
    rng: Rng,
    vcpu: u32,
    vcpus: u32,
    /// Its own thread-table slot.
    slot: usize,
}

extern "C" fn chaos_thread(vcpu: u64) -> ! {
    let boot = boot::info();
    let vcpu = vcpu as u32;
    let mut chaos = Chaos {
        rng: Rng::new(boot.stat_seed, u64::from(vcpu)),
        vcpu,
        vcpus: boot.vcpu_count,
        slot: own_slot(vcpu),
    };
    loop {
        chaos.act();
        ACTIONS.fetch_add(1, Ordering::Relaxed);
        ALIVE_NS[vcpu as usize].store(uptime_ns(), Ordering::Relaxed);
    }
}

/// This thread's slot, from its vCPU's shared page (read before any
/// corruption: the kernel keeps `current_tid` there).
fn own_slot(vcpu: u32) -> usize {
    let page = (layout::percpu_region(vcpu) + layout::PERCPU_SHARED) as *const VcpuShared;
    // SAFETY: the shared page is identity mapped and readable from CPL3; a
    // plain aligned read of a u32 the kernel wrote when it switched us on.
    let tid = unsafe { core::ptr::addr_of!((*page).current_tid).read_volatile() };
    (tid as usize).saturating_sub(1).min(MAX_THREADS - 1)
}

/// The device time, read from CPL3 (a legitimate register read).
fn uptime_ns() -> u64 {
    // SAFETY: TIMER_NOW is a read-only register; the window is mapped.
    unsafe { mmio_read(TIMER_BASE + TIMER_NOW, 8) }
}

impl Chaos {
    /// One action, drawn with these weights (out of 64): MMIO writes 24,
    /// MMIO reads 8, port writes 12, absent IPIs 6, extreme rearms 6, frame
    /// pointers 4, thread table 3, mask 1 (a mask lasts milliseconds).
    fn act(&mut self) {
        match self.rng.below(64) {
            0..=23 => self.mmio_write(),
            24..=31 => {
                let addr = VIC_BASE + self.rng.below(WINDOW - 8);
                let width = self.rng.width();
                // SAFETY: any address in the mapped window is an MMIO exit;
                // a read changes nothing.
                unsafe { mmio_read(addr, width) };
            }
            32..=43 => self.port_write(),
            44..=49 => {
                // Well-formed, to a vCPU that does not exist.
                let beyond = u64::from(self.vcpus) + self.rng.below(1000);
                let target = self.rng.pick(&[beyond, u64::from(u32::MAX)]);
                let value = target << 32 | Vector::Ipi as u64;
                // SAFETY: an IPI write; the VMM refuses the absent target.
                unsafe { mmio_write(VIC_BASE + VIC_IPI, 8, value) };
            }
            50..=55 => {
                let ns = self.rng.pick(&[0, 1, u64::MAX]);
                // SAFETY: a rearm of this vCPU's timer: at worst a late or
                // early clock interrupt on this vCPU.
                unsafe { mmio_write(TIMER_BASE + TIMER_REARM_NS, 8, ns) };
            }
            56..=59 => self.frame_pointers(),
            60..=62 => self.thread_table(),
            _ => {
                syscall::chaos_mask(1_000_000 + self.rng.below(MAX_MASK_NS - 1_000_000));
            }
        }
    }

    /// A random write to a device page or an unmapped address of the window.
    fn mmio_write(&mut self) {
        const VIC: &[u64] = &[VIC_EOI, VIC_IPI, VIC_ID];
        const TIMER: &[u64] = &[
            TIMER_REARM_NS,
            TIMER_TRIGGER,
            TIMER_CANCEL,
            TIMER_NOW,
            TIMER_DEADLINE,
            TIMER_RESUMES,
        ];
        const CTL: &[u64] = &[CTL_FAULT, CTL_PANIC, CTL_PET_SELF_SAMPLE];
        let (base, registers) = match self.rng.below(4) {
            0 => (VIC_BASE, VIC),
            1 => (TIMER_BASE, TIMER),
            2 => (CTL_BASE, CTL),
            _ => (CTL_BASE + 0x1000, &[][..]),
        };
        let offset = if registers.is_empty() {
            self.rng.below(WINDOW - 0x3000 - 8)
        } else if self.rng.below(2) == 0 {
            self.rng.pick(registers)
        } else {
            self.rng.below(0x1000)
        };
        let addr = base + offset;
        let mut width = self.rng.width();
        let mut value = self.rng.value();
        // The legitimate requests that would end the run become bad widths
        // or absent targets (see the module docs).
        if addr == CTL_BASE + CTL_FAULT || addr == CTL_BASE + CTL_PANIC {
            width = width.min(4);
        }
        if addr == VIC_BASE + VIC_IPI && width == 8 {
            let well_formed = (value >> 8) & 0xff_ffff == 0 && (value as u8) >= 32;
            if well_formed && (value >> 32) < u64::from(self.vcpus) {
                value |= 1 << 8;
            }
        }
        // SAFETY: any address in the mapped window is an MMIO exit; the
        // writes that would end the VM were excluded above.
        unsafe { mmio_write(addr, width, value) };
    }

    /// A random write to COM1, the debug-exit ports or a random port.
    fn port_write(&mut self) {
        let port = match self.rng.below(3) {
            0 => port::COM1 + self.rng.below(8) as u16,
            1 => port::DEBUG_EXIT + self.rng.below(4) as u16,
            _ => self.rng.next() as u16,
        };
        let mut width = 1 << self.rng.below(3);
        if port == port::DEBUG_EXIT && width == 4 {
            // A 4-byte write there is a guest exit.
            width = 2;
        }
        syscall::chaos_out(port, width, self.rng.value() as u32);
    }

    /// Computes for a while with a hostile frame pointer, so that samples
    /// (and PET, if it finds the thread switched out there) walk it.
    fn frame_pointers(&mut self) {
        // A frame that points at itself, and one whose caller is below it.
        let mut frames = [0u64; 4];
        let base = frames.as_mut_ptr() as u64;
        frames[0] = base;
        frames[1] = 0x1234;
        frames[2] = base - 64;
        frames[3] = 0x5678;
        core::hint::black_box(&mut frames);
        let mem_end = boot::info().mem_bytes;
        let rbp = match self.rng.below(8) {
            0 => self.rng.next(),
            1 => 0x8000_0000_0000_0000 | self.rng.next() & 0xffff_fff8,
            2 => base | (1 + self.rng.below(7)),
            3 => layout::MMIO_BASE + self.rng.below(WINDOW / 8) * 8,
            4 => base,
            5 => base + 16,
            6 => mem_end - 8,
            _ => layout::percpu_region(self.vcpu) + layout::PERCPU_PRIVATE,
        };
        let iterations = 1_000_000 + self.rng.below(9_000_000);
        // SAFETY: see `spin_with_rbp`; `frames` lives until after it.
        unsafe { spin_with_rbp(rbp, iterations) };
        core::hint::black_box(&frames);
    }

    /// A random word into its own thread-table entry or an unused one.
    fn thread_table(&mut self) {
        let table = layout::THREAD_TABLE as *mut ThreadInfo;
        let slot = if self.rng.below(2) == 0 {
            self.slot
        } else {
            let slot = self.rng.below(MAX_THREADS as u64) as usize;
            // SAFETY: a plain read of a table word; the table is identity
            // mapped and user accessible.
            let tid = unsafe { core::ptr::addr_of!((*table.add(slot)).tid).read_volatile() };
            if tid == slot as u64 + 1 && slot != self.slot {
                // Another thread's valid entry: leave it alone.
                return;
            }
            slot
        };
        let words = core::mem::size_of::<ThreadInfo>() / 8;
        let word = self.rng.below(words as u64) as usize;
        let value = self.rng.value();
        // SAFETY: the word lies inside slot `slot` of the table (slot <
        // MAX_THREADS, word < its size / 8); the kernel only writes these
        // entries for the VMM and never reads back what it would trust.
        unsafe {
            (table.add(slot) as *mut u64)
                .add(word)
                .write_volatile(value)
        };
    }
}

/// Writes `value` at `addr` with one `mov` of `width` bytes (1, 2, 4 or 8;
/// any alignment).
///
/// # Safety
/// `addr` must be mapped, and the write must be one the caller means.
unsafe fn mmio_write(addr: u64, width: u64, value: u64) {
    // SAFETY: the caller vouches for the address; each arm is one store.
    unsafe {
        match width {
            1 => {
                asm!("mov byte ptr [{a}], {v:l}", a = in(reg) addr, v = in(reg) value, options(nostack))
            }
            2 => {
                asm!("mov word ptr [{a}], {v:x}", a = in(reg) addr, v = in(reg) value, options(nostack))
            }
            4 => {
                asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) value, options(nostack))
            }
            _ => {
                asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) value, options(nostack))
            }
        }
    }
}

/// Reads `width` bytes (1, 2, 4 or 8) at `addr` rounded down to a multiple
/// of `width`, with one load.
///
/// # Safety
/// As [`mmio_write`].
unsafe fn mmio_read(addr: u64, width: u64) -> u64 {
    let addr = addr & !(width - 1);
    // SAFETY: the caller vouches for the address, aligned for the width.
    unsafe {
        match width {
            1 => u64::from(core::ptr::read_volatile(addr as *const u8)),
            2 => u64::from(core::ptr::read_volatile(addr as *const u16)),
            4 => u64::from(core::ptr::read_volatile(addr as *const u32)),
            _ => core::ptr::read_volatile(addr as *const u64),
        }
    }
}

/// Spins `iterations` times (at least 1) with RBP set to `rbp`, then puts
/// the real frame pointer back.
///
/// # Safety
/// Nothing between the two moves uses RBP (the loop is two instructions);
/// an interrupt saves and restores it with the other registers.
unsafe fn spin_with_rbp(rbp: u64, iterations: u64) {
    // SAFETY: RBP is saved in a register the allocator gave us (an `out`
    // never shares an input's register) and restored before the block ends.
    unsafe {
        asm!(
            "mov {save}, rbp",
            "mov rbp, {rbp}",
            "2:",
            "dec {n}",
            "jnz 2b",
            "mov rbp, {save}",
            save = out(reg) _,
            rbp = in(reg) rbp,
            n = inout(reg) iterations.max(1) => _,
            options(nomem, nostack),
        );
    }
}
