//! LeMo token elimination on the CPU (ndarray, f64): with nothing eliminated the model is
//! exactly the plain model (outputs and gradients); eliminated tokens leave a layer equal to
//! their input while kept tokens equal a dense layer whose attention sees all keys, or only
//! kept keys; the memory-efficient attention, square or at query positions, equals burn's
//! attention (values and gradients); the token
//! operations' custom backward equals autodiff of the plain-op reference; predictors learn.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Distribution, Int, Tensor, TensorData};
use std::sync::Arc;

use cube_kernels::tokens::{
    gather_tokens, kept_position_bounds, merge_tokens, reference, select_segments_host,
    TokenPattern,
};
use meft::lemo::{
    eliminate, eliminate_from_backward, eliminated, random_run_scores, random_scores, Elimination,
    KeyScope, Lemo, LemoConfig, LemoMode, LemoPlan, PatternSource,
};
use meft::model::{ops, Llama};

type B64 = Autodiff<NdArray<f64>>;

fn tokens<B: Backend>(batch: usize, seq: usize, vocab: usize, seed: u64) -> Tensor<B, 2, Int> {
    let mut s = seed;
    let v: Vec<i64> = (0..batch * seq)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as i64
        })
        .collect();
    Tensor::from_data(TensorData::new(v, [batch, seq]), &Default::default())
}

fn max_abs<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    (a - b)
        .abs()
        .max()
        .into_scalar()
        .to_string()
        .parse::<f64>()
        .unwrap()
}

/// The backend's random generator is global and the tests run on parallel threads: every
/// draw holds this lock, so a seeded sequence (seed, then draws) is not interleaved with
/// another test's draws and gives the same values in every run.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|p| p.into_inner())
}

/// A random tensor (under the generator lock).
fn rand<const D: usize>(
    shape: [usize; D],
    dist: Distribution,
    dev: &burn::backend::ndarray::NdArrayDevice,
) -> Tensor<B64, D> {
    let _g = rng();
    Tensor::random(shape, dist, dev)
}

fn model(n_layers: usize, seq: usize) -> Llama<B64> {
    let mut cfg = common::tiny_llama(n_layers);
    cfg.max_seq_len = seq;
    let _g = rng();
    B64::seed(&Default::default(), 7);
    Llama::<B64>::init_random(&cfg, &Default::default())
}

/// Every parameter gradient of `m` for `loss`, flattened in visiting order.
fn param_grads(m: &Llama<B64>, loss: Tensor<B64, 1>) -> Vec<Vec<f64>> {
    let grads = loss.backward();
    let gp = GradientsParams::from_grads(grads, m);
    let mut out = Vec::new();
    struct Collect<'a>(&'a GradientsParams, &'a mut Vec<Vec<f64>>);
    impl burn::module::ModuleVisitor<B64> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<B64, D>>) {
            if let Some(g) = self.0.get::<NdArray<f64>, D>(p.id) {
                self.1
                    .push(g.into_data().convert::<f64>().into_vec().unwrap());
            }
        }
    }
    m.visit(&mut Collect(&gp, &mut out));
    out
}

#[test]
fn zero_budget_equals_the_plain_model_exactly() {
    for (keys, elim) in [
        (KeyScope::All, Elimination::Backward),
        (KeyScope::All, Elimination::Layer),
        (KeyScope::Kept, Elimination::Layer),
    ] {
        zero_budget_equals_plain(keys, elim);
    }
}

/// The elimination path itself (`eliminate`) with a pattern that keeps every token: exactly
/// the plain block with kept-key attention; with attention to all keys equal up to the order
/// in which the key/value and query gradients of the normalised input are summed.
#[test]
fn eliminating_nothing_through_the_gather_merge_path_equals_the_plain_block() {
    let (batch, seq, d) = (2, 24, 16);
    let m = model(1, seq);
    let block = &m.blocks[0];
    let dev = Default::default();
    let x = rand([batch, seq, d], Distribution::Normal(0.0, 1.0), &dev).require_grad();
    let w = rand([batch, seq, d], Distribution::Default, &dev);
    let scores = vec![0.0f32; batch * seq];
    let (idx, inv) = select_segments_host(&scores, batch, seq, 16, 16);
    let p = TokenPattern::<B64>::from_host(&idx, &inv, batch, seq, &dev);
    let plain = block.forward(x.clone(), &m.rope, None);
    let plain_grads = param_grads(&m, (plain.clone() * w.clone()).sum());
    for (keys, tol) in [(KeyScope::Kept, 0.0), (KeyScope::All, 1e-12)] {
        let bound = Arc::new(kept_position_bounds(seq, 16, 16));
        let y = eliminate(block, x.clone(), &m.rope, &p, keys, bound);
        let scale = max_abs(plain.clone(), plain.clone() * 0.0);
        assert!(
            max_abs(y.clone(), plain.clone()) <= tol * scale,
            "{keys:?}: outputs differ"
        );
        let g = param_grads(&m, (y * w.clone()).sum());
        assert_eq!(g.len(), plain_grads.len());
        for (a, b) in g.iter().zip(&plain_grads) {
            let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
            assert!(err <= tol * scale, "{keys:?}: a gradient differs by {err}");
        }
    }
}

