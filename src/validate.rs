//! Comparing a kernel's output with its f64 reference, for this crate's tests and for
//! crates that test their own integration.
//!
//! The measure is the relative error `‖out − ref‖₂ / ‖ref‖₂` over the compared elements
//! (the RMS absolute error when the reference is all zeros). NaN never passes, nor does an
//! infinity the reference does not have at the same place; a reference infinity (an empty
//! attention row's LSE = −∞, say) must be matched exactly and is left out of the norms.
//! Poison the output with [`Element::nan`](crate::Element::nan) before a run and every
//! element the kernel forgot to write fails.
//!
//! A failed comparison prints a report in the manner of llm.c's checks: the error, the
//! tolerance, the worst element, and the first few elements that are off, with their
//! buffer index and, for matrices, their (row, column).

use crate::reference::Scalar;
use crate::{DType, Error, MatrixLayout, Result};
use std::fmt;

/// The default tolerance on the relative error for a kernel whose output is stored as
/// `dtype` (DESIGN.md): f32 1e-5, f16 2e-3, bf16 1e-2.
pub const fn default_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
    }
}

/// How many off elements a report lists.
const SHOWN: usize = 8;

/// One element that is off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mismatch {
    /// Index in the compared buffer.
    pub index: usize,
    /// (row, column) when the comparison was given a matrix layout.
    pub coord: Option<(usize, usize)>,
    /// The kernel's value.
    pub got: f64,
    /// The reference value.
    pub expected: f64,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((i, j)) = self.coord {
            write!(f, "[{i}, {j}] ")?;
        }
        write!(
            f,
            "(index {}): got {:.9e}, expected {:.9e}, diff {:.3e}",
            self.index,
            self.got,
            self.expected,
            (self.got - self.expected).abs()
        )
    }
}

/// The outcome of a comparison; [`Comparison::passed`] says whether it is within tolerance
/// and `Display` prints the report.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// What was compared (a test's label for the output).
    pub name: String,
    /// Number of elements compared.
    pub count: usize,
    /// `‖out − ref‖₂ / ‖ref‖₂` over the finite reference elements (RMS absolute error if
    /// the reference is all zeros).
    pub rel_err: f64,
    /// The tolerance on `rel_err`.
    pub tolerance: f64,
    /// The largest `|out − ref|` over finite pairs, and where.
    pub max_abs_err: f64,
    /// The element with the largest absolute error, if any finite pair was compared.
    pub worst: Option<Mismatch>,
    /// Elements that are NaN on either side, or infinite where the other side differs.
    pub non_finite: usize,
    /// Elements that are off: non-finite as above, or `|out − ref| > tol·(|ref| + rms(ref))`.
    pub off: usize,
    /// The first few off elements.
    pub mismatches: Vec<Mismatch>,
}

impl Comparison {
    /// Within tolerance: no non-finite mismatch and `rel_err ≤ tolerance`.
    pub fn passed(&self) -> bool {
        self.non_finite == 0 && self.rel_err <= self.tolerance
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.passed() { "ok" } else { "MISMATCH" };
        write!(
            f,
            "{}: {verdict}: rel err {:.3e} (tol {:.1e}) over {} elements, max abs err {:.3e}",
            self.name, self.rel_err, self.tolerance, self.count, self.max_abs_err
        )?;
        if let Some(w) = &self.worst {
            write!(f, " at {w}")?;
        }
        write!(f, "; {} off, {} non-finite", self.off, self.non_finite)?;
        for m in &self.mismatches {
            write!(f, "\n    {m}")?;
        }
        if self.off > self.mismatches.len() {
            write!(f, "\n    ... {} more", self.off - self.mismatches.len())?;
        }
        Ok(())
    }
}

