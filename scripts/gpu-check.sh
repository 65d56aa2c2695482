#!/usr/bin/env bash
# shellcheck disable=SC2317 # the step functions are called through run_step
# The GPU check. Runs ON a machine with an NVIDIA GPU, from the bundle that
# scripts/build-gpu-bundle.sh builds (no Rust toolchain or network needed there):
#
#   bash gpu-bundle/gpu-check.sh
#
# Every step runs, with a time limit, even when an earlier one failed:
#   gpu          nvidia-smi -L, driver, CUDA version, clocks (read only: no setting changes)
#   libs         finds libcublas for cudarc (system, CUDA toolkit, or PyTorch's wheel)
#   test:NAME    each test binary with --include-ignored: the GPU tests are #[ignore]d
#                (tests/sass reads the kernels' SASS with the machine's cuobjdump;
#                gpu_prefix_attention_backward: the attention backward and lse_merge_backward;
#                multi_adapter: on_gpu::, mixed-adapter batches and device ids out of range;
#                dora: the fused DoRA forward on every kernel variant, its training forward
#                and backward (dmagnitude), norms, merge and unmerge)
#   bench:NAME   each criterion bench binary (--bench); the time left is shared among them
#                (prefix_attention_backward: the backward, fused vs kv_concat + backward;
#                multi_adapter: mixed batches vs the Punica-style cuBLAS sequence)
#   peers        benches/peers/peers.py: PyTorch and PEFT on the benches' shapes (forward,
#                the training step of delta_linear_train, the attention backward)
#   ptx:NAME     the GPU tests again with PEFT_KERNELS_FORCE_PTX=1: the driver compiles
#                the embedded compute_90 PTX instead of loading the sm_90 cubin (skipped
#                below compute capability 9.0, which cannot run it)
#   inorder      the delta_linear GPU tests again with PEFT_KERNELS_NO_OVERLAP=1: every
#                plan step in plain stream order, as the sm_80 cubin runs them
#   tour         examples/tour, every method of the unified view on the GPU
#   finetune     examples/finetune, a student trained on the GPU recovers planted deltas
#   serve_many   examples/serve_many, mixed multi-adapter batches checked row by row
# in that order: what the budget cuts first is what a second call can redo quickest.
#   sanitize     only with PEFT_GPU_CHECK_SANITIZE=1: compute-sanitizer memcheck over the
#                GPU tests
#   profile:CASE only with PEFT_GPU_CHECK_PROFILE=1 (best in a second call, with the other
#                steps skipped): Nsight Compute on one call's kernels of each fused bench
#                case in PROFILE_CASES (criterion's --profile-time loop of that case alone),
#                a table per kernel: time, DRAM and SM throughput, occupancy, registers
#   model        only with PEFT_GPU_CHECK_MODEL=1: issue 16's performance model against
#                Nsight Compute, launch by launch, on the fused LoRA plans of tests/gpu_model
#                (the model side runs on the CPU first, so on a machine without a GPU the step
#                gets that far and then says it needs the device)
#
# Environment:
#   OUT                        where results go (the device tool sets it), else ./gpu-check-out
#   PEFT_GPU_CHECK_SKIP        step kinds to skip, space-separated: tests ptx inorder tour finetune serve_many
#                              peers benches
#   PEFT_GPU_CHECK_TEST_ARGS   arguments of every test binary (default: --include-ignored)
#   PEFT_GPU_CHECK_BENCH_ARGS  more arguments of every bench binary, after --bench
#                              (criterion's, e.g. "--measurement-time 2")
#   PEFT_GPU_CHECK_SANITIZE=1  add the compute-sanitizer step
#   PEFT_GPU_CHECK_PROFILE=1   add the Nsight Compute steps
#   PEFT_GPU_CHECK_MODEL=1     add the model-against-measurement step (model.md)
#   PEFT_GPU_CHECK_BUDGET_S    seconds for the whole check (default 540, inside the device
#                              tool's 600 per call)
#   PYTHON                     the Python with torch and peft (default python3)
#
# Results under $OUT, five files (the device tool brings back at most eight): summary.md,
# gpu-check.log (this console), peers.md, benches.md (the benches' summary tables) and
# logs.tar.gz (each step's log, criterion's data, the profiles); with the profile steps a
# sixth, profile.md. The console ends with the
# peers' and benches' tables and the step summary, since the device tool returns only the
# end of the output. Exit status 1 when a step failed or ran out of time, else 0.
# pipefail: a pipe's status is its first failure, so a command that reads a pipe must
# read all of it (grep -c, not grep -q, whose early exit kills the writer with SIGPIPE).
set -uo pipefail

