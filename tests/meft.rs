//! MEFT core against dense references: outputs and every gradient, finite differences, the
//! sparse optimizer against burn's AdamW, bytes moved per step, bad configs, and wrapping a
//! model.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module, Param};
use burn::nn::Linear;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor, TensorData};
use meft::adapter::dense::DenseAdapterFfn;
use meft::adapter::meft::{AdapterStore, MeftConfig, MeftFfn, SparseAdamW};
use meft::adapter::{wrap, AdapterConfig, DenseAdapterConfig, Layers, LoraConfig};
use meft::model::{CausalLmBatch, FeedForward, Ffn, Llama, LlamaConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

type B = Autodiff<NdArray<f32>>;

fn randn(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let dist = Normal::new(0.0, std).unwrap();
    (0..n).map(|_| dist.sample(&mut rng)).collect()
}

fn tensor<Bk: Backend, const D: usize>(v: Vec<f32>, shape: [usize; D]) -> Tensor<Bk, D> {
    // Explicit dtype: the device default is set by whichever backend touched the device first.
    let data = TensorData::new(v, shape).convert::<Bk::FloatElem>();
    let dtype = data.dtype;
    Tensor::from_data(data, (&Default::default(), dtype))
}

fn floats<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn ffn<Bk: Backend>(d: usize, hidden: usize, seed: u64) -> FeedForward<Bk> {
    let p = |rows, cols, s| {
        meft::adapter::Projection::new(Linear {
            weight: Param::from_tensor(tensor(randn(rows * cols, 0.2, s), [rows, cols])),
            bias: None,
        })
    };
    FeedForward {
        gate: p(d, hidden, seed),
        up: p(d, hidden, seed + 1),
        down: p(hidden, d, seed + 2),
    }
    .no_grad()
}

/// max |a - b| / max(max |b|, 1e-3) <= tol.
fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err <= tol * scale,
        "{what}: max abs error {err} vs scale {scale}"
    );
}

/// Pending store gradients as dense `[N, d]` keys and values (zeros where no row was shipped).
fn store_grads(m: &MeftFfn<B>) -> (Vec<f32>, Vec<f32>) {
    m.adapter
        .with_store(|s| {
            let (n, d) = (s.neurons(), s.d_model());
            let (mut gk, mut gv) = (vec![0f32; n * d], vec![0f32; n * d]);
            for j in 0..n {
                if let Some(g) = s.pending_grad(j) {
                    gk[j * d..][..d].copy_from_slice(&g[..d]);
                    gv[j * d..][..d].copy_from_slice(&g[d..]);
                }
            }
            (gk, gv)
        })
        .unwrap()
}

#[test]
fn all_experts_all_neurons_equals_the_dense_adapter() {
    for (case, &(b, t, d, n, e)) in [(1, 3, 8, 16, 4), (2, 5, 16, 64, 8), (3, 7, 12, 48, 6)]
        .iter()
        .enumerate()
    {
        let seed = 100 * case as u64;
        let store = AdapterStore::init_random(n, d, 0.5, 0.5, seed);
        let base = ffn::<B>(d, 2 * d, seed + 1);
        let dense = DenseAdapterFfn::from_store(base.clone(), &store);
        let cfg = MeftConfig {
            experts: Some(e),
            experts_per_token: e,
            top_k: n,
            router_gate: false,
            ..MeftConfig::new(n)
        };
        let sparse = MeftFfn::with_store(base, cfg, 0, store).unwrap();

        let xv = randn(b * t * d, 1.0, seed + 2);
        let w = tensor::<B, 3>(randn(b * t * d, 1.0, seed + 3), [b, t, d]);
        let (x1, x2) = (
            tensor::<B, 3>(xv.clone(), [b, t, d]).require_grad(),
            tensor::<B, 3>(xv, [b, t, d]).require_grad(),
        );
        let (y1, y2) = (sparse.forward(x1.clone()), dense.forward(x2.clone()));
        assert_close(&floats(y1.clone()), &floats(y2.clone()), 1e-5, "output");
        let mut g1 = (y1 * w.clone()).sum().backward();
        let g2 = (y2 * w).sum().backward();
        sparse.adapter.collect_grads::<B>(&mut g1).unwrap();
        let (gk, gv) = store_grads(&sparse);
        assert_close(
            &gk,
            &floats(dense.keys.val().grad(&g2).unwrap()),
            1e-5,
            "key grads",
        );
        assert_close(
            &gv,
            &floats(dense.values.val().grad(&g2).unwrap()),
            1e-5,
            "value grads",
        );
        let (dx1, dx2) = (x1.grad(&g1).unwrap(), x2.grad(&g2).unwrap());
        assert_close(&floats(dx1), &floats(dx2), 1e-5, "input grads");
    }
}