/// Compares the elements `(index, coord)` of `out` with `reference` (in the same order).
fn compare_at<E: Scalar>(
    name: &str,
    out: &[E],
    at: impl Iterator<Item = (usize, Option<(usize, usize)>)> + Clone,
    reference: &[f64],
    tol: f64,
) -> Comparison {
    let pairs = at
        .zip(reference)
        .map(|((index, coord), &expected)| Mismatch {
            index,
            coord,
            got: out[index].as_f64(),
            expected,
        });
    let finite = |m: &Mismatch| m.got.is_finite() && m.expected.is_finite();
    let (mut diff2, mut ref2, mut n_finite) = (0.0f64, 0.0f64, 0usize);
    let mut worst: Option<Mismatch> = None;
    for m in pairs.clone().filter(finite) {
        let d = (m.got - m.expected).abs();
        diff2 += d * d;
        ref2 += m.expected * m.expected;
        n_finite += 1;
        if worst.is_none_or(|w| d > (w.got - w.expected).abs()) {
            worst = Some(m);
        }
    }
    let rel_err = if ref2 > 0.0 {
        (diff2 / ref2).sqrt()
    } else if n_finite > 0 {
        (diff2 / n_finite as f64).sqrt()
    } else {
        0.0
    };
    let rms = if n_finite > 0 {
        (ref2 / n_finite as f64).sqrt()
    } else {
        0.0
    };
    let mut c = Comparison {
        name: name.to_string(),
        count: reference.len(),
        rel_err,
        tolerance: tol,
        max_abs_err: worst.map_or(0.0, |w| (w.got - w.expected).abs()),
        worst,
        non_finite: 0,
        off: 0,
        mismatches: Vec::new(),
    };
    for m in pairs {
        // An exact match (equal infinities included) is never off.
        let off = if finite(&m) {
            (m.got - m.expected).abs() > tol * (m.expected.abs() + rms)
        } else {
            let bad = m.got.is_nan() || m.expected.is_nan() || m.got != m.expected;
            c.non_finite += usize::from(bad);
            bad
        };
        if off {
            c.off += 1;
            if c.mismatches.len() < SHOWN {
                c.mismatches.push(m);
            }
        }
    }
    c
}

/// Compares a contiguous output with its reference, element for element.
pub fn compare<E: Scalar>(
    name: &str,
    out: &[E],
    reference: &[f64],
    tol: f64,
) -> Result<Comparison> {
    if out.len() != reference.len() {
        return Err(Error::invalid(
            "out",
            format!("{} elements, as the reference", reference.len()),
            format!("{} elements", out.len()),
        ));
    }
    Ok(compare_at(
        name,
        out,
        (0..out.len()).map(|i| (i, None)),
        reference,
        tol,
    ))
}

/// Compares the `rows × cols` valid elements of a strided output (row stride
/// `layout.ld`) with a contiguous `rows × cols` reference; the elements between rows are
/// not compared (see [`assert_padding_untouched`]).
pub fn compare_matrix<E: Scalar>(
    name: &str,
    out: &[E],
    layout: MatrixLayout,
    reference: &[f64],
    tol: f64,
) -> Result<Comparison> {
    let MatrixLayout { rows, cols, ld } = layout;
    if reference.len() != rows * cols {
        return Err(Error::invalid(
            "reference",
            format!("rows·cols = {} elements", rows * cols),
            format!("{} elements", reference.len()),
        ));
    }
    if (rows > 1 && ld < cols) || out.len() < layout.min_len() {
        return Err(Error::invalid(
            "out",
            format!(
                "at least {} elements with ld >= cols = {cols}",
                layout.min_len()
            ),
            format!("{} elements with ld = {ld}", out.len()),
        ));
    }
    let at = (0..rows).flat_map(move |i| (0..cols).map(move |j| (i * ld + j, Some((i, j)))));
    Ok(compare_at(name, out, at, reference, tol))
}

/// Panics with the report unless the result is within `tol`; returns the comparison (its
/// errors, for a test that wants to print or tighten them) when it is.
#[track_caller]
pub fn assert_close<E: Scalar>(name: &str, out: &[E], reference: &[f64], tol: f64) -> Comparison {
    check(compare(name, out, reference, tol))
}

/// [`compare_matrix`], panicking with the report unless within `tol`.
#[track_caller]
pub fn assert_close_matrix<E: Scalar>(
    name: &str,
    out: &[E],
    layout: MatrixLayout,
    reference: &[f64],
    tol: f64,
) -> Comparison {
    check(compare_matrix(name, out, layout, reference, tol))
}

#[track_caller]
fn check(c: Result<Comparison>) -> Comparison {
    match c {
        Ok(c) if c.passed() => c,
        Ok(c) => panic!("{c}"),
        Err(e) => panic!("comparison not possible: {e}"),
    }
}

