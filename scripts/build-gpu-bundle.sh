#!/usr/bin/env bash
# Builds the GPU check bundle on a development machine (x86-64 Linux, no GPU needed):
# every test and bench binary and the examples (tour, finetune, serve_many), built with `--release --features baseline`
# by the pinned CUDA 13.0 nvcc, packed into gpu-bundle/ (git-ignored) together with
# scripts/gpu-check.sh and benches/peers/, so that a machine with a GPU but no Rust
# toolchain or network runs the whole check from it:
#
#   bash scripts/build-gpu-bundle.sh        # here
#   bash gpu-bundle/gpu-check.sh            # there (BENCHMARKS.md, "How to run")
#
# gpu-bundle/
#   gpu-check.sh     the check (scripts/gpu-check.sh)
#   payload.tar.xz   tests/<name> (tests/lib: the library's unit tests), benches/<name>,
#                    examples/tour, examples/finetune, examples/serve_many
#   peers/           benches/peers: the PyTorch / PEFT peers
#   MANIFEST.txt     commit, toolchain, binaries, sizes
#
# The binaries are packed because every one embeds all the kernels' PTX and cubins:
# unpacked they are far over the 64 MiB a lent GPU machine's working-tree copy may carry.
# xz -9 (a 64 MiB window) stores the images once for all binaries, about a tenth of gzip.
# Everything that travels (the repository's tracked and untracked files plus the bundle)
# is checked against that limit here.
#
# The binaries link only libc, libm, libgcc_s and libstdc++ (checked with ldd); the CUDA
# driver and cuBLAS are opened at run time by cudarc, and gpu-check.sh finds cuBLAS on
# the GPU machine (its CUDA toolkit, or the nvidia-cublas wheel PyTorch depends on).
# Build on a glibc no newer than the GPU machine's (Ubuntu 24.04: glibc 2.39).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bundle="$root/gpu-bundle"
limit=$((64 * 1024 * 1024))

