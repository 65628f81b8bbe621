#!/usr/bin/env bash
# The whole speed comparison on a machine with an NVIDIA GPU, PyTorch and no network:
# segloss (Vulkan) against a device copy and against PyTorch eager and torch.compile, for
# the same shapes, printed as one table last.
#
# Stage here (a machine with the network):
#   cargo build --release                                  # target/release/segloss
#   cargo build --release --example class_staging         # staged classes vs register path
#   mkdir -p .gl && (cd .gl && apt-get download libvulkan1)   # the Vulkan loader
#   cp ../shared/gpu-peer/torch_losses.py scripts/          # the PyTorch side
# Carry target/release/segloss, target/release/examples/class_staging, .gl and scripts/ to
# the GPU machine, then run:
#   bash scripts/gpu-bench.sh [OUTDIR]
#
# The same table on lavapipe beside PyTorch on the CPU (BENCHMARKS.md, issue 12's table):
#   SEGLOSS_BIN=target/debug/segloss TORCH_ARGS="--device cpu" \
#   SHAPES="8,4,256,256 2,21,128,128 1,150,96,96 2,4,96,96,96 1,2,64,64" bash scripts/gpu-bench.sh
# Overrides: SEGLOSS_BIN (the binary), SHAPES, REPS (segloss bench --reps, 50), TORCH_ARGS
# (default --compile), TORCH_SCRIPT (default scripts/torch_losses.py, else
# ../shared/gpu-peer/torch_losses.py).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/segloss-gpu-bench}}
mkdir -p "$out"
# First, what this machine has (so even a failed run says what to carry next time): the
# Vulkan ICD files, the loader and NVIDIA's Vulkan driver libraries.
{
  echo "== Vulkan ICD files"; ls -l /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/nvidia/share/vulkan/icd.d 2>&1
  echo "== libvulkan / NVIDIA libraries"; ldconfig -p 2>/dev/null | grep -E "libvulkan|libGLX_nvidia|libnvidia-glvkspirv|libnvidia-gpucomp" || echo "none in ldconfig"
  ls /usr/lib/x86_64-linux-gnu/libGLX_nvidia* /usr/local/nvidia/lib64 2>&1 | head -20
} 2>&1 | tee "$out/found.txt"
if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 && [ -d .gl ]; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json; do
  if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f "$icd" ]; then export VK_DRIVER_FILES=$icd; fi
done
export WGPU_BACKEND=vulkan
bin=${SEGLOSS_BIN:-target/release/segloss}
torch_script=${TORCH_SCRIPT:-scripts/torch_losses.py}
[ -f "$torch_script" ] || torch_script=../shared/gpu-peer/torch_losses.py
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
$bin info >"$out/info.json" 2>"$out/info.err" || { cat "$out/info.err"; exit 1; }
grep '"chosen"' "$out/info.json"

shapes=${SHAPES:-"1,2,64,64 8,4,256,256 2,4,96,96,96 2,21,128,128 1,150,96,96 16,21,512,512 4,150,256,256"}
declare -A specs=(
  [ce]='{"terms":[{"kind":"cross_entropy"}]}'
  [dicece]='{"terms":[{"kind":"cross_entropy"},{"kind":"dice"}]}'
  [ce_l1]='{"terms":[{"kind":"cross_entropy"},{"kind":"region","penalty":"l1","temperature":10}]}'
)
: >"$out/segloss.jsonl"
for s in $shapes; do
  for name in ce dicece ce_l1; do
    r=$($bin bench --shape "$s" --spec "${specs[$name]}" --reps "${REPS:-50}" --json 2>>"$out/bench.err")
    echo "{\"loss\":\"$name\",\"result\":$r}" | tee -a "$out/segloss.jsonl"
  done
done
# Past the register block of 8: classes staged in workgroup memory (GPUs' default) against
# the register path, same run (BENCHMARKS.md, "Staged classes").
staging_bin=${STAGING_BIN:-target/release/examples/class_staging}
if [ -x "$staging_bin" ]; then
  $staging_bin "${REPS:-50}" 2,21,128,128 1,150,96,96 16,21,512,512 4,150,256,256 1,1024,64,64 \
    2>&1 | tee "$out/class_staging.txt"
else
  echo "no $staging_bin: staged classes not compared" | tee "$out/class_staging.txt"
fi
PYTHONUNBUFFERED=1 python3 "$torch_script" ${TORCH_ARGS:---compile} $shapes 2>"$out/torch.err" | tee "$out/torch.jsonl"

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
seg = {}
for line in open(f"{out}/segloss.jsonl"):
    d = json.loads(line); r = d["result"]; seg[(r["shape"], d["loss"])] = r
torch = {}
for line in open(f"{out}/torch.jsonl"):
    d = json.loads(line)
    if "median_ms" in d: torch[(d["shape"], d["loss"], d["mode"])] = d
print(f"{'shape':16} {'loss':7} {'segloss ms':>10} {'copy ms':>8} {'x copy':>7} {'x shader copy':>13} {'x floor':>7} {'loss-only x shc':>15} {'x empty':>7} {'eager ms':>9} {'compile ms':>10} {'vs eager':>8} {'vs compile':>10}")
for (shape, loss), r in seg.items():
    e = torch.get((shape, loss, "eager")); c = torch.get((shape, loss, "compile"))
    em = e["median_ms"] if e else float("nan"); cm = c["median_ms"] if c else float("nan")
    xe = r['median_ms'] / r['empty_dispatch_median_ms']
    xs = r['median_ms'] / r['shader_copy_median_ms']
    xf = r['median_ms'] / r.get('softmax_floor_median_ms', float('nan'))
    xl = r.get('loss_only_median_ms', float('nan')) / r['shader_copy_median_ms']
    print(f"{shape:16} {loss:7} {r['median_ms']:10.3f} {r['copy_median_ms']:8.3f} {r['ratio_to_copy']:7.2f} {xs:13.2f} {xf:7.2f} {xl:15.2f} {xe:7.1f} {em:9.3f} {cm:10.3f} {em / r['median_ms']:8.2f} {cm / r['median_ms']:10.2f}")
PY
