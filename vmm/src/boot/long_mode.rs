//! x86_64 long-mode setup done by the VMM before the first guest instruction:
//! identity-mapped page tables, the GDT, one TSS per vCPU, and the initial
//! registers. There are no real-mode trampolines and no INIT/SIPI: every vCPU
//! starts directly in 64-bit mode at the kernel entry point.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use metronome_abi::{gdt, layout, MAX_VCPUS};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
/// The guest kernel and its threads share one address space; every page is
/// user-accessible (the guest is a test harness, not a security boundary).
const PTE_USER: u64 = 1 << 2;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
const PTE_HUGE: u64 = 1 << 7;
const PTE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;

const PAGE_4K: u64 = 0x1000;
const PAGE_2M: u64 = 0x20_0000;

/// CR0: protection, monitor coprocessor, extension type, numeric error, write protect, paging.
const CR0_LONG_MODE: u64 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
/// CR4: PAE, OSFXSR (fxsave/SSE), OSXMMEXCPT.
const CR4_LONG_MODE: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// EFER: long mode enable and active.
const EFER_LONG_MODE: u64 = (1 << 8) | (1 << 10);

/// Size of a TSS (without an I/O permission bitmap).
const TSS_SIZE: u64 = 104;

/// Writes the page tables: RAM `0..mem_bytes` identity mapped (4 KiB pages in
/// the first 2 MiB with page 0 left out, 2 MiB pages above), and the MMIO
/// window mapped uncached. Nothing else is mapped, so a stray guest access
/// faults in the guest instead of reaching the VMM.
pub fn write_page_tables(mem: &GuestMemoryMmap, mem_bytes: u64) -> Result<(), GuestMemoryError> {
    mem.write_obj(layout::PDPT | PTE_FLAGS, GuestAddress(layout::PML4))?;
    for i in 0..4u64 {
        let pd = layout::PD + i * PAGE_4K;
        mem.write_obj(pd | PTE_FLAGS, GuestAddress(layout::PDPT + i * 8))?;
    }
    mem.write_obj(layout::PT0 | PTE_FLAGS, GuestAddress(layout::PD))?;
    for page in 1..512u64 {
        mem.write_obj(
            (page * PAGE_4K) | PTE_FLAGS,
            GuestAddress(layout::PT0 + page * 8),
        )?;
    }
    let mut addr = PAGE_2M;
    while addr + PAGE_2M <= mem_bytes {
        mem.write_obj(addr | PTE_FLAGS | PTE_HUGE, GuestAddress(pd_entry(addr)))?;
        addr += PAGE_2M;
    }
    let mmio = layout::MMIO_BASE;
    mem.write_obj(
        mmio | PTE_FLAGS | PTE_HUGE | PTE_PCD | PTE_PWT,
        GuestAddress(pd_entry(mmio)),
    )?;
    Ok(())
}

/// Guest address of the page-directory entry that maps `addr` (below 4 GiB).
fn pd_entry(addr: u64) -> u64 {
    layout::PD + (addr / PAGE_2M) * 8
}

/// The flat GDT: null, kernel code/data, user data/code, one TSS per vCPU.
pub fn write_gdt(mem: &GuestMemoryMmap, vcpus: u32) -> Result<(), GuestMemoryError> {
    let entries: [u64; 5] = [
        0,
        0x00af_9a00_0000_ffff, // kernel code: 64-bit, DPL 0, present, readable
        0x00cf_9200_0000_ffff, // kernel data: DPL 0, writable
        0x00cf_f200_0000_ffff, // user data: DPL 3, writable
        0x00af_fa00_0000_ffff, // user code: 64-bit, DPL 3, readable
    ];
    for (i, entry) in entries.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT + i as u64 * 8))?;
    }
    for id in 0..vcpus {
        let base = tss_base(id);
        let limit = TSS_SIZE - 1;
        // A busy 64-bit TSS (type 0xb), present, matching the TR we load.
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x8b << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let high = base >> 32;
        let at = layout::GDT + u64::from(gdt::tss_selector(id));
        mem.write_obj(low, GuestAddress(at))?;
        mem.write_obj(high, GuestAddress(at + 8))?;
    }
    Ok(())
}

fn gdt_limit() -> u16 {
    gdt::tss_selector(MAX_VCPUS) - 1
}

