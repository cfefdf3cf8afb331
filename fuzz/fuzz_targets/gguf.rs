//! Fuzz target: `meft::fuzz::gguf` (see that function for what the bytes mean).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meft::fuzz::gguf(data));
