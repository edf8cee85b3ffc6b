//! Copying the guest ABI's plain-data structures to and from guest memory.

use metronome_abi::{BootInfo, FaultReport, GuestReport, PanicReport, ThreadInfo, VcpuShared};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Plain-data structures of the guest ABI that may be copied to and from guest memory.
///
/// # Safety
/// Implementors are `#[repr(C)]` structs of integer fields without padding, so
/// every bit pattern is a valid value.
pub unsafe trait Plain: Copy + Default {}
// SAFETY: repr(C), integer fields only, no padding (checked by the abi layout).
unsafe impl Plain for BootInfo {}
// SAFETY: as above.
unsafe impl Plain for VcpuShared {}
// SAFETY: as above.
unsafe impl Plain for GuestReport {}
// SAFETY: as above.
unsafe impl Plain for ThreadInfo {}
// SAFETY: as above.
unsafe impl Plain for FaultReport {}
// SAFETY: as above.
unsafe impl Plain for PanicReport {}

/// Writes `value` at guest physical `addr`.
pub fn write_plain<T: Plain>(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    value: &T,
) -> Result<(), vm_memory::GuestMemoryError> {
    // SAFETY: T is plain data (see `Plain`), so its bytes are initialised.
    let bytes = unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    mem.write_slice(bytes, addr)
}

/// Reads a `T` at guest physical `addr`; `None` if the range is not guest memory.
pub fn read_plain<T: Plain>(mem: &GuestMemoryMmap, addr: GuestAddress) -> Option<T> {
    let mut bytes = vec![0u8; std::mem::size_of::<T>()];
    mem.read_slice(&mut bytes, addr).ok()?;
    // SAFETY: T is plain data, and `bytes` holds size_of::<T>() bytes.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Reads `n` consecutive `T` at guest physical `addr` in one copy; `None` if
/// the range is not guest memory.
pub fn read_plain_slice<T: Plain>(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    n: usize,
) -> Option<Vec<T>> {
    let mut values = vec![T::default(); n];
    // SAFETY: T is plain data (see `Plain`): every byte pattern is a valid
    // value, so the vector's initialised elements may be overwritten as
    // bytes; the slice covers exactly those `n` elements.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            values.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(&*values),
        )
    };
    mem.read_slice(bytes, addr).ok()?;
    Some(values)
}
