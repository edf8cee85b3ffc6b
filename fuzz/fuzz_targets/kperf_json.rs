//! libFuzzer wrapper of `vmm::fuzz`'s `kperf_json` target.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::config::kperf_json(data));
