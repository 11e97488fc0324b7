"""A token data set of one's own: which motif a sequence carries (4 classes).

``datasets(n_train, n_test, length, vocab, noise, seed)`` returns ``{"train", "test"}`` of
``(ids, label)`` samples: ``ids`` an int64 tensor of ``length`` token ids in ``[0, vocab)``,
``label`` the index of the 3-token motif planted at a random position among random tokens
(motif tokens also appear scattered, so a bag of words does not solve it: order matters).
Generated, so it needs no download; the input of a ``transformers`` BERT.

``padded_datasets(...)``: the same task on sequences of varying length, padded to ``length``
with token 0 (``[PAD]``, never a content token), whose samples are
``({"input_ids": ids, "attention_mask": mask}, label)``: the keyword inputs of a
``transformers`` model (``model(**inputs)``), the mask 1 on real tokens, 0 on padding.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

MOTIF_LEN = 3


def _sequences(n: int, length: int, vocab: int, motifs: torch.Tensor, g: torch.Generator):
    labels = torch.randint(0, len(motifs), (n,), generator=g)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    # decoys: every sequence also holds the tokens of another motif, out of order
    decoy = (labels + torch.randint(1, len(motifs), (n,), generator=g)) % len(motifs)
    pos = torch.rand(n, length, generator=g).argsort(dim=1)[:, :MOTIF_LEN]
    ids.scatter_(1, pos, motifs[decoy].flip(1))
    start = torch.randint(0, length - MOTIF_LEN + 1, (n,), generator=g)
    rows = torch.arange(n)[:, None]
    ids[rows, start[:, None] + torch.arange(MOTIF_LEN)] = motifs[labels]
    return TensorDataset(ids, labels)


def datasets(
    n_train: int = 4096, n_test: int = 1024, length: int = 16, vocab: int = 64, seed: int = 0
) -> dict[str, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randperm(vocab, generator=g)[: 4 * MOTIF_LEN].view(4, MOTIF_LEN)
    return {
        "train": _sequences(n_train, length, vocab, motifs, g),
        "test": _sequences(n_test, length, vocab, motifs, g),
    }


class PaddedMotifs(torch.utils.data.Dataset):
    """``({"input_ids", "attention_mask"}, label)`` samples of padded motif sequences."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.labels[i]


def _padded(n: int, length: int, vocab: int, motifs: torch.Tensor, g: torch.Generator):
    ids, labels = _sequences(n, length, vocab - 1, motifs, g).tensors
    ids = ids + 1  # content tokens 1..vocab-1; 0 is [PAD]
    real = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < real[:, None]).long()
    # the motif must lie in the real part: re-plant it where the sequence is too short
    for i in torch.nonzero(real < length).flatten().tolist():
        start = int(torch.randint(0, int(real[i]) - MOTIF_LEN + 1, (1,), generator=g))
        ids[i, start : start + MOTIF_LEN] = motifs[labels[i]] + 1
    return PaddedMotifs(ids * mask, mask, labels)


def padded_datasets(
    n_train: int = 4096, n_test: int = 1024, length: int = 16, vocab: int = 64, seed: int = 0
) -> dict[str, PaddedMotifs]:
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randperm(vocab - 1, generator=g)[: 4 * MOTIF_LEN].view(4, MOTIF_LEN)
    return {
        "train": _padded(n_train, length, vocab, motifs, g),
        "test": _padded(n_test, length, vocab, motifs, g),
    }
