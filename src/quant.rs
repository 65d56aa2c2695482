//! Quantized frozen weights, exactly as the libraries store them (no repacking on load):
//!
//! - **NF4** (QLoRA, bitsandbytes `quantize_4bit(..., quant_type="nf4")`): the W [n, k]
//!   flattened row-major, cut into blocks of `blocksize` (64 in QLoRA) consecutive elements
//!   *of the flattened tensor* (a block may straddle rows when k is not a multiple of it; the
//!   last block may be short), each element a 4-bit index into the 16-entry code table
//!   (`quant_map`, [`NF4_CODE`]), two per byte: element 2i in the **high** nibble of byte i,
//!   element 2i+1 in the low nibble (bitsandbytes' `(q[::2] << 4) | q[1::2]`; an odd count
//!   pads the last low nibble). Element i is `code[nibble] · absmax[i / blocksize]`, one f32
//!   product. The absmax are f32, or double-quantized (`compress_statistics=True`): uint8
//!   codes, one per block, into a 256-entry code table (`nested_quant_map`) times an f32
//!   scale per [`NF4_NESTED_BLOCK`] codes (`nested_absmax`), plus the f32 `nested_offset`:
//!   `absmax[j] = (nested_code[codes[j]] · nested_absmax[j / 256]) + offset`, two f32
//!   operations each rounded (bitsandbytes' `dequantize_blockwise(...) + offset`).
//! - **FP8 E4M3** (`float8_e4m3fn`, DeepSeek-V3 / transformers' fine-grained FP8): W [n, k]
//!   as one byte per element, and f32 scales (`weight_scale_inv`), one per output row
//!   ([`Fp8Scaling::PerRow`]) or per `rows × cols` block (128 × 128 in DeepSeek-V3,
//!   [`Fp8Scaling::Block`]; [ceil(n/rows), ceil(k/cols)] row-major, edge blocks short).
//!   Element (i, j) is `f32(e4m3) · scale`, one f32 product.
//!
//! A block whose absmax or scale is 0 dequantizes to zeros (0 · code, never 0 / 0).
//!
//! The types are generic over the backend's buffers: `B` holds bytes (u8), `F` f32 values
//! (`&[u8]` and `&[f32]` on the host). Wrong element types are unrepresentable there; the
//! shapes and lengths are checked by [`QuantWeight::check`] (every backend's planning calls
//! it), each error naming the argument (`w.packed`, `w.absmax`, …).

use crate::delta_linear::LoraDropout;
use crate::error::{Error, Result};
use crate::plan::delta_linear::{
    DeltaLinearBufs, DeltaLinearQuantBufs, DeltaLinearQuantTrainBufs, QuantDequantizeBufs,
};
use crate::plan::delta_linear_backward::{DeltaLinearBackwardBufs, DeltaLinearQuantBackwardBufs};
use crate::plan::{Buf, BufSource};

/// bitsandbytes' NF4 code table (`bitsandbytes.functional.get_4bit_type("nf4")`, the same
/// f32 values as the `quant_map` it saves with a checkpoint).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The block of double quantization: bitsandbytes' `quantize_4bit` quantizes the absmax in
/// blocks of 256 (its `nested_blocksize`).
pub const NF4_NESTED_BLOCK: usize = 256;

/// The absmax of an NF4 weight: one per block of `blocksize` elements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Nf4Absmax<B, F> {
    /// f32 [blocks] (`weight.absmax` without `compress_statistics`).
    F32(F),
    /// Double quantization (`compress_statistics=True`).
    Double {
        /// uint8 [blocks]: codes of absmax − offset (`weight.absmax`).
        codes: B,
        /// f32 [256]: the code table of those codes (`weight.nested_quant_map`).
        code: F,
        /// f32 [ceil(blocks / 256)]: the scale of each run of 256 codes
        /// (`weight.nested_absmax`).
        scales: F,
        /// Added to every dequantized absmax (`nested_offset`).
        offset: f32,
    },
}

/// A 4-bit blockwise-quantized W [n, k] in bitsandbytes' layout (module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Nf4Weight<B, F> {
    /// uint8 [ceil(n·k / 2)]: two 4-bit codes per byte, element 2i in the high nibble
    /// (`weight`, stored [ceil(n·k / 2), 1]).
    pub packed: B,
    /// f32 [16]: the 4-bit code table (`weight.quant_map`; [`NF4_CODE`] for NF4).
    pub code: F,
    /// Elements per absmax block over the flattened tensor: a power of two from 32 to 4096
    /// (bitsandbytes' choices; QLoRA uses 64).
    pub blocksize: usize,
    pub absmax: Nf4Absmax<B, F>,
}

