//! libFuzzer wrapper of `vmm::fuzz`'s `config_file_json` target.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::config::config_file_json(data));
