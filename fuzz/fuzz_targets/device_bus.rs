//! libFuzzer wrapper of `vmm::fuzz`'s `device_bus` target.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::devices::device_bus(data));
