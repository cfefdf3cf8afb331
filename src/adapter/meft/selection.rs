//! Active-neuron selection on the CPU: score the probed experts' neurons, keep the top-K per
//! token, form the batch's union of active rows (optionally capped by score).
//!
//! Scoring is grouped by expert: the tokens that probed expert e are scored against its keys
//! together, so each key is read from memory once per call however many tokens probe it.

use rayon::prelude::*;

use super::store::AdapterStore;

/// The router's choice per token: `experts[t·P + p]` with gate (router score) `gates[t·P + p]`.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Probed experts per token (`tokens × P`).
    pub experts: Vec<u32>,
    /// Their router scores (`tokens × P`).
    pub gates: Vec<f32>,
    /// Experts probed per token (P).
    pub per_token: usize,
}

impl Routing {
    /// Each token's top `per_token` experts by router score, from the scores `tokens × experts`
    /// read back from the device (a few MB even for thousands of experts; on the CPU this is
    /// ~1 ms, where burn 0.21's generic top-k on CUDA took ~110 ms for 1 024 × 1 024).
    ///
    /// Highest score first; ties go to the lower expert index; NaN scores rank last.
    pub fn from_scores(scores: &[f32], experts: usize, per_token: usize) -> Routing {
        let p = per_token.min(experts);
        let tokens = scores.len().checked_div(experts).unwrap_or(0);
        let mut out_e = vec![0u32; tokens * p];
        let mut out_g = vec![0f32; tokens * p];
        let rank = |row: &[f32], a: u32, b: u32| {
            let (x, y) = (row[a as usize], row[b as usize]);
            match (x.is_nan(), y.is_nan()) {
                (false, false) => y.total_cmp(&x).then(a.cmp(&b)),
                (true, false) => std::cmp::Ordering::Greater,
                (false, true) => std::cmp::Ordering::Less,
                (true, true) => a.cmp(&b),
            }
        };
        // Sequential (≈ 1 ms for 1 024 × 1 024): it runs on the critical path while the host
        // worker may be using rayon's pool.
        let mut idx = Vec::with_capacity(experts);
        out_e
            .chunks_mut(p.max(1))
            .zip(out_g.chunks_mut(p.max(1)))
            .zip(scores.chunks(experts.max(1)))
            .for_each(|((e_out, g_out), row)| {
                idx.clear();
                idx.extend(0..experts as u32);
                if p < experts {
                    idx.select_nth_unstable_by(p, |&a, &b| rank(row, a, b));
                }
                let top = &mut idx[..p];
                top.sort_unstable_by(|&a, &b| rank(row, a, b));
                for (i, &e) in top.iter().enumerate() {
                    e_out[i] = e;
                    g_out[i] = row[e as usize];
                }
            });
        Routing {
            experts: out_e,
            gates: out_g,
            per_token: p,
        }
    }
}

/// How to select: expert size, K, gate on/off, optional batch cap.
#[derive(Debug, Clone, Copy)]
pub struct SelectionRule {
    /// Neurons per expert.
    pub expert_size: usize,
    /// Active neurons per token (K).
    pub top_k: usize,
    /// Multiply neuron scores by the expert's router score.
    pub router_gate: bool,
    /// Cap on distinct active neurons per call.
    pub max_active: Option<usize>,
}

/// The active neurons of one forward call.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveNeurons {
    /// Tokens in the call.
    pub tokens: usize,
    /// Slots per token (K).
    pub top_k: usize,
    /// Distinct active neurons, ascending: the rows shipped to the device.
    pub rows: Vec<u32>,
    /// Per token, K indices into `rows`; unused slots hold `rows.len()` (padding).
    pub slots: Vec<u32>,
    /// Neuron scores computed on the CPU (for the cost model: tokens × candidates).
    pub scored: usize,
    /// (token, neuron) pairs removed by the batch cap.
    pub dropped_by_cap: usize,
}

impl ActiveNeurons {
    /// The padding slot value.
    pub fn pad(&self) -> u32 {
        self.rows.len() as u32
    }
}

