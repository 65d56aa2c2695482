//! The embedded kernel images and the per-context cache of loaded modules and functions.

use std::collections::hash_map::{Entry, HashMap};
use std::ffi::{c_void, CString};
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

use cudarc::driver::{result, sys, CudaContext};

use crate::kernels::{KernelId, Module};
use crate::{Error, Result};

/// What nvcc built from one `kernels/<stem>.cu` (build/cuda.rs).
pub(crate) struct ModuleImages {
    pub(crate) stem: &'static str,
    /// For compute_90: JIT-compiled by the driver for GPUs newer than the cubins.
    pub(crate) ptx: &'static str,
    pub(crate) sm_80: &'static [u8],
    pub(crate) sm_90: &'static [u8],
    /// ptxas's `-v` report of each cubin (registers, shared memory per kernel).
    pub(crate) sm_80_ptxas: &'static str,
    pub(crate) sm_90_ptxas: &'static str,
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
    /// The compute_90 PTX, compiled by the driver: GPUs newer than 9.0 (Blackwell and on),
    /// with the dependent launch but not wgmma (an sm_90a instruction).
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

/// A kernel's function handle in one context. Loaded straight through the driver
/// (cuModuleLoadData / cuModuleGetFunction) rather than cudarc's `load_module`, which needs
/// cudarc's `nvrtc` feature and so, under `dynamic-linking`, libnvrtc at run time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Function(sys::CUfunction);

impl Function {
    pub(crate) fn handle(self) -> sys::CUfunction {
        self.0
    }
}

// SAFETY: a CUfunction is a driver handle, usable from any thread whose current context is
// the one it was loaded in (launches bind the stream's context first).
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

/// A module loaded into a context, with the context kept alive: loaded modules stay for the
/// life of the process, like a cuBLAS handle, so a context handle among the cache's keys is
/// never reused by another context.
struct Loaded {
    module: sys::CUmodule,
    image: Image,
    _ctx: Arc<CudaContext>,
}

// SAFETY: as for `Function`; the module is only read (cuModuleGetFunction) once loaded.
unsafe impl Send for Loaded {}
unsafe impl Sync for Loaded {}

/// Modules and functions loaded so far, keyed by the context's `CUcontext` handle.
#[derive(Default)]
struct Cache {
    modules: HashMap<(usize, Module), Loaded>,
    functions: HashMap<(usize, KernelId), (Function, Image)>,
}

static CACHE: LazyLock<RwLock<Cache>> = LazyLock::new(Default::default);

/// The kernel's function in `ctx`, loading its module on first use, and the image it came
/// from.
pub(crate) fn function(ctx: &Arc<CudaContext>, kernel: KernelId) -> Result<(Function, Image)> {
    let handle = ctx.cu_ctx() as usize;
    let cached = CACHE.read().unwrap_or_else(PoisonError::into_inner);
    if let Some(f) = cached.functions.get(&(handle, kernel)) {
        return Ok(*f);
    }
    drop(cached);

    let mut cache = CACHE.write().unwrap_or_else(PoisonError::into_inner);
    let loaded = match cache.modules.entry((handle, kernel.module())) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(load(ctx, kernel.module())?),
    };
    let not_found = |e| Error::Cuda(format!("kernel `{}` not found: {e}", kernel.name()));
    let name = CString::new(kernel.name()).expect("kernel names have no NUL");
    ctx.bind_to_thread().map_err(not_found)?;
    // SAFETY: the module is loaded in `ctx`, now current; the name is a C string.
    let f = unsafe { result::module::get_function(loaded.module, name) }.map_err(not_found)?;
    let f = (Function(f), loaded.image);
    cache.functions.insert((handle, kernel), f);
    Ok(f)
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

/// ptxas's registers and static shared memory of `kernel` in its sm_80 or sm_90 cubin (for
/// the occupancy of [`crate::model`]); `None` for the PTX image.
pub fn resources(kernel: KernelId, image: Image) -> Option<crate::model::Resources> {
    let images = images(kernel.module()).ok()?;
    let report = match image {
        Image::Sm80 => images.sm_80_ptxas,
        Image::Sm90 => images.sm_90_ptxas,
        Image::Ptx => return None,
    };
    crate::model::parse_ptxas(report)
        .into_iter()
        .find(|(name, _)| name == kernel.name())
        .map(|(_, r)| r)
}

/// The images nvcc built for `module`.
fn images(module: Module) -> Result<&'static ModuleImages> {
    MODULE_IMAGES
        .iter()
        .find(|m| m.stem == module.stem())
        .ok_or_else(|| Error::Cuda(format!("kernels/{}.cu was not built", module.stem())))
}

