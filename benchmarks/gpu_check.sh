#!/usr/bin/env bash
# One command for a GPU machine, run from anywhere:
#
#   bash benchmarks/gpu_check.sh [REPORT]       (default: gpu_report.md in the repository root)
#
# Builds the package with its CUDA kernels as the README says and checks that a
# GPU is visible and the CUDA kernels are registered; then, side by side, the
# tests that run on CUDA (tests/ and benchmarks/, selected by -k "cuda or gpu":
# every device-parametrized test's cuda instance, the CUDA-only files) and
# compute-sanitizer memcheck, then racecheck, on benchmarks/sanitizer_case.py;
# then, one at a time, the GPU benchmark at 32x3x512x512 with the other
# kernels (the objective's opt-in approximate exponential, the mixture with
# logf and expf instead of its default approximations) timed beside the
# default ones (benchmarks/gpu_bench.py, which checks every method
# against a float64 truth), the discretized mixture's benchmark,
# whole training steps and host time per call (benchmarks/train_step.py), and
# Nsight Compute's counts for the kernels of the goals
# (benchmarks/profile_case.py: time, instructions, registers, occupancy,
# stalls), its summary at the end of the step's log.
#
# It is made for a machine lent for minutes: every step after the build gets
# the time left before GPU_CHECK_SECONDS (default 600) has passed since the
# start, and a step that runs out is reported as failed (exit 124), the steps
# after it skipped. The tests log one line per test (-v), so a run cut short
# still names every failure it reached. Each step's full output goes to
# REPORT's log folder (gpu_report_logs/ for gpu_report.md): seven logs, so that
# with REPORT they are the eight files a machine lent for minutes sends back;
# write nothing else beside them. REPORT holds, per step, the command, its exit
# status and the end of its log. GPU_CHECK_SLOW=1 adds the slow tests about CUDA. GPU_CHECK_PREBUILT=1
# skips the build and checks the modules already in fusedvae/ (built elsewhere
# for this machine's Python, torch and GPU). Exits 1 if any step failed or was
# skipped.
set -uo pipefail

report=${1:-gpu_report.md}
case "$report" in /*) ;; *) report="$PWD/$report" ;; esac
cd "$(dirname "$0")/.." || exit 1
logs="${report%.md}_logs"
mkdir -p "$logs" || exit 1
status=0
unset FUSEDVAE_CPU_ONLY  # the point is to build and run the CUDA kernels

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

budget=${GPU_CHECK_SECONDS:-600}
# seconds_left: what is left of the budget.
seconds_left() { echo $((budget - SECONDS)); }
rcs=$(mktemp -d)

# step NAME COMMAND...: run COMMAND under the time left, its output appended to
# $logs/NAME.log, its exit status kept for the report (section NAME).
step() {
  local name=$1
  shift
  local left
  left=$(seconds_left)
  if [ "$left" -le 5 ]; then
    echo "skipped: the budget of $budget s was spent" >> "$logs/$name.log"
    echo 125 > "$rcs/$name"
    return 125
  fi
  local start=$SECONDS
  echo "+ $*" >> "$logs/$name.log"
  timeout "$left" bash -c '"$@"' step "$@" >> "$logs/$name.log" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - start))" > "$rcs/$name"
  return "$rc"
}

# section NAME: the report's part for step NAME.
section() {
  local name=$1 rc seconds
  if ! read -r rc seconds < "$rcs/$name" 2> /dev/null; then
    status=1
    printf '\n## %s: not run (a step before it failed)\n' "$name" >> "$report"
    return
  fi
  [ "$rc" -eq 0 ] || status=1
  {
    printf '\n## %s: %s (exit %d, %d s)\n\n' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo FAILED)" "$rc" "$seconds"
    printf 'full log: `%s`\n\n```\n' "$logs/$name.log"
    tail -n 60 "$logs/$name.log"
    printf '```\n'
  } >> "$report"
}

# The package's own directory first on the path: scripts under benchmarks/
# import it wherever it was built.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# Build as the README does; where pip cannot (no network for a missing
# dependency, say), build in place instead. setup.py builds the modules side
# by side.
build() {
  echo "+ pip install --no-build-isolation -e ."
  pip install --no-build-isolation -e . && return 0
  echo "pip install failed; building in place instead"
  echo "+ python setup.py build_ext --inplace"
  python setup.py build_ext --inplace
}

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

build_and_check() {
  if [ "${GPU_CHECK_PREBUILT:-0}" = 1 ]; then
    echo "GPU_CHECK_PREBUILT=1: not building; the modules in fusedvae/:"
    ls -l fusedvae/*.so
  else
    build || return
  fi
  check_cuda
}

cuda_tests() {
  local parallel=() marks=()
  python -c 'import xdist' 2> /dev/null && parallel=(-n 8)
  [ "${GPU_CHECK_SLOW:-0}" = 1 ] && marks=(-m "slow or not slow")
  python -m pytest tests/ benchmarks/ -v -rfEs -p no:cacheprovider -k "cuda or gpu" "${parallel[@]}" "${marks[@]}"
}

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

# Both sanitizers, one after the other, in one log.
sanitizers() {
  sanitize memcheck && sanitize racecheck
}

train_steps() {
  python benchmarks/train_step.py --device cuda && python benchmarks/train_step.py --device cuda --host-overhead
}

# Nsight Compute on benchmarks/profile_case.py's kernels, then a summary of its
# numbers for each kernel (the end of the log, so the report shows it).
kernel_profile() {
  local ncu out
  ncu=$(command -v ncu || echo "${CUDA_HOME:-/usr/local/cuda}/bin/ncu")
  if [ ! -x "$ncu" ]; then
    echo "ncu not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
    return 1
  fi
  out=$(mktemp)
  "$ncu" --kernel-name regex:"forward_partials|dmol_backward_kernel|sum_chunks|objective_backward" \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section InstructionStats \
    python benchmarks/profile_case.py > "$out" 2>&1
  local rc=$?
  cat "$out"
  echo
  echo "summary:"
  grep -E "^  [a-zA-Z_].*\(|Duration|Executed Instructions  |Registers Per Thread|Issue Slots Busy|Achieved Occupancy|Warp Cycles Per Issued" "$out" |
    sed -E 's/\((DmolProblem|T2|ObjectiveProblem).*//'
  rm -f "$out"
  return "$rc"
}

export -f build check_cuda build_and_check cuda_tests sanitize sanitizers train_steps kernel_profile
step build build_and_check
section build
if [ "$status" -eq 0 ]; then
  step tests cuda_tests &
  step sanitizers sanitizers &
  wait
  # The other kernels, in the same run, at the size the kernels' goals are set
  # for: the objective's opt-in approximate exponential, the mixture with logf
  # and expf. The wide loads, measured twice without gain, are left out.
  step benchmark python benchmarks/gpu_bench.py --batch 32 --size 512 --cuda-fast-exp --cuda-mixture-fast-scale
  step dmol-benchmark python benchmarks/dmol_bench.py --device cuda
  step train-step train_steps
  step kernel-profile kernel_profile
fi
for name in tests sanitizers benchmark dmol-benchmark train-step kernel-profile; do
  section "$name"
done
rm -rf "$rcs"

echo >> "$report"
echo "status: $status" >> "$report"
cat "$report"
exit $status
