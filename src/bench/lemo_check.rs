//! `meft bench lemo-check`: LeMo's device operations (segment selection, gather and merge
//! with their backward, the chunked attention, square and at kept-query positions, with its
//! backward, and the fused LM head + cross-entropy with its backward) on the chosen backend
//! against the host oracle and the f64 plain-op reference on ndarray, on random inputs at
//! several sizes including ragged ones — the same checks `tests/lemo_kernels.rs` runs on wgpu,
//! for backends CI has not got (CUDA). On bf16/f16 backends the reference gets the inputs as
//! the device holds them and the tolerances are half precision's.

use std::sync::Arc;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData};
use cube_kernels::attention::QueryPositions;
use cube_kernels::tokens::{kept_position_bounds, reference, select_segments_host, TokenPattern};
use serde::Serialize;

use crate::backend::BackendTask;
use crate::model::ops;
use crate::Result;

type Ref = Autodiff<NdArray<f64>>;

/// One comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    /// What was compared.
    pub check: String,
    /// The case's shape.
    pub case: String,
    /// Largest difference, relative to the reference's largest magnitude (0 for exact checks).
    pub max_err: f64,
    /// Allowed.
    pub tolerance: f64,
    /// Within tolerance.
    pub pass: bool,
}

/// The check (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct LemoCheck;

fn lcg(n: usize, seed: u64, levels: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % levels) as f32 / levels as f32 * 4.0 - 2.0
        })
        .collect()
}

/// True for bf16/f16 backends: inputs are rounded to the device's type on both sides, and
/// the tolerances widen to half precision's (2e-2; argmax may differ on 5 % of the rows).
fn half<B: Backend>() -> bool {
    matches!(
        <B::FloatElem as burn::tensor::Element>::dtype(),
        DType::BF16 | DType::F16
    )
}

/// `f32_tol` on f32 backends, at least 2e-2 on half-precision ones.
fn tol<B: Backend>(f32_tol: f64) -> f64 {
    if half::<B>() {
        f32_tol.max(2e-2)
    } else {
        f32_tol
    }
}

/// `v` rounded to the backend's float type (so the reference sees the device's inputs).
fn rounded<B: Backend>(v: Vec<f32>) -> Vec<f32> {
    let n = v.len();
    TensorData::new(v, [n])
        .convert::<B::FloatElem>()
        .convert::<f32>()
        .into_vec()
        .unwrap_or_default()
}

/// A reference (f64) tensor of `v` as the device `B` holds it.
fn on_ref<B: Backend, const D: usize>(
    v: &[f32],
    shape: [usize; D],
    device: &burn::backend::ndarray::NdArrayDevice,
) -> Tensor<Ref, D> {
    Tensor::from_data(
        TensorData::new(v.to_vec(), shape)
            .convert::<B::FloatElem>()
            .convert::<f64>(),
        device,
    )
}

fn ints<B: Backend>(t: Tensor<B, 1, Int>) -> Vec<i64> {
    t.into_data()
        .convert::<i64>()
        .into_vec()
        .unwrap_or_default()
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data()
        .convert::<f64>()
        .into_vec()
        .unwrap_or_default()
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    let worst = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    worst / scale
}

fn row(check: &str, case: String, max_err: f64, tolerance: f64) -> CheckRow {
    CheckRow {
        check: check.into(),
        case,
        max_err,
        tolerance,
        pass: max_err <= tolerance,
    }
}

fn on<B: Backend, const D: usize>(
    v: &[f32],
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(
        TensorData::new(v.to_vec(), shape).convert::<B::FloatElem>(),
        device,
    )
}

