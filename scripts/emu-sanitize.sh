#!/usr/bin/env bash
# The emulator test suite under AddressSanitizer and UndefinedBehaviorSanitizer: the runtime
# and the kernels (kernels/emu, kernels/*.cu) built with g++ -fsanitize=address,undefined
# (PEFT_KERNELS_EMU_SANITIZE=1, build/emulator.rs; the fiber switches are announced to ASan
# in kernels/emu/runtime.cpp), the Rust test binaries run with the sanitizer runtimes
# preloaded. A finding aborts the test binary with the sanitizer's report. Extra arguments
# go to `cargo test` (e.g. `--test emulator`). Its own target directory (…/sanitize), so it
# does not rebuild the ordinary one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
asan="$(g++ -print-file-name=libasan.so)"
ubsan="$(g++ -print-file-name=libubsan.so)"
export PEFT_KERNELS_EMU_SANITIZE=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/sanitize"
# Only the test binaries get the runtimes (not cargo and rustc).
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="env LD_PRELOAD=$asan:$ubsan"
# The emulator's own SIGSEGV report (tests/emulator.rs checks it) stays in charge of
# faults; Rust's allocations are not instrumented, so leak reports would be noise.
export ASAN_OPTIONS="detect_leaks=0:handle_segv=0:handle_sigbus=0:verify_asan_link_order=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
exec cargo test --release "$@"
