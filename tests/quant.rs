//! Quantized frozen weights (src/quant.rs): the formats against the libraries' own outputs
//! (tests/fixtures/quant, written by scripts/quant-fixtures/generate.py with bitsandbytes and
//! torch), bit for bit; the f64 reference; and the argument checks.

use half::bf16;
use peft_kernels::quant::{
    e4m3_to_f32, Fp8Scaling, Fp8Weight, Nf4Absmax, Nf4Weight, QuantWeight, NF4_CODE,
};
use peft_kernels::reference::quant::dequantize;
use peft_kernels::Error;
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/fixtures/quant", name]
        .iter()
        .collect();
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32s(name: &str) -> Vec<f32> {
    fixture(name)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// A case of cases.txt: its words after the format tag.
fn cases(format: &str) -> Vec<Vec<String>> {
    String::from_utf8(fixture("cases.txt"))
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').next() == Some(format))
        .map(|l| l.split(' ').skip(1).map(String::from).collect())
        .collect()
}

/// The fixture's NF4 weight: (n, k, packed, code, absmax f32 or (codes, nested code,
/// nested absmax, offset)).
struct Nf4Case {
    name: String,
    n: usize,
    k: usize,
    blocksize: usize,
    packed: Vec<u8>,
    code: Vec<f32>,
    absmax_f32: Vec<f32>,
    absmax_codes: Vec<u8>,
    nested_code: Vec<f32>,
    nested_absmax: Vec<f32>,
    offset: Option<f32>,
}

impl Nf4Case {
    fn load(words: &[String]) -> Nf4Case {
        let name = words[0].clone();
        let num = |i: usize| words[i].parse::<usize>().unwrap();
        let double = words[4] == "1";
        let file = |t: &str| format!("{name}.{t}");
        Nf4Case {
            n: num(1),
            k: num(2),
            blocksize: num(3),
            packed: fixture(&file("packed.u8")),
            code: f32s(&file("quant_map.f32")),
            absmax_f32: if double {
                vec![]
            } else {
                f32s(&file("absmax.f32"))
            },
            absmax_codes: if double {
                fixture(&file("absmax.u8"))
            } else {
                vec![]
            },
            nested_code: if double {
                f32s(&file("nested_quant_map.f32"))
            } else {
                vec![]
            },
            nested_absmax: if double {
                f32s(&file("nested_absmax.f32"))
            } else {
                vec![]
            },
            offset: double.then(|| f32::from_bits(u32::from_str_radix(&words[5], 16).unwrap())),
            name,
        }
    }
    fn weight(&self) -> QuantWeight<&[u8], &[f32]> {
        QuantWeight::Nf4(Nf4Weight {
            packed: &self.packed,
            code: &self.code,
            blocksize: self.blocksize,
            absmax: match self.offset {
                None => Nf4Absmax::F32(&self.absmax_f32),
                Some(offset) => Nf4Absmax::Double {
                    codes: &self.absmax_codes,
                    code: &self.nested_code,
                    scales: &self.nested_absmax,
                    offset,
                },
            },
        })
    }
}

fn assert_bits(name: &str, got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len(), "{name}: length");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(
            g.to_bits(),
            e.to_bits(),
            "{name}: element {i}: {g:e} vs bitsandbytes' {e:e}"
        );
    }
}

/// Relative ‖a − b‖ / ‖b‖.
fn rel(a: &[f32], b: &[f64]) -> f64 {
    let (mut d, mut r) = (0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        d += (f64::from(x) - y).powi(2);
        r += y * y;
    }
    (d / r).sqrt()
}

#[test]
fn nf4_table_is_bitsandbytes_quant_map() {
    for case in cases("nf4") {
        let c = Nf4Case::load(&case);
        assert_bits(&c.name, &NF4_CODE, &c.code);
    }
}

