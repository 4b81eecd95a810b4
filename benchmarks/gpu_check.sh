#!/usr/bin/env bash
# One command for a GPU machine, run from anywhere:
#
#   bash benchmarks/gpu_check.sh [REPORT]       (default: gpu_report.md in the repository root)
#
# Builds the package with its CUDA kernels as the README says, checks that a GPU
# is visible and the CUDA kernels are registered, runs the whole test suite
# (tests/: the GPU cases run wherever a GPU is visible, nothing names test
# files), the slow GPU tests, compute-sanitizer (memcheck, racecheck) on a small
# case, the GPU benchmark (benchmarks/gpu_bench.py, which checks every method
# against a float64 truth) and whole training steps and host time per call
# (benchmarks/train_step.py). Each step's full output goes to REPORT's log folder
# (gpu_report_logs/ for gpu_report.md); REPORT holds, per step, the command,
# its exit status and the end of its log. Exits 1 if any step failed.
set -uo pipefail

report=${1:-gpu_report.md}
case "$report" in /*) ;; *) report="$PWD/$report" ;; esac
cd "$(dirname "$0")/.." || exit 1
logs="${report%.md}_logs"
mkdir -p "$logs" || exit 1
status=0
unset FUSEDVAE_CPU_ONLY  # the point is to build and run the CUDA kernels

# step NAME COMMAND...: run COMMAND, its output into $logs/NAME.log, and its
# exit status and the last lines of the log into the report.
step() {
  local name=$1
  shift
  local log="$logs/$name.log"
  local start=$SECONDS
  "$@" > "$log" 2>&1
  local rc=$?
  [ "$rc" -eq 0 ] || status=1
  {
    printf '\n## %s: %s (exit %d, %d s)\n\n' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo FAILED)" "$rc" "$((SECONDS - start))"
    printf '`%s`, full log: `%s`\n\n```\n' "$*" "$log"
    tail -n 60 "$log"
    printf '```\n'
  } >> "$report"
  return "$rc"
}

{
  echo "# fusedvae GPU check"
  echo
  date -u
  echo
  echo "commit $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | grep -q . && echo '(with uncommitted changes)')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  (nvcc --version 2>/dev/null || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>&1) | tail -n 1
  gcc --version 2>&1 | head -n 1
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  echo '```'
} > "$report"

# Build as the README does; where pip cannot (no network for a missing
# dependency, say), build in place instead.
build() {
  echo "+ pip install --no-build-isolation -e ."
  pip install --no-build-isolation -e . && return 0
  echo "pip install failed; building in place instead"
  echo "+ python setup.py build_ext --inplace"
  python setup.py build_ext --inplace
}
step build build

# Without a GPU or without CUDA kernels every GPU test is skipped, not failed:
# make that a failure here.
check_cuda() {
  python -c '
import torch, fusedvae
print("torch", torch.__version__, "| cuda available:", torch.cuda.is_available(),
      "| fusedvae cuda kernels:", fusedvae.has_cuda_kernels())
assert torch.cuda.is_available(), "no CUDA device visible"
assert fusedvae.has_cuda_kernels(), "fusedvae was built without CUDA kernels"
print(torch.cuda.get_device_name())
'
}
step cuda-visible check_cuda

step tests python -m pytest tests/ -q -rs

# Slow tests are deselected by default (pyproject addopts); run those about
# CUDA (by name or marker). None selected (pytest's exit 5) is no failure.
slow_cuda_tests() {
  echo "+ python -m pytest tests/ -q -rs -m slow -k cuda"
  python -m pytest tests/ -q -rs -m slow -k cuda
  local rc=$?
  [ "$rc" -eq 5 ] && { echo "no slow CUDA tests selected"; return 0; }
  return "$rc"
}
step tests-slow-cuda slow_cuda_tests

# sanitize TOOL: compute-sanitizer --tool TOOL on benchmarks/sanitizer_case.py.
sanitize() {
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [ ! -x "$sanitizer" ]; then
    echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
    return 1
  fi
  "$sanitizer" --tool "$1" --error-exitcode 1 python benchmarks/sanitizer_case.py
}
step sanitizer-memcheck sanitize memcheck
step sanitizer-racecheck sanitize racecheck

# The opt-in wide-load kernels timed beside the default ones, in the same run.
step benchmark python benchmarks/gpu_bench.py --cuda-wide-loads
step dmol-benchmark python benchmarks/dmol_bench.py --device cuda
step train-step python benchmarks/train_step.py --device cuda
step host-time python benchmarks/train_step.py --device cuda --host-overhead

echo >> "$report"
echo "status: $status" >> "$report"
cat "$report"
exit $status
