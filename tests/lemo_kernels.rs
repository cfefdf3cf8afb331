//! LeMo's token kernels on wgpu (lavapipe on CPU-only machines) against the host oracle and
//! the plain-op reference: segment selection (ragged last segments, ties, a segment shorter
//! than the budget, keep-all, batch offsets), gather and merge with their backward (exact:
//! they only copy), and the memory-efficient attention, square and at kept-query positions
//! (f32 kernels vs an f64 reference,
//! within 1e-5 of the largest magnitude).
#![cfg(feature = "wgpu")]

use burn::backend::wgpu::{CubeBackend, WgpuRuntime};
use burn::backend::{Autodiff, NdArray, Wgpu};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor, TensorData, TensorPrimitive};
use cube_kernels::attention::{forward as attn_ref, ChunkedAttentionBackend};
use cube_kernels::tokens::{
    gather_tokens, merge_tokens, reference, segment_select, select_segments_host, TokenPattern,
    TokenSparsityBackend,
};

type Fused = Autodiff<Wgpu<f32>>;
type Unfused = Autodiff<CubeBackend<WgpuRuntime, f32, i32, u32>>;
type Ref = Autodiff<NdArray<f64>>;

fn scores(n: usize, seed: u64, levels: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Few levels: many ties.
            ((s >> 33) % levels) as f32 * 0.25 - 1.0
        })
        .collect()
}

fn ints<B: Backend>(t: Tensor<B, 1, Int>, n: usize) -> Vec<i64> {
    let v: Vec<i64> = t.into_data().convert::<i64>().into_vec().unwrap();
    v[..n].to_vec()
}

fn floats<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().into_vec().unwrap()
}

const CASES: [(usize, usize, usize, usize); 6] = [
    (1, 5, 16, 3),    // one segment shorter than the budget... and than S
    (2, 100, 32, 7),  // ragged last segment of 4 (keeps 4)
    (3, 256, 64, 64), // keep everything
    (2, 1000, 256, 100),
    (1, 33, 16, 1),
    (4, 70, 32, 31),
];

fn check_select<K: TokenSparsityBackend>(name: &str) {
    let dev = Default::default();
    for (i, &(batch, seq, seg, keep)) in CASES.iter().enumerate() {
        for levels in [3, 1 << 20] {
            let s = scores(batch * seq, i as u64 + levels, levels);
            let (idx, inv) = select_segments_host(&s, batch, seq, seg, keep);
            let t = Tensor::<K, 2>::from_data(TensorData::new(s.clone(), [batch, seq]), &dev);
            let p = segment_select(t, seg, keep);
            assert_eq!(p.kept * batch, idx.len(), "{name} case {i}");
            let want_idx: Vec<i64> = idx.iter().map(|&v| v as i64).collect();
            let want_inv: Vec<i64> = inv.iter().map(|&v| v as i64).collect();
            assert_eq!(ints(p.idx, idx.len()), want_idx, "{name} case {i} idx");
            assert_eq!(ints(p.inv, inv.len()), want_inv, "{name} case {i} inv");
        }
    }
}

#[test]
fn segment_select_equals_the_host_oracle() {
    check_select::<Fused>("fused");
    check_select::<Unfused>("unfused");
}

