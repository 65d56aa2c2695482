//! The CUDA backend's build step (see DESIGN.md, "The toolchain"): every kernels/*.cu
//! through nvcc into PTX for compute_90 (JIT-compiled by the driver on GPUs newer than
//! the cubins) and cubins for sm_80 and sm_90, embedded into the crate by the generated
//! OUT_DIR/cuda_modules.rs. ptxas's resource report (`-Xptxas -v`) is kept beside each
//! cubin as `<stem>.<arch>.ptxas.txt`; a kernel that spills registers fails the build.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{Cache, Entry};
use crate::parallel::run_parallel;
use crate::tools::tool_dirs;

/// Flags of every nvcc run. Deliberately no `--use_fast_math`: kernels keep IEEE division,
/// square roots and denormals, as the emulator and the f64 reference do.
const NVCC_FLAGS: &[&str] = &["-std=c++17", "-O3", "-lineinfo"];

/// The virtual architecture of the embedded PTX, which only GPUs newer than the cubins JIT
/// (every 8.y runs the sm_80 cubin): compute_90, not 80, so that they get the dependent
/// launch (griddepcontrol, PTX for sm_90 and up). wgmma is sm_90a-only and not in it.
const PTX_ARCH: &str = "compute_90";

/// The real architectures that get a cubin (and a ptxas report).
const CUBIN_ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// nvcc's name for a cubin architecture: sm_90 is built as sm_90a, whose arch-specific
/// instructions (wgmma, kernels/arch.cuh) exist on compute capability 9.0 only, the only one
/// src/cuda/modules.rs loads the sm_90 cubin on.
fn nvcc_arch(arch: &str) -> String {
    match arch {
        "sm_90" => "sm_90a".to_owned(),
        other => other.to_owned(),
    }
}

pub fn build(root: &Path, kernels: &Path, sources: &[PathBuf], cache: &Cache) {
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let Some(nvcc) = find_nvcc(root) else {
        println!(
            "cargo::error=the `cuda` feature needs nvcc (CUDA 13.0) and none was found through \
             NVCC, CUDA_HOME, CUDA_PATH, PATH or {}: install it with `bash {}` or set NVCC to \
             the nvcc executable.",
            toolchain_dir(root).display(),
            root.join("scripts/install-cuda-toolchain.sh").display()
        );
        return;
    };
    let version = match nvcc_version(&nvcc) {
        Ok(v) => v,
        Err(e) => {
            println!("cargo::error=cannot run nvcc at {}: {e}", nvcc.display());
            return;
        }
    };

    let jobs: Vec<Job> = sources
        .iter()
        .flat_map(|src| {
            let stem = src.file_stem().unwrap().to_str().unwrap().to_owned();
            let ptx = Job::new(&stem, src, None, &out);
            let cubins = CUBIN_ARCHS.map(|arch| Job::new(&stem, src, Some(arch), &out));
            std::iter::once(ptx).chain(cubins)
        })
        .collect();
    let results = run_parallel(&jobs, |job| {
        let flags = NVCC_FLAGS.join(" ");
        let target = job.arch.unwrap_or(PTX_ARCH);
        let entry = cache.entry(&["nvcc", &version, &flags, target, &job.stem]);
        job.run(&nvcc, kernels, entry.as_ref())
    });

    // cargo shows a build script's output line by line (`cargo::error=` lines even when
    // the script fails), so nvcc's log goes out a line at a time, each line once: the
    // three compilations of a file repeat the front end's messages.
    let mut seen = BTreeSet::new();
    for (job, result) in jobs.iter().zip(&results) {
        let arch = job.arch.unwrap_or(PTX_ARCH);
        let (log, level) = match result {
            Ok(log) => (log, "warning"),
            Err(log) => {
                let what = format!("nvcc failed on kernels/{}.cu ({arch}):", job.stem);
                println!("cargo::error={what}");
                (log, "error")
            }
        };
        let file = format!("kernels/{}.cu", job.stem);
        for line in log.lines() {
            // nvcc names the file by its absolute path: shorten it.
            let line = line
                .trim()
                .replace(&format!("{}/", kernels.display()), "kernels/");
            let shown = level == "error" || is_warning(&line);
            if shown && !line.is_empty() && seen.insert(line.clone()) {
                if line.contains(&file) {
                    println!("cargo::{level}={line}");
                } else {
                    println!("cargo::{level}={file}: {line}");
                }
            }
        }
    }
    if results.iter().any(Result::is_err) {
        return;
    }

    let mut errors = Vec::new();
    for (job, log) in jobs.iter().zip(&results) {
        let (Some(arch), Ok(log)) = (job.arch, log) else {
            continue;
        };
        // ptxas's advisory that it had to wait after each wgmma (C7510–C7515: "wgmma.mma_async
        // instructions are serialized"): the warpgroup MMA then runs at a fraction of its rate.
        for line in log
            .lines()
            .filter(|l| l.contains("wgmma.mma_async instructions are serialized"))
        {
            errors.push(format!(
                "kernels/{}.cu ({arch}): {}; a serialized wgmma is a performance bug",
                job.stem,
                line.trim()
            ));
        }
        for f in parse_ptxas(log) {
            let summary = format!(
                "{} ({arch}, kernels/{}.cu): {} registers, {} bytes stack frame, \
                 {} bytes spill stores, {} bytes spill loads",
                f.name, job.stem, f.registers, f.stack, f.spill_stores, f.spill_loads
            );
            if f.spill_stores > 0 || f.spill_loads > 0 {
                let report = out.join(format!("{}.{arch}.ptxas.txt", job.stem));
                errors.push(format!(
                    "register spill in {summary}; a spill is a performance bug (ptxas's \
                     report: {})",
                    report.display()
                ));
            } else if f.stack > 0 {
                // Local memory without a spill: an array ptxas could not keep in
                // registers (dynamically indexed). Slow, but sometimes intended.
                println!("cargo::warning=local memory in {summary}");
            }
        }
    }
    if !errors.is_empty() {
        for e in errors {
            println!("cargo::error={e}");
        }
        return;
    }

    write_module_table(&out, sources, &version);
}

