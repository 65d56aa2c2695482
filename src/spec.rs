//! The vocabulary of the unified view (UNIFIED-VIEW.md): the four design dimensions of a
//! delta, the element types, and the shape descriptions the kernels and the reference share.

use half::{bf16, f16};
use std::fmt;

/// Element type of a tensor. Kernels accumulate in f32 whatever the storage type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    /// The suffix of kernel names instantiated for this type (`_f32`, `_f16`, `_bf16`).
    pub const fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suffix())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}

    /// With `cuda`, an element is also a cudarc device type, so buffers of it can be
    /// allocated, copied and passed to the GPU backend.
    #[cfg(feature = "cuda")]
    pub trait Device: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
    #[cfg(feature = "cuda")]
    impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> Device for T {}
    #[cfg(not(feature = "cuda"))]
    pub trait Device {}
    #[cfg(not(feature = "cuda"))]
    impl<T> Device for T {}
}

/// A storage type the kernels are instantiated for: f32, f16 or bf16.
pub trait Element:
    sealed::Sealed
    + sealed::Device
    + Copy
    + Default
    + PartialEq
    + fmt::Debug
    + bytemuck::Pod
    + Send
    + Sync
    + 'static
{
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Exact widening.
    fn to_f64(self) -> f64;
    /// Exact widening.
    fn to_f32(self) -> f32;
    /// Round to nearest even.
    fn from_f64(v: f64) -> Self;
    /// Round to nearest even.
    fn from_f32(v: f32) -> Self;
    /// A NaN, used to poison outputs so that an unwritten element fails every comparison.
    fn nan() -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn nan() -> Self {
        f32::NAN
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn nan() -> Self {
        f16::NAN
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn nan() -> Self {
        bf16::NAN
    }
}

/// The functional form `f` of the bottleneck.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Activation {
    /// LoRA.
    Identity = 0,
    /// Houlsby and parallel adapters.
    Relu = 1,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh = 2,
    /// GELU, exact (erf) form (`nn.GELU()`).
    GeluErf = 3,
    /// SiLU / swish.
    Silu = 4,
}

impl Activation {
    /// Every activation, in discriminant order.
    pub const ALL: [Activation; 5] = [
        Activation::Identity,
        Activation::Relu,
        Activation::GeluTanh,
        Activation::GeluErf,
        Activation::Silu,
    ];

    /// `f(v)` in f64; the reference's definition of each activation.
    pub fn apply_f64(self, v: f64) -> f64 {
        match self {
            Activation::Identity => v,
            Activation::Relu => v.max(0.0),
            Activation::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
            }
            Activation::GeluErf => 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)),
            Activation::Silu => v / (1.0 + (-v).exp()),
        }
    }
}

/// The error function in f64 (std has none), to within ~1e-15 absolute (and relative).
///
/// Below 2.5 the series `erf(x) = 2/√π · e^(−x²) · Σ 2ⁿ x^(2n+1) / (1·3·…·(2n+1))`,
/// whose terms are all positive (no cancellation, unlike the alternating Maclaurin
/// series); above, the continued fraction of erfc (modified Lentz), which converges in
/// a few dozen terms there.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let ax = x.abs();
    let r = if ax < 2.5 {
        let x2 = ax * ax;
        let mut term = ax;
        let mut sum = ax;
        let mut n = 0.0;
        // A strict `>`: at x = 0 every term is 0 and the loop must not start.
        while term > 0.25 * f64::EPSILON * sum {
            n += 1.0;
            term *= 2.0 * x2 / (2.0 * n + 1.0);
            sum += term;
        }
        2.0 / std::f64::consts::PI.sqrt() * (-x2).exp() * sum
    } else if ax < 27.0 {
        // Continued fraction for erfc (Lentz), converges fast for x >= 2.5.
        let x2 = ax * ax;
        let tiny = 1e-300;
        let mut f = ax;
        let mut c = ax;
        let mut d = 0.0;
        let mut i = 1.0;
        loop {
            let a = i / 2.0;
            d = ax + a * d;
            d = if d.abs() < tiny { tiny } else { d };
            c = ax + a / c;
            c = if c.abs() < tiny { tiny } else { c };
            d = 1.0 / d;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() <= f64::EPSILON {
                break;
            }
            i += 1.0;
        }
        1.0 - (-x2).exp() / (f * std::f64::consts::PI.sqrt())
    } else {
        1.0
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// Where the delta reads its input `u`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Insertion {
    /// `u` is the frozen sublayer's input (`x`, or a separate delta input).
    Parallel,
    /// `u = h`, the frozen sublayer's output.
    Sequential,
}