fn check_gather_merge<K: AutodiffBackend + TokenSparsityBackend>(name: &str) {
    let dev = Default::default();
    let kdev: K::Device = Default::default();
    for (i, &(batch, seq, seg, keep)) in CASES.iter().enumerate() {
        for d in [1, 33, 130] {
            let s = scores(batch * seq, i as u64, 5);
            let (idx, inv) = select_segments_host(&s, batch, seq, seg, keep);
            let kept = idx.len() / batch;
            let x = Tensor::<Ref, 3>::random([batch, seq, d], Distribution::Default, &dev);
            let c = Tensor::<Ref, 3>::random([batch, kept, d], Distribution::Default, &dev);
            let w1 = Tensor::<Ref, 3>::random([batch, kept, d], Distribution::Default, &dev);
            let w2 = Tensor::<Ref, 3>::random([batch, seq, d], Distribution::Default, &dev);
            // The reference in f64, on values that are exact in f32.
            let f32s = |t: Tensor<Ref, 3>| -> Vec<f32> {
                t.into_data().convert::<f32>().into_vec().unwrap()
            };
            let (xv, cv, w1v, w2v) = (f32s(x), f32s(c), f32s(w1), f32s(w2));
            let on = |v: &[f32], shape: [usize; 3]| {
                Tensor::<Ref, 3>::from_data(
                    TensorData::new(v.to_vec(), shape).convert::<f64>(),
                    &dev,
                )
                .require_grad()
            };
            let (x, c) = (on(&xv, [batch, seq, d]), on(&cv, [batch, kept, d]));
            let pr = TokenPattern::<Ref>::from_host(&idx, &inv, batch, seq, &dev);
            let flat = x.clone().reshape([batch * seq, d]);
            let g =
                reference::gather_tensors(flat.clone(), pr.idx.clone()).reshape([batch, kept, d]);
            let m = reference::merge_tensors(
                flat,
                c.clone().reshape([batch * kept, d]),
                pr.inv.clone(),
            )
            .reshape([batch, seq, d]);
            let grads = ((g.clone() * on(&w1v, [batch, kept, d])).sum()
                + (m.clone() * on(&w2v, [batch, seq, d])).sum())
            .backward();

            let onk = |v: &[f32], shape: [usize; 3]| {
                Tensor::<K, 3>::from_data(TensorData::new(v.to_vec(), shape), &kdev).require_grad()
            };
            let (xk, ck) = (onk(&xv, [batch, seq, d]), onk(&cv, [batch, kept, d]));
            let pk = TokenPattern::<K>::from_host(&idx, &inv, batch, seq, &kdev);
            let gk = gather_tokens(xk.clone(), &pk);
            let mk = merge_tokens(xk.clone(), ck.clone(), &pk);
            let gradsk = ((gk.clone() * onk(&w1v, [batch, kept, d])).sum()
                + (mk.clone() * onk(&w2v, [batch, seq, d])).sum())
            .backward();
            let tag = format!("{name} case {i} d {d}");
            assert_eq!(floats(gk), floats(g), "{tag}: gather");
            assert_eq!(floats(mk), floats(m), "{tag}: merge");
            let close = |a: Vec<f64>, b: Vec<f64>, what: &str| {
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                        "{tag}: {what} {x} vs {y}"
                    );
                }
            };
            // Gradients: copies of w (exact), plus the sum over the two uses of x.
            close(
                floats(xk.grad(&gradsk).unwrap()),
                floats(x.grad(&grads).unwrap()),
                "dx",
            );
            close(
                floats(ck.grad(&gradsk).unwrap()),
                floats(c.grad(&grads).unwrap()),
                "dcomp",
            );
        }
    }
}

#[test]
fn gather_and_merge_equal_the_reference_with_gradients() {
    check_gather_merge::<Fused>("fused");
    check_gather_merge::<Unfused>("unfused");
}

#[test]
fn chunked_attention_on_wgpu_equals_the_f64_reference() {
    // Fused: the softmax in plain ops (burn's fusion); unfused: the row kernels.
    check_attention::<Fused>("fused");
    check_attention::<Unfused>("unfused");
}