/// The repository's own toolchain, installed by scripts/install-cuda-toolchain.sh.
fn toolchain_dir(root: &Path) -> PathBuf {
    root.join(".toolchain").join("cuda")
}

/// nvcc by `NVCC`, then in [`tool_dirs`] (`CUDA_HOME`/`CUDA_PATH`, `PATH`, the repository's
/// own toolchain folder). An explicit `NVCC` is taken as given (a wrong one fails loudly later).
fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Some(nvcc) = std::env::var_os("NVCC").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(nvcc));
    }
    let exe = format!("nvcc{}", std::env::consts::EXE_SUFFIX);
    tool_dirs(root)
        .into_iter()
        .map(|d| d.join(&exe))
        .find(|p| p.is_file())
}

/// `13.0.88` from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88").
fn nvcc_version(nvcc: &Path) -> Result<String, String> {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("`nvcc --version` failed: {text}"));
    }
    text.lines()
        .find_map(|l| l.split(", V").nth(1))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| format!("unexpected `nvcc --version` output: {text}"))
}

/// One nvcc run: the PTX of a file (`arch` None) or its cubin for one architecture.
struct Job {
    stem: String,
    source: PathBuf,
    arch: Option<&'static str>,
    output: PathBuf,
}

impl Job {
    fn new(stem: &str, source: &Path, arch: Option<&'static str>, out: &Path) -> Job {
        let output = match arch {
            None => out.join(format!("{stem}.ptx")),
            Some(arch) => out.join(format!("{stem}.{arch}.cubin")),
        };
        Job {
            stem: stem.to_owned(),
            source: source.to_owned(),
            arch,
            output,
        }
    }

    /// Where the run's log goes: for a cubin ptxas's report (`-Xptxas -v`), embedded in the
    /// crate; for the PTX nvcc's messages, kept so that a cached run can repeat them.
    fn log_file(&self) -> PathBuf {
        let name = match self.arch {
            Some(arch) => format!("{}.{arch}.ptxas.txt", self.stem),
            None => format!("{}.ptx.log", self.stem),
        };
        self.output.with_file_name(name)
    }

