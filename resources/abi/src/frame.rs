//! The interrupt frame: the register state the guest kernel's interrupt entry
//! path saves, shared with the VMM, which reads it from guest memory to sample
//! the interrupted instruction pointer and frame-pointer chain.

/// The register state saved by the guest kernel's interrupt entry path, in
/// stack order (lowest address first).
///
/// Where it is saved: every interrupt and the system-call door (`int3` from
/// CPL3) enter on the vCPU's IST1 stack, whose top is
/// [`crate::layout::PERCPU_IST1_TOP`] in the vCPU's region, and IST1 never nests
/// (all gates are interrupt gates). The CPU pushes `ss` .. `rip` (and an error
/// code for some exceptions), the entry stub pushes `vector` and `error_code`
/// (a zero for vectors without one), and the common entry pushes the fifteen
/// general-purpose registers. So while an interrupt is being handled, its frame
/// lies at [`crate::layout::INTERRUPT_FRAME_OFFSET_IN_PERCPU`] of the vCPU's
/// region ([`crate::layout::interrupt_frame`]). Exceptions that end the VM use
/// IST2 instead and are reported through [`crate::FaultReport`].
///
/// Handlers may rewrite the whole frame to switch contexts: the exit path
/// restores from it and `iretq`s. The entry assembly pushes and pops exactly
/// these 22 words; the size is checked when this crate compiles.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterruptFrame {
    /// General-purpose register r15.
    pub r15: u64,
    /// r14.
    pub r14: u64,
    /// r13.
    pub r13: u64,
    /// r12.
    pub r12: u64,
    /// r11.
    pub r11: u64,
    /// r10.
    pub r10: u64,
    /// r9.
    pub r9: u64,
    /// r8.
    pub r8: u64,
    /// rdi.
    pub rdi: u64,
    /// rsi.
    pub rsi: u64,
    /// rbp: the frame pointer of the interrupted code (the guest builds with frame pointers).
    pub rbp: u64,
    /// rdx.
    pub rdx: u64,
    /// rcx.
    pub rcx: u64,
    /// rbx.
    pub rbx: u64,
    /// rax.
    pub rax: u64,
    /// The vector, pushed by the entry stub.
    pub vector: u64,
    /// The CPU's error code, or 0 pushed by the stub for vectors without one.
    pub error_code: u64,
    /// Interrupted instruction pointer: for a trap such as `int3`, the
    /// instruction after it. The VMM's sampler reads it.
    pub rip: u64,
    /// Interrupted code segment selector; its low two bits are the privilege
    /// level the interrupted code ran at ([`Self::cpl`]).
    pub cs: u64,
    /// Interrupted RFLAGS.
    pub rflags: u64,
    /// Interrupted stack pointer (the CPU switched to IST1 or IST2 from it, so
    /// the frame is never on this stack).
    pub rsp: u64,
    /// Interrupted stack segment selector.
    pub ss: u64,
}

impl InterruptFrame {
    /// Number of 64-bit words in the frame: what the entry assembly pushes.
    pub const WORDS: usize = 22;

    /// An all-zero frame (usable in `const` and `static` initialisers).
    pub const ZERO: Self = Self {
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        r11: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rdi: 0,
        rsi: 0,
        rbp: 0,
        rdx: 0,
        rcx: 0,
        rbx: 0,
        rax: 0,
        vector: 0,
        error_code: 0,
        rip: 0,
        cs: 0,
        rflags: 0,
        rsp: 0,
        ss: 0,
    };

    /// The privilege level the interrupted code ran at (0 = kernel, 3 = user).
    pub const fn cpl(&self) -> u64 {
        self.cs & 3
    }
}

// The entry assembly pushes exactly WORDS words, and the IST tops are 16-byte
// aligned: an even word count keeps `rsp` 16-byte aligned at the handler call.
const _: () = {
    assert!(core::mem::size_of::<InterruptFrame>() == InterruptFrame::WORDS * 8);
    assert!(InterruptFrame::WORDS.is_multiple_of(2));
    // The frame lies inside IST1, which spans the boot-stack top to the IST1 top.
    assert!(crate::layout::INTERRUPT_FRAME_OFFSET_IN_PERCPU > crate::layout::PERCPU_BOOT_STACK_TOP);
};

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn test_interrupt_frame_layout_matches_entry_push_order() {
        // isr_common pushes rax first and r15 last; the stub pushes error code then vector.
        assert_eq!(offset_of!(InterruptFrame, r15), 0);
        assert_eq!(offset_of!(InterruptFrame, rbp), 10 * 8);
        assert_eq!(offset_of!(InterruptFrame, rax), 14 * 8);
        assert_eq!(offset_of!(InterruptFrame, vector), 15 * 8);
        assert_eq!(offset_of!(InterruptFrame, error_code), 16 * 8);
        // The CPU's frame: rip, cs, rflags, rsp, ss from low to high.
        assert_eq!(offset_of!(InterruptFrame, rip), 17 * 8);
        assert_eq!(offset_of!(InterruptFrame, cs), 18 * 8);
        assert_eq!(offset_of!(InterruptFrame, ss), 21 * 8);
        assert_eq!(core::mem::size_of::<InterruptFrame>(), 176);
        assert_eq!(InterruptFrame::ZERO, InterruptFrame::default());
    }

    #[test]
    fn test_interrupt_frame_cpl_is_low_bits_of_cs() {
        let user = InterruptFrame {
            cs: u64::from(crate::gdt::USER_CS),
            ..InterruptFrame::ZERO
        };
        let kernel = InterruptFrame {
            cs: u64::from(crate::gdt::KERNEL_CS),
            ..InterruptFrame::ZERO
        };
        assert_eq!(user.cpl(), 3);
        assert_eq!(kernel.cpl(), 0);
    }

    #[test]
    fn test_interrupt_frame_sits_at_top_of_ist1() {
        use crate::layout;
        let size = core::mem::size_of::<InterruptFrame>() as u64;
        assert_eq!(
            layout::INTERRUPT_FRAME_OFFSET_IN_PERCPU + size,
            layout::PERCPU_IST1_TOP
        );
        assert_eq!(
            layout::interrupt_frame(3),
            layout::percpu_region(3) + layout::PERCPU_IST1_TOP - 22 * 8
        );
    }
}
