//! The emulator backend: kernels/*.cu compiled as C++ and run on the CPU.

/// Grid or block dimensions, as the emulator's C ABI takes them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}
