//! The embedded kernel images and the per-context cache of loaded modules and functions.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use crate::kernels::{KernelId, Module};
use crate::{Error, Result};

/// What nvcc built from one `kernels/<stem>.cu` (build/cuda.rs).
pub(crate) struct ModuleImages {
    pub(crate) stem: &'static str,
    /// For compute_80: JIT-compiled by the driver for GPUs without a cubin here.
    pub(crate) ptx: &'static str,
    pub(crate) sm_80: &'static [u8],
    pub(crate) sm_90: &'static [u8],
}

// Defines `NVCC_VERSION` and `MODULE_IMAGES`, one entry per kernels/*.cu in file order.
include!(concat!(env!("OUT_DIR"), "/cuda_modules.rs"));

/// Which of a module's embedded images a device loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    /// The sm_80 cubin: compute capability 8.x (A100, RTX 30xx/40xx, L4, L40).
    Sm80,
    /// The sm_90 cubin, built for sm_90a (wgmma): compute capability 9.0 only (H100, H200,
    /// GH200).
    Sm90,
    /// The compute_80 PTX, compiled by the driver: GPUs newer than 9.0.
    Ptx,
}

impl Image {
    /// The image for a device of compute capability `(major, minor)` (the sm_80 cubin runs on
    /// every 8.y; the sm_90a one on 9.0 alone, so a later 9.y would JIT the PTX); None below
    /// 8.0, which these kernels do not support (they use bf16 tensor cores and cp.async).
    pub fn for_compute_capability((major, minor): (i32, i32)) -> Option<Image> {
        match (major, minor) {
            (..=7, _) => None,
            (8, _) => Some(Image::Sm80),
            (9, 0) => Some(Image::Sm90),
            _ => Some(Image::Ptx),
        }
    }
}

/// Modules and functions loaded so far, keyed by the context's `CUcontext` handle. The
/// cached modules hold their context alive, so a handle in the keys is never reused by
/// another context; loaded modules stay for the life of the process, like a cuBLAS handle.
#[derive(Default)]
struct Cache {
    modules: HashMap<(usize, Module), (Arc<CudaModule>, Image)>,
    functions: HashMap<(usize, KernelId), (CudaFunction, Image)>,
}

static CACHE: LazyLock<RwLock<Cache>> = LazyLock::new(Default::default);

/// The kernel's function in `ctx`, loading its module on first use, and the image it came
/// from.
pub(crate) fn function(ctx: &Arc<CudaContext>, kernel: KernelId) -> Result<(CudaFunction, Image)> {
    let handle = ctx.cu_ctx() as usize;
    let cached = CACHE.read().unwrap_or_else(PoisonError::into_inner);
    if let Some(f) = cached.functions.get(&(handle, kernel)) {
        return Ok(f.clone());
    }
    drop(cached);

    let mut cache = CACHE.write().unwrap_or_else(PoisonError::into_inner);
    let (module, image) = match cache.modules.entry((handle, kernel.module())) {
        Entry::Occupied(e) => e.get().clone(),
        Entry::Vacant(e) => e.insert(load(ctx, kernel.module())?).clone(),
    };
    let f = module
        .load_function(kernel.name())
        .map_err(|e| Error::Cuda(format!("kernel `{}` not found: {e}", kernel.name())))?;
    cache.functions.insert((handle, kernel), (f.clone(), image));
    Ok((f, image))
}

/// The cubin nvcc built from `kernels/<module>.cu` for `image`'s architecture (None for
/// [`Image::Ptx`]), for tools that read the machine code, such as `cuobjdump -sass`.
pub fn cubin(module: Module, image: Image) -> Option<&'static [u8]> {
    let images = images(module).ok()?;
    match image {
        Image::Sm80 => Some(images.sm_80),
        Image::Sm90 => Some(images.sm_90),
        Image::Ptx => None,
    }
}

/// The images nvcc built for `module`.
fn images(module: Module) -> Result<&'static ModuleImages> {
    MODULE_IMAGES
        .iter()
        .find(|m| m.stem == module.stem())
        .ok_or_else(|| Error::Cuda(format!("kernels/{}.cu was not built", module.stem())))
}

