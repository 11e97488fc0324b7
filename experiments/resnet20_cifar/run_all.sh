#!/usr/bin/env bash
# HAWQ-style ResNet-20 on CIFAR-10 with BN folding (one GPU): FP (3 seeds) -> hessian ->
# W8A8, W4A4 -> mixed 4/8 at 0.25/0.5/0.75 of the BOPs and size ranges -> the HAWQ setting
# (weights {2,4,8} at <= 3 average bits, 4-bit activations, 3 seeds) -> integer -> table.
# Env: HAWQ_RUNS (default runs), JOBS (joblib sweep jobs, default 1); extra overrides as args.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${HAWQ_RUNS:-runs}
JOBS=${JOBS:-1}
SWEEP=(-m hydra/launcher=joblib hydra.launcher.n_jobs="$JOBS")
run() { python -m hawq.run "$@"; }

run experiment=resnet20_cifar stages='[train,evaluate,hessian,landscape]' "$@"
run "${SWEEP[@]}" experiment=resnet20_cifar seed=1,2 'name=resnet20_cifar_s${seed}' \
    stages='[train,evaluate]' "$@"

run experiment=resnet20_cifar_w8a8 "$@"
run experiment=resnet20_cifar_w4a4 "$@"

for kind in bops size_mb; do
  for f in 0.25 0.5 0.75; do
    b=$(python -m hawq.report budget "$RUNS/resnet20_cifar/hessian.json" --kind "$kind" \
        --fraction "$f")
    run experiment=resnet20_cifar_mixed "alloc.$kind=$b" alloc.frontier_budget="$kind" \
        name="resnet20_mixed_$kind$f" "$@"
  done
done

run "${SWEEP[@]}" experiment=resnet20_cifar_hawq_a4 seed=0,1,2 \
    'name=resnet20_cifar_hawq_a4_s${seed}' "$@"

python -m hawq.report table experiments/resnet20_cifar/rows.yaml --runs "$RUNS"
