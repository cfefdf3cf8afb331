//! The host's side of pattern choice: the device selection's rule on host scores
//! ([`select_kept`]), for patterns chosen on the host (`difficulty`, `random-runs`) and for
//! replicas of device-drawn ones, and what share of a per-row quantity a pattern keeps.

use cube_kernels::tokens::kept_per_input;

/// The positions of a `[batch, seq]` input kept when each `segment`-token segment keeps its
/// `keep` highest `scores` (ties: the earlier position), the first `sink` and last `recent`
/// positions of each input always (the rule of the device selection with LeMo's forced
/// tokens): `(idx, inv)` as [`cube_kernels::tokens::select_segments_host`] returns them, in
/// `O(seq · log segment)`.
pub fn select_kept(
    scores: &[f32],
    batch: usize,
    seq: usize,
    segment: usize,
    keep: usize,
    sink: usize,
    recent: usize,
) -> (Vec<i32>, Vec<i32>) {
    assert_eq!(scores.len(), batch * seq, "scores must be [batch, seq]");
    let segment = segment.max(1);
    let kept = kept_per_input(seq, segment, keep);
    let sentinel = (batch * kept) as i32;
    let mut idx = Vec::with_capacity(batch * kept);
    let mut inv = vec![sentinel; batch * seq];
    let mut order: Vec<usize> = Vec::with_capacity(segment);
    for b in 0..batch {
        for start in (0..seq).step_by(segment) {
            let n = segment.min(seq - start);
            let forced = |j: usize| j < sink || j + recent >= seq;
            // Forced tokens first (by position), then by score (`+ 0.0`: −0 equals +0).
            let key = |e: usize| match forced(start + e) {
                true => (false, 0.0f32, e),
                false => (true, -scores[b * seq + start + e] + 0.0, e),
            };
            order.clear();
            order.extend(0..n);
            order.sort_unstable_by(|&x, &y| {
                let (a, c) = (key(x), key(y));
                a.0.cmp(&c.0).then(a.1.total_cmp(&c.1)).then(a.2.cmp(&c.2))
            });
            let first = idx.len();
            idx.extend(
                order[..keep.min(n)]
                    .iter()
                    .map(|&e| (b * seq + start + e) as i32),
            );
            idx[first..].sort_unstable();
        }
    }
    for (slot, &row) in idx.iter().enumerate() {
        inv[row as usize] = slot as i32;
    }
    (idx, inv)
}

/// Share of `Σ values` at the rows `inv` keeps (`inv[r] < sentinel`); `values` per row.
pub fn kept_share(inv: &[i32], sentinel: i32, values: &[f64]) -> f64 {
    let (mut kept, mut all) = (0.0, 0.0);
    for (&i, &v) in inv.iter().zip(values) {
        all += v;
        if i < sentinel {
            kept += v;
        }
    }
    if all > 0.0 {
        kept / all
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_equals_the_device_rule() {
        use cube_kernels::tokens::select_segments_host;
        for (batch, seq, segment, keep, sink, recent) in [
            (2, 70, 16, 5, 1, 4),
            (1, 33, 32, 32, 0, 0),
            (3, 100, 64, 20, 3, 9),
            (2, 9, 16, 3, 0, 2),
        ] {
            // Coarse scores: many ties, broken by position in both.
            let scores: Vec<f32> = crate::lemo::layer::random_scores(seq as u64, batch * seq)
                .into_iter()
                .map(|v| (v * 4.0).floor())
                .collect();
            let biased: Vec<f32> = scores
                .iter()
                .enumerate()
                .map(|(r, &v)| {
                    let j = r % seq;
                    v + if j < sink || j + recent >= seq {
                        1e30
                    } else {
                        0.0
                    }
                })
                .collect();
            let want = select_segments_host(&biased, batch, seq, segment, keep);
            let got = select_kept(&scores, batch, seq, segment, keep, sink, recent);
            assert_eq!(got, want, "{batch} {seq} {segment} {keep} {sink} {recent}");
        }
    }
}
