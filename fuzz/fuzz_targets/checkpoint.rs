//! Fuzz target: `meft::fuzz::checkpoint` (see that function for what the bytes mean).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meft::fuzz::checkpoint(data));
