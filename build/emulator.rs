//! The emulator backend: the kernels' own .cu sources compiled as C++20 by the host
//! compiler, with kernels/emu/emu.h forced in (it defines `__global__`, `__shared__`,
//! threadIdx, the warp primitives, `__half` …), plus the runtime in kernels/emu/*.cpp.
//!
//! The .cu sources are compiled twice into the one library:
//! - plainly, for ordinary launches (`emu_launch_<kernel>`);
//! - instrumented (the checked copy, `pkc_emu_launch_<kernel>`), for launches with the
//!   emulator's checks on (memcheck, racecheck, initcheck: kernels/emu/check.cpp). g++'s
//!   `-fsanitize=kernel-address` with an outline call threshold of 0 makes every load and
//!   store of the kernel code call `__asan_{load,store}{1,2,4,8,16,N}_noabort`, which
//!   check.cpp implements (kasan mode links no sanitizer runtime); stack and global
//!   redzones are off, so the code and data layout are the plain build's. Every symbol the
//!   checked objects define is renamed with the prefix `pkc_` (objcopy), so that the two
//!   copies of each inline function, template instantiation and `__shared__` array stay
//!   apart at link time and a plain launch never runs instrumented code.
//!
//! `PEFT_KERNELS_EMU_SANITIZE=1` at build time instead builds the runtime and the plain copy
//! with `-fsanitize=address,undefined` (see README, "Sanitizers"); the checked copy is then
//! left out (kernel-address and address cannot be combined) and the checks are unavailable.
//!
//! Each file is compiled on its own (over the build's threads, build/parallel.rs), so that
//! `PEFT_KERNELS_BUILD_CACHE` (build/cache.rs) can keep its object; the objects are then
//! archived into the one library.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::Cache;
use crate::parallel::run_parallel;

pub fn build(kernels: &Path, sources: &[PathBuf], cache: &Cache) {
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
    println!("cargo::rerun-if-env-changed=PEFT_KERNELS_EMU_SANITIZE");
    println!("cargo::rustc-check-cfg=cfg(pk_emu_checked)");
    let sanitize = std::env::var_os("PEFT_KERNELS_EMU_SANITIZE").is_some_and(|v| v != "0");
    let emu = kernels.join("emu");
    let mut runtime: Vec<PathBuf> = std::fs::read_dir(&emu)
        .expect("kernels/emu is missing")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cpp"))
        .collect();
    runtime.sort();

    let mut plain = base(kernels);
    if sanitize {
        plain
            .flag("-fsanitize=address,undefined")
            .flag("-fno-sanitize-recover=undefined")
            .flag("-fno-omit-frame-pointer");
        // The Rust test binaries are not instrumented: the sanitizer runtimes come from the
        // shared libraries (run with LD_PRELOAD=libasan.so, see README).
        println!("cargo::rustc-link-lib=dylib=asan");
        println!("cargo::rustc-link-lib=dylib=ubsan");
    } else {
        println!("cargo::rustc-cfg=pk_emu_checked");
    }
    // The runtime and the .cu sources, compiled as C++ with the emulation header included
    // first; then the checked copy of the .cu sources.
    let mut units: Vec<(&Path, bool)> = runtime.iter().map(|f| (f.as_path(), false)).collect();
    units.extend(sources.iter().map(|f| (f.as_path(), false)));
    if !sanitize {
        units.extend(sources.iter().map(|f| (f.as_path(), true)));
    }
    let checked = checked_build(kernels);
    let objects = run_parallel(&units, |&(file, is_checked)| {
        object(
            if is_checked { &checked } else { &plain },
            file,
            is_checked,
            cache,
        )
    });
    let mut lib = cc::Build::new();
    lib.cpp(true);
    for obj in objects {
        lib.object(obj);
    }
    // cc also links the C++ standard library (`cargo:rustc-link-lib=stdc++`).
    lib.compile("peft_kernels_emu");
}

/// The object of `file` compiled by `build` (the checked copy's with its symbols renamed),
/// from the cache when it holds it.
fn object(build: &cc::Build, file: &Path, checked: bool, cache: &Cache) -> PathBuf {
    let name = file.file_name().unwrap().to_string_lossy();
    let dir = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join(if checked {
        "checked"
    } else {
        "plain"
    });
    std::fs::create_dir_all(&dir).unwrap();
    let dst = dir.join(format!("{name}.o"));
    // The compiler, its version and every flag cc gives it (CXXFLAGS included).
    let compiler = build.get_compiler();
    let version = run(Command::new(compiler.path()).arg("--version"));
    let args: Vec<String> = compiler
        .args()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let path = compiler.path().to_string_lossy();
    let entry = cache.entry(&["g++", &path, &version, &args.join(" "), &name]);
    if entry.as_ref().is_some_and(|e| e.fetch(&[&dst])) {
        return dst;
    }
    let mut b = build.clone();
    b.out_dir(dir.join(format!("{name}.cc"))).file(file);
    let obj = b.compile_intermediates().remove(0);
    if checked {
        rename_symbols(&obj, &dst);
    } else {
        std::fs::rename(&obj, &dst).unwrap();
    }
    if let Some(entry) = entry {
        entry.store(&[&dst]);
    }
    dst
}

/// The flags every emulator object is built with.
fn base(kernels: &Path) -> cc::Build {
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
        .define("PK_EMULATOR", "1")
        // `-include emu.h -x c++`: flags go before the file, so `-x c++` covers a .cu file.
        .flag("-include")
        .flag(kernels.join("emu/emu.h").to_str().unwrap())
        .flag("-x")
        .flag("c++");
    b
}

/// The checked copy of the kernels (see the module comment): instrumented; `object` then
/// renames every symbol an object defines.
fn checked_build(kernels: &Path) -> cc::Build {
    let mut c = base(kernels);
    c.define("PK_EMU_CHECKED", "1")
        .flag("-fsanitize=kernel-address")
        .flag("--param=asan-instrumentation-with-call-threshold=0")
        .flag("--param=asan-stack=0")
        .flag("--param=asan-globals=0")
        // Every access is reported, none elided as "known in bounds" of a global.
        .flag("--param=asan-instrument-reads=1")
        .flag("--param=asan-instrument-writes=1");
    c
}

/// Copies `obj` to `dst` with every symbol it defines renamed `pkc_<name>`.
fn rename_symbols(obj: &Path, dst: &Path) {
    let listing = run(Command::new(tool("NM", "nm"))
        .args(["-P", "--defined-only", "--extern-only"])
        .arg(obj));
    let map: String = listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|sym| format!("{sym} pkc_{sym}\n"))
        .collect();
    let map_file = dst.with_extension("syms");
    std::fs::write(&map_file, map).unwrap();
    run(Command::new(tool("OBJCOPY", "objcopy"))
        .arg(format!("--redefine-syms={}", map_file.display()))
        .arg(obj)
        .arg(dst));
}

fn tool(var: &str, default: &str) -> String {
    println!("cargo::rerun-if-env-changed={var}");
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (binutils' nm and objcopy are needed)"));
    if !out.status.success() {
        panic!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8(out.stdout).unwrap()
}
