//! libFuzzer wrapper of `vmm::fuzz`'s `kernel_elf` target.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::elf::kernel_elf(data));