fn zero_budget_equals_plain(keys: KeyScope, eliminate: Elimination) {
    // 24 tokens in segments of 16: a full segment and a ragged one.
    let (batch, seq) = (2, 24);
    let m = model(3, seq);
    let cfg = LemoConfig {
        keep_ratio: 1.0,
        segment: 16,
        keys,
        eliminate,
        layers: Some(meft::adapter::Layers::All),
        ..LemoConfig::default()
    };
    let lemo = Lemo::new(&cfg, &m, &Default::default()).unwrap();
    let toks = tokens::<B64>(batch, seq, 40, 1);
    let weights = rand([batch, seq, 16], Distribution::Default, &Default::default());
    let plain = m.forward_hidden(toks.clone(), None);
    let plain_grads = param_grads(&m, (plain.clone() * weights.clone()).sum());
    for mode in [LemoMode::Exact, LemoMode::Predicted, LemoMode::Calibrate] {
        let (h, _) = lemo.forward_hidden(&m, toks.clone(), mode);
        assert_eq!(
            max_abs(h.clone(), plain.clone()),
            0.0,
            "{keys:?} {mode:?}: outputs differ"
        );
        let g = param_grads(&m, (h * weights.clone()).sum());
        assert_eq!(g.len(), plain_grads.len());
        for (a, b) in g.iter().zip(&plain_grads) {
            assert_eq!(a, b, "{keys:?} {mode:?}: a gradient differs");
        }
    }
}

#[test]
fn eliminated_tokens_pass_through_and_kept_tokens_see_the_chosen_keys() {
    for keys in [KeyScope::Kept, KeyScope::All] {
        check_elimination(keys);
    }
}

/// `eliminate` against the dense block whose attention masks what `keys` hides.
fn check_elimination(keys: KeyScope) {
    let (batch, seq, d) = (2, 21, 16);
    let m = model(1, seq);
    let block = &m.blocks[0];
    let dev = Default::default();
    let x = rand([batch, seq, d], Distribution::Normal(0.0, 1.0), &dev);
    // Segments of 8 keeping 3: 3 + 3 + 3 of 8, 8, 5 tokens; random scores.
    let scores: Vec<f32> = (0..batch * seq)
        .map(|i| ((i * 37 % 11) as f32).sin())
        .collect();
    let (idx, inv) = select_segments_host(&scores, batch, seq, 8, 3);
    let p = TokenPattern::<B64>::from_host(&idx, &inv, batch, seq, &dev);
    let bound = Arc::new(kept_position_bounds(seq, 8, 3));
    let y = eliminate(block, x.clone(), &m.rope, &p, keys, bound);

    // Reference: the dense block whose attention lets query i see key j iff j <= i and
    // (with `KeyScope::Kept`) j is kept.
    let only_kept = keys == KeyScope::Kept;
    let kept: Vec<bool> = inv.iter().map(|&s| (s as usize) < batch * p.kept).collect();
    let hide = hidden_keys(batch, seq, |b, j| only_kept && !kept[b * seq + j]);
    let dense = dense_block(block, &m, x.clone(), hide, |t| t);

    let (y, x, dense) = (
        y.into_data().convert::<f64>().into_vec::<f64>().unwrap(),
        x.into_data().convert::<f64>().into_vec::<f64>().unwrap(),
        dense
            .into_data()
            .convert::<f64>()
            .into_vec::<f64>()
            .unwrap(),
    );
    let (mut n_kept, mut n_gone) = (0, 0);
    for r in 0..batch * seq {
        let row = |v: &Vec<f64>| v[r * d..][..d].to_vec();
        if kept[r] {
            n_kept += 1;
            for (a, b) in row(&y).iter().zip(row(&dense)) {
                assert!((a - b).abs() < 1e-10, "{keys:?}: kept row {r}: {a} vs {b}");
            }
        } else {
            n_gone += 1;
            assert_eq!(row(&y), row(&x), "{keys:?}: eliminated row {r} changed");
        }
    }
    assert_eq!(n_kept, batch * 9);
    assert_eq!(n_gone, batch * (seq - 9));
}

