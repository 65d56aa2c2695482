//! LoRA dropout's mask generator, bit-identical with the kernels' `kernels/philox.cuh`.
//!
//! PEFT drops the delta's input (`u' = dropout(u)`), not the frozen path. The kernels
//! never store the mask: each element's keep bit is a pure function of `(seed, row, col)`
//! through Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
//! SC 2011), so the forward's down pass and the backward's dx pass regenerate the same
//! mask, and the f64 reference calls the functions here to build it:
//!
//! ```text
//! key     = (seed as u32, (seed >> 32) as u32)
//! counter = (col, row, 0, 0)          row: the global row (token), col: the column of u
//! u01     = (philox4x32_10(counter, key)[0] >> 8) · 2^-24     exact in f32, in [0, 1)
//! keep    = u01 >= p                  p <= 0 keeps all, p >= 1 (and NaN) drops all
//! u'      = keep ? u · scale(p) : 0   scale(p) = 1 / (1 − p); 0 for p >= 1, 1 for p <= 0
//! ```
//!
//! ```
//! use peft_kernels::dropout;
//! let (seed, p) = (42u64, 0.1f32);
//! let kept = (0..1000u32).filter(|&c| dropout::keep(seed, 7, c, p)).count();
//! assert!((850..950).contains(&kept));
//! assert_eq!(dropout::scale(p), 1.0 / 0.9f32);
//! assert_eq!(dropout::scale(1.0), 0.0);
//! ```

use crate::{Error, Result};

/// Philox4x32's round multipliers (Random123, `philox.h`).
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
/// Philox4x32's key-schedule (Weyl) increments.
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds of `counter` under `key`, as Random123's `philox4x32_R(10, …)`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut k0, mut k1] = key;
    let mut c = counter;
    for _ in 0..10 {
        let p0 = u64::from(M0) * u64::from(c[0]);
        let p1 = u64::from(M1) * u64::from(c[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0];
        k0 = k0.wrapping_add(W0);
        k1 = k1.wrapping_add(W1);
    }
    c
}

/// The uniform in `[0, 1)` behind element `(row, col)`'s keep bit under `seed`: the top 24
/// bits of Philox's first output word, exact in f32.
pub fn uniform(seed: u64, row: u32, col: u32) -> f32 {
    let out = philox4x32_10([col, row, 0, 0], [seed as u32, (seed >> 32) as u32]);
    (out[0] >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// Whether dropout with probability `p` keeps element `(row, col)` of the delta's input
/// under `seed` (`row` the global row, i.e. the token; `col` the column of u).
pub fn keep(seed: u64, row: u32, col: u32, p: f32) -> bool {
    uniform(seed, row, col) >= p
}

/// The factor a kept element is multiplied by: `1 / (1 − p)` in f32 (as the kernels), `0`
/// when `p >= 1` drops every element (never inf or NaN), `1` when `p <= 0`.
pub fn scale(p: f32) -> f32 {
    // NaN drops everything, as `keep` does (u01 >= NaN is false).
    if p >= 1.0 || p.is_nan() {
        0.0
    } else if p <= 0.0 {
        1.0
    } else {
        1.0 / (1.0 - p)
    }
}

/// `Ok` for a dropout probability the operations accept, a finite `p` in `[0, 1]`; else an
/// error naming `arg`.
pub fn check_p(arg: &'static str, p: f32) -> Result<()> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::invalid(arg, "a dropout probability in [0, 1]", p))
    }
}

/// An element type [`apply`] works on.
pub trait Value: Copy + std::ops::Mul<Output = Self> {
    /// The value of an f32 (exact for f32 and f64).
    fn from_f32(v: f32) -> Self;
}

impl Value for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Value for f64 {
    fn from_f32(v: f32) -> Self {
        f64::from(v)
    }
}

/// Applies dropout in place to `u`, a row-major contiguous `[m, cols]` matrix whose row `i`
/// is global row `i`: each element becomes `u · scale(p)` where [`keep`] says so and `0`
/// elsewhere (the scale is the f32 [`scale`], as the kernels multiply by). The reference's
/// `u' = dropout(u)`.
///
/// Errors: `cols` = 0 with a non-empty `u`, `u.len()` not a multiple of `cols`, more than
/// 2^32 rows or columns (the generator's counters are u32), or `p` outside `[0, 1]`.
pub fn apply<T: Value>(seed: u64, p: f32, cols: usize, u: &mut [T]) -> Result<()> {
    check_p("p", p)?;
    if u.is_empty() {
        return Ok(());
    }
    if cols == 0 || u.len() % cols != 0 {
        return Err(Error::invalid(
            "u",
            format!("a whole number of rows of cols = {cols} elements"),
            format!("{} elements", u.len()),
        ));
    }
    let rows = u.len() / cols;
    let too_many = |arg, n: usize| Error::invalid(arg, "at most 2^32 (u32 counters)", n);
    if u32::try_from(cols - 1).is_err() {
        return Err(too_many("cols", cols));
    }
    if u32::try_from(rows - 1).is_err() {
        return Err(too_many("u rows", rows));
    }
    let s = T::from_f32(scale(p));
    for (row, values) in u.chunks_exact_mut(cols).enumerate() {
        for (col, v) in values.iter_mut().enumerate() {
            *v = if keep(seed, row as u32, col as u32, p) {
                *v * s
            } else {
                T::from_f32(0.0)
            };
        }
    }
    Ok(())
}
