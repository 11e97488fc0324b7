"""Integer-only inference on the CPU (issue 13): our integer models on the ``cpu`` backend
vs peers in the same run, and the best INT8 GEMM at ViT shapes vs the AMX-INT8 peak.

Usage::

    python benchmarks/bench_integer_cpu.py [--threads 2] [--out benchmarks/results/integer_cpu.json]
                                          [--quick]

Models (random weights, PTQ W8A8 calibrated on random images: speed does not depend on the
values): the seed ViT (``ViT(dim=512, depth=6, heads=8, mlp_dim=512)``) and ResNet-20, at
batch 64 and 1. Peers, each timed in this process: torch FP32 eager, torch bf16 autocast,
ONNX Runtime FP32 (the FP model's export), ORT ``quantize_static`` INT8 (QDQ, of that FP32
export), torch dynamic INT8 (``quantize_dynamic``, Linear only), our QDQ export of the
fake-quant model in ORT with default optimisations (W8A8 and W4A4), and our integer model on
``reference`` (the old CPU path) and ``cpu``, and, with the repository's tests at hand, the
hand-written integer ViT/ResNet the graph converter replaced (timed interleaved with the
converter's model: ``*_graph_vs_handwritten``, issue 30). A figure is the median over
``iters`` calls after warm-ups, as images per second; ratios within one run are the
meaningful numbers (the JSON records the load average at the start). All peers run in one
process after ``cpu.keep_freed_memory()`` (glibc reuses freed blocks: torch's peers gain
from it too).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hawq.integer import cpu, isa, ops  # noqa: E402
from hawq.integer.convert import convert  # noqa: E402
from hawq.models import ResNet, ViT  # noqa: E402
from hawq.quant import Plan, calibrate, quantize_  # noqa: E402

AMX_INT8_PEAK_TOPS = 9.0  # measured for 2 cores (ENVIRONMENT-NOTES)
TARGETS = {"vit_int_vs_fp32_b64": (2.5, 5.0), "vit_int_vs_ort_int8_b64": (1.0, 1.5),
           "resnet_int_vs_fp32_b64": (2.0, 3.0), "onnx_w8a8_vs_ort_fp32": (1.8, 2.5),
           "onnx_w4a4_vs_ort_fp32": (1.8, 2.5)}  # fmt: skip


def median_s(fn, iters: int, warmup: int = 2, budget_s: float = 20.0) -> float:
    """Median wall seconds of ``fn()`` (fewer iterations when one call is slow)."""
    for _ in range(warmup):
        fn()
    ts: list[float] = []
    t0 = time.perf_counter()
    while len(ts) < iters and (len(ts) < 3 or time.perf_counter() - t0 < budget_s):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "vit":
        return ViT(dim=512, depth=6, heads=8, mlp_dim=512, dropout=0.0).eval()
    return ResNet(depth=20).eval()


def fake_quant(model: torch.nn.Module, calib: torch.Tensor, bits: int) -> torch.nn.Module:
    import copy

    q = copy.deepcopy(model).eval()
    quantize_(q, Plan.from_dict({"_default": {"w_bits": bits, "a_bits": bits}}), None, True)
    calibrate(q, [(calib,)])
    return q.eval()


def onnx_fp32(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"],
                          opset_version=17, dynamic_axes={"input": {0: "batch"},
                                                          "output": {0: "batch"}},
                          dynamo=False)  # fmt: skip
    return path


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_int8(fp32_path: Path, calib: torch.Tensor, path: Path) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            chunks = torch.split(calib, 16)
            self.batches = iter([{"input": c.numpy()} for c in chunks])

        def get_next(self):
            return next(self.batches, None)

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(fp32_path), str(path), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        per_channel=True)  # fmt: skip
    return path


def bench_model(kind: str, batches: list[int], threads: int, iters: int, tmp: Path) -> dict:
    from hawq.quant.onnx_export import export_onnx

    model = build(kind)
    calib = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q8 = fake_quant(model, calib, 8)
    q4 = fake_quant(model, calib, 4)
    im = convert(q8, [(calib,)])
    hand = _handwritten(q8, calib)
    fp_path = onnx_fp32(model, calib[:1], tmp / f"{kind}_fp32.onnx")
    int8_path = ort_int8(fp_path, calib, tmp / f"{kind}_int8.onnx")
    paths = {"ort_fp32": fp_path, "ort_quantize_static_int8": int8_path,
             "our_onnx_w8a8": export_onnx(q8, calib[:1], tmp / f"{kind}_w8a8.onnx"),
             "our_onnx_w4a4": export_onnx(q4, calib[:1], tmp / f"{kind}_w4a4.onnx")}  # fmt: skip
    sessions = {k: ort_session(p, threads) for k, p in paths.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = torch.ao.quantization.quantize_dynamic(build(kind), {torch.nn.Linear}, torch.qint8)
    out: dict = {}
    for b in batches:
        x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        row = time_batch(x, {"torch_fp32": model, "torch_dynamic_int8": dyn, "integer": im,
                             "handwritten": hand}, sessions, iters)  # fmt: skip
        out[f"batch{b}"] = {k: {"s": v, "img_s": b / v} for k, v in row.items()}
    out["onnx_ops"] = {k: _optimized_ops(p, threads) for k, p in paths.items() if "our" in k}
    return out


def interleaved(fns: list, iters: int) -> list[float]:
    """Median seconds of each of ``fns``, called in turn (load changes hit all alike)."""
    for fn in fns:
        fn()
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for t, fn in zip(ts, fns):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [sorted(t)[len(t) // 2] for t in ts]


def _handwritten(q8: torch.nn.Module, calib: torch.Tensor):
    """The hand-written integer ViT/ResNet (now the tests' oracle), or None without tests/."""
    try:
        from tests.integer.cases import handwritten
    except ImportError:
        return None
    return handwritten(q8, [(calib,)])


def time_batch(x: torch.Tensor, models: dict, sessions: dict, iters: int) -> dict[str, float]:
    """Seconds per call of every peer on batch ``x``."""
    row: dict[str, float] = {}
    model, im = models["torch_fp32"], models["integer"]
    with torch.inference_mode():
        row["torch_fp32"] = median_s(lambda: model(x), iters)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            row["torch_bf16_autocast"] = median_s(lambda: model(x), iters)
        row["torch_dynamic_int8"] = median_s(lambda: models["torch_dynamic_int8"](x), iters)
        for name in ("cpu", "reference"):
            with ops.backend(name):
                n = iters if name == "cpu" else max(2, iters // 5)
                row[f"integer_{name}"] = median_s(lambda: im(x), n, warmup=1)
        if models["handwritten"] is not None:  # the graph path vs the old classes, interleaved
            with ops.backend("cpu"):
                pair = interleaved([lambda: im(x), lambda: models["handwritten"](x)], 3 * iters)
            row["integer_graph_interleaved"], row["integer_handwritten_interleaved"] = pair
    feed = {"input": x.numpy()}
    for k, sess in sessions.items():
        row[k] = median_s(lambda sess=sess: sess.run(None, feed), iters)
    return row


def _optimized_ops(path: Path, threads: int) -> dict[str, int]:
    """Op-type counts of ORT's optimized graph (default optimisations) of ``path``."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    opt = path.with_suffix(".opt.onnx")
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for node in onnx.load(str(opt)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def bench_gemm(threads: int, iters: int) -> list[dict]:
    """The best INT8 GEMM at the seed ViT's batch-64 shapes (M = 64 * 65 tokens)."""
    return [gemm_row(m, k, n, iters) for m, k, n in [(4160, 512, 1536), (4160, 512, 512)]]


def gemm_row(m: int, k: int, n: int, iters: int) -> dict:
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    xf, wf = x.float(), w.float()
    wt = w.t().contiguous()
    r = {"shape": [m, k, n], "fp32_s": median_s(lambda: xf @ wf.t(), iters),
         "int_mm_s": median_s(lambda: torch._int_mm(x, wt), iters),
         "onednn_s": median_s(lambda: cpu.gemm_with("onednn_u8", x, w), iters),
         "chosen": cpu.gemm_choice(),
         "chosen_s": median_s(lambda: cpu.gemm(x, w), iters)}  # fmt: skip
    for key in ("fp32", "int_mm", "onednn", "chosen"):
        r[f"{key}_tops"] = 2 * m * k * n / r[f"{key}_s"] / 1e12
    best = max(r["int_mm_tops"], r["onednn_tops"], r["chosen_tops"])
    # the AMX peak was measured on the Xeon; no peak is measured for other ISAs yet
    amx = isa.family() == "AVX512_CORE_AMX"
    r["best_vs_amx_peak"] = best / AMX_INT8_PEAK_TOPS if amx else None
    return r


def ratios(res: dict) -> dict:
    v, rn = res["vit"]["batch64"], res["resnet20"]["batch64"]
    img = lambda d, k: d[k]["img_s"]  # noqa: E731
    return {"vit_int_vs_fp32_b64": img(v, "integer_cpu") / img(v, "torch_fp32"),
            "vit_int_vs_ort_int8_b64": img(v, "integer_cpu") / img(v, "ort_quantize_static_int8"),
            "vit_reference_vs_fp32_b64": img(v, "integer_reference") / img(v, "torch_fp32"),
            "resnet_int_vs_fp32_b64": img(rn, "integer_cpu") / img(rn, "torch_fp32"),
            "onnx_w8a8_vs_ort_fp32": img(v, "our_onnx_w8a8") / img(v, "ort_fp32"),
            "onnx_w4a4_vs_ort_fp32": img(v, "our_onnx_w4a4") / img(v, "ort_fp32"),
            "ort_int8_vs_fp32_b64": img(v, "ort_quantize_static_int8") / img(v, "torch_fp32"),
            "resnet_onnx_w8a8_vs_ort_fp32": img(rn, "our_onnx_w8a8") / img(rn, "ort_fp32"),
            **{f"{m}_graph_vs_handwritten_b{b}": _graph_vs_hand(res[m][f"batch{b}"])
               for m in ("vit", "resnet20") for b in (64, 1) if f"batch{b}" in res[m]}}


def _graph_vs_hand(row: dict) -> float | None:
    """Speed of the graph converter's model / the hand-written one (>1: faster)."""
    g, h = row.get("integer_graph_interleaved"), row.get("integer_handwritten_interleaved")
    return h["s"] / g["s"] if g and h else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/integer_cpu.json")
    ap.add_argument("--quick", action="store_true", help="batch 64 only, 3 iterations")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kept = cpu.keep_freed_memory()  # process-wide: every peer below runs with it
    iters = 3 if args.quick else args.iters
    batches = [64] if args.quick else [64, 1]
    res: dict = {"machine": isa.model_name(), "isa": isa.describe(), "threads": args.threads,
                 "torch": torch.__version__, "load_avg_1min": os.getloadavg()[0],
                 "glibc_keeps_freed_memory": kept,
                 "auto_choice": {"choice": ops.cpu_choice(), **ops._cpu_choice},
                 "kernels": ops.kernel_report()}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        res["vit"] = bench_model("vit", batches, args.threads, iters, Path(tmp))
        res["resnet20"] = bench_model("resnet", batches, args.threads, iters, Path(tmp))
    res["gemm"] = bench_gemm(args.threads, iters)
    res["ratios"] = ratios(res)
    res["targets_must_goal"] = TARGETS
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res["ratios"], indent=1))


if __name__ == "__main__":
    main()
