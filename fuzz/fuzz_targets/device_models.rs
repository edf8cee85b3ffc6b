//! libFuzzer wrapper of `vmm::fuzz`'s `device_models` target.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::devices::device_models(data));
