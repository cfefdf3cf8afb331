//! The transfer path on the CPU (ndarray on both sides): rows uploaded and read back through
//! the adapter's transfer functions arrive byte for byte, at several sizes.

use burn::backend::NdArray;
use meft::backend::BackendTask;
use meft::bench::TransferBench;

#[test]
fn staged_rows_arrive_byte_for_byte() {
    let bench = TransferBench {
        d_model: 48,
        neurons: 1000,
        rows: vec![1, 37, 1000],
        iters: 2,
        label: "cpu".into(),
    };
    // The bench errors if any transfer differs from the rows gathered.
    let results = bench.run::<NdArray>(Default::default()).unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[1].bytes, 37 * 2 * 48 * 4);
    assert!(results.iter().all(|r| r.raw_pinned_gbps.is_none()));
}

#[test]
fn bad_row_counts_are_errors() {
    let bench = TransferBench {
        d_model: 8,
        neurons: 10,
        rows: vec![11],
        iters: 1,
        label: "cpu".into(),
    };
    let e = bench.run::<NdArray>(Default::default()).unwrap_err();
    assert!(e.to_string().contains("row counts"), "{e}");
}

/// On the GPU (run there by `scripts/gpu/pipeline.sh`): rows shipped through pinned staging —
/// in 128 MiB chunks (4 096 rows of 2·4 096 floats), the last one ragged — arrive byte for byte,
/// and the raw pinned ceiling is measured beside them.
#[cfg(feature = "cuda")]
#[test]
fn staged_rows_arrive_byte_for_byte_on_cuda() {
    use meft::backend::CudaUnfused;
    // 2·d = 8192 floats per row: 4096 rows per 128 MiB chunk.
    let bench = TransferBench {
        d_model: 4096,
        neurons: 10_000,
        rows: vec![1, 1000, 4096, 4097, 10_000],
        iters: 2,
        label: "cuda".into(),
    };
    let results = bench
        .run::<CudaUnfused<f32>>(Default::default())
        .expect("a CUDA device");
    assert_eq!(results.len(), 5);
    assert!(results.iter().all(|r| r.raw_pinned_gbps.is_some()));
    assert!(results.iter().all(|r| r.upload_gbps > 0.0));
}