/// `eliminate_from_backward` against the dense reference `x + m·f(x) + (1 − m)·stop(f(x))`
/// where f is the block's update with the eliminated tokens' keys and values as constants
/// (m the kept mask): the same outputs (the plain block's) and the same gradients for the
/// input and every parameter. Segments of 8 keeping 3 over 21 tokens
/// (a ragged last segment), and of 16 keeping 10 over 21 (the ragged segment's 5 tokens are
/// all kept, so the eliminated-token pattern also holds kept ones). With a gradient scale `s`
/// per position the reference is `x + m·(s·f − stop((s − 1)·f)) + (1 − m)·stop(f)`. With
/// `kv_graph` f is the plain block's update (no key or value detached).
#[test]
fn eliminating_from_the_backward_keeps_the_forward_and_stops_the_eliminated_gradient() {
    for (seg, keep, scaled, kv_graph) in [
        (8, 3, false, false),
        (16, 10, false, false),
        (8, 3, true, false),
        (16, 10, true, false),
        (8, 3, false, true),
        (16, 10, false, true),
        (8, 3, true, true),
    ] {
        let (batch, seq, d) = (2, 21, 16);
        let m = model(1, seq);
        let block = &m.blocks[0];
        let dev = Default::default();
        let x = rand([batch, seq, d], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let w = rand([batch, seq, d], Distribution::Default, &dev);
        let scores: Vec<f32> = (0..batch * seq)
            .map(|i| ((i * 37 % 11) as f32).sin())
            .collect();
        let (idx, inv) = select_segments_host(&scores, batch, seq, seg, keep);
        let p = TokenPattern::<B64>::from_host(&idx, &inv, batch, seq, &dev);
        let rest = eliminated(&p, seg, keep);
        // Per-position gradient scales (arbitrary, distinct; 1 where unscaled).
        let s: Vec<f64> = (0..seq)
            .map(|j| {
                if scaled {
                    1.0 + (j % 5) as f64 * 0.37
                } else {
                    1.0
                }
            })
            .collect();
        let s_pos = Tensor::<B64, 1>::from_data(TensorData::new(s.clone(), [seq]), &dev);
        let y = eliminate_from_backward(
            block,
            x.clone(),
            &m.rope,
            &p,
            Arc::new(kept_position_bounds(seq, seg, keep)),
            &rest,
            Arc::new(kept_position_bounds(seq, seg, seg - keep)),
            scaled.then_some(s_pos),
            kv_graph,
        );

        let kept: Vec<f64> = inv
            .iter()
            .map(|&s| ((s as usize) < batch * p.kept) as u8 as f64)
            .collect();
        let mask = Tensor::<B64, 3>::from_data(TensorData::new(kept, [batch, seq, 1]), &dev);
        let f = match kv_graph {
            false => dense_update_with_constant_eliminated_kv(block, &m, x.clone(), mask.clone()),
            true => {
                let hide = hidden_keys(batch, seq, |_, _| false);
                dense_block(block, &m, x.clone(), hide, |t| t) - x.clone()
            }
        };
        let s = Tensor::<B64, 3>::from_data(TensorData::new(s, [1, seq, 1]), &dev);
        let fm = f.clone() * mask.clone();
        let dense = x.clone() + fm.clone() * s.clone() - (fm * (s - 1.0)).detach()
            + f.detach() * (mask.neg() + 1.0);

        let case = format!("segment {seg} keep {keep} scaled {scaled} kv_graph {kv_graph}");
        let scale = max_abs(dense.clone(), dense.clone() * 0.0);
        let err = max_abs(y.clone(), dense.clone());
        assert!(err <= 1e-12 * scale, "{case}: outputs differ by {err}");
        let gy = (y * w.clone()).sum().backward();
        let gd = (dense * w.clone()).sum().backward();
        let err = max_abs(x.grad(&gy).unwrap(), x.grad(&gd).unwrap());
        assert!(err < 1e-11, "{case}: input gradients differ by {err}");
        let (a, b) = (
            GradientsParams::from_grads(gy, &m),
            GradientsParams::from_grads(gd, &m),
        );
        struct Compare<'a>(&'a GradientsParams, &'a GradientsParams, usize, String);
        impl burn::module::ModuleVisitor<B64> for Compare<'_> {
            fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<B64, D>>) {
                let (a, b) = match (
                    self.0.get::<NdArray<f64>, D>(p.id),
                    self.1.get::<NdArray<f64>, D>(p.id),
                ) {
                    (Some(a), Some(b)) => (a, b),
                    (None, None) => return, // Outside the block (embedding, head).
                    _ => panic!("{}: a parameter has a gradient in one only", self.3),
                };
                let scale = b.clone().abs().max().into_scalar().max(1e-300);
                let err = (a - b).abs().max().into_scalar();
                assert!(
                    err <= 1e-10 * scale,
                    "{}: a gradient differs by {err}",
                    self.3
                );
                self.2 += 1;
            }
        }
        let mut cmp = Compare(&a, &b, 0, case.clone());
        m.visit(&mut cmp);
        assert!(cmp.2 > 0, "{case}: no parameter gradients compared");
    }
}