fn check_attention<K: AutodiffBackend + ChunkedAttentionBackend>(name: &str) {
    let dev = Default::default();
    let gdev = Default::default();
    // (batch, heads, kv_heads, seq, head_dim, chunk); the last case groups 4 query heads over
    // 2 key/value heads.
    for (b, h, nkv, t, hd, chunk) in [
        (1, 2, 2, 50, 16, 16),
        (2, 1, 1, 17, 8, 16),
        (1, 3, 3, 64, 32, 64),
        (2, 4, 2, 23, 8, 16),
    ] {
        // Values in [-2, 2) (the selection scores' generator, rescaled).
        let vals = |s: u64, heads: usize| -> Vec<f32> {
            scores(b * heads * t * hd, s, 1 << 20)
                .iter()
                .map(|v| (v + 1.0) / 65536.0 - 2.0)
                .collect()
        };
        let (mut qv, kv, vv, wv) = (vals(1, h), vals(2, nkv), vals(3, nkv), vals(4, h));
        // Queries scaled down so the softmax stays spread (not one-hot).
        qv.iter_mut().for_each(|x| *x *= 0.125);
        let shape = |heads: usize| [b, heads, t, hd];
        let r = |v: &[f32], heads: usize| {
            Tensor::<Ref, 4>::from_data(
                TensorData::new(v.to_vec(), shape(heads)).convert::<f64>(),
                &dev,
            )
            .require_grad()
        };
        let (q, k, v) = (r(&qv, h), r(&kv, nkv), r(&vv, nkv));
        let (want, _) = attn_ref(q.clone(), k.clone(), v.clone(), chunk);
        let gw = (want.clone() * r(&wv, h)).sum().backward();
        let g = |v: &[f32], heads: usize| {
            Tensor::<K, 4>::from_data(TensorData::new(v.to_vec(), shape(heads)), &gdev)
                .require_grad()
        };
        let (qk, kk, vk) = (g(&qv, h), g(&kv, nkv), g(&vv, nkv));
        let prim = |x: &Tensor<K, 4>| x.clone().into_primitive().tensor();
        let got = Tensor::<K, 4>::from_primitive(TensorPrimitive::Float(
            <K as ChunkedAttentionBackend>::chunked_attention(
                prim(&qk),
                prim(&kk),
                prim(&vk),
                chunk,
            ),
        ));
        let gg = (got.clone() * g(&wv, h)).sum().backward();
        let close = |a: Vec<f64>, b: Vec<f64>, what: &str| {
            let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-5 * scale,
                    "{name}: t {t} chunk {chunk} {what}: {x} vs {y}"
                );
            }
        };
        close(floats(got), floats(want), "out");
        close(
            floats(qk.grad(&gg).unwrap()),
            floats(q.grad(&gw).unwrap()),
            "dq",
        );
        close(
            floats(kk.grad(&gg).unwrap()),
            floats(k.grad(&gw).unwrap()),
            "dk",
        );
        close(
            floats(vk.grad(&gg).unwrap()),
            floats(v.grad(&gw).unwrap()),
            "dv",
        );
    }
}

#[test]
fn attention_at_kept_positions_on_wgpu_equals_the_f64_reference() {
    check_attention_at::<Fused>("fused");
    check_attention_at::<Unfused>("unfused");
}

