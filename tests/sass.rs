//! The machine code of the delta-linear kernels, read from the crate's embedded sm_80 and
//! sm_90 cubins with `cuobjdump -sass`: the tensor-core kernels issue HMMA (fed by LDSM,
//! ldmatrix, and LDGSTS, cp.async), the wgmma kernels HGMMA on sm_90 (and nothing of it on
//! sm_80, where they are never launched), the SIMT kernels neither, and the hot tensor-core
//! kernels touch no local memory (no STL/LDL: neither a register spill nor a stack array),
//! and on sm_90 the fused-linear kernels hold the dependent-launch wait they promise. The
//! training modules likewise: the backward's tensor-core data pass issues HMMA fed by LDSM
//! (plain and .trans) and LDGSTS, its tensor-core weight passes HMMA fed by LDSM .trans only
//! and LDGSTS, its other kernels no HMMA, and no kernel of the backward,
//! prefix attention backward, AdamW or DoRA modules touches local memory.
//! ptxas's report, which the build checks, says how much local memory a kernel has; only
//! the disassembly says which instructions nvcc actually chose.
//!
//! cuobjdump (and the nvdisasm it runs) comes from `bash scripts/install-cuda-toolchain.sh`,
//! next to nvcc; `CUOBJDUMP` names another. Without it the tests fail, saying so.
#![cfg(feature = "cuda")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use peft_kernels::cuda::{cubin, Image};
use peft_kernels::kernels::{KernelId, Module};

#[path = "../build/tools.rs"]
mod tools;

/// The cubin architectures the build embeds.
const IMAGES: [Image; 2] = [Image::Sm80, Image::Sm90];

/// The kernels whose every instruction matters: the tensor-core GEMMs.
fn is_tensor_core_kernel(name: &str) -> bool {
    name.starts_with("fused_linear_mma_") || is_wgmma_kernel(name)
}

/// The GEMMs on Hopper's warpgroup MMA (sm_90a only).
fn is_wgmma_kernel(name: &str) -> bool {
    name.starts_with("fused_linear_wgmma_")
}

/// cuobjdump by `CUOBJDUMP`, then beside `NVCC`, in `CUDA_HOME`/`CUDA_PATH`, on `PATH`, in
/// the repository's toolchain folder (where build/cuda.rs finds nvcc too), then in CUDA's
/// default install folder, /usr/local/cuda/bin (a GPU machine running the test binaries of
/// scripts/build-gpu-bundle.sh has no repository).
fn cuobjdump() -> PathBuf {
    if let Some(path) = std::env::var_os("CUOBJDUMP").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "CUOBJDUMP={} is not a file (unset it to use the cuobjdump that \
             `bash scripts/install-cuda-toolchain.sh` installs next to nvcc)",
            path.display()
        );
        return path;
    }
    let exe = format!("cuobjdump{}", std::env::consts::EXE_SUFFIX);
    let beside_nvcc = std::env::var_os("NVCC")
        .and_then(|nvcc| PathBuf::from(nvcc).parent().map(Path::to_path_buf));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    beside_nvcc
        .into_iter()
        .chain(tools::tool_dirs(root))
        .chain([PathBuf::from("/usr/local/cuda/bin")])
        .map(|dir| dir.join(&exe))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "cuobjdump not found (CUOBJDUMP, beside NVCC, CUDA_HOME/bin, CUDA_PATH/bin, \
                 PATH, {}, /usr/local/cuda/bin): install it next to nvcc with `bash \
                 scripts/install-cuda-toolchain.sh` (the nvidia-cuda-cuobjdump and \
                 nvidia-cuda-nvdisasm wheels) or set CUOBJDUMP",
                root.join(".toolchain/cuda").display()
            )
        })
}

/// Each function of a cubin and the opcodes of its instructions, in order, with their
/// modifiers and without predicates or operands (`@!P0 HMMA.16816.F32.BF16 R4, …` is
/// `HMMA.16816.F32.BF16`): [`count`] matches the mnemonic, [`count_form`] a modified form.
type Sass = BTreeMap<String, Vec<String>>;