/// The causal attention mask `[batch, 1, seq, seq]` (true = hidden) that also hides key `j`
/// of input `b` wherever `hide(b, j)`.
fn hidden_keys(
    batch: usize,
    seq: usize,
    hide: impl Fn(usize, usize) -> bool,
) -> Tensor<B64, 4, Bool> {
    let mask: Vec<bool> = (0..batch)
        .flat_map(|b| (0..seq).flat_map(move |i| (0..seq).map(move |j| (b, i, j))))
        .map(|(b, i, j)| j > i || hide(b, j))
        .collect();
    Tensor::from_data(
        TensorData::new(mask, [batch, 1, seq, seq]),
        &Default::default(),
    )
}

/// The dense block on `x` `[batch, seq, d]` whose attention hides what `hide` marks
/// ([`hidden_keys`]), with `kv` applied to the rotated keys and to the values.
fn dense_block(
    block: &meft::model::Block<B64>,
    m: &Llama<B64>,
    x: Tensor<B64, 3>,
    hide: Tensor<B64, 4, Bool>,
    kv: impl Fn(Tensor<B64, 4>) -> Tensor<B64, 4>,
) -> Tensor<B64, 3> {
    let [batch, seq, d] = x.dims();
    let xn = block.attn_norm.forward(x.clone());
    let (q, k, v) = block.attn.project(xn);
    let (q, k) = (m.rope.apply(q, 0), m.rope.apply(k, 0));
    let heads = block.attn.n_heads;
    let opts = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: false,
    };
    let att = attention(
        q,
        block.attn.repeat_kv(kv(k)),
        block.attn.repeat_kv(kv(v)),
        Some(hide.expand([batch, heads, seq, seq])),
        None,
        opts,
    );
    let att = block
        .attn
        .wo
        .forward(att.swap_dims(1, 2).reshape([batch, seq, d]));
    let h = x + att;
    h.clone() + block.ffn.forward(block.ffn_norm.forward(h))
}

/// The block's update `f(x)` (output − input) on every token, where the keys and values of
/// the tokens `mask` (`[batch, seq, 1]`, 1 = kept) marks eliminated are detached.
fn dense_update_with_constant_eliminated_kv(
    block: &meft::model::Block<B64>,
    m: &Llama<B64>,
    x: Tensor<B64, 3>,
    mask: Tensor<B64, 3>,
) -> Tensor<B64, 3> {
    let [batch, seq, _] = x.dims();
    let m4 = mask.reshape([batch, 1, seq, 1]);
    let constant =
        |t: Tensor<B64, 4>| t.clone() * m4.clone() + t.detach() * (m4.clone().neg() + 1.0);
    let hide = hidden_keys(batch, seq, |_, _| false);
    dense_block(block, m, x.clone(), hide, constant) - x
}

/// With eliminated tokens left out of the backward only, a whole model with LeMo (predicted
/// and exact patterns, half of every segment eliminated in every layer) computes the plain
/// model's hidden states.
#[test]
fn eliminating_from_the_backward_leaves_the_model_outputs_unchanged() {
    let (batch, seq) = (2, 40);
    let m = model(3, seq);
    let cfg = LemoConfig {
        keep_ratio: 0.5,
        segment: 16,
        sink: 1,
        recent: 4,
        layers: Some(meft::adapter::Layers::All),
        ..LemoConfig::default()
    };
    assert_eq!(cfg.eliminate, Elimination::Backward, "the default");
    let lemo = Lemo::new(&cfg, &m, &Default::default()).unwrap();
    let toks = tokens::<B64>(batch, seq, 40, 3);
    let plain = m.forward_hidden(toks.clone(), None);
    let scale = max_abs(plain.clone(), plain.clone() * 0.0);
    let rescaled = Lemo::new(
        &LemoConfig {
            rescale_gradient: true,
            ..cfg.clone()
        },
        &m,
        &Default::default(),
    )
    .unwrap();
    for mode in [
        LemoMode::Predicted,
        LemoMode::Exact,
        LemoMode::Random(1),
        LemoMode::Random(2),
        LemoMode::RandomShared(3),
    ] {
        for l in [&lemo, &rescaled] {
            let (h, _) = l.forward_hidden(&m, toks.clone(), mode);
            let err = max_abs(h, plain.clone());
            assert!(
                err <= 1e-12 * scale,
                "{mode:?} (rescale {}): hidden states differ by {err}",
                l.plan.rescale_gradient
            );
        }
    }
    // The layer-skipping variant does change them (the check above can fail).
    let skip = Lemo::new(
        &LemoConfig {
            eliminate: Elimination::Layer,
            ..cfg
        },
        &m,
        &Default::default(),
    )
    .unwrap();
    let (h, _) = skip.forward_hidden(&m, toks, LemoMode::Predicted);
    assert!(max_abs(h, plain) > 1e-6 * scale);
}

