//! The emulator's profile mode (kernels/emu/profile.cpp): per launch, the memory traffic
//! and tensor-core work of the real kernels, counted on the same instrumented access path
//! as the checks ([`super::Checks`]), so every access the checks see is counted.
//!
//! Opt in per call with [`profile`] (the launches of the closure run the checked copy of
//! the kernels on one OS thread and their profiles are returned), or for the whole process
//! with `PEFT_KERNELS_EMU_PROFILE=exact|sampled`, which prints every launch's profile to
//! stderr. Off, launches run the plain copy and pay nothing.
//!
//! What is counted (see profile.cpp for the rules):
//! - per global operand (a buffer of the launch, named as the plan names it) and direction:
//!   warp-level requests, the bytes they asked for and the 32-byte sectors they touched
//!   ([`Traffic::coalescing`]); the distinct sectors of the launch (the compulsory DRAM
//!   traffic, [`Traffic::dram_bytes`]) and the sectors each block touched, summed
//!   ([`Traffic::reread_sectors`]: served by L2 when it holds them);
//! - shared memory: wavefronts of every warp-level load and store against the ideal
//!   (bank conflicts), ldmatrix per 8-row phase;
//! - mma.sync and wgmma instructions and their FLOPs; barriers; blocks and threads.
//!
//! [`Sampling::Sampled`] runs the first two and last two blocks of each grid dimension (all
//! of a dimension of at most 4) and every run of a split reduction (split-K, split-KV) that
//! the plan folds into a grid dimension ([`crate::plan::KernelParams::profile_runs`]), and
//! scales; [`LaunchProfile::sampled`]
//! and its display say so. A launch whose sampled blocks of one class do different work
//! (data-dependent), or whose operand footprints overlap partly between neighbouring blocks,
//! is refused with [`Error::Emulator`] naming the reason. A sampled launch does not compute
//! its outputs.

use std::cell::{Cell, RefCell};
use std::fmt;

use super::CheckBuffer;
use crate::plan::Launch;
use crate::{Error, Result};

/// Which blocks a profiled launch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    /// Every block: exact counts, and the outputs are computed.
    Exact,
    /// Per grid dimension of n > 4 blocks: blocks 0, 1, n − 2 and n − 1 (weights 1,
    /// (n − 2)/2, (n − 2)/2, 1), the edges and two of the interior; every run of a split
    /// reduction folded into a grid dimension (each its own class: runs differ in length and
    /// phase); the counts are scaled to the whole grid. The outputs are not computed.
    Sampled,
}

/// One direction (loads or stores) of one global operand.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    /// Warp-level requests (one instruction executed by the lanes of a warp).
    pub requests: f64,
    /// Bytes the lanes asked for, summed over the requests.
    pub bytes: f64,
    /// 32-byte sectors each request touched, summed over the requests.
    pub sectors: f64,
    /// Distinct sectors of the operand the launch touched (estimated under sampling).
    pub distinct_sectors: f64,
    /// Sectors each block touched, summed over the blocks.
    pub block_sectors: f64,
}

impl Traffic {
    /// Bytes requested per byte of the sectors fetched: 1.0 fully coalesced (and 1.0 when
    /// there were no requests).
    pub fn coalescing(&self) -> f64 {
        if self.sectors == 0.0 {
            1.0
        } else {
            self.bytes / (32.0 * self.sectors)
        }
    }

    /// The compulsory DRAM traffic: every distinct sector once.
    pub fn dram_bytes(&self) -> f64 {
        32.0 * self.distinct_sectors
    }

    /// Sectors a block touched that another block had touched (L2 traffic beyond the
    /// compulsory).
    pub fn reread_sectors(&self) -> f64 {
        self.block_sectors - self.distinct_sectors
    }
}

/// A global operand of a launch.
#[derive(Clone, Debug, PartialEq)]
pub struct OperandProfile {
    /// The buffer's name in the plan (`w`, `x`, `y`, …).
    pub name: &'static str,
    /// The buffer's size.
    pub size: usize,
    pub loads: Traffic,
    pub stores: Traffic,
}

/// Shared-memory accesses of one direction (ldmatrix apart).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SharedTraffic {
    /// Warp-level requests.
    pub requests: f64,
    /// Wavefronts (passes over the 32 banks) they took.
    pub wavefronts: f64,
    /// Wavefronts they would take without bank conflicts.
    pub ideal: f64,
}

impl SharedTraffic {
    /// Extra wavefronts from bank conflicts.
    pub fn conflicts(&self) -> f64 {
        self.wavefronts - self.ideal
    }
}

