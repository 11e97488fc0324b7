"""``nn.MultiheadAttention`` with every matrix product a named module.

``nn.MultiheadAttention`` runs a fused kernel that reads ``in_proj_weight`` and
``out_proj.weight`` directly, so hooking or wrapping its submodules cannot make its
products quantizable. :class:`CapturedMultiheadAttention` computes the same function
with named ops, in execution order::

    q_proj, k_proj, v_proj   (Linear, split from in_proj_weight / in_proj_bias)
    qk                       (MatMul q @ k^T, then * 1/sqrt(head_dim) + masks, softmax)
    av                       (MatMul attn @ v)
    out_proj                 (Linear)

It has no fused ``in_proj_weight`` (the attribute is None), so the fast paths of
``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` are never taken and they call
this module's forward. Checkpoints of the original module (``in_proj_weight``,
``q_proj_weight``...) load into it: a load-state-dict pre-hook splits them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hawq.models.ops import MatMul

Tensor = torch.Tensor


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` (out, in) and ``bias``, trainable where
    they were (``requires_grad`` of each source is kept)."""
    out_features, in_features = weight.shape
    lin = nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        lin.bias.requires_grad_(bias.requires_grad)
    return lin


class CapturedMultiheadAttention(nn.Module):
    """Drop-in ``nn.MultiheadAttention`` whose products are named ``Linear``/``MatMul`` ops.

    Build it with :meth:`from_module`. ``forward`` has the signature and outputs of
    ``nn.MultiheadAttention.forward``; ``is_causal`` without ``attn_mask`` applies a
    causal mask (torch raises instead). In training, dropout acts on the attention
    weights like the original (a different random stream).
    """

    captured = True  # hawq.models.capture: nothing inside to trace
    in_proj_weight = None  # no fused weights: disables the transformer fast paths
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(self.kdim, embed_dim)
        self.v_proj = nn.Linear(self.vdim, embed_dim)
        self.qk = MatMul()
        self.av = MatMul()
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.register_load_state_dict_pre_hook(_split_in_proj)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> CapturedMultiheadAttention:
        """The equivalent module with copies of ``mha``'s weights (same device/dtype).

        Raises:
            NotImplementedError: ``add_bias_kv`` or ``add_zero_attn`` was set.
        """
        for arg, used in (
            ("add_bias_kv", mha.bias_k is not None),
            ("add_zero_attn", mha.add_zero_attn),
        ):
            if used:
                raise NotImplementedError(f"CapturedMultiheadAttention: {arg}=True is unsupported")
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.kdim, mha.vdim, mha.batch_first)
        if mha._qkv_same_embed_dim:
            ws = mha.in_proj_weight.chunk(3)
        else:
            ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        bs = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        new.q_proj, new.k_proj, new.v_proj = (_linear(w, b) for w, b in zip(ws, bs))
        new.out_proj = _linear(mha.out_proj.weight, mha.out_proj.bias)
        return new.train(mha.training)

    def _bias(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        n: int,
        l: int,
        s: int,
        dtype: torch.dtype,
    ) -> Tensor | None:
        """One additive mask broadcastable to the scores (N, H, L, S), or None."""
        bias = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(l, s, dtype=torch.bool, device=self.out_proj.weight.device)
            attn_mask = attn_mask.triu(1)  # True above the diagonal: future keys
        if attn_mask is not None:
            m = _additive(attn_mask, dtype)
            bias = m.view(n, self.num_heads, l, s) if m.dim() == 3 else m  # (N*H, L, S) | (L, S)
        if key_padding_mask is not None:
            kpm = _additive(key_padding_mask, dtype).view(n, 1, 1, s)
            bias = kpm if bias is None else bias + kpm
        return bias

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise NotImplementedError("CapturedMultiheadAttention: nested tensor inputs")
        batched = query.dim() == 3
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query[None], key[None], value[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, l, _ = query.shape
        s = key.shape[1]
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, l, h, hd).transpose(1, 2)  # (N, H, L, hd)
        k = self.k_proj(key).view(n, s, h, hd).transpose(1, 2)  # (N, H, S, hd)
        v = self.v_proj(value).view(n, s, h, hd).transpose(1, 2)  # (N, H, S, hd)
        scores = self.qk(q, k.transpose(-2, -1)) * self.scale  # (N, H, L, S)
        bias = self._bias(attn_mask, key_padding_mask, is_causal, n, l, s, scores.dtype)
        if bias is not None:
            scores = scores + bias
        attn = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = self.av(attn, v).transpose(1, 2).reshape(n, l, self.embed_dim)  # (N, L, E)
        out = self.out_proj(out)
        if not batched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)  # (L, N, E)
        if not need_weights:
            return out, None
        weights = attn.mean(dim=1) if average_attn_weights else attn  # (N, L, S) | (N, H, L, S)
        return out, weights if batched else weights[0]


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask (True = do not attend) -> 0 / -inf; float masks are added as they are."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _split_in_proj(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """Rename ``nn.MultiheadAttention`` keys to the ``q_proj``/``k_proj``/``v_proj`` ones."""
    for kind in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}in_proj_{kind}", None)
        if fused is not None:
            for part, t in zip("qkv", fused.chunk(3)):
                state_dict[f"{prefix}{part}_proj.{kind}"] = t
    for part in "qkv":
        w = state_dict.pop(f"{prefix}{part}_proj_weight", None)
        if w is not None:
            state_dict[f"{prefix}{part}_proj.weight"] = w


def swap_attention(model: nn.Module) -> tuple[nn.Module, list[str], dict[str, str]]:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by the captured one.

    ``nn.TransformerEncoder`` s get ``use_nested_tensor = False`` (their nested-tensor
    path would bypass the layers' attention modules).

    Returns:
        ``(model, replaced names, {name: reason})`` for modules left as they were; a
        bare ``nn.MultiheadAttention`` root is returned replaced.
    """
    if isinstance(model, nn.MultiheadAttention):
        return CapturedMultiheadAttention.from_module(model), [""], {}
    replaced, skipped = [], {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.MultiheadAttention):
                continue
            full = f"{name}.{child_name}" if name else child_name
            try:
                setattr(module, child_name, CapturedMultiheadAttention.from_module(child))
                replaced.append(full)
            except NotImplementedError as e:
                skipped[full] = str(e)
    return model, replaced, skipped