/// `random-shared` draws one pattern per step for every layer: with eliminated tokens
/// skipping the layer, exactly the tokens eliminated in one layer pass every layer untouched
/// (their final hidden state is their normalised embedding), where per-layer draws leave
/// fewer tokens untouched in all layers.
/// A 3-layer model whose every layer keeps 8 of each 16 tokens (1 sink, 4 recent), eliminated
/// tokens skipping the layer; 2 inputs of 40 tokens; and the final hidden state of a token
/// that skips every layer (its normalised embedding).
#[allow(clippy::type_complexity)]
fn skipping_setup() -> (
    Llama<B64>,
    LemoConfig,
    Lemo<B64>,
    Tensor<B64, 2, Int>,
    Tensor<B64, 3>,
) {
    let m = model(3, 40);
    let cfg = LemoConfig {
        keep_ratio: 0.5,
        segment: 16,
        sink: 1,
        recent: 4,
        eliminate: Elimination::Layer,
        keys: KeyScope::All,
        layers: Some(meft::adapter::Layers::All),
        ..LemoConfig::default()
    };
    let lemo = Lemo::new(&cfg, &m, &Default::default()).unwrap();
    let toks = tokens::<B64>(2, 40, 40, 5);
    let untouched = m.norm.forward(m.embed.forward(toks.clone()));
    (m, cfg, lemo, toks, untouched)
}

/// Per row of `[batch, seq, d]` hidden states, the largest |a − b| over the row.
fn row_change(a: Tensor<B64, 3>, b: Tensor<B64, 3>) -> Vec<f64> {
    (a - b)
        .abs()
        .max_dim(2)
        .into_data()
        .convert::<f64>()
        .into_vec()
        .unwrap()
}

#[test]
fn shared_random_patterns_eliminate_the_same_tokens_in_every_layer() {
    let batch = 2;
    let (m, cfg, lemo, toks, untouched) = skipping_setup();
    let count = |mode| {
        let (h, _) = lemo.forward_hidden(&m, toks.clone(), mode);
        let diff = row_change(h, untouched.clone());
        diff.iter().filter(|&&d| d == 0.0).count()
    };
    // Segments of 16, 16 and 8 tokens keeping 8 each: 24 kept, 16 eliminated per input.
    assert_eq!(count(LemoMode::RandomShared(7)), batch * 16);
    assert!(count(LemoMode::Random(7)) < batch * 16);
    let parsed: LemoConfig = toml::from_str("pattern = \"random-shared\"").unwrap();
    assert_eq!(parsed.pattern, PatternSource::RandomShared);
    // The default resolves by elimination kind.
    assert_eq!(cfg.pattern, PatternSource::Auto);
    assert_eq!(cfg.pattern_source(), PatternSource::Predicted);
    let backward = LemoConfig {
        eliminate: Elimination::Backward,
        ..cfg.clone()
    };
    assert_eq!(backward.pattern_source(), PatternSource::RandomRuns);
    assert_eq!(
        LemoMode::eliminating(PatternSource::RandomShared, 9, 4),
        LemoMode::eliminating(PatternSource::RandomShared, 9, 4)
    );
    assert_ne!(
        LemoMode::eliminating(PatternSource::RandomShared, 9, 4),
        LemoMode::eliminating(PatternSource::RandomShared, 9, 5)
    );
}

