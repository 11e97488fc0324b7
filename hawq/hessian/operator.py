"""The loss Hessian as a matrix-free linear operator supporting ``@``.

:class:`HessianOperator` represents the data-averaged Hessian

.. math::  \\bar H = \\frac{\\sum_b n_b \\, \\nabla^2_\\theta L_b(\\theta)}{\\sum_b n_b}

over a set of parameters grouped into named blocks (one block per quantizable
op: its weight; see :func:`op_blocks`). Vectors are flat, blocks concatenated in order;
``op.blocks[name]`` is the slice of a block. ``op @ v`` works for ``v`` of shape
``(n,)`` or ``(n, k)``; ``op.block(name)`` is the diagonal block
:math:`\\bar H_{ll}` as an operator of its own.

Memory: with a single (local) batch the first-order graph is built once and
reused by every product (double-backward backend). With several batches each
product loops over them, building and freeing one batch's graph at a time, so
no more than one batch's graph is alive. Under ``torch.distributed`` every rank
keeps its shard of the batches and the numerator and :math:`\\sum_b n_b` are
all-reduced.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from hawq.errors import HawqError
from hawq.hessian import dist
from hawq.hessian.hvp import (
    BACKENDS,
    Batch,
    BatchHVP,
    LossFn,
    make_batch_hvp,
    note_train_mode,
    reiterable,
)
from hawq.hessian.objective import as_batch_loss
from hawq.models.ops import quantizable_ops

log = logging.getLogger("hawq")


def op_params(module: nn.Module, include_bias: bool = False) -> list[nn.Parameter]:
    """The parameters of a quantizable op that its block Hessian spans: the weight only
    (default: what quantization perturbs and the allocator multiplies by
    :math:`\\lVert \\Delta W \\rVert^2`), or weight and bias."""
    ends = ("weight", "bias") if include_bias else ("weight",)
    return [p for n, p in module.named_parameters() if n.endswith(ends) and p.requires_grad]


def op_blocks(model: nn.Module, include_bias: bool = False) -> dict[str, list[nn.Parameter]]:
    """Op name -> its parameters (:func:`op_params`), network order; parameter-free ops
    (MatMul) are omitted."""
    blocks = {name: op_params(m, include_bias) for name, m in quantizable_ops(model).items()}
    return {name: ps for name, ps in blocks.items() if ps}


class HessianOperator:
    """Matrix-free :math:`\\bar H` over named parameter blocks.

    Args:
        model: the network, in eval mode; never ``torch.compile``-d.
        loss_fn: ``loss_fn(output, target)``, a mean over the batch.
        batches: an iterable of ``(x, y)`` that can be iterated again for every product.
        blocks: name -> parameters; default: every quantizable op's weight
            (:func:`op_blocks`; the bias is held fixed).
        backend: ``double_backward`` or ``func`` (see :mod:`hawq.hessian.hvp`).

    Attributes:
        blocks: name -> slice of the flat vector.
        numel: name -> number of elements of the block.
        n_hvp: products computed so far (a product restricted to one block counts as one).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Batch],
        blocks: Mapping[str, Sequence[torch.Tensor]] | None = None,
        backend: str = "double_backward",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown HVP backend {backend!r}; allowed: {', '.join(BACKENDS)}")
        batches = reiterable(batches, "Hessian operator")
        note_train_mode(model, "Hessian operator")
        self.model, self.loss_fn, self.batches, self.backend = model, loss_fn, batches, backend
        self._loss = as_batch_loss(loss_fn)
        blocks = op_blocks(model) if blocks is None else blocks
        if not blocks:
            raise ValueError("no parameters to take the Hessian over")
        self.params: list[torch.Tensor] = []
        self.block_index: dict[str, list[int]] = {}
        self.blocks: dict[str, slice] = {}
        start = 0
        for name, ps in blocks.items():
            self.block_index[name] = list(range(len(self.params), len(self.params) + len(ps)))
            self.params.extend(ps)
            size = sum(p.numel() for p in ps)
            self.blocks[name] = slice(start, start + size)
            start += size
        self.numel = {name: s.stop - s.start for name, s in self.blocks.items()}
        self.size = start
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        self.n_hvp = 0
        self.vmap_columns = 16  # columns of op @ V per vmapped double backward (1: loop)
        local = list(dist.shard(batches))
        if not local and dist.world()[1] == 1:
            raise HawqError("no batches to take the Hessian over")
        # one local batch: keep it (and, for double backward, its first-order graph)
        self._fixed: Batch | None = local[0] if len(local) == 1 else None
        self._cache: BatchHVP | None = None

    # -- linear-operator protocol ------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`\\bar H v` for ``v`` of shape ``(n,)`` or ``(n, k)``."""
        return self._apply(v, list(range(len(self.params))))

    def block(self, name: str) -> BlockOperator:
        """The diagonal block :math:`\\bar H_{ll}` of op ``name`` as an operator."""
        return BlockOperator(self, name)

    # -- internals ---------------------------------------------------------------------------
    def _apply(self, v: torch.Tensor, idx: list[int]) -> torch.Tensor:
        if v.ndim == 2 and v.shape[1] > 1 and self._batchable():
            return torch.cat(
                [self._apply_batched(c, idx) for c in v.split(self.vmap_columns, 1)], dim=1
            )
        if v.ndim == 2:
            return torch.stack([self._apply(c, idx) for c in v.unbind(1)], dim=1)
        shapes = [self.params[i].shape for i in idx]
        n = sum(s.numel() for s in shapes)
        if v.shape != (n,):
            raise ValueError(f"vector of shape {tuple(v.shape)}, operator needs ({n},)")
        vs = list(v.to(self.dtype).split([s.numel() for s in shapes]))
        vs = [c.reshape(s) for c, s in zip(vs, shapes)]
        out = self.apply_list(vs, idx)
        return torch.cat([o.reshape(-1) for o in out])

    def _batchable(self) -> bool:
        return (
            self.vmap_columns > 1
            and self._fixed is not None
            and dist.world()[1] == 1
            and self.backend == "double_backward"
        )

    def _apply_batched(self, v: torch.Tensor, idx: list[int]) -> torch.Tensor:
        """Columns of ``v`` (n, k) in one vmapped double backward (one batch, no ranks)."""
        shapes = [self.params[i].shape for i in idx]
        k = v.shape[1]
        vs = [
            c.T.reshape(k, *s)
            for c, s in zip(v.to(self.dtype).split([s.numel() for s in shapes]), shapes)
        ]
        if self._cache is None:
            self._cache = make_batch_hvp(
                self.backend, self.model, self.loss_fn, self.params, self._fixed
            )
        try:
            out = self._cache.batched(vs, idx)
        except RuntimeError as e:  # an op without a batching rule for its double backward
            log.info(
                "hessian: vmapped products unavailable (%s); one product per column",
                str(e).splitlines()[0][:120],
            )
            self.vmap_columns = 1
            return torch.stack([self._apply(c, idx) for c in v.unbind(1)], dim=1)
        self.n_hvp += k
        return torch.cat([o.reshape(k, -1) for o in out], dim=1).T  # (n, k)

    def apply_list(self, vs: Sequence[torch.Tensor], idx: Sequence[int]) -> list[torch.Tensor]:
        """:math:`\\bar H_{SS} v_S` with tensors shaped like ``params[idx]``."""
        self.n_hvp += 1
        if self._fixed is not None and self.backend == "double_backward":
            if self._cache is None:
                self._cache = make_batch_hvp(
                    self.backend, self.model, self.loss_fn, self.params, self._fixed
                )
            acc = self._cache(vs, idx)
            count = torch.tensor(
                float(self._loss.size(self._fixed)), device=self.device, dtype=self.dtype
            )
            acc = [a * count for a in acc]
        else:
            acc = [torch.zeros_like(v) for v in vs]
            count = torch.zeros((), device=self.device, dtype=self.dtype)
            local = [self._fixed] if self._fixed is not None else dist.shard(self.batches)
            for batch in local:
                hvp = make_batch_hvp(self.backend, self.model, self.loss_fn, self.params, batch)
                nb = self._loss.size(batch)
                acc = [a + nb * h for a, h in zip(acc, hvp(vs, idx))]
                count += nb
                del hvp  # frees this batch's graph before the next one is built
        *acc, count = dist.all_reduce_sum([*acc, count.reshape(1)])
        return [a / count for a in acc]

    def release(self) -> None:
        """Drop the cached first-order graph (it is rebuilt on the next product)."""
        self._cache = None