/// Which scale an FP8 element takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Scaling {
    /// One scale per output row: [n].
    PerRow,
    /// One scale per `rows × cols` block of W: [ceil(n / rows), ceil(k / cols)] row-major
    /// (DeepSeek-V3's `weight_block_size` [128, 128]).
    Block { rows: usize, cols: usize },
}

/// An FP8 E4M3 W [n, k] with f32 scales (module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fp8Weight<B, F> {
    /// E4M3 bytes [n, k] (`float8_e4m3fn`, `weight`).
    pub weight: B,
    /// f32 scales as `scaling` says (`weight_scale_inv`: W = f32(weight) · scale).
    pub scale: F,
    pub scaling: Fp8Scaling,
}

/// A quantized frozen weight W [n, k].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum QuantWeight<B, F> {
    Nf4(Nf4Weight<B, F>),
    Fp8(Fp8Weight<B, F>),
}

impl<B, F> QuantWeight<B, F> {
    /// The same description over other buffers (`fb` for each byte buffer, `ff` for each
    /// f32 buffer): a backend's buffers to addresses, or to lengths.
    pub fn map<B2, F2>(
        self,
        mut fb: impl FnMut(B) -> B2,
        mut ff: impl FnMut(F) -> F2,
    ) -> QuantWeight<B2, F2> {
        match self {
            QuantWeight::Nf4(w) => QuantWeight::Nf4(Nf4Weight {
                packed: fb(w.packed),
                code: ff(w.code),
                blocksize: w.blocksize,
                absmax: match w.absmax {
                    Nf4Absmax::F32(a) => Nf4Absmax::F32(ff(a)),
                    Nf4Absmax::Double {
                        codes,
                        code,
                        scales,
                        offset,
                    } => Nf4Absmax::Double {
                        codes: fb(codes),
                        code: ff(code),
                        scales: ff(scales),
                        offset,
                    },
                },
            }),
            QuantWeight::Fp8(w) => QuantWeight::Fp8(Fp8Weight {
                weight: fb(w.weight),
                scale: ff(w.scale),
                scaling: w.scaling,
            }),
        }
    }
}

/// The packed lengths and scale counts of a W [n, k] (usize arithmetic that cannot
/// overflow once n·k fits, which [`QuantWeight::check`] checks first).
impl QuantWeight<usize, usize> {
    /// Checks buffer lengths (`self` holds each buffer's element count, as
    /// [`QuantWeight::map`] makes it) against W [n, k]: an error naming the first argument
    /// that disagrees, with the expected value.
    pub fn check(&self, n: usize, k: usize) -> Result<()> {
        let count = n
            .checked_mul(k)
            .filter(|&c| c <= i64::MAX as usize / 2)
            .ok_or_else(|| Error::invalid("dims", "n·k within 2^62", format!("{n}·{k}")))?;
        let exact = |arg: &'static str, len: usize, want: usize, what: &str| {
            if len == want {
                Ok(())
            } else {
                Err(Error::invalid(
                    arg,
                    format!("{want} elements ({what})"),
                    format!("{len} elements"),
                ))
            }
        };
        match *self {
            QuantWeight::Nf4(w) => {
                if !(32..=4096).contains(&w.blocksize) || !w.blocksize.is_power_of_two() {
                    return Err(Error::invalid(
                        "w.blocksize",
                        "a power of two from 32 to 4096 (bitsandbytes' block sizes)",
                        w.blocksize,
                    ));
                }
                exact(
                    "w.packed",
                    w.packed,
                    count.div_ceil(2),
                    "ceil(n·k / 2) bytes: two 4-bit codes per byte",
                )?;
                exact("w.code", w.code, 16, "the 4-bit code table")?;
                let blocks = count.div_ceil(w.blocksize);
                match w.absmax {
                    Nf4Absmax::F32(a) => exact(
                        "w.absmax",
                        a,
                        blocks,
                        "one per block: ceil(n·k / blocksize)",
                    )?,
                    Nf4Absmax::Double {
                        codes,
                        code,
                        scales,
                        offset,
                    } => {
                        exact("w.absmax", codes, blocks, "one code per block")?;
                        exact("w.nested_code", code, 256, "the 8-bit code table")?;
                        exact(
                            "w.nested_absmax",
                            scales,
                            blocks.div_ceil(NF4_NESTED_BLOCK),
                            "one per 256 absmax codes",
                        )?;
                        if !offset.is_finite() {
                            return Err(Error::invalid("w.offset", "a finite f32", offset));
                        }
                    }
                }
            }
            QuantWeight::Fp8(w) => {
                exact(
                    "w.weight",
                    w.weight,
                    count,
                    "one E4M3 byte per element of [n, k]",
                )?;
                let scales = match w.scaling {
                    Fp8Scaling::PerRow => n,
                    Fp8Scaling::Block { rows, cols } => {
                        for (arg, v) in [("w.scaling.rows", rows), ("w.scaling.cols", cols)] {
                            if v == 0 {
                                return Err(Error::invalid(arg, "at least 1", 0));
                            }
                        }
                        n.div_ceil(rows) * k.div_ceil(cols)
                    }
                };
                exact("w.scale", w.scale, scales, "one f32 scale per row or block")?;
            }
        }
        Ok(())
    }
}

