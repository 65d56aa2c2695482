//! Where the CUDA tools are looked for: shared by the build script (nvcc, build/cuda.rs) and
//! tests/sass.rs (cuobjdump), which includes this file with `#[path]`.

use std::path::{Path, PathBuf};

/// The folders a CUDA tool is looked for in, in order: `CUDA_HOME`/bin, `CUDA_PATH`/bin, each
/// folder of `PATH`, then the repository's own toolchain under `root` (scripts/
/// install-cuda-toolchain.sh: .toolchain/cuda/lib/python3.*/site-packages/nvidia/cu13/bin).
pub fn tool_dirs(root: &Path) -> Vec<PathBuf> {
    let homes = ["CUDA_HOME", "CUDA_PATH"]
        .into_iter()
        .filter_map(std::env::var_os)
        .map(|home| PathBuf::from(home).join("bin"));
    let path = std::env::var_os("PATH");
    let on_path = path.iter().flat_map(std::env::split_paths);
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(root.join(".toolchain/cuda/lib"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("python3."))
        })
        .map(|p| p.join("site-packages/nvidia/cu13/bin"))
        .collect();
    pythons.sort();
    homes.chain(on_path).chain(pythons).collect()
}
