//! The overlapped pipeline (host worker hand-off) against the serial reference, the direct
//! sparse AdamW path against accumulate-then-step, error reporting through the worker, and the
//! placement type.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use meft::adapter::meft::{AdapterStore, HostWorker, MeftConfig, SparseAdamW};
use meft::adapter::{AdapterConfig, Adapters, Hybrid, Layers, Placement};
use meft::model::{CausalLmBatch, Ffn, Llama, LlamaConfig};
use meft::Error;

type B = Autodiff<NdArray<f32>>;

fn tiny() -> LlamaConfig {
    common::tiny_llama(3)
}

fn batch<AB: AutodiffBackend>(step: usize, device: &AB::Device) -> CausalLmBatch<AB> {
    let ids: Vec<i64> = (0..16).map(|i| ((i * 7 + step * 3) % 40) as i64).collect();
    let next: Vec<i64> = (0..16)
        .map(|i| (((i + 1) * 7 + step * 3) % 40) as i64)
        .collect();
    CausalLmBatch {
        inputs: Tensor::from_data(TensorData::new(ids, [2, 8]), device),
        targets: Tensor::from_data(TensorData::new(next, [2, 8]), device),
        target_mask: Tensor::ones([2, 8], device),
    }
}

fn meft_config() -> AdapterConfig {
    AdapterConfig::Meft(MeftConfig {
        experts_per_token: 2,
        top_k: 8,
        ..MeftConfig::new(256)
    })
}

fn optimizer() -> SparseAdamW {
    SparseAdamW {
        lr: 1e-2,
        ..SparseAdamW::default()
    }
}

/// Trains `steps` steps, serially or through the host worker; returns the losses, the stores'
/// parameters and the routers' weights.
fn train<P: Placement>(
    placement: &P,
    base: Llama<P::Compute>,
    overlap: bool,
    steps: usize,
) -> (Vec<f32>, Vec<Vec<f32>>, Vec<Vec<f32>>)
where
    P::Compute: AutodiffBackend,
{
    let device = placement.compute_device();
    let (mut model, adapters) = placement.wrap(base, &meft_config(), &Layers::All).unwrap();
    let mut router_opt = AdamWConfig::new().init::<P::Compute, Llama<P::Compute>>();
    let worker = HostWorker::new().unwrap();
    let sparse = optimizer();
    let mut losses = Vec::new();
    for step in 0..steps {
        let loss = model.loss(&batch::<P::Compute>(step, device));
        losses.push(
            loss.clone()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap()[0],
        );
        let mut grads = loss.backward();
        if overlap {
            adapters
                .hand_off::<P::Compute>(&mut grads, Some(sparse), &worker, device)
                .unwrap();
        } else {
            adapters.collect_grads::<P::Compute>(&mut grads).unwrap();
            sparse.step(&adapters.sparse).unwrap();
        }
        let gp = GradientsParams::from_grads(grads, &model);
        model = router_opt.step(1e-2, model, gp);
    }
    adapters.wait_updates().unwrap();
    let stores = adapters
        .sparse
        .iter()
        .map(|a| {
            let (k, v) = placement.store_tensors(a).unwrap();
            let mut out = k.into_data().to_vec::<f32>().unwrap();
            out.extend(v.into_data().to_vec::<f32>().unwrap());
            out
        })
        .collect();
    let routers = model
        .valid()
        .blocks
        .iter()
        .map(|b| match &b.ffn {
            Ffn::Meft(f) => f.router.weight.val().into_data().to_vec::<f32>().unwrap(),
            _ => panic!("every layer has MEFT"),
        })
        .collect();
    (losses, stores, routers)
}

#[test]
fn overlapped_training_equals_serial_training() {
    let placement = Hybrid::<B>::new(Default::default());
    // One base for both runs (the backend's random init is shared by tests running at once).
    let base = Llama::<B>::init_random(&tiny(), placement.compute_device());
    let (l_serial, s_serial, r_serial) = train(&placement, base.clone(), false, 5);
    let (l_overlap, s_overlap, r_overlap) = train(&placement, base, true, 5);
    // Same arithmetic in the same order: bit-identical, not merely close.
    assert_eq!(l_serial, l_overlap);
    assert_eq!(s_serial, s_overlap);
    assert_eq!(r_serial, r_overlap);
    assert!(
        l_serial.last() < l_serial.first(),
        "training should move the loss: {l_serial:?}"
    );
    // The adapters did learn something (values start at zero).
    let d = tiny().d_model;
    let n = 256;
    assert!(s_serial[0][n * d..].iter().any(|&v| v != 0.0));
}

