"""Block reconstruction PTQ: learn weight rounding and activation step sizes unit by unit.

Plain PTQ rounds every weight to its nearest grid point and fits every activation range
on its own (min/max, MSE, ...). Both choices ignore what the next layers do with the
error. Reconstruction (AdaRound, Nagel et al. 2020; BRECQ, Li et al. 2021; QDrop, Wei et
al. 2022) fixes each quantized *unit* (a transformer block, a residual block, a lone
layer) in network order so that its output matches the FP network's output at the same
point, on a few unlabelled calibration images:

``min_{V, log s_a} ||unit_q(x_q) - unit_fp(x_fp)||^2 + lambda sum_i (1 - |2 h(V_i) - 1|^beta)``

- ``x_q`` is the unit's input in the quantized network (earlier units already fixed, so
  each unit corrects the error that reaches it); the target is the FP network's output.
- Weights (AdaRound): ``W_q = (clamp(floor(W/s) + h(V) + z, q_min, q_max) - z) * s`` with
  the rectified sigmoid ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``,
  ``V`` starting where ``h(V) = frac(W/s)`` (i.e. at W). The regulariser (weight
  ``lambda``, exponent ``beta`` annealed from 20 to 2 after a warm-up without it) pushes
  every ``h`` to 0 or 1: each weight ends rounded down or up, never in between. Step
  sizes and zero points of the weights stay as calibrated.
- Activations: each static activation quantizer's step size is learned (LSQ gradient,
  Adam on ``log s``: it cannot flip sign); zero points stay. With ``drop > 0`` each
  activation element keeps its FP value with that probability during the optimisation
  (QDrop), which makes the solution flatter.
- Biases of the unit's quantized ops are learned too when ``learn_bias`` (AdaQuant).

At the end every weight is written back *exactly on its grid point*
(``W <- (q - z) s``; for a conv with a folded BN the unfolded weight that folds to it),
and learned step sizes go into the quantizers: the model is again a plain PTQ model
(same modules, same state-dict keys) whose quantizers reproduce the chosen codes, so
integer conversion, export and checkpoints need nothing new. A unit whose calibration
error does not improve is restored as it was.

Units: a quantized op belongs to its path's first prefix that is an item of a
``ModuleList``/``Sequential`` (``blocks.3``, ``layer2.1``), else to its top-level
module (``patch_embed``, ``head``). Dynamic (per-call) and float-format quantizers have
nothing to learn and stay as they are. LSQ quantizers (QAT) are treated like static ones, so
a progressive QAT can reconstruct after a bit drop (``qat.reconstruct_on_drop``).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from hawq.batches import model_inputs
from hawq.engine import call_model
from hawq.errors import HawqError
from hawq.quant.bn_fold import unfold_weight
from hawq.quant.learnable import lsq_fake_quantize
from hawq.quant.modules import QuantConv2d
from hawq.quant.quantizer import MIN_SCALE, Quantizer
from hawq.schema import require

log = logging.getLogger("hawq")
Tensor = torch.Tensor
GAMMA, ZETA = -0.1, 1.1  # AdaRound's stretch of the sigmoid


@dataclass
class ReconstructSettings:
    """What :func:`reconstruct_` optimises and how long (see the module docstring)."""

    iters: int = 2000  # Adam steps per unit
    batch_size: int = 32  # calibration images per step
    lr: float = 1e-2  # rounding variables V (AdaRound: 1e-3 over 20k steps; 10x for 2k)
    act_lr: float = 1e-3  # log of the activation step sizes (relative change per step)
    bias_lr: float = 1e-4  # biases (absolute)
    reg: float = 0.01  # lambda of the rounding regulariser (summed over the unit's weights)
    warmup: float = 0.2  # fraction of iters without the regulariser
    beta_start: float = 20.0  # regulariser exponent, annealed (cosine) to beta_end
    beta_end: float = 2.0
    drop: float = 0.5  # QDrop: probability an activation element stays FP while optimising
    hard_tail: float = 0.1  # last fraction of iters with the rounding fixed (steps, biases adapt)
    learn_bias: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.iters >= 1, "iters", self.iters, "an integer >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(0.0 <= self.drop < 1.0, "drop", self.drop, "a probability in [0, 1)")
        require(0.0 <= self.warmup < 1.0, "warmup", self.warmup, "a fraction in [0, 1)")
        require(
            0.0 <= self.hard_tail < 1.0 - self.warmup,
            "hard_tail",
            self.hard_tail,
            "a fraction in [0, 1 - warmup)",
        )
        require(
            min(self.lr, self.act_lr, self.bias_lr, self.reg) >= 0,
            "lr",
            self.lr,
            "learning rates and reg >= 0",
        )
        require(
            self.beta_start > 0 and self.beta_end > 0,
            "beta_start",
            self.beta_start,
            "> 0 (and beta_end > 0)",
        )


def unit_of(model: nn.Module, op_name: str) -> str:
    """The unit an op belongs to (module docstring): ``blocks.3.mlp.fc2`` -> ``blocks.3``."""
    parts = op_name.split(".")
    mod = model
    for i, p in enumerate(parts[:-1]):
        child = getattr(mod, p) if not p.isdigit() else mod[int(p)]
        if isinstance(mod, (nn.ModuleList, nn.Sequential)):
            return ".".join(parts[: i + 1])
        mod = child
    if isinstance(mod, (nn.ModuleList, nn.Sequential)):
        return op_name
    return parts[0]


def units(model: nn.Module) -> dict[str, list[str]]:
    """Unit name -> its quantized ops, in network (module registration) order."""
    from hawq.quant.api import quant_ops

    out: dict[str, list[str]] = {}
    for name in quant_ops(model):
        out.setdefault(unit_of(model, name), []).append(name)
    return out


def calibration_images(batches: Iterable, max_batches: int) -> Any:
    """The inputs of the first ``max_batches`` batches, concatenated: the images of
    ``(x, y)`` pairs, or dicts of keyword inputs (token ids, masks) entry by entry."""
    first = list(itertools.islice(iter(batches), max_batches))
    return _cat([model_inputs(b) for b in first])


def _h(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class AdaRoundWeight(nn.Module):
    """Stands in for a static int weight quantizer while its unit is optimised."""

    def __init__(self, q: Quantizer, w: Tensor) -> None:
        super().__init__()
        self.q = q
        s = q.scale.detach()
        rest = (w.detach() / s - torch.floor(w.detach() / s)).clamp(1e-4, 1 - 1e-4)
        # h(V) = rest  <=>  sigmoid(V) = (rest - gamma) / (zeta - gamma)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))

    def _zero(self) -> Tensor:
        z = self.q._zero(self.q.zero_point)
        return torch.zeros((), device=self.v.device) if z is None else z

    def codes(self, w: Tensor, hard: bool) -> Tensor:
        s = self.q.scale.detach()
        frac = (self.v >= 0).to(w.dtype) if hard else _h(self.v)
        return torch.clamp(
            torch.floor(w.detach() / s) + frac + self._zero(), self.q.q_min, self.q.q_max
        )

    def forward(self, w: Tensor) -> Tensor:
        return (self.codes(w, hard=not self.training) - self._zero()) * self.q.scale.detach()

    def regulariser(self, beta: float) -> Tensor:
        return (1.0 - (2.0 * _h(self.v) - 1.0).abs().pow(beta)).sum()


class LearnedStep(nn.Module):
    """Stands in for a static int activation quantizer: LSQ on ``log s``, optional QDrop."""

    def __init__(self, q: Quantizer, drop: float) -> None:
        super().__init__()
        self.q, self.drop = q, drop
        self.log_s = nn.Parameter(q.scale.detach().clamp(min=MIN_SCALE).log().clone())

    def forward(self, x: Tensor) -> Tensor:
        q = self.q
        out = lsq_fake_quantize(
            x, self.log_s.exp(), q.q_min, q.q_max, 1.0, q._zero(q.zero_point), MIN_SCALE
        )
        if self.training and self.drop > 0:
            keep_fp = torch.rand_like(x) < self.drop
            out = torch.where(keep_fp, x, out)
        return out


def _static_int(q: Any) -> bool:
    """An int quantizer with a stored step size: PTQ's, or LSQ's during QAT (LSQ+ offsets
    and PACT clips parametrise the grid differently and are left alone)."""
    return (
        isinstance(q, Quantizer) and q.fmt == "int" and not q.dynamic and q.learn in (None, "lsq")
    )


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture(model: nn.Module, unit: nn.Module, images: Any, batch: int, what: str) -> list[Any]:
    """The unit's inputs (``what="in"``: (args, kwargs) per batch) or outputs over ``images``
    (a tensor, or a dict of keyword inputs)."""
    got: list[Any] = []

    def pre(_m, args, kwargs):
        if what == "in":
            got.append((args, kwargs))
            raise _Stop

    def post(_m, _args, out):
        got.append(_detached(out))
        raise _Stop

    h = (
        unit.register_forward_pre_hook(pre, with_kwargs=True)
        if what == "in"
        else unit.register_forward_hook(post)
    )
    try:
        n = _batch_size(images)
        for i in range(0, n, batch):
            try:
                call_model(model, _take(images, torch.arange(i, min(i + batch, n)), n))
            except _Stop:
                pass
    finally:
        h.remove()
    return got


def _detached(x: Any) -> Any:
    """``x`` with every tensor detached; tuples, lists, dicts and ``ModelOutput``s (dicts)
    keep their structure (a list becomes a tuple, a ``ModelOutput`` a dict)."""
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, tuple | list):
        return tuple(_detached(v) for v in x)
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items() if v is not None}
    return x


def _leaves(x: Any) -> list[Tensor]:
    """The floating-point tensors of an output, in order (what reconstruction matches)."""
    if isinstance(x, Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, tuple | list):
        return [t for v in x for t in _leaves(v)]
    if isinstance(x, dict):
        return [t for v in x.values() if v is not None for t in _leaves(v)]
    return []


def _batch_size(target: Any) -> int:
    tensors = _leaves(target) or [t for t in _values(target) if isinstance(t, Tensor)]
    return tensors[0].shape[0]


def _values(x: Any) -> list[Any]:
    return list(x.values()) if isinstance(x, dict) else [x]


def _cat(chunks: list[Any]) -> Any:
    """Concatenate captured (args, kwargs) / tensors along the batch dim."""
    first = chunks[0]
    if isinstance(first, Tensor):
        return torch.cat(chunks)
    if isinstance(first, tuple):
        return tuple(_cat([c[i] for c in chunks]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat([c[k] for c in chunks]) for k in first}
    return first  # non-tensor argument: the same in every batch


def _take(x: Any, idx: Tensor, n: int) -> Any:
    """Rows ``idx`` of every tensor whose first dim is the batch ``n``."""
    if isinstance(x, Tensor):
        return x[idx] if x.dim() and x.shape[0] == n else x
    if isinstance(x, tuple):
        return tuple(_take(v, idx, n) for v in x)
    if isinstance(x, dict):
        return {k: _take(v, idx, n) for k, v in x.items()}
    return x


def _sq_err(out: Any, target: Any) -> Tensor:
    """Squared error summed over the feature dim (channels: dim 1 of a 4-D map, else the
    last), mean over everything else (samples, tokens, positions), as BRECQ weighs it
    against the rounding regulariser; summed over the floating tensors of a structured
    output (a tuple, a dict, a ``ModelOutput``)."""
    total = torch.zeros(())
    for o, t in zip(_leaves(out), _leaves(target), strict=True):
        err = (o.float() - t.float()).pow(2)
        feat = err.shape[1] if err.dim() == 4 else err.shape[-1]
        total = total.to(err.device) + err.mean() * feat
    return total


@torch.no_grad()
def _unit_error(unit: nn.Module, inputs: Any, target: Any, batch: int) -> float:
    n = _batch_size(target)
    device = _leaves(target)[0].device
    total = 0.0
    for i in range(0, n, batch):
        idx = torch.arange(i, min(i + batch, n), device=device)
        args, kwargs = _take(inputs, idx, n)
        total += float(_sq_err(unit(*args, **kwargs), _take(target, idx, n))) * idx.numel()
    return total / n


class _Swap:
    """The unit's static int quantizers replaced by learnable stand-ins (and back)."""

    def __init__(self, model: nn.Module, op_names: list[str], st: ReconstructSettings) -> None:
        self.items: list[tuple[nn.Module, str, Quantizer, nn.Module]] = []
        self.biases: list[nn.Parameter] = []
        for name in op_names:
            op = model.get_submodule(name)
            for attr in ("w_quant", "a_quant", "b_quant"):
                q = getattr(op, attr, None)
                if not _static_int(q):
                    continue
                if attr == "w_quant":
                    w = op.folded()[0] if isinstance(op, QuantConv2d) else op.weight
                    new: nn.Module = AdaRoundWeight(q, w)
                else:
                    new = LearnedStep(q, st.drop)
                setattr(op, attr, new)
                self.items.append((op, attr, q, new))
            bias = getattr(op, "bias", None)
            if st.learn_bias and isinstance(bias, nn.Parameter) and getattr(op, "bn", None) is None:
                self.biases.append(bias)

    def groups(self, st: ReconstructSettings) -> list[dict]:
        v = [m.v for *_, m in self.items if isinstance(m, AdaRoundWeight)]
        s = [m.log_s for *_, m in self.items if isinstance(m, LearnedStep)]
        return [
            g
            for g in (
                {"params": v, "lr": st.lr},
                {"params": s, "lr": st.act_lr},
                {"params": self.biases, "lr": st.bias_lr},
            )
            if g["params"]
        ]

    def regulariser(self, beta: float) -> Tensor:
        """``sum_i 1 - |2 h(V_i) - 1|^beta`` over the unit's rounding variables (0 once all
        settled), as AdaRound/BRECQ weigh it against :func:`_sq_err`."""
        terms = [m.regulariser(beta) for *_, m in self.items if isinstance(m, AdaRoundWeight)]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def train(self, mode: bool) -> None:
        for *_, m in self.items:
            m.train(mode)

    def harden(self) -> None:
        """Weights from here on at their hard rounding (no gradient to V)."""
        for *_, m in self.items:
            if isinstance(m, AdaRoundWeight):
                m.train(False)

    @torch.no_grad()
    def unsettled(self) -> float:
        """Fraction of rounding variables with ``h(V)`` still strictly inside (0.01, 0.99)."""
        hs = [_h(m.v).flatten() for *_, m in self.items if isinstance(m, AdaRoundWeight)]
        if not hs:
            return 0.0
        h = torch.cat(hs)
        return float(((h > 0.01) & (h < 0.99)).float().mean())

    @torch.no_grad()
    def restore(self) -> None:
        """Put the quantizers back: weights on their hard grid points, learned steps in."""
        for op, attr, q, m in self.items:
            if isinstance(m, AdaRoundWeight):
                folded = isinstance(op, QuantConv2d) and op.bn is not None
                w_f = op.folded()[0] if folded else op.weight
                w_q = (m.codes(w_f, hard=True) - m._zero()) * q.scale
                op.weight.copy_(unfold_weight(w_q, op.bn, op.weight) if folded else w_q)
            else:
                q.scale.copy_(m.log_s.exp().clamp(min=MIN_SCALE))
            setattr(op, attr, q)


