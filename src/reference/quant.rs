//! Dequantization of the quantized frozen weights of [`crate::quant`] in f64: every product
//! and sum of the format's definition taken exactly (bitsandbytes and the kernels round the
//! double-quantized absmax and each product to f32; this does not), so that a kernel's
//! output over a quantized W is compared with `reference::delta_linear` over this W.

use crate::error::Result;
use crate::quant::{e4m3_to_f32, Fp8Scaling, Nf4Absmax, QuantWeight, NF4_NESTED_BLOCK};

/// W [n, k] row-major in f64, after the same checks as the kernels' planning.
pub fn dequantize(w: &QuantWeight<&[u8], &[f32]>, n: usize, k: usize) -> Result<Vec<f64>> {
    w.map(<[u8]>::len, <[f32]>::len).check(n, k)?;
    let f = |v: f32| f64::from(v);
    Ok(match w {
        QuantWeight::Nf4(w) => {
            let absmax = |block: usize| match w.absmax {
                Nf4Absmax::F32(a) => f(a[block]),
                Nf4Absmax::Double {
                    codes,
                    code,
                    scales,
                    offset,
                } => {
                    f(code[codes[block] as usize]) * f(scales[block / NF4_NESTED_BLOCK]) + f(offset)
                }
            };
            (0..n * k)
                .map(|i| {
                    let nibble = (w.packed[i / 2] >> (4 * (1 - i % 2))) & 0xf;
                    f(w.code[nibble as usize]) * absmax(i / w.blocksize)
                })
                .collect()
        }
        QuantWeight::Fp8(w) => (0..n * k)
            .map(|i| {
                let (row, col) = (i / k, i % k);
                let scale = match w.scaling {
                    Fp8Scaling::PerRow => w.scale[row],
                    Fp8Scaling::Block { rows, cols } => {
                        w.scale[(row / rows) * k.div_ceil(cols) + col / cols]
                    }
                };
                f(e4m3_to_f32(w.weight[i])) * f(scale)
            })
            .collect(),
    })
}
