"""Activation curvature: traces of the loss Hessian w.r.t. each op's input operands.

Quantizing the input of op :math:`l` perturbs the activation only where that op
reads it. Write the loss as a function of perturbations :math:`\\delta_k`
added to every operand :math:`k` (the input ``x`` of a Linear/Conv2d; ``a`` and
``b`` of a MatMul ``a @ b``): :math:`L(\\delta)`. A forward pre-hook replaces
each operand by an alias :math:`x_k` (a fresh autograd node that only this op
reads), so :math:`\\partial L/\\partial x_k = \\partial L/\\partial\\delta_k`, and one
reverse-over-reverse product with all operands at once gives
:math:`(\\nabla^2_\\delta L\\, v)_k` for every :math:`k`. As for weights,
:math:`\\mathbb E[v_k^\\top (\\nabla^2_\\delta L\\, v)_k] = \\mathrm{tr}\\,\\nabla^2_{\\delta_k} L`
for Rademacher :math:`v`: all operands from one product per sample.

Per sample: with a mean loss :math:`L = \\frac1B \\sum_i \\ell_i` and samples
that do not interact (eval mode), the Hessian w.r.t. a batched activation is
block diagonal over samples, so

.. math::  \\mathrm{tr}\\, \\nabla^2_{\\delta_k} L = \\frac1B \\sum_i \\mathrm{tr}\\,
           \\nabla^2_{\\delta_{k,i}} \\ell_i ,

the per-sample average the allocator wants. Over several batches the batch
values are averaged with weights :math:`n_b`. With one local batch its graph is
kept across samples; otherwise one batch's graph is built at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from hawq.errors import HawqError
from hawq.hessian import dist
from hawq.hessian.hutchinson import TraceEstimate, rademacher
from hawq.hessian.hvp import Batch, LossFn, evaluating, note_train_mode, reiterable
from hawq.hessian.objective import as_batch_loss
from hawq.hessian.sampling import aggregate_rel_stderr, cross_fit
from hawq.models.ops import op_kind, quantizable_ops

Key = tuple[str, str]  # (op name, operand name)
OPERANDS = {"linear": ("x",), "conv2d": ("x",), "matmul": ("a", "b")}


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A new autograd node equal to ``t`` (a leaf when ``t`` does not require grad)."""
    return t.view_as(t) if t.requires_grad else t.detach().requires_grad_(True)


@contextmanager
def tap_operands(ops: Mapping[str, nn.Module], taps: dict[Key, list[torch.Tensor]]):
    """While active, every call of an op replaces its operands by aliases recorded in ``taps``."""
    handles = []

    def make_hook(name: str, operands: tuple[str, ...]):
        def hook(module: nn.Module, args: tuple) -> tuple:
            new = list(args)
            for i, operand in enumerate(operands):
                new[i] = _alias(args[i])
                taps.setdefault((name, operand), []).append(new[i])
            return tuple(new)

        return hook

    for name, m in ops.items():
        handles.append(m.register_forward_pre_hook(make_hook(name, OPERANDS[op_kind(m)])))
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()