def _soft_steps(st: ReconstructSettings) -> int:
    """Steps before the hard tail (rounding fixed after them)."""
    return int((1.0 - st.hard_tail) * st.iters)


def _beta(st: ReconstructSettings, it: int) -> float | None:
    """The regulariser's exponent at step ``it`` (None in the warm-up and the hard tail)."""
    warm, soft = int(st.warmup * st.iters), _soft_steps(st)
    if it < warm or it >= soft:
        return None
    t = (it - warm) / max(soft - warm, 1)
    start, end = st.beta_start, st.beta_end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def _optimise(
    unit: nn.Module,
    swap: _Swap,
    inputs: Any,
    target: Any,
    st: ReconstructSettings,
    gen: torch.Generator,
    desc: str,
) -> float:
    """Adam over the unit's stand-ins; returns the last step's reconstruction error."""
    opt = torch.optim.Adam(swap.groups(st))
    n = _batch_size(target)
    device = _leaves(target)[0].device
    rec = torch.zeros(())
    swap.train(True)
    soft = _soft_steps(st)
    with torch.enable_grad():
        for it in tqdm(range(st.iters), desc=desc, leave=False, disable=None):
            if it == soft:  # rounding fixed from here: the rest adapts to the hard weights
                swap.harden()
            idx = torch.randint(n, (min(st.batch_size, n),), generator=gen).to(device)
            args, kwargs = _take(inputs, idx, n)
            rec = _sq_err(unit(*args, **kwargs), _take(target, idx, n))
            beta = _beta(st, it)
            loss = rec if beta is None else rec + st.reg * swap.regulariser(beta)
            if not loss.requires_grad:  # hard tail with nothing else to learn
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    swap.train(False)
    return float(rec.detach())


