"""Apply a plan: ``quantize_(model, plan)`` and the helpers PTQ/QAT need around it.

``quantize_`` swaps every op the plan quantizes for its wrapper from
:mod:`hawq.quant.modules` *in place*, under the same module name; ops whose
effective setting is float (both bits null) stay untouched. BatchNorms that
directly follow a quantized conv are folded into it (and replaced by
``nn.Identity``) when ``fold_bn`` is true.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from hawq.engine import forward_batches
from hawq.errors import HawqError, choices
from hawq.models.ops import MatMul, quantizable_ops
from hawq.quant.bn_fold import find_conv_bn_pairs
from hawq.quant.formats import FORMAT_BITS
from hawq.quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from hawq.quant.plan import OpSetting, Plan
from hawq.quant.primitives import qrange
from hawq.quant.quantizer import Quantizer

METHODS = (None, "ste", "lsq", "lsqplus", "pact")
QUANT_TYPES = (QuantLinear, QuantConv2d, QuantMatMul)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def check_setting(name: str, s: OpSetting) -> None:
    """Float formats fix their own width: the plan's bits must agree."""
    for key, fmt in (("w_bits", s.w_format), ("a_bits", s.a_format)):
        bits = getattr(s, key)
        if fmt != "int" and bits is not None and bits != FORMAT_BITS[fmt]:
            raise HawqError(
                f"op {name}: {key}={bits} but {fmt} stores {FORMAT_BITS[fmt]} bits; "
                f"set {key}={FORMAT_BITS[fmt]}"
            )


def quantize_(
    model: nn.Module, plan: Plan, method: str | None = None, fold_bn: bool = True
) -> nn.Module:
    """Replace exactly the ops the plan quantizes by their quantized versions (in place).

    Args:
        model: an FP model (its quantizable ops by :func:`hawq.models.quantizable_ops`).
        plan: per-op settings; an op name not in the model is an error.
        method: None (PTQ: fixed qparams), ``ste`` (QAT, min/max ranges each step),
            ``lsq``, ``lsqplus`` or ``pact`` (QAT with learned qparams).
        fold_bn: fold a BatchNorm2d that follows a quantized conv into it.

    Returns:
        ``model`` itself.
    """
    if method not in METHODS:
        raise HawqError(f"QAT method={method!r} is invalid; allowed: {choices(METHODS[1:])}")
    if not isinstance(plan, Plan):
        raise HawqError(
            f"quantize_: plan is a {type(plan).__name__}, not a Plan; build one "
            "with Plan.from_dict({'_default': {...}, '<op>': {...}}) or load_plan"
        )
    ops = quantizable_ops(model)
    done = [n for n, m in ops.items() if isinstance(m, QUANT_TYPES)]
    if done:
        raise HawqError(f"model is already quantized (e.g. {done[0]}); quantize an FP model")
    settings = plan.resolved(list(ops))
    pairs = find_conv_bn_pairs(model) if fold_bn else {}
    mods = dict(model.named_modules())
    for name, s in settings.items():
        if s.is_float:
            continue
        check_setting(name, s)
        m = ops[name]
        if isinstance(m, nn.Conv2d):
            bn = mods[pairs[name]] if name in pairs else None
            new: nn.Module = QuantConv2d(m, s, method, bn)
            if bn is not None:
                _set_module(model, pairs[name], nn.Identity())
        elif isinstance(m, nn.Linear):
            new = QuantLinear(m, s, method)
        elif isinstance(m, MatMul):
            new = QuantMatMul(s, method)
        else:
            raise HawqError(f"op {name}: cannot quantize a {type(m).__name__}")
        _set_module(model, name, new)
    return model