impl QuantWeight<&[u8], &[f32]> {
    /// W [n, k] dequantized to f32 exactly as the libraries do (bitsandbytes'
    /// `dequantize_4bit` to float32; transformers' `weight.to(float32) * weight_scale_inv`),
    /// bit for bit: for checking a checkpoint and for unfused baselines, not for the
    /// kernels (which never materialise W).
    pub fn dequantize_f32(&self, n: usize, k: usize) -> Result<Vec<f32>> {
        self.map(<[u8]>::len, <[f32]>::len).check(n, k)?;
        Ok((0..n * k).map(|i| self.element_f32(i, k)).collect())
    }

    /// Element `i` of the flattened W (row length `k`), as [`Self::dequantize_f32`].
    fn element_f32(&self, i: usize, k: usize) -> f32 {
        match self {
            QuantWeight::Nf4(w) => {
                let byte = w.packed[i / 2];
                let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0xf };
                w.code[nibble as usize] * nf4_absmax_f32(&w.absmax, i / w.blocksize)
            }
            QuantWeight::Fp8(w) => {
                let (row, col) = (i / k, i % k);
                let scale = match w.scaling {
                    Fp8Scaling::PerRow => w.scale[row],
                    Fp8Scaling::Block { rows, cols } => {
                        w.scale[(row / rows) * k.div_ceil(cols) + col / cols]
                    }
                };
                e4m3_to_f32(w.weight[i]) * scale
            }
        }
    }
}

/// Absmax `block` of an NF4 weight in f32, as bitsandbytes computes it.
fn nf4_absmax_f32(a: &Nf4Absmax<&[u8], &[f32]>, block: usize) -> f32 {
    match *a {
        Nf4Absmax::F32(a) => a[block],
        Nf4Absmax::Double {
            codes,
            code,
            scales,
            offset,
        } => code[codes[block] as usize] * scales[block / NF4_NESTED_BLOCK] + offset,
    }
}

/// The value of an E4M3 byte (`float8_e4m3fn`: bias 7, no infinities, 0x7f / 0xff NaN),
/// exact in f32.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (i32::from((b >> 3) & 0xf), f32::from(b & 7));
    match (e, m) {
        (15, 7.0) => f32::NAN,
        (0, _) => sign * m / 8.0 * 2f32.powi(-6),
        _ => sign * (1.0 + m / 8.0) * 2f32.powi(e - 7),
    }
}

/// The tensors of `delta_linear_quant`: [`crate::delta_linear::DeltaLinearArgs`]' with the frozen W quantized
/// (`w`; every other tensor, and every method of the unified view, as `delta_linear`). The
/// kernels dequantize W's tiles as they load them (kernels/quant.cuh): the dequantized W never
/// exists in memory.
#[derive(Debug)]
pub struct DeltaLinearQuantArgs<R, W, B, F> {
    /// [m, k], row stride `ld_x`.
    pub x: R,
    /// The frozen weight [n, k], quantized.
    pub w: QuantWeight<B, F>,
    pub bias: Option<R>,
    pub u: Option<R>,
    pub w_down: R,
    pub b_down: Option<R>,
    pub w_up: R,
    pub b_up: Option<R>,
    pub gate: Option<R>,
    pub workspace: W,
    pub y: W,
}