impl LemoCheck {
    fn tokens<AB: AutodiffBackend>(&self, device: &AB::Device, out: &mut Vec<CheckRow>) {
        let rdev = Default::default();
        for (i, &(b, t, seg, keep, d)) in [
            (1, 5, 16, 3, 8),
            (2, 100, 32, 7, 33),
            (3, 256, 64, 64, 130),
            (2, 1000, 256, 100, 576),
            (4, 70, 32, 31, 64),
        ]
        .iter()
        .enumerate()
        {
            let case = format!("batch {b} seq {t} segment {seg} keep {keep} d {d}");
            let scores = rounded::<AB>(lcg(b * t, i as u64 + 1, 5));
            let (idx, inv) = select_segments_host(&scores, b, t, seg, keep);
            let p = ops::select_tokens(on::<AB, 2>(&scores, [b, t], device), seg, keep);
            let ints = |x: Tensor<AB, 1, Int>, n: usize| -> Vec<i64> {
                let v: Vec<i64> = x
                    .into_data()
                    .convert::<i64>()
                    .into_vec()
                    .unwrap_or_default();
                v.into_iter().take(n).collect()
            };
            let same = ints(p.idx.clone(), idx.len())
                == idx.iter().map(|&v| v as i64).collect::<Vec<_>>()
                && ints(p.inv.clone(), inv.len())
                    == inv.iter().map(|&v| v as i64).collect::<Vec<_>>();
            out.push(row(
                "segment selection = host oracle",
                case.clone(),
                if same { 0.0 } else { 1.0 },
                0.0,
            ));

            let k = idx.len() / b;
            let (xv, cv) = (
                lcg(b * t * d, 11 + i as u64, 1 << 20),
                lcg(b * k * d, 17 + i as u64, 1 << 20),
            );
            let (w1, w2) = (
                lcg(b * k * d, 23 + i as u64, 1 << 20),
                lcg(b * t * d, 29 + i as u64, 1 << 20),
            );
            let pr = TokenPattern::<Ref>::from_host(&idx, &inv, b, t, &rdev);
            let x = on_ref::<AB, 2>(&xv, [b * t, d], &rdev).require_grad();
            let c = on_ref::<AB, 2>(&cv, [b * k, d], &rdev).require_grad();
            let g = reference::gather_tensors(x.clone(), pr.idx.clone());
            let m = reference::merge_tensors(x.clone(), c.clone(), pr.inv.clone());
            let gr = ((g.clone() * on_ref::<AB, 2>(&w1, [b * k, d], &rdev)).sum()
                + (m.clone() * on_ref::<AB, 2>(&w2, [b * t, d], &rdev)).sum())
            .backward();
            let xk = on::<AB, 3>(&xv, [b, t, d], device).require_grad();
            let ck = on::<AB, 3>(&cv, [b, k, d], device).require_grad();
            let gk = ops::gather(xk.clone(), &p);
            let mk = ops::merge(xk.clone(), ck.clone(), &p);
            let grk = ((gk.clone() * on::<AB, 3>(&w1, [b, k, d], device)).sum()
                + (mk.clone() * on::<AB, 3>(&w2, [b, t, d], device)).sum())
            .backward();
            out.push(row(
                "gather",
                case.clone(),
                rel_err(&host(gk), &host(g)),
                0.0,
            ));
            out.push(row(
                "merge",
                case.clone(),
                rel_err(&host(mk), &host(m)),
                0.0,
            ));
            let dx = rel_err(
                &host(xk.grad(&grk).expect("dx")),
                &host(x.grad(&gr).expect("dx")),
            );
            let dc = rel_err(
                &host(ck.grad(&grk).expect("dc")),
                &host(c.grad(&gr).expect("dc")),
            );
            out.push(row(
                "gather+merge backward dx",
                case.clone(),
                dx,
                tol::<AB>(1e-6),
            ));
            out.push(row("merge backward dcomp", case, dc, tol::<AB>(1e-6)));
        }
    }

    fn attention<AB: AutodiffBackend>(&self, device: &AB::Device, out: &mut Vec<CheckRow>) {
        let rdev = Default::default();
        // 16-row query chunks, so every case runs several (ragged) chunks.
        std::env::set_var("MEFT_ATTN_CHUNK_MB", "0");
        // (batch, heads, kv_heads, seq, head_dim); the last is SmolLM2's grouping (9 over 3).
        for (i, &(b, h, kv, t, hd)) in [(1, 2, 2, 50, 16), (2, 3, 3, 300, 64), (1, 9, 3, 1000, 64)]
            .iter()
            .enumerate()
        {
            let case = format!("batch {b} heads {h}/{kv} seq {t} head_dim {hd}, 16-row chunks");
            let (shape, kshape) = ([b, h, t, hd], [b, kv, t, hd]);
            let mut v: Vec<Vec<f32>> = [shape, kshape, kshape, shape]
                .iter()
                .zip(0u64..)
                .map(|(s, j)| lcg(s.iter().product(), 101 + 7 * i as u64 + j, 1 << 20))
                .collect();
            // Queries in [-0.25, 0.25): scores of a few units, so the softmax stays spread
            // (at [-2, 2) it saturates to one key and the output check proves little).
            v[0].iter_mut().for_each(|x| *x *= 0.125);
            let r = |x: &[f32], s| on_ref::<AB, 4>(x, s, &rdev).require_grad();
            let (q, k, vv) = (r(&v[0], shape), r(&v[1], kshape), r(&v[2], kshape));
            let (want, _) = cube_kernels::attention::forward(q.clone(), k.clone(), vv.clone(), t);
            let gw = (want.clone() * on_ref::<AB, 4>(&v[3], shape, &rdev))
                .sum()
                .backward();
            let g = |x: &[f32], s| on::<AB, 4>(x, s, device).require_grad();
            let (qk, kk, vk) = (g(&v[0], shape), g(&v[1], kshape), g(&v[2], kshape));
            let got = ops::causal_attention(qk.clone(), kk.clone(), vk.clone());
            let gg = (got.clone() * on::<AB, 4>(&v[3], shape, device))
                .sum()
                .backward();
            // f32 on the device (GPU matmuls may use reduced-precision tensor cores).
            let tol = tol::<AB>(1e-3);
            out.push(row(
                "chunked attention out",
                case.clone(),
                rel_err(&host(got), &host(want)),
                tol,
            ));
            for (name, a, c) in [("dq", &qk, &q), ("dk", &kk, &k), ("dv", &vk, &vv)] {
                let e = rel_err(
                    &host(a.grad(&gg).expect("grad")),
                    &host(c.grad(&gw).expect("grad")),
                );
                out.push(row(
                    &format!("chunked attention {name}"),
                    case.clone(),
                    e,
                    tol,
                ));
            }
        }
        self.attention_at::<AB>(device, out);
        std::env::remove_var("MEFT_ATTN_CHUNK_MB");
    }

