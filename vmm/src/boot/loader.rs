//! Validates and loads the guest kernel ELF.
//!
//! A kernel must be a little-endian 64-bit x86_64 `ET_EXEC` whose loadable
//! segments all lie in the kernel window of the layout
//! (`KERNEL_BASE..KERNEL_LIMIT`) and whose entry point is inside one of them.
//! Checking is separate from loading so that the command line can reject a bad
//! file before any KVM object exists.

use metronome_abi::layout::{KERNEL_BASE, KERNEL_LIMIT};
use object::elf;
use object::LittleEndian;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Why a kernel image was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadKernelError {
    /// Not an ELF file at all.
    #[error("the kernel is not an ELF file (bad magic)")]
    NotElf,
    /// ELF parsing failed.
    #[error("the kernel ELF is malformed: {0}")]
    Malformed(String),
    /// Built for another machine.
    #[error("the kernel is an ELF for {0}; Metronome runs x86_64 ELF executables only")]
    WrongArch(String),
    /// Not 64-bit little endian.
    #[error("the kernel is not a 64-bit little-endian ELF")]
    WrongClass,
    /// Not an executable.
    #[error("the kernel ELF is of type {0}, not an executable (ET_EXEC)")]
    NotExecutable(String),
    /// A segment outside the kernel window.
    #[error(
        "kernel segment {start:#x}..{end:#x} lies outside the kernel window \
         {KERNEL_BASE:#x}..{KERNEL_LIMIT:#x}"
    )]
    SegmentOutOfRange {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// No loadable segments.
    #[error("the kernel ELF has no loadable segments")]
    NoSegments,
    /// Entry point not in a segment.
    #[error("the kernel entry point {0:#x} is not inside a loadable segment")]
    BadEntry(u64),
    /// Writing guest memory failed.
    #[error("cannot write the kernel into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// What loading produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Entry point.
    pub entry: u64,
    /// First page after the highest segment.
    pub end: u64,
}

struct Segment {
    addr: u64,
    file_range: std::ops::Range<usize>,
}

fn segments(image: &[u8]) -> Result<(LoadedKernel, Vec<Segment>), LoadKernelError> {
    use object::read::elf::{FileHeader, ProgramHeader};

    if image.len() < 4 || &image[..4] != b"\x7fELF" {
        return Err(LoadKernelError::NotElf);
    }
    if image.get(4) != Some(&elf::ELFCLASS64.0) || image.get(5) != Some(&elf::ELFDATA2LSB.0) {
        return Err(LoadKernelError::WrongClass);
    }
    let malformed = |e: object::read::Error| LoadKernelError::Malformed(e.to_string());
    let header = elf::FileHeader64::<LittleEndian>::parse(image).map_err(malformed)?;
    let machine = header.e_machine(LittleEndian);
    if machine != elf::EM_X86_64 {
        let name = match machine {
            elf::EM_386 => "i386",
            elf::EM_ARM => "ARM",
            elf::EM_AARCH64 => "AArch64",
            elf::EM_RISCV => "RISC-V",
            elf::EM_PPC64 => "PowerPC64",
            _ => "another machine",
        };
        return Err(LoadKernelError::WrongArch(format!(
            "{name} (e_machine {})",
            machine.0
        )));
    }
    let e_type = header.e_type(LittleEndian);
    if e_type != elf::ET_EXEC {
        let name = match e_type {
            elf::ET_REL => "ET_REL (relocatable)",
            elf::ET_DYN => "ET_DYN (shared object or PIE)",
            elf::ET_CORE => "ET_CORE (core dump)",
            _ => "unknown",
        };
        return Err(LoadKernelError::NotExecutable(name.to_string()));
    }
    let entry = header.e_entry(LittleEndian);
    let mut out = Vec::new();
    let mut end = KERNEL_BASE;
    let mut entry_ok = false;
    for ph in header
        .program_headers(LittleEndian, image)
        .map_err(malformed)?
    {
        if ph.p_type(LittleEndian) != elf::PT_LOAD {
            continue;
        }
        let start = ph.p_paddr(LittleEndian);
        let (memsz, filesz) = (ph.p_memsz(LittleEndian), ph.p_filesz(LittleEndian));
        let seg_end = start.saturating_add(memsz);
        if start < KERNEL_BASE || seg_end > KERNEL_LIMIT || filesz > memsz {
            return Err(LoadKernelError::SegmentOutOfRange {
                start,
                end: seg_end,
            });
        }
        let file_start = usize::try_from(ph.p_offset(LittleEndian)).unwrap_or(usize::MAX);
        let file_end = file_start.saturating_add(usize::try_from(filesz).unwrap_or(usize::MAX));
        if file_end > image.len() {
            return Err(LoadKernelError::Malformed(format!(
                "segment at {start:#x} extends past the end of the file"
            )));
        }
        entry_ok |= (start..seg_end).contains(&entry);
        end = end.max(seg_end);
        out.push(Segment {
            addr: start,
            file_range: file_start..file_end,
        });
    }
    if out.is_empty() {
        return Err(LoadKernelError::NoSegments);
    }
    if !entry_ok {
        return Err(LoadKernelError::BadEntry(entry));
    }
    let end = end.next_multiple_of(4096);
    Ok((LoadedKernel { entry, end }, out))
}

/// Checks that `image` is a kernel this VMM can load, without loading it.
pub fn check(image: &[u8]) -> Result<LoadedKernel, LoadKernelError> {
    segments(image).map(|(kernel, _)| kernel)
}

/// Copies the loadable segments of `image` into guest memory.
///
/// Bytes between a segment's file size and memory size (`.bss`) are left as
/// they are: guest memory is freshly mapped and therefore zero.
pub fn load(image: &[u8], mem: &GuestMemoryMmap) -> Result<LoadedKernel, LoadKernelError> {
    let (kernel, segments) = segments(image)?;
    for segment in segments {
        mem.write_slice(&image[segment.file_range], GuestAddress(segment.addr))
            .map_err(LoadKernelError::GuestMemory)?;
    }
    Ok(kernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_embedded_kernel_is_accepted() {
        let kernel = check(metronome_resources::GUEST_KERNEL).expect("embedded kernel loads");
        assert!(kernel.entry >= KERNEL_BASE && kernel.end <= KERNEL_LIMIT);
    }

    #[test]
    fn test_not_elf_is_rejected() {
        assert!(matches!(
            check(b"hello world"),
            Err(LoadKernelError::NotElf)
        ));
        assert!(matches!(check(b""), Err(LoadKernelError::NotElf)));
    }

    #[test]
    fn test_other_architecture_is_rejected() {
        let mut image = metronome_resources::GUEST_KERNEL.to_vec();
        // e_machine at offset 18: EM_AARCH64 = 183.
        image[18..20].copy_from_slice(&183u16.to_le_bytes());
        let err = check(&image).unwrap_err();
        assert!(matches!(err, LoadKernelError::WrongArch(_)));
        assert!(err.to_string().contains("x86_64"), "{err}");
    }

    #[test]
    fn test_truncated_elf_is_rejected_without_panic() {
        let image = &metronome_resources::GUEST_KERNEL[..200];
        assert!(check(image).is_err());
    }
}
