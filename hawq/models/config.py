"""Typed schemas of the ``model`` config group (one per built-in ``_target_``).

:func:`validate_model` checks ``cfg.model`` before anything is built: a wrong type
(``model.depth=abc``), an unknown key, or a value the constructor would reject
(``model.heads`` not dividing ``model.dim``, a ResNet depth that is not ``6n+2``)
becomes one line naming the key, the value and what is allowed. A ``_target_`` of
the user's own is only checked to be importable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hawq.errors import HawqError
from hawq.schema import require, typed


@dataclass
class ViTConfig:
    """``model`` group for :class:`hawq.models.vit.ViT`."""

    _target_: str = "hawq.models.vit.ViT"
    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    dim: int = 512
    depth: int = 6
    heads: int = 8
    mlp_dim: int = 512
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for key in (
            "image_size",
            "patch_size",
            "in_chans",
            "num_classes",
            "dim",
            "depth",
            "heads",
            "mlp_dim",
        ):
            require(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        require(
            self.image_size % self.patch_size == 0,
            "patch_size",
            self.patch_size,
            f"a divisor of image_size={self.image_size}",
        )
        require(
            self.dim % self.heads == 0,
            "heads",
            self.heads,
            f"a divisor of dim={self.dim} (head width dim/heads)",
        )
        require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "0 <= dropout < 1")


@dataclass
class ResNetConfig:
    """``model`` group for :class:`hawq.models.resnet.ResNet` (CIFAR ResNet, depth 6n+2)."""

    _target_: str = "hawq.models.resnet.ResNet"
    depth: int = 20
    width: int = 16
    num_classes: int = 10
    in_chans: int = 3

    def __post_init__(self) -> None:
        require(
            self.depth >= 8 and (self.depth - 2) % 6 == 0,
            "depth",
            self.depth,
            "6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110)",
        )
        for key in ("width", "num_classes", "in_chans"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")


SCHEMAS: dict[str, type] = {
    "hawq.models.vit.ViT": ViTConfig,
    "hawq.models.resnet.ResNet": ResNetConfig,
}


def validate_model(node: DictConfig | dict | None) -> Any:
    """Validate the ``model`` group; returns the typed config (or the node for own models)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict) or not node.get("_target_"):
        raise HawqError("bad config model: needs a _target_ (e.g. model=vit_cifar)")
    target = node["_target_"]
    if target in SCHEMAS:
        return typed(node, SCHEMAS[target], "model")
    from hydra.utils import get_object

    try:
        get_object(target)  # a class or a factory function
    except Exception as e:  # noqa: BLE001 - import errors vary
        raise HawqError(
            f"bad config model._target_={target!r}: cannot import it; built in: "
            f"{', '.join(sorted(SCHEMAS))}"
        ) from e
    return node