step() { printf '\n==> %s\n' "$*" >&2; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
die() {
  printf 'build-gpu-bundle: %s\n' "$*" >&2
  exit 1
}

for tool in cargo python3 xz strip objdump ldd git; do
  command -v "$tool" >/dev/null || die "$tool is needed and not on PATH"
done

step "toolchain: nvcc 13.0 (scripts/install-cuda-toolchain.sh)"
if [ -z "${NVCC:-}" ]; then
  NVCC="$(bash scripts/install-cuda-toolchain.sh)"
  export NVCC
fi
nvcc_version="$("$NVCC" --version | grep -o 'release [0-9.]*' || true)"
echo "$NVCC: $nvcc_version" >&2
# The GPU machines run driver 580 (CUDA 13.0); PTX from a newer nvcc does not load there.
[ "$nvcc_version" = "release 13.0" ] ||
  die "nvcc must be 13.0 to match the GPU machines' driver, $NVCC is '$nvcc_version'; unset NVCC to use the pinned one"

work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-bundle.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Each cargo call writes its JSON messages to a file; diagnostics go to stderr as text.
cargo_json() {
  local name="$1"
  shift
  step "cargo $*"
  cargo "$@" --message-format=json-render-diagnostics >"$work/$name.json" ||
    die "cargo $* failed"
}
# cudarc's bindings for CUDA 13.0, the GPU machines' driver (without nvcc on PATH cudarc
# would take its newest bindings, `fallback-latest`).
export CUDARC_CUDA_VERSION=13000
cargo_json tests test --release --features baseline --no-run
cargo_json benches bench --features baseline --no-run
cargo_json examples build --release --features baseline --example tour --example finetune --example serve_many

step "staging the binaries"
stage="$work/stage"
mkdir -p "$stage/tests" "$stage/benches" "$stage/examples"
# Lines of "<kind> <name> <path>": test binaries (harness tests and the library's unit
# tests), bench binaries and the examples.
python3 - "$work" >"$work/artifacts.txt" <<'EOF'
import json, sys

work = sys.argv[1]
def messages(name):
    with open(f"{work}/{name}.json") as f:
        for line in f:
            if line.startswith("{"):
                yield json.loads(line)

for name in ("tests", "benches", "examples"):
    for m in messages(name):
        if m.get("reason") != "compiler-artifact" or not m.get("executable"):
            continue
        kind, target = m["target"]["kind"], m["target"]["name"]
        if name == "tests" and m["profile"]["test"]:
            print("tests", "lib" if kind == ["lib"] else target, m["executable"])
        elif name == "benches" and kind == ["bench"]:
            print("benches", target, m["executable"])
        elif name == "examples" and kind == ["example"] and target in ("tour", "finetune", "serve_many"):
            print("examples", target, m["executable"])
EOF
grep -q '^examples tour ' "$work/artifacts.txt" || die "cargo built no tour example"
grep -q '^examples finetune ' "$work/artifacts.txt" || die "cargo built no finetune example"
grep -q '^tests ' "$work/artifacts.txt" || die "cargo built no test binaries"

while read -r kind name path; do
  if [ -e "$stage/$kind/$name" ]; then
    die "two $kind binaries named $name"
  fi
  # Debug info of the standard library only; symbols stay for readable backtraces.
  strip --strip-debug -o "$stage/$kind/$name" "$path"
  printf '  %-9s %-24s %s MiB\n' "$kind" "$name" "$(mib "$(stat -c %s "$stage/$kind/$name")")" >&2
done <"$work/artifacts.txt"
[ -n "$(ls "$stage/benches")" ] || echo "  (no bench binaries: benches/ has none yet)" >&2

step "checking the binaries' shared libraries"
for f in "$stage"/tests/* "$stage"/benches/* "$stage"/examples/*; do
  [ -e "$f" ] || continue
  libs="$(ldd "$f" | awk '$1 !~ /^(linux-vdso|\/)/ {print $1}')"
  for lib in $libs; do
    case "$lib" in
      libc.so.* | libm.so.* | libgcc_s.so.* | libstdc++.so.* | libpthread.so.* | libdl.so.* | librt.so.*) ;;
      *) die "${f#"$stage"/} links $lib, which the GPU machine may not have" ;;
    esac
  done
done
glibc="$(objdump -T "$stage"/tests/* "$stage"/benches/* "$stage"/examples/* 2>/dev/null |
  grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)"
glibcxx="$(objdump -T "$stage"/tests/* "$stage"/benches/* "$stage"/examples/* 2>/dev/null |
  grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -1)"
echo "  libc, libm, libgcc_s, libstdc++ only; newest symbol versions: $glibc, ${glibcxx:-no GLIBCXX}" >&2

step "packing gpu-bundle/"
rm -rf "$bundle"
mkdir -p "$bundle/peers"
tar -C "$stage" -cf - tests benches examples | xz -9 -T0 >"$bundle/payload.tar.xz"
install -m 755 scripts/gpu-check.sh "$bundle/gpu-check.sh"
find benches/peers -maxdepth 1 -type f \( -name '*.py' -o -name '*.md' \) -exec cp {} "$bundle/peers/" \;

commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
if [ "$commit" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  commit="$commit-dirty"
fi
{
  echo "commit: $commit"
  echo "built: $(date -u '+%Y-%m-%d %H:%M UTC') on $(uname -m), $(ldd --version | head -1)"
  echo "rustc: $(rustc --version)"
  echo "nvcc: $("$NVCC" --version | tail -2 | head -1)"
  echo "needs: $glibc, ${glibcxx:-no GLIBCXX}"
  echo "payload:"
  (cd "$stage" && find tests benches examples -type f -printf '  %p %s\n' | sort)
} >"$bundle/MANIFEST.txt"

step "size: what travels to the GPU machine"
bundle_bytes="$(du -sb "$bundle" | cut -f1)"
tree_bytes="$(git ls-files -z --cached --others --exclude-standard |
  du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)"
total=$((bundle_bytes + tree_bytes))
echo "  gpu-bundle $(mib "$bundle_bytes") MiB + working tree $(mib "$tree_bytes") MiB = $(mib "$total") MiB (limit 64 MiB)" >&2
[ "$total" -le "$limit" ] ||
  die "the bundle and the working tree are $(mib "$total") MiB, over the device tool's 64 MiB; remove large untracked files or build fewer binaries"

step "done: gpu-bundle/ for commit $commit"
cat <<EOF
The GPU check, in one call of the device tool (10 minutes at most; the bundle is
git-ignored, so it must be carried):

  run  command: bash gpu-bundle/gpu-check.sh
       carry:   ["gpu-bundle"]
       timeout_s: 600

It prints a summary last and leaves under \$OUT: summary.md, gpu-check.log, peers.md,
benches.md, logs.tar.gz. BENCHMARKS.md says how to fill its tables from them.
EOF