def quant_ops(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> quantized wrapper, in network order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)}


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """``<op>.<w_quant|a_quant|b_quant>`` -> quantizer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}


#: quantizer attribute -> operand name in messages, per wrapper kind
OPERAND_NAMES = {"w_quant": "weight", "a_quant": "input", "b_quant": "b"}


def operand_name(op: nn.Module, qname: str) -> str:
    """``weight`` / ``input`` for Linear and Conv; ``a`` / ``b`` for ``a @ b``."""
    if isinstance(op, QuantMatMul):
        return {"a_quant": "a", "b_quant": "b"}[qname]
    return OPERAND_NAMES[qname]


def nonfinite_message(x: torch.Tensor, what: str) -> str | None:
    """None when ``x`` is finite, else one line counting its NaN and Inf values."""
    if bool(torch.isfinite(x).all()):
        return None
    n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    return (
        f"{what} has {n_nan} NaN and {n_inf} Inf value(s) of {x.numel()}; calibration "
        "needs finite values (check the data and the layers upstream)"
    )


@torch.no_grad()
def init_weight_qparams(model: nn.Module) -> None:
    """Static weight qparams from the current (folded) weights (finite, or one error line)."""
    for name, op in quant_ops(model).items():
        wq = getattr(op, "w_quant", None)
        if wq is not None and not wq.dynamic:
            w = op.folded()[0] if isinstance(op, QuantConv2d) else op.weight
            msg = nonfinite_message(w.detach(), f"op {name} operand weight")
            if msg:
                raise HawqError(msg)
            wq.init_from_weight(w.detach())


def _finite_input_hook(op_name: str, operand: str, counter: list[int]):
    def hook(_m: nn.Module, args: tuple) -> None:
        msg = nonfinite_message(
            args[0], f"calibration batch {counter[0]}: op {op_name} operand {operand}"
        )
        if msg:
            raise HawqError(msg)

    return hook


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Set weight qparams, then activation ranges from up to ``max_batches`` batches.

    Activation quantizers observe their FP inputs (upstream weights already
    quantized) with the calibrator of their setting. Returns the batches used.
    """
    init_weight_qparams(model)
    acts = {
        n: q
        for n, q in quantizers(model).items()
        if not q.is_weight
        and not q.dynamic
        and not bool(q.ready)
        or (not q.is_weight and q.fmt.startswith("fp8") and not q.dynamic)
    }
    ops = quant_ops(model)
    counter = [0]  # the batch being observed, for messages
    handles = []
    if not acts:  # dynamic (or already calibrated) activations: nothing to observe, so no
        max_batches = 0  # forward; the eval/train round trip still refreshes folded-BN state
    for n, q in acts.items():
        op_name, _, qname = n.rpartition(".")
        handles.append(
            q.register_forward_pre_hook(
                _finite_input_hook(op_name, operand_name(ops[op_name], qname), counter)
            )
        )
    for q in acts.values():
        q.start_observe()

    def counted(it: Iterable):
        for batch in it:
            yield batch
            counter[0] += 1

    try:
        return forward_batches(model, counted(batches), max_batches, device)
    except BaseException:
        for q in acts.values():  # no qparams from a failed pass
            q.calib = None
        raise
    finally:
        for h in handles:
            h.remove()
        for q in acts.values():
            q.finish_observe()


def check_ready(model: nn.Module) -> None:
    """Every quantizer has qparams (calibrated, dynamic, or self-scaled)."""
    missing = [n for n, q in quantizers(model).items() if not bool(q.ready)]
    if missing:
        raise HawqError(f"quantizer(s) not calibrated: {choices(missing)}; run calibrate()")


def set_bits_(model: nn.Module, plan: Plan, floor_bits: int | None) -> list[str]:
    """Progressive lowering: every int operand at ``max(plan bits, floor_bits)``.

    Returns the names (``<op>.<w_quant|a_quant|b_quant>``) of the quantizers whose width
    changed; they keep their covered range until :func:`refit_` re-fits it."""
    changed = []
    for name, op in quant_ops(model).items():
        s = plan.setting(name)
        for qname, target in (("w_quant", s.w_bits), ("a_quant", s.a_bits), ("b_quant", s.a_bits)):
            q = getattr(op, qname, None)
            if q is None or q.fmt != "int" or target is None:
                continue
            bits = target if floor_bits is None else max(target, floor_bits)
            if bits != q.bits:
                changed.append(f"{name}.{qname}")
            q.set_bits(bits)
    return changed