/// `difficulty` patterns are chosen on the host and given to every layer: with eliminated
/// tokens skipping the layer, exactly the low-score tokens (forced ones aside) pass every
/// layer untouched.
#[test]
fn given_patterns_eliminate_the_lowest_scores_in_every_layer() {
    let (batch, seq) = (2, 40);
    let (m, _, lemo, toks, untouched) = skipping_setup();
    // Scores falling then rising within each segment: the middle of a segment is eliminated.
    let scores: Vec<f32> = (0..batch * seq)
        .map(|r| ((r % seq) % 16) as f32 - 7.5)
        .map(|v| v.abs())
        .collect();
    let (given, inv) = lemo.patterns_from_scores(&scores, batch, seq, &Default::default());
    assert_eq!(given.len(), 1);
    let (h, _) = lemo.forward_hidden_given(&m, toks.clone(), LemoMode::Given(0), &given);
    let diff = row_change(h, untouched);
    let sentinel = (batch * 24) as i32;
    for (r, d) in diff.iter().enumerate() {
        let j = r % seq;
        let forced = j < 1 || j + 4 >= seq;
        // Segments of 16 keep their 8 highest |j mod 16 − 7.5|: offsets 0–3 and 12–15.
        let in_segment = j % 16;
        let expect_kept = forced || !(4..12).contains(&in_segment) || j >= 32;
        assert_eq!(inv[r] < sentinel, expect_kept, "row {r}");
        assert_eq!(*d == 0.0, !expect_kept, "row {r}: {d}");
    }
    // Without patterns the given mode is the plain model.
    let (plain, _) = lemo.forward_hidden(&m, toks.clone(), LemoMode::Given(0));
    let (reference, _) = lemo.forward_hidden(&m, toks, LemoMode::Off);
    assert_eq!(max_abs(plain, reference), 0.0);
    for source in [PatternSource::Difficulty, PatternSource::RandomRuns] {
        let at = |step| LemoMode::eliminating(source, 9, step);
        assert!(matches!(at(4), LemoMode::Given(_)));
        assert_ne!(at(4), at(5));
    }
    let parsed: LemoConfig = toml::from_str("pattern = \"difficulty\"").unwrap();
    assert_eq!(parsed.pattern, PatternSource::Difficulty);
    let parsed: LemoConfig = toml::from_str("pattern = \"random-runs\"").unwrap();
    assert_eq!(parsed.pattern, PatternSource::RandomRuns);
}

/// `random-runs` scores make each segment keep one contiguous run (wrapping at the
/// segment's end) of any length, from an offset that varies with the seed, input and segment.
#[test]
fn random_run_scores_keep_one_run_per_segment() {
    let (batch, seq, segment) = (3, 70, 16);
    let mut offsets = std::collections::BTreeSet::new();
    for seed in 0..4 {
        let s = random_run_scores(seed, batch, seq, segment);
        for keep in [1, 5, 8, 15, 16] {
            let (_, inv) = select_segments_host(&s, batch, seq, segment, keep);
            let sentinel =
                (batch * cube_kernels::tokens::kept_per_input(seq, segment, keep)) as i32;
            for b in 0..batch {
                for start in (0..seq).step_by(segment) {
                    let n = segment.min(seq - start);
                    let kept: Vec<bool> = (0..n)
                        .map(|j| inv[b * seq + start + j] < sentinel)
                        .collect();
                    assert_eq!(kept.iter().filter(|&&k| k).count(), keep.min(n));
                    // One run, cyclically: at most one kept position follows an eliminated one.
                    let starts = (0..n)
                        .filter(|&j| kept[j] && !kept[(j + n - 1) % n])
                        .count();
                    assert!(
                        starts <= 1,
                        "seed {seed} keep {keep} input {b} at {start}: {kept:?}"
                    );
                    if keep == 1 {
                        offsets.insert(kept.iter().position(|&k| k).unwrap());
                    }
                }
            }
        }
    }
    assert!(offsets.len() > 4, "offsets {offsets:?}");
}

#[test]
fn chunked_attention_equals_burn_attention_with_gradients() {
    let dev = Default::default();
    // (batch, heads, kv_heads, seq, head_dim, chunk): grouped-query cases have fewer
    // key/value heads; the reference repeats them.
    for (b, h, kv, t, hd, chunk) in [
        (1, 1, 1, 5, 4, 16),
        (2, 3, 3, 37, 8, 16),
        (1, 2, 2, 33, 4, 5),
        (2, 6, 2, 29, 4, 7),
        (1, 4, 1, 18, 8, 16),
    ] {
        let r = |s: u64, h: usize| {
            let _g = rng();
            B64::seed(&dev, s);
            Tensor::<B64, 4>::random([b, h, t, hd], Distribution::Normal(0.0, 1.0), &dev)
                .require_grad()
        };
        let (q, k, v) = (r(1, h), r(2, kv), r(3, kv));
        let w = rand([b, h, t, hd], Distribution::Default, &dev);
        let opts = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        let (kr, vr) = (ops::repeat_kv(k.clone(), h), ops::repeat_kv(v.clone(), h));
        let want = attention(q.clone(), kr, vr, None, None, opts);
        let got = Tensor::<B64, 4>::from_primitive(burn::tensor::TensorPrimitive::Float(
            <B64 as cube_kernels::attention::ChunkedAttentionBackend>::chunked_attention(
                q.clone().into_primitive().tensor(),
                k.clone().into_primitive().tensor(),
                v.clone().into_primitive().tensor(),
                chunk,
            ),
        ));
        assert!(
            max_abs(got.clone(), want.clone()) < 1e-12,
            "forward t {t} heads {h}/{kv} chunk {chunk}"
        );
        let gw = (want * w.clone()).sum().backward();
        let gg = (got * w.clone()).sum().backward();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, c) = (x.grad(&gw).unwrap(), x.grad(&gg).unwrap());
            let err = max_abs(a, c);
            assert!(
                err < 1e-11,
                "d{name} t {t} heads {h}/{kv} chunk {chunk}: {err}"
            );
        }
    }
}