fn check_attention_at<K: AutodiffBackend + ChunkedAttentionBackend>(name: &str) {
    let dev = Default::default();
    let gdev = Default::default();
    // (batch, heads, keys, head_dim, segment, keep, chunk): ragged last segments, several
    // chunks, one chunk larger than the queries.
    for (b, h, t, hd, seg, keep, chunk) in [
        (1, 2, 50, 16, 16, 5, 4),
        (2, 1, 37, 8, 8, 3, 16),
        (1, 3, 64, 32, 32, 20, 64),
    ] {
        let (idx, _) = select_segments_host(&scores(b * t, 9, 1 << 10), b, t, seg, keep);
        let tq = idx.len() / b;
        let pos: Vec<i64> = idx.iter().map(|&r| r as i64 % t as i64).collect();
        let bound = std::sync::Arc::new(cube_kernels::tokens::kept_position_bounds(t, seg, keep));
        let vals = |n: usize, s: u64| -> Vec<f32> {
            scores(n, s, 1 << 20)
                .iter()
                .map(|v| (v + 1.0) / 65536.0 - 2.0)
                .collect()
        };
        let (qs, ks) = ([b, h, tq, hd], [b, h, t, hd]);
        let (mut qv, kv, vv, wv) = (
            vals(b * h * tq * hd, 1),
            vals(b * h * t * hd, 2),
            vals(b * h * t * hd, 3),
            vals(b * h * tq * hd, 4),
        );
        qv.iter_mut().for_each(|x| *x *= 0.125);
        let r = |v: &[f32], s: [usize; 4]| {
            Tensor::<Ref, 4>::from_data(TensorData::new(v.to_vec(), s).convert::<f64>(), &dev)
                .require_grad()
        };
        let (q, k, v) = (r(&qv, qs), r(&kv, ks), r(&vv, ks));
        let at = cube_kernels::attention::QueryPositions::<Ref> {
            pos: Tensor::from_data(TensorData::new(pos.clone(), [b, tq]), &dev),
            bound: bound.clone(),
        };
        let (want, _) =
            cube_kernels::attention::forward_at(q.clone(), k.clone(), v.clone(), &at, tq);
        let gw = (want.clone() * r(&wv, qs)).sum().backward();
        let g = |v: &[f32], s: [usize; 4]| {
            Tensor::<K, 4>::from_data(TensorData::new(v.to_vec(), s), &gdev).require_grad()
        };
        let (qk, kk, vk) = (g(&qv, qs), g(&kv, ks), g(&vv, ks));
        let prim = |x: &Tensor<K, 4>| x.clone().into_primitive().tensor();
        let pos = Tensor::<K, 2, Int>::from_data(TensorData::new(pos, [b, tq]), &gdev);
        let got = Tensor::<K, 4>::from_primitive(TensorPrimitive::Float(
            <K as ChunkedAttentionBackend>::chunked_attention_at(
                prim(&qk),
                prim(&kk),
                prim(&vk),
                pos.into_primitive(),
                bound,
                chunk,
            ),
        ));
        let gg = (got.clone() * g(&wv, qs)).sum().backward();
        let close = |a: Vec<f64>, b: Vec<f64>, what: &str| {
            let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-5 * scale,
                    "{name}: keys {t} keep {keep}/{seg} chunk {chunk} {what}: {x} vs {y}"
                );
            }
        };
        close(floats(got), floats(want), "out");
        for (what, a, c) in [("dq", &qk, &q), ("dk", &kk, &k), ("dv", &vk, &v)] {
            close(
                floats(a.grad(&gg).unwrap()),
                floats(c.grad(&gw).unwrap()),
                what,
            );
        }
    }
}