/// Parses `cuobjdump -sass`, whose functions read
/// ```text
///         Function : fused_linear_mma_large_bf16
///         /*0000*/                   LDC R1, c[0x0][0x28] ;     /* 0x00000a00ff017b82 */
///                                                               /* 0x000fe40000000f00 */
/// ```
fn parse(listing: &str) -> Sass {
    let mut functions: Vec<(String, Vec<String>)> = Vec::new();
    for line in listing.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("Function : ") {
            functions.push((name.trim().to_owned(), Vec::new()));
            continue;
        }
        // An instruction starts with its address, /*0a30*/; encoding lines with /* 0x…
        let Some((address, rest)) = line.strip_prefix("/*").and_then(|l| l.split_once("*/")) else {
            continue;
        };
        if address.is_empty() || !address.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let mut words = rest.split_whitespace().skip_while(|w| w.starts_with('@'));
        let (Some((_, instructions)), Some(word)) = (functions.last_mut(), words.next()) else {
            continue;
        };
        instructions.push(word.trim_end_matches(';').to_owned());
    }
    functions.into_iter().collect()
}

/// The modules whose kernels this file checks, and so disassembles.
const MODULES: [Module; 5] = [
    Module::DeltaLinear,
    Module::DeltaLinearBackward,
    Module::PrefixAttentionBackward,
    Module::Optim,
    Module::Dora,
];

/// The disassembly of `module`'s cubin for `image`, computed once per pair.
fn disassembly(module: Module, image: Image) -> &'static Sass {
    static CACHE: [OnceLock<Sass>; MODULES.len() * IMAGES.len()] =
        [const { OnceLock::new() }; MODULES.len() * IMAGES.len()];
    let m = MODULES
        .iter()
        .position(|&x| x == module)
        .expect("a module listed in MODULES");
    let i = IMAGES
        .iter()
        .position(|&x| x == image)
        .expect("an embedded cubin");
    CACHE[m * IMAGES.len() + i].get_or_init(|| {
        let stem = module.stem();
        let bytes = cubin(module, image).unwrap_or_else(|| panic!("the {stem} cubin"));
        // The system's temporary folder, not cargo's: the test binary also runs on GPU
        // machines without the repository (scripts/build-gpu-bundle.sh).
        let name = format!("peft-kernels-{stem}.{image:?}.{}.cubin", std::process::id());
        let file = std::env::temp_dir().join(name);
        std::fs::write(&file, bytes).expect("writing the cubin");
        let tool = cuobjdump();
        let out = Command::new(&tool).arg("-sass").arg(&file).output();
        let _ = std::fs::remove_file(&file);
        let out = out.unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()));
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} -sass failed ({}): {}",
            tool.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let sass = parse(&listing);
        // Every kernel of the module is in the listing, with its instructions: a parser
        // that finds nothing would pass every check below.
        for kernel in KernelId::ALL.iter().filter(|k| k.module() == module) {
            let found = sass.get(kernel.name()).map_or(0, Vec::len);
            assert!(
                found > 0,
                "{image:?}: no instructions of {} in the disassembly",
                kernel.name()
            );
        }
        sass
    })
}

/// How many instructions have the mnemonic (`HMMA` counts `HMMA.16816.F32.BF16`).
fn count(instructions: &[String], mnemonic: &str) -> usize {
    count_form(instructions, mnemonic)
}