    /// Runs nvcc, or copies a cached run's output and log (`entry`, build/cache.rs); the
    /// log is Ok when it succeeded, Err when it failed. Only successful runs are cached.
    fn run(&self, nvcc: &Path, kernels: &Path, entry: Option<&Entry>) -> Result<String, String> {
        let log_file = self.log_file();
        let files = [self.output.as_path(), log_file.as_path()];
        if let Some(entry) = entry {
            if entry.fetch(&files) {
                return std::fs::read_to_string(&log_file).map_err(|e| e.to_string());
            }
        }
        let mut cmd = Command::new(nvcc);
        cmd.args(NVCC_FLAGS).arg("-I").arg(kernels);
        match self.arch {
            None => cmd.arg("-ptx").arg(format!("-arch={PTX_ARCH}")),
            Some(arch) => cmd
                .arg("-cubin")
                .arg(format!("-arch={}", nvcc_arch(arch)))
                .args(["-Xptxas", "-v"]),
        };
        cmd.arg("-o").arg(&self.output).arg(&self.source);
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        std::fs::write(&log_file, &log).map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(log);
        }
        if let Some(entry) = entry {
            entry.store(&files);
        }
        Ok(log)
    }
}

/// A warning of cudafe++ (`file(6): warning #177-D: …`), nvcc, ptxas (`ptxas warning : …`)
/// or the host compiler (`warning: …`).
fn is_warning(line: &str) -> bool {
    ["warning #", "warning :", "warning:"]
        .iter()
        .any(|w| line.contains(w))
}

/// One function's line of ptxas's `-v` report.
#[derive(Default)]
struct FunctionReport {
    name: String,
    registers: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

/// Parses ptxas's `-v` report, in which each function reads
/// ```text
/// ptxas info    : Function properties for NAME
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 40 registers, used 1 barriers, 392 bytes cmem[0]
/// ```
fn parse_ptxas(log: &str) -> Vec<FunctionReport> {
    let mut functions: Vec<FunctionReport> = Vec::new();
    for line in log.lines() {
        if let Some(name) = line.split("Function properties for ").nth(1) {
            functions.push(FunctionReport {
                name: name.trim().to_owned(),
                ..Default::default()
            });
            continue;
        }
        let Some(f) = functions.last_mut() else {
            continue;
        };
        let number_before = |what: &str| -> Option<u32> {
            let head = &line[..line.find(what)?];
            head.split([' ', ',', ':'])
                .rfind(|w| !w.is_empty())?
                .parse()
                .ok()
        };
        if let Some(n) = number_before(" bytes stack frame") {
            f.stack = n;
            f.spill_stores = number_before(" bytes spill stores").unwrap_or(0);
            f.spill_loads = number_before(" bytes spill loads").unwrap_or(0);
        } else if let Some(n) = number_before(" registers") {
            f.registers = n;
        }
    }
    functions
}

/// OUT_DIR/cuda_modules.rs: one `ModuleImages` (src/cuda/modules.rs) per kernels/*.cu, its
/// fields the PTX, one cubin per architecture of `CUBIN_ARCHS` and its ptxas report.
fn write_module_table(out: &Path, sources: &[PathBuf], version: &str) {
    let file = |name: String| format!("{:?}", out.join(name).to_str().unwrap());
    let mut rs = String::from("// Generated by build/cuda.rs from kernels/*.cu.\n");
    writeln!(rs, "pub(crate) const NVCC_VERSION: &str = {version:?};").unwrap();
    rs.push_str("pub(crate) static MODULE_IMAGES: &[ModuleImages] = &[\n");
    for src in sources {
        let stem = src.file_stem().unwrap().to_str().unwrap();
        writeln!(rs, "    ModuleImages {{\n        stem: {stem:?},").unwrap();
        let ptx = file(format!("{stem}.ptx"));
        writeln!(rs, "        ptx: include_str!({ptx}),").unwrap();
        for arch in CUBIN_ARCHS {
            let cubin = file(format!("{stem}.{arch}.cubin"));
            writeln!(rs, "        {arch}: include_bytes!({cubin}),").unwrap();
        }
        for arch in CUBIN_ARCHS {
            let report = file(format!("{stem}.{arch}.ptxas.txt"));
            writeln!(rs, "        {arch}_ptxas: include_str!({report}),").unwrap();
        }
        rs.push_str("    },\n");
    }
    rs.push_str("];\n");
    std::fs::write(out.join("cuda_modules.rs"), rs).unwrap();
}
