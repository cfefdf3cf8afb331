//! The host worker: a background thread that takes each layer's row gradients off the
//! critical path. After `backward`, the thread issuing the model's work only moves the
//! gradient tensors out of burn's `Gradients` and hands them over ([`SparseAdapter::hand_off`]);
//! the worker reads them back (on its own cubecl stream, so the copy overlaps device work the
//! main thread queues meanwhile), checks them, and applies the sparse optimizer to the touched
//! rows — layer by layer in layer order, so the next step's forward, which waits only for the
//! layer it is about to select in, can start before later layers are updated.
//!
//! [`SparseAdapter::hand_off`]: super::SparseAdapter::hand_off

use std::sync::mpsc::{channel, Sender};
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::timeline::{self, SpanKind};
use crate::{Error, Result};

type Job = Box<dyn FnOnce() + Send>;

/// One background thread running hand-off jobs in submission order.
pub struct HostWorker {
    tx: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HostWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostWorker").finish_non_exhaustive()
    }
}

impl HostWorker {
    /// Starts the worker thread. Its parallel loops share rayon's global pool with the calling
    /// thread's (measured best on the lent H100 host: both sides are bound by host memory
    /// bandwidth, and a separate pool of half the cores made the optimizer the bottleneck);
    /// `MEFT_WORKER_THREADS=n` gives the worker a pool of its own.
    pub fn new() -> Result<Self> {
        let threads = std::env::var("MEFT_WORKER_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok());
        let pool = match threads {
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n.max(1))
                    .thread_name(|i| format!("meft-worker-{i}"))
                    .start_handler(|_| timeline::set_lane("worker"))
                    .build()
                    .map_err(|e| {
                        Error::Other(format!("cannot start the host worker's pool: {e}"))
                    })?,
            ),
            None => None,
        };
        let (tx, rx) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("meft-host-worker".into())
            .spawn(move || {
                timeline::set_lane("worker");
                for job in rx {
                    match &pool {
                        Some(p) => p.install(job),
                        None => job(),
                    }
                }
            })
            .map_err(|e| Error::Other(format!("cannot start the host worker thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues `job`.
    pub(crate) fn submit(&self, job: Job) -> Result<()> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| Error::Other("the host worker thread has stopped".into()))
    }
}

impl Drop for HostWorker {
    /// Finishes the queued jobs, then stops the thread.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads a `[rows, 2d]` gradient back and hands it to the consumer as f32s; adds the seconds
/// taken to the first argument and returns the bytes moved.
pub(crate) type ReadGrad = Box<dyn FnOnce(&mut f64, &mut dyn FnMut(&[f32])) -> u64 + Send>;

/// Row gradients of one forward call, moved out of burn's `Gradients` but not yet read back.
pub struct RowGrad {
    /// The store rows, in the order of the gradient's rows.
    pub rows: Vec<u32>,
    /// Reads the gradient back (see [`ReadGrad`]).
    pub(crate) read: ReadGrad,
}

/// Whether a layer's handed-off update has been applied.
#[derive(Default)]
pub(crate) struct UpdateGate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    submitted: u64,
    done: u64,
    error: Option<Error>,
}

impl UpdateGate {
    /// Marks one more update as queued.
    pub(crate) fn open(&self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .submitted += 1;
    }

    /// Marks the oldest queued update as applied (or failed with `error`).
    pub(crate) fn close(&self, error: Option<Error>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.done += 1;
        if s.error.is_none() {
            s.error = error;
        }
        self.cv.notify_all();
    }

    /// Blocks until every queued update is applied; returns the seconds waited. Keeps any
    /// error for [`UpdateGate::take_error`].
    pub(crate) fn wait(&self) -> f64 {
        let start = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.done >= s.submitted {
            return 0.0;
        }
        while s.done < s.submitted {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        timeline::record("wait update", SpanKind::Wait, start);
        start.elapsed().as_secs_f64()
    }

    /// The first error of a failed update since the last call.
    pub(crate) fn take_error(&self) -> Option<Error> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .error
            .take()
    }
}
