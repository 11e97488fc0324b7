#!/usr/bin/env bash
# FP ViT on CIFAR-10, the seed recipe (200 epochs, batch 512, Adam 1e-4, cosine,
# crop + flip). On one H100 this takes a few minutes; on a 2-core CPU ~5 days.
# HAWQ_DATA: a folder with cifar-10-batches-py or the npz shards (downloaded when absent).
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m hawq.run experiment=vit_cifar stages='[train,evaluate]' "$@"
