#!/usr/bin/env bash
# Executed-instruction counts of segloss's kernels on lavapipe, per kernel and (for the
# hottest) per instruction: examples/stage_times.rs under callgrind, with llvmpipe's
# assembly listing from the same run. Deterministic where wall times on a small machine
# spread by ±20 %; compare two builds by their counts (BENCHMARKS.md, "Instruction counts").
#
#   scripts/kernel-profile.sh 8,4,256,256 [OUT_DIR] [SPEC] [COMPARISON]
#
# SPEC and COMPARISON are stage_times' (a loss spec in JSON; a second strategy profiled in
# the same run: `scalar` for the pixel stages without quads, `uniform_coefs=0`, ...).
#
# Needs valgrind (apt-get install -y valgrind) and lavapipe (scripts/install-lavapipe.sh).
# One round after two warm-up rounds: the stats kernel runs 1 + 3·3 = 10 times, the grad
# kernel 3 times (stage_times' variants). Each kernel is compiled under valgrind (valgrind
# reports no AVX-512, so the code differs from a native run's; compare counts with counts):
# minutes for a shape with more than a few dozen classes.
set -euo pipefail
shape=${1:-8,4,256,256}
out=${2:-target/kernel-profile}
spec=${3:-'{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}'}
mkdir -p "$out"
cargo build --release --example stage_times
export WGPU_BACKEND=vulkan MESA_SHADER_CACHE_DISABLE=true GALLIVM_DEBUG=asm
valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file="$out/callgrind.out" \
    target/release/examples/stage_times "$shape" 1 "$spec" ${4:-} >"$out/asm.txt" 2>&1
grep -h "stats " "$out/asm.txt" || true
python3 "$(dirname "$0")/kernel_profile.py" "$out/callgrind.out" "$out/asm.txt" "$out/hottest.txt"