fn tss_base(id: u32) -> u64 {
    layout::TSS + u64::from(id) * layout::TSS_STRIDE
}

/// Writes vCPU `id`'s TSS: RSP0 and IST1 on the interrupt stack, IST2 on the
/// exception stack, no I/O permission bitmap.
pub fn write_tss(mem: &GuestMemoryMmap, id: u32) -> Result<(), GuestMemoryError> {
    let base = tss_base(id);
    let region = layout::percpu_region(id);
    let ist1 = region + layout::PERCPU_IST1_TOP;
    let ist2 = region + layout::PERCPU_IST2_TOP;
    mem.write_obj(ist1, GuestAddress(base + 4))?; // RSP0
    mem.write_obj(ist1, GuestAddress(base + 36))?; // IST1
    mem.write_obj(ist2, GuestAddress(base + 44))?; // IST2
    mem.write_obj(TSS_SIZE as u16, GuestAddress(base + 102))?; // I/O map base: none
    Ok(())
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The special registers for vCPU `id`, on top of what KVM reported.
pub fn long_mode_sregs(id: u32, mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cr0 = CR0_LONG_MODE;
    sregs.cr3 = layout::PML4;
    sregs.cr4 = CR4_LONG_MODE;
    sregs.efer = EFER_LONG_MODE;
    sregs.cs = segment(gdt::KERNEL_CS, true);
    let data = segment(gdt::KERNEL_DS, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = gdt_limit();
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.tr = kvm_segment {
        base: tss_base(id),
        limit: (TSS_SIZE - 1) as u32,
        selector: gdt::tss_selector(id),
        type_: 0xb,
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs
}

/// The general registers for vCPU `id`: entry point, its boot stack, and the
/// arguments of `kmain(vcpu_id, boot_info)`. Interrupts are off.
pub fn entry_regs(id: u32, entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: layout::percpu_region(id) + layout::PERCPU_BOOT_STACK_TOP,
        rdi: u64::from(id),
        rsi: layout::BOOT_INFO,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)]).unwrap()
    }

    /// Walks the tables the way the MMU does (4-level, 2 MiB leaves allowed).
    fn translate(mem: &GuestMemoryMmap, va: u64) -> Option<u64> {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(layout::PML4 + ((va >> 39) & 511) * 8))
            .ok()?;
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 511) * 8))
            .ok()?;
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
            .ok()?;
        if pde & PTE_PRESENT == 0 {
            return None;
        }
        if pde & PTE_HUGE != 0 {
            return Some((pde & !0x1f_ffff & !(1 << 63)) + (va & 0x1f_ffff));
        }
        let pte: u64 = mem
            .read_obj(GuestAddress((pde & !0xfff) + ((va >> 12) & 511) * 8))
            .ok()?;
        (pte & PTE_PRESENT != 0).then_some((pte & !0xfff) + (va & 0xfff))
    }

    #[test]
    fn test_page_tables_identity_map_ram_and_mmio_only() {
        let mem = memory(64);
        write_page_tables(&mem, 64 << 20).unwrap();
        assert_eq!(translate(&mem, 0x10), None, "page 0 must stay unmapped");
        assert_eq!(translate(&mem, 0x1234), Some(0x1234));
        assert_eq!(translate(&mem, 0x20_0123), Some(0x20_0123));
        assert_eq!(translate(&mem, (64 << 20) - 8), Some((64 << 20) - 8));
        assert_eq!(translate(&mem, 64 << 20), None, "nothing past RAM");
        assert_eq!(
            translate(&mem, layout::MMIO_BASE + 0x1018),
            Some(layout::MMIO_BASE + 0x1018)
        );
        assert_eq!(translate(&mem, 0x7f00_0000_0000), None);
    }

    #[test]
    fn test_tss_descriptor_encodes_base_and_limit() {
        let mem = memory(64);
        write_gdt(&mem, 3).unwrap();
        let at = layout::GDT + u64::from(gdt::tss_selector(2));
        let low: u64 = mem.read_obj(GuestAddress(at)).unwrap();
        let base = ((low >> 16) & 0xff_ffff) | (((low >> 56) & 0xff) << 24);
        assert_eq!(base, tss_base(2));
        assert_eq!(low & 0xffff, TSS_SIZE - 1);
        assert_eq!((low >> 40) & 0xff, 0x8b);
    }
}