    /// Kept query rows (segments of 64 keeping 27: ragged) attending to every key.
    fn attention_at<AB: AutodiffBackend>(&self, device: &AB::Device, out: &mut Vec<CheckRow>) {
        let rdev = Default::default();
        let (seg, keep) = (64, 27);
        for (i, &(b, h, kv, t, hd)) in [(1, 2, 2, 50, 16), (2, 3, 3, 300, 64), (1, 9, 3, 1000, 64)]
            .iter()
            .enumerate()
        {
            let case = format!(
                "batch {b} heads {h}/{kv} keys {t} head_dim {hd}, {keep} of every {seg} as queries"
            );
            let scores = rounded::<AB>(lcg(b * t, 77 + i as u64, 1 << 20));
            let (idx, _) = select_segments_host(&scores, b, t, seg, keep);
            let tq = idx.len() / b;
            let pos: Vec<i64> = idx.iter().map(|&r| r as i64 % t as i64).collect();
            let bound = Arc::new(kept_position_bounds(t, seg, keep));
            let (qs, ks) = ([b, h, tq, hd], [b, kv, t, hd]);
            let mut v: Vec<Vec<f32>> = [(qs, 0), (ks, 1), (ks, 2), (qs, 3)]
                .iter()
                .map(|&(s, j)| lcg(s.iter().product(), 301 + 7 * i as u64 + j, 1 << 20))
                .collect();
            v[0].iter_mut().for_each(|x| *x *= 0.125);
            let at_ref = QueryPositions::<Ref> {
                pos: Tensor::from_data(TensorData::new(pos.clone(), [b, tq]), &rdev),
                bound: bound.clone(),
            };
            let r = |x: &[f32], s| on_ref::<AB, 4>(x, s, &rdev).require_grad();
            let (q, k, vv) = (r(&v[0], qs), r(&v[1], ks), r(&v[2], ks));
            let (want, _) =
                cube_kernels::attention::forward_at(q.clone(), k.clone(), vv.clone(), &at_ref, tq);
            let gw = (want.clone() * on_ref::<AB, 4>(&v[3], qs, &rdev))
                .sum()
                .backward();
            let at = QueryPositions::<AB> {
                pos: Tensor::from_data(TensorData::new(pos, [b, tq]), device),
                bound,
            };
            let g = |x: &[f32], s| on::<AB, 4>(x, s, device).require_grad();
            let (qk, kk, vk) = (g(&v[0], qs), g(&v[1], ks), g(&v[2], ks));
            let got = ops::causal_attention_at(qk.clone(), kk.clone(), vk.clone(), &at);
            let gg = (got.clone() * on::<AB, 4>(&v[3], qs, device))
                .sum()
                .backward();
            let tol = tol::<AB>(1e-3);
            out.push(row(
                "attention at positions out",
                case.clone(),
                rel_err(&host(got), &host(want)),
                tol,
            ));
            for (name, a, c) in [("dq", &qk, &q), ("dk", &kk, &k), ("dv", &vk, &vv)] {
                let e = rel_err(
                    &host(a.grad(&gg).expect("grad")),
                    &host(c.grad(&gw).expect("grad")),
                );
                out.push(row(
                    &format!("attention at positions {name}"),
                    case.clone(),
                    e,
                    tol,
                ));
            }
        }
    }

