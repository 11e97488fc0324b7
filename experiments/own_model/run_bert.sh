#!/usr/bin/env bash
# A token model through the CLI: a transformers BertForSequenceClassification (hf_bert.py,
# random weights from a config) on token ids (motifs.py: which 3-token motif a sequence
# carries, with decoys), every stage from training to integer-only inference and export.
# model.prepare.input_dtype=int64 + vocab_size make prepare() trace it on token ids.
# About 3 minutes on 2 CPU cores. Extra Hydra overrides as arguments go to the run.
# PADDED=1: sequences of varying length padded to 16, samples ({input_ids, attention_mask},
# label) and the model called model(**inputs) (model.prepare.inputs lists its keyword inputs);
# the attention mask reaches the integer model and the ONNX file as an input of its own.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
if [ "${PADDED:-0}" = 1 ]; then
  inputs=(name=own_bert_padded data.datasets._target_=motifs.padded_datasets
    'model.prepare.inputs={input_ids:{shape:[16],dtype:int64,vocab_size:64},attention_mask:{shape:[16],dtype:int64,vocab_size:2}}')
else
  inputs=(name=own_bert data.datasets._target_=motifs.datasets
    model.prepare.input_shape='[16]' model.prepare.input_dtype=int64 model.prepare.vocab_size=64)
fi
python -m hawq.run "${inputs[@]}" \
  model=custom model._target_=hf_bert.bert data=custom \
  train.epochs=6 train.optimizer.lr=3e-3 \
  hessian.max_samples=30 alloc.int4_share=0.5 \
  quant.default.granularity=per_channel integer.onnx=true \
  'stages=[train,evaluate,hessian,alloc,ptq,integer,export]' "$@"