/// The image the kernels load from in `ctx`: the cubin for its device's compute
/// capability, or the PTX (newer GPUs, or any with `PEFT_KERNELS_FORCE_PTX` set, which JITs
/// the PTX on a GPU that has a cubin, to check the PTX). Unsupported below 8.0.
pub fn image(ctx: &CudaContext) -> Result<Image> {
    image_for(ctx.compute_capability()?)
}

/// [`image`] for a device of compute capability `(major, minor)`.
fn image_for((major, minor): (i32, i32)) -> Result<Image> {
    let image = Image::for_compute_capability((major, minor)).ok_or_else(|| {
        Error::Unsupported(format!(
            "compute capability {major}.{minor}: the kernels need 8.0 or newer"
        ))
    })?;
    Ok(match std::env::var_os("PEFT_KERNELS_FORCE_PTX") {
        Some(_) => Image::Ptx,
        None => image,
    })
}

fn load(ctx: &Arc<CudaContext>, module: Module) -> Result<(Arc<CudaModule>, Image)> {
    let images = images(module)?;
    let (major, minor) = ctx.compute_capability()?;
    let image = image_for((major, minor))?;
    let ptx = match image {
        Image::Sm80 => Ptx::from_binary(images.sm_80.to_vec()),
        Image::Sm90 => Ptx::from_binary(images.sm_90.to_vec()),
        Image::Ptx => Ptx::from_src(images.ptx),
    };
    let loaded = ctx.load_module(ptx).map_err(|e| {
        Error::Cuda(format!(
            "loading kernels/{}.cu ({image:?} built by nvcc {NVCC_VERSION}) on a device of \
             compute capability {major}.{minor}: {e}",
            module.stem()
        ))
    })?;
    Ok((loaded, image))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded images are exactly the modules of the kernel table, and every kernel
    /// of the table is an entry of its module's PTX and a symbol of both cubins.
    #[test]
    fn every_kernel_is_embedded() {
        let stems: Vec<&str> = MODULE_IMAGES.iter().map(|m| m.stem).collect();
        let modules: Vec<&str> = Module::ALL.iter().map(|m| m.stem()).collect();
        for stem in &modules {
            assert!(stems.contains(stem), "kernels/{stem}.cu was not built");
        }
        for module in Module::ALL {
            let images = images(*module).unwrap();
            assert!(
                images.ptx.contains(".target sm_80"),
                "{}: not compute_80 PTX",
                images.stem
            );
            for cubin in [images.sm_80, images.sm_90] {
                assert_eq!(&cubin[..4], b"\x7fELF", "{}: not a cubin", images.stem);
            }
            for kernel in KernelId::ALL.iter().filter(|k| k.module() == *module) {
                let name = kernel.name();
                let entry = format!(".entry {name}(");
                assert!(
                    images.ptx.contains(&entry),
                    "{name} is not an entry of the PTX"
                );
                // A symbol is a NUL-delimited string of the cubin's string table.
                let symbol = [&[0u8][..], name.as_bytes(), &[0]].concat();
                for cubin in [images.sm_80, images.sm_90] {
                    let found = cubin.windows(symbol.len()).any(|w| w == symbol);
                    assert!(found, "{name} is not in the {} cubins", images.stem);
                }
            }
        }
    }

    #[test]
    fn image_by_compute_capability() {
        assert_eq!(Image::for_compute_capability((7, 5)), None);
        assert_eq!(Image::for_compute_capability((8, 0)), Some(Image::Sm80));
        assert_eq!(Image::for_compute_capability((8, 9)), Some(Image::Sm80));
        assert_eq!(Image::for_compute_capability((9, 0)), Some(Image::Sm90));
        assert_eq!(Image::for_compute_capability((9, 1)), Some(Image::Ptx));
        assert_eq!(Image::for_compute_capability((10, 0)), Some(Image::Ptx));
        assert_eq!(Image::for_compute_capability((12, 0)), Some(Image::Ptx));
    }
}