bundle="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$PWD/gpu-check-out}"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
bin="$work/bin"
logs="$work/logs"
budget="${PEFT_GPU_CHECK_BUDGET_S:-540}"
skip=" ${PEFT_GPU_CHECK_SKIP:-} "
python="${PYTHON:-python3}"
# Seconds kept back at the end for packing the logs and printing the summary.
reserve=20

rows=()   # "step|result|seconds|note" for the summary
failed=0

skipping() { [[ "$skip" == *" $1 "* ]]; }

record() {
  rows+=("$1|$2|$3|$4")
  case "$2" in pass | skipped) ;; *) failed=1 ;; esac
}

# run_step NAME LIMIT_S NOTE_FN CMD...: runs CMD under `timeout` (a function of this script
# directly: it limits its own commands), its output on the console and in logs/NAME.log,
# and records the result with the note NOTE_FN prints for that log.
run_step() {
  local name="$1" limit="$2" note_fn="$3"
  shift 3
  local log="$logs/${name//[^A-Za-z0-9_.-]/_}.log"
  local left=$((budget - SECONDS - reserve))
  if ((left < 5 || limit < 5)); then
    record "$name" skipped 0 "no time left in the ${budget}s budget"
    return
  fi
  ((limit > left)) && limit=$left
  printf '\n==> %s (limit %ss)\n' "$name" "$limit"
  local t0=$SECONDS rc result=pass
  if declare -F "$1" >/dev/null; then
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  else
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  fi
  case $rc in
    0) ;;
    124 | 137) result="TIMEOUT" ;;
    *) result="FAIL (exit $rc)" ;;
  esac
  record "$name" "$result" $((SECONDS - t0)) "$("$note_fn" "$log" | tr '\n|' ' /' | sed 's/ *$//')"
}

gpu_note() {
  grep -m2 -E '^GPU [0-9]+:|Driver Version|nvidia-smi not found' "$1"
}

bench_note() {
  grep -m1 -E 'skipped|summary written' "$1"
}

# "N passed, M failed, K ignored" over a libtest log's result lines.
test_note() {
  awk '/^test result:/ {
         for (i = 2; i <= NF; i++) {
           if ($i ~ /^passed/) p += $(i - 1)
           if ($i ~ /^failed/) f += $(i - 1)
           if ($i ~ /^ignored/) g += $(i - 1)
         }
         seen = 1
       }
       END { if (seen) printf "%d passed, %d failed, %d ignored", p, f, g
             else printf "no test result line" }' "$1"
}

tour_note() {
  if grep -q ' gpu ' "$1"; then
    echo "ran on the GPU"
  elif grep -q ' emulator ' "$1"; then
    echo "ran on the EMULATOR, not the GPU"
  fi
}

finetune_note() {
  grep -E '^held-out loss|^verdict' "$1"  # one pair a run (LoRA + PA, prefix, MAM)
}

serve_many_note() {
  grep -E '^(decode|prefill):|MISMATCH' "$1"  # one line a batch, and any failing row
}

profile_note() {
  grep -m1 -E '^profiled [0-9]+ kernel' "$1" || echo "no kernel profiled"
}

