#!/usr/bin/env bash
# Your own model and data through the CLI, without editing hawq: the model (tokenmix.py:
# SDPA attention, einsum token mixing, F.linear MLPs, an @ pooling query) and the data
# (stripes.py: 4-class oriented stripes under noise) live in this folder, put on
# PYTHONPATH; hawq builds them from their _target_ and prepares the model (every matrix
# product a named op). Stages: train, evaluate, curvature, mixed 4/8 allocation, PTQ.
# About 1 minute on 2 CPU cores. Extra Hydra overrides as arguments go to the run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
python -m hawq.run name=own_model \
  model=custom model._target_=tokenmix.TokenMix model.dim=32 model.depth=2 \
  model.prepare.input_shape='[1,16,16]' \
  data=custom data.datasets._target_=stripes.datasets data.datasets.n_train=4096 \
  data.datasets.n_test=1024 data.datasets.noise=0.8 \
  train.epochs=8 train.optimizer.lr=3e-3 \
  hessian.max_samples=50 alloc.int4_share=0.5 \
  quant.default.granularity=per_channel \
  'stages=[train,evaluate,hessian,alloc,ptq]' "$@"
