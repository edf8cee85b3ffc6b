//! libFuzzer wrapper of `vmm::fuzz`'s `api_http` target.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::api::api_http(data));