# The fused bench cases the profile step looks at: "bench|criterion id regex|kernel regex".
PROFILE_CASES=(
  "delta_linear|^delta_linear/lora_r16/fused/1\$|^fused_linear"
  "delta_linear|^delta_linear/lora_r16/fused/4096\$|^fused_linear"
  "delta_linear|^delta_linear/scaled_pa_r512/fused/1\$|^fused_linear"
  "delta_linear|^delta_linear/scaled_pa_r512/fused/4096\$|^fused_linear"
  "delta_linear_train|^delta_linear_train/lora_r16/fused/4096\$|^(fused_linear|delta_bwd)"
  "prefix_attention|L=2048 l=128 causal.*/fused\$|^prefix_attention"
  "prefix_attention|decode.*L=32768 .*/split_kv\$|^prefix_attention"
  "prefix_attention_backward|L=2048 l=30 causal.*/fused\$|^prefix_attention_backward"
  "multi_prefix_attention|^multi_prefix_attention decode.*/mixed\$|^prefix_attention"
  "delta_linear_quant|^delta_linear_quant/nf4/fused/1\$|^fused_linear"
  "delta_linear_quant|^delta_linear_quant/fp8/fused/4096\$|^fused_linear"
)

# profile_case BENCH CASE KERNELS: ncu over 4 launches of the kernels matching KERNELS,
# after skipping the first 300 (every case's one-off check before criterion runs, and the
# warm-up), while criterion's --profile-time loop runs CASE alone; then one row per launch.
# The clocks are left alone (--clock-control none, see the device tool's METHOD.md).
profile_case() {
  local bench="$1" case="$2" kernels="$3" ncu report
  ncu="$(cuda_tool ncu)"
  report="$logs/profile-$(echo "$case" | tr -c 'A-Za-z0-9' '_')"
  "$ncu" --clock-control none --kernel-name "regex:$kernels" --launch-skip 300 \
    --launch-count 4 --section SpeedOfLight --section Occupancy --section LaunchStats \
    -f -o "$report" "$bin/benches/$bench" --bench --profile-time 3 "$case" || return 1
  "$ncu" --import "$report.ncu-rep" --csv --page details >"$report.csv" || return 1
  "$python" - "$report.csv" <<'EOF'
import csv, sys
# --page details --csv: one row per (kernel launch, metric), the launch's fields repeated,
# after a header row.
rows = list(csv.reader(open(sys.argv[1])))
start = next(i for i, r in enumerate(rows) if "Kernel Name" in r and "Metric Name" in r)
head, rows = rows[start], [r for r in rows[start + 1:] if len(r) == len(rows[start])]
col = {name: i for i, name in enumerate(head)}
wanted = ["Duration", "DRAM Throughput", "Compute (SM) Throughput", "Registers Per Thread",
          "Achieved Occupancy", "Theoretical Occupancy", "Dynamic Shared Memory Per Block"]
launches = {}
for r in rows:
    key = (r[col["ID"]], r[col["Kernel Name"]], r[col["Grid Size"]], r[col["Block Size"]])
    name = r[col["Metric Name"]]
    if name in wanted:
        launches.setdefault(key, {})[name] = r[col["Metric Value"]] + " " + r[col["Metric Unit"]]
print("| kernel | grid | block | " + " | ".join(wanted) + " |")
print("|---|---|---|" + "---|" * len(wanted))
for (_, kernel, grid, block), m in launches.items():
    print(f"| {kernel} | {grid} | {block} | " + " | ".join(m.get(w, "") for w in wanted) + " |")
print(f"profiled {len(launches)} kernel launch(es)")
EOF
}

# The model of issue 16 (src/model.rs, tests/gpu_model.rs) against Nsight Compute.
MODEL_METRICS="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum"
MODEL_METRICS+=",l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum"
MODEL_METRICS+=",l1tex__t_sectors_pipe_lsu_mem_global_op_ldgsts.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ldgsts.sum"
MODEL_METRICS+=",l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum"

model_note() {
  grep -m1 -E '^compared [0-9]+ launch|^ncu not found|^no GPU' "$1" || echo "no comparison"
}

