//! cubecl kernels for meft's sparse paths.
//!
//! This crate holds the purpose-built GPU kernels (sparse row gather, the fused sparse
//! adapter forward, its scatter-add backward, and LeMo's segment gather/scatter). It is a
//! separate crate so that kernel code, its launch logic and its tests stay apart from the
//! model code in `meft`. Kernels land here with the kernel issue; until then it is empty on
//! purpose and `meft` uses plain burn ops.
