"""Loss landscapes around a model's weights, and where quantization moves them.

A *direction* :math:`d` is a mapping parameter name -> tensor shaped like that
parameter (keys: the ``weight`` / ``bias`` of the quantizable ops, see
:func:`op_parameters`). For weights :math:`\\theta` and a fixed set of batches,

.. math::  f_1(t) = L(\\theta + t\\, d), \\qquad
           f_2(\\alpha, \\beta) = L(\\theta + \\alpha\\, d_1 + \\beta\\, d_2)

are the 1D and 2D surfaces (:func:`surface_1d`, :func:`surface_2d`). Along a
unit eigenvector :math:`u` of the Hessian with eigenvalue :math:`\\lambda`, at
a minimum, :math:`f_1(t) \\approx L_0 + \\tfrac12 \\lambda t^2` (exact for a
quadratic loss).

Directions:

* :func:`eigen_directions`: top eigenvectors of the Hessian of the whole model
  (all op weights and biases), or of one op's diagonal block embedded in the
  full space (zeros elsewhere), by Lanczos / power iteration on the
  :class:`~hawq.hessian.HessianOperator` of :mod:`hawq.hessian`. Unit norm.
* :func:`filter_normalized`: Li et al. (2018, "Visualizing the Loss Landscape
  of Neural Nets") random directions: a Gaussian :math:`d` rescaled per filter,
  :math:`d_{i} \\leftarrow d_{i}\\, \\lVert \\theta_{i} \\rVert / \\lVert d_{i} \\rVert`,
  where a filter :math:`i` is one slice along dim 0 (a conv output channel, a
  linear output row). One-dimensional parameters (biases; BatchNorm and
  LayerNorm are not op parameters at all) get a zero direction, as Li et al.
  do for biases and BN.

Quantization (:func:`quant_offset`): a fake-quant model from
:func:`hawq.quant.quantize_` shares the FP weights :math:`W` and computes with
:math:`Q(W)`; :math:`\\delta = Q(W) - W` is where weight quantization moves the
FP model. :func:`quant_point` reports :math:`L(W + \\delta)`, the coordinates
:math:`\\langle \\delta, d \\rangle / \\langle d, d \\rangle` of
:math:`\\delta` along each plotted direction and the share of
:math:`\\lVert\\delta\\rVert` outside their span. :func:`op_quant_rise`
answers "does the sharper layer's quantization land higher?": for every op
:math:`l` alone, the rise :math:`L(W + \\delta_l) - L(W)` beside its
second-order prediction :math:`g_l^\\top \\delta_l + \\tfrac12 \\delta_l^\\top
H_{ll} \\delta_l` and the op's top eigenvalue.

Weight quantizers keep the scales they were calibrated with: the surface of a
quantized model at :math:`W + t d` is that of :math:`Q(W + t d)` with fixed
steps (the PTQ model moved in weight space), piecewise constant at small steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from scipy import stats
from torch import nn

from hawq.batches import run_inputs
from hawq.hessian import HessianOperator, lanczos, power_iteration
from hawq.models.ops import as_logits, quantizable_ops
from hawq.quant import quant_ops
from hawq.quant.bn_fold import unfold_weight

Direction = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EIG_METHODS = {"lanczos": lanczos, "power": power_iteration}


def op_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``<op>.weight`` / ``<op>.bias`` -> parameter of every quantizable op, network order.

    Quantized wrappers keep the FP weight under the same name, so the keys of an
    FP model and of its quantized copy agree.
    """
    out: dict[str, nn.Parameter] = {}
    for name, module in quantizable_ops(model).items():
        for pname, p in module.named_parameters(recurse=False):
            if pname in ("weight", "bias"):
                out[f"{name}.{pname}"] = p
    return out


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """:math:`\\langle a, b \\rangle` over the keys both share (float64 sums)."""
    return float(sum((a[k].double() * b[k].double()).sum() for k in a if k in b))


def project(delta: Mapping[str, torch.Tensor], d: Mapping[str, torch.Tensor]) -> float:
    """Coordinate of ``delta`` along ``d``.

    .. math::  c = \\langle\\delta, d\\rangle / \\langle d, d\\rangle
    """
    dd = dot(d, d)
    return dot(delta, d) / dd if dd > 0 else 0.0


