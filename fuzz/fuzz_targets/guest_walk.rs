//! libFuzzer wrapper of `vmm::fuzz`'s `guest_walk` target.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::walk::guest_walk(data));
