//! CPU reference implementations (f64 accumulation) of every forward operation.
