//! The emulator backend: the kernels' own .cu sources compiled as C++20 by the host
//! compiler, with kernels/emu/emu.h forced in (it defines `__global__`, `__shared__`,
//! threadIdx, the warp primitives, `__half` …), plus the runtime in kernels/emu/*.cpp.

use std::path::{Path, PathBuf};

pub fn build(kernels: &Path, sources: &[PathBuf]) {
    // The fibers' context switch is x86-64 System V assembly with ELF directives, and the
    // runtime uses Linux's mmap flags and signals.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if arch != "x86_64" || os != "linux" {
        println!(
            "cargo::error=the `emulator` feature runs on x86-64 Linux only (target: {arch} \
             {os}); build with `--no-default-features --features cuda` elsewhere."
        );
        return;
    }
    let emu = kernels.join("emu");
    let mut runtime: Vec<PathBuf> = std::fs::read_dir(&emu)
        .expect("kernels/emu is missing")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cpp"))
        .collect();
    runtime.sort();

    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++20")
        // Tests run the emulator a lot: always optimise it, whatever the cargo profile.
        .opt_level(2)
        .debug(false)
        .warnings(true)
        .flag("-ftls-model=initial-exec")
        .flag("-fno-strict-aliasing")
        // `#pragma unroll` is nvcc's; g++ would warn about every one.
        .flag("-Wno-unknown-pragmas")
        // Each emulated thread runs on a 64 KiB stack above one guard page: probing every
        // page of a large frame makes an overflow hit the guard page rather than jump
        // over it into a neighbouring stack.
        .flag_if_supported("-fstack-clash-protection")
        .include(kernels)
        .define("PK_EMULATOR", "1");
    for f in &runtime {
        b.file(f);
    }
    // The .cu sources: compiled as C++ with the emulation header included first.
    for f in sources {
        b.file(f);
    }
    b.flag("-include").flag(emu.join("emu.h").to_str().unwrap());
    // `-x c++` must precede the .cu files; cc passes flags before files.
    b.flag("-x").flag("c++");
    // cc also links the C++ standard library (`cargo:rustc-link-lib=stdc++`).
    b.compile("peft_kernels_emu");
}