#[test]
fn nf4_dequantizes_as_bitsandbytes_bit_for_bit() {
    let all = cases("nf4");
    assert_eq!(
        all.len(),
        4,
        "the fixture's cases: plain, odd, double, rows"
    );
    for case in all {
        let c = Nf4Case::load(&case);
        let w = c.weight();
        let got = w.dequantize_f32(c.n, c.k).unwrap();
        assert_bits(&c.name, &got, &f32s(&format!("{}.expected.f32", c.name)));
        // bitsandbytes' bf16 output is its f32 value rounded to nearest even.
        let bf: Vec<u16> = got.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let expected: Vec<u16> = fixture(&format!("{}.expected.bf16", c.name))
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(bf, expected, "{}: bf16", c.name);
        // The f64 reference differs only by the f32 roundings it skips.
        let reference = dequantize(&w, c.n, c.k).unwrap();
        assert!(rel(&got, &reference) < 1e-6, "{}: reference", c.name);
        if c.n * c.k >= 192 {
            // The generator zeroed elements 64..128: a block of absmax 0 gives zeros.
            assert!(
                got[64..128].iter().all(|&v| v == 0.0),
                "{}: zero block",
                c.name
            );
            assert!(reference[64..128].iter().all(|&v| v == 0.0));
        }
    }
}

#[test]
fn e4m3_decodes_as_torch_float8_e4m3fn() {
    let torch = f32s("e4m3.decode.f32");
    for b in 0..=255u8 {
        let (got, want) = (e4m3_to_f32(b), torch[b as usize]);
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "byte {b:#04x}: {got:e} vs torch's {want:e}"
        );
    }
}

#[test]
fn fp8_dequantizes_as_transformers_bit_for_bit() {
    let all = cases("fp8");
    assert_eq!(all.len(), 2, "the fixture's cases: block, row");
    for case in all {
        let name = &case[0];
        let num = |i: usize| case[i].parse::<usize>().unwrap();
        let (n, k, br, bc) = (num(1), num(2), num(3), num(4));
        let weight = fixture(&format!("{name}.weight.u8"));
        let scale = f32s(&format!("{name}.weight_scale_inv.f32"));
        let scaling = match br {
            0 => Fp8Scaling::PerRow,
            _ => Fp8Scaling::Block { rows: br, cols: bc },
        };
        let w = QuantWeight::Fp8(Fp8Weight {
            weight: &weight[..],
            scale: &scale[..],
            scaling,
        });
        let got = w.dequantize_f32(n, k).unwrap();
        assert_bits(name, &got, &f32s(&format!("{name}.expected.f32")));
        let reference = dequantize(&w, n, k).unwrap();
        assert!(rel(&got, &reference) < 1e-6, "{name}: reference");
        if br > 0 {
            // The generator's block (0, 0) is all zeros with scale 0.
            assert_eq!(scale[0], 0.0);
            assert!((0..br.min(n)).all(|i| got[i * k..i * k + bc.min(k)].iter().all(|&v| v == 0.0)));
        }
    }
}

fn invalid_arg(r: peft_kernels::Result<Vec<f32>>) -> (&'static str, String) {
    match r {
        Err(Error::InvalidArgument { arg, expected, .. }) => (arg, expected),
        other => panic!("expected an invalid argument, got {other:?}"),
    }
}

