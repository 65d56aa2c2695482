//! Test utilities shared by the integration tests: a seeded random generator whose seed
//! is printed (and reproducible through `PEFT_SEED`), random and poisoned buffers.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use peft_kernels::Element;
use std::time::{SystemTime, UNIX_EPOCH};

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for test data.
pub struct Rng {
    seed: u64,
    state: u64,
}

impl Rng {
    /// A generator seeded from `PEFT_SEED` if set, else from the clock. The seed goes to
    /// stderr, which the test harness shows when the test fails; rerun with
    /// `PEFT_SEED=<seed>` to reproduce.
    pub fn from_env() -> Rng {
        let seed = match std::env::var("PEFT_SEED") {
            Ok(s) => s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("PEFT_SEED must be an unsigned integer, got {s:?}")),
            Err(_) => {
                let t = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("clock before 1970");
                // Mix in the thread id so tests started in the same nanosecond differ.
                let thread = format!("{:?}", std::thread::current().id());
                t.as_nanos() as u64
                    ^ thread
                        .bytes()
                        .fold(0u64, |h, b| h.rotate_left(8) ^ u64::from(b))
            }
        };
        let test = std::thread::current().name().unwrap_or("?").to_string();
        eprintln!("{test}: PEFT_SEED={seed}");
        Rng::with_seed(seed)
    }

    /// A generator with a fixed seed.
    pub fn with_seed(seed: u64) -> Rng {
        Rng { seed, state: seed }
    }

    /// The seed, for failure messages.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit(); // (0, 1]: ln is finite
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform integer in [lo, hi] (inclusive).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        assert!(lo <= hi);
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// One of `items`, uniformly.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.range(0, items.len() - 1)]
    }

    /// `n` values uniform in [-1, 1), rounded to `T`.
    pub fn uniform_vec<T: Element>(&mut self, n: usize) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64(self.uniform(-1.0, 1.0)))
            .collect()
    }

    /// `n` normal values of standard deviation `std`, rounded to `T`.
    pub fn normal_vec<T: Element>(&mut self, n: usize, std: f64) -> Vec<T> {
        (0..n).map(|_| T::from_f64(std * self.normal())).collect()
    }

    /// `n` values uniform in [-1, 1) in f64.
    pub fn uniform_f64(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform(-1.0, 1.0)).collect()
    }
}

/// A buffer of `n` NaNs: an output nothing has written yet fails every comparison.
pub fn poisoned<T: Element>(n: usize) -> Vec<T> {
    vec![T::nan(); n]
}

/// How many random configurations a test draws: `PEFT_RANDOM_CASES` if set (a longer search,
/// or a shorter run), else `default`.
pub fn random_cases(default: usize) -> usize {
    std::env::var("PEFT_RANDOM_CASES").map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("PEFT_RANDOM_CASES must be a count, got {v:?}"))
    })
}

/// A copy of a buffer in storage of its own, placed to start 16-byte aligned or one element
/// past a 16-byte boundary (never 16-byte aligned whatever the element type, as a slice into
/// a `Vec<T>` may start): for checking that an operation accepts any alignment.
pub struct Placed<T> {
    buf: Vec<T>,
    at: usize,
    len: usize,
}

impl<T: bytemuck::Pod + Default> Placed<T> {
    /// A copy of `v` starting one element past a 16-byte boundary.
    pub fn misaligned(v: &[T]) -> Placed<T> {
        Placed::new(v, true)
    }

    /// A copy of `v` starting one element past a 16-byte boundary when `misaligned`, else
    /// on one.
    pub fn new(v: &[T], misaligned: bool) -> Placed<T> {
        let size = std::mem::size_of::<T>();
        let offset = if misaligned { size } else { 0 };
        let mut buf = vec![T::default(); v.len() + 16];
        // The element whose address is `offset` past a multiple of 16 (a Vec's storage is
        // aligned to the element size, which divides 16).
        let base = buf.as_ptr() as usize % 16;
        let at = (16 + offset - base) % 16 / size;
        buf[at..at + v.len()].copy_from_slice(v);
        let p = Placed {
            buf,
            at,
            len: v.len(),
        };
        assert_eq!(p.get().as_ptr() as usize % 16, offset, "placement");
        p
    }

    pub fn get(&self) -> &[T] {
        &self.buf[self.at..self.at + self.len]
    }

    pub fn get_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.at..self.at + self.len]
    }

    /// Copies the (possibly written) elements back into `dst`.
    pub fn copy_to(&self, dst: &mut [T]) {
        dst.copy_from_slice(self.get());
    }
}

/// `on_every_backend!(a, b, …)`: each test body `fn a(backend: &Backend)` of the calling file,
/// once per backend: `on_emulator::a` always, `on_gpu::a` (ignored without a device) with
/// `cuda`. Files that include this module with `#[macro_use]` use it.
#[allow(unused_macros)]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        #[cfg(feature = "emulator")]
        mod on_emulator {
            $(#[test]
            fn $name() {
                super::$name(&peft_kernels::host::Backend::Emulator)
            })*
        }
        #[cfg(feature = "cuda")]
        mod on_gpu {
            $(#[test]
            #[ignore = "needs a CUDA device"]
            fn $name() {
                let gpu = peft_kernels::host::Backend::cuda(0)
                    .expect("GPU tests need a CUDA device");
                super::$name(&gpu)
            })*
        }
    };
}

/// Whether `backend` runs Hopper's wgmma kernel: the emulator always, a GPU when it loads
/// the sm_90 cubin (compute capability 9.0, without PEFT_KERNELS_FORCE_PTX).
pub fn runs_wgmma(backend: &peft_kernels::host::Backend) -> bool {
    match backend {
        #[cfg(feature = "emulator")]
        peft_kernels::host::Backend::Emulator => true,
        #[cfg(feature = "cuda")]
        peft_kernels::host::Backend::Cuda(stream) => {
            let image = peft_kernels::cuda::image(stream.context()).expect("the kernels' image");
            image == peft_kernels::cuda::Image::Sm90
        }
    }
}
