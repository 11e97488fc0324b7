"""Compile the Triton INT8 kernels for an H100/H200 (sm_90) without a GPU; print JSON.

Run as a script (``python tests/integer/compile_sm90.py``) with ``TRITON_INTERPRET`` unset:
``triton.compile`` runs its whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin, ptxas
included) on the CPU when given a target, so GPU-only front-end errors (a constexpr
stride, a dtype mismatch) show up here. For each kernel the JSON lists the element type of
every pointer-tile offset (``tt.addptr`` on a 2-D tile) in the TTIR: all must be ``i64``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from hawq.integer import triton_bmm, triton_gemm  # noqa: E402

I32, I64 = "i32", "i64"
_PTRS = {"x_ptr": "*i8", "w_ptr": "*i8", "bias_ptr": "*i32", "m_ptr": "*i64", "e_ptr": "*i64",
         "z_ptr": "*i64", "lo_ptr": "*i64", "hi_ptr": "*i64", "out_ptr": "*i8"}  # fmt: skip


def _gemm(int4: bool, unit_strides: bool, small: bool) -> triton.compiler.ASTSource:
    sig = dict(_PTRS, w_ptr="*u8" if int4 else "*i8")
    sig.update({n: I32 for n in ("M", "N", "K", "stride_xm", "stride_xk", "stride_wn",
                                 "stride_wk", "stride_om", "stride_on")})  # fmt: skip
    bm, bn, bk, gm, _, _ = triton_gemm.GEMM_CONFIGS[0] if not small else (32, 32, 32, 4, 0, 0)
    const = {"HAS_BIAS": True, "REQUANT": True, "W_INT4": int4, "BM": bm, "BN": bn, "BK": bk,
             "GROUP_M": gm}  # fmt: skip
    if unit_strides:  # Triton specializes an integer argument equal to 1 into a constexpr
        const.update(stride_xk=1, stride_wk=1, stride_on=1)
    for name in const:
        sig[name] = "constexpr"
    return triton.compiler.ASTSource(fn=triton_gemm._gemm_requant_kernel, signature=sig,
                                     constexprs=const)  # fmt: skip


def _bmm(zero_points: bool, small: bool) -> triton.compiler.ASTSource:
    names = ("B1", "M", "N", "K", "za", "zb", "sa0", "sa1", "sam", "sak", "sb0", "sb1", "sbk",
             "sbn", "so0", "so1", "som", "son")  # fmt: skip
    sig = {"a_ptr": "*i8", "b_ptr": "*i8", "m_ptr": "*i64", "e_ptr": "*i64", "z_ptr": "*i64",
           "lo_ptr": "*i64", "hi_ptr": "*i64", "out_ptr": "*i8", **{n: I32 for n in names}}
    bm, bn, bk, _, _ = triton_bmm.BMM_CONFIGS[1] if not small else (32, 32, 32, 0, 0)
    const = {"ZA": zero_points, "ZB": zero_points, "REQUANT": True, "BM": bm, "BN": bn, "BK": bk,
             "son": 1}  # fmt: skip
    for name in const:
        sig[name] = "constexpr"
    return triton.compiler.ASTSource(fn=triton_bmm._bmm_kernel, signature=sig, constexprs=const)


def offset_types(ttir: str) -> list[str]:
    """Element types of the offsets added to 2-D pointer tiles (``tt.addptr``)."""
    pat = re.compile(r"tt\.addptr .*: tensor<\d+x\d+x!tt\.ptr<\w+>>, tensor<\d+x\d+x(\w+)>")
    return [m.group(1) for m in pat.finditer(ttir)]


CASES = {
    "gemm_int8": lambda small: _gemm(False, True, small),
    "gemm_int8_strided": lambda small: _gemm(False, False, small),
    "gemm_int4": lambda small: _gemm(True, True, small),
    "bmm_zp": lambda small: _bmm(True, small),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--small", action="store_true",
                    help="32x32x32 tiles, 1 stage: the same code paths, compiled in ~1 s each")
    args = ap.parse_args()
    names = args.cases.split(",")
    stages = 1 if args.small else 3
    target = GPUTarget("cuda", 90, 32)
    out = {"triton": triton.__version__}
    for name in names:
        src = CASES[name](args.small)
        t = time.perf_counter()
        k = triton.compile(src, target=target, options={"num_warps": 4, "num_stages": stages})
        out[name] = {"offsets": offset_types(k.asm["ttir"]), "cubin_bytes": len(k.asm["cubin"]),
                     "seconds": time.perf_counter() - t}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