class ActivationGraph:
    """First-order graph of one batch with every op operand aliased.

    Attributes:
        keys: ``(op, operand)`` in call order.
        taps: key -> aliased tensors (one per call of the op).
        grads: key -> :math:`\\partial L / \\partial x_k` per tensor (with graph).
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, ops: Mapping[str, nn.Module], batch: Batch
    ) -> None:
        loss_of = as_batch_loss(loss_fn)
        self.n = loss_of.size(batch)
        taps: dict[Key, list[torch.Tensor]] = {}
        with torch.enable_grad(), tap_operands(ops, taps), evaluating(model):
            loss = loss_of(model, batch)
        self.keys = list(taps)
        self.taps = taps
        flat = [t for k in self.keys for t in taps[k]]
        grads = torch.autograd.grad(loss, flat, create_graph=True, allow_unused=True)
        self.grads: dict[Key, list[torch.Tensor | None]] = {}
        it = iter(grads)
        for k in self.keys:
            self.grads[k] = [next(it) for _ in taps[k]]

    def hvp(self, vs: Mapping[Key, list[torch.Tensor]]) -> dict[Key, list[torch.Tensor]]:
        """:math:`(\\nabla^2_\\delta L\\, v)_k` for all keys; keys missing in ``vs`` are zero."""
        outs, ins, gos = [], [], []
        for k in self.keys:
            for g, v in zip(self.grads[k], vs.get(k, [])):
                if g is not None and g.requires_grad:
                    outs.append(g)
                    gos.append(v)
            ins.extend(self.taps[k])
        hv = (
            torch.autograd.grad(outs, ins, grad_outputs=gos, retain_graph=True, allow_unused=True)
            if outs
            else [None] * len(ins)
        )
        res, it = {}, iter(hv)
        for k in self.keys:
            res[k] = [
                h.detach() if h is not None else torch.zeros_like(t)
                for t, h in zip(self.taps[k], (next(it) for _ in self.taps[k]))
            ]
        return res

    def numel_per_sample(self) -> dict[Key, int]:
        return {k: sum(t.numel() for t in self.taps[k]) // self.n for k in self.keys}


class ActivationHessian:
    """Hutchinson samples of every operand's Hessian trace over a set of batches.

    Args:
        model: the network in eval mode.
        loss_fn: a mean-reduced loss.
        batches: re-iterable ``(x, y)`` batches (sharded under ``torch.distributed``).
        ops: name -> op module (default: every quantizable op of ``model``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Batch],
        ops: Mapping[str, nn.Module] | None = None,
    ) -> None:
        batches = reiterable(batches, "activation traces")
        note_train_mode(model, "activation traces")
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.ops = dict(quantizable_ops(model) if ops is None else ops)
        rank, size = dist.world()
        self.local = [(i, b) for i, b in enumerate(batches) if i % size == rank]
        if not self.local and size == 1:
            raise HawqError("no batches to take the activation Hessian over")
        self._cached: ActivationGraph | None = None
        probe = self._graph(*self.local[0]) if self.local else None
        keys = probe.keys if probe else []
        numel = probe.numel_per_sample() if probe else {}
        self.keys: list[Key] = [
            (n, o)
            for n, m in self.ops.items()
            for o in OPERANDS[op_kind(m)]
            if (n, o) in keys or not keys
        ]
        self.numel = {k: numel.get(k, 0) for k in self.keys}
        self.n_products = 0

    def _graph(self, i: int, batch: Batch) -> ActivationGraph:
        if self._cached is not None:
            return self._cached
        g = ActivationGraph(self.model, self.loss_fn, self.ops, batch)
        if len(self.local) == 1:
            self._cached = g
        return g

    def sample(self, seed: int, index: int) -> torch.Tensor:
        """One estimate :math:`\\sum_b n_b v_{b,k}^\\top (H_b v_b)_k / \\sum_b n_b` per key.

        Probe vectors depend only on ``(seed, index, batch index)``, so the
        result does not depend on how batches are sharded over ranks.
        """
        acc = torch.zeros(len(self.keys), dtype=torch.float64)
        count = torch.zeros(1, dtype=torch.float64)
        for i, batch in self.local:
            graph = self._graph(i, batch)
            gen = torch.Generator().manual_seed(((seed * 1_000_003) + index) * 10_007 + i)
            vs = {
                k: [rademacher(t.numel(), gen, t.dtype, t.device).view_as(t) for t in graph.taps[k]]
                for k in graph.keys
            }
            hv = graph.hvp(vs)
            for j, k in enumerate(self.keys):
                if k in hv:
                    acc[j] += graph.n * sum(
                        float(torch.dot(v.reshape(-1), h.reshape(-1))) for v, h in zip(vs[k], hv[k])
                    )
            count += graph.n
            del graph
        self.n_products += 1
        acc, count = dist.all_reduce_sum([acc.to(self._device()), count.to(self._device())])
        return (acc / count).cpu()

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


def operand_traces(
    act: ActivationHessian,
    rtol: float = 0.05,
    max_samples: int = 500,
    min_samples: int = 10,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> dict[str, dict[str, TraceEstimate]]:
    """Per-sample-average Hessian traces of every operand; stop rule as for weight traces
    (:math:`\\sqrt{\\sum_k s_k^2}/\\sum_k|\\hat t_k| \\approx` rtol, or ``max_samples``),
    cross-fitted so that the estimates are unbiased (:func:`hawq.hessian.sampling.cross_fit`).
    Sample ``i`` uses the probes of ``act.sample(seed, i)``."""
    drawn = 0

    def draw(k: int) -> torch.Tensor:
        nonlocal drawn
        rows = torch.stack([act.sample(seed, drawn + i) for i in range(k)])
        drawn += k
        return rows

    res = cross_fit(
        draw, len(act.keys), aggregate_rel_stderr, rtol, min_samples, max_samples, callback=callback
    )
    out: dict[str, dict[str, TraceEstimate]] = {}
    for j, (name, operand) in enumerate(act.keys):
        out.setdefault(name, {})[operand] = TraceEstimate(
            float(res.mean[j]), float(res.stderr[j]), res.n, act.numel[(name, operand)]
        )
    return out
