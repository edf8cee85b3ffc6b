//! libFuzzer wrapper of `vmm::fuzz`'s `symbolize` target.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::elf::symbolize(data));
