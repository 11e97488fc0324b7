"""A ``transformers`` model through the CLI: ``model=custom model._target_=hf_vit.vit``.

Built from a config with random weights (nothing is downloaded) and trained by hawq's train
stage; its ``ImageClassifierOutput`` is read through ``.logits``.
"""

from __future__ import annotations


def vit(image_size: int = 16, patch_size: int = 4, channels: int = 1, dim: int = 32,
        depth: int = 2, heads: int = 2, num_classes: int = 4):  # fmt: skip
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=channels,
                    hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                    intermediate_size=2 * dim, num_labels=num_classes)  # fmt: skip
    return ViTForImageClassification(cfg)