def filter_normalized(
    weights: Mapping[str, torch.Tensor], seed: int = 0, eps: float = 1e-10
) -> Direction:
    """A random direction with every filter scaled to its weight filter's norm (Li et al.).

    For a parameter :math:`\\theta` with :math:`\\ge 2` dims and Gaussian :math:`d`,
    filter :math:`i` (``d[i]``) becomes :math:`d_i \\lVert\\theta_i\\rVert /
    (\\lVert d_i\\rVert + \\epsilon)`; 1-dim parameters (biases) get zeros.

    Args:
        weights: name -> parameter (e.g. :func:`op_parameters`).
        seed: seeds the Gaussian draw (drawn in float64 on the CPU, in key order).
        eps: guards an all-zero Gaussian filter.
    """
    gen = torch.Generator().manual_seed(seed)
    out: Direction = {}
    for name, w in weights.items():
        w = w.detach()
        if w.ndim < 2:
            out[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        w64 = w.double().cpu()
        shape = (-1,) + (1,) * (w.ndim - 1)
        scale = w64.flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + eps)  # (filters,)
        out[name] = (d * scale.view(shape)).to(w.dtype).to(w.device)
    return out


@contextmanager
def shifted(
    model: nn.Module, moves: Sequence[tuple[float, Mapping[str, torch.Tensor]]]
) -> Iterator[nn.Module]:
    """Temporarily set :math:`\\theta \\leftarrow \\theta + \\sum_j c_j d_j` (restored exactly)."""
    params = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for c, d in moves:
                for name, t in d.items():
                    p = params[name]
                    if name not in saved:
                        saved[name] = p.detach().clone()
                    p.add_(t.to(device=p.device, dtype=p.dtype), alpha=float(c))
        yield model
    finally:
        with torch.no_grad():
            for name, v in saved.items():
                params[name].copy_(v)


@dataclass
class LossProbe:
    """Mean loss and accuracy of a model over fixed batches (eval mode, no grad).

    Attributes:
        batches: ``(x, y)`` pairs, evaluated in full at every point.
        loss_fn: ``loss_fn(logits, y)``, a mean over the batch.
        calls: evaluations so far.
    """

    batches: Sequence[Batch]
    loss_fn: LossFn = field(default_factory=nn.CrossEntropyLoss)
    calls: int = 0

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> tuple[float, float]:
        """``(loss, accuracy %)``: sample-weighted means over :attr:`batches`.

        Accuracy is NaN when the targets are not class indices (regression losses).
        """
        was_training = model.training
        model.eval()
        total, correct, n = 0.0, 0, 0
        for x, y in self.batches:
            out = as_logits(run_inputs(model, x))
            total += float(self.loss_fn(out, y)) * len(y)
            if classify := (y.ndim == 1 and not y.is_floating_point()):
                correct += int((out.argmax(-1) == y).sum())
            n += len(y)
        model.train(was_training)
        self.calls += 1
        return total / n, 100.0 * correct / n if classify else float("nan")


def surface_1d(
    model: nn.Module, probe: LossProbe, d: Mapping[str, torch.Tensor], ts: Sequence[float]
) -> dict[str, list[float]]:
    """:math:`L(\\theta + t d)` for every ``t``: ``{"t", "loss", "acc"}``."""
    loss, acc = [], []
    for t in ts:
        with shifted(model, [(t, d)]):
            lo, ac = probe(model)
        loss.append(lo)
        acc.append(ac)
    return {"t": [float(t) for t in ts], "loss": loss, "acc": acc}


def surface_2d(
    model: nn.Module,
    probe: LossProbe,
    d1: Mapping[str, torch.Tensor],
    d2: Mapping[str, torch.Tensor],
    alphas: Sequence[float],
    betas: Sequence[float],
) -> dict[str, list]:
    """:math:`L(\\theta + \\alpha d_1 + \\beta d_2)` on a grid.

    ``loss[i][j]`` (and ``acc``) is at ``(alphas[j], betas[i])``.
    """
    loss, acc = [], []
    for b in betas:
        row_l, row_a = [], []
        for a in alphas:
            with shifted(model, [(a, d1), (b, d2)]):
                lo, ac = probe(model)
            row_l.append(lo)
            row_a.append(ac)
        loss.append(row_l)
        acc.append(row_a)
    return {
        "alpha": [float(a) for a in alphas],
        "beta": [float(b) for b in betas],
        "loss": loss,
        "acc": acc,
    }


@dataclass
class EigenDirections:
    """Top Hessian eigenpairs as directions (unit norm over the op parameters).

    Attributes:
        values: eigenvalues, largest magnitude first.
        directions: one :data:`Direction` per eigenvalue.
        residuals: relative residuals :math:`\\lVert Hu-\\lambda u\\rVert/|\\lambda|`.
        products: Hessian-vector products used.
        scope: ``"model"`` or the op whose diagonal block was used.
    """

    values: list[float]
    directions: list[Direction]
    residuals: list[float]
    products: int
    scope: str


def _blocks(params: Mapping[str, nn.Parameter]) -> dict[str, list[nn.Parameter]]:
    blocks: dict[str, list[nn.Parameter]] = {}
    for name, p in params.items():
        blocks.setdefault(name.rsplit(".", 1)[0], []).append(p)
    return blocks


