import torch

from hawq.data import BatchLoader, make_synthetic
from hawq.data.augment import normalize, random_crop_flip


def test_crop_is_a_shifted_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, padding=2, flip=False, generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_flip_and_determinism():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    a = random_crop_flip(x, 0, True, torch.Generator().manual_seed(3))
    b = random_crop_flip(x, 0, True, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    flipped = [torch.equal(a[i], x[i].flip(-1)) and not torch.equal(a[i], x[i]) for i in range(64)]
    assert 10 < sum(flipped) < 54


def test_normalize_uses_channel_stats():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_loader_epochs_reproducible_and_distinct():
    s = make_synthetic(n_train=100, n_test=10)
    loader = BatchLoader(s.train, 32, s.mean, s.std, shuffle=True, augment=True, drop_last=True)
    assert len(loader) == 3
    loader.set_epoch(1)
    first = [y for _, y in loader]
    again = [y for _, y in loader]
    loader.set_epoch(2)
    other = [y for _, y in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_synthetic_data_is_class_dependent():
    s = make_synthetic(n_train=400, n_test=100, seed=0)
    x = s.train.images.float()
    means = torch.stack([x[s.train.labels == c].mean(0) for c in range(10)])
    within = torch.stack([x[s.train.labels == c].std(0).mean() for c in range(10)]).mean()
    assert (means[0] - means[1]).abs().mean() > 0.5 * within