class BlockOperator:
    """Diagonal block :math:`\\bar H_{ll}` of a :class:`HessianOperator` (shares its cache)."""

    def __init__(self, parent: HessianOperator, name: str) -> None:
        self.parent, self.name = parent, name
        self.idx = parent.block_index[name]
        n = parent.numel[name]
        self.shape = (n, n)
        self.dtype, self.device = parent.dtype, parent.device
        self.blocks = {name: slice(0, n)}

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.parent._apply(v, self.idx)


def double_backward_error(op: HessianOperator) -> str | None:
    """Try one double-backward product on this rank's first batch (no collective inside,
    so a failing rank cannot hang the others), then agree over ranks.

    Returns:
        ``None`` when it ran on every rank, else the first line of the error (an op without
        a double backward, e.g. fused SDPA attention). With one local batch the graph built
        here is kept as ``op``'s cache.
    """
    batch = op._fixed if op._fixed is not None else next(iter(dist.shard(op.batches)), None)
    err = None
    if batch is not None:
        try:
            hvp = make_batch_hvp("double_backward", op.model, op.loss_fn, op.params, batch)
            hvp([torch.ones_like(p) for p in op.params], list(range(len(op.params))))
            op._cache = hvp if op._fixed is not None else None
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as e:
            err = (str(e).splitlines() or [type(e).__name__])[0][:200]
    failed = torch.tensor([float(err is not None)], dtype=torch.float64, device=op.device)
    if float(dist.all_reduce_sum([failed])[0][0]) > 0 and err is None:
        err = "double backward failed on another rank"
    return err


def hessian_operator(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    blocks: Mapping[str, Sequence[torch.Tensor]] | None = None,
    backend: str = "auto",
) -> tuple[HessianOperator, str]:
    """Build the operator. ``backend="auto"`` is ``double_backward`` (reuses the first-order
    graph) unless one double-backward product fails (:func:`double_backward_error`), then
    ``func``: decided by trying, never by timing, so a rerun (a resumed run, another rank,
    a loaded machine) picks the same backend and gives the same numbers.

    Returns:
        ``(operator, why)``: ``why`` says how the backend was chosen (``requested``,
        ``auto: double backward runs`` or ``auto: double backward fails (<error>)``).
    """
    if backend != "auto":
        return HessianOperator(model, loss_fn, batches, blocks, backend), "requested"
    op = HessianOperator(model, loss_fn, batches, blocks, "double_backward")
    err = double_backward_error(op)
    if err is None:
        return op, "auto: double backward runs"
    log.warning("hessian: double backward fails (%s); using the func backend", err)
    return HessianOperator(model, loss_fn, op.batches, blocks, "func"), (
        f"auto: double backward fails ({err})"
    )