def _unflatten(v: torch.Tensor, params: Mapping[str, torch.Tensor]) -> Direction:
    out, start = {}, 0
    for name, p in params.items():
        out[name] = v[start : start + p.numel()].view_as(p).detach().clone()
        start += p.numel()
    return out


def _flatten(d: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1) for n in names])


def eigen_directions(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    top_k: int = 2,
    op: str | None = None,
    method: str = "lanczos",
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    backend: str = "double_backward",
) -> EigenDirections:
    """Top-``top_k`` Hessian eigenvectors over all op parameters (or one op's block).

    The operator is :math:`\\bar H` of :class:`hawq.hessian.HessianOperator` over
    the parameters of :func:`op_parameters`; with ``op`` its diagonal block
    :math:`\\bar H_{ll}`, whose eigenvectors are embedded with zeros elsewhere.

    Args:
        model: eval mode, not compiled.
        loss_fn, batches: the loss whose Hessian is taken.
        top_k: eigenpairs (largest magnitude).
        op: an op name for its block, None for the whole model.
        method: ``lanczos`` or ``power``.
        tol, max_iter, seed: passed to the eigensolver.
        backend: HVP backend of :mod:`hawq.hessian.hvp`.
    """
    if method not in EIG_METHODS:
        raise ValueError(f"unknown eigen method {method!r}; allowed: {', '.join(EIG_METHODS)}")
    params = op_parameters(model)
    blocks = _blocks(params)
    if op is not None and op not in blocks:
        raise ValueError(f"op {op!r} has no parameters; ops: {', '.join(blocks)}")
    hop = HessianOperator(model, loss_fn, batches, blocks=blocks, backend=backend)
    target = hop if op is None else hop.block(op)
    res = EIG_METHODS[method](target, top_k=top_k, tol=tol, max_iter=max_iter, seed=seed)
    hop.release()
    span = params if op is None else {n: p for n, p in params.items() if n.rsplit(".", 1)[0] == op}
    dirs = []
    for v in res.vectors:
        d = {n: torch.zeros_like(p.detach()) for n, p in params.items()}
        d.update(_unflatten(v, span))
        dirs.append(d)
    return EigenDirections(res.values, dirs, res.residuals, hop.n_hvp, op or "model")


@torch.no_grad()
def quant_offset(qmodel: nn.Module) -> Direction:
    """:math:`\\delta = Q(W) - W` of every weight-quantized op, keyed ``<op>.weight``.

    A conv with a folded BatchNorm quantizes :math:`W_f = W \\gamma/\\sigma`; its
    offset is taken in the unfolded space, :math:`Q(W_f)\\,\\sigma/\\gamma - W`,
    which gives the same eval-mode function (channels with :math:`\\gamma = 0`
    get 0).
    """
    out: Direction = {}
    for name, m in quant_ops(qmodel).items():
        if getattr(m, "w_quant", None) is None:
            continue
        wq = m.quantized_weight().detach()
        bn = getattr(m, "bn", None)
        if bn is not None:
            wq = unfold_weight(wq, bn, m.weight)
        out[f"{name}.weight"] = wq - m.weight.detach()
    return out


def quant_point(
    model: nn.Module,
    probe: LossProbe,
    delta: Mapping[str, torch.Tensor],
    directions: Mapping[str, Mapping[str, torch.Tensor]],
) -> dict:
    """Where :math:`W + \\delta` lies relative to the plotted directions.

    Returns:
        ``loss`` / ``acc`` of the FP model at :math:`W+\\delta`, ``norm``
        :math:`\\lVert\\delta\\rVert`, ``coords`` (name -> coordinate
        :math:`\\langle\\delta,d\\rangle/\\langle d,d\\rangle`) and
        ``outside`` :math:`\\lVert\\delta - P\\delta\\rVert / \\lVert\\delta\\rVert`
        with :math:`P` the orthogonal projector on the directions' span.
    """
    with shifted(model, [(1.0, delta)]):
        loss, acc = probe(model)
    basis: list[dict[str, torch.Tensor]] = []  # Gram-Schmidt, float64
    for d in directions.values():
        u = {k: v.double() for k, v in d.items()}
        for b in basis:
            c = dot(u, b)
            u = {k: u[k] - c * b[k] for k in u}
        n = dot(u, u) ** 0.5
        if n > 1e-12:
            basis.append({k: v / n for k, v in u.items()})
    norm2 = dot(delta, delta)
    inside = sum(dot(delta, b) ** 2 for b in basis)
    outside = max(norm2 - inside, 0.0) ** 0.5 / norm2**0.5 if norm2 > 0 else 0.0
    return {
        "loss": loss,
        "acc": acc,
        "norm": norm2**0.5,
        "outside": outside,
        "coords": {name: project(delta, d) for name, d in directions.items()},
    }