/// How the delta is composed with `h`.
///
/// Every scale of the crate is an `f32`: the fixed `s` of [`Composition::Scaled`], LoRA's α
/// of [`Composition::Lora`], attention's softmax scale
/// ([`PrefixAttention::scale`](crate::prefix_attention::PrefixAttention::scale)) and
/// `lora_merge`'s scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Composition {
    /// `h + Δh`.
    Add,
    /// `h + s·Δh` with a fixed `s` (the scaled parallel adapter: s = 4). For LoRA prefer
    /// [`Composition::Lora`], whose `s` follows the call's rank.
    Scaled(f32),
    /// LoRA's `h + s·Δh` with `s` resolved against the bottleneck width r of the call's
    /// dims (`DeltaLinearDims::r`, `DeltaApplyDims::r`, the reference's `W_down` rows) when
    /// the call is planned: `s = α / r`, or `s = α / √r` with `rslora` (rank-stabilised
    /// LoRA, Kalajdzievski 2023; PEFT's `use_rslora`). So α and r are each given once: the
    /// scale cannot disagree with the rank the weights have. See [`Composition::scale`].
    Lora {
        /// α, PEFT's `lora_alpha`.
        #[doc(alias = "lora_alpha")]
        alpha: f32,
        /// `s = α / √r` instead of `α / r`.
        #[doc(alias = "use_rslora")]
        rslora: bool,
    },
    /// `(1 − λ)·h + λ·Δh` with a per-row gate λ given as a tensor of M values.
    Gated,
}

impl Composition {
    /// The scale `s` applied to Δh before composition, for a bottleneck of width `r` (which
    /// only [`Composition::Lora`] reads, and which must then be at least 1): the fixed `s`
    /// of `Scaled`, `α / r` or `α / √r` of `Lora` (computed in f64 and rounded to f32 once,
    /// as PEFT's Python float scaling is applied to an f32 accumulator), 1 for `Add` and
    /// `Gated`. The kernels and the reference both take `s` from here; so should a
    /// `lora_merge` of the same layer (`scale(r)` to merge, `-scale(r)` to unmerge).
    #[doc(alias = "scaling")]
    pub fn scale(self, r: usize) -> f32 {
        match self {
            Composition::Scaled(s) => s,
            Composition::Lora { alpha, rslora } => {
                let r = r as f64;
                let denominator = if rslora { r.sqrt() } else { r };
                (f64::from(alpha) / denominator) as f32
            }
            Composition::Add | Composition::Gated => 1.0,
        }
    }
}

/// A row-major matrix of `rows × cols` with a leading dimension (row stride, in elements)
/// `ld ≥ cols`: element (i, j) lives at `i * ld + j`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatrixLayout {
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl MatrixLayout {
    /// A contiguous `rows × cols` matrix.
    pub const fn contiguous(rows: usize, cols: usize) -> Self {
        MatrixLayout {
            rows,
            cols,
            ld: cols,
        }
    }
    /// The number of elements a buffer must hold: `(rows − 1)·ld + cols`, 0 when empty;
    /// saturating at `usize::MAX`, which no buffer holds.
    pub const fn min_len(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1)
                .saturating_mul(self.ld)
                .saturating_add(self.cols)
        }
    }
}

/// The default `split_target` of the dims of every operation that splits a pass with few
/// blocks over more (`DeltaLinearDims`, `DeltaApplyDims`, `PrefixAttentionDims`): about one
/// block per SM of the largest GPUs (132 on an H100). A guess until measured: the benches
/// sweep it.
pub const DEFAULT_SPLIT_TARGET: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;

    /// Each composition's scale, LoRA's resolved against r (α / r, α / √r).
    #[test]
    fn composition_scales() {
        let lora = |alpha, rslora| Composition::Lora { alpha, rslora };
        assert_eq!(lora(32.0, false).scale(16), 2.0);
        assert_eq!(lora(32.0, true).scale(16), 8.0);
        assert_eq!(lora(16.0, false).scale(3), (16.0f64 / 3.0) as f32);
        assert_eq!(lora(16.0, true).scale(3), (16.0 / 3.0f64.sqrt()) as f32);
        assert_eq!(Composition::Scaled(4.0).scale(7), 4.0);
        assert_eq!(Composition::Add.scale(7), 1.0);
        assert_eq!(Composition::Gated.scale(7), 1.0);
    }
}
