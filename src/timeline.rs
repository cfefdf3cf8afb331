//! A process-wide recorder of timed spans (lane, stage, layer, start, end) for pipeline
//! timelines: which thread did what, when. Off by default; when off a span costs one atomic
//! load. `meft bench adapter --timeline` turns it on for one step and plots it
//! (`scripts/plot_timeline.py`).
//!
//! Lanes name who does the work: `main` (the thread issuing the model's device work),
//! `reader` (helper thread reading routing inputs back), `worker` (the host worker: row
//! gradients, sparse optimizer), `copy` (a host↔device copy in flight). Stages are either
//! *work* (CPU computation) or *transfer* (a copy in flight); [`exposed`] uses that split.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// What a span is, for the exposed-transfer computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpanKind {
    /// CPU computation (scoring, gathering, accumulating, optimizer).
    Work,
    /// A host↔device copy in flight (including any wait for the data to be produced).
    Transfer,
    /// A thread blocked on something else (the device, another thread).
    Wait,
}

/// One recorded span; times in seconds since the recorder's epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Span {
    /// Who did it (`main`, `reader`, `worker`, `copy`).
    pub lane: String,
    /// What it was (`select`, `gather`, `h2d rows`, …).
    pub stage: String,
    /// Work, transfer or wait.
    pub kind: SpanKind,
    /// Model layer, if the span belongs to one.
    pub layer: Option<usize>,
    /// Start, seconds since the epoch.
    pub start: f64,
    /// End, seconds since the epoch.
    pub end: f64,
}

static ON: AtomicBool = AtomicBool::new(false);
static SPANS: Mutex<Vec<Span>> = Mutex::new(Vec::new());

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Starts recording (clearing what was recorded).
pub fn start() {
    epoch();
    SPANS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ON.store(true, Ordering::SeqCst);
}

/// Stops recording and returns the spans, sorted by start.
pub fn stop() -> Vec<Span> {
    ON.store(false, Ordering::SeqCst);
    let mut spans = std::mem::take(&mut *SPANS.lock().unwrap_or_else(|e| e.into_inner()));
    spans.sort_by(|a, b| a.start.total_cmp(&b.start));
    spans
}

/// Seconds since the recorder's epoch (the time base of [`Span`]).
pub fn now() -> f64 {
    epoch().elapsed().as_secs_f64()
}

/// Whether spans are being recorded.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

thread_local! {
    static LAYER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    static LANE: std::cell::Cell<&'static str> = const { std::cell::Cell::new("main") };
}

/// Names this thread's lane (default `main`).
pub fn set_lane(lane: &'static str) {
    LANE.with(|l| l.set(lane));
}

/// Sets the layer this thread's next spans belong to (`None`: no layer).
pub fn set_layer(layer: Option<usize>) {
    LAYER.with(|l| l.set(layer));
}

/// Records a span of this thread's lane and layer that ran from `start` until now.
pub fn record(stage: &str, kind: SpanKind, start: Instant) {
    if enabled() {
        record_on(LANE.with(|l| l.get()), stage, kind, start);
    }
}

/// Records a span on `lane` (this thread's layer) that ran from `start` until now.
pub fn record_on(lane: &str, stage: &str, kind: SpanKind, start: Instant) {
    if !enabled() {
        return;
    }
    let layer = LAYER.with(|l| l.get());
    let e = epoch();
    let span = Span {
        lane: lane.to_string(),
        stage: stage.to_string(),
        kind,
        layer,
        start: start.saturating_duration_since(e).as_secs_f64(),
        end: Instant::now().saturating_duration_since(e).as_secs_f64(),
    };
    SPANS.lock().unwrap_or_else(|e| e.into_inner()).push(span);
}

/// Records a span on `lane` from `origin + from` to `origin + to` (seconds), e.g. a copy
/// timed by device events relative to a host instant.
pub fn record_between(
    lane: &str,
    stage: &str,
    kind: SpanKind,
    origin: Instant,
    from: f64,
    to: f64,
) {
    if !enabled() {
        return;
    }
    let o = origin.saturating_duration_since(epoch()).as_secs_f64();
    let span = Span {
        lane: lane.to_string(),
        stage: stage.to_string(),
        kind,
        layer: LAYER.with(|l| l.get()),
        start: o + from,
        end: o + to,
    };
    SPANS.lock().unwrap_or_else(|e| e.into_inner()).push(span);
}

/// Sorted, merged union of intervals.
fn union(mut v: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Total length of `a` minus its overlap with `b` (both merged, sorted).
fn minus(a: &[(f64, f64)], b: &[(f64, f64)]) -> f64 {
    let mut total = 0.0;
    for &(s, e) in a {
        let mut covered = 0.0;
        for &(bs, be) in b {
            let (lo, hi) = (s.max(bs), e.min(be));
            if hi > lo {
                covered += hi - lo;
            }
        }
        total += (e - s) - covered;
    }
    total
}

/// Transfer time and its exposed part within `[from, to]`, in seconds.
///
/// Transfer time is the union of transfer spans; the exposed part is what of it no CPU work
/// span (on any lane) overlaps. Device computation is not recorded as spans, so a copy hidden
/// only behind GPU kernels still counts as exposed: the figure is an upper bound.
pub fn exposed(spans: &[Span], from: f64, to: f64) -> (f64, f64) {
    let clip = |k: SpanKind| {
        union(
            spans
                .iter()
                .filter(|s| s.kind == k)
                .map(|s| (s.start.max(from), s.end.min(to)))
                .filter(|(s, e)| e > s)
                .collect(),
        )
    };
    let transfers = clip(SpanKind::Transfer);
    let work = clip(SpanKind::Work);
    let total = transfers.iter().map(|(s, e)| e - s).sum();
    (total, minus(&transfers, &work))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(kind: SpanKind, start: f64, end: f64) -> Span {
        Span {
            lane: "t".into(),
            stage: "t".into(),
            kind,
            layer: None,
            start,
            end,
        }
    }

    #[test]
    fn exposed_is_transfer_not_covered_by_work() {
        let spans = vec![
            span(SpanKind::Transfer, 0.0, 4.0),
            span(SpanKind::Transfer, 3.0, 5.0), // overlaps the first: union 0..5
            span(SpanKind::Work, 1.0, 2.0),
            span(SpanKind::Work, 1.5, 3.5),  // union 1..3.5
            span(SpanKind::Wait, 0.0, 10.0), // waits cover nothing
            span(SpanKind::Transfer, 8.0, 9.0),
        ];
        let (total, hidden_not) = exposed(&spans, 0.0, 10.0);
        assert!((total - 6.0).abs() < 1e-12, "{total}");
        assert!((hidden_not - 3.5).abs() < 1e-12, "{hidden_not}");
        // Clipped to a window.
        let (total, hidden_not) = exposed(&spans, 2.0, 8.5);
        assert!((total - 3.5).abs() < 1e-12, "{total}");
        assert!((hidden_not - 2.0).abs() < 1e-12, "{hidden_not}");
    }
}