# model_compare: the model's side (the emulator's profile, CPU only), then the plans under
# ncu, then one row per launch: modeled against measured.
model_compare() {
  local csv="$logs/model.csv" ncu report
  PEFT_MODEL_CSV="$csv" "$bin/tests/gpu_model" --ignored --exact model_csv --test-threads 1 ||
    return 1
  echo "model: $(($(wc -l <"$csv") - 1)) launches modeled"
  ncu="$(cuda_tool ncu)"
  if [ ! -x "$ncu" ]; then
    echo "ncu not found ($ncu): the measured side needs Nsight Compute on a GPU machine"
    return 1
  fi
  if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no GPU: nvidia-smi finds no device; the model side above is what a CPU machine can do"
    return 1
  fi
  report="$logs/model-ncu"
  "$ncu" --clock-control none --metrics "$MODEL_METRICS" -f -o "$report" \
    "$bin/tests/gpu_model" --ignored --exact run_plans_on_gpu --test-threads 1 || return 1
  "$ncu" --import "$report.ncu-rep" --csv --page raw >"$report.csv" || return 1
  "$python" - "$csv" "$report.csv" <<'EOF'
import csv, math, sys
model = list(csv.DictReader(open(sys.argv[1])))
rows = list(csv.reader(open(sys.argv[2])))
start = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
head = rows[start]
# The row after the header holds the units; then one row per launch, in launch order.
launches = [dict(zip(head, r)) for r in rows[start + 2:] if len(r) == len(head)]
def num(d, k):
    try:
        return float(str(d.get(k, "")).replace(",", ""))
    except ValueError:
        return float("nan")
print("| M | # | kernel | model µs | measured µs | model/measured | model DRAM MB | measured DRAM MB | model sectors/req | measured | model bank conflicts | measured |")
print("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
logs = []
for m, g in zip(model, launches):
    t = num(g, "gpu__time_duration.sum") / 1e3  # ns -> µs
    dram = (num(g, "dram__bytes_read.sum") + num(g, "dram__bytes_write.sum")) / 1e6
    sec = num(g, "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum") + num(g, "l1tex__t_sectors_pipe_lsu_mem_global_op_ldgsts.sum")
    req = num(g, "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum") + num(g, "l1tex__t_requests_pipe_lsu_mem_global_op_ldgsts.sum")
    name = g.get("Kernel Name", "?")
    same = "" if name.startswith(m["kernel"]) else f" (GPU: {name})"
    ratio = float(m["model_us"]) / t if t > 0 else float("nan")
    if ratio > 0:
        logs.append(math.log(ratio))
    print(f"| {m['m']} | {m['launch']} | {m['kernel']}{same} | {float(m['model_us']):.1f} | {t:.1f} | {ratio:.2f} "
          f"| {float(m['model_dram_bytes']) / 1e6:.2f} | {dram:.2f} | {float(m['model_sectors_per_request']):.2f} "
          f"| {sec / req if req else float('nan'):.2f} | {m['model_bank_conflicts']} | {num(g, 'l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum'):.0f} |")
if len(model) != len(launches):
    print(f"launch counts differ: {len(model)} modeled, {len(launches)} measured")
gm = math.exp(sum(logs) / len(logs)) if logs else float("nan")
print(f"compared {min(len(model), len(launches))} launches; model/measured time, geometric mean {gm:.2f}")
EOF
}

peers_note() {
  local fails
  fails="$(grep -c '| FAIL |$' "$1")"
  grep -m1 -o 'measured ceilings: .*' "$1"
  ((fails == 0)) || echo "; $fails peer(s) off their float64 reference"
  grep -m1 '^peers.py: ' "$1"
}

# A CUDA tool from PATH, else from the toolkit's usual folder.
cuda_tool() {
  command -v "$1" || echo "/usr/local/cuda/bin/$1"
}

gpu_info() {
  echo "bundle: $(head -1 "$bundle/MANIFEST.txt" 2>/dev/null || echo 'no MANIFEST.txt')"
  echo "host: $(uname -srm), $(nproc) CPUs"
  if ! command -v nvidia-smi >/dev/null; then
    echo "nvidia-smi not found: no NVIDIA driver here, so the GPU tests will fail"
    return 1
  fi
  timeout 30 nvidia-smi -L || return 1
  timeout 30 nvidia-smi | grep -m1 -o 'Driver Version: [0-9.]* *CUDA Version: [0-9.]*'
  # Read-only queries; the check never changes the card's settings.
  timeout 30 nvidia-smi --format=csv --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit,persistence_mode,compute_mode
  echo "libcuda: $(ldconfig -p 2>/dev/null | grep -m1 -o 'libcuda\.so\.1 .*' || echo 'not in ldconfig')"
}

# The folders that may hold cuBLAS: the CUDA toolkit's, then PyTorch's wheels
# (nvidia-cublas puts it in site-packages/nvidia/cu13/lib, the CUDA 12 one in
# nvidia/cublas/lib), then torch/lib.
cublas_dirs() {
  [ -n "${CUDA_HOME:-}" ] && echo "$CUDA_HOME/lib64"
  echo /usr/local/cuda/lib64
  echo /usr/local/cuda/targets/x86_64-linux/lib
  "$python" - 2>/dev/null <<'EOF'
import glob, importlib.util, os
for pkg in ("nvidia", "torch"):
    spec = importlib.util.find_spec(pkg)
    for base in (spec.submodule_search_locations or []) if spec else []:
        for d in [os.path.join(base, "lib")] + sorted(glob.glob(os.path.join(base, "*", "lib"))):
            print(d)
EOF
}

# cudarc opens libcuda.so.1 and libcublas.so.13 (CUDA 13) at run time by name; put their
# folders on LD_LIBRARY_PATH when the dynamic loader does not know them. Runs in this shell
# (no pipe) so that the export reaches the later steps.
find_libs() {
  local t0=$SECONDS d so found=""
  printf '\n==> libs\n'
  if ! ldconfig -p 2>/dev/null | grep -c 'libcuda\.so\.1 ' >/dev/null &&
    [ -e /usr/local/nvidia/lib64/libcuda.so.1 ]; then
    export LD_LIBRARY_PATH="/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "libcuda: /usr/local/nvidia/lib64 (not known to ldconfig)"
  fi
  if ldconfig -p 2>/dev/null | grep -c 'libcublas\.so\.13 ' >/dev/null; then
    found="system (ldconfig)"
  else
    for so in libcublas.so.13 libcublas.so.12; do
      while read -r d; do
        if [ -e "$d/$so" ]; then
          export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
          found="$d/$so"
          break 2
        fi
      done < <(cublas_dirs)
    done
  fi
  if [ -n "$found" ]; then
    echo "cuBLAS: $found" | tee "$logs/libs.log"
    record libs pass $((SECONDS - t0)) "cuBLAS: $found"
  else
    echo "cuBLAS not found (no libcublas.so.13 known to ldconfig, in CUDA's lib64 or in" \
      "PyTorch's nvidia wheels): the cuBLAS baseline tests and benches will fail" | tee "$logs/libs.log"
    record libs FAIL $((SECONDS - t0)) "libcublas.so.13 not found"
  fi
}

# The payload is a tar.xz: tar with the xz tool, else Python's tarfile (lzma).
unpack() {
  if command -v xz >/dev/null; then
    tar -xJf "$1" -C "$2"
  else
    "$python" - "$1" "$2" <<'EOF'
import sys, tarfile
# The "data" filter (Python 3.12, and security releases before it) refuses odd members.
kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
tarfile.open(sys.argv[1]).extractall(sys.argv[2], **kw)
EOF
  fi
}

main() {
  mkdir -p "$out" "$bin" "$logs"
  cd "$work" || return 1
  local commit
  commit="$(sed -n 's/^commit: //p' "$bundle/MANIFEST.txt" 2>/dev/null)"
  echo "GPU check of peft-kernels ${commit:-(unknown commit)}; results in $out"

  run_step gpu 60 gpu_note gpu_info
  local device
  device="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null |
    head -1 | sed 's/, / driver /')"
  find_libs

  printf '\n==> unpacking the binaries\n'
  if ! unpack "$bundle/payload.tar.xz" "$bin"; then
    record payload FAIL 0 "could not unpack $bundle/payload.tar.xz"
  fi

  local f name
  if ! skipping tests; then
    for f in "$bin"/tests/*; do
      [ -x "$f" ] || continue
      # shellcheck disable=SC2086 # the arguments are a word list on purpose
      run_step "test:$(basename "$f")" 240 test_note "$f" ${PEFT_GPU_CHECK_TEST_ARGS:---include-ignored}
    done
  fi
  if ! skipping benches; then
    mkdir -p "$work/bench"
    local benches=("$bin"/benches/*) i=0 left
    for f in "${benches[@]}"; do
      [ -x "$f" ] || continue
      name="$(basename "$f")"
      # What is left of the budget, shared among the benches not yet run (they come right
      # after the tests: their summary tables are the figures, written only at their end).
      left=$(((budget - SECONDS - reserve) / (${#benches[@]} - i)))
      i=$((i + 1))
      # shellcheck disable=SC2086
      run_step "bench:$name" "$left" bench_note env CRITERION_HOME="$work/criterion" \
        PEFT_BENCH_OUT="$work/bench/$name.md" "$f" --bench ${PEFT_GPU_CHECK_BENCH_ARGS:-}
      if [ -n "$device" ] && [ ! -s "$work/bench/$name.md" ]; then
        record "bench:$name table" FAIL 0 "a GPU is present but the bench wrote no summary table"
      fi
    done
  fi
  if ! skipping peers; then
    # One step a section, each writing its own report (peers.py writes at its end, so one
    # step over all four would lose every table to a timeout), concatenated as peers.md.
    local section limit
    for section in linear:80 attention:80 backward:80 train:160; do
      limit="${section#*:}"
      section="${section%%:*}"
      mkdir -p "$work/peers/$section"
      run_step "peers:$section" "$limit" peers_note env PYTHONUNBUFFERED=1 PEFT_COMMIT="$commit" \
        "$python" "$bundle/peers/peers.py" --only "$section" --out "$work/peers/$section"
      if [ -f "$work/peers/$section/peers.md" ]; then
        cat "$work/peers/$section/peers.md" >>"$work/peers/peers.md"
      fi
    done
  fi
  local cc
  cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)"
  if ! skipping ptx && [ "${cc%%.*}" -lt 9 ] 2>/dev/null; then
    record ptx skipped 0 "compute capability $cc: the compute_90 PTX needs 9.0 or newer"
  elif ! skipping ptx; then
    for f in "$bin"/tests/*; do
      # Only the binaries that have GPU (ignored) tests.
      if [ -x "$f" ] && "$f" --ignored --list 2>/dev/null | grep -c ': test$' >/dev/null; then
        run_step "ptx:$(basename "$f")" 240 test_note env PEFT_KERNELS_FORCE_PTX=1 "$f" --ignored
      fi
    done
  fi
  if ! skipping inorder && [ -x "$bin/tests/delta_linear" ]; then
    run_step inorder 240 test_note env PEFT_KERNELS_NO_OVERLAP=1 "$bin/tests/delta_linear" \
      --ignored on_gpu::
  fi
  if ! skipping tour && [ -x "$bin/examples/tour" ]; then
    run_step tour 120 tour_note "$bin/examples/tour"
    if [ -n "$device" ] && grep -q ' emulator ' "$logs/tour.log"; then
      record "tour backend" FAIL 0 "a GPU is present but the tour used the emulator"
    fi
  fi
  if ! skipping finetune && [ -x "$bin/examples/finetune" ]; then
    run_step finetune 120 finetune_note "$bin/examples/finetune"
    if [ -n "$device" ] && grep -q '^backend: emulator' "$logs/finetune.log"; then
      record "finetune backend" FAIL 0 "a GPU is present but the example used the emulator"
    fi
  fi
  if ! skipping serve_many && [ -x "$bin/examples/serve_many" ]; then
    run_step serve_many 120 serve_many_note "$bin/examples/serve_many"
    if [ -n "$device" ] && grep -q '^backend: emulator' "$logs/serve_many.log"; then
      record "serve_many backend" FAIL 0 "a GPU is present but the example used the emulator"
    fi
  fi
  if [ "${PEFT_GPU_CHECK_SANITIZE:-0}" = 1 ]; then
    for f in "$bin"/tests/*; do
      [ -x "$f" ] || continue
      run_step "sanitize:$(basename "$f")" 240 test_note "$(cuda_tool compute-sanitizer)" --tool memcheck \
        --error-exitcode 1 "$f" --ignored --test-threads 1
    done
  fi

  if [ "${PEFT_GPU_CHECK_PROFILE:-0}" = 1 ]; then
    local entry bench case kernels
    rm -f "$out/profile.md"
    for entry in "${PROFILE_CASES[@]}"; do
      IFS='|' read -r bench case kernels <<<"$entry"
      [ -x "$bin/benches/$bench" ] || continue
      run_step "profile:$case" 120 profile_note profile_case "$bench" "$case" "$kernels"
      {
        echo "### $bench: $case"
        echo
        grep '^|' "$logs/profile_${case//[^A-Za-z0-9_.-]/_}.log"
        echo
      } >>"$out/profile.md"
    done
  fi

  if [ "${PEFT_GPU_CHECK_MODEL:-0}" = 1 ] && [ -x "$bin/tests/gpu_model" ]; then
    run_step model 240 model_note model_compare
    grep -E '^\||^compared|^launch counts' "$logs/model.log" >"$out/model.md" || true
  fi

  # Results: at most eight files come back from $OUT, so the details go in one archive.
  [ -f "$work/peers/peers.md" ] && cp "$work/peers/peers.md" "$out/peers.md"
  : >"$out/benches.md"
  for f in "$work"/bench/*.md; do
    [ -f "$f" ] || continue
    cat "$f" >>"$out/benches.md"
    echo >>"$out/benches.md"
  done
  local parts=()
  for f in logs bench peers criterion; do
    [ -e "$work/$f" ] && parts+=("$f")
  done
  tar -czf "$out/logs.tar.gz" -C "$work" "${parts[@]}"

  {
    echo "# GPU check: ${device:-no GPU found}"
    echo
    echo "commit ${commit:-unknown}, $(date -u '+%Y-%m-%d %H:%M UTC'), ${SECONDS}s"
    echo
    echo "| step | result | s | notes |"
    echo "|---|---|---:|---|"
    local row
    for row in "${rows[@]}"; do
      IFS='|' read -r name result secs note <<<"$row"
      echo "| $name | $result | $secs | $note |"
    done
    local failures
    # "step: test" for every failed test, e.g. "test_delta_linear: on_gpu::awkward_shapes".
    failures="$(awk '/^test .* \.\.\. FAILED$/ {
        step = FILENAME; sub(/.*\//, "", step); sub(/\.log$/, "", step)
        sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); print step ": " $0
      }' "$logs"/*.log | head -20)"
    if [ -n "$failures" ]; then
      echo
      echo "Failed tests (first 20):"
      while read -r name; do echo "- $name"; done <<<"$failures"
    fi
  } >"$out/summary.md"

  # The end of the console is what the device tool returns: the tables, then the summary.
  echo
  [ -s "$out/peers.md" ] && cat "$out/peers.md"
  echo
  [ -s "$out/benches.md" ] && cat "$out/benches.md"
  echo
  [ -s "$out/profile.md" ] && cat "$out/profile.md"
  echo
  [ -s "$out/model.md" ] && cat "$out/model.md"
  echo
  cat "$out/summary.md"
  echo
  echo "results: $out/{summary.md,gpu-check.log,peers.md,benches.md,logs.tar.gz}"
  return $failed
}

mkdir -p "$out"
trap 'rm -rf "$work"' EXIT
main 2>&1 | tee "$out/gpu-check.log"
exit "${PIPESTATUS[0]}"