#[test]
fn bad_quantized_weights_are_errors_naming_the_argument() {
    let (n, k) = (3, 70); // 210 elements: 4 blocks of 64 (the last short), 105 bytes
    let packed = vec![0x7fu8; 105];
    let absmax = vec![1.0f32; 4];
    let codes = vec![0u8; 4];
    let code256 = vec![0.5f32; 256];
    let one = vec![1.0f32; 1];
    let nf4 = |packed: &'static [u8], code: &'static [f32], bs, absmax| {
        QuantWeight::Nf4(Nf4Weight {
            packed,
            code,
            blocksize: bs,
            absmax,
        })
    };
    let leak_u8 = |v: Vec<u8>| -> &'static [u8] { Box::leak(v.into_boxed_slice()) };
    let leak_f32 = |v: Vec<f32>| -> &'static [f32] { Box::leak(v.into_boxed_slice()) };
    let (packed, absmax, codes, code256, one) = (
        leak_u8(packed),
        leak_f32(absmax),
        leak_u8(codes),
        leak_f32(code256),
        leak_f32(one),
    );
    let good = nf4(packed, &NF4_CODE, 64, Nf4Absmax::F32(absmax));
    assert_eq!(good.dequantize_f32(n, k).unwrap().len(), n * k);
    type HostWeight<'a> = QuantWeight<&'a [u8], &'a [f32]>;
    let cases: Vec<(HostWeight, &str)> = vec![
        // An odd packed length (104 bytes hold 208 codes, not 210).
        (
            nf4(&packed[..104], &NF4_CODE, 64, Nf4Absmax::F32(absmax)),
            "w.packed",
        ),
        // A block size that disagrees with the absmax count.
        (
            nf4(packed, &NF4_CODE, 128, Nf4Absmax::F32(absmax)),
            "w.absmax",
        ),
        (
            nf4(packed, &NF4_CODE, 48, Nf4Absmax::F32(absmax)),
            "w.blocksize",
        ),
        // A code table of the wrong length.
        (
            nf4(packed, &NF4_CODE[..15], 64, Nf4Absmax::F32(absmax)),
            "w.code",
        ),
        (
            nf4(packed, &NF4_CODE, 64, Nf4Absmax::F32(&absmax[..3])),
            "w.absmax",
        ),
        (
            nf4(
                packed,
                &NF4_CODE,
                64,
                Nf4Absmax::Double {
                    codes,
                    code: &code256[..255],
                    scales: one,
                    offset: 0.0,
                },
            ),
            "w.nested_code",
        ),
        (
            nf4(
                packed,
                &NF4_CODE,
                64,
                Nf4Absmax::Double {
                    codes,
                    code: code256,
                    scales: &one[..0],
                    offset: 0.0,
                },
            ),
            "w.nested_absmax",
        ),
        (
            nf4(
                packed,
                &NF4_CODE,
                64,
                Nf4Absmax::Double {
                    codes: &codes[..3],
                    code: code256,
                    scales: one,
                    offset: 0.0,
                },
            ),
            "w.absmax",
        ),
        (
            nf4(
                packed,
                &NF4_CODE,
                64,
                Nf4Absmax::Double {
                    codes,
                    code: code256,
                    scales: one,
                    offset: f32::NAN,
                },
            ),
            "w.offset",
        ),
    ];
    for (w, arg) in cases {
        assert_eq!(invalid_arg(w.dequantize_f32(n, k)).0, arg, "{w:?}");
        assert_eq!(invalid_arg(dequantize(&w, n, k).map(|_| vec![])).0, arg);
    }
    let double = nf4(
        packed,
        &NF4_CODE,
        64,
        Nf4Absmax::Double {
            codes,
            code: code256,
            scales: one,
            offset: 0.0,
        },
    );
    assert_eq!(double.dequantize_f32(n, k).unwrap().len(), n * k);

    let weight = leak_u8(vec![0x38u8; n * k]); // 1.0
    let fp8 = |weight: &'static [u8], scale: &'static [f32], scaling| {
        QuantWeight::Fp8(Fp8Weight {
            weight,
            scale,
            scaling,
        })
    };
    let block = Fp8Scaling::Block { rows: 2, cols: 64 }; // 2 × 2 blocks
    let four = leak_f32(vec![2.0; 4]);
    assert!(fp8(weight, four, block)
        .dequantize_f32(n, k)
        .unwrap()
        .iter()
        .all(|&v| v == 2.0));
    let three = leak_f32(vec![2.0; 3]);
    assert!(fp8(weight, three, Fp8Scaling::PerRow)
        .dequantize_f32(n, k)
        .is_ok());
    for (w, arg) in [
        (fp8(weight, three, block), "w.scale"),
        (fp8(weight, four, Fp8Scaling::PerRow), "w.scale"),
        (fp8(&weight[1..], four, block), "w.weight"),
        (
            fp8(weight, four, Fp8Scaling::Block { rows: 0, cols: 64 }),
            "w.scaling.rows",
        ),
    ] {
        assert_eq!(invalid_arg(w.dequantize_f32(n, k)).0, arg, "{w:?}");
    }
}