def reconstruct_(
    model: nn.Module,
    fp_model: nn.Module,
    images: Any,
    st: ReconstructSettings | None = None,
    eval_batch: int = 256,
    resume: dict | None = None,
    on_unit: Callable[[dict], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Reconstruct a calibrated quantized ``model`` unit by unit against ``fp_model``.

    Args:
        model: quantized with :func:`~hawq.quant.quantize_` (PTQ, no QAT method) and
            calibrated; changed in place.
        fp_model: the FP model it was quantized from (same module names).
        images: calibration inputs ``(N, ...)`` on the models' device (no labels used),
            or a dict of keyword inputs with ``N`` rows each (token ids, masks).
        st: settings (defaults: :class:`ReconstructSettings`).
        eval_batch: batch for the captures and the before/after errors.
        resume: a state ``on_unit`` gave an earlier, stopped call with the same inputs:
            its finished units are loaded and skipped and the random streams restored, so
            the result is the uninterrupted call's.
        on_unit: called after each unit with the resumable state (``model``: the state
            dict, ``report``, ``generator`` / ``rng``: the random streams); saving it makes
            a long reconstruction stoppable.

    Returns:
        per unit: ops, quantizers learned, squared error per image on ``images`` before
        and after, whether the result was kept, seconds.
    """
    st = st or ReconstructSettings()
    plan = units(model)
    if not plan:
        raise HawqError("reconstruct: the model has no quantized ops (run quantize_ first)")
    fp_names = dict(fp_model.named_modules())
    missing = [u for u in plan if u not in fp_names]
    if missing:
        raise HawqError(
            f"reconstruct: fp_model has no module {missing[0]!r}; pass the FP "
            "model the quantized one was made from"
        )
    was = model.training, fp_model.training
    model.eval()
    fp_model.eval()
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(st.seed)
    torch.manual_seed(st.seed)  # QDrop masks
    report = {} if resume is None else _resume(model, resume, plan, gen)
    try:
        for uname, ops in plan.items():
            if uname in report:  # finished before a stop
                continue
            unit = (uname, ops)
            report[uname] = _reconstruct_unit(model, fp_model, unit, images, st, gen, eval_batch)
            if on_unit is not None:
                rng = {"generator": gen.get_state(), "rng": torch.get_rng_state()}
                on_unit({"model": model.state_dict(), "report": report, **rng})
    finally:
        for p, g in grads.items():
            p.requires_grad_(g)
        model.train(was[0])
        fp_model.train(was[1])
    return report


def _resume(model: nn.Module, state: dict, plan: dict, gen: torch.Generator) -> dict:
    """Load a stopped reconstruction's finished units and random streams; its report."""
    report = dict(state.get("report") or {})
    unknown = sorted(set(report) - set(plan))
    if unknown:
        raise HawqError(f"reconstruct: the resume state has units {unknown} this model lacks")
    model.load_state_dict(state["model"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["rng"])
    log.info("reconstruct: resuming after %d of %d units", len(report), len(plan))
    return report


def _reconstruct_unit(model, fp_model, unit_ops, images, st, gen, batch: int) -> dict:
    """One unit fitted to the FP model's output there (kept only if its error fell)."""
    uname, ops = unit_ops
    t0 = time.perf_counter()
    unit = model.get_submodule(uname)
    inputs = _cat(_capture(model, unit, images, batch, "in"))
    target = _cat(_capture(fp_model, fp_model.get_submodule(uname), images, batch, "out"))
    before = _unit_error(unit, inputs, target, batch)
    saved = copy.deepcopy(unit.state_dict())
    swap = _Swap(model, ops, st)
    for b in swap.biases:
        b.requires_grad_(True)
    row: dict[str, Any] = {"ops": ops, "learned": len(swap.items), "before": before}
    if not swap.items and not swap.biases:
        swap.restore()
        return {**row, "after": before, "kept": False, "seconds": 0.0}
    try:
        _optimise(unit, swap, inputs, target, st, gen, f"reconstruct {uname}")
        row["unsettled"] = swap.unsettled()
    finally:
        swap.restore()
        for b in swap.biases:
            b.requires_grad_(False)
    after = _unit_error(unit, inputs, target, batch)
    kept = after <= before
    if not kept:
        unit.load_state_dict(saved)
        after = before
    row.update(after=after, kept=kept, seconds=time.perf_counter() - t0)
    log.info(
        "reconstruct %s: error %.4g -> %.4g%s, %.1f%% of roundings unsettled (%.1f s)",
        uname,
        before,
        after,
        "" if kept else " (worse: restored)",
        100 * row.get("unsettled", 0.0),
        row["seconds"],
    )
    return row