@torch.no_grad()
def refit_(
    model: nn.Module,
    names: Iterable[str],
    batches: Iterable,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> list[str]:
    """Re-fit the named quantizers' qparams at their current width, as a fresh PTQ would.

    Weights: :meth:`Quantizer.init_from_weight` of the current (folded) weight with the
    quantizer's calibrator; activations: signedness reset, then observed on ``batches``
    (eval mode, the other quantizers active) and set from their calibrator. On a model
    whose every int quantizer is named this equals ``quantize_`` + :func:`calibrate` of
    its current weights. Dynamic and float-format quantizers have nothing to fit.
    Returns the names re-fitted.
    """
    qs, ops = quantizers(model), quant_ops(model)
    chosen = {n: qs[n] for n in names if not qs[n].dynamic and qs[n].fmt == "int"}
    acts = []
    for n, q in chosen.items():
        if q.is_weight:
            op = ops[n.rpartition(".")[0]]
            q.init_from_weight(
                (op.folded()[0] if isinstance(op, QuantConv2d) else op.weight).detach()
            )
        else:
            q.signed = q.symmetric
            q.q_min, q.q_max = qrange(q.bits, q.symmetric, q.signed)
            acts.append(q)
    for q in acts:
        q.start_observe()
    try:
        forward_batches(model, batches, max_batches, device)
    finally:
        for q in acts:
            q.finish_observe()
    return list(chosen)


def freeze_bn_(model: nn.Module) -> int:
    """Freeze the folded BN statistics (deployed form from now on); returns how many."""
    n = 0
    for op in quant_ops(model).values():
        if isinstance(op, QuantConv2d) and op.bn is not None:
            op.freeze_bn()
            n += 1
    return n


def collapsed_ops(model: nn.Module) -> list[str]:
    """Ops with a NaN/Inf, collapsed (~0) or non-positive (sign-flipped) step size or clip,
    or a non-finite weight (see :meth:`Quantizer.collapsed`)."""
    bad = []
    for name, op in quant_ops(model).items():
        qs = [getattr(op, k, None) for k in ("w_quant", "a_quant", "b_quant")]
        w = getattr(op, "weight", None)
        if any(q is not None and q.collapsed() for q in qs) or (
            w is not None and not torch.isfinite(w).all()
        ):
            bad.append(name)
    return bad


def summary(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per quantized op: kind and the effective bits/format/method of each operand."""
    out = {}
    for name, op in quant_ops(model).items():
        row: dict[str, Any] = {"kind": op.op_kind}
        for key in ("w_quant", "a_quant", "b_quant"):
            q = getattr(op, key, None)
            if q is not None:
                row[key[0]] = {
                    "bits": q.bits,
                    "format": q.fmt,
                    "symmetric": q.symmetric,
                    "signed": q.signed,
                    "granularity": q.granularity,
                    "dynamic": q.dynamic,
                    "calibrator": q.calibrator_name,
                    "learn": q.learn,
                }
        if isinstance(op, QuantConv2d):
            row["bn_folded"] = op.bn is not None
        out[name] = row
    return out


def op_lines(model: nn.Module) -> dict[str, str]:
    """``op -> "W4 int per_channel | A4 int asym mse"`` for results.json."""
    out = {}
    for name, row in summary(model).items():
        parts = []
        for key in ("w", "a", "b"):
            q = row.get(key)
            if q is None:
                continue
            sym = "sym" if q["symmetric"] else "asym"
            rng = "dynamic" if q["dynamic"] else (q["learn"] or q["calibrator"])
            gran = q["granularity"] if key == "w" else sym
            parts.append(f"{key.upper()}{q['bits']} {q['format']} {gran} {rng}")
        out[name] = " | ".join(parts) + (" | bn folded" if row.get("bn_folded") else "")
    return out


def bits_histogram(model: nn.Module) -> dict[str, int]:
    """How many ops at each ``W<b>A<b>`` combination."""
    c: Counter[str] = Counter()
    for row in summary(model).values():
        a = row["a"]["bits"] if "a" in row else "fp"
        if row["kind"] == "matmul":
            c[f"A{a}xA{a}"] += 1
        else:
            c[f"W{row['w']['bits'] if 'w' in row else 'fp'}A{a}"] += 1
    return dict(sorted(c.items()))