/// The profile of one launch.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchProfile {
    pub kernel: &'static str,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_smem: u32,
    /// Whether the counts are scaled from a sample of the blocks ([`Sampling::Sampled`]).
    pub sampled: bool,
    /// Runs of a split reduction (split-K, split-KV) folded into a grid dimension
    /// ([`crate::plan::KernelParams::profile_runs`]), every one of which a sampled tile
    /// runs; 1 without.
    pub runs: u32,
    pub blocks: f64,
    /// Blocks that ran (all of them unless sampled).
    pub blocks_run: f64,
    pub threads: f64,
    /// Block barriers completed (`__syncthreads`), summed over blocks.
    pub barriers: f64,
    /// mma.sync instructions (per warp) and their FLOPs.
    pub mma: f64,
    pub mma_flops: f64,
    /// wgmma instructions (per warpgroup) and their FLOPs.
    pub wgmma: f64,
    pub wgmma_flops: f64,
    pub shared_loads: SharedTraffic,
    pub shared_stores: SharedTraffic,
    /// ldmatrix instructions, their 8-row phases and the wavefronts those took (equal to
    /// the phases when conflict-free).
    pub ldmatrix: f64,
    pub ldmatrix_phases: f64,
    pub ldmatrix_wavefronts: f64,
    /// Bytes of global accesses outside every named buffer (0 for a plan's launch).
    pub outside_bytes: f64,
    pub operands: Vec<OperandProfile>,
}

impl LaunchProfile {
    /// The operand named `name`, if the launch has one.
    pub fn operand(&self, name: &str) -> Option<&OperandProfile> {
        self.operands.iter().find(|o| o.name == name)
    }

    /// Compulsory DRAM traffic of the launch: every operand's distinct sectors, loads and
    /// stores.
    pub fn dram_bytes(&self) -> f64 {
        self.operands
            .iter()
            .map(|o| o.loads.dram_bytes() + o.stores.dram_bytes())
            .sum()
    }

    /// Tensor-core FLOPs (mma.sync and wgmma).
    pub fn tensor_flops(&self) -> f64 {
        self.mma_flops + self.wgmma_flops
    }
}

impl fmt::Display for LaunchProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [gx, gy, gz] = self.grid;
        let [bx, by, bz] = self.block;
        writeln!(
            f,
            "profile of `{}`: grid ({gx},{gy},{gz}), block ({bx},{by},{bz}), {} B dynamic \
             shared; {}",
            self.kernel,
            self.dynamic_smem,
            if self.sampled {
                format!(
                    "SAMPLED: {} of {} blocks ran (the first two and last two per grid \
                     dimension{}), counts scaled",
                    self.blocks_run,
                    self.blocks,
                    match self.runs {
                        1 => String::new(),
                        r => format!(", and every one of the {r} runs of the split"),
                    }
                )
            } else {
                format!("exact: all {} blocks", self.blocks)
            }
        )?;
        writeln!(
            f,
            "  {:<10} {:>5} {:>12} {:>14} {:>9} {:>14} {:>14}",
            "operand", "dir", "requests", "bytes", "coalesced", "DRAM bytes", "reread sectors"
        )?;
        for o in &self.operands {
            for (dir, t) in [("load", &o.loads), ("store", &o.stores)] {
                if t.requests == 0.0 {
                    continue;
                }
                writeln!(
                    f,
                    "  {:<10} {:>5} {:>12.0} {:>14.0} {:>8.1}% {:>14.0} {:>14.0}",
                    o.name,
                    dir,
                    t.requests,
                    t.bytes,
                    100.0 * t.coalescing(),
                    t.dram_bytes(),
                    t.reread_sectors()
                )?;
            }
        }
        writeln!(
            f,
            "  shared: loads {:.0} requests, {:.0} wavefronts (ideal {:.0}); stores {:.0} \
             requests, {:.0} wavefronts (ideal {:.0}); ldmatrix {:.0} ({:.0} phases, {:.0} \
             wavefronts)",
            self.shared_loads.requests,
            self.shared_loads.wavefronts,
            self.shared_loads.ideal,
            self.shared_stores.requests,
            self.shared_stores.wavefronts,
            self.shared_stores.ideal,
            self.ldmatrix,
            self.ldmatrix_phases,
            self.ldmatrix_wavefronts
        )?;
        write!(
            f,
            "  mma.sync {:.0} ({:.3e} FLOP), wgmma {:.0} ({:.3e} FLOP), barriers {:.0}, \
             threads {:.0}",
            self.mma, self.mma_flops, self.wgmma, self.wgmma_flops, self.barriers, self.threads
        )
    }
}

thread_local! {
    /// The sampling of the profile this thread collects ([`profile`]), if any.
    static SAMPLING: Cell<Option<Sampling>> = const { Cell::new(None) };
    static COLLECTED: RefCell<Vec<LaunchProfile>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with every launch of the calling thread profiled, and returns its result with
/// the profiles of its launches, in order. Fails with [`Error::Emulator`] when this build
/// has no checked copy of the kernels ([`super::checks_available`]) or a sampled launch
/// cannot be represented by its sample.
pub fn profile<R>(
    sampling: Sampling,
    f: impl FnOnce() -> Result<R>,
) -> Result<(R, Vec<LaunchProfile>)> {
    struct Restore(Option<Sampling>, Vec<LaunchProfile>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SAMPLING.with(|s| s.set(self.0));
            COLLECTED.with(|c| std::mem::swap(&mut *c.borrow_mut(), &mut self.1));
        }
    }
    let mut restore = Restore(SAMPLING.with(|s| s.replace(Some(sampling))), Vec::new());
    COLLECTED.with(|c| std::mem::swap(&mut *c.borrow_mut(), &mut restore.1));
    let r = f()?;
    let profiles = COLLECTED.with(|c| std::mem::take(&mut *c.borrow_mut()));
    Ok((r, profiles))
}

