#!/usr/bin/env bash
# Prepare, on this (networked) machine, what benchmarks/gpu_check.py needs on a bare GPU
# machine, then print what one device call would carry. Run from anywhere; needs pip access.
#   .gpucheck/data  CIFAR-10 as lossless WebP parts (benchmarks/cifar_pack.py; ~4 min on 2 cores)
#   .whl            wheels the device image lacks: hydra-core, omegaconf, antlr4 (built here
#                   from its sdist), pyhessian; all pure Python, any Python 3
# Both folders are git-ignored; name them in the device call's `carry` (see gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-${HAWQ_TEST_CIFAR10:-../shared/data/cifar10}}"
[ -f .gpucheck/data/cifar10_webp_test.npz ] || python benchmarks/cifar_pack.py pack --src "$src" --out .gpucheck/data
mkdir -p .whl
ver() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
python -m pip download -q --no-deps --only-binary=:all: -d .whl \
    "hydra-core==$(ver hydra-core)" "omegaconf==$(ver omegaconf)" "pyhessian==$(ver pyhessian)"
ls .whl/antlr4_python3_runtime-*.whl >/dev/null 2>&1 || \
    python -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(ver antlr4-python3-runtime)"
rm -f .whl/*.tar.gz
# the tree one call sends: tracked + untracked-not-ignored files + the carried paths (<= 64 MiB)
python - <<'PY'
import subprocess
from pathlib import Path
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True).stdout.decode().split("\0")
tree = sum(Path(f).stat().st_size for f in files if f and Path(f).is_file())
carry = [Path(".gpucheck/data/cifar10_webp_test.npz"),
         Path(".gpucheck/data/cifar10_webp_train_1of3.npz"), *Path(".whl").glob("*.whl")]
extra = sum(p.stat().st_size for p in carry)
print(f"tree {tree / 2**20:.1f} MiB + carried {extra / 2**20:.1f} MiB = "
      f"{(tree + extra) / 2**20:.1f} MiB of 64 MiB")
for p in sorted(Path(".gpucheck/data").glob("*.npz")):
    print(f"  {p}: {p.stat().st_size / 2**20:.1f} MiB")
PY
