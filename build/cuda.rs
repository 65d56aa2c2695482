//! The CUDA backend's build step (see DESIGN.md): nvcc → PTX + cubins, embedded.

use std::path::{Path, PathBuf};

pub fn build(_root: &Path, _kernels: &Path, _sources: &[PathBuf]) {
    todo!("nvcc build")
}