#[test]
fn chunked_attention_at_positions_equals_masked_burn_attention_with_gradients() {
    let dev = Default::default();
    // (batch, heads, keys, head_dim, segment, keep, chunk): ragged last segments, several
    // chunks, a chunk larger than the queries, keep-all.
    // Last case: 6 query heads over 2 key/value heads.
    for (b, h, kv, t, hd, seg, keep, chunk) in [
        (2, 3, 3, 37, 8, 8, 3, 5),
        (1, 2, 2, 20, 4, 16, 5, 64),
        (2, 1, 1, 19, 4, 4, 4, 6),
        (1, 1, 1, 9, 4, 16, 2, 1),
        (2, 6, 2, 27, 4, 8, 3, 4),
    ] {
        let scores: Vec<f32> = (0..b * t).map(|i| ((i * 53 % 17) as f32).cos()).collect();
        let (idx, _) = select_segments_host(&scores, b, t, seg, keep);
        let tq = idx.len() / b;
        let pos: Vec<i64> = idx.iter().map(|&r| r as i64 % t as i64).collect();
        let bound = Arc::new(kept_position_bounds(t, seg, keep));
        let r = |s: u64, n: usize, h: usize| {
            let _g = rng();
            B64::seed(&dev, s);
            Tensor::<B64, 4>::random([b, h, n, hd], Distribution::Normal(0.0, 1.0), &dev)
                .require_grad()
        };
        let (q, k, v) = (r(1, tq, h), r(2, t, kv), r(3, t, kv));
        let w = rand([b, h, tq, hd], Distribution::Default, &dev);
        let mask: Vec<bool> = (0..b * tq)
            .flat_map(|row| {
                let p = pos[row];
                (0..t as i64).map(move |j| j > p)
            })
            .collect();
        let mask = Tensor::<B64, 4, Bool>::from_data(TensorData::new(mask, [b, 1, tq, t]), &dev)
            .expand([b, h, tq, t]);
        let opts = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        let (kr, vr) = (ops::repeat_kv(k.clone(), h), ops::repeat_kv(v.clone(), h));
        let want = attention(q.clone(), kr, vr, Some(mask), None, opts);
        let pos = Tensor::<B64, 2, Int>::from_data(TensorData::new(pos, [b, tq]), &dev);
        let got = Tensor::<B64, 4>::from_primitive(burn::tensor::TensorPrimitive::Float(
            <B64 as cube_kernels::attention::ChunkedAttentionBackend>::chunked_attention_at(
                q.clone().into_primitive().tensor(),
                k.clone().into_primitive().tensor(),
                v.clone().into_primitive().tensor(),
                pos.into_primitive(),
                bound,
                chunk,
            ),
        ));
        let case = format!("t {t} heads {h}/{kv} seg {seg} keep {keep} chunk {chunk}");
        assert!(max_abs(got.clone(), want.clone()) < 1e-12, "forward {case}");
        let gw = (want * w.clone()).sum().backward();
        let gg = (got * w.clone()).sum().backward();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, c) = (x.grad(&gw).unwrap(), x.grad(&gg).unwrap());
            let err = max_abs(a, c);
            assert!(err < 1e-11, "d{name} {case}: {err}");
        }
    }
}

#[test]
fn token_ops_backward_equals_reference_autodiff() {
    let dev = Default::default();
    let (batch, seq, d) = (3, 19, 5);
    let scores: Vec<f32> = (0..batch * seq)
        .map(|i| ((i * 13 % 7) as f32) * 0.5)
        .collect();
    // Ties (equal scores) and a ragged last segment of 3.
    let (idx, inv) = select_segments_host(&scores, batch, seq, 4, 2);
    let p = TokenPattern::<B64>::from_host(&idx, &inv, batch, seq, &dev);
    let x = rand([batch, seq, d], Distribution::Default, &dev).require_grad();
    let c = rand([batch, p.kept, d], Distribution::Default, &dev).require_grad();
    let w1 = rand([batch, p.kept, d], Distribution::Default, &dev);
    let w2 = rand([batch, seq, d], Distribution::Default, &dev);

    let loss =
        |g: Tensor<B64, 3>, m: Tensor<B64, 3>| (g * w1.clone()).sum() + (m * w2.clone()).sum();
    // The trait path (custom backward nodes).
    let g = gather_tokens(x.clone(), &p);
    let m = merge_tokens(x.clone(), c.clone(), &p);
    let grads = loss(g.clone(), m.clone()).backward();
    // The plain-op reference under burn's autodiff.
    let flat = x.clone().reshape([batch * seq, d]);
    let gr = reference::gather_tensors(flat.clone(), p.idx.clone()).reshape([batch, p.kept, d]);
    let mr = reference::merge_tensors(flat, c.clone().reshape([batch * p.kept, d]), p.inv.clone())
        .reshape([batch, seq, d]);
    let grads_r = loss(gr.clone(), mr.clone()).backward();
    assert_eq!(max_abs(g, gr), 0.0);
    assert_eq!(max_abs(m, mr), 0.0);
    assert_eq!(
        max_abs(x.grad(&grads).unwrap(), x.grad(&grads_r).unwrap()),
        0.0
    );
    assert_eq!(
        max_abs(c.grad(&grads).unwrap(), c.grad(&grads_r).unwrap()),
        0.0
    );
    // And through the model-level dispatch.
    let md = ops::merge(x.clone(), c.clone(), &p);
    assert_eq!(max_abs(md, merge_tokens(x, c, &p)), 0.0);
}

