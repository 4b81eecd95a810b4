#!/usr/bin/env bash
# One command for a GPU machine: build with CUDA, run the GPU tests, run
# compute-sanitizer (memcheck, racecheck) on a small case, run the GPU
# benchmark, and write everything to gpu_report.md (or $1).
set -uo pipefail
cd "$(dirname "$0")/.."
report=${1:-gpu_report.md}
status=0
section() { printf '\n## %s\n\n```\n' "$1" >> "$report"; }
endsection() { printf '```\n' >> "$report"; }

{
  echo "# fusedvae GPU check"
  echo
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
} > "$report"

section "build"
pip install --no-build-isolation -e . >> "$report" 2>&1 || status=1
python -c "import fusedvae, torch; print('torch', torch.__version__, 'cuda kernels:', fusedvae.has_cuda_kernels())" >> "$report" 2>&1 || status=1
endsection

section "GPU tests (tests/test_cuda.py, slow ones included)"
python -m pytest tests/test_cuda.py tests/test_build.py -q >> "$report" 2>&1 || status=1
endsection

small_case='
import torch, fusedvae
x = torch.randn(3, 3, 17, 19, device="cuda", requires_grad=True)
t = torch.randint(0, 256, (3, 3, 17, 19), device="cuda", dtype=torch.uint8)
mu = torch.randn(3, 5, device="cuda", requires_grad=True)
for lik in ("bernoulli", "cbernoulli", "gaussian"):
    fusedvae.vae_loss(x, t, mu, mu.detach(), likelihood=lik, free_bits=0.1).loss.backward()
fusedvae.vae_loss(x.half(), t, mu, mu.detach()).loss.backward()
torch.cuda.synchronize()
print("ok")
'
for tool in memcheck racecheck; do
  section "compute-sanitizer --tool $tool"
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool "$tool" --error-exitcode 1 python -c "$small_case" >> "$report" 2>&1 || status=1
  else
    echo "compute-sanitizer not found" >> "$report"; status=1
  fi
  endsection
done

section "benchmark (benchmarks/gpu_bench.py)"
python benchmarks/gpu_bench.py >> "$report" 2>&1 || status=1
endsection

echo "status: $status" >> "$report"
cat "$report"
exit $status