    /// The fused LM head + cross-entropy (`ops::token_nll`, chunks of 16 rows: several and a
    /// ragged last one) against the f64 `log_softmax(h · W)`: per-row loss, argmax agreement,
    /// and the gradients of the hidden states and the head weight under random row weights.
    fn loss<AB: AutodiffBackend>(&self, device: &AB::Device, out: &mut Vec<CheckRow>) {
        let rdev = Default::default();
        // 16 rows per chunk at these vocabularies (the budget rounds up to 16 rows).
        std::env::set_var("MEFT_LOSS_CHUNK_MB", "0");
        for (i, &(n, d, v)) in [(37, 16, 50), (300, 64, 1000), (1000, 576, 4099)]
            .iter()
            .enumerate()
        {
            let case = format!("rows {n} d {d} vocab {v}, 16-row chunks");
            let seed = 303 + 11 * i as u64;
            let h = lcg(n * d, seed, 1 << 20);
            let w: Vec<f32> = lcg(d * v, seed + 1, 1 << 20)
                .iter()
                .map(|x| x * 0.5 / (d as f32).sqrt())
                .collect();
            let c = lcg(n, seed + 2, 1 << 20);
            let t: Vec<i64> = lcg(n, seed + 3, v as u64)
                .iter()
                .map(|x| (((x + 2.0) / 4.0) * v as f32) as i64 % v as i64)
                .collect();
            let targets = Tensor::<Ref, 1, Int>::from_data(TensorData::new(t.clone(), [n]), &rdev);
            let (hr, wr) = (
                on_ref::<AB, 2>(&h, [n, d], &rdev).require_grad(),
                on_ref::<AB, 2>(&w, [d, v], &rdev).require_grad(),
            );
            let logits = hr.clone().matmul(wr.clone());
            let best_r: Vec<i64> = ints(logits.clone().argmax(1).squeeze_dim::<1>(1));
            let nll_r = burn::tensor::activation::log_softmax(logits, 1)
                .gather(1, targets.unsqueeze_dim(1))
                .reshape([n])
                .neg();
            let gr = (nll_r.clone() * on_ref::<AB, 1>(&c, [n], &rdev))
                .sum()
                .backward();
            let (hk, wk) = (
                on::<AB, 2>(&h, [n, d], device).require_grad(),
                on::<AB, 2>(&w, [d, v], device).require_grad(),
            );
            let tk = Tensor::<AB, 1, Int>::from_data(TensorData::new(t.clone(), [n]), device);
            let (nll, best) = ops::token_nll(hk.clone(), wk.clone(), tk);
            // The loss is f32 on half-precision backends: the weights must be too (burn's
            // binary ops do not convert between float types; a bf16 operand would be read
            // as f32).
            let ck = on::<AB, 1>(&c, [n], device).cast(nll.dtype());
            let gk = (nll.clone() * ck).sum().backward();
            let tol = tol::<AB>(1e-3);
            let what = "fused loss";
            out.push(row(
                &format!("{what} nll"),
                case.clone(),
                rel_err(&host(nll), &host(nll_r)),
                tol,
            ));
            // Near-ties may flip under f32; count disagreements as a share of the rows.
            // Indices read as integers (through a bf16 float they would round above 256).
            let best = ints(best);
            let flips = best.iter().zip(&best_r).filter(|(a, b)| a != b).count();
            out.push(row(
                &format!("{what} argmax (share of rows differing)"),
                case.clone(),
                flips as f64 / n as f64,
                if half::<AB>() { 0.05 } else { 0.01 },
            ));
            for (name, a, r) in [("d hidden", &hk, &hr), ("d weight", &wk, &wr)] {
                let e = rel_err(
                    &host(a.grad(&gk).expect("grad")),
                    &host(r.grad(&gr).expect("grad")),
                );
                out.push(row(&format!("{what} {name}"), case.clone(), e, tol));
            }
        }
        std::env::remove_var("MEFT_LOSS_CHUNK_MB");
    }
}

impl BackendTask for LemoCheck {
    type Output = Vec<CheckRow>;

    fn run<B: Backend>(self, device: B::Device) -> Result<Vec<CheckRow>> {
        let mut out = Vec::new();
        self.tokens::<Autodiff<B>>(&device, &mut out);
        self.attention::<Autodiff<B>>(&device, &mut out);
        self.loss::<Autodiff<B>>(&device, &mut out);
        Ok(out)
    }
}

impl CheckRow {
    /// A Markdown table.
    pub fn table(rows: &[CheckRow]) -> String {
        let mut s = String::from(
            "| check | case | max rel. error | tolerance | pass |\n|---|---|---|---|---|\n",
        );
        for r in rows {
            s += &format!(
                "| {} | {} | {:.2e} | {:.0e} | {} |\n",
                r.check, r.case, r.max_err, r.tolerance, r.pass
            );
        }
        s
    }
}