/// The attention's row kernels (unfused wgpu) against the plain-op rows in f64: rows of 1 to
/// 2 049 keys (ragged against every unit count), last visible keys anywhere in the row,
/// including past its end; scores read through a pitched view (row stride > keys, as a
/// matmul's output may be); outputs in key blocks of every key count, of 16, and of 7 (ragged
/// last block, padding).
#[test]
fn attention_row_kernels_equal_the_plain_rows() {
    use cube_kernels::attention::reference::{causal_softmax, causal_softmax_grad};
    type Inner = CubeBackend<WgpuRuntime, f32, i32, u32>;
    type R64 = NdArray<f64>;
    let (dev, gdev) = (Default::default(), Default::default());
    // (batch, kv heads, rows per head, keys)
    for (i, &(b, kv, rc, keys)) in [
        (1, 1, 1, 1),
        (1, 1, 5, 37),
        (2, 3, 3, 300),
        (1, 2, 32, 1000),
        (1, 1, 3, 2049),
    ]
    .iter()
    .enumerate()
    {
        let rows = b * kv * rc;
        let seed = 100 + i as u64;
        let pitch = keys + 3;
        let vals = |s: u64| -> Vec<f32> {
            scores(rows * pitch, s, 1 << 20)
                .iter()
                .map(|v| ((v + 1.0) / 65536.0 - 2.0) * 3.0)
                .collect()
        };
        let (sv, dpv) = (vals(seed), vals(seed + 7));
        let limits: Vec<i32> = scores(rows, seed + 3, 1 << 20)
            .iter()
            .map(|v| (((v + 1.0) * 4.0) as usize % (keys + 2)) as i32)
            .collect();
        let deltas: Vec<f32> = scores(rows, seed + 5, 1 << 10).to_vec();
        let scale = 0.3;
        let shape = [b, kv, rc, keys];
        let cut = [0..b, 0..kv, 0..rc, 0..keys];
        let r4 = |v: &[f32]| {
            Tensor::<R64, 4>::from_data(
                TensorData::new(v.to_vec(), [b, kv, rc, pitch]).convert::<f64>(),
                &dev,
            )
            .slice(cut.clone())
        };
        let r1 = |v: &[f32]| {
            Tensor::<R64, 1>::from_data(TensorData::new(v.to_vec(), [rows]).convert::<f64>(), &dev)
        };
        let rl = || Tensor::<R64, 1, Int>::from_data(TensorData::new(limits.clone(), [rows]), &dev);
        // The pitched view, on the device: [b, kv, rc, keys] with row stride keys + 3.
        let g4 = |v: &[f32]| {
            Tensor::<Inner, 4>::from_data(TensorData::new(v.to_vec(), [b, kv, rc, pitch]), &gdev)
                .slice(cut.clone())
                .into_primitive()
                .tensor()
        };
        let g1 = |v: &[f32]| {
            Tensor::<Inner, 1>::from_data(TensorData::new(v.to_vec(), [rows]), &gdev)
                .into_primitive()
                .tensor()
        };
        let gl = || {
            Tensor::<Inner, 1, Int>::from_data(TensorData::new(limits.clone(), [rows]), &gdev)
                .into_primitive()
        };
        let close = |a: Vec<f64>, b: Vec<f64>, what: &str| {
            assert_eq!(a.len(), b.len(), "{what}");
            let m = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
            for (j, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-5 * m,
                    "{shape:?} {what}[{j}]: {x} vs {y}"
                );
            }
        };
        let back = |t| {
            floats(Tensor::<Inner, 4>::from_primitive(TensorPrimitive::Float(
                t,
            )))
        };
        let (f64t, f32t) = (burn::tensor::DType::F64, burn::tensor::DType::F32);
        for block in [keys, 16, 7] {
            let (p_want, lse_want) = causal_softmax(r4(&sv), rl(), scale, f64t, block);
            let lse_host: Vec<f32> = floats(lse_want.clone()).iter().map(|&x| x as f32).collect();
            let (gp_want, ds_want) = causal_softmax_grad(
                r4(&sv),
                r4(&dpv),
                r1(&lse_host),
                r1(&deltas),
                rl(),
                scale,
                f64t,
                block,
            );
            let (p, lse) = <Inner as ChunkedAttentionBackend>::causal_softmax(
                g4(&sv),
                gl(),
                scale,
                f32t,
                block,
            );
            let (gp, ds) = <Inner as ChunkedAttentionBackend>::causal_softmax_grad(
                g4(&sv),
                g4(&dpv),
                g1(&lse_host),
                g1(&deltas),
                gl(),
                scale,
                f32t,
                block,
            );
            let what = |x: &str| format!("{x}, block {block}");
            close(back(p), floats(p_want), &what("p"));
            let lse = floats(Tensor::<Inner, 1>::from_primitive(TensorPrimitive::Float(
                lse,
            )));
            close(lse, floats(lse_want), &what("lse"));
            close(back(gp), floats(gp_want), &what("grad p"));
            close(back(ds), floats(ds_want), &what("ds"));
        }
        assert_eq!(shape.iter().product::<usize>(), rows * keys);
    }
}
