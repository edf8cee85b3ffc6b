//! Walking a stopped guest from the host: virtual-to-physical translation
//! through the guest's own 4-level page tables (4 KiB, 2 MiB and 1 GiB pages),
//! and call stacks by frame-pointer walk, reading guest memory directly through
//! the host mapping (no `KVM_TRANSLATE`, no per-sample ioctls).
//!
//! The guest is untrusted: every pointer is checked, a walk stops at the first
//! bad one (unmapped, non-canonical, misaligned, not moving up the stack, or
//! past the depth limit) and says why; nothing here can crash the VMM.

use std::ops::Range;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PRESENT: u64 = 1;
const HUGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Why a translation or a walk stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The address is not canonical.
    NonCanonical(u64),
    /// A page-table entry on the way is not present.
    NotMapped(u64),
    /// The physical address is outside guest RAM.
    OutsideRam(u64),
    /// A frame pointer that is not 8-byte aligned.
    Misaligned(u64),
    /// A frame pointer that does not move towards the stack base.
    NotAscending(u64),
}

/// Whether `va` is a canonical 48-bit address (bits 63..47 all equal): the
/// only kind code can run at, so the only kind a return address can be.
pub fn is_canonical(va: u64) -> bool {
    let sign = (va as i64) >> 47;
    sign == 0 || sign == -1
}

/// Translates guest virtual `va` to a guest physical address with the page
/// tables rooted at `cr3`.
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Result<GuestAddress, WalkError> {
    if !is_canonical(va) {
        return Err(WalkError::NonCanonical(va));
    }
    let mut table = cr3 & ADDR_MASK;
    // (shift, page size covered by a huge leaf at this level)
    for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let index = (va >> shift) & 511;
        let entry: u64 = mem
            .read_obj(GuestAddress(table + index * 8))
            .map_err(|_| WalkError::OutsideRam(table + index * 8))?;
        if entry & PRESENT == 0 {
            return Err(WalkError::NotMapped(va));
        }
        let leaf = shift == 12 || (level > 0 && entry & HUGE != 0);
        if leaf {
            let page = 1u64 << shift;
            return Ok(GuestAddress(
                (entry & ADDR_MASK & !(page - 1)) | (va & (page - 1)),
            ));
        }
        table = entry & ADDR_MASK;
    }
    Err(WalkError::NotMapped(va))
}

/// Reads a u64 at guest virtual `va`.
pub fn read_u64(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Result<u64, WalkError> {
    if !va.is_multiple_of(8) {
        return Err(WalkError::Misaligned(va));
    }
    let pa = translate(mem, cr3, va)?;
    mem.read_obj(pa).map_err(|_| WalkError::OutsideRam(pa.0))
}

/// A call stack, leaf first: `frames[0]` is the sampled RIP, then return addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stack {
    /// Instruction pointers, leaf first.
    pub frames: Vec<u64>,
    /// Why the walk ended before a zero frame pointer, if it did.
    pub error: Option<WalkError>,
    /// The walk hit the depth limit.
    pub truncated: bool,
}

/// Walks the frame-pointer chain from (`rip`, `rbp`): each frame holds the
/// caller's RBP at `[rbp]` and the return address at `[rbp + 8]`. A zero RBP or a
/// zero return address ends the walk normally (thread entry).
pub fn walk_stack(mem: &GuestMemoryMmap, cr3: u64, rip: u64, rbp: u64, depth: usize) -> Stack {
    let mut stack = Stack {
        frames: vec![rip],
        ..Default::default()
    };
    follow_frames(mem, cr3, rbp, None, depth, &mut stack);
    stack
}