#[test]
fn direct_sparse_step_equals_accumulate_then_step() {
    let (n, d) = (50, 6);
    let rows = [3u32, 17, 0, 49, 22];
    let grads: Vec<f32> = (0..rows.len() * 2 * d)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1)
        .collect();
    let opt = optimizer();
    let mut a = AdapterStore::init_random(n, d, 0.3, 0.3, 9);
    let mut b = AdapterStore::init_random(n, d, 0.3, 0.3, 9);
    for _ in 0..3 {
        a.accumulate_grads_from(&rows, &grads).unwrap();
        opt.step_store(&mut a);
        assert_eq!(opt.step_rows(&mut b, &rows, &grads).unwrap(), rows.len());
    }
    assert_eq!(a.keys(), b.keys());
    assert_eq!(a.values(), b.values());

    // Refusals leave the store as it was.
    let before = b.keys();
    let e = opt.step_rows(&mut b, &[1, 1], &grads[..4 * d]).unwrap_err();
    assert!(e.to_string().contains("row 1 given twice"), "{e}");
    let e = opt.step_rows(&mut b, &[50], &grads[..2 * d]).unwrap_err();
    assert!(e.to_string().contains("row 50"), "{e}");
    b.accumulate_grads_from(&rows[..1], &grads[..2 * d])
        .unwrap();
    let e = opt
        .step_rows(&mut b, &rows[1..2], &grads[..2 * d])
        .unwrap_err();
    assert!(e.to_string().contains("pending"), "{e}");
    assert_eq!(b.keys(), before);
}

#[test]
fn the_worker_reports_non_finite_gradients_and_leaves_the_layer_as_it_was() {
    let device = Default::default();
    let base = Llama::<B>::init_random(&tiny(), &device);
    let (model, adapters): (_, Adapters) =
        meft::adapter::wrap(base, &meft_config(), &Layers::All).unwrap();
    let worker = HostWorker::new().unwrap();
    let before: Vec<_> = adapters
        .sparse
        .iter()
        .map(|a| a.with_store(|s| s.keys()).unwrap())
        .collect();
    let loss = model.loss(&batch::<B>(0, &device)) * f32::NAN;
    let mut grads = loss.backward();
    adapters
        .hand_off::<B>(&mut grads, Some(optimizer()), &worker, &device)
        .unwrap();
    let e = adapters.wait_updates().unwrap_err();
    assert!(matches!(e, Error::NonFinite(_)), "{e}");
    assert!(e.to_string().contains("layer 0"), "{e}");
    for (a, keys) in adapters.sparse.iter().zip(before) {
        assert_eq!(a.with_store(|s| s.keys()).unwrap(), keys);
        assert_eq!(a.with_store(|s| s.pending_rows().len()).unwrap(), 0);
    }
    // Reported once; the adapters go on working.
    adapters.wait_updates().unwrap();
}

#[test]
fn the_hybrid_placement_exports_stores_on_the_host_backend() {
    let placement = Hybrid::<B, NdArray<f64>>::new(Default::default());
    let base = Llama::<B>::init_random(&tiny(), placement.compute_device());
    let (_, adapters) = placement
        .wrap(base, &meft_config(), &Layers::Only(vec![1]))
        .unwrap();
    assert_eq!(adapters.sparse.len(), 1);
    let (k, v) = placement.store_tensors(&adapters.sparse[0]).unwrap();
    assert_eq!(k.dims(), [256, 16]);
    assert_eq!(v.dims(), [256, 16]);
    let keys = adapters.sparse[0].with_store(|s| s.keys()).unwrap();
    let exported: Vec<f64> = k.into_data().to_vec().unwrap();
    assert!(keys.iter().zip(&exported).all(|(a, b)| *a as f64 == *b));
    assert!(v
        .into_data()
        .to_vec::<f64>()
        .unwrap()
        .iter()
        .all(|&x| x == 0.0));
}

#[test]
fn transfer_metrics_report_each_steps_traffic() {
    use burn::data::dataloader::Progress;
    use burn::train::metric::{Metric, MetricMetadata, Numeric, NumericEntry};
    use meft::adapter::{TransferMetric, TransferQuantity};

    let device = Default::default();
    let base = Llama::<B>::init_random(&tiny(), &device);
    let (model, adapters) = meft::adapter::wrap(base, &meft_config(), &Layers::All).unwrap();
    let mut h2d = TransferMetric::new(adapters.clone(), TransferQuantity::HostToDeviceMb);
    let mut select = TransferMetric::new(adapters.clone(), TransferQuantity::SelectMs);
    let meta = || MetricMetadata {
        progress: Progress {
            items_processed: 1,
            items_total: 1,
        },
        global_progress: Progress {
            items_processed: 0,
            items_total: 1,
        },
        iteration: Some(0),
        lr: None,
    };
    let before = adapters.transfer_stats();
    let mut grads = model.loss(&batch::<B>(0, &device)).backward();
    adapters.collect_grads::<B>(&mut grads).unwrap();
    let step = adapters.transfer_stats().since(&before);
    assert!(step.rows_to_device > 0);
    let entry = h2d.update(&(), &meta());
    let want = step.to_device() as f64 / 1e6;
    assert!(entry.formatted.contains("MB"), "{}", entry.formatted);
    match h2d.value() {
        NumericEntry::Value(v) => assert!((v - want).abs() < 1e-9, "{v} vs {want}"),
        other => panic!("{other:?}"),
    }
    select.update(&(), &meta());
    match select.value() {
        NumericEntry::Value(v) => assert!(v > 0.0),
        other => panic!("{other:?}"),
    }
    // Nothing moved since: the next step's figure is zero.
    h2d.update(&(), &meta());
    match h2d.value() {
        NumericEntry::Value(v) => assert_eq!(v, 0.0),
        other => panic!("{other:?}"),
    }
}