/// How many instructions have `form`, a mnemonic with leading modifiers: `LDSM.16.MT88`
/// (ldmatrix .trans) counts `LDSM.16.MT88.4` and not `LDSM.16.M88.4`.
fn count_form(instructions: &[String], form: &str) -> usize {
    instructions
        .iter()
        .filter(|i| {
            i.strip_prefix(form)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
        .count()
}

#[test]
fn tensor_core_kernels_issue_hmma_and_the_others_do_not() {
    for image in IMAGES {
        for (name, instructions) in disassembly(Module::DeltaLinear, image) {
            let hmma = count(instructions, "HMMA");
            if is_wgmma_kernel(name) {
                // wgmma: HGMMA from swizzled tiles cp.async fills, no mma.sync, no ldmatrix;
                // on sm_80 the kernel is a trap (the host never launches it there).
                let hgmma = count(instructions, "HGMMA");
                assert_eq!(hmma, 0, "{image:?} {name}: HMMA in the wgmma kernel");
                match image {
                    Image::Sm90 => {
                        assert!(hgmma > 0, "{image:?} {name}: no HGMMA");
                        assert!(
                            count(instructions, "LDGSTS") > 0,
                            "{image:?} {name}: no LDGSTS"
                        );
                    }
                    _ => assert_eq!(hgmma, 0, "{image:?} {name}: HGMMA"),
                }
            } else if is_tensor_core_kernel(name) {
                assert!(hmma > 0, "{image:?} {name}: no HMMA");
                for fed_by in ["LDSM", "LDGSTS"] {
                    assert!(
                        count(instructions, fed_by) > 0,
                        "{image:?} {name}: no {fed_by}"
                    );
                }
            } else {
                assert_eq!(hmma, 0, "{image:?} {name}: HMMA in a SIMT kernel");
            }
        }
    }
}

#[test]
fn tensor_core_kernels_use_no_local_memory() {
    for image in IMAGES {
        let sass = disassembly(Module::DeltaLinear, image);
        let hot: Vec<_> = sass
            .iter()
            .filter(|(name, _)| is_tensor_core_kernel(name))
            .collect();
        assert!(
            hot.len() >= 4,
            "{image:?}: only {} tensor-core kernels",
            hot.len()
        );
        for (name, instructions) in hot {
            for local in ["STL", "LDL"] {
                let n = count(instructions, local);
                assert_eq!(n, 0, "{image:?} {name}: {n} {local} (local memory)");
            }
        }
    }
}

/// The up-projection passes are programmatic dependent launches on sm_90 (src/cuda/mod.rs
/// launches them so from the sm_90 cubin and the compute_90 PTX, never the sm_80 cubin;
/// the PTX's side is src/cuda/modules.rs's test): every fused-linear kernel there waits for
/// the previous grid (griddepcontrol.wait, SASS ACQBULK) and lets the next one start
/// (griddepcontrol.launch_dependents, PREEXIT); the sm_80 code has neither.
#[test]
fn fused_linear_kernels_take_part_in_dependent_launches_on_sm_90_only() {
    for image in IMAGES {
        let fused = disassembly(Module::DeltaLinear, image)
            .iter()
            .filter(|(name, _)| name.starts_with("fused_linear_"));
        let mut kernels = 0;
        for (name, instructions) in fused {
            kernels += 1;
            for mnemonic in ["ACQBULK", "PREEXIT"] {
                let n = count(instructions, mnemonic);
                match image {
                    Image::Sm90 => assert!(n > 0, "{image:?} {name}: no {mnemonic}"),
                    _ => assert_eq!(n, 0, "{image:?} {name}: {n} {mnemonic}"),
                }
            }
        }
        assert!(
            kernels >= 9,
            "{image:?}: only {kernels} fused_linear kernels"
        );
    }
}

#[test]
fn the_parser_reads_predicates_and_modifiers() {
    let listing = "\tcode for sm_90\n\t\tFunction : k\n\
        \t.headerflags\t@\"EF_CUDA_SM90\"\n\
        /*0000*/  LDC R1, c[0x0][0x28] ;  /* 0x00000a00ff017b82 */\n\
        \t\t\t\t/* 0x000fe40000000f00 */\n\
        /*0010*/  @!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;  /* 0x0000000c0804723c */\n\
        /*0020*/  EXIT ;\n\
        \t\tFunction : other\n\
        /*0000*/  STL.64 [R1], R2 ;\n";
    let sass = parse(listing);
    assert_eq!(sass["k"], ["LDC", "HMMA.16816.F32.BF16", "EXIT"]);
    assert_eq!(sass["other"], ["STL.64"]);
    assert_eq!(count(&sass["k"], "HMMA"), 1);
    assert_eq!(count(&sass["k"], "HMM"), 0);
    assert_eq!(count_form(&sass["k"], "HMMA.16816"), 1);
    assert_eq!(count_form(&sass["k"], "HMMA.1688"), 0);
    assert_eq!(count(&sass["other"], "STL"), 1);
}

/// The backward's data pass on tensor cores (dx = [dy | dT]·[W ; W_down]): mma.sync fed by
/// ldmatrix, plain for the row-major A tiles and .trans for the untransposed W and W_down
/// tiles, loaded by cp.async; its weight-gradient passes on tensor cores (dW = Aᵀ·Q, both
/// factors token-major): mma.sync fed by ldmatrix .trans only (the transposed A and the
/// untransposed Q), the plain operands loaded by cp.async, and no local memory; every other
/// kernel of the module (the dz, SIMT, naive, reduction and dgate passes) on the SIMT pipes.
#[test]
fn backward_mma_kernels_issue_hmma_fed_by_ldsm_and_the_others_do_not() {
    for image in IMAGES {
        let (mut data, mut weight) = (0, 0);
        for (name, instructions) in disassembly(Module::DeltaLinearBackward, image) {
            let hmma = count(instructions, "HMMA");
            if name.starts_with("delta_bwd_data_mma_") {
                data += 1;
                assert!(hmma > 0, "{image:?} {name}: no HMMA");
                for fed_by in ["LDSM.16.M88", "LDSM.16.MT88", "LDGSTS"] {
                    assert!(
                        count_form(instructions, fed_by) > 0,
                        "{image:?} {name}: no {fed_by}"
                    );
                }
            } else if name.starts_with("delta_bwd_weight_mma_") {
                weight += 1;
                assert!(hmma > 0, "{image:?} {name}: no HMMA");
                for fed_by in ["LDSM.16.MT88", "LDGSTS"] {
                    assert!(
                        count_form(instructions, fed_by) > 0,
                        "{image:?} {name}: no {fed_by}"
                    );
                }
                // Both operands through .trans: no plain (row-major) ldmatrix at all.
                let plain = count_form(instructions, "LDSM.16.M88");
                assert_eq!(plain, 0, "{image:?} {name}: {plain} untransposed LDSM");
                for local in ["STL", "LDL"] {
                    let n = count(instructions, local);
                    assert_eq!(n, 0, "{image:?} {name}: {n} {local} (local memory)");
                }
            } else {
                assert_eq!(hmma, 0, "{image:?} {name}: HMMA in a SIMT kernel");
            }
        }
        assert!(
            data >= 2,
            "{image:?}: only {data} delta_bwd_data_mma kernels"
        );
        assert!(
            weight >= 2,
            "{image:?}: only {weight} delta_bwd_weight_mma kernels"
        );
    }
}

/// No kernel of the training modules touches local memory: neither a register spill nor
/// a stack array (the optimizer's parameter table and the attention backward's per-thread
/// rows must stay in registers or shared memory).
#[test]
fn training_kernels_use_no_local_memory() {
    for module in MODULES.into_iter().filter(|&m| m != Module::DeltaLinear) {
        for image in IMAGES {
            let sass = disassembly(module, image);
            assert!(!sass.is_empty(), "{image:?}: no kernels in {module:?}");
            for (name, instructions) in sass {
                for local in ["STL", "LDL"] {
                    let n = count(instructions, local);
                    assert_eq!(n, 0, "{image:?} {name}: {n} {local} (local memory)");
                }
            }
        }
    }
}
