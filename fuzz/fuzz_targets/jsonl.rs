//! Fuzz target: `meft::fuzz::jsonl` (see that function for what the bytes mean).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meft::fuzz::jsonl(data));
