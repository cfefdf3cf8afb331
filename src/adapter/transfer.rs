//! Host ↔ device traffic of the sparse adapter, counted at the one place it happens.
//!
//! Every tensor the adapter sends to the compute device or reads back goes through
//! [`to_device`] / [`to_host_f32`], which add the bytes actually moved (in the device tensor's
//! dtype) to a [`TransferStats`] category. On an all-CPU placement the same calls count the
//! bytes that *would* cross PCIe.

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use serde::Serialize;

/// Bytes moved per category, summed since the last reset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TransferStats {
    /// Forward calls counted.
    pub calls: u64,
    /// Hidden states read back for CPU scoring (device → host).
    pub hidden_to_host: u64,
    /// Router choices and gates read back (device → host).
    pub routing_to_host: u64,
    /// Active `[key | value]` rows sent (host → device).
    pub rows_to_device: u64,
    /// Slot and expert indices sent (host → device).
    pub indices_to_device: u64,
    /// Row gradients read back (device → host).
    pub row_grads_to_host: u64,
    /// Active rows sent (count, summed over calls).
    pub active_rows: u64,
    /// Seconds reading hidden states and routing back (includes waiting for the device to
    /// produce them).
    pub readback_secs: f64,
    /// Seconds creating the rows and indices on the device.
    pub upload_secs: f64,
    /// Seconds reading row gradients back.
    pub grads_secs: f64,
    /// Seconds spent scoring and selecting on the CPU.
    pub select_secs: f64,
    /// Seconds spent gathering rows on the CPU.
    pub gather_secs: f64,
}

impl TransferStats {
    /// All host → device bytes.
    pub fn to_device(&self) -> u64 {
        self.rows_to_device + self.indices_to_device
    }

    /// All device → host bytes.
    pub fn to_host(&self) -> u64 {
        self.hidden_to_host + self.routing_to_host + self.row_grads_to_host
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &TransferStats) {
        self.calls += other.calls;
        self.hidden_to_host += other.hidden_to_host;
        self.routing_to_host += other.routing_to_host;
        self.rows_to_device += other.rows_to_device;
        self.indices_to_device += other.indices_to_device;
        self.row_grads_to_host += other.row_grads_to_host;
        self.active_rows += other.active_rows;
        self.readback_secs += other.readback_secs;
        self.upload_secs += other.upload_secs;
        self.grads_secs += other.grads_secs;
        self.select_secs += other.select_secs;
        self.gather_secs += other.gather_secs;
    }
}

/// Creates a float tensor of `dtype` on `device` from host floats (converted on the host, so
/// a half-precision device tensor moves half the bytes); returns it and the bytes moved.
pub fn to_device<B: Backend, const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
    dtype: DType,
    secs: &mut f64,
) -> (Tensor<B, D>, u64) {
    let start = Instant::now();
    let mut data = TensorData::new(data, shape);
    if data.dtype != dtype {
        data = data.convert_dtype(dtype);
    }
    let t = Tensor::<B, D>::from_data(data, (device, dtype));
    *secs += start.elapsed().as_secs_f64();
    let bytes = (shape.iter().product::<usize>() * t.dtype().size()) as u64;
    (t, bytes)
}

/// Creates an int tensor on `device` from host indices; returns it and the bytes moved.
pub fn int_to_device<B: Backend, const D: usize>(
    data: Vec<i64>,
    shape: [usize; D],
    device: &B::Device,
    secs: &mut f64,
) -> (Tensor<B, D, Int>, u64) {
    let start = Instant::now();
    let data = TensorData::new(data, shape).convert::<B::IntElem>();
    let t = Tensor::<B, D, Int>::from_data(data, device);
    *secs += start.elapsed().as_secs_f64();
    let bytes = (shape.iter().product::<usize>() * t.dtype().size()) as u64;
    (t, bytes)
}

/// Reads a float tensor back as f32; returns the floats and the bytes moved (in the tensor's
/// own dtype).
pub fn to_host_f32<B: Backend, const D: usize>(t: Tensor<B, D>, secs: &mut f64) -> (Vec<f32>, u64) {
    let start = Instant::now();
    let bytes = (t.shape().num_elements() * t.dtype().size()) as u64;
    let mut data = t.into_data();
    if data.dtype != DType::F32 {
        data = data.convert::<f32>();
    }
    let out = data.into_vec::<f32>().expect("converted to f32");
    *secs += start.elapsed().as_secs_f64();
    (out, bytes)
}

/// Reads an int tensor back as i64; returns the ints and the bytes moved.
pub fn int_to_host<B: Backend, const D: usize>(
    t: Tensor<B, D, Int>,
    secs: &mut f64,
) -> (Vec<i64>, u64) {
    let start = Instant::now();
    let bytes = (t.shape().num_elements() * t.dtype().size()) as u64;
    let out = t
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("converted to i64");
    *secs += start.elapsed().as_secs_f64();
    (out, bytes)
}
