//! The kernel id table: every kernel the crate launches, by its exported `extern "C"`
//! name, and the module (the `kernels/<module>.cu` file) that holds it. The CUDA backend
//! loads a module on the first launch of any of its kernels; the emulator backend calls
//! the kernel's `emu_launch_<name>` entry, stamped by the same instantiation macro.

/// One `kernels/*.cu` file: a PTX/cubin module on the GPU, an object in the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    /// Backend self-checks (`kernels/selftest.cu`): tiled SGEMM, warp reductions, an
    /// ldmatrix + mma GEMM, and deliberately broken kernels the emulator must catch.
    Selftest,
}

impl Module {
    /// Every module, in build order.
    pub const ALL: &'static [Module] = &[Module::Selftest];

    /// The file stem under `kernels/` (and of the embedded PTX and cubins).
    pub const fn stem(self) -> &'static str {
        match self {
            Module::Selftest => "selftest",
        }
    }
}

macro_rules! kernel_table {
    ($($module:ident { $($name:ident),* $(,)? })*) => {
        /// A kernel of this crate; the variant is the exported symbol's name.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum KernelId { $($($name,)*)* }

        impl KernelId {
            /// Every kernel.
            pub const ALL: &'static [KernelId] = &[$($(KernelId::$name,)*)*];

            /// The exported symbol (`extern "C"`), identical on both backends.
            pub const fn name(self) -> &'static str {
                match self { $($(KernelId::$name => stringify!($name),)*)* }
            }

            /// The module that holds the kernel.
            pub const fn module(self) -> Module {
                match self { $($(KernelId::$name => Module::$module,)*)* }
            }
        }

        #[cfg(feature = "emulator")]
        pub(crate) mod emu_entry {
            use super::KernelId;

            /// `emu_launch_<name>`: mirrors cuLaunchKernel (see kernels/emu/emu.h).
            pub(crate) type Entry = unsafe extern "C" fn(
                grid: crate::emulator::Dim3,
                block: crate::emulator::Dim3,
                dynamic_smem: u32,
                args: *mut *mut std::ffi::c_void,
            ) -> i32;

            mod sym {
                unsafe extern "C" {
                    $($(
                        #[link_name = concat!("emu_launch_", stringify!($name))]
                        pub(super) fn $name(
                            grid: crate::emulator::Dim3,
                            block: crate::emulator::Dim3,
                            dynamic_smem: u32,
                            args: *mut *mut std::ffi::c_void,
                        ) -> i32;
                    )*)*
                }
            }

            /// The emulator entry of a kernel.
            pub(crate) fn entry(id: KernelId) -> Entry {
                match id { $($(KernelId::$name => sym::$name as Entry,)*)* }
            }
        }
    };
}

kernel_table! {
    Selftest {
        selftest_sgemm_tiled_f32,
    }
}
