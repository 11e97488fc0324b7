#!/usr/bin/env bash
# A token model through the CLI: a transformers BertForSequenceClassification (hf_bert.py,
# random weights from a config) on token ids (motifs.py: which 3-token motif a sequence
# carries, with decoys), every stage from training to integer-only inference and export.
# model.prepare.input_dtype=int64 + vocab_size make prepare() trace it on token ids.
# About 3 minutes on 2 CPU cores. Extra Hydra overrides as arguments go to the run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
python -m hawq.run name=own_bert \
  model=custom model._target_=hf_bert.bert \
  model.prepare.input_shape='[16]' model.prepare.input_dtype=int64 model.prepare.vocab_size=64 \
  data=custom data.datasets._target_=motifs.datasets \
  train.epochs=6 train.optimizer.lr=3e-3 \
  hessian.max_samples=30 alloc.int4_share=0.5 \
  quant.default.granularity=per_channel integer.onnx=true \
  'stages=[train,evaluate,hessian,alloc,ptq,integer,export]' "$@"
