#!/usr/bin/env bash
# The run_all.sh chain at smoke size on a CPU (synthetic data, tiny ViT, ~1-2 min on 2 cores):
# FP -> hessian -> landscape -> alloc at 0.25/0.5/0.75 of the BOPs range -> PTQ -> integer ->
# table. Checks that the commands and the table work; its accuracies are not results.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HAWQ_RUNS=${HAWQ_RUNS:-runs}
python -m hawq.run experiment=smoke stages='[train,evaluate,hessian,landscape]' "$@"
for f in 0.25 0.5 0.75; do
  b=$(python -m hawq.report budget "$HAWQ_RUNS/smoke/hessian.json" --kind bops --fraction "$f")
  python -m hawq.run experiment=smoke stages='[alloc,ptq,integer]' \
      paths.checkpoint="$HAWQ_RUNS/smoke/model.pt" alloc.hessian="$HAWQ_RUNS/smoke/hessian.json" \
      alloc.bops="$b" name="smoke_bops$f" "$@"
done
python -m hawq.report table experiments/vit_cifar/rows_smoke.yaml --runs "$HAWQ_RUNS"
