"""No reference kernel where a fast one exists, on every CPU family this machine can stand
in for: the seed ViT's and ResNet-20's GEMM/conv shape classes run under each
``ONEDNN_MAX_CPU_ISA`` cap in a fresh process with ``ONEDNN_VERBOSE=1``; every oneDNN
primitive executed must be a JIT/brgemm one (never ``ref``), and the ``cpu`` backend must
beat ``reference`` on one GEMM (a speed class, not a benchmark)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hawq.integer import cpu, isa

PROBE = Path(__file__).with_name("isa_probe.py")
# AMX where present; VNNI, AVX-VNNI and plain AVX2 on any AVX2 machine (a cap above what the
# CPU has runs its best ISA, so each cap below the machine's shows another family's kernels)
CAPS = [c for c in isa.ONEDNN_CAPS if c != "AVX512_CORE_AMX" or c in isa.supported_caps()]

pytestmark = pytest.mark.skipif(
    not cpu.available() or "avx2" not in isa.flags(), reason="needs x86-64 with AVX2 and the "
    "cpu backend's C++ extension")


def executed(stdout: str) -> list[tuple[str, str]]:
    """(primitive, implementation) of every ``exec`` line oneDNN printed."""
    rows = []
    for line in stdout.splitlines():
        parts = line.split(",")
        if line.startswith("onednn_verbose") and len(parts) > 6 and parts[3] == "exec":
            rows.append((parts[5], parts[6]))
    return rows


@pytest.mark.parametrize("cap", CAPS)
def test_no_reference_kernel_under_isa_cap(cap):
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "ONEDNN_MAX_CPU_ISA": cap,
           "HAWQ_INT_BACKEND": "auto", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(PROBE)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = executed(proc.stdout)
    kinds = {p for p, _ in rows}
    assert {"matmul", "convolution"} <= kinds, f"oneDNN ran {kinds}: the probe missed a class"
    ref = sorted({f"{p}:{impl}" for p, impl in rows if impl.startswith("ref")})
    assert not ref, f"under {cap}: reference kernels ran: {ref}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["isa"]["onednn_max_cpu_isa"] == cap
    speed = report["backend_seconds"]
    assert speed["cpu"] < speed["reference"], f"under {cap}: cpu backend slower: {speed}"
