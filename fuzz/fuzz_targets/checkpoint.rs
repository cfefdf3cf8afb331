//! Fuzz target: `meft::fuzz::checkpoint` (see that function for what the bytes mean).
//!
//! burn's record loader panics on some malformed records (rank mismatches, bad parameter ids);
//! `checkpoint::decode_optimizer` contains those (an error, not a crash). A quiet panic hook
//! lets that containment work here too; a panic that escapes the entry point still aborts
//! (libfuzzer-sys catches the unwind and aborts), so it is still found.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: std::panic::set_hook(Box::new(|_| {})),
    |data: &[u8]| meft::fuzz::checkpoint(data)
);