/// Selects each token's top-K neurons among its probed experts and the batch's union.
///
/// A neuron's score is `g · (k_j · x_t)` (or `k_j · x_t` without the gate). Only neurons with a
/// positive score are active: the rest are zeroed by the ReLU, contribute nothing to the output
/// and receive zero gradient, so leaving them out is exact. Ties are broken towards the lower
/// neuron index, so selection is deterministic.
pub fn select_active(
    store: &AdapterStore,
    x: &[f32],
    routing: &Routing,
    rule: &SelectionRule,
) -> ActiveNeurons {
    let d = store.d_model();
    let tokens = x.len() / d;
    let p = routing.per_token;
    let size = rule.expert_size;
    let experts = store.neurons() / size;

    // Invert the routing: for each expert, the (token, probe slot) pairs that chose it.
    let mut count = vec![0usize; experts + 1];
    for &e in &routing.experts {
        count[e as usize + 1] += 1;
    }
    for e in 0..experts {
        count[e + 1] += count[e];
    }
    let offsets = count.clone();
    let mut users = vec![0u32; routing.experts.len()];
    let mut rank_in_expert = vec![0u32; routing.experts.len()];
    for (i, &e) in routing.experts.iter().enumerate() {
        let e = e as usize;
        rank_in_expert[i] = (count[e] - offsets[e]) as u32;
        users[count[e]] = (i / p) as u32;
        count[e] += 1;
    }

    // Per probed expert: its users' hidden states against its keys. With P·M/E users per expert
    // (a handful) this is memory-bound: each key is streamed once and dotted with every user's
    // hidden state while those stay in cache. (A packed GEMM spent more time packing the key
    // block than multiplying.)
    let block_scores: Vec<Vec<f32>> = (0..experts)
        .into_par_iter()
        .map(|e| {
            let who = &users[offsets[e]..offsets[e + 1]];
            let mut out = vec![0f32; who.len() * size];
            for i in 0..size {
                let key = store.key(e * size + i);
                for (r, &t) in who.iter().enumerate() {
                    out[r * size + i] = dot(key, &x[t as usize * d..][..d]);
                }
            }
            out
        })
        .collect();

    // Per token: gather candidates, keep the top-K positive scores.
    let per_token: Vec<Vec<(u32, f32)>> = (0..tokens)
        .into_par_iter()
        .map(|t| {
            let mut cand = Vec::with_capacity(p * size);
            let probes = t * p..(t + 1) * p;
            let chosen = routing.experts[probes.clone()].iter();
            let gates = routing.gates[probes.clone()].iter();
            for ((&e, &g), &rank) in chosen.zip(gates).zip(&rank_in_expert[probes]) {
                let e = e as usize;
                let gate = if rule.router_gate { g } else { 1.0 };
                let row = &block_scores[e][rank as usize * size..][..size];
                for (i, &s) in row.iter().enumerate() {
                    cand.push(((e * size + i) as u32, gate * s));
                }
            }
            top_k_positive(cand, rule.top_k)
        })
        .collect();

    let mut rows: Vec<u32> = per_token.iter().flatten().map(|&(j, _)| j).collect();
    rows.par_sort_unstable();
    rows.dedup();

    let mut per_token = per_token;
    let mut dropped_by_cap = 0;
    if let Some(cap) = rule.max_active.filter(|&c| rows.len() > c) {
        // A row's priority is its best score in the batch; keep the `cap` best rows.
        let mut best = vec![f32::NEG_INFINITY; rows.len()];
        for &(j, s) in per_token.iter().flatten() {
            let i = rows.binary_search(&j).expect("row is in the union");
            best[i] = best[i].max(s);
        }
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_unstable_by(|&a, &b| best[b].total_cmp(&best[a]).then(rows[a].cmp(&rows[b])));
        let mut kept: Vec<u32> = order[..cap].iter().map(|&i| rows[i]).collect();
        kept.sort_unstable();
        for list in per_token.iter_mut() {
            let before = list.len();
            list.retain(|(j, _)| kept.binary_search(j).is_ok());
            dropped_by_cap += before - list.len();
        }
        rows = kept;
    }

    let k = rule.top_k;
    let pad = rows.len() as u32;
    let mut slots = vec![pad; tokens * k];
    slots
        .par_chunks_mut(k)
        .zip(per_token.par_iter())
        .for_each(|(dst, list)| {
            for (slot, (j, _)) in dst.iter_mut().zip(list) {
                *slot = rows.binary_search(j).expect("row is in the union") as u32;
            }
        });
    ActiveNeurons {
        tokens,
        top_k: k,
        rows,
        slots,
        scored: tokens * p * size,
        dropped_by_cap,
    }
}