/// Dense reference with the router: score every neuron, keep the top-K among the probed
/// experts' neurons, mask the rest. Returns (output, activations) for `[M, d]` input.
fn masked_dense_reference<Bk: Backend>(
    x: Tensor<Bk, 2>,
    router: Tensor<Bk, 2>,
    keys: Tensor<Bk, 2>,
    values: Tensor<Bk, 2>,
    cfg: &MeftConfig,
) -> (Tensor<Bk, 2>, Tensor<Bk, 2>) {
    let device = x.device();
    let [m, _] = x.dims();
    let n = cfg.neurons;
    let size = cfg.expert_size();
    let expert_of: Vec<i64> = (0..n).map(|j| (j / size) as i64).collect();
    let expert_of = Tensor::<Bk, 1, Int>::from_data(TensorData::new(expert_of, [n]), &device);
    let r = x.clone().matmul(router);
    let (_, probed) = r
        .clone()
        .detach()
        .topk_with_indices(cfg.experts_per_token, 1);
    let p = cfg.experts_per_token;
    let probed_mask = Tensor::<Bk, 2>::zeros(r.dims(), &device)
        .scatter(
            1,
            probed,
            Tensor::ones([m, p], &device),
            IndexingUpdateOp::Add,
        )
        .select(1, expert_of.clone());
    let scores = x.matmul(keys.transpose()) * r.select(1, expert_of);
    let not_probed: Tensor<Bk, 2, Bool> = probed_mask.clone().equal_elem(0.0);
    let selectable = scores
        .clone()
        .detach()
        .mask_fill(not_probed, f32::NEG_INFINITY);
    let (_, top) = selectable.topk_with_indices(cfg.top_k, 1);
    let keep = Tensor::<Bk, 2>::zeros([m, n], &device).scatter(
        1,
        top,
        Tensor::ones([m, cfg.top_k], &device),
        IndexingUpdateOp::Add,
    );
    let act = relu(scores) * keep * probed_mask;
    (act.clone().matmul(values), act)
}

