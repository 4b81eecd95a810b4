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

small_case='
import torch, fusedvae
x = torch.randn(3, 3, 17, 19, device="cuda", requires_grad=True)
t = torch.randint(0, 256, (3, 3, 17, 19), device="cuda", dtype=torch.uint8)
mu = torch.randn(3, 5, device="cuda", requires_grad=True)
for lik in ("bernoulli", "cbernoulli", "gaussian"):
    fusedvae.vae_loss(x, t, mu, mu.detach(), likelihood=lik, free_bits=0.1).loss.backward()
fusedvae.vae_loss(x.half(), t, mu, mu.detach()).loss.backward()
fusedvae.vae_loss(x[:, :, :, 1:], t[:, :, :, 1:], mu, mu.detach()).loss.backward()  # strided, unaligned
# targets and log-scales read in their own dtypes beside a 16-bit recon
xb = x.detach().bfloat16().requires_grad_()
fusedvae.vae_loss(xb, t.float() / 255, mu, mu.detach()).loss.backward()
fusedvae.vae_loss(xb, t > 127, mu, mu.detach(), likelihood="cbernoulli").loss.backward()
s = torch.zeros(3, 3, 17, 19, device="cuda", requires_grad=True)
fusedvae.vae_loss(xb, t.half(), mu, mu.detach(), likelihood="gaussian", log_scale=s).loss.backward()
# the objective'"'"'s [B]-sized stages: every scale form, beta tensors, free bits on a
# spatial 16-bit latent, each output alone, and a batch wider than a block
s0 = torch.zeros((), device="cuda", requires_grad=True)
beta = torch.tensor(0.5, device="cuda", requires_grad=True)
ml = torch.randn(3, 4, 5, 6, device="cuda", dtype=torch.half, requires_grad=True)
for scale in ("optimal", s0, -0.3):
    out = fusedvae.vae_loss(x, t, ml, ml.detach(), likelihood="gaussian", log_scale=scale, beta=beta,
                            free_bits=0.2, reduction="none")
    for o in out:
        o.sum().backward(retain_graph=True)
wide = torch.randn(300, 2, 3, device="cuda", requires_grad=True)
mw = torch.randn(300, 700, device="cuda", requires_grad=True)
for reduction in ("batchmean", "sum", "mean", "none"):
    fusedvae.vae_loss(wide, torch.rand(300, 2, 3, device="cuda"), mw, mw.detach(), free_bits=0.1,
                      reduction=reduction, likelihood="gaussian", log_scale="optimal").loss.sum().backward()
# Laplace and per-element weights read through their strides (per channel,
# per pixel, a transposed view), with a shared scale and without
for lik in ("gaussian", "laplace"):
    for w in (torch.rand(1, 3, 1, 1, device="cuda"), torch.rand(3, 1, 17, 19, device="cuda"),
              torch.rand(19, 17, device="cuda").t()):
        for scale in ("optimal", s):
            fusedvae.vae_loss(x, t, mu, mu.detach(), likelihood=lik, log_scale=scale, weight=w).loss.backward()
# the discretized mixture: RGB and grey, NCHW and channels-last, 16-bit params,
# a partial last block, more components than the CPU caches
for channels, k, dtype in ((3, 10, torch.float32), (1, 4, torch.bfloat16), (3, 20, torch.half)):
    per_k = 10 if channels == 3 else 3
    p = torch.randn(2, per_k * k, 17, 19, device="cuda", dtype=dtype, requires_grad=True)
    img = torch.randint(0, 256, (2, channels, 17, 19), device="cuda", dtype=torch.uint8)
    fusedvae.discretized_mix_logistic_nll(p, img).sum().backward()
    pl = p.detach().to(memory_format=torch.channels_last).requires_grad_()
    fusedvae.discretized_mix_logistic_nll(pl, img.float() / 127.5 - 1).sum().backward()
# the KL to learned priors over latent groups, a 16-bit group and free bits on it
groups = [torch.randn(3, 5, device="cuda", requires_grad=True),
          torch.randn(3, 2, 4, 4, device="cuda", dtype=torch.half, requires_grad=True)]
priors = [g.detach().clone().requires_grad_() for g in groups]
fusedvae.gaussian_kl(groups, [g.detach() for g in groups], priors, priors, free_bits=[0.0, 0.1]).sum().backward()
# the opt-in wide loads (16 pixels per access) beside float32 and bfloat16 recon
fusedvae._C._set_cuda_wide_loads(True)
xa = torch.randn(3, 3, 16, 16, device="cuda", requires_grad=True)
ta = torch.randint(0, 256, (3, 3, 16, 16), device="cuda", dtype=torch.uint8)
for xr in (xa, xa.detach().bfloat16().requires_grad_()):
    for lik in ("bernoulli", "gaussian"):
        fusedvae.vae_loss(xr, ta, mu, mu.detach(), likelihood=lik).loss.backward()
fusedvae._C._set_cuda_wide_loads(False)
torch.cuda.synchronize()
print("ok")
'
# sanitize TOOL: compute-sanitizer --tool TOOL on small_case.
sanitize() {
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [ ! -x "$sanitizer" ]; then
    echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
    return 1
  fi
  "$sanitizer" --tool "$1" --error-exitcode 1 python -c "$small_case"
}
step sanitizer-memcheck sanitize memcheck
step sanitizer-racecheck sanitize racecheck

step benchmark python benchmarks/gpu_bench.py
# The opt-in wide-load kernels, to compare with the default ones above.
step benchmark-wide-loads python benchmarks/gpu_bench.py --no-dmol --cuda-wide-loads
step dmol-benchmark python benchmarks/dmol_bench.py --device cuda
step train-step python benchmarks/train_step.py --device cuda
step host-time python benchmarks/train_step.py --device cuda --host-overhead

echo >> "$report"
echo "status: $status" >> "$report"
cat "$report"
exit $status
