//! libFuzzer wrapper of `vmm::fuzz`'s `api_request` target.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::api::api_request(data));
