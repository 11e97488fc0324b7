"""Data: CIFAR-10 (python or npz layout), synthetic images, on-device loaders."""

from hawq.data.cifar10 import download_cifar10, load_cifar10
from hawq.data.dataset import ImageSplit, Splits
from hawq.data.loader import BatchLoader
from hawq.data.synthetic import make_synthetic

__all__ = [
    "BatchLoader",
    "ImageSplit",
    "Splits",
    "download_cifar10",
    "load_cifar10",
    "make_synthetic",
]
