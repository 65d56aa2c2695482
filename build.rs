//! One build script for both backends, its modules in build/ (see DESIGN.md, "The toolchain"):
//! - feature `emulator`: kernels/emu/*.cpp and every kernels/*.cu, compiled as C++ with the
//!   emulation header forced in, into one static library (build/emulator.rs);
//! - feature `cuda`: every kernels/*.cu through nvcc into PTX (compute_90) and cubins
//!   (sm_80, sm_90), embedded in the crate (build/cuda.rs);
//! - `PEFT_KERNELS_BUILD_CACHE=<folder>`: both keep each compiler run's output there and reuse
//!   it in the crate's builds under other features and profiles (build/cache.rs).
//!
//! Without `cuda` it never looks for nvcc.

#[path = "build/cache.rs"]
mod cache;
#[path = "build/cuda.rs"]
mod cuda;
#[path = "build/emulator.rs"]
mod emulator;
#[path = "build/parallel.rs"]
mod parallel;
#[path = "build/tools.rs"]
mod tools;

use std::path::{Path, PathBuf};

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let kernels = root.join("kernels");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=build");
    println!("cargo::rerun-if-changed=kernels");
    let selftest = std::env::var_os("CARGO_FEATURE_SELFTEST").is_some();
    let sources = cu_sources(&kernels, selftest);
    let cache = cache::Cache::from_env(&root);
    if std::env::var_os("CARGO_FEATURE_EMULATOR").is_some() {
        emulator::build(&kernels, &sources, &cache);
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda::build(&root, &kernels, &sources, &cache);
    }
}

/// Every `kernels/*.cu`, sorted, so both backends see the same modules; the self-test
/// modules (`selftest*.cu`) only with the `selftest` feature (the crate's own tests), so
/// they are not built into users' binaries.
fn cu_sources(kernels: &Path, selftest: bool) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(kernels)
        .expect("kernels/ is missing")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .filter(|p| {
            selftest
                || !p
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("selftest")
        })
        .collect();
    v.sort();
    v
}