/// `a · b` with 16 independent partial sums, so the compiler can vectorise it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The `k` highest-scoring candidates with a positive score (ties: lower index first).
fn top_k_positive(mut cand: Vec<(u32, f32)>, k: usize) -> Vec<(u32, f32)> {
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if cand.len() > k {
        cand.select_nth_unstable_by(k - 1, order);
        cand.truncate(k);
    }
    cand.retain(|&(_, s)| s > 0.0);
    cand.sort_unstable_by(order);
    cand
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_from_scores_is_each_tokens_top_p() {
        let scores = vec![
            0.1,
            0.9,
            -2.0,
            0.9,
            0.5, // token 0: tie between experts 1 and 3
            f32::NAN,
            -1.0,
            -3.0,
            -0.5,
            -2.0, // token 1: NaN ranks last
        ];
        let r = Routing::from_scores(&scores, 5, 3);
        assert_eq!(r.per_token, 3);
        assert_eq!(r.experts, vec![1, 3, 4, 8 - 5, 1, 4]);
        assert_eq!(r.gates, vec![0.9, 0.9, 0.5, -0.5, -1.0, -2.0]);
        // P ≥ E: every expert, sorted.
        let r = Routing::from_scores(&scores[..5], 5, 9);
        assert_eq!(r.experts, vec![1, 3, 4, 0, 2]);
    }

    /// Brute force over all neurons of the probed experts.
    fn brute(
        store: &AdapterStore,
        x: &[f32],
        r: &Routing,
        rule: &SelectionRule,
    ) -> Vec<Vec<(u32, f32)>> {
        let d = store.d_model();
        (0..x.len() / d)
            .map(|t| {
                let xt = &x[t * d..][..d];
                let mut c = Vec::new();
                for s in t * r.per_token..(t + 1) * r.per_token {
                    let e = r.experts[s] as usize;
                    for j in e * rule.expert_size..(e + 1) * rule.expert_size {
                        let dot: f32 = store.key(j).iter().zip(xt).map(|(a, b)| a * b).sum();
                        let g = if rule.router_gate { r.gates[s] } else { 1.0 };
                        c.push((j as u32, g * dot));
                    }
                }
                let mut top = top_k_positive(c, rule.top_k);
                top.sort_by_key(|&(j, _)| j);
                top
            })
            .collect()
    }

    #[test]
    fn grouped_scoring_matches_brute_force_and_cap_keeps_best() {
        let (n, d, tokens) = (48, 6, 9);
        let store = AdapterStore::init_random(n, d, 1.0, 1.0, 3);
        let x: Vec<f32> = (0..tokens * d)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let routing = Routing {
            experts: (0..tokens * 2)
                .map(|i| ((i * 5 + i / 2) % 8) as u32)
                .collect(),
            gates: (0..tokens * 2)
                .map(|i| if i % 3 == 0 { -0.5 } else { 1.5 })
                .collect(),
            per_token: 2,
        };
        for gate in [false, true] {
            let rule = SelectionRule {
                expert_size: 6,
                top_k: 4,
                router_gate: gate,
                max_active: None,
            };
            let a = select_active(&store, &x, &routing, &rule);
            let want = brute(&store, &x, &routing, &rule);
            for (t, w) in want.iter().enumerate() {
                let mut got: Vec<u32> = a.slots[t * 4..][..4]
                    .iter()
                    .filter(|&&s| s != a.pad())
                    .map(|&s| a.rows[s as usize])
                    .collect();
                got.sort();
                let w: Vec<u32> = w.iter().map(|&(j, _)| j).collect();
                assert_eq!(got, w, "token {t}, gate {gate}");
            }
            // Best batch-wide score per row: the cap must keep the highest ones.
            let mut best = std::collections::BTreeMap::<u32, f32>::new();
            for &(j, s) in want.iter().flatten() {
                let b = best.entry(j).or_insert(f32::MIN);
                *b = b.max(s);
            }
            let capped = select_active(
                &store,
                &x,
                &routing,
                &SelectionRule {
                    max_active: Some(5),
                    ..rule
                },
            );
            assert_eq!(capped.rows.len(), 5.min(a.rows.len()));
            assert!(capped.rows.iter().all(|j| a.rows.contains(j)));
            let kept_min = capped.rows.iter().map(|j| best[j]).fold(f32::MAX, f32::min);
            let dropped_max = best
                .iter()
                .filter(|(j, _)| !capped.rows.contains(j))
                .map(|(_, &s)| s)
                .fold(f32::MIN, f32::max);
            assert!(kept_min >= dropped_max, "cap dropped by index, not score");
            assert!(capped.dropped_by_cap > 0);
        }
    }
}