/// The sampling of the calling thread's next launch, if it is profiled: [`profile`]'s,
/// else `PEFT_KERNELS_EMU_PROFILE`'s (`exact` or `sampled`; the profile is then printed).
pub(super) fn sampling() -> Result<Option<(Sampling, bool)>> {
    if let Some(s) = SAMPLING.with(|s| s.get()) {
        return Ok(Some((s, false)));
    }
    static ENV: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    match ENV
        .get_or_init(|| std::env::var("PEFT_KERNELS_EMU_PROFILE").ok())
        .as_deref()
    {
        None | Some("") | Some("none") => Ok(None),
        Some("exact") => Ok(Some((Sampling::Exact, true))),
        Some("sampled") => Ok(Some((Sampling::Sampled, true))),
        Some(v) => Err(Error::invalid(
            "PEFT_KERNELS_EMU_PROFILE",
            "exact, sampled or none",
            v,
        )),
    }
}

/// The check bits of a profiled launch (kernels/emu/check.cpp).
pub(super) fn bits(sampling: Sampling) -> u32 {
    match sampling {
        Sampling::Exact => 8,
        Sampling::Sampled => 8 | 16,
    }
}

/// kernels/emu/check.h's `ProfileRecord`.
#[repr(C)]
#[derive(Default)]
struct Record {
    blocks: f64,
    blocks_run: f64,
    threads: f64,
    barriers: f64,
    mma: f64,
    mma_flops: f64,
    wgmma: f64,
    wgmma_flops: f64,
    shared_requests: [f64; 2],
    shared_wavefronts: [f64; 2],
    shared_ideal: [f64; 2],
    ldmatrix: f64,
    ldmatrix_phases: f64,
    ldmatrix_wavefronts: f64,
    outside_bytes: f64,
    sampled: u32,
    _refused: u32,
    _operands: u32,
    _pad: u32,
}

/// kernels/emu/check.h's `ProfileOperand`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Operand {
    requests: [f64; 2],
    bytes: [f64; 2],
    sectors: [f64; 2],
    distinct: [f64; 2],
    block_sectors: [f64; 2],
}

unsafe extern "C" {
    fn emu_profile_last(record: *mut Record, ops: *mut Operand, cap: usize) -> i32;
}

/// Collects the profile of the launch that just ran on this thread (`buffers` as named to
/// it); prints it when `print`.
pub(super) fn collect(launch: &Launch, runs: u32, buffers: &[CheckBuffer], print: bool) {
    let mut rec = Record::default();
    let mut ops = vec![Operand::default(); buffers.len()];
    // SAFETY: writes one record and at most `ops.len()` operands.
    if unsafe { emu_profile_last(&mut rec, ops.as_mut_ptr(), ops.len()) } == 0 {
        return;
    }
    let traffic = |o: &Operand, k: usize| Traffic {
        requests: o.requests[k],
        bytes: o.bytes[k],
        sectors: o.sectors[k],
        distinct_sectors: o.distinct[k],
        block_sectors: o.block_sectors[k],
    };
    let shared = |k: usize| SharedTraffic {
        requests: rec.shared_requests[k],
        wavefronts: rec.shared_wavefronts[k],
        ideal: rec.shared_ideal[k],
    };
    let p = LaunchProfile {
        kernel: launch.kernel.name(),
        grid: launch.grid,
        block: launch.block,
        dynamic_smem: launch.dynamic_smem,
        sampled: rec.sampled != 0,
        runs,
        blocks: rec.blocks,
        blocks_run: rec.blocks_run,
        threads: rec.threads,
        barriers: rec.barriers,
        mma: rec.mma,
        mma_flops: rec.mma_flops,
        wgmma: rec.wgmma,
        wgmma_flops: rec.wgmma_flops,
        shared_loads: shared(0),
        shared_stores: shared(1),
        ldmatrix: rec.ldmatrix,
        ldmatrix_phases: rec.ldmatrix_phases,
        ldmatrix_wavefronts: rec.ldmatrix_wavefronts,
        outside_bytes: rec.outside_bytes,
        operands: buffers
            .iter()
            .zip(&ops)
            .map(|(b, o)| OperandProfile {
                name: b.name,
                size: b.bytes,
                loads: traffic(o, 0),
                stores: traffic(o, 1),
            })
            .collect(),
    };
    if print {
        eprintln!("{p}");
    }
    if SAMPLING.with(|s| s.get()).is_some() {
        COLLECTED.with(|c| c.borrow_mut().push(p));
    }
}