#[test]
fn predictors_fit_the_exact_pattern_in_calibration() {
    let (batch, seq) = (2, 32);
    let m = model(3, seq);
    let cfg = LemoConfig {
        keep_ratio: 0.5,
        segment: 16,
        sink: 1,
        recent: 2,
        predictor_hidden: 32,
        layers: Some(meft::adapter::Layers::Only(vec![1, 2])),
        ..LemoConfig::default()
    };
    let m = m.no_grad();
    let mut lemo = Lemo::new(&cfg, &m, &Default::default()).unwrap();
    let toks = tokens::<B64>(batch, seq, 40, 3);
    let mut optim = AdamWConfig::new().init::<B64, Lemo<B64>>();
    let mut losses = Vec::new();
    let mut overlaps = Vec::new();
    for _ in 0..60 {
        let (_, aux) = lemo.forward_hidden(&m, toks.clone(), LemoMode::Calibrate);
        let loss = aux.predictor_loss.expect("calibration reports a loss");
        losses.push(loss.clone().into_scalar());
        overlaps.push(aux.overlap.iter().sum::<f64>() / aux.overlap.len() as f64);
        let grads = GradientsParams::from_grads(loss.backward(), &lemo);
        lemo = optim.step(1e-2, lemo, grads);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.5 * first, "predictor loss {first} -> {last}");
    let (o0, o1) = (overlaps[0], *overlaps.last().unwrap());
    assert!(o1 > 0.9 && o1 > o0, "overlap {o0} -> {o1}");
}

/// The gradient scale is the inverse of the chance that a random pattern keeps a token: over
/// many random patterns (forced tokens first, the rest by uniform scores, as
/// `PatternSource::Random` draws them) the mean of `kept · scale` is 1 at every position, and
/// forced tokens are always kept with scale 1. Ragged last segment (13 tokens, 7 of them
/// forced), forced tokens inside segments.
#[test]
fn gradient_scale_is_the_inverse_keep_chance_of_random_patterns() {
    let (seq, seg) = (45, 16);
    for keep in [8, 10, 13] {
        let cfg = LemoConfig {
            keep_ratio: keep as f64 / seg as f64,
            segment: seg,
            sink: 2,
            recent: 7,
            layers: Some(meft::adapter::Layers::All),
            ..LemoConfig::default()
        };
        let plan = LemoPlan::new(&cfg, 1).unwrap();
        assert_eq!(plan.keep[0], keep);
        let scale = plan.gradient_scale(0, seq);
        let forced = |j: usize| j < 2 || j + 7 >= seq;
        let draws = 4000;
        let mut mean = vec![0.0f64; seq];
        for seed in 0..draws {
            let scores: Vec<f32> = random_scores(seed, seq)
                .into_iter()
                .enumerate()
                .map(|(j, r)| if forced(j) { r + 1e30 } else { r })
                .collect();
            let (_, inv) = select_segments_host(&scores, 1, seq, seg, keep);
            for j in 0..seq {
                let kept = (inv[j] as usize) < cube_kernels::tokens::kept_per_input(seq, seg, keep);
                if forced(j) {
                    assert!(kept, "keep {keep}: forced position {j} dropped");
                    assert_eq!(scale[j], 1.0);
                }
                mean[j] += kept as u8 as f64 * scale[j] as f64 / draws as f64;
            }
        }
        for (j, m) in mean.iter().enumerate() {
            // Per draw kept·scale has variance s − 1 ≤ 5 here: 0.15 is over 4σ of the mean.
            assert!(
                (m - 1.0).abs() < 0.15,
                "keep {keep}: position {j}: mean {m}"
            );
        }
        assert!(
            scale.iter().any(|&s| s > 1.0),
            "keep {keep}: nothing scaled"
        );
    }
}
