#!/usr/bin/env bash
# The vit_cifar study end to end (one GPU; see README.md for what each step gives):
#   FP (3 seeds) -> hessian -> landscape -> PTQ / QAT baselines -> INT4-share sweep ->
#   Hessian-allocated mixed precision at 0.25/0.5/0.75 of the BOPs range -> integer-only
#   -> RESULTS table. Steps skip when their outputs exist (re-run to resume).
# Env: HAWQ_RUNS (default runs), JOBS (parallel sweep jobs of the joblib launcher, default 1:
# one GPU), extra Hydra overrides as arguments (e.g. data.root=/data/cifar10).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${HAWQ_RUNS:-runs}
JOBS=${JOBS:-1}
SWEEP=(-m hydra/launcher=joblib hydra.launcher.n_jobs="$JOBS")
run() { python -m hawq.run "$@"; }

# 1. FP: seed 0 is the checkpoint every later step starts from; seeds 1, 2 for mean +- std
bash experiments/vit_cifar/train_fp.sh "$@"
run "${SWEEP[@]}" experiment=vit_cifar seed=1,2 'name=vit_cifar_s${seed}' stages='[train,evaluate]' "$@"

# 2. curvature and loss landscape of the FP model
run experiment=vit_cifar stages='[hessian,landscape]' "$@"

# 3. uniform baselines (seed method and ours), all-INT2 PTQ and progressive QAT
run experiment=vit_cifar_seed_method "$@"
run experiment=vit_cifar_seed_method quant.default.w_bits=2 quant.default.a_bits=2 \
    name=vit_cifar_seed_method_w2 "$@"
run experiment=vit_cifar_w8a8 "$@"
run experiment=vit_cifar_w4a4 stages='[ptq,qat,integer]' "$@"
run experiment=vit_cifar_w2a2_progressive "$@"
run experiment=vit_cifar_fp8 "$@"

# 4. measured single-op ranking, and the INT4-share sweep (PTQ at each minimum share)
run experiment=vit_cifar_hawq alloc.method=measured alloc.int4_share=1.0 stages='[alloc,ptq]' \
    name=vit_cifar_measured "$@"
run "${SWEEP[@]}" experiment=vit_cifar_hawq alloc.int4_share=0.5,0.8,0.9,0.95,1.0 \
    'name=vit_cifar_int4share_${alloc.int4_share}' stages='[alloc,ptq]' "$@"

# 5. Hessian-allocated mixed precision at fractions of the BOPs range (HAWQ-V3 parametrisation)
for f in 0.25 0.5 0.75; do
  b=$(python -m hawq.report budget "$RUNS/vit_cifar/hessian.json" --kind bops --fraction "$f")
  run experiment=vit_cifar_hawq alloc.bops="$b" name="vit_cifar_hawq_bops$f" "$@"
done

# 6. the seed study's INT4-share curve (Hessian / measured / random order) and INT2 on the six
#    least sensitive ops
run experiment=vit_cifar_seed_method stages='[int4_curve]' name=vit_cifar_int4_curve \
    'curve.hessian=${paths.runs}/vit_cifar/hessian.json' curve.rest=fp curve.int2_plan_k=6 \
    data.val_size=5000 curve.batch_size=100 'curve.int2_orders=[hessian,measured]' \
    curve.all_int2=true "$@"

# 7. the table
python -m hawq.report table experiments/vit_cifar/rows.yaml --runs "$RUNS"