def loss_gradient(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], params: Mapping[str, nn.Parameter]
) -> Direction:
    """:math:`\\nabla L` (sample-weighted over ``batches``) w.r.t. ``params``."""
    grads = {n: torch.zeros_like(p.detach()) for n, p in params.items()}
    n_total = 0
    names = list(params)
    for x, y in batches:
        with torch.enable_grad():
            loss = loss_fn(as_logits(run_inputs(model, x)), y)
            gs = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for name, g in zip(names, gs):
            if g is not None:
                grads[name] += g.detach() * len(y)
        n_total += len(y)
    return {n: g / n_total for n, g in grads.items()}


def op_quant_rise(
    model: nn.Module,
    probe: LossProbe,
    delta: Mapping[str, torch.Tensor],
    eig_max_iter: int = 0,
    eig_tol: float = 1e-3,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per op, quantize only its weights: measured rise vs the second-order model.

    For op :math:`l` with offset :math:`\\delta_l` (other ops FP):

    .. math::  \\Delta L_l = L(W + \\delta_l) - L(W), \\qquad
               \\widehat{\\Delta L}_l = g_l^\\top \\delta_l
                 + \\tfrac12 \\delta_l^\\top H_{ll} \\delta_l ,

    and :math:`\\rho_l = \\delta_l^\\top H_{ll}\\delta_l / \\lVert\\delta_l\\rVert^2`
    (curvature along the quantization offset). Gradient and Hessian are over
    ``probe.batches`` and the op's weight only.

    Args:
        model: the FP model (eval mode).
        probe: the batches and loss.
        delta: :func:`quant_offset` of a quantized copy.
        eig_max_iter: when > 0, also the top eigenvalue ``lambda`` of
            :math:`H_{ll}` by Lanczos with this many products.
        eig_tol, seed: Lanczos tolerance and start vector seed.

    Returns:
        op -> ``rise``, ``linear``, ``quadratic``, ``predicted``, ``norm``,
        ``curvature`` (and ``lambda``).
    """
    params = dict(model.named_parameters())
    keys = [k for k in delta if k in params]
    weights = {k: params[k] for k in keys}
    loss0, _ = probe(model)
    grad = loss_gradient(model, probe.loss_fn, probe.batches, weights)
    hop = HessianOperator(
        model,
        probe.loss_fn,
        list(probe.batches),
        blocks={k.rsplit(".", 1)[0]: [weights[k]] for k in keys},
        backend="double_backward",
    )
    out: dict[str, dict[str, float]] = {}
    # all products first: shifting the weights in place would invalidate the cached graph
    for k in keys:
        op = k.rsplit(".", 1)[0]
        v = delta[k].reshape(-1).to(hop.dtype)
        quad = 0.5 * float(torch.dot(v, hop.block(op) @ v))
        lin = float((grad[k] * delta[k]).sum())
        norm2 = float(torch.dot(v, v))
        out[op] = {
            "linear": lin,
            "quadratic": quad,
            "predicted": lin + quad,
            "norm": norm2**0.5,
            "curvature": 2 * quad / norm2 if norm2 > 0 else 0.0,
        }
        if eig_max_iter > 0:
            res = lanczos(hop.block(op), top_k=1, tol=eig_tol, max_iter=eig_max_iter, seed=seed)
            out[op]["lambda"] = res.values[0]
    hop.release()
    for k in keys:
        with shifted(model, [(1.0, {k: delta[k]})]):
            loss, _ = probe(model)
        out[k.rsplit(".", 1)[0]]["rise"] = loss - loss0
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation of ``x`` and ``y`` (None with < 3 points or a constant)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)


def second_order(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], delta: Mapping[str, torch.Tensor]
) -> tuple[float, float]:
    """``(g^T delta, delta^T H delta)`` over the parameters ``delta`` names.

    Along the segment :math:`W + t\\delta` the second-order model is
    :math:`L_0 + t\\, g^\\top\\delta + \\tfrac12 t^2\\, \\delta^\\top H \\delta`.
    """
    params = dict(model.named_parameters())
    keys = [k for k in delta if k in params]
    weights = {k: params[k] for k in keys}
    grad = loss_gradient(model, loss_fn, batches, weights)
    hop = HessianOperator(
        model,
        loss_fn,
        list(batches),
        blocks={"delta": list(weights.values())},
        backend="double_backward",
    )
    v = _flatten(delta, keys).to(hop.dtype)
    quad = float(torch.dot(v, hop @ v))
    hop.release()
    return dot(grad, {k: delta[k] for k in keys}), quad