/// The image the kernels load from in `ctx`: the cubin for its device's compute
/// capability, or the PTX (newer GPUs, or a 9.0 one with `PEFT_KERNELS_FORCE_PTX` set, which
/// JITs the PTX on a GPU that has a cubin, to check the PTX). Unsupported below 8.0, and
/// forcing the PTX is unsupported below 9.0 (it is compute_90 PTX).
pub fn image(ctx: &CudaContext) -> Result<Image> {
    let force_ptx = std::env::var_os("PEFT_KERNELS_FORCE_PTX").is_some();
    image_for(ctx.compute_capability()?, force_ptx)
}

/// [`image`] for a device of compute capability `(major, minor)`.
fn image_for((major, minor): (i32, i32), force_ptx: bool) -> Result<Image> {
    let image = Image::for_compute_capability((major, minor)).ok_or_else(|| {
        Error::Unsupported(format!(
            "compute capability {major}.{minor}: the kernels need 8.0 or newer"
        ))
    })?;
    match (force_ptx, image) {
        (false, image) => Ok(image),
        (true, Image::Sm80) => Err(Error::Unsupported(format!(
            "PEFT_KERNELS_FORCE_PTX on compute capability {major}.{minor}: the embedded PTX is \
             compute_90, which needs 9.0 or newer"
        ))),
        (true, _) => Ok(Image::Ptx),
    }
}

fn load(ctx: &Arc<CudaContext>, module: Module) -> Result<Loaded> {
    let images = images(module)?;
    let (major, minor) = ctx.compute_capability()?;
    let image = image(ctx)?;
    // cuModuleLoadData takes a cubin, or PTX text ending in a NUL.
    let ptx;
    let data: *const c_void = match image {
        Image::Sm80 => images.sm_80.as_ptr().cast(),
        Image::Sm90 => images.sm_90.as_ptr().cast(),
        Image::Ptx => {
            ptx = CString::new(images.ptx).expect("PTX text has no NUL");
            ptx.as_ptr().cast()
        }
    };
    let failed = |e| {
        Error::Cuda(format!(
            "loading kernels/{}.cu ({image:?} built by nvcc {NVCC_VERSION}) on a device of \
             compute capability {major}.{minor}: {e}",
            module.stem()
        ))
    };
    ctx.bind_to_thread().map_err(failed)?;
    // SAFETY: `data` is a whole cubin or NUL-terminated PTX that outlives the call (the
    // driver copies what it keeps); `ctx` is current.
    let loaded = unsafe { result::module::load_data(data) }.map_err(failed)?;
    Ok(Loaded {
        module: loaded,
        image,
        _ctx: ctx.clone(),
    })
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
                images.ptx.contains(".target sm_90\n"),
                "{}: not compute_90 PTX",
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

    /// GPUs newer than 9.0 get the dependent launch from the PTX: src/cuda/mod.rs launches
    /// its fused-linear kernels overlapping, so every one must hold the wait (and the early
    /// start of the next grid).
    #[test]
    fn ptx_fused_linear_kernels_wait_for_the_previous_grid() {
        let ptx = images(Module::DeltaLinear).unwrap().ptx;
        let mut kernels = 0;
        for entry in ptx.split(".entry ").skip(1) {
            if !entry.starts_with("fused_linear_") {
                continue;
            }
            kernels += 1;
            let name = &entry[..entry.find('(').unwrap()];
            for instruction in ["griddepcontrol.wait", "griddepcontrol.launch_dependents"] {
                assert!(entry.contains(instruction), "{name}: no {instruction}");
            }
        }
        assert!(
            kernels >= 9,
            "only {kernels} fused_linear kernels in the PTX"
        );
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
        assert_eq!(image_for((9, 0), true).unwrap(), Image::Ptx);
        assert_eq!(image_for((10, 0), true).unwrap(), Image::Ptx);
        let err = image_for((8, 6), true).unwrap_err().to_string();
        assert!(err.contains("compute_90") && err.contains("8.6"), "{err}");
        assert!(image_for((7, 5), false).is_err());
    }
}