/// The dequantize kernel (the unfused baseline's first step) on bitsandbytes' own tensors:
/// bf16 output bit for bit bitsandbytes' `dequantize_4bit(..., bfloat16)`, f32 its float32.
fn dequantize_kernel_reproduces_bitsandbytes(backend: &peft_kernels::host::Backend) {
    use peft_kernels::host;
    use peft_kernels::quant::QuantDequantizeArgs;
    for case in cases("nf4") {
        let c = Nf4Case::load(&case);
        let mut out = vec![f32::NAN; c.n * c.k];
        let args = QuantDequantizeArgs {
            w: c.weight(),
            out: &mut out[..],
        };
        host::quant_dequantize(backend, c.n, c.k, args).unwrap();
        assert_bits(&c.name, &out, &f32s(&format!("{}.expected.f32", c.name)));
        let mut out = vec![bf16::NAN; c.n * c.k];
        let args = QuantDequantizeArgs {
            w: c.weight(),
            out: &mut out[..],
        };
        host::quant_dequantize(backend, c.n, c.k, args).unwrap();
        let expected: Vec<u16> = fixture(&format!("{}.expected.bf16", c.name))
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let got: Vec<u16> = out.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, expected, "{}: the kernel's bf16", c.name);
    }
    // A wrong output length is refused, naming it.
    let c = Nf4Case::load(&cases("nf4")[0]);
    let mut out = vec![0.0f32; c.n * c.k - 1];
    let args = QuantDequantizeArgs {
        w: c.weight(),
        out: &mut out[..],
    };
    match host::quant_dequantize(backend, c.n, c.k, args) {
        Err(Error::InvalidArgument { op, arg, .. }) => {
            assert_eq!((op, arg), ("quant_dequantize", "out"))
        }
        other => panic!("expected out refused, got {other:?}"),
    }
}

#[cfg(feature = "emulator")]
#[test]
fn dequantize_kernel_reproduces_bitsandbytes_on_emulator() {
    dequantize_kernel_reproduces_bitsandbytes(&peft_kernels::host::Backend::Emulator)
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA device"]
fn dequantize_kernel_reproduces_bitsandbytes_on_gpu() {
    let gpu = peft_kernels::host::Backend::cuda(0).expect("GPU tests need a CUDA device");
    dequantize_kernel_reproduces_bitsandbytes(&gpu)
}

/// A bitsandbytes Linear4bit layer as transformers saves it (safetensors), loaded without
/// repacking: its dequantized values bit for bit bitsandbytes'.
#[cfg(feature = "peft")]
#[test]
fn loads_a_bitsandbytes_layer_from_safetensors() {
    use peft_kernels::quant::Nf4Checkpoint;
    let case = &cases("layer")[0];
    let (n, k, prefix) = (case[1].parse().unwrap(), case[2].parse().unwrap(), &case[3]);
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests/fixtures/quant/bnb_layer.safetensors",
    ]
    .iter()
    .collect();
    let w = Nf4Checkpoint::load(&path, prefix).unwrap();
    assert_eq!((w.n, w.k, w.blocksize), (n, k, 64));
    assert!(!w.absmax_codes.is_empty(), "the layer is double-quantized");
    let got = w.weight().dequantize_f32(n, k).unwrap();
    assert_bits("bnb_layer", &got, &f32s("bnb_layer.expected.f32"));
    // The file with one tensor's dtype changed: an error naming that tensor.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let dtype = match name.ends_with("weight.nested_absmax") {
                true => safetensors::Dtype::I32,
                false => t.dtype(),
            };
            (
                name,
                safetensors::tensor::TensorView::new(dtype, t.shape().to_vec(), t.data()).unwrap(),
            )
        })
        .collect();
    let bad = std::env::temp_dir().join(format!("peft-quant-{}.safetensors", std::process::id()));
    safetensors::serialize_to_file(views, None, &bad).unwrap();
    let loaded = Nf4Checkpoint::load(&bad, prefix);
    std::fs::remove_file(&bad).unwrap();
    match loaded {
        Err(Error::InvalidArgument { arg, expected, .. }) => {
            assert_eq!(
                (arg, expected.as_str()),
                ("weight.nested_absmax", "dtype F32")
            )
        }
        other => panic!("expected the dtype refused, got {other:?}"),
    }
    // Another prefix has no such tensors.
    match Nf4Checkpoint::load(&path, "model.layers.1.") {
        Err(Error::InvalidArgument { arg, .. }) => {
            assert_eq!(arg, "weight.quant_state.bitsandbytes__nf4")
        }
        other => panic!("expected a missing tensor, got {other:?}"),
    }
}