#[test]
fn top_k_with_router_equals_the_masked_dense_reference() {
    for (case, &(b, t, d, n, e, p, k)) in [
        (2, 5, 16, 64, 8, 3, 5),
        (1, 9, 12, 96, 12, 2, 7),
        (3, 4, 8, 40, 5, 5, 40),
    ]
    .iter()
    .enumerate()
    {
        let seed = 1000 + 10 * case as u64;
        let store = AdapterStore::init_random(n, d, 0.5, 0.5, seed);
        let (keys, values) = (store.keys(), store.values());
        let cfg = MeftConfig {
            experts: Some(e),
            experts_per_token: p,
            top_k: k,
            ..MeftConfig::new(n)
        };
        let sparse =
            MeftFfn::<B>::with_store(ffn(d, 2 * d, seed + 1), cfg.clone(), 0, store).unwrap();
        let m = b * t;
        let xv = randn(m * d, 1.0, seed + 2);
        let wv = randn(m * d, 1.0, seed + 3);

        let x1 = tensor::<B, 3>(xv.clone(), [b, t, d]).require_grad();
        let y1 = sparse.forward(x1.clone());
        let mut g1 = (y1.clone() * tensor::<B, 3>(wv.clone(), [b, t, d]))
            .sum()
            .backward();
        sparse.adapter.collect_grads::<B>(&mut g1).unwrap();
        let (gk, gv) = store_grads(&sparse);

        let x2 = tensor::<B, 2>(xv, [m, d]).require_grad();
        let router = sparse.router.weight.val().detach().require_grad();
        let (k2, v2) = (
            tensor::<B, 2>(keys, [n, d]).require_grad(),
            tensor::<B, 2>(values, [n, d]).require_grad(),
        );
        let (y2, act) =
            masked_dense_reference(x2.clone(), router.clone(), k2.clone(), v2.clone(), &cfg);
        let base = sparse
            .base
            .forward(x2.clone().reshape([b, t, d]))
            .reshape([m, d]);
        let y2 = base + y2;
        let g2 = (y2.clone() * tensor::<B, 2>(wv, [m, d])).sum().backward();

        let what = |s: &str| format!("case {case}: {s}");
        assert_close(&floats(y1), &floats(y2), 1e-5, &what("output"));
        assert_close(
            &gk,
            &floats(k2.grad(&g2).unwrap()),
            1e-5,
            &what("key grads"),
        );
        assert_close(
            &gv,
            &floats(v2.grad(&g2).unwrap()),
            1e-5,
            &what("value grads"),
        );
        assert_close(
            &floats(x1.grad(&g1).unwrap()),
            &floats(x2.grad(&g2).unwrap()),
            1e-5,
            &what("input grads"),
        );
        assert_close(
            &floats(sparse.router.weight.val().grad(&g1).unwrap()),
            &floats(router.grad(&g2).unwrap()),
            1e-5,
            &what("router grads"),
        );
        // Same active set: the rows shipped are exactly the reference's active columns.
        let act = floats(act.inner());
        let active: Vec<u32> = (0..n)
            .filter(|&j| (0..m).any(|t| act[t * n + j] > 0.0))
            .map(|j| j as u32)
            .collect();
        assert_eq!(
            sparse.adapter.last_active().unwrap().rows,
            active,
            "case {case}"
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    type B64 = Autodiff<NdArray<f64>>;
    let (b, t, d, n) = (2, 3, 8, 48);
    let cfg = MeftConfig {
        experts: Some(6),
        experts_per_token: 3,
        top_k: 6,
        ..MeftConfig::new(n)
    };
    let store = AdapterStore::init_random(n, d, 0.5, 0.5, 77);
    let layer = MeftFfn::<B64>::with_store(ffn(d, 16, 78), cfg, 0, store).unwrap();
    let xv: Vec<f64> = randn(b * t * d, 1.0, 79)
        .into_iter()
        .map(f64::from)
        .collect();
    let wv: Vec<f64> = randn(b * t * d, 1.0, 80)
        .into_iter()
        .map(f64::from)
        .collect();
    let dev = Default::default();
    let f64s = (&dev, burn::tensor::DType::F64);
    let x =
        Tensor::<B64, 3>::from_data(TensorData::new(xv.clone(), [b, t, d]), f64s).require_grad();
    let w = Tensor::<B64, 3>::from_data(TensorData::new(wv.clone(), [b, t, d]), f64s);
    let mut grads = (layer.forward(x.clone()) * w).sum().backward();
    layer.adapter.collect_grads::<B64>(&mut grads).unwrap();
    let dx: Vec<f64> = x.grad(&grads).unwrap().into_data().into_vec().unwrap();

    // Loss on the inner (non-autodiff) backend: nothing is recorded for gradients.
    let eval = layer.valid();
    let loss = |xs: &[f64]| -> f64 {
        let x = Tensor::<NdArray<f64>, 3>::from_data(TensorData::new(xs.to_vec(), [b, t, d]), f64s);
        let w = Tensor::<NdArray<f64>, 3>::from_data(TensorData::new(wv.clone(), [b, t, d]), f64s);
        (eval.forward(x) * w).sum().into_scalar()
    };
    let active = layer.adapter.last_active().unwrap();
    let rows = active.rows.clone();
    assert!(rows.len() >= 3);
    for &j in rows.iter().take(3) {
        for i in [0, 3, d, d + 5] {
            let analytic = layer
                .adapter
                .with_store(|s| s.pending_grad(j as usize).unwrap()[i])
                .unwrap();
            let set = |v: f32| {
                layer
                    .adapter
                    .with_store_mut(|s| s.row_mut(j as usize)[i] = v)
                    .unwrap()
            };
            let orig = layer
                .adapter
                .with_store(|s| {
                    s.key(j as usize)
                        .iter()
                        .chain(s.value(j as usize))
                        .copied()
                        .collect::<Vec<_>>()[i]
                })
                .unwrap();
            let (hi_v, lo_v) = (orig + 1e-4, orig - 1e-4);
            set(hi_v);
            let hi = loss(&xv);
            assert_eq!(
                layer.adapter.last_active().unwrap(),
                active,
                "selection moved"
            );
            set(lo_v);
            let lo = loss(&xv);
            assert_eq!(
                layer.adapter.last_active().unwrap(),
                active,
                "selection moved"
            );
            set(orig);
            let fd = (hi - lo) / f64::from(hi_v - lo_v);
            let err = (fd - f64::from(analytic)).abs();
            assert!(
                err <= 1e-4 * fd.abs().max(1e-2),
                "row {j}[{i}]: fd {fd} vs {analytic}"
            );
        }
    }
    for i in [0, 5, 17, 40] {
        let h = 1e-5;
        let (mut hi, mut lo) = (xv.clone(), xv.clone());
        hi[i] += h;
        lo[i] -= h;
        let fd = (loss(&hi) - loss(&lo)) / (2.0 * h);
        assert!(
            (fd - dx[i]).abs() <= 1e-7 * fd.abs().max(1.0),
            "x[{i}]: fd {fd} vs {}",
            dx[i]
        );
    }
}

#[derive(Module, Debug)]
struct Row<B: Backend> {
    w: Param<Tensor<B, 2>>,
}

#[test]
fn sparse_adamw_equals_dense_adamw_on_touched_rows() {
    let (n, d) = (6, 3);
    let keys = randn(n * d, 1.0, 5);
    let values = randn(n * d, 1.0, 6);
    let mut store = AdapterStore::from_keys_values(n, d, &keys, &values).unwrap();
    let initial: Vec<Vec<f32>> = (0..n).map(|j| store.row_mut(j).to_vec()).collect();
    let opt = SparseAdamW {
        lr: 0.05,
        weight_decay: 0.1,
        ..SparseAdamW::default()
    };
    let touched: [&[u32]; 4] = [&[0, 2], &[2, 3], &[0, 2, 5], &[2]];
    let grad = |step: usize, j: u32| randn(2 * d, 1.0, 1000 + 10 * step as u64 + j as u64);
    for (s, rows) in touched.iter().enumerate() {
        // Two micro-batches per step: gradients of the same row are summed.
        let half: Vec<f32> = rows
            .iter()
            .flat_map(|&j| grad(s, j))
            .map(|g| g / 2.0)
            .collect();
        store.accumulate_grads(rows, half.clone()).unwrap();
        store.accumulate_grads(rows, half).unwrap();
        assert_eq!(opt.step_store(&mut store), rows.len());
    }
    for j in 0..n as u32 {
        let steps: Vec<usize> = (0..4).filter(|&s| touched[s].contains(&j)).collect();
        assert_eq!(store.row_steps(j as usize) as usize, steps.len());
        let got = store.row_mut(j as usize).to_vec();
        if steps.is_empty() {
            assert_eq!(got, initial[j as usize], "untouched row {j} changed");
            continue;
        }
        // burn's AdamW on this row alone, fed the row's own gradient sequence.
        let mut row = Row::<B> {
            w: Param::from_tensor(tensor(initial[j as usize].clone(), [1, 2 * d])),
        };
        let mut adamw = AdamWConfig::new()
            .with_beta_1(opt.beta1)
            .with_beta_2(opt.beta2)
            .with_epsilon(opt.epsilon)
            .with_weight_decay(opt.weight_decay)
            .init::<B, Row<B>>();
        for &s in &steps {
            let mut g = GradientsParams::new();
            g.register::<NdArray<f32>, 2>(row.w.id, tensor(grad(s, j), [1, 2 * d]));
            row = adamw.step(f64::from(opt.lr), row, g);
        }
        assert_close(&got, &floats(row.w.val()), 1e-6, &format!("row {j}"));
    }
}

#[test]
fn bytes_moved_are_active_rows_plus_routing() {
    let (b, t, d, n) = (2, 3, 8, 4096);
    let cfg = MeftConfig {
        experts: Some(64),
        experts_per_token: 2,
        top_k: 4,
        ..MeftConfig::new(n)
    };
    let store = AdapterStore::init_random(n, d, 0.5, 0.5, 9);
    let layer = MeftFfn::<B>::with_store(ffn(d, 16, 10), cfg.clone(), 0, store).unwrap();
    let x = tensor::<B, 3>(randn(b * t * d, 1.0, 11), [b, t, d]).require_grad();
    let mut grads = layer.forward(x).sum().backward();
    layer.adapter.collect_grads::<B>(&mut grads).unwrap();
    let s = layer.adapter.stats();
    let u = layer.adapter.last_active().unwrap().rows.len() as u64;
    let (m, d, k, p) = (6u64, d as u64, 4u64, 2u64);
    assert!(u > 0 && u <= m * k, "{u} active rows");
    // ndarray: f32 floats, i64 ints.
    // Rows travel padded with zero rows to a multiple of PAD_ROWS; only real rows come back.
    let pad = meft::adapter::meft::layer::PAD_ROWS as u64;
    let u_pad = u.div_ceil(pad) * pad;
    assert_eq!(s.rows_to_device, u_pad * 2 * d * 4, "rows shipped");
    assert_eq!(s.row_grads_to_host, u * 2 * d * 4, "row gradients returned");
    assert_eq!(
        s.indices_to_device,
        m * k * 8 + m * k * 8,
        "slot and expert indices (reference path on ndarray)"
    );
    assert_eq!(s.hidden_to_host, m * d * 4, "hidden states");
    let e = 64u64;
    assert!(p < e);
    assert_eq!(s.routing_to_host, m * e * 4, "router scores");
    assert_eq!(s.active_rows, u);
    let full_table = n as u64 * 2 * d * 4;
    assert!(
        s.to_device() * 20 < full_table,
        "{} bytes vs table {full_table}",
        s.to_device()
    );
}

#[test]
fn bad_configs_are_clear_errors() {
    let base = || ffn::<B>(8, 16, 1);
    let err = |c: MeftConfig| MeftFfn::new(base(), &c, 0).unwrap_err().to_string();
    assert!(err(MeftConfig {
        top_k: 100,
        ..MeftConfig::new(64)
    })
    .contains("top_k"));
    assert!(err(MeftConfig {
        experts: Some(7),
        ..MeftConfig::new(64)
    })
    .contains("divide"));
    let store = AdapterStore::init_random(64, 12, 0.02, 0.0, 0);
    let e = MeftFfn::with_store(base(), MeftConfig::new(64), 0, store).unwrap_err();
    assert!(e.to_string().contains("width 12"), "{e}");

    let model = Llama::<B>::init_random(&tiny(), &Default::default());
    let e = wrap(
        model,
        &AdapterConfig::Meft(MeftConfig::new(64)),
        &Layers::Only(vec![5]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("layer 5 does not exist"), "{e}");
    let e: Result<AdapterConfig, _> =
        serde_json::from_str(r#"{"kind":"meft","neurons":64,"topk":3}"#);
    assert!(e.unwrap_err().to_string().contains("topk"));
}

fn tiny() -> LlamaConfig {
    common::tiny_llama(2)
}

fn batch(device: &burn::tensor::Device<B>) -> CausalLmBatch<B> {
    let ids: Vec<i64> = (0..16).map(|i| (i * 7 % 40) as i64).collect();
    let next: Vec<i64> = (0..16).map(|i| ((i + 1) * 7 % 40) as i64).collect();
    CausalLmBatch {
        inputs: Tensor::from_data(TensorData::new(ids, [2, 8]), device),
        targets: Tensor::from_data(TensorData::new(next, [2, 8]), device),
        target_mask: Tensor::ones([2, 8], device),
    }
}

#[test]
fn wrapping_freezes_the_base_and_starts_from_it() {
    let device = Default::default();
    let base = Llama::<B>::init_random(&tiny(), &device);
    let tokens = batch(&device).inputs;
    let want = floats(base.forward(tokens.clone(), None));
    let configs = [
        AdapterConfig::Meft(MeftConfig {
            experts_per_token: 2,
            top_k: 4,
            ..MeftConfig::new(64)
        }),
        AdapterConfig::Dense(DenseAdapterConfig::new(64)),
        AdapterConfig::Lora(LoraConfig::new(4)),
    ];
    for cfg in configs {
        let (model, adapters) = wrap(base.clone(), &cfg, &Layers::All).unwrap();
        assert_close(
            &floats(model.forward(tokens.clone(), None)),
            &want,
            1e-6,
            "init is a no-op",
        );
        let mut grads = model.loss(&batch(&device)).backward();
        let frozen = model.blocks[1].attn.wk.linear.weight.val().grad(&grads);
        assert!(frozen.is_none(), "{cfg:?}: base weights must be frozen");
        assert!(model.embed.weight.val().grad(&grads).is_none());
        match (&cfg, &model.blocks[0].ffn) {
            (AdapterConfig::Meft(_), Ffn::Meft(f)) => {
                assert!(f.router.weight.val().grad(&grads).is_some());
                assert!(adapters.collect_grads::<B>(&mut grads).unwrap() > 0);
            }
            (AdapterConfig::Dense(_), Ffn::Dense(f)) => {
                assert!(f.values.val().grad(&grads).is_some());
            }
            (AdapterConfig::Lora(_), Ffn::Base(_)) => {
                let lora = model.blocks[0].attn.wq.lora.as_ref().unwrap();
                assert!(lora.b.val().grad(&grads).is_some());
            }
            other => panic!("unexpected wrapping {other:?}"),
        }
    }
}

#[test]
fn sparse_training_lowers_the_loss() {
    let device = Default::default();
    let base = Llama::<B>::init_random(&tiny(), &device);
    let cfg = MeftConfig {
        experts_per_token: 2,
        top_k: 8,
        ..MeftConfig::new(256)
    };
    let (model, adapters) = wrap(base, &AdapterConfig::Meft(cfg), &Layers::All).unwrap();
    let opt = SparseAdamW {
        lr: 1e-2,
        weight_decay: 0.0,
        ..SparseAdamW::default()
    };
    let data = batch(&device);
    let mut losses = Vec::new();
    for _ in 0..15 {
        let loss = model.loss(&data);
        losses.push(loss.clone().into_scalar());
        let mut grads = loss.backward();
        adapters.collect_grads::<B>(&mut grads).unwrap();
        let step = opt.step(&adapters.sparse).unwrap();
        assert!(step.rows > 0);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < first - 0.2, "loss {first} -> {last}: {losses:?}");
}

#[test]
fn training_and_inference_select_the_same_neurons() {
    let (b, t, d, n) = (2, 6, 8, 256);
    let cfg = MeftConfig {
        experts_per_token: 3,
        top_k: 8,
        ..MeftConfig::new(n)
    };
    let store = AdapterStore::init_random(n, d, 0.5, 0.5, 21);
    let layer = MeftFfn::<B>::with_store(ffn(d, 16, 22), cfg, 0, store).unwrap();
    let xv = randn(b * t * d, 1.0, 23);
    let train = layer.forward(tensor::<B, 3>(xv.clone(), [b, t, d]).require_grad());
    let train_active = layer.adapter.last_active().unwrap();
    layer.adapter.clear_tape();
    let eval = layer.valid();
    let infer = eval.forward(tensor::<NdArray<f32>, 3>(xv, [b, t, d]));
    assert_eq!(layer.adapter.last_active().unwrap(), train_active);
    assert_eq!(floats(train.inner()), floats(infer));
}

#[test]
fn wrapping_a_subset_of_layers() {
    let model = Llama::<B>::init_random(&tiny(), &Default::default());
    let cfg = AdapterConfig::Meft(MeftConfig {
        experts_per_token: 2,
        top_k: 4,
        ..MeftConfig::new(64)
    });
    let (model, adapters) = wrap(model, &cfg, &Layers::Only(vec![1])).unwrap();
    assert!(matches!(model.blocks[0].ffn, Ffn::Base(_)));
    assert!(matches!(model.blocks[1].ffn, Ffn::Meft(_)));
    assert_eq!(adapters.sparse.len(), 1);
    assert_eq!(adapters.sparse[0].layer(), 1);
    let e = wrap(model, &cfg, &Layers::Only(vec![1])).unwrap_err();
    assert!(e.to_string().contains("already has an adapter"), "{e}");
}

#[test]
fn non_finite_gradients_are_refused_and_nothing_is_added() {
    let (b, t, d, n) = (1, 4, 8, 64);
    let cfg = MeftConfig {
        experts: Some(8),
        experts_per_token: 2,
        top_k: 4,
        ..MeftConfig::new(n)
    };
    let store = AdapterStore::init_random(n, d, 0.5, 0.5, 31);
    let layer = MeftFfn::<B>::with_store(ffn(d, 16, 32), cfg, 3, store).unwrap();
    let y = layer.forward(tensor::<B, 3>(randn(b * t * d, 1.0, 33), [b, t, d]));
    let mut grads = (y * f32::NAN).sum().backward();
    let e = layer.adapter.collect_grads::<B>(&mut grads).unwrap_err();
    assert!(e.to_string().contains("layer 3"), "{e}");
    let pending = layer
        .adapter
        .with_store(|s| s.pending_rows().len())
        .unwrap();
    assert_eq!(pending, 0);
}

/// Issue 9's shared store: W data-parallel workers (replicas over one host store, each with
/// its share of the batch and its loss scaled by its token share) update the store exactly as
/// one worker does on the concatenated batch, step after step, with ragged shares and rows
/// used by several workers.
#[test]
fn data_parallel_workers_on_one_store_equal_one_worker_on_the_whole_batch() {
    use meft::adapter::meft::{apply_worker_grads, loss_share};
    let (d, hidden, n) = (16, 32, 256);
    let mut cfg = MeftConfig::new(n);
    cfg.experts = Some(16);
    cfg.experts_per_token = 4;
    cfg.top_k = 8;
    cfg.value_init_std = 0.02;
    let store = || AdapterStore::init_random(n, d, 0.1, 0.02, 11);
    let single = MeftFfn::<B>::with_store(ffn(d, hidden, 3), cfg.clone(), 0, store()).unwrap();
    let primary = MeftFfn::<B>::with_store(ffn(d, hidden, 3), cfg.clone(), 0, store()).unwrap();
    let device = Default::default();
    let workers = [
        primary.replica(&device),
        primary.replica(&device),
        primary.replica(&device),
    ];
    assert!(workers
        .iter()
        .all(|w| w.adapter.shares_store_with(&primary.adapter)));
    assert!(!single.adapter.shares_store_with(&primary.adapter));
    let shares = [9usize, 4, 11]; // ragged
    let total: usize = shares.iter().sum();
    let opt = SparseAdamW {
        lr: 0.05,
        weight_decay: 0.01,
        ..SparseAdamW::default()
    };
    let params = |m: &MeftFfn<B>| {
        m.adapter
            .with_store(|s| s.training_state().0.to_vec())
            .unwrap()
    };
    let mut shared_rows = 0;
    for step in 0..4u64 {
        let x = randn(total * d, 1.0, 100 + step);
        let r = randn(total * d, 1.0, 200 + step);
        // One worker, whole batch: mean over all tokens.
        let y = single.forward(tensor(x.clone(), [1, total, d]));
        let loss = (y * tensor(r.clone(), [1, total, d])).sum() / total as f32;
        let mut g = loss.backward();
        let rows = single.adapter.take_grads::<B>(&mut g).unwrap();
        single.adapter.absorb(rows, None).unwrap();
        single
            .adapter
            .with_store_mut(|s| opt.step_store(s))
            .unwrap();
        // W workers, each its slice, its own mean × its token share.
        let (mut start, mut per_worker, mut used) = (0, Vec::new(), Vec::new());
        for (w, &m) in workers.iter().zip(&shares) {
            let xs = x[start * d..(start + m) * d].to_vec();
            let rs = r[start * d..(start + m) * d].to_vec();
            let y = w.forward(tensor(xs, [1, m, d]));
            let loss = (y * tensor(rs, [1, m, d])).sum() / m as f32 * loss_share(m, total) as f32;
            let mut g = loss.backward();
            per_worker.push(w.adapter.take_grads::<B>(&mut g).unwrap());
            used.push(w.adapter.last_active().unwrap().rows);
            start += m;
        }
        let updated = apply_worker_grads(&primary.adapter, per_worker, &opt).unwrap();
        let union: std::collections::BTreeSet<u32> = used.iter().flatten().copied().collect();
        assert_eq!(
            updated,
            union.len(),
            "step {step}: every used row updated once"
        );
        shared_rows += used[0]
            .iter()
            .filter(|j| used[1].contains(j) || used[2].contains(j))
            .count();
        assert_close(
            &params(&primary),
            &params(&single),
            1e-5,
            &format!("store after step {step}"),
        );
    }
    assert!(
        shared_rows > 0,
        "no row was used by two workers: the sum is untested"
    );
    // The store is one: a replica sees the primary's parameters.
    assert_eq!(params(&workers[2]), params(&primary));
}