/// A training-mode `delta_linear_quant` (as [`crate::delta_linear::DeltaLinearTrainArgs`]).
#[derive(Debug)]
pub struct DeltaLinearQuantTrainArgs<R, W, S, B, F> {
    pub forward: DeltaLinearQuantArgs<R, W, B, F>,
    pub saved: S,
    pub dropout: Option<LoraDropout>,
}

/// [`DeltaLinearQuantArgs`] over host slices.
pub type HostDeltaLinearQuantArgs<'a, T> =
    DeltaLinearQuantArgs<&'a [T], &'a mut [T], &'a [u8], &'a [f32]>;
/// [`DeltaLinearQuantTrainArgs`] over host slices.
pub type HostDeltaLinearQuantTrainArgs<'a, T> =
    DeltaLinearQuantTrainArgs<&'a [T], &'a mut [T], &'a mut [f32], &'a [u8], &'a [f32]>;

impl<B, F> QuantWeight<B, F> {
    /// The buffers' addresses from a backend's buffer source.
    fn bufs<W, Src>(self, s: &mut Src) -> QuantWeight<Buf, Buf>
    where
        Src: BufSource<B, W> + BufSource<F, W>,
    {
        let bytes = self.map(|b| BufSource::<B, W>::read(s, b), |f| f);
        bytes.map(|b| b, |f| BufSource::<F, W>::read(s, f))
    }

    /// The buffer the kernels stream: NF4's packed codes, FP8's bytes.
    pub fn data(&self) -> &B {
        match self {
            QuantWeight::Nf4(w) => &w.packed,
            QuantWeight::Fp8(w) => &w.weight,
        }
    }
}

impl<R, W, B, F> DeltaLinearQuantArgs<R, W, B, F> {
    /// The planner's view of these tensors (see [`crate::delta_linear::DeltaLinearArgs::bufs`]): the dense view's
    /// `w` is the quantized weight's data buffer, which the plan does not read as W.
    pub fn bufs<Src>(self, s: &mut Src) -> DeltaLinearQuantBufs
    where
        Src: BufSource<R, W> + BufSource<B, W> + BufSource<F, W>,
    {
        let w = self.w.bufs::<W, Src>(s);
        let mut r = |b: R| BufSource::<R, W>::read(s, b);
        let (x, bias, u) = (r(self.x), self.bias.map(&mut r), self.u.map(&mut r));
        let (w_down, b_down) = (r(self.w_down), self.b_down.map(&mut r));
        let (w_up, b_up, gate) = (r(self.w_up), self.b_up.map(&mut r), self.gate.map(&mut r));
        let workspace = BufSource::<R, W>::write(s, self.workspace);
        let y = BufSource::<R, W>::write(s, self.y);
        DeltaLinearQuantBufs {
            forward: DeltaLinearBufs {
                x,
                w: *w.data(),
                bias,
                u,
                w_down,
                b_down,
                w_up,
                b_up,
                gate,
                workspace,
                y,
                col_scale: None,
            },
            w,
        }
    }
}

impl<R, W, S, B, F> DeltaLinearQuantTrainArgs<R, W, S, B, F> {
    /// The planner's view of these tensors.
    pub fn bufs<Src>(self, s: &mut Src) -> DeltaLinearQuantTrainBufs
    where
        Src: BufSource<R, W> + BufSource<B, W> + BufSource<F, W> + BufSource<R, S>,
    {
        let saved = BufSource::<R, S>::write(s, self.saved);
        DeltaLinearQuantTrainBufs {
            forward: self.forward.bufs(s),
            saved,
            dropout: self.dropout,
        }
    }
}

/// The tensors of `delta_linear_quant_backward`: [`crate::delta_linear::DeltaLinearBackwardArgs`]'
/// with the frozen W quantized (the same forms, gradients and buffers). dx reads W through
/// its quantized tiles, never a dequantized copy.
#[derive(Debug)]
pub struct DeltaLinearQuantBackwardArgs<R, S, W, G, B, F> {
    pub dy: R,
    pub x: R,
    /// The frozen weight [n, k], quantized as in the forward.
    pub w: QuantWeight<B, F>,
    pub u: Option<R>,
    pub w_down: R,
    pub w_up: R,
    pub b_up: Option<R>,
    pub gate: Option<R>,
    pub saved: S,
    pub dx: W,
    pub du: Option<W>,
    pub dw_down: G,
    pub db_down: Option<G>,
    pub dw_up: G,
    pub db_up: Option<G>,
    pub dgate: Option<G>,
    pub workspace: G,
    pub dropout: Option<LoraDropout>,
    pub accumulate: bool,
}

