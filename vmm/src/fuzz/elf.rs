//! ELF input: the `--kernel` loader and the symbolizer over the kernel's
//! symbols and DWARF.

use std::cell::RefCell;

use metronome_abi::layout::{KERNEL_BASE, KERNEL_LIMIT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::loader;
use crate::profile::Symbolizer;

/// A small x86_64 executable with symbols and DWARF 5 (an inlined function,
/// two calls): `seeds/tiny.c`, built with `gcc -g -O1 -nostdlib -static
/// -fno-asynchronous-unwind-tables -no-pie -Wl,--build-id
/// -Wl,-Ttext-segment=0x200000 -Wl,-z,noseparate-code`.
pub const TINY_ELF: &[u8] = include_bytes!("seeds/tiny.elf");

thread_local! {
    /// Guest memory covering the kernel window, reused by every load on
    /// this thread (a fresh 16 MiB mapping per input would dominate).
    static MEMORY: RefCell<Option<GuestMemoryMmap>> = const { RefCell::new(None) };
}

/// Target `kernel_elf`: `data` as the `--kernel` image.
///
/// # Panics
///
/// When an accepted kernel's entry or end lies outside the kernel window,
/// loading it into memory that covers the window fails, or the load's
/// answer differs from the check's.
pub fn kernel_elf(data: &[u8]) {
    let Ok(checked) = loader::check(data) else {
        return;
    };
    assert!(
        (KERNEL_BASE..KERNEL_LIMIT).contains(&checked.entry),
        "entry {:#x} accepted outside the kernel window",
        checked.entry
    );
    assert!(
        checked.end > KERNEL_BASE && checked.end <= KERNEL_LIMIT && checked.end % 4096 == 0,
        "end {:#x} accepted outside the kernel window or unaligned",
        checked.end
    );
    MEMORY.with(|cell| {
        let mut memory = cell.borrow_mut();
        let mem = memory.get_or_insert_with(|| {
            // Cannot panic: one anonymous mapping of 16 MiB.
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), KERNEL_LIMIT as usize)])
                .expect("16 MiB of guest memory")
        });
        let loaded = loader::load(data, mem)
            .unwrap_or_else(|e| panic!("a checked kernel does not load: {e}"));
        assert_eq!(loaded, checked, "load and check disagree");
        // The entry point's byte is the file's byte there, or .bss.
        let mut byte = [0u8; 1];
        mem.read_slice(&mut byte, GuestAddress(loaded.entry))
            .unwrap_or_else(|e| panic!("the entry point cannot be read back: {e}"));
    });
}

/// Target `symbolize`: `data` as the kernel image whose symbols and DWARF
/// name the frames of a profile; the addresses looked up are the image's
/// bounds and eight taken from the input's end.
///
/// # Panics
///
/// When an address symbolizes to no frame, a frame without a name, or a
/// frame for another address.
pub fn symbolize(data: &[u8]) {
    let Ok(symbolizer) = Symbolizer::new(data) else {
        return;
    };
    let _ = symbolizer.build_id();
    let mut addrs = vec![0, 1, u64::MAX, KERNEL_BASE];
    if let Some((lo, hi)) = symbolizer.image_range() {
        addrs.extend([
            lo,
            hi,
            hi.wrapping_sub(1),
            lo.wrapping_add((hi.wrapping_sub(lo)) / 2),
        ]);
    }
    let tail = &data[data.len().saturating_sub(64)..];
    addrs.extend(
        tail.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())),
    );
    for addr in addrs {
        for is_return_address in [false, true] {
            let frames = symbolizer.frames(addr, is_return_address);
            assert!(!frames.is_empty(), "{addr:#x}: no frame");
            for frame in &frames {
                assert!(
                    !frame.function.is_empty(),
                    "{addr:#x}: a frame without a name"
                );
                assert_eq!(frame.addr, addr, "{addr:#x}: a frame of another address");
            }
            let _ = symbolizer.function_name(addr);
        }
    }
}

/// A minimal kernel: the ELF header and one `PT_LOAD` of `code` at
/// `KERNEL_BASE`, entered at its first byte.
pub fn minimal_kernel(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let mut elf = Vec::with_capacity(EHDR + PHDR + code.len());
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // e_machine: EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&KERNEL_BASE.to_le_bytes()); // e_entry
    elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [EHDR, PHDR, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        elf.extend_from_slice(&(half as u16).to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R X
    let offset = (EHDR + PHDR) as u64;
    let size = code.len() as u64;
    for word in [
        offset,
        KERNEL_BASE,
        KERNEL_BASE,
        size,
        size + 0x1000,
        0x1000,
    ] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}

/// Seeds of `kernel_elf`.
pub fn kernel_seeds() -> Vec<Vec<u8>> {
    vec![minimal_kernel(&[0xf4; 16]), TINY_ELF.to_vec()]
}

/// Seeds of `symbolize`.
pub fn symbolize_seeds() -> Vec<Vec<u8>> {
    vec![TINY_ELF.to_vec(), minimal_kernel(&[0x90; 32])]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::tests::{check_target, mutate, Rng};

    #[test]
    fn test_kernel_elf_property() {
        check_target("kernel_elf", 4000, 31);
    }

    #[test]
    fn test_symbolize_property() {
        check_target("symbolize", 1500, 32);
    }

    /// Found by libFuzzer: `tiny.elf` with a symbol's or a DWARF
    /// function's name made empty gave frames named `""`.
    #[test]
    fn test_regression_nameless_symbols_name_no_frame() {
        symbolize(include_bytes!("regressions/symbolize-empty-name.elf"));
    }

    #[test]
    fn test_the_seeds_are_accepted() {
        assert!(loader::check(&minimal_kernel(&[0xf4])).is_ok());
        assert!(loader::check(TINY_ELF).is_ok());
        let s = Symbolizer::new(TINY_ELF).unwrap();
        // `nm seeds/tiny.elf`: leaf at 0x20010c, middle at 0x200113.
        assert_eq!(s.function_name(0x20010c), Some("leaf"));
        let frames = s.frames(0x200113, false);
        assert_eq!(frames.last().unwrap().function, "middle");
        assert!(frames.iter().any(|f| f.line.is_some()), "{frames:?}");
    }

    #[test]
    fn test_mutated_guest_kernels_load_and_symbolize_without_panic() {
        let kernel = metronome_resources::GUEST_KERNEL;
        let mut rng = Rng::new(33);
        for _ in 0..40 {
            let input = mutate(&mut rng, kernel, TINY_ELF);
            kernel_elf(&input);
            symbolize(&input);
        }
    }
}