/// Appends to `stack` the return addresses of the frame-pointer chain from
/// `rbp`, up to `depth` frames in all, as [`walk_stack`] does.
///
/// With `within`, only frames that lie wholly inside it (`[fp, fp + 16)`) are
/// followed: the first frame pointer outside ends the chain normally, for it
/// belongs to another stack (the chain of the code an interrupt entry
/// interrupted, say), not to this one. Returns whether the chain ended
/// normally (not on a bad pointer, not at the depth limit).
pub fn follow_frames(
    mem: &GuestMemoryMmap,
    cr3: u64,
    rbp: u64,
    within: Option<Range<u64>>,
    depth: usize,
    stack: &mut Stack,
) -> bool {
    let inside = |fp: u64| {
        within
            .as_ref()
            .is_none_or(|r| fp >= r.start && fp.checked_add(16).is_some_and(|end| end <= r.end))
    };
    let mut fp = rbp;
    while fp != 0 && inside(fp) {
        if stack.frames.len() >= depth {
            stack.truncated = true;
            return false;
        }
        let pair = read_u64(mem, cr3, fp.wrapping_add(8)).and_then(|ret| {
            let next = read_u64(mem, cr3, fp)?;
            Ok((ret, next))
        });
        let (ret, next) = match pair {
            Ok(pair) => pair,
            Err(e) => {
                stack.error = Some(e);
                return false;
            }
        };
        if ret == 0 {
            break;
        }
        // No call returns to a non-canonical address: a corrupt frame.
        if !is_canonical(ret) {
            stack.error = Some(WalkError::NonCanonical(ret));
            return false;
        }
        stack.frames.push(ret);
        if next != 0 && next <= fp {
            stack.error = Some(WalkError::NotAscending(next));
            return false;
        }
        fp = next;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const CR3: u64 = 0x1000;

    /// 16 MiB of RAM; PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000, PT at 0x4000.
    /// va 0x40_0000_0000 (PML4 0, PDPT 256) -> 1 GiB page at 0 (only the
    /// first 16 MiB exist); va 0x20_0000.. -> 2 MiB page at 0x20_0000;
    /// va 0x1000..0x2000 -> 4 KiB page at 0x5000; everything else unmapped.
    fn memory() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let w = |addr: u64, value: u64| mem.write_obj(value, GuestAddress(addr)).unwrap();
        w(0x1000, 0x2000 | PRESENT);
        w(0x2000, 0x3000 | PRESENT); // PDPT[0] -> PD
        w(0x2000 + 256 * 8, PRESENT | HUGE); // PDPT[256] -> 1 GiB at 0
        w(0x3000, 0x4000 | PRESENT); // PD[0] -> PT
        w(0x3000 + 8, 0x20_0000 | PRESENT | HUGE); // PD[1] -> 2 MiB at 0x200000
        w(0x4000 + 8, 0x5000 | PRESENT); // PT[1] -> 4 KiB at 0x5000
        mem
    }

    /// [`memory`] with three frames on the 2 MiB page: fp0 (0x20_1000) ->
    /// fp1 -> fp2 -> 0, returning to 0xaaa, 0xbbb, 0xccc.
    fn three_frames() -> GuestMemoryMmap {
        let mem = memory();
        let w = |addr: u64, value: u64| mem.write_obj(value, GuestAddress(addr)).unwrap();
        w(0x20_1000, 0x20_1100);
        w(0x20_1008, 0xaaa);
        w(0x20_1100, 0x20_1200);
        w(0x20_1108, 0xbbb);
        w(0x20_1200, 0);
        w(0x20_1208, 0xccc);
        mem
    }

    #[test]
    fn test_translate_4k_2m_1g_pages() {
        let mem = memory();
        assert_eq!(translate(&mem, CR3, 0x1234), Ok(GuestAddress(0x5234)));
        assert_eq!(translate(&mem, CR3, 0x21_2345), Ok(GuestAddress(0x21_2345)));
        assert_eq!(
            translate(&mem, CR3, 0x40_0012_3456),
            Ok(GuestAddress(0x12_3456))
        );
        assert_eq!(
            translate(&mem, CR3, 0x3000),
            Err(WalkError::NotMapped(0x3000))
        );
        assert_eq!(
            translate(&mem, CR3, 0x8000_0000_0000),
            Err(WalkError::NonCanonical(0x8000_0000_0000))
        );
    }

    #[test]
    fn test_walk_follows_frame_pointers_to_the_thread_entry() {
        let mem = three_frames();
        let stack = walk_stack(&mem, CR3, 0x999, 0x20_1000, 64);
        assert_eq!(stack.frames, vec![0x999, 0xaaa, 0xbbb, 0xccc]);
        assert_eq!(stack.error, None);
        let short = walk_stack(&mem, CR3, 0x999, 0x20_1000, 2);
        assert_eq!(short.frames.len(), 2);
        assert!(short.truncated);
    }

    #[test]
    fn test_bounded_walk_stops_cleanly_where_the_chain_leaves_the_stack() {
        // fp0 -> fp1 inside [0x20_1000, 0x20_1200); fp1 -> 0x20_1200, outside.
        let mem = three_frames();
        let mut stack = Stack {
            frames: vec![0x999],
            ..Default::default()
        };
        let within = Some(0x20_1000..0x20_1200);
        assert!(follow_frames(
            &mem,
            CR3,
            0x20_1000,
            within.clone(),
            64,
            &mut stack
        ));
        assert_eq!(stack.frames, [0x999, 0xaaa, 0xbbb]);
        assert_eq!((stack.error, stack.truncated), (None, false));
        // A frame that straddles the end is outside, and so is one below the start.
        let mut stack = Stack::default();
        assert!(follow_frames(
            &mem,
            CR3,
            0x20_11f8,
            within.clone(),
            64,
            &mut stack
        ));
        assert!(follow_frames(&mem, CR3, 0x20_0ff8, within, 64, &mut stack));
        assert!(stack.frames.is_empty());
        // The depth counts the frames already in the stack.
        let mut stack = Stack {
            frames: vec![1, 2],
            ..Default::default()
        };
        assert!(!follow_frames(&mem, CR3, 0x20_1000, None, 3, &mut stack));
        assert_eq!(stack.frames, [1, 2, 0xaaa]);
        assert!(stack.truncated);
    }

    #[test]
    fn test_bad_frame_pointers_end_the_walk_and_say_why() {
        let mem = memory();
        let w = |addr: u64, value: u64| mem.write_obj(value, GuestAddress(addr)).unwrap();
        // Unmapped frame pointer.
        let s = walk_stack(&mem, CR3, 1, 0x7f00_0000_0000, 64);
        assert_eq!(
            (s.frames.len(), s.error),
            (1, Some(WalkError::NotMapped(0x7f00_0000_0008)))
        );
        // Misaligned.
        assert_eq!(
            walk_stack(&mem, CR3, 1, 0x20_1003, 64).error,
            Some(WalkError::Misaligned(0x20_100b))
        );
        // A loop (points back to itself) is caught, not followed forever.
        w(0x20_2000, 0x20_2000);
        w(0x20_2008, 0x1234);
        let s = walk_stack(&mem, CR3, 1, 0x20_2000, 64);
        assert_eq!(s.error, Some(WalkError::NotAscending(0x20_2000)));
        // Non-canonical.
        assert!(matches!(
            walk_stack(&mem, CR3, 1, 0x8000_0000_0000, 64).error,
            Some(WalkError::NonCanonical(_))
        ));
        // A non-canonical return address: a corrupt frame, not a frame.
        w(0x20_3000, 0);
        w(0x20_3008, 0x8000_0000_0000_0000);
        let s = walk_stack(&mem, CR3, 1, 0x20_3000, 64);
        assert_eq!(
            (s.frames, s.error),
            (
                vec![1],
                Some(WalkError::NonCanonical(0x8000_0000_0000_0000))
            )
        );
        // Page tables pointing outside RAM.
        w(0x4000 + 16, (1 << 40) | PRESENT);
        assert!(matches!(
            read_u64(&mem, CR3, 0x2000),
            Err(WalkError::OutsideRam(_))
        ));
    }
}