/// [`DeltaLinearQuantBackwardArgs`] over host slices.
pub type HostDeltaLinearQuantBackwardArgs<'a, T> = DeltaLinearQuantBackwardArgs<
    &'a [T],
    &'a [f32],
    &'a mut [T],
    &'a mut [f32],
    &'a [u8],
    &'a [f32],
>;

impl<R, S, W, G, B, F> DeltaLinearQuantBackwardArgs<R, S, W, G, B, F> {
    /// The planner's view of these tensors.
    pub fn bufs<Src>(self, s: &mut Src) -> DeltaLinearQuantBackwardBufs
    where
        Src: BufSource<R, W> + BufSource<S, G> + BufSource<B, W> + BufSource<F, W>,
    {
        let w = self.w.bufs::<W, Src>(s);
        let r = |s: &mut Src, b: R| BufSource::<R, W>::read(s, b);
        let g = |s: &mut Src, b: G| BufSource::<S, G>::write(s, b);
        DeltaLinearQuantBackwardBufs {
            backward: DeltaLinearBackwardBufs {
                dy: r(s, self.dy),
                x: r(s, self.x),
                w: *w.data(),
                u: self.u.map(|b| r(s, b)),
                w_down: r(s, self.w_down),
                w_up: r(s, self.w_up),
                b_up: self.b_up.map(|b| r(s, b)),
                gate: self.gate.map(|b| r(s, b)),
                saved: BufSource::<S, G>::read(s, self.saved),
                dx: BufSource::<R, W>::write(s, self.dx),
                du: self.du.map(|b| BufSource::<R, W>::write(s, b)),
                dw_down: g(s, self.dw_down),
                db_down: self.db_down.map(|b| g(s, b)),
                dw_up: g(s, self.dw_up),
                db_up: self.db_up.map(|b| g(s, b)),
                dgate: self.dgate.map(|b| g(s, b)),
                workspace: g(s, self.workspace),
                dropout: self.dropout,
                accumulate: self.accumulate,
            },
            w,
        }
    }
}

/// The tensors of `quant_dequantize`: a quantized W [n, k] and the contiguous `out` [n, k] it
/// is dequantized into (each element the f32 value of [`QuantWeight::dequantize_f32`] rounded
/// to the element type: what the fused kernels multiply with). The fused operations never
/// need it; it is the first step of the unfused path (`cuda::baseline`).
#[derive(Debug)]
pub struct QuantDequantizeArgs<W, B, F> {
    pub w: QuantWeight<B, F>,
    pub out: W,
}

/// [`QuantDequantizeArgs`] over host slices.
pub type HostQuantDequantizeArgs<'a, T> = QuantDequantizeArgs<&'a mut [T], &'a [u8], &'a [f32]>;

impl<W, B, F> QuantDequantizeArgs<W, B, F> {
    /// The planner's view of these tensors.
    pub fn bufs<Src>(self, s: &mut Src) -> QuantDequantizeBufs
    where
        Src: BufSource<B, W> + BufSource<F, W>,
    {
        let w = self.w.bufs::<W, Src>(s);
        QuantDequantizeBufs {
            w,
            out: BufSource::<B, W>::write(s, self.out),
        }
    }
}

/// An NF4 weight read from a checkpoint, owning its tensors ([`Nf4Checkpoint::weight`] lends
/// them as a [`QuantWeight`]).
#[cfg(feature = "peft")]
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Checkpoint {
    /// W's shape [n, k] (the quant state's `shape`).
    pub n: usize,
    pub k: usize,
    pub blocksize: usize,
    pub packed: Vec<u8>,
    pub code: Vec<f32>,
    /// f32 absmax, empty under double quantization.
    pub absmax: Vec<f32>,
    /// Double quantization's codes, table, scales and offset (empty, 0 without).
    pub absmax_codes: Vec<u8>,
    pub nested_code: Vec<f32>,
    pub nested_absmax: Vec<f32>,
    pub offset: f32,
}