/// Panics unless every element of `out` outside the `rows × cols` valid region of
/// `layout` (the gaps between rows and anything past the last row) is bitwise what it was
/// before the kernel ran (`before`, typically a NaN-poisoned copy).
#[track_caller]
pub fn assert_padding_untouched<E: Scalar>(
    name: &str,
    out: &[E],
    before: &[E],
    layout: MatrixLayout,
) {
    assert_eq!(
        out.len(),
        before.len(),
        "{name}: output and saved buffer differ in length"
    );
    let MatrixLayout { rows, cols, ld } = layout;
    let valid = |idx: usize| idx < rows * ld && idx % ld.max(1) < cols;
    let changed: Vec<usize> = (0..out.len())
        .filter(|&i| !valid(i) && bytemuck::bytes_of(&out[i]) != bytemuck::bytes_of(&before[i]))
        .collect();
    if !changed.is_empty() {
        let shown: Vec<String> = changed
            .iter()
            .take(SHOWN)
            .map(|&i| format!("index {i} (row {}, col {})", i / ld.max(1), i % ld.max(1)))
            .collect();
        panic!(
            "{name}: {} elements outside the valid {rows}x{cols} (ld {ld}) region were written: {}",
            changed.len(),
            shown.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn relative_error_is_the_norm_ratio() {
        let c = compare("v", &[3.0f32, 4.5], &[3.0, 4.0], 0.1).unwrap();
        assert!((c.rel_err - 0.1).abs() < 1e-15);
        assert!(c.passed());
        assert_eq!((c.max_abs_err, c.worst.unwrap().index), (0.5, 1));
        assert!(!compare("v", &[3.0f32, 4.5], &[3.0, 4.0], 0.099)
            .unwrap()
            .passed());
    }

    #[test]
    fn nan_never_passes() {
        let out = [1.0f32, f32::NAN];
        let c = compare("v", &out, &[1.0, 2.0], f64::INFINITY).unwrap();
        assert!(!c.passed());
        assert_eq!((c.non_finite, c.off), (1, 1));
        // A poisoned buffer a kernel never wrote.
        let poisoned = [f16::NAN; 4];
        assert!(!compare("v", &poisoned, &[0.0; 4], 1.0).unwrap().passed());
        assert!(!compare("v", &[bf16::INFINITY], &[1.0], 1.0)
            .unwrap()
            .passed());
        assert!(!compare("v", &[1.0f32], &[f64::NAN], 1.0).unwrap().passed());
    }

    #[test]
    fn matching_infinities_pass_and_stay_out_of_the_norms() {
        let inf = f64::NEG_INFINITY;
        let c = compare("lse", &[inf, 2.0], &[inf, 2.0], 0.0).unwrap();
        assert!(c.passed() && c.rel_err == 0.0);
        assert!(!compare("lse", &[0.0f32, 2.0], &[inf, 2.0], 1.0)
            .unwrap()
            .passed());
        assert!(!compare("lse", &[inf, 2.0], &[-1e300, 2.0], 1.0)
            .unwrap()
            .passed());
    }

    #[test]
    fn an_all_zero_reference_uses_the_rms_error() {
        assert!(compare("z", &[0.0f32; 3], &[0.0; 3], 0.0).unwrap().passed());
        let c = compare("z", &[3e-6f32, -4e-6, 0.0, 0.0], &[0.0; 4], 1e-5).unwrap();
        assert!((c.rel_err - 2.5e-6).abs() < 1e-12, "{}", c.rel_err);
        assert!(c.passed());
    }

    #[test]
    fn matrices_compare_the_valid_region_and_report_coordinates() {
        let layout = MatrixLayout {
            rows: 2,
            cols: 3,
            ld: 5,
        };
        let nan = f32::NAN;
        let mut out = [1.0, 2.0, 3.0, nan, nan, 4.0, 5.0, 6.0];
        let reference = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert!(compare_matrix("m", &out, layout, &reference, 0.0)
            .unwrap()
            .passed());
        out[6] = 7.0;
        let c = compare_matrix("m", &out, layout, &reference, 1e-3).unwrap();
        assert!(!c.passed());
        assert_eq!(c.mismatches[0].coord, Some((1, 1)));
        assert_eq!(c.mismatches[0].index, 6);
        assert!(c.to_string().contains("[1, 1] (index 6): got 7.0"), "{c}");
        let short = compare_matrix("m", &out[..7], layout, &reference, 0.0);
        assert!(matches!(
            short,
            Err(Error::InvalidArgument { arg: "out", .. })
        ));
    }

    #[test]
    fn lengths_must_agree() {
        let r = compare("v", &[1.0f32], &[1.0, 2.0], 0.0);
        assert!(matches!(r, Err(Error::InvalidArgument { arg: "out", .. })));
    }

    #[test]
    #[should_panic(expected = "index 4 (row 0, col 4)")]
    fn written_padding_is_caught() {
        let layout = MatrixLayout {
            rows: 2,
            cols: 3,
            ld: 5,
        };
        let before = [f32::NAN; 8];
        let mut out = before;
        out[..3].fill(1.0);
        out[5..].fill(1.0);
        assert_padding_untouched("m", &out, &before, layout);
        out[4] = 0.0;
        assert_padding_untouched("m", &out, &before, layout);
    }

    #[test]
    #[should_panic(expected = "MISMATCH")]
    fn assert_close_panics_with_the_report() {
        assert_close("v", &[1.0f32], &[2.0], 1e-5);
    }

    #[test]
    fn default_tolerances_follow_the_design() {
        assert_eq!(default_tolerance(DType::F32), 1e-5);
        assert_eq!(default_tolerance(DType::F16), 2e-3);
        assert_eq!(default_tolerance(DType::BF16), 1e-2);
    }
}
