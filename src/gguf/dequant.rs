//! ggml storage types and their dequantization to f32.

use half::{bf16, f16};
use rayon::prelude::*;

/// The ggml tensor storage types meft can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half float.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: f16 scale `d`, 32 × 4-bit `q`; `x = (q - 8) · d`.
    Q4_0,
    /// Blocks of 32: f16 scale `d`, f16 min `m`, 32 × 4-bit `q`; `x = q · d + m`.
    Q4_1,
    /// Blocks of 32: f16 scale `d`, 32 × i8 `q`; `x = q · d`.
    Q8_0,
}

impl GgmlType {
    /// Maps a ggml type id to a supported type.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// The ggml name of any type id (for error messages).
    pub fn name_of(id: u32) -> &'static str {
        const NAMES: [&str; 31] = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
            "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
            "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
            "BF16",
        ];
        NAMES.get(id as usize).copied().unwrap_or("unknown")
    }

    /// Elements per block.
    pub fn block_size(self) -> u64 {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// 4-bit blocks: element `j < 16` is the low nibble of byte `j`, element `16 + j` the high one.
fn dequant_q4(block: &[u8], qs_at: usize, out: &mut [f32], f: impl Fn(u8) -> f32) {
    let qs = &block[qs_at..qs_at + 16];
    for j in 0..16 {
        out[j] = f(qs[j] & 0x0f);
        out[j + 16] = f(qs[j] >> 4);
    }
}

/// Dequantizes `n` elements of `ggml_type` from `data` (whose length the reader checked).
pub fn dequantize(ggml_type: GgmlType, data: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let bs = ggml_type.block_size() as usize;
    let bb = ggml_type.block_bytes() as usize;
    // Work in chunks of whole blocks so threads never split a block.
    let blocks_per_chunk = (1 << 16) / bs.max(1);
    out.par_chunks_mut(blocks_per_chunk * bs)
        .zip(data.par_chunks(blocks_per_chunk * bb))
        .for_each(|(out, data)| {
            for (o, b) in out.chunks_mut(bs).zip(data.chunks(bb)) {
                match ggml_type {
                    GgmlType::F32 => o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    GgmlType::F16 => o[0] = f16_at(b, 0),
                    GgmlType::BF16 => o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                    GgmlType::Q4_0 => {
                        let d = f16_at(b, 0);
                        dequant_q4(b, 2, o, |q| (q as f32 - 8.0) * d);
                    }
                    GgmlType::Q4_1 => {
                        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                        dequant_q4(b, 4, o, |q| q as f32 * d + m);
                    }
                    GgmlType::Q8_0 => {
                        let d = f16_at(b, 0);
                        for (x, &q) in o.iter_mut().zip(&b[2..34]) {
                            *x = q as i8 as f32 * d;
                        }
                    }
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_layout() {
        // d = 0.5, m = -1.0, nibbles: low = j % 16, high = 15 - j % 16.
        let mut block = Vec::new();
        block.extend(f16::from_f32(0.5).to_le_bytes());
        block.extend(f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            block.push(j | ((15 - j) << 4));
        }
        let x = dequantize(GgmlType::Q4_1, &block, 32);
        for j in 0..16 {
            assert_eq!(x[j], j as f32 * 0.5 - 1.0);
            assert_eq!(x[16 + j], (15 - j) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn q8_0_and_q4_0_blocks() {
        let mut block = f16::from_f32(0.25).to_le_bytes().to_vec();
        block.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let x = dequantize(GgmlType::Q8_0, &block, 32);
        assert!(x
            .iter()
            .enumerate()
            .all(|(j, &v)| v == (j as f32 - 16.0) * 0.25));

        let mut block = f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend([0x10u8; 16]); // low nibble 0, high nibble 1
        let x = dequantize(GgmlType::Q4_0, &block, 32);
        assert!(x[..16].iter().all(|&v| v == -16.0) && x[16..].iter().all(|&v| v == -14.0));
    }
}