#[cfg(feature = "peft")]
impl Nf4Checkpoint {
    /// The weight `{prefix}weight` of a bitsandbytes `Linear4bit` layer (NF4) in a safetensors
    /// file as transformers saves a QLoRA base model: `weight` (uint8, two codes a byte),
    /// `weight.absmax` (f32, or uint8 codes under double quantization with
    /// `weight.nested_absmax` and `weight.nested_quant_map`), `weight.quant_map`, and the JSON
    /// of `weight.quant_state.bitsandbytes__nf4` (quant_type, blocksize, shape,
    /// nested_blocksize, nested_offset). Each tensor is taken as stored; an error names the
    /// tensor that is missing, of the wrong dtype or length, or a quant state this crate does
    /// not run (FP4, a nested block size other than 256).
    pub fn load(path: impl AsRef<std::path::Path>, prefix: &str) -> Result<Nf4Checkpoint> {
        use safetensors::Dtype;
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|e| Error::invalid("path", "a readable safetensors file", e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::invalid("path", "a safetensors file", e))?;
        let tensor = |arg: &'static str, dtype: Dtype| -> Result<Option<Vec<u8>>> {
            let name = format!("{prefix}{arg}");
            match st.tensor(&name) {
                Ok(t) if t.dtype() == dtype => Ok(Some(t.data().to_vec())),
                Ok(t) => Err(Error::invalid(
                    arg,
                    format!("dtype {dtype:?}"),
                    format!("{:?}", t.dtype()),
                )),
                Err(_) => Ok(None),
            }
        };
        let required = |arg: &'static str, dtype: Dtype| -> Result<Vec<u8>> {
            tensor(arg, dtype)?.ok_or_else(|| Error::invalid(arg, "a tensor", "none in the file"))
        };
        let f32s = |b: Vec<u8>| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        const STATE: &str = "weight.quant_state.bitsandbytes__nf4";
        let state: serde_json::Value = serde_json::from_slice(&required(STATE, Dtype::U8)?)
            .map_err(|e| Error::invalid(STATE, "the quant state's JSON", e))?;
        let field = |key: &str| state.get(key).filter(|v| !v.is_null());
        if field("quant_type").and_then(|v| v.as_str()) != Some("nf4") {
            return Err(Error::invalid(
                STATE,
                "quant_type \"nf4\"",
                state["quant_type"].clone(),
            ));
        }
        let shape: Vec<usize> = field("shape")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_u64().map(|d| d as usize))
                    .collect()
            })
            .unwrap_or_default();
        let [n, k] = shape[..] else {
            return Err(Error::invalid(
                STATE,
                "a shape [n, k]",
                state["shape"].clone(),
            ));
        };
        let blocksize = field("blocksize").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        let mut w = Nf4Checkpoint {
            n,
            k,
            blocksize,
            packed: required("weight", Dtype::U8)?,
            code: f32s(required("weight.quant_map", Dtype::F32)?),
            absmax: Vec::new(),
            absmax_codes: Vec::new(),
            nested_code: Vec::new(),
            nested_absmax: Vec::new(),
            offset: 0.0,
        };
        if let Some(nested) = field("nested_offset") {
            if field("nested_blocksize").and_then(|v| v.as_u64()) != Some(NF4_NESTED_BLOCK as u64) {
                return Err(Error::invalid(
                    STATE,
                    "nested_blocksize 256",
                    state["nested_blocksize"].clone(),
                ));
            }
            w.offset = nested.as_f64().unwrap_or(f64::NAN) as f32;
            w.absmax_codes = required("weight.absmax", Dtype::U8)?;
            w.nested_absmax = f32s(required("weight.nested_absmax", Dtype::F32)?);
            w.nested_code = f32s(required("weight.nested_quant_map", Dtype::F32)?);
        } else {
            w.absmax = f32s(required("weight.absmax", Dtype::F32)?);
        }
        w.weight().map(<[u8]>::len, <[f32]>::len).check(n, k)?;
        Ok(w)
    }

    /// The weight as the operations take it.
    pub fn weight(&self) -> QuantWeight<&[u8], &[f32]> {
        QuantWeight::Nf4(Nf4Weight {
            packed: &self.packed,
            code: &self.code,
            blocksize: self.blocksize,
            absmax: if self.absmax_codes.is_empty() {
                Nf4Absmax::F32(&self.absmax)
            } else {
                Nf4Absmax::Double {
                    codes: &self.absmax_codes,
                    code: &self.nested_code,
                    scales: &self.nested_absmax,
                    offset: self.offset,
                }
            },
        })
    }
}
