//! The crate's one error type. Every problem with an argument (shape, stride, dtype,
//! alignment, size) is an [`Error::InvalidArgument`] that names the argument, what was
//! expected and what was given; nothing in the safe API panics on bad input.

use std::fmt;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument has the wrong shape, stride, length, dtype or alignment, or a size the
    /// kernels are not built for (a head dim outside `prefix_attention::HEAD_DIMS` is
    /// `dims.head_dim`, the expected value listing the supported ones).
    #[error("{}invalid argument `{arg}`: expected {expected}, got {got}", operation(.op))]
    InvalidArgument {
        /// The operation whose argument it is (`delta_linear`, `prefix_attention`, …), so
        /// that an error passed up through `?` still says which call failed; empty for a
        /// check outside the operations.
        op: &'static str,
        /// The argument's name as it appears in the API.
        arg: &'static str,
        /// What the call needs.
        expected: String,
        /// What it was given.
        got: String,
    },
    /// A well-formed request that no kernel of this crate or this device can run, for
    /// example f32 operands on the tensor-core kernels, Hopper's wgmma kernel elsewhere
    /// than on a 9.0 GPU, more shared memory than the device gives a block, a GPU below
    /// compute capability 8.0.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The CPU emulator refused or aborted a launch: a barrier not every thread reached, a
    /// warp operation whose mask is not the set of active lanes, a launch over the device
    /// limits, a deadlock.
    #[error("emulator, kernel `{kernel}`: {message}")]
    Emulator {
        /// The kernel's exported name.
        kernel: &'static str,
        /// What the emulator saw.
        message: String,
    },
    /// A checkpoint file (feature `peft`) is malformed or disagrees with itself: bad JSON, a
    /// field of the wrong type, a missing, extra or misshapen tensor, a dtype the kernels do
    /// not take. What a well-formed checkpoint asks for that the crate cannot express is
    /// [`Error::Unsupported`], naming the file and the field.
    #[error("checkpoint {}: `{item}`: {message}", .path.display())]
    Checkpoint {
        /// The file.
        path: std::path::PathBuf,
        /// The field or tensor (or the file itself when it cannot be read or parsed).
        item: String,
        /// What is wrong, with the expected and the found value.
        message: String,
    },
    /// The CUDA driver reported an error.
    #[error("CUDA driver: {0}")]
    Cuda(String),
    /// The `cuda` backend was asked for, but no driver or device is present.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`] (of no operation yet: the planning entry
    /// points attribute their errors to their operation).
    pub fn invalid(arg: &'static str, expected: impl fmt::Display, got: impl fmt::Display) -> Self {
        Error::InvalidArgument {
            op: "",
            arg,
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// The error with its invalid argument attributed to operation `op` (other errors, and
    /// an argument already attributed, unchanged).
    pub(crate) fn of(self, op: &'static str) -> Self {
        match self {
            Error::InvalidArgument {
                op: "",
                arg,
                expected,
                got,
            } => Error::InvalidArgument {
                op,
                arg,
                expected,
                got,
            },
            other => other,
        }
    }
}

/// "`op`: " before an invalid argument's message, when it has an operation.
fn operation(op: &str) -> String {
    match op {
        "" => String::new(),
        op => format!("{op}: "),
    }
}

#[cfg(feature = "cuda")]
impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Cuda(e.to_string())
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
